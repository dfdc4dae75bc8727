#!/usr/bin/env bash
# Builds the flashable device image (image/pi.toml) into target/images/fleet-pi.img: the static
# aarch64 agent and bootguard first, then `fleet-image build` (cached layers under
# $FLEET_CACHE/image: a second run with the same inputs takes seconds, a changed agent rebuilds
# the root file system and the disk but not the base system).
#
#   scripts/image.sh [--out PATH]
set -euo pipefail
cd "$(dirname "$0")/.."
FLEET_CACHE=${FLEET_CACHE:-/var/cache/fleet}
export PATH="$FLEET_CACHE/tools/bin:$HOME/.cargo/bin:$PATH"
out=target/images/fleet-pi.img
[ "${1:-}" = "--out" ] && out=$2

bash scripts/bootstrap.sh --image
cargo build --locked --release --quiet --target aarch64-unknown-linux-musl -p fleet-agent
# Alone, so cargo does not unify its features with the agent's: fleet-contracts without serde.
cargo build --locked --release --quiet --target aarch64-unknown-linux-musl -p fleet-bootguard
cargo build --locked --release --quiet -p fleet-image
arm=target/aarch64-unknown-linux-musl/release
FLEET_IMAGE_CACHE="$FLEET_CACHE/image" target/release/fleet-image build \
  --recipe image/pi.toml --out "$out" \
  --artifact "fleet-agent=$arm/fleet-agent" \
  --artifact "fleet-bootguard=$arm/fleet-bootguard"
