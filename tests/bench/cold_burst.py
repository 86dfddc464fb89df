#!/usr/bin/env python3
"""A cold burst at the gateway: `wrk -t2 -c1024 -d8s` of `POST /api/orders` right after the stack
starts, then each client's breaker state, the gateway's calls to order-service by outcome, and
one order placed right after the burst.

    python3 tests/bench/cold_burst.py [--target-dir DIR] [--runs N]

It shows whether the gateway's own burst opens its breaker for a healthy order-service (the
connect timeouts of hundreds of new connections at once counted as order-service failing). Uses
the release binaries in DIR/release (default target/release) and the benchmark's stack.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402


def breakers(stack: bench.Stack, service: str) -> dict[str, str]:
    _, body = bench.http("GET", stack[service].url("/readyz"))
    checks = json.loads(body)["checks"]
    return {k: v["detail"]["breaker"] for k, v in checks.items() if isinstance(v["detail"], dict) and "breaker" in v["detail"]}


def one_run(target: Path, amqp_url: str) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="burst-"))
    namespace = f"burst-{uuid.uuid4().hex[:12]}"
    stack = bench.Stack(target, workdir, amqp_url, namespace)
    try:
        stack.start()
        bench.http("PUT", stack["inventory"].url(f"/stock/{bench.SKU}"), {"onHand": bench.RESTOCK})
        env = dict(os.environ, BENCH_BODY=bench.ORDER_BODY)
        result = subprocess.run(
            ["wrk", "-t2", "-c1024", "-d8s", f"--timeout={bench.WRK_TIMEOUT}", "-s", str(bench.LUA),
             stack["gateway"].url("/api/orders")],
            env=env, capture_output=True, text=True, check=False,
        )
        line = next((l for l in result.stdout.splitlines() if l.startswith("BENCH ")), None)
        if line is None:
            raise SystemExit(f"cold_burst: wrk failed:\n{result.stdout}\n{result.stderr}")
        s = json.loads(line[len("BENCH "):])
        print(f"wrk: {s['requests']} answers, {s['status']} non-2xx, socket errors "
              f"{sum(s[k] for k in ('connect', 'read', 'write', 'timeout'))}, "
              f"p50 {s['p50_us'] / 1000:.0f} ms, p99 {s['p99_us'] / 1000:.0f} ms")
        print(f"breakers: gateway {breakers(stack, 'gateway')}, order {breakers(stack, 'order')}")
        _, metrics = bench.http("GET", stack["gateway"].url("/metrics"))
        outcomes = [l.split("outcome=")[1] for l in metrics.decode().splitlines()
                    if l.startswith("http_client_requests_total") and 'dependency="order"' in l
                    and not l.endswith(" 0")]
        print("gateway → order calls: " + ", ".join(o.replace("\"}", ":").lstrip("\"") for o in outcomes))
        started = time.monotonic()
        status, _ = bench.http("POST", stack["gateway"].url("/api/orders"), json.loads(bench.ORDER_BODY))
        print(f"an order right after: {status} in {(time.monotonic() - started) * 1000:.1f} ms", flush=True)
    finally:
        stack.stop()
        try:
            bench.delete_topology(amqp_url, namespace)
        except OSError as error:
            bench.log(f"cannot delete the broker topology of {namespace}: {error}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target-dir", default=os.environ.get("CARGO_TARGET_DIR", str(bench.ROOT / "target")))
    parser.add_argument("--runs", type=int, default=1)
    args = parser.parse_args()
    amqp_url = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")
    for run in range(1, args.runs + 1):
        print(f"run {run}")
        one_run(Path(args.target_dir) / "release", amqp_url)
    return 0


if __name__ == "__main__":
    sys.exit(main())
