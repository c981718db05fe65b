#!/usr/bin/env bash
# A screenshot of the status page (GET /status) during some traffic, into docs/status.png.
# Builds nothing: give it a built binary.
#
#   scripts/status-screenshot.sh                        # target/release/hongbao
#   scripts/status-screenshot.sh target/debug/hongbao
#   OUT=/tmp/status.png CHROMIUM=/usr/bin/chromium scripts/status-screenshot.sh
#
# Starts a server on a free port with a temporary data directory, sets a budget, sends rewards
# (some credited at once), a deposit, a withdrawal, a red packet with claims and coupons,
# turns the c2c_send switch off, then lets headless Chromium load /status while more traffic
# flows, and stops the server.
set -euo pipefail
cd "$(dirname "$0")/.."

HONGBAO="${1:-target/release/hongbao}"
OUT="${OUT:-docs/status.png}"
CHROMIUM="${CHROMIUM:-chromium}"

if [ ! -x "$HONGBAO" ]; then
  echo "no hongbao binary at $HONGBAO: build one (cargo build --release) or give its path" >&2
  exit 2
fi
command -v "$CHROMIUM" >/dev/null || {
  echo "$CHROMIUM not found: apt-get install -y --no-install-recommends chromium" >&2
  exit 2
}

DIR="$(mktemp -d -t hongbao-status-XXXXXX)"
SERVER=""
LOAD=""
cleanup() {
  [ -z "$LOAD" ] || { kill "$LOAD" 2>/dev/null || true; wait "$LOAD" 2>/dev/null || true; }
  [ -z "$SERVER" ] || { kill "$SERVER" 2>/dev/null || true; wait "$SERVER" 2>/dev/null || true; }
  rm -rf "$DIR"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

export HONGBAO_ADMIN_KEY="status-admin-$RANDOM$RANDOM"
export HONGBAO_ISSUER_KEY="status-issuer-$RANDOM$RANDOM"
export HONGBAO_GATEWAY_KEY="status-gateway-$RANDOM$RANDOM"
export HONGBAO_TOKEN_SECRET="status-secret-$RANDOM$RANDOM$RANDOM"
PORT="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
BASE="http://127.0.0.1:$PORT"

"$HONGBAO" serve --data-dir "$DIR/data" --addr "127.0.0.1:$PORT" >"$DIR/server.log" 2>&1 &
SERVER=$!
for _ in $(seq 300); do
  curl -sf "$BASE/readyz" >/dev/null 2>&1 && break
  kill -0 "$SERVER" 2>/dev/null || { cat "$DIR/server.log" >&2; exit 1; }
  sleep 0.1
done
curl -sf "$BASE/readyz" >/dev/null || { echo "the server never got ready" >&2; exit 1; }

# call METHOD PATH KEY [BODY]: the answer's body (the status is not checked: some are refusals).
call() {
  curl -s -X "$1" "$BASE$2" -H "Authorization: Bearer $3" ${4:+-d "$4"}
}
field() { sed -n "s/.*\"$1\":\"\([^\"]*\)\".*/\1/p"; }

call PUT /v1/admin/activities/cny2026/budget "$HONGBAO_ADMIN_KEY" '{"cash":1000000,"subsidy":50000}' >/dev/null
call PUT /v1/admin/activities/lantern/budget "$HONGBAO_ADMIN_KEY" '{"cash":200000,"subsidy":0}' >/dev/null
for i in $(seq 1 60); do
  call POST "/v1/activities/cny2026/rain/1/rewards" "$HONGBAO_ISSUER_KEY" "{\"uid\":\"u$i\",\"amount\":$((88 + i * 7))}" >/dev/null
done
for i in $(seq 1 20); do
  call POST "/v1/activities/lantern/fireworks/rewards" "$HONGBAO_ISSUER_KEY" "{\"uid\":\"u$i\",\"amount\":66}" >/dev/null || true
done
# u42: a reward credited at once, a deposit, a payout method and a withdrawal.
TOKEN="$(call POST /v1/activities/cny2026/rain/2/rewards "$HONGBAO_ISSUER_KEY" '{"uid":"u42","amount":1888}' | field token)"
call POST /v1/wallets/u42/force-credit "$HONGBAO_GATEWAY_KEY" "{\"tokens\":[\"$TOKEN\"]}" >/dev/null
call POST /v1/wallets/u42/change/deposits "$HONGBAO_ADMIN_KEY" '{"order_id":"topup-1","amount":5000}' >/dev/null
METHOD="$(call POST /v1/wallets/u42/payout-methods "$HONGBAO_GATEWAY_KEY" '{"kind":"alipay","account":"u42@example.com"}' | field method_id)"
call POST /v1/wallets/u42/withdrawals "$HONGBAO_GATEWAY_KEY" "{\"order_id\":\"wd-1\",\"amount\":1000,\"method_id\":\"$METHOD\"}" >/dev/null
# A red packet paid from u42's change, claimed by a few.
call POST /v1/packets "$HONGBAO_GATEWAY_KEY" '{"packet_id":"pk-1","sender_uid":"u42","mode":"c2c","total":1000,"count":10,"split":"lucky"}' >/dev/null
call POST /v1/packets/pk-1/pay "$HONGBAO_GATEWAY_KEY" '{"payment_id":"pay-1"}' >/dev/null
for i in $(seq 1 6); do
  call POST /v1/packets/pk-1/claims "$HONGBAO_GATEWAY_KEY" "{\"uid\":\"c$i\"}" >/dev/null
done
# Coupons, and a switch turned off for the night.
call POST /v1/coupon-batches "$HONGBAO_ADMIN_KEY" '{"batch_id":"spring","stock":1000,"per_user_limit":2,"value":500}' >/dev/null
for i in $(seq 1 10); do
  call POST /v1/coupons/issue "$HONGBAO_ISSUER_KEY" "{\"seq_no\":\"s-$i\",\"uid\":\"u$i\",\"batch_id\":\"spring\"}" >/dev/null
done
call PUT /v1/admin/switches/c2c_send "$HONGBAO_ADMIN_KEY" '{"on":false}' >/dev/null

# More rewards while the page loads, so that its rates have something to show.
(
  for i in $(seq 100 2000); do
    call POST "/v1/activities/cny2026/rain/3/rewards" "$HONGBAO_ISSUER_KEY" "{\"uid\":\"u$i\",\"amount\":18}" >/dev/null || true
    call POST "/v1/wallets/d$((i % 50))/change/deposits" "$HONGBAO_ADMIN_KEY" "{\"order_id\":\"bg-$i\",\"amount\":100}" >/dev/null || true
  done
) &
LOAD=$!
sleep 2

mkdir -p "$(dirname "$OUT")"
"$CHROMIUM" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
  --disable-background-networking --disable-component-update --disable-sync \
  --disable-dev-shm-usage --hide-scrollbars --user-data-dir="$DIR/profile" \
  --window-size=1280,1000 --virtual-time-budget=5000 \
  --screenshot="$OUT" "$BASE/status" 2>"$DIR/chromium.log" || {
  cat "$DIR/chromium.log" >&2
  exit 1
}
[ -s "$OUT" ] || { echo "no screenshot written" >&2; cat "$DIR/chromium.log" >&2; exit 1; }
echo "wrote $OUT"
