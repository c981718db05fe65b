#!/usr/bin/env bash
# A whole cluster on this machine: three JetStream servers in one cluster (fsync on every
# write; every partition log and bucket has three replicas) and three hongbao nodes n1, n2, n3
# sharing their keys. Prints how to reach them, then waits; Ctrl-C stops the nodes (each
# leaves the cluster, handing its partitions over) and then the servers.
#
#   scripts/cluster.sh                  # data in a temporary directory, removed at the end
#   DIR=/tmp/hb scripts/cluster.sh      # data (and keys) kept in DIR: start again to resume
#   PARTITIONS=16 LEASE_TTL_MS=2000 scripts/cluster.sh
#   SMOKE=1 scripts/cluster.sh          # start, one deposit through n1 read through n2 and n3, stop
#
# Any node answers any request; try `kill -9` on one (its pid is printed) and watch
# /v1/admin/cluster on the others take its partitions within a few seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

PARTITIONS="${PARTITIONS:-64}"
LEASE_TTL_MS="${LEASE_TTL_MS:-4000}"
SMOKE="${SMOKE:-0}"
HONGBAO="${HONGBAO:-target/release/hongbao}"

# shellcheck source=scripts/lib.sh
. scripts/lib.sh

if [ -n "${DIR:-}" ]; then
  KEEP_DIR=1
  mkdir -p "$DIR"
else
  KEEP_DIR=0
  DIR="$(mktemp -d -t hongbao-cluster-XXXXXX)"
fi

PIDS=()
cleanup() {
  local i
  # The nodes first (last started first), so that they leave through the servers.
  for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
    kill "${PIDS[i]}" 2>/dev/null || true
    wait "${PIDS[i]}" 2>/dev/null || true
  done
  [ "$KEEP_DIR" = 1 ] || rm -rf "$DIR"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# The nodes must share their keys (a forwarded request is authenticated again by its holder):
# made once per data directory.
if [ ! -f "$DIR/keys.env" ]; then
  python3 - >"$DIR/keys.env" <<'EOF'
import secrets
for var in ["HONGBAO_ADMIN_KEY", "HONGBAO_ISSUER_KEY", "HONGBAO_GATEWAY_KEY", "HONGBAO_TOKEN_SECRET"]:
    print(f"export {var}={secrets.token_hex(16)}")
EOF
fi
# shellcheck disable=SC1091
. "$DIR/keys.env"
export ADMIN_KEY="$HONGBAO_ADMIN_KEY"

# Three servers, routes to each other. A port picked free can be taken by another process
# before the server binds it (the server exits): then all three start again on fresh ports, up
# to three times.
start_servers() {
  local i ports
  read -r -a ports <<<"$(free_ports 6)"
  JS_PORTS=("${ports[@]:0:3}") ROUTES=() JS_PIDS=()
  for i in 3 4 5; do ROUTES+=("nats://127.0.0.1:${ports[i]}"); done
  for i in 1 2 3; do
    mkdir -p "$DIR/js$i"
    cat >"$DIR/js$i.conf" <<EOF
server_name: js$i
listen: 127.0.0.1:${JS_PORTS[i - 1]}
jetstream {
  store_dir: "$DIR/js$i"
  sync_interval: always
}
cluster {
  name: hongbao
  listen: ${ROUTES[i - 1]#nats://}
  routes: [$(IFS=,; echo "${ROUTES[*]}")]
}
EOF
    "$NATS" -c "$DIR/js$i.conf" >>"$DIR/js$i.log" 2>&1 &
    PIDS+=("$!")
    JS_PIDS+=("$!")
  done
  for i in 0 1 2; do
    wait_listening "${JS_PIDS[i]}" "${JS_PORTS[i]}" || return 1
  done
}
for attempt in 1 2 3; do
  if start_servers; then break; fi
  for pid in "${JS_PIDS[@]}"; do
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    forget_pid "$pid"
  done
  if [ "$attempt" = 3 ]; then
    echo "the JetStream servers did not start on three tries; see $DIR/js*.log" >&2
    exit 1
  fi
  echo "== a JetStream server did not start (ports ${JS_PORTS[*]}); again on fresh ports"
done
STORE="nats://$(printf '127.0.0.1:%s,' "${JS_PORTS[@]}" | sed 's/,$//')"

# The nodes, each retried on a fresh port (up to three times) if it exits before it listens.
NODE_PORTS=() NODE_PIDS=()
start_node() {
  local i=$1 port
  port="$(free_port)"
  "$HONGBAO" serve --data-dir "$DIR/n$i" --addr "127.0.0.1:$port" --store "$STORE" \
    --replicas 3 --node-id "n$i" --partitions "$PARTITIONS" --lease-ttl-ms "$LEASE_TTL_MS" \
    >>"$DIR/n$i.log" 2>&1 &
  PIDS+=("$!")
  NODE_PIDS[i - 1]=$!
  NODE_PORTS[i - 1]=$port
}
for i in 1 2 3; do start_node "$i"; done
for i in 1 2 3; do
  for attempt in 1 2 3; do
    if wait_listening "${NODE_PIDS[i - 1]}" "${NODE_PORTS[i - 1]}"; then break; fi
    if [ "$attempt" = 3 ]; then
      echo "node n$i did not start on three tries; see $DIR/n$i.log" >&2
      exit 1
    fi
    kill "${NODE_PIDS[i - 1]}" 2>/dev/null || true
    wait "${NODE_PIDS[i - 1]}" 2>/dev/null || true
    forget_pid "${NODE_PIDS[i - 1]}"
    echo "== node n$i did not start (port ${NODE_PORTS[i - 1]}); again on a fresh port"
    start_node "$i"
  done
done
echo "== waiting until the three nodes share the $PARTITIONS partitions"
for _ in $(seq 1200); do
  if fleet_balanced "$PARTITIONS" "${NODE_PORTS[@]}"; then break; fi
  sleep 0.05
done
fleet_balanced "$PARTITIONS" "${NODE_PORTS[@]}" || {
  echo "the nodes never shared the partitions fairly; see $DIR/n*.log" >&2
  exit 1
}

if [ "$SMOKE" = 1 ]; then
  # A deposit through n1 (retried through a hand-over, as any client does), read back
  # through the two others.
  python3 - "${NODE_PORTS[@]}" <<'EOF' || exit 1
import json, os, sys, time, urllib.error, urllib.request
ports = sys.argv[1:]
def call(method, port, path, key, body=None):
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": "Bearer " + os.environ[key],
                 "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
def until_answered(*args):
    for _ in range(100):
        status, body = call(*args)
        if status != 503:
            return status, body
        time.sleep(0.1)
    return status, body
status, body = until_answered("POST", ports[0], "/v1/wallets/smoke-u1/change/deposits",
    "HONGBAO_ADMIN_KEY", {"order_id": "smoke-d1", "amount": 100})
if status != 201:
    sys.exit(f"smoke: the deposit through n1 was answered {status} {body}")
for port in ports[1:]:
    status, wallet = until_answered("GET", port, "/v1/wallets/smoke-u1", "HONGBAO_GATEWAY_KEY")
    if status != 200 or wallet["balances"]["change"] != 100:
        sys.exit(f"smoke: the wallet through port {port}: {status} {wallet}")
EOF
  echo "smoke: ok (3 JetStream servers, 3 nodes, $PARTITIONS partitions; a deposit through n1 read through n2 and n3)"
  exit 0
fi

cat <<EOF
== a cluster of three JetStream servers and three hongbao nodes is running (data in $DIR)
JetStream:  $STORE
nodes:      n1 http://127.0.0.1:${NODE_PORTS[0]} (pid ${NODE_PIDS[0]})
            n2 http://127.0.0.1:${NODE_PORTS[1]} (pid ${NODE_PIDS[1]})
            n3 http://127.0.0.1:${NODE_PORTS[2]} (pid ${NODE_PIDS[2]})
keys:       $DIR/keys.env (source it for HONGBAO_ADMIN_KEY and the others)

  curl -H "Authorization: Bearer \$HONGBAO_ADMIN_KEY" http://127.0.0.1:${NODE_PORTS[0]}/v1/admin/cluster
  $HONGBAO audit --cluster --store $STORE --replicas 3 --data-dir /tmp/auditor

Ctrl-C stops everything.
EOF
wait "${NODE_PIDS[@]}"
