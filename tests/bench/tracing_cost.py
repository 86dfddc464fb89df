#!/usr/bin/env python3
"""What tracing costs: (d) the gateway pass-through and (a, 64) the order path, side by side for
several builds or settings of the stack, in one interleaved run. Called by `run.sh --tracing-cost`.

Each variant is a whole stack of the four release binaries (ports, namespace and SQLite files of
its own), all started at once; every round runs each scenario once on each variant, back to back,
so drift on a shared machine hits every variant alike and the ratios are taken within a round.
Idle stacks cost next to nothing while another one is measured.

    python3 tests/bench/tracing_cost.py \\
        --variant off=target \\
        --variant export=target:export \\
        [--variant main=/tmp/main-target]

`NAME=TARGET_DIR` runs TARGET_DIR/release/* without OTEL_EXPORTER_OTLP_ENDPOINT; a `:export`
suffix sets it to an OTLP/HTTP sink started here, which accepts and discards every export (100 %
sampling: the SDK's default parent-based always-on sampler). The first variant is the baseline of
the ratios. Environment: DURATION (10), WARMUP (3), ROUNDS (3), SCENARIOS (d,a64), AMQP_URL.
"""

from __future__ import annotations

import argparse
import http.server
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (the benchmark's stack, wrk runner and table)


class Sink(http.server.BaseHTTPRequestHandler):
    """Accepts an OTLP/HTTP export and discards it (the cost measured is the services')."""

    received = 0

    def do_POST(self) -> None:  # noqa: N802 (the handler API's name)
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        Sink.received += 1
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *_: object) -> None:
        pass


class VariantStack(bench.Stack):
    """A bench stack with extra environment (the OTLP endpoint, or its removal)."""

    def __init__(self, *args, extra_env: dict[str, str | None], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.extra_env = extra_env

    def env(self, service: bench.Service) -> dict[str, str]:
        env = super().env(service)
        for key, value in self.extra_env.items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        return env


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", action="append", required=True, help="NAME=TARGET_DIR[:export]")
    args = parser.parse_args()

    duration = float(os.environ.get("DURATION", 10))
    warmup = float(os.environ.get("WARMUP", 3))
    rounds = int(os.environ.get("ROUNDS", 3))
    keys = [k for k in os.environ.get("SCENARIOS", "d,a64").split(",") if k]
    scenarios = [s for s in bench.SCENARIOS if s.key in keys]
    amqp_url = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")

    sink = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Sink)
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{sink.server_address[1]}"

    variants: list[tuple[str, VariantStack]] = []
    workdirs = []
    for spec in args.variant:
        name, _, rest = spec.partition("=")
        target, _, mode = rest.partition(":")
        workdir = Path(tempfile.mkdtemp(prefix=f"tracing-cost-{name}-"))
        workdirs.append(workdir)
        extra = {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint if mode == "export" else None}
        stack = VariantStack(Path(target).resolve() / "release", workdir, amqp_url,
                             f"bench-{name}-{uuid.uuid4().hex[:8]}", extra_env=extra)
        variants.append((name, stack))

    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    load_before = os.getloadavg()[0]
    runs: dict[str, list[bench.Run]] = {name: [] for name, _ in variants}
    started = time.monotonic()
    try:
        for name, stack in variants:
            bench.log(f"starting {name} ({stack.target})")
            stack.start()
            status, body = bench.http("PUT", stack["inventory"].url(f"/stock/{bench.SKU}"),
                                      {"onHand": bench.RESTOCK})
            if status != 200:
                raise SystemExit(f"restock of {name} answered {status}: {body[:200]!r}")
        if warmup > 0:
            for name, stack in variants:
                for scenario in scenarios:
                    bench.wrk(stack, scenario, warmup)
        for r in range(1, rounds + 1):
            for scenario in scenarios:
                for name, stack in variants:
                    run = bench.wrk(stack, scenario, duration)
                    bench.log(f"round {r}/{rounds}: {scenario.key} on {name}: {run.rate:,.0f} req/s, "
                              f"p99 {bench.fmt_ms(run.p99_us)} ms, errors {run.errors}")
                    runs[name].append(run)
        for _, stack in variants:
            stack.check_alive()
    except KeyboardInterrupt:
        return 130
    finally:
        for name, stack in variants:
            stack.stop()
            try:
                bench.delete_topology(amqp_url, stack.namespace)
            except OSError as error:
                bench.log(f"cannot delete the topology of {name}: {error}")
        for workdir in workdirs:
            shutil.rmtree(workdir, ignore_errors=True)
        sink.shutdown()

    baseline = variants[0][0]
    header = ["scenario", "variant", "req/s (mean)", "p50 ms", "p99 ms", "errors", f"req/s vs {baseline}, per round"]
    rows = []
    for scenario in scenarios:
        base = [r.rate for r in runs[baseline] if r.scenario == scenario.key]
        for name, _ in variants:
            mine = [r for r in runs[name] if r.scenario == scenario.key]
            worst = lambda attr: max((getattr(r, attr) for r in mine if getattr(r, attr) is not None), default=None)
            ratios = ", ".join(f"{r.rate / b:.3f}" for r, b in zip(mine, base))
            rows.append([scenario.label, name, f"{sum(r.rate for r in mine) / len(mine):,.0f}",
                         bench.fmt_ms(worst("p50_us")), bench.fmt_ms(worst("p99_us")),
                         str(sum(r.errors for r in mine)), ratios])
    print()
    print(f"{os.cpu_count()} cores, load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after; {rounds} round(s) of "
          f"{duration:g} s, interleaved; p50/p99: worst round; sink received {Sink.received} exports")
    print(bench.table(header, rows))
    print(f"\ntracing-cost: finished in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
