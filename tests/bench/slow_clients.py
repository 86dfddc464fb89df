#!/usr/bin/env python3
"""Slow clients: thousands of connections that send half a request head and then nothing.

Starts the stack as the benchmark does (bench.py's Stack), opens SLOW_CLIENTS (10,000) such
connections to the gateway, and while they are held places orders and reads a price as a normal
client would. Reports how long the gateway let each slow connection live (it must close every one
within its header read timeout), the normal requests' status and latency, and the gateway's peak
number of open file descriptors against its limit.

    python3 tests/bench/slow_clients.py [--target-dir DIR]     # after tests/bench/run.sh built

Standard library only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench  # noqa: E402

HALF_HEAD = b"GET /api/prices/BK-12 HTTP/1.1\r\nHost: gateway\r\n"


async def slow_client(port: int, opened: list[float], lifetimes: list[float], failed: list[str]) -> None:
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError as error:
        failed.append(type(error).__name__)
        return
    start = time.monotonic()
    opened.append(start)
    writer.write(HALF_HEAD)
    await writer.drain()
    try:
        await reader.read()  # returns b"" when the server closes
    except OSError:
        pass
    lifetimes.append(time.monotonic() - start)
    writer.close()


def open_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def fd_limit(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    return -1


async def scenario(stack: bench.Stack, count: int, timeout_s: float) -> dict:
    gateway = stack["gateway"]
    opened: list[float] = []
    lifetimes: list[float] = []
    failed: list[str] = []
    tasks = []
    # Opened in batches of 500, as fast as the kernel's accept backlog takes them.
    for i in range(0, count, 500):
        tasks += [asyncio.create_task(slow_client(gateway.port, opened, lifetimes, failed))
                  for _ in range(min(500, count - i))]
        await asyncio.sleep(0.05)
    while len(opened) + len(failed) < count:
        await asyncio.sleep(0.05)
    held = count - len(failed) - len(lifetimes)
    peak_fds = open_fds(gateway.proc.pid)
    normal = []
    for path, body in [("/api/orders", json.loads(bench.ORDER_BODY)), ("/api/prices/BK-12", None)]:
        started = time.monotonic()
        status, _ = await asyncio.to_thread(
            bench.http, "POST" if body else "GET", gateway.url(path), body, 10)
        normal.append((path, status, (time.monotonic() - started) * 1000))
    deadline = time.monotonic() + timeout_s * 2 + 10
    while len(lifetimes) + len(failed) < count and time.monotonic() < deadline:
        peak_fds = max(peak_fds, open_fds(gateway.proc.pid))
        await asyncio.sleep(0.2)
    for task in tasks:
        task.cancel()
    lifetimes.sort()
    return {
        "count": count, "failed_to_connect": len(failed), "held_at_once": held,
        "closed": len(lifetimes), "min_s": lifetimes[0] if lifetimes else None,
        "max_s": lifetimes[-1] if lifetimes else None, "normal": normal,
        "peak_fds": peak_fds, "fd_limit": fd_limit(gateway.proc.pid),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--target-dir", default=os.environ.get("CARGO_TARGET_DIR", str(bench.ROOT / "target")))
    args = parser.parse_args()
    count = int(os.environ.get("SLOW_CLIENTS", 10_000))
    header_timeout_s = float(os.environ.get("HTTP_HEADER_READ_TIMEOUT_MS", 10_000)) / 1000
    # This process needs a descriptor per slow connection too.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, count + 1024)), hard))

    amqp_url = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")
    namespace = f"slow-{uuid.uuid4().hex[:12]}"
    workdir = Path(tempfile.mkdtemp(prefix="slow-"))
    stack = bench.Stack(Path(args.target_dir) / "release", workdir, amqp_url, namespace)
    try:
        stack.start()
        bench.http("PUT", stack["inventory"].url(f"/stock/{bench.SKU}"), {"onHand": bench.RESTOCK})
        result = asyncio.run(scenario(stack, count, header_timeout_s))
        stack.check_alive()
    finally:
        stack.stop()
        try:
            bench.delete_topology(amqp_url, namespace)
        except OSError as error:
            bench.log(f"cannot delete the broker topology of {namespace}: {error}")
        shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(result, indent=2))
    ok = (result["closed"] == count - result["failed_to_connect"]
          and result["max_s"] is not None and result["max_s"] <= header_timeout_s + 2
          and all(status in (200, 201) for _, status, _ in result["normal"])
          and 0 < result["peak_fds"] < result["fd_limit"])
    print("slow clients:", "every connection closed within the header timeout" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
