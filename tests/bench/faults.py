#!/usr/bin/env python3
"""The fault scenarios of the resilient client: sequential orders through the local stack while a
proxy between order-service and inventory makes a share of inventory's answers hang or fail.

    python3 tests/bench/faults.py hang          # 10 % of answers held 5 s
    python3 tests/bench/faults.py 503           # 30 % of answers replaced by 503
    python3 tests/bench/faults.py 503 --runs 5  # five runs, a fresh stack each
    ORDERS=20 python3 tests/bench/faults.py hang --check   # CI: exit 3 unless every order is
                                                         # placed and stock matches them

Environment: ORDERS (per run, default 200), AMQP_URL. Uses the release binaries in target/release
(tests/bench/run.sh builds them) or --target-dir. Prints, per run: orders placed, statuses,
p50/p99/max latency, the requests the proxy saw (hedges and retries included) per order, and the
stock check: the units taken from stock equal the orders placed (nothing reserved twice).

The proxy forwards every request to inventory. A hang holds inventory's real answer back for
5 s; an injected 503 alternates, as the end-to-end tests' proxy does, between one answered
without forwarding (nothing happened upstream) and one forwarded whose answer is replaced (the
upstream did the work, the client never learns of it). Which requests are hit is drawn from a
generator seeded per run, so a run can be repeated.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (the benchmark's stack: binaries, ports, environment, stop)

HANG_S = 5.0
SKU = bench.SKU


class FaultProxy:
    """An HTTP/1.1 proxy on a loopback port in front of `upstream_port`, in a thread of its own."""

    def __init__(self, upstream_port: int, hang: float, fail: float, seed: int) -> None:
        self.upstream_port = upstream_port
        self.hang, self.fail = hang, fail
        self.rng = random.Random(seed)
        self.port = bench.free_port()
        self.seen = 0
        self.hung = 0
        self.failed = 0
        self.loop = asyncio.new_event_loop()
        started = threading.Event()
        threading.Thread(target=self._run, args=(started,), daemon=True).start()
        started.wait()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _run(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(
            asyncio.start_server(self._connection, "127.0.0.1", self.port)
        )
        started.set()
        self.loop.run_forever()

    def close(self) -> None:
        """Stops listening, ends every connection and the proxy's thread."""

        async def shutdown() -> None:
            self.server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        try:
            while True:
                request = await read_message(reader)
                if request is None:
                    return
                self.seen += 1
                roll = self.rng.random()
                if roll < self.fail and self.failed % 2 == 0:
                    self.failed += 1
                    writer.write(SERVICE_UNAVAILABLE)
                    await writer.drain()
                    continue
                if upstream is None:
                    upstream = await asyncio.open_connection("127.0.0.1", self.upstream_port)
                upstream[1].write(request)
                await upstream[1].drain()
                response = await read_message(upstream[0])
                if response is None:
                    return
                if roll < self.fail:
                    self.failed += 1
                    response = SERVICE_UNAVAILABLE
                elif roll < self.fail + self.hang:
                    self.hung += 1
                    await asyncio.sleep(HANG_S)
                writer.write(response)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            # A client that went away, or the proxy closing: nothing left to answer.
            return
        finally:
            writer.close()
            if upstream is not None:
                upstream[1].close()


SERVICE_UNAVAILABLE = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/problem+json\r\n"
    b"content-length: 2\r\n\r\n{}"
)


async def read_message(reader: asyncio.StreamReader) -> bytes | None:
    """One HTTP/1.1 message with a `content-length` body (all the services send), or None at EOF."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    body = await reader.readexactly(length) if length else b""
    return head + body


class FaultyStack(bench.Stack):
    """The benchmark's stack with order-service's `INVENTORY_URL` pointing at a proxy."""

    inventory_url: str = ""

    def env(self, service: bench.Service) -> dict[str, str]:
        env = super().env(service)
        if service.name == "order":
            env["INVENTORY_URL"] = self.inventory_url
        return env


def percentile(sorted_values: list[float], p: float) -> float:
    index = min(len(sorted_values) - 1, max(0, round(p / 100 * len(sorted_values) + 0.5) - 1))
    return sorted_values[index]


def one_run(target: Path, kind: str, orders: int, seed: int, amqp_url: str) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="faults-"))
    namespace = f"faults-{uuid.uuid4().hex[:12]}"
    stack = FaultyStack(target, workdir, amqp_url, namespace)
    hang, fail = (0.10, 0.0) if kind == "hang" else (0.0, 0.30)
    proxy = FaultProxy(stack["inventory"].port, hang, fail, seed)
    stack.inventory_url = proxy.url
    try:
        stack.start()
        status, body = bench.http("PUT", stack["inventory"].url(f"/stock/{SKU}"), {"onHand": bench.RESTOCK})
        if status != 200:
            raise SystemExit(f"faults: restock answered {status}: {body[:300]!r}")
        proxy.seen = proxy.hung = proxy.failed = 0
        statuses: dict[int, int] = {}
        latencies = []
        for _ in range(orders):
            started = time.monotonic()
            status, _ = bench.http("POST", stack["gateway"].url("/api/orders"), json.loads(bench.ORDER_BODY), timeout=10)
            latencies.append((time.monotonic() - started) * 1000)
            statuses[status] = statuses.get(status, 0) + 1
        placed = statuses.get(201, 0)
        # Every placed order holds one unit, reserved or committed; give the events a moment to
        # commit, then compare.
        deadline = time.monotonic() + 30
        while True:
            _, body = bench.http("GET", stack["inventory"].url(f"/stock/{SKU}"))
            stock = json.loads(body)
            taken = bench.RESTOCK - stock["available"]
            if (taken == placed and stock["reserved"] == 0) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        latencies.sort()
        return {
            "placed": placed,
            "statuses": statuses,
            "p50": percentile(latencies, 50),
            "p99": percentile(latencies, 99),
            "max": latencies[-1],
            "upstream": proxy.seen,
            "hung": proxy.hung,
            "failed": proxy.failed,
            "taken": taken,
            "reserved": stock["reserved"],
        }
    finally:
        stack.stop()
        proxy.close()
        try:
            bench.delete_topology(amqp_url, namespace)
        except OSError as error:
            bench.log(f"cannot delete the broker topology of {namespace}: {error}")
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=["hang", "503"])
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--check", action="store_true",
                        help="exit 3 unless every order is placed and stock holds exactly one unit per order")
    parser.add_argument("--target-dir", default=os.environ.get("CARGO_TARGET_DIR", str(bench.ROOT / "target")))
    args = parser.parse_args()
    orders = int(os.environ.get("ORDERS", 200))
    amqp_url = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")
    target = Path(args.target_dir) / "release"
    print(f"{'run':>3} {'placed':>6} {'statuses':<22} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7} "
          f"{'upstream':>8} {'per order':>9} {'injected':>8} {'taken':>5} {'reserved':>8}")
    failed = False
    for run in range(1, args.runs + 1):
        r = one_run(target, args.kind, orders, args.seed + run, amqp_url)
        # No timing is checked: a CI machine is slower and busier than the one the targets are for.
        failed |= r["placed"] != orders or r["taken"] != r["placed"] or r["reserved"] != 0
        statuses = ", ".join(f"{k}×{v}" for k, v in sorted(r["statuses"].items()))
        print(f"{run:>3} {r['placed']:>6} {statuses:<22} {r['p50']:>7.1f} {r['p99']:>7.1f} {r['max']:>7.1f} "
              f"{r['upstream']:>8} {r['upstream'] / orders:>9.3f} {r['hung'] + r['failed']:>8} "
              f"{r['taken']:>5} {r['reserved']:>8}", flush=True)
    if args.check and failed:
        print("faults: an order failed, or stock does not match the orders placed", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
