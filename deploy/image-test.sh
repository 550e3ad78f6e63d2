#!/usr/bin/env bash
# The image end to end: a minimal Debian rootfs (mmdebstrap, iptables and nftables in it) imported
# as the base, the Dockerfile's `prebuilt` target built on it with a host-built binary, and the
# container started inside a network namespace made here, as daemonset.yaml runs it (host network
# = the namespace, NET_ADMIN/NET_RAW/NET_BIND_SERVICE only, read-only root). Then `dig` on
# 169.254.20.10 from the namespace (nodedns's own health record, which needs no upstream: nothing
# leaves the namespace), the NOTRACK rules in the backend the entrypoint picked, and their removal
# at stop.
#
# Usage: deploy/image-test.sh [BINARY]   (default target/debug/nodedns; needs root, podman, runc,
# mmdebstrap, dig, iptables). Prints SKIP and exits 0 when a tool is missing, unless CI=true.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-target/debug/nodedns}
for t in podman runc mmdebstrap dig ip iptables-legacy-save; do
    if ! command -v "$t" >/dev/null; then
        [[ "${CI:-}" == true ]] && { echo "image-test: $t is missing" >&2; exit 1; }
        echo "SKIP image-test: $t is missing"; exit 0
    fi
done
[[ -x "$bin" ]] || { echo "image-test: $bin not built" >&2; exit 1; }

work=$(mktemp -d /tmp/nodedns-image.XXXXXX)
ns=nodedns-img-$$
name=nodedns-img-$$
tag=localhost/nodedns-image-test:$$
base=localhost/nodedns-base-test:$$
cleanup() {
    podman rm -f "$name" >/dev/null 2>&1 || true
    podman rmi -f "$tag" "$base" >/dev/null 2>&1 || true
    ip netns del "$ns" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

# 1. The base: Debian bookworm minbase with iptables and nftables (~15 s).
mmdebstrap --quiet --variant=minbase --include=iptables,nftables bookworm "$work/base.tar"
podman import --quiet "$work/base.tar" "$base" >/dev/null

# 2. The image, from the Dockerfile, with the host-built binary.
podman build --quiet --target prebuilt --build-arg "BASE=$base" --build-arg "PREBUILT=$bin" \
    -t "$tag" . >/dev/null

# 3. A network namespace as the node; a resolver inside it for the default zone.
ip netns add "$ns"
ip -n "$ns" link set lo up
ip -n "$ns" addr add 10.0.1.53/32 dev lo
printf 'nameserver 10.0.1.53\n' >"$work/resolv.conf"
# The hostPath /run/xtables.lock stand-in (FileOrCreate); this node is the namespace alone.
: >"$work/xtables.lock"

podman run -d --name "$name" --cgroup-manager=cgroupfs --runtime runc \
    --ulimit nofile=4096:4096 --ulimit nproc=4096:4096 \
    --network "ns:/run/netns/$ns" --read-only \
    --cap-drop ALL --cap-add NET_ADMIN --cap-add NET_RAW --cap-add NET_BIND_SERVICE \
    -v "$work/xtables.lock:/run/xtables.lock" \
    -v "$work/resolv.conf:/etc/resolv.conf:ro" \
    "$tag" -localip=169.254.20.10 -link-kind=bridge -upstream-svc=10.0.1.53 \
    -metrics-listen=127.0.0.1:9253 -metrics-listen-address=off >/dev/null

# 4. Answers on the link-local IP (nodedns's own health record needs no upstream).
ok=
for _ in $(seq 1 20); do
    if out=$(ip netns exec "$ns" dig +time=1 +tries=1 @169.254.20.10 health.nodedns. TXT CH 2>/dev/null) \
        && grep -q 'status: NOERROR' <<<"$out"; then
        out=$(grep -m1 'status:' <<<"$out")
        ok=1
        break
    fi
    sleep 0.1
done
if [[ -z "$ok" ]]; then
    echo "image-test: no answer on 169.254.20.10" >&2
    ip netns exec "$ns" dig +time=1 +tries=1 @169.254.20.10 health.nodedns. TXT CH >&2 || true
    ip -n "$ns" addr >&2 || true
    ip netns exec "$ns" iptables-nft-save >&2 || true
    podman logs "$name" >&2 || true
    exit 1
fi
echo "image-test: dig @169.254.20.10 health.nodedns. TXT CH -> $out"
podman logs "$name" 2>&1 | grep -m1 'iptables backend' || true

# 5. Its rules, in the backend the entrypoint picked (nft on an empty node).
rules=$(ip netns exec "$ns" iptables-nft-save | grep -c 'nodedns: ' || true)
if [[ "$rules" -ne 12 ]]; then
    echo "image-test: want 12 nodedns rules in iptables-nft, got $rules" >&2
    ip netns exec "$ns" iptables-nft-save >&2
    podman logs "$name" >&2 || true
    exit 1
fi
echo "image-test: 12 nodedns rules (iptables-nft)"

# 6. SIGTERM: the rules go.
podman stop -t 10 "$name" >/dev/null
rules=$(ip netns exec "$ns" iptables-nft-save | grep -c 'nodedns: ' || true)
[[ "$rules" -eq 0 ]] || { echo "image-test: $rules rules left after stop" >&2; exit 1; }
echo "image-test: ok"
