#!/usr/bin/env bash
# Dependency invariants, checked mechanically (docs/ARCHITECTURE.md):
# fleet-contracts stays pure (serde only: no tokio, no NATS client, no HTTP);
# fleet-bootguard stays small (no tokio, no NATS); fleetctl reaches the fleet through the
# operator's HTTP API only.
set -euo pipefail
cd "$(dirname "$0")/.."
fail=0
forbid() { # forbid PACKAGE CRATE...
  local pkg=$1; shift
  local tree
  tree=$(cargo tree --locked -p "$pkg" -e normal --prefix none --format '{p}' | awk '{print $1}' | sort -u)
  for dep in "$@"; do
    if grep -qx "$dep" <<<"$tree"; then
      echo "check-deps: $pkg must not depend on $dep" >&2
      cargo tree --locked -p "$pkg" -e normal -i "$dep" >&2 || true
      fail=1
    fi
  done
}
forbid fleet-contracts tokio async-nats axum ureq nkeys
# fleet-bootguard runs in the initramfs before root is mounted: no async runtime, no NATS, no
# serde (it takes only fleet_contracts::boot, with default features off).
forbid fleet-bootguard tokio async-nats axum ureq nkeys serde serde_json
# fleetctl talks to the operator's HTTP API only: no NATS client, no NATS keys, no server.
forbid fleetctl async-nats nkeys axum tokio
[ $fail -eq 0 ] && echo "check-deps: ok"
exit $fail
