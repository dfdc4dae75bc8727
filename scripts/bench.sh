#!/usr/bin/env bash
# Benchmarks of the local fleet (not tests: they print figures and never fail on time).
#   scripts/bench.sh [N]       N deployments for the latency figures (default 25)
#   scripts/bench.sh recovery  only the operator recovery figures (hollow devices)
# Builds release binaries and the static aarch64 agent, then runs e2e/src/bin/fleet-bench.rs.
set -euo pipefail
cd "$(dirname "$0")/.."
FLEET_CACHE=${FLEET_CACHE:-/var/cache/fleet}
export PATH="$FLEET_CACHE/tools/bin:$HOME/.cargo/bin:$PATH"
bash scripts/bootstrap.sh
bash scripts/example-image.sh
cargo build --locked --release --quiet --workspace --bins
cargo build --locked --release --quiet --target aarch64-unknown-linux-musl -p fleet-agent
exec target/release/fleet-bench "$@"
