#!/usr/bin/env python3
"""Instructions per request of one service, counted by valgrind's callgrind: a cost figure that a
busy shared machine does not blur (wall-clock rates on it move by ±15 %).

    python3 tests/bench/instructions.py --target-dir target --service gateway
    python3 tests/bench/instructions.py --target-dir /tmp/main-target --service pricing

`gateway` measures the pass-through (d), `GET /api/prices/BK-12`, with pricing running normally;
`pricing` measures `GET /prices/BK-12` (c). The service runs under callgrind twice, serving
`--base` and then `--base + --requests` sequential keep-alive requests; the difference of the two
totals divided by `--requests` is the cost of one request, start-up and shutdown cancelling out.
No OTLP endpoint is set (the cost of the code when nothing is exported). Needs valgrind
(`apt-get install -y valgrind`) and the broker at AMQP_URL.
"""

from __future__ import annotations

import argparse
import http.client
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402

# Under callgrind a service is ~50x slower; start-up still takes seconds, not minutes.
READY_TIMEOUT_S = 120


def total_instructions(bin_dir: Path, service: str, requests: int, amqp_url: str) -> int:
    work = Path(tempfile.mkdtemp(prefix="instructions-"))
    namespace = f"bench-cg-{uuid.uuid4().hex[:8]}"
    ports = {"pricing": bench.free_port(), "gateway": bench.free_port()}
    profile = work / "callgrind.out"
    procs = []
    try:
        for name, binary in [("pricing", "pricing-service"), ("gateway", "gateway")]:
            if service == "pricing" and name == "gateway":
                continue
            env = dict(os.environ, HOST="127.0.0.1", PORT=str(ports[name]), AMQP_URL=amqp_url,
                       EVENTS_NAMESPACE=namespace, DATABASE_URL=f"sqlite://{work / name}.db",
                       LOG_FORMAT="json", RUST_LOG="info", PRICING_URL=f"http://127.0.0.1:{ports['pricing']}",
                       ORDER_URL="http://127.0.0.1:9", INVENTORY_URL="http://127.0.0.1:9")
            env.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)
            command = [str(bin_dir / binary)]
            if name == service:
                command = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={profile}", *command]
            with open(work / f"{name}.log", "wb") as out:
                procs.append(subprocess.Popen(command, env=env, stdout=out, stderr=out, cwd=work))
        path = "/api/prices/BK-12" if service == "gateway" else "/prices/BK-12"
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", ports[service], timeout=10)
                conn.request("GET", path)
                response = conn.getresponse()
                response.read()
                if response.status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"{service} not ready within {READY_TIMEOUT_S} s")
            time.sleep(0.5)
        for _ in range(requests):
            conn.request("GET", path)
            response = conn.getresponse()
            response.read()
            if response.status != 200:
                raise SystemExit(f"{service} answered {response.status}")
        for proc in reversed(procs):
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            proc.wait(timeout=60)
        totals = [line for line in profile.read_text().splitlines() if line.startswith("totals:")]
        return int(totals[-1].split()[1])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        try:
            bench.delete_topology(amqp_url, namespace)
        except OSError:
            pass
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target-dir", default="target")
    parser.add_argument("--service", choices=["gateway", "pricing"], default="gateway")
    parser.add_argument("--base", type=int, default=200)
    parser.add_argument("--requests", type=int, default=2000)
    args = parser.parse_args()
    bin_dir = Path(args.target_dir).resolve() / "release"
    amqp_url = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")
    low = total_instructions(bin_dir, args.service, args.base, amqp_url)
    high = total_instructions(bin_dir, args.service, args.base + args.requests, amqp_url)
    print(f"{args.service} ({bin_dir}): {(high - low) / args.requests:,.0f} instructions/request")
    return 0


if __name__ == "__main__":
    sys.exit(main())
