#!/usr/bin/env bash
# Runs the whole system without Docker: the four services as local processes against a RabbitMQ.
#
#   scripts/run-local.sh            # release build (what CI builds, so usually already compiled)
#   scripts/run-local.sh --debug    # debug build: compiles faster, runs slower
#
# Why a script and not a process manager (foreman, overmind, cargo-make, tmux): it needs nothing but
# bash and cargo, which every machine that builds the project has, and the few things it does are
# visible in one file:
#   * builds the four binaries in one cargo invocation;
#   * runs them against AMQP_URL (default amqp://guest:guest@127.0.0.1:5672/%2f) with loopback
#     URLs (ORDER_URL=http://127.0.0.1:4001, ...) instead of compose's DNS names, and each service's
#     SQLite database under .local/data/;
#   * interleaves their logs on the terminal, each line prefixed `[gateway]`, `[order]`, ..., and
#     writes each service's raw log to .local/logs/<service>.log, so
#         grep <correlation-id> .local/logs/*.log
#     follows one request across every service (HTTP and AMQP hops alike);
#   * waits until every /healthz answers, then prints a curl to try;
#   * on Ctrl-C or SIGTERM, or when any service exits by itself, sends SIGTERM to every service,
#     waits for their graceful drain and kills whatever is left. Each service runs in its own
#     process group (job control, `set -m`), so Ctrl-C reaches only this script, which then stops
#     the services in order, and nothing it started can be orphaned.
#     Started in the background (`scripts/run-local.sh &`, nohup), stop it with SIGTERM
#     (`kill <pid>`): bash may discard a SIGINT sent to a non-interactive script that is waiting
#     for its jobs, or exit without running the trap, which would leave the services running.
#
# Any variable the services read (LOG_FORMAT, RUST_LOG, EVENTS_NAMESPACE, HTTP_*, ...) can be set
# when calling the script; LOG_FORMAT defaults to json, the format the logs are grepped in.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$(pwd)

profile=release
case "${1:-}" in
  "") ;;
  --debug) profile=debug ;;
  -h | --help) sed -n '2,/^set -euo/{/^set/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
  *) echo "usage: $0 [--debug]" >&2; exit 2 ;;
esac

# service name, package (= binary), port. Names as in docker-compose.yml.
services=(pricing:pricing-service:4003 inventory:inventory-service:4002 order:order-service:4001 gateway:gateway:8080)

export AMQP_URL=${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}
export ORDER_URL=${ORDER_URL:-http://127.0.0.1:4001}
export INVENTORY_URL=${INVENTORY_URL:-http://127.0.0.1:4002}
export PRICING_URL=${PRICING_URL:-http://127.0.0.1:4003}
export LOG_FORMAT=${LOG_FORMAT:-json}
export HOST=${HOST:-127.0.0.1} # not 0.0.0.0: a development run need not be reachable from outside

data_dir=$root/.local/data
log_dir=$root/.local/logs
mkdir -p "$data_dir" "$log_dir"

for entry in "${services[@]}"; do
  IFS=: read -r _ _ port <<<"$entry"
  if curl -fsS -o /dev/null --max-time 1 "http://127.0.0.1:$port/healthz" 2>/dev/null; then
    echo "run-local: something already answers on port $port; stop it first" >&2
    exit 1
  fi
done

cargo_flags=()
[ "$profile" = release ] && cargo_flags+=(--release)
echo "run-local: building ($profile)..."
# In the background with a trap, so Ctrl-C or a SIGTERM to this script also ends the build (a
# signal to a script waiting on a foreground command is only handled after that command ends).
cargo build "${cargo_flags[@]}" -p gateway -p order-service -p inventory-service -p pricing-service &
build=$!
trap 'kill -TERM "$build" 2>/dev/null; exit 130' INT
trap 'kill -TERM "$build" 2>/dev/null; exit 143' TERM
wait "$build"
trap - INT TERM
target_dir=${CARGO_TARGET_DIR:-$root/target}

# Job control from here on: every background job gets its own process group.
set -m
declare -A leader # service name -> pid of the service process, which leads its process group

stop_all() {
  trap - INT TERM
  echo "run-local: stopping..."
  local name pid
  # Dependents first, so nothing logs errors about a dependency that went away before it.
  for name in gateway order inventory pricing; do
    pid=${leader[$name]:-}
    [ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null || true
  done
  # The services drain in-flight requests and then exit; 10 s is what `docker compose stop` allows.
  local deadline=$((SECONDS + 10))
  while [ -n "$(jobs -rp)" ] && [ $SECONDS -lt $deadline ]; do sleep 0.2; done
  for name in "${!leader[@]}"; do
    # The whole group: the service and its log pipeline (tee, sed).
    kill -KILL -- "-${leader[$name]}" 2>/dev/null || true
  done
  wait 2>/dev/null || true
  echo "run-local: stopped; logs are in .local/logs/"
}
trap 'stop_all; exit 130' INT
trap 'stop_all; exit 143' TERM

for entry in "${services[@]}"; do
  IFS=: read -r name package port <<<"$entry"
  : >"$log_dir/$name.log"
  # One job = one process group whose leader is the service itself (first in the pipeline): the
  # terminal shows prefixed lines, the log file keeps the raw ones (JSON stays parseable).
  PORT=$port DATABASE_URL="sqlite://$data_dir/$name.db" "$target_dir/$profile/$package" 2>&1 \
    | tee -a "$log_dir/$name.log" | sed -u "s/^/[$name] /" &
  leader[$name]=$(jobs -p %%)
done

echo "run-local: waiting for /healthz..."
# Startup is migrations, seeding and binding a port: well under a second; 30 s is for a cold, busy
# machine. A service that exits meanwhile ends the wait at once.
deadline=$((SECONDS + 30))
for entry in "${services[@]}"; do
  IFS=: read -r name _ port <<<"$entry"
  until curl -fsS -o /dev/null --max-time 1 "http://127.0.0.1:$port/healthz" 2>/dev/null; do
    if ! kill -0 "${leader[$name]}" 2>/dev/null; then
      echo "run-local: $name exited during startup (see .local/logs/$name.log)" >&2
      stop_all
      exit 1
    fi
    if [ $SECONDS -ge $deadline ]; then
      echo "run-local: $name did not answer /healthz within 30 s" >&2
      stop_all
      exit 1
    fi
    sleep 0.2
  done
done

cat <<EOF

run-local: all four services are up (gateway on http://127.0.0.1:8080). Try:

  curl -si -X POST http://127.0.0.1:8080/api/orders \\
       -H 'content-type: application/json' -H 'x-correlation-id: try-1' \\
       -d '{"items":[{"sku":"BK-12","qty":2}]}'
  curl -s http://127.0.0.1:8080/api/products/BK-12
  grep try-1 .local/logs/*.log

Ctrl-C stops everything.

EOF

# Block until a signal arrives or any service exits by itself; either way stop them all.
set +e
wait -n
status=$?
set -e
echo "run-local: a service exited (status $status); stopping the others" >&2
stop_all
exit 1
