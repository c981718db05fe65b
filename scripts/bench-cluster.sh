#!/usr/bin/env bash
# Reproduces the "Cluster (issue 13): nodes" figures of docs/BENCHMARKS.md on one machine:
# deposits through one, two and three `hongbao serve --node-id` nodes on one synced
# nats-server (64 partitions), beside a single node on sled and on JetStream and the hello
# baseline, all in the same run; rewards of one activity (crediting paused, then drained),
# withdrawals, coupons of one hot batch and a hot red packet claimed through the first node of
# each fleet
# (the packet, its sender's wallet and its claimers' wallets in different partitions: every
# transfer is a command sent to another partition's holder), beside the same on a single
# JetStream node; then the hand-over after `kill -9` of a node (time until every partition is
# served again, over KILLS kills).
#
# Each node gets its share of the load from a load generator of its own (`loadgen deposits
# --target`), so about (N-1)/N of each node's requests are forwarded to another node. On a
# 2-core machine the nodes, the JetStream server and the load generators share two cores: the
# figures say what forwarding and partitioning cost, not what N machines would do.
#
# Also the script the README points to for trying a cluster by hand: KEEP=1 leaves the last
# three nodes and the server running and prints their addresses.
#
#   scripts/bench-cluster.sh [LOG]        # LOG default: bench-cluster-<utc time>.log
#   DURATION=10 IN_FLIGHT=96 KILLS=10 scripts/bench-cluster.sh
#   SKIP_LOAD=1 KILLS=10 scripts/bench-cluster.sh     # the hand-over only
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION="${DURATION:-5}"
IN_FLIGHT="${IN_FLIGHT:-64}"
KILLS="${KILLS:-5}"
PARTITIONS="${PARTITIONS:-64}"
LEASE_TTL_MS="${LEASE_TTL_MS:-4000}"
KEEP="${KEEP:-0}"
SKIP_LOAD="${SKIP_LOAD:-0}"
# The hot packet: shares, concurrent claimers, connections, packets per fleet.
SHARES="${SHARES:-2000}"
CLIENTS="${CLIENTS:-200}"
POOL="${POOL:-32}"
ROUNDS="${ROUNDS:-2}"
LOG="${1:-bench-cluster-$(date -u +%Y%m%dT%H%M%SZ).log}"
HONGBAO="${HONGBAO:-target/release/hongbao}"

# shellcheck source=scripts/lib.sh
. scripts/lib.sh

DIR="$(mktemp -d -t hongbao-cluster-XXXXXX)"
PIDS=()
cleanup() {
  [ "$KEEP" = 1 ] && return 0
  # Last started first: the nodes leave the cluster through the server, which goes last.
  local i
  for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
    kill "${PIDS[i]}" 2>/dev/null || true
    wait "${PIDS[i]}" 2>/dev/null || true
  done
  rm -rf "$DIR"
}
trap cleanup EXIT



# The nodes share their keys (a forwarded request is authenticated again by its holder); only
# the nodes get them: the single-node load generator runs a server with keys of its own.
ADMIN_KEY="bench-admin-$(python3 -c 'import secrets; print(secrets.token_hex(8))')"
export ADMIN_KEY

JS_PORT="$(free_port)"
printf 'server_name: single\nlisten: 127.0.0.1:%s\njetstream {\n  store_dir: "%s/js"\n  sync_interval: always\n}\n' \
  "$JS_PORT" "$DIR" >"$DIR/js.conf"
"$NATS" -c "$DIR/js.conf" >"$DIR/js.out" 2>"$DIR/js.log" &
PIDS+=("$!")
wait_port "$JS_PORT"
JS="nats://127.0.0.1:$JS_PORT"

declare -A NODE_PID NODE_PORT
# start_node ID: a node on its own data directory and port (kept across restarts).
start_node() {
  local id="$1"
  local port="${NODE_PORT[$id]:-$(free_port)}"
  NODE_PORT[$id]="$port"
  HONGBAO_ADMIN_KEY="$ADMIN_KEY" HONGBAO_ISSUER_KEY="bench-issuer-0123456789abcdef" \
    HONGBAO_GATEWAY_KEY="bench-gateway-0123456789abcdef" \
    HONGBAO_TOKEN_SECRET="bench-secret-0123456789abcdef" \
    "$HONGBAO" serve --data-dir "$DIR/$id" --addr "127.0.0.1:$port" --store "$JS" \
    --replicas 1 --single-replica-synced --node-id "$id" --partitions "$PARTITIONS" \
    --lease-ttl-ms "$LEASE_TTL_MS" >"$DIR/$id.out" 2>>"$DIR/$id.log" &
  NODE_PID[$id]="$!"
  PIDS+=("$!")
  wait_port "$port"
}

# balanced ID...: the listed nodes see only each other, at fair shares, serving every
# partition (lib.sh's fleet_balanced).
balanced() {
  local ports=() id
  for id in "$@"; do ports+=("${NODE_PORT[$id]}"); done
  fleet_balanced "$PARTITIONS" "${ports[@]}"
}

# wait_balanced ID...: prints the milliseconds it took.
wait_balanced() {
  local start end
  start="$(date +%s%N)"
  for _ in $(seq 600); do
    if balanced "$@"; then
      end="$(date +%s%N)"
      echo $(((end - start) / 1000000))
      return 0
    fi
    sleep 0.05
  done
  echo "never balanced over $*; see $DIR" >&2
  exit 1
}

stop_nodes() {
  for id in "$@"; do kill "${NODE_PID[$id]}" 2>/dev/null || true; done
  for id in "$@"; do wait "${NODE_PID[$id]}" 2>/dev/null || true; done
}

run() {
  echo
  echo "\$ hongbao $*"
  "$HONGBAO" "$@"
}

# fleet N: deposits through N nodes, IN_FLIGHT connections split over them, one load
# generator per node; prints each generator's rows and the sum.
fleet() {
  local n="$1" ids=() share
  for i in $(seq "$n"); do ids+=("n$i"); start_node "n$i"; done
  echo "balanced over ${ids[*]} in $(wait_balanced "${ids[@]}") ms"
  share=$((IN_FLIGHT / n))
  local outs=()
  for id in "${ids[@]}"; do
    "$HONGBAO" loadgen deposits --target "http://127.0.0.1:${NODE_PORT[$id]}" \
      --admin-key "$ADMIN_KEY" --in-flight "$share" --duration-s "$DURATION" \
      --no-baseline >"$DIR/lg-$n-$id.out" 2>&1 &
    outs+=("$!")
  done
  for pid in "${outs[@]}"; do wait "$pid"; done
  for id in "${ids[@]}"; do
    echo "-- through $id:"
    grep -E '^(scenario|deposits)' "$DIR/lg-$n-$id.out" || cat "$DIR/lg-$n-$id.out"
  done
  python3 - "$n" "$DIR"/lg-"$n"-*.out <<'EOF'
import sys
n, files = sys.argv[1], sys.argv[2:]
rate, p99, ok, errors = 0.0, 0.0, 0, 0
for f in files:
    for line in open(f):
        cols = line.split()
        if cols and cols[0] == "deposits":
            ok, errors = ok + int(cols[3]), errors + int(cols[4])
            rate += float(cols[5]); p99 = max(p99, float(cols[7]))
print(f"fleet of {n}: {rate:.0f} deposits/s in all ({rate/int(n):.0f} per node), worst p99 {p99:.2f} ms, {ok} ok, {errors} errors")
EOF
  # The hot packet through the first node; the others' metrics count the transfers their
  # partitions make.
  local others=()
  for id in "${ids[@]:1}"; do others+=("http://127.0.0.1:${NODE_PORT[$id]}"); done
  local fleet_arg=()
  if [ "${#others[@]}" -gt 0 ]; then fleet_arg=(--fleet "$(IFS=,; echo "${others[*]}")"); fi
  echo "-- rewards of one activity through n1 (fleet of $n; crediting paused, then drained):"
  HONGBAO_ISSUER_KEY="bench-issuer-0123456789abcdef" "$HONGBAO" loadgen rewards \
    --target "http://127.0.0.1:${NODE_PORT[n1]}" --admin-key "$ADMIN_KEY" "${fleet_arg[@]}" \
    --in-flight "$IN_FLIGHT" --duration-s "$DURATION" --pause-lanes --no-baseline
  echo "-- withdrawals through n1 (fleet of $n; paid by the simulated bank, its book the fleet's):"
  HONGBAO_ISSUER_KEY="bench-issuer-0123456789abcdef" \
    HONGBAO_GATEWAY_KEY="bench-gateway-0123456789abcdef" "$HONGBAO" loadgen withdrawals \
    --target "http://127.0.0.1:${NODE_PORT[n1]}" --admin-key "$ADMIN_KEY" "${fleet_arg[@]}" \
    --in-flight "$IN_FLIGHT" --duration-s "$DURATION" --no-baseline
  echo "-- coupons of one hot batch through n1 (fleet of $n; the layers of the intakes' partitions deduct from the batch's holder):"
  HONGBAO_ISSUER_KEY="bench-issuer-0123456789abcdef" "$HONGBAO" loadgen coupons \
    --target "http://127.0.0.1:${NODE_PORT[n1]}" --admin-key "$ADMIN_KEY" "${fleet_arg[@]}" \
    --modes http --merge-max 512 --in-flight "$IN_FLIGHT" --duration-s "$DURATION" --no-baseline
  echo "-- hot packet through n1 (fleet of $n):"
  HONGBAO_GATEWAY_KEY="bench-gateway-0123456789abcdef" "$HONGBAO" loadgen packets \
    --target "http://127.0.0.1:${NODE_PORT[n1]}" --admin-key "$ADMIN_KEY" "${fleet_arg[@]}" \
    --backends hongbao --shares "$SHARES" --clients "$CLIENTS" --pool "$POOL" \
    --rounds "$ROUNDS" --no-baseline
  # The fleet of three stays for the hand-over measurement.
  [ "$n" = 3 ] || stop_nodes "${ids[@]}"
}

{
  echo "== $(date -u +%FT%TZ) $(uname -srm), $(nproc) cores; $("$NATS" --version)"
  echo "== $(git rev-parse --short HEAD) $(git status --porcelain | grep -q . && echo '(dirty)')"
  echo "== JetStream: $JS (one server, sync_interval: always); $PARTITIONS partitions, lease TTL $LEASE_TTL_MS ms"
  if [ "$SKIP_LOAD" = 1 ]; then
    for id in n1 n2 n3; do start_node "$id"; done
    echo "balanced over n1 n2 n3 in $(wait_balanced n1 n2 n3) ms"
  else
    run loadgen hello --in-flight 1,16,256 --duration-s "$DURATION"
    run loadgen deposits --in-flight "$IN_FLIGHT" --duration-s "$DURATION" --no-baseline
    run loadgen deposits --store "$JS" --replicas 1 --single-replica-synced \
      --in-flight "$IN_FLIGHT" --duration-s "$DURATION" --no-baseline
    run loadgen rewards --store "$JS" --replicas 1 --single-replica-synced \
      --in-flight "$IN_FLIGHT" --duration-s "$DURATION" --pause-lanes --no-baseline
    run loadgen withdrawals --store "$JS" --replicas 1 --single-replica-synced \
      --in-flight "$IN_FLIGHT" --duration-s "$DURATION" --no-baseline
    run loadgen coupons --store "$JS" --replicas 1 --single-replica-synced --modes http \
      --merge-max 512 --in-flight "$IN_FLIGHT" --duration-s "$DURATION" --no-baseline
    run loadgen packets --store "$JS" --replicas 1 --single-replica-synced --backends hongbao \
      --shares "$SHARES" --clients "$CLIENTS" --pool "$POOL" --rounds "$ROUNDS" --no-baseline
    for n in 1 2 3; do
      echo
      echo "==== $n node(s)"
      fleet "$n"
    done
  fi
  echo
  echo "==== hand-over after kill -9 ($KILLS kills, fleet of 3)"
  for k in $(seq "$KILLS"); do
    victim="n$(((k - 1) % 3 + 1))"
    survivors=()
    for id in n1 n2 n3; do [ "$id" != "$victim" ] && survivors+=("$id"); done
    kill -9 "${NODE_PID[$victim]}"
    wait "${NODE_PID[$victim]}" 2>/dev/null || true
    echo "kill $k: $victim killed; every partition served again after $(wait_balanced "${survivors[@]}") ms"
    start_node "$victim"
    wait_balanced n1 n2 n3 >/dev/null
  done
# In this shell, not a pipeline's subshell: the nodes started above are in PIDS, so the
# cleanup stops them (they were left running when the block was piped into tee).
} > >(tee "$LOG") 2>&1
echo "figures in $LOG"
if [ "$KEEP" = 1 ]; then
  echo "left running (data in $DIR): JetStream $JS; nodes:"
  for id in n1 n2 n3; do echo "  $id http://127.0.0.1:${NODE_PORT[$id]}"; done
  echo "  admin key: $ADMIN_KEY"
fi
