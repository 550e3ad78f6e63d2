#!/usr/bin/env bash
# End-to-end benchmark: nodedns and unbound side by side, in one run, on loopback only.
#
# Both servers forward to one nsd (an authoritative server for a synthetic cluster.local zone with
# 100,000 names h0..h99999, TTL 1 day, made in a temp dir) and are pinned to the same CPU
# ($SERVER_CPU) with taskset; the load generators and nsd run on the other ($LOAD_CPU).
#
# Workloads (each bounded in time; caches warmed first):
#   hot      the hot set (1,000 names) at saturation, closed loop, with bench's own loadgen
#            (examples/loadgen.rs: sendmmsg/recvmmsg; dnsperf tops out below what these servers do)
#   fixed    the hot set at a fixed 20,000 qps with dnsperf -Q 20000
#   mixed    90% hot set, 10% never-repeated names (rnd-<run>-<n>.cluster.local: NXDOMAIN), loadgen
#   fill     100,000 distinct names once, then again from cache, to read the peak RSS (VmHWM)
#   warm     nodedns only (unbound keeps no cache file): start to first answer with a cache file
#            written by a previous run (--cache-file; the hot set filled, then SIGTERM, which
#            writes the file), measured with nsd stopped (SIGSTOP), so the answer can only come
#            from the file; checked with dig for a second cached name while nsd is still stopped
# Also: start to first answer (process start to the first reply, via upstream), idle RSS.
#
# Reported: qps, the server's CPU share (utime+stime from /proc/PID/stat over the run), queries per
# server-core (qps / CPU share), average latency, peak RSS; and the ratio nodedns/unbound.
#
# Settings made comparable: both cap cached TTLs at 30 s (nodedns's default --max-ttl; unbound
# cache-max-ttl: 30) and negative TTLs at 5 s; one thread / one UDP worker; no DNSSEC validation
# (unbound module-config "iterator"); ample cache sizes for 100k names on both.
#
# Usage (as root): bench/e2e.sh            DURATION=10 SERVER_CPU=0 LOAD_CPU=1 WINDOW=128
#   WORKLOADS="hot fixed mixed fill warm" (a subset runs only those)  SERVERS="nodedns unbound"
#   NODEDNS_BIN=path/to/nodedns (another build, for A/B)
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-10}
SERVER_CPU=${SERVER_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
WINDOW=${WINDOW:-128}
HOT=1000
FILL=100000
NSD_PORT=${NSD_PORT:-25353}
NODEDNS_PORT=${NODEDNS_PORT:-25354}
UNBOUND_PORT=${UNBOUND_PORT:-25355}
LOOP=127.0.0.1
WORKLOADS=${WORKLOADS:-hot fixed mixed fill warm}
SERVERS=${SERVERS:-nodedns unbound}
want() { [[ " $WORKLOADS " == *" $1 "* ]]; }

if [[ $(id -u) -ne 0 ]]; then
    echo "e2e.sh: run as root (nsd and unbound are started with config files in a temp dir)" >&2
    exit 1
fi
missing=()
for c in unbound nsd dnsperf dig; do command -v "$c" >/dev/null || missing+=("$c"); done
if ((${#missing[@]})); then
    echo "e2e.sh: installing unbound nsd dnsperf dnsutils" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq unbound nsd dnsperf dnsutils >/dev/null
fi

# One invocation: built apart, the example's dev-dependencies unify features differently and
# each build recompiled the library the other had just built (minutes per run).
cargo build --release --quiet --bin nodedns --example loadgen
NODEDNS=${NODEDNS_BIN:-$PWD/target/release/nodedns}  # NODEDNS_BIN: compare another build
LOADGEN=$PWD/target/release/examples/loadgen
CLK_TCK=$(getconf CLK_TCK)

TMP=$(mktemp -d /tmp/nodedns-e2e.XXXXXX)
PIDS=()
NSD_PID=
cleanup() {
    # nsd may be stopped (the warm workload): a stopped process acts on SIGTERM only once resumed.
    [[ -n $NSD_PID ]] && kill -CONT "$NSD_PID" 2>/dev/null || true
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    rm -rf "$TMP"
}
trap cleanup EXIT

# --- the zone and nsd ------------------------------------------------------------------------------
{
    echo '$ORIGIN cluster.local.'
    echo '$TTL 86400'
    echo '@ IN SOA ns.cluster.local. hostmaster.cluster.local. 1 7200 1800 86400 3600'
    echo '@ IN NS ns.cluster.local.'
    echo 'ns IN A 127.0.0.1'
    awk -v n="$FILL" 'BEGIN { for (i = 0; i < n; i++) printf "h%d IN A 10.%d.%d.%d\n", i, int(i / 65536) % 256, int(i / 256) % 256, i % 256 }'
} >"$TMP/cluster.local.zone"
cat >"$TMP/nsd.conf" <<EOF
server:
    ip-address: $LOOP
    port: $NSD_PORT
    server-count: 1
    username: ""
    chroot: ""
    zonesdir: "$TMP"
    database: ""
    zonelistfile: "$TMP/zone.list"
    xfrdfile: "$TMP/xfrd.state"
    xfrdir: "$TMP"
    pidfile: "$TMP/nsd.pid"
    logfile: "$TMP/nsd.log"
    verbosity: 0
    # Debian's nsd limits responses per source (RRL, 200/s): every query here comes from 127.0.0.1.
    rrl-ratelimit: 0
    rrl-whitelist-ratelimit: 0
remote-control:
    control-enable: no
zone:
    name: cluster.local
    zonefile: cluster.local.zone
EOF
taskset -c "$LOAD_CPU" nsd -d -c "$TMP/nsd.conf" &
NSD_PID=$!
PIDS+=("$NSD_PID")
"$LOADGEN" --server "$LOOP:$NSD_PORT" --first-answer --duration 20 >/dev/null

# --- the servers -----------------------------------------------------------------------------------
cat >"$TMP/unbound.conf" <<EOF
server:
    interface: $LOOP
    port: $UNBOUND_PORT
    num-threads: 1
    do-daemonize: no
    username: ""
    chroot: ""
    directory: "$TMP"
    pidfile: "$TMP/unbound.pid"
    use-syslog: no
    logfile: ""
    verbosity: 0
    do-ip6: no
    do-not-query-localhost: no
    access-control: 127.0.0.0/8 allow
    module-config: "iterator"
    cache-max-ttl: 30
    cache-max-negative-ttl: 5
    msg-cache-size: 64m
    rrset-cache-size: 128m
    num-queries-per-thread: 4096
    so-rcvbuf: 4m
    so-sndbuf: 4m
remote-control:
    control-enable: no
forward-zone:
    name: "."
    forward-addr: $LOOP@$NSD_PORT
EOF
unbound-checkconf "$TMP/unbound.conf" >/dev/null

now_ns() { date +%s%N; }
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
# Times the server's threads went to sleep and were woken (voluntary context switches, all threads).
wakeups() { cat /proc/"$1"/task/*/status 2>/dev/null | awk '$1 == "voluntary_ctxt_switches:" { n += $2 } END { print n + 0 }'; }
status_kb() { awk -v k="$2:" '$1 == k { print $2 }' "/proc/$1/status"; }
field() { sed -n "s/.*\b$1=\([0-9.]*\).*/\1/p" <<<"$2"; }

# start NAME [ARGS...]: starts the server pinned to SERVER_CPU (nodedns with ARGS added), sets PID
# and START_MS (start to first answer).
start() {
    local t0
    t0=$(now_ns)
    case $1 in
    nodedns)
        taskset -c "$SERVER_CPU" "$NODEDNS" --listen "$LOOP:$NODEDNS_PORT" --upstream "$LOOP:$NSD_PORT" \
            --setup-interface=false --firewall none --metrics-listen off --health-listen off \
            --workers 1 --cache-size 120000 --cache-bytes 64M --log-level warn "${@:2}" \
            2>>"$TMP/nodedns.log" &
        PORT=$NODEDNS_PORT
        ;;
    unbound)
        taskset -c "$SERVER_CPU" unbound -d -c "$TMP/unbound.conf" 2>"$TMP/unbound.log" &
        PORT=$UNBOUND_PORT
        ;;
    esac
    PID=$!
    PIDS+=("$PID")
    local first
    first=$(taskset -c "$LOAD_CPU" "$LOADGEN" --server "$LOOP:$PORT" --first-answer --duration 10)
    START_MS=$(awk -v a="${first#FIRST_ANSWER_NS=}" -v b="$t0" 'BEGIN { printf "%.1f", (a - b) / 1e6 }')
}

# measure NAME CMD...: runs a load command on LOAD_CPU, sets OUT and CPU (server cores used).
measure() {
    local c0 c1 t0 t1 w0 w1
    shift
    c0=$(cpu_ticks "$PID")
    w0=$(wakeups "$PID")
    t0=$(now_ns)
    OUT=$(taskset -c "$LOAD_CPU" "$@" 2>&1)
    t1=$(now_ns)
    c1=$(cpu_ticks "$PID")
    w1=$(wakeups "$PID")
    WAKES=$(awk -v w="$((w1 - w0))" -v ns="$((t1 - t0))" 'BEGIN { printf "%.0f", w / (ns / 1e9) }')
    CPU=$(awk -v c="$((c1 - c0))" -v hz="$CLK_TCK" -v ns="$((t1 - t0))" 'BEGIN { printf "%.3f", c / hz / (ns / 1e9) }')
}

loadgen() { "$LOADGEN" --server "$LOOP:$PORT" "$@"; }

declare -A R
# Every cell starts empty, so a subset of WORKLOADS still prints the table (set -u).
for s in nodedns unbound; do
    for k in start_ms idle_rss hot_qps hot_cpu hot_lat hot_lost fixed_qps fixed_cpu fixed_wakes fixed_lat fixed_lost \
        mixed_qps mixed_cpu mixed_lat mixed_lost fill_lost rss_100k peak_rss warm_start_ms; do
        R[$s.$k]=
    done
done
run_server() {
    local s=$1
    start "$s"
    R[$s.start_ms]=$START_MS
    sleep 1
    R[$s.idle_rss]=$(status_kb "$PID" VmRSS)

    if want hot; then
        # hot set, saturated
        loadgen --hot $HOT --sequential --duration 5 --window 16 >/dev/null 2>&1
        measure "$s" "$LOADGEN" --server "$LOOP:$PORT" --hot $HOT --window "$WINDOW" --duration "$DURATION"
        R[$s.hot_qps]=$(field qps "$OUT")
        R[$s.hot_cpu]=$CPU
        R[$s.hot_lat]=$(field avg_us "$OUT")
        R[$s.hot_lost]=$(field lost "$OUT")
        echo "$s hot: $OUT cpu=$CPU" >&2
    fi

    if want fixed; then
        # hot set at a fixed 20k qps (dnsperf); caches re-warmed (30 s TTL cap)
        awk -v n=$HOT 'BEGIN { for (i = 0; i < n; i++) printf "h%d.cluster.local A\n", i }' >"$TMP/hot.txt"
        loadgen --hot $HOT --sequential --duration 5 --window 16 >/dev/null 2>&1
        measure "$s" dnsperf -s $LOOP -p "$PORT" -d "$TMP/hot.txt" -l "$DURATION" -Q 20000
        R[$s.fixed_qps]=$(awk '/Queries per second:/ { print $4 }' <<<"$OUT")
        R[$s.fixed_cpu]=$CPU
        R[$s.fixed_wakes]=$WAKES
        R[$s.fixed_lat]=$(awk '/Average Latency \(s\):/ { printf "%.1f", $4 * 1e6 }' <<<"$OUT")
        R[$s.fixed_lost]=$(awk '/Queries lost:/ { print $3 }' <<<"$OUT")
        echo "$s fixed: qps=${R[$s.fixed_qps]} avg_us=${R[$s.fixed_lat]} lost=${R[$s.fixed_lost]} cpu=$CPU" >&2
    fi

    if want mixed; then
        # mixed: 90% hot, 10% never-repeated names
        loadgen --hot $HOT --sequential --duration 5 --window 16 >/dev/null 2>&1
        measure "$s" "$LOADGEN" --server "$LOOP:$PORT" --hot $HOT --random-pct 10 --window "$WINDOW" --duration "$DURATION"
        R[$s.mixed_qps]=$(field qps "$OUT")
        R[$s.mixed_cpu]=$CPU
        R[$s.mixed_lat]=$(field avg_us "$OUT")
        R[$s.mixed_lost]=$(field lost "$OUT")
        echo "$s mixed: $OUT cpu=$CPU" >&2
    fi

    if want fill; then
        # 100k distinct names cached, then served once more from cache: peak RSS
        loadgen --hot $FILL --sequential --duration 30 --window 64 >/dev/null 2>&1
        OUT=$(loadgen --hot $FILL --sequential --duration 30 --window "$WINDOW" 2>&1)
        R[$s.fill_lost]=$(field lost "$OUT")
        R[$s.rss_100k]=$(status_kb "$PID" VmRSS)
        R[$s.peak_rss]=$(status_kb "$PID" VmHWM)
        echo "$s 100k: $OUT" >&2
    fi

    kill "$PID"
    wait "$PID" 2>/dev/null || true
}

# warm_start: nodedns's start to first answer from a cache file written by a previous run (see the
# header). --shutdown-grace 0: the stop writes the file at once (the grace is no part of a start).
warm_start() {
    local file=$TMP/cache.bin last ans want
    rm -f "$file"
    start nodedns --cache-file "$file" --shutdown-grace 0
    loadgen --hot $HOT --sequential --duration 5 --window 16 >/dev/null 2>&1
    kill "$PID"
    wait "$PID" 2>/dev/null || true
    if [[ ! -s $file ]]; then
        echo "e2e.sh: nodedns wrote no cache file at stop (see $TMP/nodedns.log)" >&2
        exit 1
    fi
    kill -STOP "$NSD_PID"
    start nodedns --cache-file "$file" --shutdown-grace 0
    # Another cached name than the timed one (h0), while nsd still cannot answer.
    last=$((HOT - 1))
    want="10.$((last / 65536 % 256)).$((last / 256 % 256)).$((last % 256))"
    ans=$(dig +short +tries=1 +time=1 -p "$NODEDNS_PORT" @"$LOOP" "h$last.cluster.local" A 2>&1 || true)
    kill -CONT "$NSD_PID"
    kill "$PID"
    wait "$PID" 2>/dev/null || true
    if [[ $ans != "$want" ]]; then
        echo "e2e.sh: warm start: h$last.cluster.local gave ${ans:-nothing}, not $want from the cache file" >&2
        exit 1
    fi
    R[nodedns.warm_start_ms]=$START_MS
    echo "nodedns warm start: ${START_MS} ms to the first answer from the cache file" >&2
}

for s in $SERVERS; do run_server "$s"; done
if want warm && [[ " $SERVERS " == *" nodedns "* ]]; then warm_start; fi

# --- the table -------------------------------------------------------------------------------------
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b + 0 == 0) print "-"; else printf "%.2f", a / b }'; }
per_core() { awk -v q="$1" -v c="$2" 'BEGIN { if (c + 0 == 0) print "-"; else printf "%.0f", q / c }'; }
mb() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }
row() { printf '| %-44s | %12s | %12s | %6s |\n' "$1" "$2" "$3" "$(ratio "$2" "$3")"; }
for s in nodedns unbound; do
    R[$s.hot_pc]=$(per_core "${R[$s.hot_qps]}" "${R[$s.hot_cpu]}")
    R[$s.fixed_pc]=$(per_core "${R[$s.fixed_qps]}" "${R[$s.fixed_cpu]}")
    R[$s.mixed_pc]=$(per_core "${R[$s.mixed_qps]}" "${R[$s.mixed_cpu]}")
done
echo
echo "nodedns vs unbound $(unbound -V | awk 'NR == 1 { print $2 }'), ${DURATION}s per workload, servers on CPU $SERVER_CPU, load and nsd on CPU $LOAD_CPU, loadgen window $WINDOW"
echo
printf '| %-44s | %12s | %12s | %6s |\n' "metric" "nodedns" "unbound" "ratio"
printf '|%s|%s|%s|%s|\n' "$(printf -- '-%.0s' {1..46})" "$(printf -- '-%.0s' {1..14})" "$(printf -- '-%.0s' {1..14})" "--------"
row "hot set saturated: qps" "${R[nodedns.hot_qps]}" "${R[unbound.hot_qps]}"
row "hot set saturated: server CPU (cores)" "${R[nodedns.hot_cpu]}" "${R[unbound.hot_cpu]}"
row "hot set saturated: qps per server-core" "${R[nodedns.hot_pc]}" "${R[unbound.hot_pc]}"
row "hot set saturated: avg latency (us)" "${R[nodedns.hot_lat]}" "${R[unbound.hot_lat]}"
row "hot set saturated: lost" "${R[nodedns.hot_lost]}" "${R[unbound.hot_lost]}"
row "fixed 20k qps: qps" "${R[nodedns.fixed_qps]}" "${R[unbound.fixed_qps]}"
row "fixed 20k qps: server CPU (cores)" "${R[nodedns.fixed_cpu]}" "${R[unbound.fixed_cpu]}"
row "fixed 20k qps: server wake-ups per second" "${R[nodedns.fixed_wakes]}" "${R[unbound.fixed_wakes]}"
row "fixed 20k qps: avg latency (us)" "${R[nodedns.fixed_lat]}" "${R[unbound.fixed_lat]}"
row "fixed 20k qps: lost" "${R[nodedns.fixed_lost]}" "${R[unbound.fixed_lost]}"
row "mixed 90/10: qps" "${R[nodedns.mixed_qps]}" "${R[unbound.mixed_qps]}"
row "mixed 90/10: server CPU (cores)" "${R[nodedns.mixed_cpu]}" "${R[unbound.mixed_cpu]}"
row "mixed 90/10: qps per server-core" "${R[nodedns.mixed_pc]}" "${R[unbound.mixed_pc]}"
row "mixed 90/10: avg latency (us)" "${R[nodedns.mixed_lat]}" "${R[unbound.mixed_lat]}"
row "mixed 90/10: lost" "${R[nodedns.mixed_lost]}" "${R[unbound.mixed_lost]}"
row "100k names: RSS after filling (MB)" "$(mb "${R[nodedns.rss_100k]}")" "$(mb "${R[unbound.rss_100k]}")"
row "peak RSS, VmHWM (MB)" "$(mb "${R[nodedns.peak_rss]}")" "$(mb "${R[unbound.peak_rss]}")"
row "idle RSS after start (MB)" "$(mb "${R[nodedns.idle_rss]}")" "$(mb "${R[unbound.idle_rss]}")"
row "start to first answer (ms)" "${R[nodedns.start_ms]}" "${R[unbound.start_ms]}"
row "start to first answer, warm cache file (ms)" "${R[nodedns.warm_start_ms]}" "${R[unbound.warm_start_ms]}"
