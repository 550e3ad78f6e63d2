#!/usr/bin/env bash
# Runs every fuzz target for FUZZ_SECONDS each (default 20) from its seeds (fuzz/seeds/<target>) and fails
# on the first crash; the crash input is left in fuzz/artifacts/<target>/. Needs the nightly
# toolchain; installs cargo-fuzz from crates.io if missing. Long runs: FUZZ_SECONDS=600 fuzz/run.sh.
set -euo pipefail
cd "$(dirname "$0")"
SECONDS_EACH=${FUZZ_SECONDS:-20}
command -v cargo-fuzz >/dev/null || cargo install --locked --quiet cargo-fuzz
cargo +nightly fuzz build --release >/dev/null 2>&1 || cargo +nightly fuzz build --release
for t in $(cargo +nightly fuzz list); do
    corpus=$(mktemp -d)
    [ -d "seeds/$t" ] && cp -r "seeds/$t/." "$corpus/"
    log=$(mktemp)
    if ! cargo +nightly fuzz run --release "$t" "$corpus" -- -max_total_time="$SECONDS_EACH" >"$log" 2>&1; then
        tail -40 "$log"
        echo "fuzz: $t crashed (input in fuzz/artifacts/$t/)" >&2
        exit 1
    fi
    echo "fuzz: $t $(grep -Eo 'Done [0-9]+ runs in [0-9]+ second' "$log" | tail -1), no crash"
    rm -rf "$corpus" "$log"
done
