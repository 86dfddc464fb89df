#!/usr/bin/env bash
# Instructions per forwarded request at the gateway, counted by callgrind (see README.md,
# "Profiling"): pricing runs natively, the gateway under `valgrind --tool=callgrind`, wrk puts a
# modest steady load on `GET /api/prices/BK-12` through the gateway, and the gateway is stopped
# with SIGTERM so callgrind writes its profile.
#
#   bash tests/bench/callgrind.sh [BIN_DIR]   # BIN_DIR holds gateway and pricing-service
#                                             # (default target/release)
#
# Environment: DURATION (seconds of load, default 20), CONNECTIONS (wrk, 8), AMQP_URL.
# Prints the request count, the gateway's total instructions per request and the inclusive
# instructions per request of `ResilientClient::send`; the profile stays in the printed directory.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."
bin=$(realpath "${1:-target/release}")
duration=${DURATION:-20}
connections=${CONNECTIONS:-8}
amqp=${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}
for tool in valgrind wrk; do
  command -v "$tool" >/dev/null || apt-get install -y "$tool" >/dev/null
done

work=$(mktemp -d /tmp/callgrind.XXXXXX)
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
pricing_port=$(free_port)
gateway_port=$(free_port)
namespace="callgrind-$RANDOM$RANDOM"
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; }
trap cleanup EXIT

HOST=127.0.0.1 PORT=$pricing_port AMQP_URL=$amqp EVENTS_NAMESPACE=$namespace \
  DATABASE_URL="sqlite://$work/pricing.db" LOG_FORMAT=json RUST_LOG=info \
  "$bin/pricing-service" >"$work/pricing.log" 2>&1 &
pids+=($!)
HOST=127.0.0.1 PORT=$gateway_port PRICING_URL="http://127.0.0.1:$pricing_port" \
  ORDER_URL="http://127.0.0.1:9" INVENTORY_URL="http://127.0.0.1:9" LOG_FORMAT=json RUST_LOG=info \
  valgrind --tool=callgrind --callgrind-out-file="$work/callgrind.out" \
  "$bin/gateway" >"$work/gateway.log" 2>"$work/valgrind.log" &
gateway=$!
pids+=($gateway)

wait_ready() {
  for _ in $(seq 1 600); do
    curl -fsS -o /dev/null "$1" 2>/dev/null && return 0
    sleep 0.1
  done
  echo "callgrind: $1 never answered" >&2
  exit 1
}
wait_ready "http://127.0.0.1:$pricing_port/readyz"
wait_ready "http://127.0.0.1:$gateway_port/healthz"
curl -fsS -o /dev/null "http://127.0.0.1:$gateway_port/api/prices/BK-12"

wrk -t2 -c"$connections" -d"${duration}s" "http://127.0.0.1:$gateway_port/api/prices/BK-12" \
  >"$work/wrk.txt"
kill -TERM "$gateway"
wait "$gateway" || true

requests=$(awk '/requests in/ {print $1}' "$work/wrk.txt")
non2xx=$(awk '/Non-2xx/ {print $NF}' "$work/wrk.txt")
callgrind_annotate --inclusive=yes "$work/callgrind.out" >"$work/annotate.txt" 2>/dev/null
total=$(awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1; exit}' "$work/annotate.txt")
send=$(grep -m1 'ResilientClient::send' "$work/annotate.txt" | awk '{gsub(",", "", $1); print $1}')
echo "profile: $work"
echo "requests: $requests (non-2xx: ${non2xx:-0})"
python3 - "$requests" "$total" "${send:-0}" <<'EOF'
import sys
requests, total, send = (int(x) for x in sys.argv[1:])
print(f"gateway instructions per request: {total / requests:,.0f}")
print(f"ResilientClient::send inclusive per request: {send / requests:,.0f}")
EOF
