#!/usr/bin/env bash
# The whole test suite: installs what is missing, then formatting, lints, dependency
# invariants, unit and end-to-end tests (real nats-server and podman), the device image and
# the QEMU aarch64 device tests, and the static aarch64 agent's size budget. `.ci/run` calls
# exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
FLEET_CACHE=${FLEET_CACHE:-/var/cache/fleet}
export PATH="$FLEET_CACHE/tools/bin:$HOME/.cargo/bin:$PATH"
# Size budget of the stripped static aarch64 agent (bytes).
AGENT_SIZE_BUDGET=${AGENT_SIZE_BUDGET:-5242880}  # 5 MiB; 3.1 MiB at the start

step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

step "bootstrap"
bash scripts/bootstrap.sh
bash scripts/example-image.sh

step "cargo fmt --check"
cargo fmt --all --check

step "cargo clippy --all-targets -D warnings"
cargo clippy --locked --workspace --all-targets --quiet -- -D warnings

step "shellcheck (scripts, the initramfs hook and boot script)"
shellcheck scripts/*.sh .ci/run initramfs-hook/initramfs/hooks/fleet-bootguard \
  initramfs-hook/initramfs/scripts/local-top/fleet-bootguard

step "dependency invariants and licenses"
bash scripts/check-deps.sh
# deny.toml: permissive licenses only, no OpenSSL; offline (no advisory database). Its
# metadata needs every platform's crates on disk, which a build alone does not download.
cargo fetch --locked --quiet
cargo deny --offline check --hide-inclusion-graph licenses bans

step "build the binaries the end-to-end tests start"
cargo build --locked --workspace --bins --quiet
# The agent under test is the static musl release binary, as shipped (e2e/src/lib.rs).
cargo build --locked --release --quiet --target x86_64-unknown-linux-musl -p fleet-agent
export FLEET_AGENT_BIN=$PWD/target/x86_64-unknown-linux-musl/release/fleet-agent

step "tests (unit and end-to-end)"
cargo nextest run --locked --workspace --exclude fleet-qemu-tests --no-fail-fast

step "device image (cached layers; cold: about 15 min, most of it mmdebstrap)"
start=$(date +%s)
bash scripts/image.sh
echo "image build: $(( $(date +%s) - start )) s"

step "QEMU device tests (one emulated Pi at a time; TCG)"
# One at a time: each VM uses both cores.
cargo nextest run --locked -p fleet-qemu-tests --test-threads 1 --no-fail-fast

step "static aarch64 agent and its size budget"
cargo build --locked --release --quiet --target aarch64-unknown-linux-musl -p fleet-agent
bin=target/aarch64-unknown-linux-musl/release/fleet-agent
size=$(stat -c %s "$bin")
file_info=$(file -b "$bin" 2>/dev/null || true)
echo "fleet-agent aarch64: $size bytes (budget $AGENT_SIZE_BUDGET) ${file_info}"
if [ "$size" -gt "$AGENT_SIZE_BUDGET" ]; then
  echo "test.sh: the aarch64 agent is over its size budget" >&2
  exit 1
fi
case "$file_info" in
  *dynamically*) echo "test.sh: the aarch64 agent is not static" >&2; exit 1 ;;
esac
