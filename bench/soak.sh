#!/usr/bin/env bash
# Soak: constant cache churn and periodic reloads, RSS sampled every 30 s (loopback only; bounded).
#
# nsd serves a wildcard zone (every name under soak.local has an A record, TTL 1 day, so nothing
# expires and only the byte budget bounds the cache); bench's loadgen sends never-repeated names
# (--random-pct 100) at nodedns as fast as it answers, for $MINUTES minutes, while nodedns gets a
# SIGHUP (a full reload) every 60 s. The cache is small on purpose (--cache-bytes 4M
# --negative-cache-bytes 1M) and its entry caps huge, the configuration under which quick_cache's
# ghosts once grew RSS without bound. Prints "minute RSS_kB entries bytes" every 30 s.
#
# Usage (as root): bench/soak.sh     MINUTES=10 CACHE_BYTES=4M
set -euo pipefail
cd "$(dirname "$0")/.."
MINUTES=${MINUTES:-10}
CACHE_BYTES=${CACHE_BYTES:-4M}
NSD_PORT=${NSD_PORT:-26353}
PORT=${PORT:-26354}
MPORT=${MPORT:-26355}
LOOP=127.0.0.1

command -v nsd >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nsd >/dev/null
command -v curl >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq curl >/dev/null
# One invocation: built apart, the example's dev-dependencies unify features differently and
# each build recompiled the library the other had just built (minutes per run).
cargo build --release --quiet --bin nodedns --example loadgen
NODEDNS=${NODEDNS_BIN:-$PWD/target/release/nodedns}
LOADGEN=$PWD/target/release/examples/loadgen

TMP=$(mktemp -d /tmp/nodedns-soak.XXXXXX)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    rm -rf "$TMP"
}
trap cleanup EXIT

printf '%s\n' '$ORIGIN soak.local.' '$TTL 86400' \
    '@ IN SOA ns.soak.local. hostmaster.soak.local. 1 7200 1800 86400 3600' \
    '@ IN NS ns.soak.local.' 'ns IN A 127.0.0.1' '* IN A 10.9.9.9' >"$TMP/soak.local.zone"
printf '%s\n' 'server:' "    ip-address: $LOOP" "    port: $NSD_PORT" '    server-count: 1' \
    '    username: ""' '    chroot: ""' "    zonesdir: \"$TMP\"" '    database: ""' \
    "    zonelistfile: \"$TMP/zone.list\"" "    xfrdfile: \"$TMP/xfrd.state\"" \
    "    xfrdir: \"$TMP\"" "    pidfile: \"$TMP/nsd.pid\"" "    logfile: \"$TMP/nsd.log\"" \
    '    verbosity: 0' '    rrl-ratelimit: 0' '    rrl-whitelist-ratelimit: 0' \
    'remote-control:' '    control-enable: no' 'zone:' '    name: soak.local' \
    '    zonefile: soak.local.zone' >"$TMP/nsd.conf"
nsd -d -c "$TMP/nsd.conf" &
PIDS+=($!)
"$LOADGEN" --server "$LOOP:$NSD_PORT" --zone soak.local --first-answer --duration 20 >/dev/null

"$NODEDNS" --upstream "$LOOP:$NSD_PORT" --listen "$LOOP:$PORT" --setup-interface=false \
    --firewall none --metrics-listen "$LOOP:$MPORT" --health-listen off --max-ttl 1h \
    --cache-bytes "$CACHE_BYTES" --negative-cache-bytes 1M --cache-size 10000000 \
    --negative-cache-size 10000000 --reload-interval 3600s --workers 1 --log-level warn &
NPID=$!
PIDS+=($NPID)
"$LOADGEN" --server "$LOOP:$PORT" --zone soak.local --first-answer --duration 20 >/dev/null

"$LOADGEN" --server "$LOOP:$PORT" --zone soak.local --random-pct 100 --window 256 \
    --duration "$((MINUTES * 60))" >"$TMP/loadgen.out" 2>&1 &
LPID=$!
PIDS+=($LPID)
metric() { curl -s "http://$LOOP:$MPORT/metrics" | awk -v s="$1" '$1 == s { print $2 }'; }
echo "minute RSS_kB entries{positive} bytes{positive}"
for ((i = 0; i <= MINUTES * 2; i++)); do
    rss=$(awk '/VmRSS/ { print $2 }' "/proc/$NPID/status")
    echo "$(awk -v i="$i" 'BEGIN { printf "%.1f", i / 2 }') $rss $(metric 'nodedns_cache_entries{kind="positive"}') $(metric 'nodedns_cache_bytes{kind="positive"}')"
    # A reload every minute: a new forwarding generation, the cache resized and pruned.
    if ((i % 2 == 1)); then kill -HUP "$NPID"; fi
    if ((i < MINUTES * 2)); then sleep 30; fi
done
wait "$LPID" || true
grep RESULT "$TMP/loadgen.out" || cat "$TMP/loadgen.out"
echo "VmHWM: $(awk '/VmHWM/ { print $2 }' "/proc/$NPID/status") kB"
