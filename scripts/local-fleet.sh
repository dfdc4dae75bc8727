#!/usr/bin/env bash
# Sets everything up and runs a local fleet on this machine until Ctrl-C:
# a nats-server with JetStream and decentralized JWT auth, the operator (API + status page),
# one agent driving the host's podman as device pi-01 (enrolled with a one-time token), and
# the example Deployment from examples/.
#
# Environment: FLEET_STATE (default ./.fleet), FLEET_NATS_PORT (4222), FLEET_HTTP_PORT (8080),
# FLEET_NATS_MONITOR_PORT (8222), FLEET_LOG (info),
# FLEET_NATS_CLUSTER=3: three nats-server nodes on loopback (client ports FLEET_NATS_PORT+0..2,
#   monitor ports FLEET_NATS_MONITOR_PORT+0..2, route ports FLEET_NATS_ROUTE_PORT (6222)+0..2),
#   every KV bucket with three replicas. The HA fleet is a separate fleet, with its own
#   NATS store, identity and device state in $FLEET_STATE/ha; the single-node fleet's state
#   stays as it is, and each run of either comes back as it was,
# FLEET_STANDBY=1: a second operator on FLEET_HTTP_PORT+1, standing by to take over.
# State survives restarts: run it again and the fleet comes back.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
FLEET_CACHE=${FLEET_CACHE:-/var/cache/fleet}
STATE=${FLEET_STATE:-$ROOT/.fleet}
NATS_PORT=${FLEET_NATS_PORT:-4222}
HTTP_PORT=${FLEET_HTTP_PORT:-8080}
MON_PORT=${FLEET_NATS_MONITOR_PORT:-8222}
ROUTE_PORT=${FLEET_NATS_ROUTE_PORT:-6222}
NODES=${FLEET_NATS_CLUSTER:-1}
case "$NODES" in 1|3) ;; *) echo "local-fleet: FLEET_NATS_CLUSTER must be 1 or 3" >&2; exit 2 ;; esac
if [ "$NODES" = 3 ]; then
  # A store is not moved between a single server and a cluster: the HA fleet is another
  # fleet, with state of its own (sharing the device's state would make it a device of the
  # single-node fleet that finds another store, which holds and waits for an admin).
  STATE=$STATE/ha
fi
export FLEET_SERVER="http://127.0.0.1:$HTTP_PORT"
# fleetctl authenticates with the operator's admin token (created with the identity).
export FLEET_TOKEN_FILE="$STATE/identity/admin.token"

say() { printf '\033[1m==> %s\033[0m\n' "$*"; }

if [ "$NODES" = 3 ]; then
  say "the HA fleet is a separate fleet: its NATS store, identity and device state are in $STATE"
fi
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
NATS_URLS=""
if [ "$NODES" = 1 ]; then
  NATS_URLS="nats://127.0.0.1:$NATS_PORT"
  cat >"$STATE/nats.conf" <<CONF
# Written by scripts/local-fleet.sh: JetStream, decentralized JWT auth and TLS (from the include).
listen: "127.0.0.1:$NATS_PORT"
http: "127.0.0.1:$MON_PORT"
server_name: fleet-local
jetstream { store_dir: "$STATE/nats" }
include "identity/nats-auth.conf"
CONF
else
  for i in 0 1 2; do
    n=n$((i + 1))
    # Only the other nodes' routes: with its own route listed, a fresh nats-server 2.10
    # cluster under load can form a meta group that leaves one node out.
    routes=""
    for j in 0 1 2; do
      [ "$j" = "$i" ] || routes="${routes:+$routes, }\"nats-route://127.0.0.1:$((ROUTE_PORT + j))\""
    done
    mkdir -p "$STATE/cluster/$n"
    NATS_URLS="${NATS_URLS:+$NATS_URLS,}nats://127.0.0.1:$((NATS_PORT + i))"
    # The resolver block after the include gives each node its own account folder; routes
    # are plain because they stay on loopback (across hosts they need TLS and auth).
    cat >"$STATE/nats-$n.conf" <<CONF
# Written by scripts/local-fleet.sh: node $n of a 3-node cluster.
listen: "127.0.0.1:$((NATS_PORT + i))"
http: "127.0.0.1:$((MON_PORT + i))"
server_name: $n
jetstream { store_dir: "$STATE/cluster/$n/store" }
include "identity/nats-auth.conf"
resolver: { type: full, dir: "$STATE/cluster/$n/jwt", allow_delete: false, interval: "2m", timeout: "3s" }
cluster { name: fleet-local, listen: "127.0.0.1:$((ROUTE_PORT + i))", routes: [$routes] }
CONF
  done
fi
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
    # One id per line: word splitting is what passes them as separate arguments.
    # shellcheck disable=SC2086
    podman rm -f -t 5 $ids >/dev/null
  fi
  say "stopped; state kept in $STATE"
}
trap cleanup INT TERM EXIT

auth=()  # curl arguments for the operator's API, once its token exists
wait_for() { # wait_for WHAT URL [JQ-CONDITION]
  local what=$1 url=$2 cond=${3:-.} i
  for i in $(seq 1 900); do  # up to 90 s: a fresh NATS cluster can take a minute to place its buckets
    if out=$(curl -fsS "${auth[@]}" "$url" 2>/dev/null) && jq -e "$cond" >/dev/null 2>&1 <<<"$out"; then return 0; fi
    sleep 0.1
  done
  echo "local-fleet: $what did not come up; see $STATE/logs" >&2
  exit 1
}

if [ "$NODES" = 1 ]; then
  say "starting nats-server on 127.0.0.1:$NATS_PORT (TLS with the fleet CA, JWT auth, JetStream in $STATE/nats)"
  nats-server -c "$STATE/nats.conf" >"$STATE/logs/nats.log" 2>&1 &
  pids+=($!)
  wait_for nats-server "http://127.0.0.1:$MON_PORT/healthz?js-enabled-only=true"
else
  say "starting a 3-node nats-server cluster on 127.0.0.1:$NATS_PORT-$((NATS_PORT + 2)) (TLS, JWT auth, JetStream in $STATE/cluster)"
  start_node() { # start_node I: starts node I (0-based), its pid in pids[I]
    nats-server -c "$STATE/nats-n$(($1 + 1)).conf" >>"$STATE/logs/nats-n$(($1 + 1)).log" 2>&1 &
    pids[$1]=$!
  }
  for i in 0 1 2; do : >"$STATE/logs/nats-n$((i + 1)).log"; start_node "$i"; done
  # Plain /healthz: a cluster node answers 200 once it has caught up with the others.
  for i in 0 1 2; do wait_for "nats-server n$((i + 1))" "http://127.0.0.1:$((MON_PORT + i))/healthz"; done
  # Now and then a fresh nats-server 2.10 cluster elects a meta leader whose group leaves a
  # node out for good (R3 buckets then fail: "no suitable peers for placement"). Restarting
  # the left-out node makes the leader add it.
  left_out() { # the 0-based nodes the meta leader's group lacks; fails while no leader answers
    local i out
    for i in 0 1 2; do
      out=$(curl -fsS "http://127.0.0.1:$((MON_PORT + i))/jsz" 2>/dev/null) || continue
      if jq -e --arg me "n$((i + 1))" '.meta_cluster.leader == $me' >/dev/null <<<"$out"; then
        jq -r --arg me "n$((i + 1))" \
          '["n1", "n2", "n3"] - [.meta_cluster.replicas[]?.name] - [$me] | .[] | ltrimstr("n") | tonumber - 1' <<<"$out"
        return 0
      fi
    done
    return 1
  }
  for attempt in 1 2 3; do
    for _ in $(seq 1 150); do
      if missing=$(left_out) && [ -z "$missing" ]; then break 2; fi
      sleep 0.1
    done
    if [ "$attempt" = 3 ]; then
      echo "local-fleet: the NATS cluster's JetStream meta group still lacks a node; see $STATE/logs" >&2
      exit 1
    fi
    for i in ${missing:-0 1 2}; do
      say "nats-server n$((i + 1)) is not in the JetStream meta group: restarting it"
      kill -TERM "${pids[$i]}" 2>/dev/null || true
      wait "${pids[$i]}" 2>/dev/null || true
      start_node "$i"
      wait_for "nats-server n$((i + 1))" "http://127.0.0.1:$((MON_PORT + i))/healthz"
    done
  done
fi

say "starting fleet-operator on $FLEET_SERVER"
"$BIN/fleet-operator" --nats-url "$NATS_URLS" --listen "127.0.0.1:$HTTP_PORT" \
  --identity "$STATE/identity" --instance operator-a --kv-replicas "$NODES" \
  >"$STATE/logs/operator.log" 2>&1 &
pids+=($!)
auth=(-H "Authorization: Bearer $(cat "$FLEET_TOKEN_FILE")")
wait_for fleet-operator "$FLEET_SERVER/api/v1/status" '.state == "converged"'
if [ -n "${FLEET_STANDBY:-}" ]; then
  say "starting a standby fleet-operator on http://127.0.0.1:$((HTTP_PORT + 1))"
  "$BIN/fleet-operator" --nats-url "$NATS_URLS" --listen "127.0.0.1:$((HTTP_PORT + 1))" \
    --identity "$STATE/identity" --instance operator-b --kv-replicas "$NODES" \
    >"$STATE/logs/operator-standby.log" 2>&1 &
  pids+=($!)
  wait_for "standby fleet-operator" "http://127.0.0.1:$((HTTP_PORT + 1))/api/v1/status" '.role == "standby"'
fi

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
nats_url = "$NATS_URLS"
state_dir = "$STATE/agent"
nats_ca_file = "$STATE/identity/tls/ca.pem"
heartbeat_interval_secs = 2
# This agent runs on your machine: it refuses OS upgrades, and has no boot partition.
os_upgrades = false
boot_dir = "$STATE/agent/boot"
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
    nats-server     $NATS_URLS   (logs: $STATE/logs/nats*.log)
    fleet-operator  $FLEET_SERVER/   status page; metrics at /metrics   (log: $STATE/logs/operator.log)${FLEET_STANDBY:+
    standby         http://127.0.0.1:$((HTTP_PORT + 1))/   takes over when the first one stops   (log: $STATE/logs/operator-standby.log)}
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
