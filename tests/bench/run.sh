#!/usr/bin/env bash
# The load benchmark of issue 6: release build, the four services against a local RabbitMQ, wrk.
#
#   bash tests/bench/run.sh               # full run: ~3 minutes, targets checked (exit 3 if missed)
#   bash tests/bench/run.sh --smoke       # a few seconds, no targets asserted (CI)
#   bash tests/bench/run.sh --no-build    # use the release binaries already in target/release
#   bash tests/bench/run.sh --keep        # keep the temporary directory with logs and databases
#   bash tests/bench/run.sh --tracing-cost # (d) and (a, 64) with tracing off and with export on
#                                          # at 100 % sampling, interleaved (tracing_cost.py)
#
# Environment: DURATION (seconds per run, default 10), WARMUP (seconds per scenario, 3), ROUNDS
# (2), RELAY_EVENTS (50000), AMQP_URL (amqp://guest:guest@127.0.0.1:5672/%2f). See README.md.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."

build=1
args=()
tracing_cost=0
for arg in "$@"; do
  case "$arg" in
    --no-build) build=0 ;;
    --tracing-cost) tracing_cost=1 ;;
    --smoke | --keep) args+=("$arg") ;;
    -h | --help) sed -n '2,/^set -euo/{/^set/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
    *) echo "usage: $0 [--smoke] [--no-build] [--keep] [--tracing-cost]" >&2; exit 2 ;;
  esac
done

if ! command -v wrk >/dev/null; then
  # wrk is Debian's package; installing needs root, as on the CI and development machines.
  echo "bench: installing wrk" >&2
  apt-get install -y wrk >/dev/null 2>&1 || { apt-get update >/dev/null && apt-get install -y wrk >/dev/null; }
fi

if [ "$build" = 1 ]; then
  echo "bench: building (release)..." >&2
  # The same packages and profile as scripts/run-local.sh, so both reuse one set of artifacts.
  cargo build --release -p gateway -p order-service -p inventory-service -p pricing-service
fi

if [ "$tracing_cost" = 1 ]; then
  target=${CARGO_TARGET_DIR:-target}
  exec python3 tests/bench/tracing_cost.py --variant "off=$target" --variant "export=$target:export"
fi
exec python3 tests/bench/bench.py "${args[@]}"
