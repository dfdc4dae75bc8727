#!/usr/bin/env bash
# Sets everything up and runs a local fleet on this machine until Ctrl-C:
# a nats-server with JetStream and decentralized JWT auth, the operator (API + status page),
# one agent driving the host's podman as device pi-01 (enrolled with a one-time token), and
# the example Deployment from examples/.
#
# Environment: FLEET_STATE (default ./.fleet), FLEET_NATS_PORT (4222), FLEET_HTTP_PORT (8080),
# FLEET_NATS_MONITOR_PORT (8222),
# FLEET_LOG (info). State survives restarts: run it again and the fleet comes back.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
FLEET_CACHE=${FLEET_CACHE:-/var/cache/fleet}
STATE=${FLEET_STATE:-$ROOT/.fleet}
NATS_PORT=${FLEET_NATS_PORT:-4222}
HTTP_PORT=${FLEET_HTTP_PORT:-8080}
MON_PORT=${FLEET_NATS_MONITOR_PORT:-8222}
export FLEET_SERVER="http://127.0.0.1:$HTTP_PORT"
# fleetctl authenticates with the operator's admin token (created with the identity).
export FLEET_TOKEN_FILE="$STATE/identity/admin.token"

say() { printf '\033[1m==> %s\033[0m\n' "$*"; }

say "installing what is missing (scripts/bootstrap.sh)"
bash scripts/bootstrap.sh
export PATH="$FLEET_CACHE/tools/bin:$HOME/.cargo/bin:$PATH"

say "building the example images"
bash scripts/example-image.sh

say "building fleet-agent, fleet-operator and fleetctl"
cargo build --quiet --bins
BIN=$ROOT/target/debug

mkdir -p "$STATE/nats" "$STATE/agent" "$STATE/logs"
# The fleet's NATS identity (operator, accounts, keys, TLS CA and server certificate; private
# keys mode 0600), created once and kept.
"$BIN/fleet-operator" --identity "$STATE/identity" init-identity >/dev/null
cat >"$STATE/nats.conf" <<CONF
# Written by scripts/local-fleet.sh: JetStream, decentralized JWT auth and TLS (from the include).
listen: "127.0.0.1:$NATS_PORT"
http: "127.0.0.1:$MON_PORT"
server_name: fleet-local
jetstream { store_dir: "$STATE/nats" }
include "identity/nats-auth.conf"
CONF
pids=()
cleanup() {
  trap - INT TERM EXIT
  echo
  say "stopping the local fleet"
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  ids=$(podman ps -aq --filter label=fleet.device=pi-01)
  if [ -n "$ids" ]; then
    say "removing pi-01's containers (the fleet recreates them on the next start)"
    podman rm -f -t 5 $ids >/dev/null
  fi
  say "stopped; state kept in $STATE"
}
trap cleanup INT TERM EXIT

auth=()  # curl arguments for the operator's API, once its token exists
wait_for() { # wait_for WHAT URL [JQ-CONDITION]
  local what=$1 url=$2 cond=${3:-.} i
  for i in $(seq 1 200); do
    if out=$(curl -fsS "${auth[@]}" "$url" 2>/dev/null) && jq -e "$cond" >/dev/null 2>&1 <<<"$out"; then return 0; fi
    sleep 0.1
  done
  echo "local-fleet: $what did not come up; see $STATE/logs" >&2
  exit 1
}

say "starting nats-server on 127.0.0.1:$NATS_PORT (TLS with the fleet CA, JWT auth, JetStream in $STATE/nats)"
nats-server -c "$STATE/nats.conf" >"$STATE/logs/nats.log" 2>&1 &
pids+=($!)
wait_for nats-server "http://127.0.0.1:$MON_PORT/healthz?js-enabled-only=true"

say "starting fleet-operator on $FLEET_SERVER"
"$BIN/fleet-operator" --nats-url "nats://127.0.0.1:$NATS_PORT" --listen "127.0.0.1:$HTTP_PORT" \
  --identity "$STATE/identity" \
  >"$STATE/logs/operator.log" 2>&1 &
pids+=($!)
auth=(-H "Authorization: Bearer $(cat "$FLEET_TOKEN_FILE")")
wait_for fleet-operator "$FLEET_SERVER/api/v1/status" '.state == "converged"'

if [ ! -f "$STATE/agent/identity/device.jwt" ]; then
  say "creating a one-time enrollment token for pi-01"
  token=$("$BIN/fleetctl" enroll-token create --label role=demo --label site=local --ttl 3600)
  token_line="enrollment_token = \"$token\""
else
  token_line="# enrolled already: the agent keeps its own credentials in $STATE/agent/identity"
fi
cat >"$STATE/agent.toml" <<TOML
# Written by scripts/local-fleet.sh.
device_id = "pi-01"
nats_url = "nats://127.0.0.1:$NATS_PORT"
state_dir = "$STATE/agent"
nats_ca_file = "$STATE/identity/tls/ca.pem"
heartbeat_interval_secs = 2
$token_line

[podman]
runtime = "runc"
TOML
say "starting fleet-agent as device pi-01 (host podman)"
"$BIN/fleet-agent" --config "$STATE/agent.toml" >"$STATE/logs/agent.log" 2>&1 &
pids+=($!)

say "applying examples/hello.yaml"
"$BIN/fleetctl" apply -f examples/hello.yaml --wait --timeout 120

cat <<MSG

  The local fleet is running:
    nats-server     nats://127.0.0.1:$NATS_PORT   (log: $STATE/logs/nats.log)
    fleet-operator  $FLEET_SERVER/   status page; metrics at /metrics   (log: $STATE/logs/operator.log)
    fleet-agent     device pi-01, enrolled with a one-time token, host podman   (log: $STATE/logs/agent.log)
    hello           http://127.0.0.1:18080/  -> $(curl -fsS http://127.0.0.1:18080/ 2>/dev/null || echo "not answering yet")

  Try (in another shell, from $ROOT):
    export PATH=\$PWD/target/debug:\$PATH FLEET_SERVER=$FLEET_SERVER FLEET_TOKEN_FILE=$FLEET_TOKEN_FILE
    fleetctl get devices
    fleetctl enroll-token list
    fleetctl get deployments
    fleetctl describe deployment hello
    sed 's/hello from fleet/hello again/' examples/hello.yaml > /tmp/hello.yaml && fleetctl apply -f /tmp/hello.yaml --wait
    fleetctl delete deployment hello

  Ctrl-C stops everything.
MSG
wait "${pids[@]}"
