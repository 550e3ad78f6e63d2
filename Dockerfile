# nodedns image: nodedns, iptables (legacy and nft backends, picked at start like kube-proxy's
# iptables-wrapper) and nft; nothing else is added to the base. Runs with a read-only root file
# system (daemonset.yaml): nothing here writes outside /run/xtables.lock.
#
#   podman build -t nodedns:0.1.0 .                                  # builds nodedns in BUILDER
#   podman build --target prebuilt --build-arg PREBUILT=target/release/nodedns -t nodedns .
#
# BASE must be Debian-like; with iptables and nftables already in it (deploy/image-test.sh's
# mmdebstrap rootfs) no package is installed, otherwise they are installed from its apt sources.
ARG BASE=docker.io/library/debian:bookworm-slim
ARG BUILDER=docker.io/library/rust:1.95-slim-bookworm

FROM ${BUILDER} AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked && install -D target/release/nodedns /out/nodedns

FROM ${BASE} AS runtime
RUN if ! command -v iptables-legacy >/dev/null || ! command -v iptables-nft >/dev/null \
        || ! command -v nft >/dev/null; then \
        apt-get update && apt-get install -y --no-install-recommends iptables nftables \
        && rm -rf /var/lib/apt/lists/*; \
    fi
COPY deploy/iptables-wrapper /usr/local/sbin/iptables-wrapper
COPY deploy/entrypoint /usr/local/bin/entrypoint
# nodedns runs iptables-save/-restore and ip6tables-save/-restore from PATH: these names go to the
# wrapper, which runs the backend the entrypoint chose (/usr/local/sbin comes first in PATH).
RUN for n in iptables iptables-save iptables-restore ip6tables ip6tables-save ip6tables-restore; do \
        ln -sf iptables-wrapper /usr/local/sbin/$n; \
    done
ENTRYPOINT ["/usr/local/bin/entrypoint"]

# A binary built outside (CI, deploy/image-test.sh): --target prebuilt.
FROM runtime AS prebuilt
ARG PREBUILT=target/release/nodedns
COPY ${PREBUILT} /usr/local/bin/nodedns

# The default: nodedns built in BUILDER.
FROM runtime
COPY --from=build /out/nodedns /usr/local/bin/nodedns
