#!/usr/bin/env python3
"""The load benchmark (issue 6): starts the four release binaries, loads them with wrk, prints one table.

Called by run.sh, which builds first; see README.md next to this file for what each scenario
measures and why. Only the standard library: the machine that builds the project has Python 3.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import resource
import shutil
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
LUA = HERE / "report.lua"
BURST_LUA = HERE / "burst.lua"

# name, binary, URL variable its callers read. Started in this order (dependencies first).
SERVICES = [
    ("pricing", "pricing-service", "PRICING_URL"),
    ("inventory", "inventory-service", "INVENTORY_URL"),
    ("order", "order-service", "ORDER_URL"),
    ("gateway", "gateway", None),
]

SKU = "BK-12"
ORDER_BODY = json.dumps({"items": [{"sku": SKU, "qty": 1}]}, separators=(",", ":"))
# A three-line order (scenario a64x3): three distinct SKUs of the seeded catalogue, restocked as
# BK-12 is, so the cost of an order's lines shows beside the one-line order's.
ORDER_SKUS_3 = ["BK-12", "MG-07", "ST-01"]
ORDER_BODY_3 = json.dumps({"items": [{"sku": sku, "qty": 1} for sku in ORDER_SKUS_3]},
                          separators=(",", ":"))
# Far more than any run can order, so no order is refused for stock (a 409 would be an error).
RESTOCK = 100_000_000

# Targets from issue 6, as fractions of the single-hop reference (c) or absolute values.
TARGET_PASS_THROUGH = 0.40
TARGET_ORDER_PATH = 0.05
TARGET_RELAY_EVENTS_PER_S = 5000
TARGET_RSS_MIB = 64

# wrk's default request timeout is 2 s; the gateway's edge budget is 5 s, so a slower answer is
# still an answer the system meant to give, and only one past the budget counts as a timeout.
WRK_TIMEOUT = "5s"
# Two wrk threads: one per core, as in the measurements issue 6 quotes.
WRK_THREADS = 2

# Startup is migrations, seeding, binding and the broker handshake: well under a second; 30 s is
# for a cold, busy machine.
STARTUP_TIMEOUT_S = 30
# A relay that has not drained its backlog by then is broken, not slow.
RELAY_TIMEOUT_S = 120
# What `docker compose stop` allows a service for its graceful drain.
STOP_TIMEOUT_S = 10


@dataclass
class Service:
    name: str
    binary: str
    port: int
    proc: subprocess.Popen | None = None
    log: Path | None = None

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def status_kib(self, key: str) -> int | None:
        """A `kB` line of /proc/<pid>/status (VmHWM: peak RSS, VmRSS: current RSS)."""
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith(key + ":"):
                    return int(line.split()[1])
        except (OSError, ValueError, AttributeError):
            return None
        return None

    def reset_peak_rss(self) -> bool:
        """Resets VmHWM to the current RSS (Linux >= 4.0; needs to own the process)."""
        try:
            Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5")
            return True
        except OSError:
            return False


@dataclass
class Run:
    """One wrk run (or the relay measurement) with each service's peak RSS during it."""

    scenario: str
    rate: float  # requests (or events) per second
    p50_us: float | None = None
    p99_us: float | None = None
    p999_us: float | None = None
    requests: int = 0
    non_2xx: int = 0
    socket_errors: int = 0
    rss_kib: dict[str, int] = field(default_factory=dict)

    @property
    def errors(self) -> int:
        return self.non_2xx + self.socket_errors


@dataclass
class Scenario:
    key: str
    label: str
    service: str  # which service wrk talks to
    path: str
    connections: int
    body: str | None = None


SCENARIOS = [
    Scenario("a16", "(a) POST /api/orders, 16 conns", "gateway", "/api/orders", 16, ORDER_BODY),
    Scenario("a64", "(a) POST /api/orders, 64 conns", "gateway", "/api/orders", 64, ORDER_BODY),
    Scenario("a64x3", "(a) POST /api/orders of 3 lines, 64 conns", "gateway", "/api/orders", 64,
             ORDER_BODY_3),
    Scenario("b", "(b) GET /api/products/BK-12", "gateway", f"/api/products/{SKU}", 64),
    Scenario("c", "(c) GET /prices/BK-12 on pricing", "pricing", f"/prices/{SKU}", 64),
    Scenario("d", "(d) GET /api/prices/BK-12", "gateway", f"/api/prices/{SKU}", 64),
]


def log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method: str, url: str, body: object | None = None, timeout: float = 5) -> tuple[int, bytes]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


class Postgres:
    """A throw-away database per stateful service on the PostgreSQL server at `PG_URL` (default the
    development server), created before the services start and dropped after they stop."""

    STATEFUL = ("pricing", "inventory", "order")

    def __init__(self, namespace: str) -> None:
        self.server = os.environ.get("PG_URL", "postgres://postgres@127.0.0.1:5432/postgres")
        self.names = {name: f"{namespace.replace('-', '_')}_{name}" for name in self.STATEFUL}

    def psql(self, statement: str, database: str | None = None) -> str:
        url = self.server if database is None else self.server.rsplit("/", 1)[0] + "/" + database
        result = subprocess.run(["psql", url, "-v", "ON_ERROR_STOP=1", "-Atqc", statement],
                                capture_output=True, text=True, timeout=60, check=False)
        if result.returncode != 0:
            raise SystemExit(f"bench: psql failed: {result.stderr.strip()}")
        return result.stdout.strip()

    def create(self) -> None:
        for name in self.names.values():
            self.psql(f"CREATE DATABASE {name}")

    def drop(self) -> None:
        for name in self.names.values():
            self.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def url(self, service: str) -> str:
        return self.server.rsplit("/", 1)[0] + "/" + self.names[service]


class Stack:
    """The four services as local processes, in a temporary directory of their own, each stateful
    one on a SQLite file there or, with `postgres`, on a database of its own on that server."""

    def __init__(self, target: Path, workdir: Path, amqp_url: str, namespace: str,
                 postgres: Postgres | None = None) -> None:
        self.target = target
        self.workdir = workdir
        self.amqp_url = amqp_url
        self.namespace = namespace
        self.postgres = postgres
        self.services = {name: Service(name, binary, free_port()) for name, binary, _ in SERVICES}
        self.profiled: dict[str, bool] = {}
        # The broker's CPU is shown beside the services' when it runs on this machine.
        found = subprocess.run(["pgrep", "-o", "beam.smp"], capture_output=True, text=True, check=False)
        self.broker_pid = int(found.stdout.split()[0]) if found.stdout.strip() else None

    def __getitem__(self, name: str) -> Service:
        return self.services[name]

    def env(self, service: Service) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            HOST="127.0.0.1",
            PORT=str(service.port),
            AMQP_URL=self.amqp_url,
            EVENTS_NAMESPACE=self.namespace,
            DATABASE_URL=(self.postgres.url(service.name) if self.postgres and service.name in Postgres.STATEFUL
                          else f"sqlite://{self.workdir / (service.name + '.db')}"),
            LOG_FORMAT="json",
            # info is the production setting; BENCH_RUST_LOG measures what logging costs.
            RUST_LOG=os.environ.get("BENCH_RUST_LOG", "info"),
            # wrk is one loopback client; the gateway's per-client rate limit would answer most of
            # its requests 429 and the benchmark would measure the limit, not the system. Off here,
            # and only here, explicitly.
            RATE_LIMIT_PER_SECOND=os.environ.get("RATE_LIMIT_PER_SECOND", "0"),
        )
        for name, _, url_var in SERVICES:
            if url_var:
                env[url_var] = self.services[name].url("")
        return env

    def start(self) -> None:
        logs = self.workdir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        for service in self.services.values():
            binary = self.target / service.binary
            if not binary.exists():
                raise SystemExit(f"bench: {binary} is missing (run.sh builds it)")
            service.log = logs / f"{service.name}.log"
            with open(service.log, "wb") as out:
                # A session of its own: Ctrl-C reaches this script, which stops the services in order.
                service.proc = subprocess.Popen(
                    [str(binary)],
                    env=self.env(service),
                    cwd=self.workdir,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        for service in self.services.values():
            # /readyz, not /healthz: ready means the broker link is up, so the first order's
            # event is not waiting for a connection while the clock runs.
            while True:
                self.check_alive()
                try:
                    status, _ = http("GET", service.url("/readyz"), timeout=1)
                    if status == 200:
                        break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise SystemExit(f"bench: {service.name} not ready within {STARTUP_TIMEOUT_S} s")
                time.sleep(0.1)

    def check_alive(self) -> None:
        for service in self.services.values():
            if not service.alive():
                tail = service.log.read_text(errors="replace").splitlines()[-20:] if service.log else []
                raise SystemExit(
                    f"bench: {service.name} exited (status {service.proc.returncode}); last log lines:\n"
                    + "\n".join(tail)
                )

    def cpu_seconds(self) -> dict[str, float]:
        """User + system CPU time of each service so far (and of the broker, if it is local)."""
        tick = os.sysconf("SC_CLK_TCK")
        pids = {s.name: s.proc.pid for s in self.services.values() if s.alive()}
        if self.broker_pid:
            pids["rabbitmq"] = self.broker_pid
        seconds = {}
        for name, pid in pids.items():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                seconds[name] = (int(fields[11]) + int(fields[12])) / tick
            except (OSError, IndexError, ValueError):
                pass
        return seconds

    @contextlib.contextmanager
    def profiling(self, label: str, seconds: float):
        """With PROFILE=1, samples every service with `perf record` while the body runs."""
        if os.environ.get("PROFILE") != "1" or self.profiled.get(label):
            yield
            return
        self.profiled[label] = True
        recorders = [
            subprocess.Popen(
                ["perf", "record", "-e", "cpu-clock", "-F", "997", "-g", "-p", str(s.proc.pid),
                 "-o", str(self.workdir / f"perf-{label}-{s.name}.data"), "--", "sleep", str(max(1, seconds - 1))],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            for s in self.services.values()
        ]
        try:
            yield
        finally:
            for recorder in recorders:
                recorder.wait()

    def stop(self) -> None:
        # Dependents first, so nothing logs errors about a dependency that went away before it.
        for service in reversed(list(self.services.values())):
            if service.alive():
                service.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for service in self.services.values():
            if service.proc is None:
                continue
            try:
                service.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                service.proc.kill()
                service.proc.wait()


def wrk(stack: Stack, scenario: Scenario, seconds: float) -> Run:
    service = stack[scenario.service]
    env = dict(os.environ, BENCH_BODY=scenario.body or "")
    command = [
        "wrk", f"-t{WRK_THREADS}", f"-c{scenario.connections}", f"-d{max(1, round(seconds))}s",
        f"--timeout={WRK_TIMEOUT}", "-s", str(LUA), service.url(scenario.path),
    ]
    for s in stack.services.values():
        s.reset_peak_rss()
    cpu_before = stack.cpu_seconds()
    with stack.profiling(scenario.key, seconds):
        result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    cpu = {k: v - cpu_before.get(k, 0) for k, v in stack.cpu_seconds().items()}
    log("  CPU s: " + ", ".join(f"{k} {v:.1f}" for k, v in cpu.items()))
    stack.check_alive()
    line = next((l for l in result.stdout.splitlines() if l.startswith("BENCH ")), None)
    if result.returncode != 0 or line is None:
        raise SystemExit(f"bench: wrk failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    summary = json.loads(line[len("BENCH "):])
    seconds_run = summary["duration_us"] / 1e6
    if summary["requests"]:
        services = sum(v for k, v in cpu.items() if k in stack.services)
        log(f"  CPU per request: {services / summary['requests'] * 1e6:.0f} µs of the services"
            + (f", {cpu['rabbitmq'] / summary['requests'] * 1e6:.0f} µs of RabbitMQ" if "rabbitmq" in cpu else ""))
    return Run(
        scenario=scenario.key,
        rate=summary["requests"] / seconds_run,
        p50_us=summary["p50_us"],
        p99_us=summary["p99_us"],
        p999_us=summary["p999_us"],
        requests=summary["requests"],
        non_2xx=summary["status"],
        socket_errors=sum(summary[k] for k in ("connect", "read", "write", "timeout")),
        rss_kib={s.name: s.status_kib("VmHWM") or 0 for s in stack.services.values()},
    )


def metric_sum(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of `name` in an OpenMetrics text whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        head, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total


def breakers_opened(stack: Stack) -> dict[str, float]:
    """Per service: calls its clients refused because a breaker was open, plus breakers not closed."""
    opened = {}
    for service in stack.services.values():
        _, text = http("GET", service.url("/metrics"))
        text = text.decode(errors="replace")
        refused = metric_sum(text, "http_client_requests_total", outcome="circuit_open")
        not_closed = sum(1 for l in text.splitlines()
                         if l.startswith("http_client_breaker_state{") and not l.endswith(" 0"))
        if refused or not_closed:
            opened[service.name] = refused + not_closed
    return opened


def burst(stack: Stack, connections: int, seconds: float, patient: bool = False) -> dict:
    """The cold burst: `connections` clients placing orders as fast as they are answered (wrk) or,
    with `patient`, clients that wait out each refusal's Retry-After (patient_clients.rs).

    Returns the per-status counts and latencies (burst.lua or patient_clients), what happened to an
    order placed right after, whether any breaker opened, each service's peak RSS, and whether
    every order that was answered 201 is stored once and its unit taken off the stock once.
    """
    for s in stack.services.values():
        s.reset_peak_rss()
    orders_before = count_orders(stack)
    # `available`, not `onHand`: the order placed before the burst may not be committed yet.
    _, stock_before = http("GET", stack["inventory"].url(f"/stock/{SKU}"))
    available_before = json.loads(stock_before)["available"]
    if patient:
        command = [str(patient_clients(stack)), stack["gateway"].url("/api/orders"), str(connections),
                   f"{seconds:g}", ORDER_BODY]
    else:
        command = [
            "wrk", f"-t{WRK_THREADS}", f"-c{connections}", f"-d{max(1, round(seconds))}s",
            f"--timeout={WRK_TIMEOUT}", "-s", str(BURST_LUA), stack["gateway"].url("/api/orders"),
        ]
    env = dict(os.environ, BENCH_BODY=ORDER_BODY)
    cpu_before = stack.cpu_seconds()
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    cpu = {k: v - cpu_before.get(k, 0) for k, v in stack.cpu_seconds().items()}
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    # The load generator's own CPU: on a shared 2-core machine it competes with the stack.
    cpu["patient clients" if patient else "wrk"] = ((children.ru_utime - children_before.ru_utime)
                                                    + (children.ru_stime - children_before.ru_stime))
    rss = {s.name: s.status_kib("VmHWM") or 0 for s in stack.services.values()}
    prefix = "PATIENT " if patient else "BURST "
    line = next((l for l in result.stdout.splitlines() if l.startswith(prefix)), None)
    if result.returncode != 0 or line is None:
        raise SystemExit(f"bench: {command[0]} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    summary = json.loads(line[len(prefix):])
    if patient:
        # The shape burst.lua prints: requests that got no answer at all count as timeouts.
        unanswered = summary["statuses"].pop("0", {}).get("count", 0)
        summary.update(duration_us=summary["seconds"] * 1e6, connect=0, read=0, write=0,
                       timeout=unanswered, unmatched=0)
    started = time.monotonic()
    after_status, _ = http("POST", stack["gateway"].url("/api/orders"), json.loads(ORDER_BODY))
    after_ms = (time.monotonic() - started) * 1000
    opened = breakers_opened(stack)
    stack.check_alive()
    # Nothing lost: once inventory has committed every reservation (reserved back to 0), each
    # order is stored once and took exactly its one unit.
    deadline = time.monotonic() + RELAY_TIMEOUT_S
    while True:
        _, raw = http("GET", stack["inventory"].url(f"/stock/{SKU}"))
        stock = json.loads(raw)
        if stock["reserved"] == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    created = summary["statuses"].get("201", {}).get("count", 0)
    stored = count_orders(stack) - orders_before
    taken = available_before - stock["available"]
    return {
        "patient": patient,
        "summary": summary, "cpu": cpu, "rss_kib": rss, "after_status": after_status,
        "after_ms": after_ms, "breakers_opened": opened, "created": created,
        "stored": stored, "units_taken": taken, "reserved_left": stock["reserved"],
    }


def patient_clients(stack: Stack) -> Path:
    """The patient clients' binary (tests/bench/patient_clients.rs), built when missing."""
    binary = stack.target / "examples" / "patient_clients"
    if not binary.exists():
        log("building the patient clients (cargo build --release -p e2e --example patient_clients)")
        subprocess.run(["cargo", "build", "--release", "-p", "e2e", "--example", "patient_clients"],
                       cwd=ROOT, check=True)
    return binary


def count_orders(stack: Stack) -> int:
    if stack.postgres:
        return int(stack.postgres.psql("SELECT count(*) FROM orders", stack.postgres.names["order"]))
    with contextlib.closing(sqlite3.connect(stack.workdir / "order.db")) as db:
        return db.execute("SELECT COUNT(*) FROM orders").fetchone()[0]


def report_burst(result: dict, connections: int, reject_p99_ms: float) -> list[str]:
    """Prints the burst's table; returns what is wrong with it (empty when nothing is)."""
    summary = result["summary"]
    seconds = summary["duration_us"] / 1e6
    rows = []
    for status, s in sorted(summary["statuses"].items()):
        rows.append([status, f"{s['count']:,}", f"{s['count'] / seconds:,.0f}",
                     fmt_ms(s["p50_us"]), fmt_ms(s["p99_us"]), fmt_ms(s["max_us"])])
    print()
    load = (f"{connections} clients honouring Retry-After for {seconds:.0f}s" if result.get("patient")
            else f"wrk -t{WRK_THREADS} -c{connections} -d{seconds:.0f}s")
    print(f"burst: {load} POST /api/orders right after start; "
          f"socket errors: connect {summary['connect']}, read {summary['read']}, write {summary['write']}, "
          f"timeout {summary['timeout']}; unmatched answers {summary['unmatched']}")
    print(table(["status", "answers", "per s", "p50 ms", "p99 ms", "max ms"], rows))
    print("peak RSS MiB: " + ", ".join(f"{k} {mib(v)}" for k, v in result["rss_kib"].items())
          + "; CPU s: " + ", ".join(f"{k} {v:.1f}" for k, v in result["cpu"].items()))
    print(f"order right after the burst: {result['after_status']} in {result['after_ms']:.1f} ms; "
          f"breakers opened: {result['breakers_opened'] or 'none'}")
    print(f"nothing lost: {result['created']:,} answered 201, {result['stored']:,} stored "
          f"(incl. the order after, and those still in flight when wrk stopped), "
          f"{result['units_taken']:,} units taken, {result['reserved_left']} still reserved")
    problems = []
    if result["breakers_opened"]:
        problems.append(f"breakers opened: {result['breakers_opened']}")
    if result["after_status"] != 201:
        problems.append(f"the order after the burst answered {result['after_status']}")
    server_errors = {k: v["count"] for k, v in summary["statuses"].items() if k.startswith("5") and k != "503"}
    if server_errors:
        problems.append(f"5xx other than 503: {server_errors}")
    admitted = summary["statuses"].get("201")
    for status in ("503", "429"):
        refused = summary["statuses"].get(status)
        if not refused:
            continue
        if reject_p99_ms and refused["p99_us"] / 1000 > reject_p99_ms:
            problems.append(f"{status} answers took {refused['p99_us'] / 1000:.1f} ms at p99 (> {reject_p99_ms:g} ms)")
        # Refused at once means: not queued like admitted work. Half the admitted median holds on a
        # busy machine too (measured: a tenth), and fails when refusals wait in the same queue.
        if admitted and refused["p50_us"] * 2 > admitted["p50_us"]:
            problems.append(f"{status} answers (p50 {refused['p50_us'] / 1000:.1f} ms) are not much faster "
                            f"than admitted orders (p50 {admitted['p50_us'] / 1000:.1f} ms)")
    # Every order answered 201 is stored, once, and took exactly one unit. A few more may be stored:
    # wrk stops with up to one request per connection in flight, which the system still completes
    # (their answers go to a closed socket).
    in_flight = result["stored"] - result["created"] - 1
    if not 0 <= in_flight <= connections or result["units_taken"] != result["stored"]:
        problems.append("orders or units do not add up")
    return problems


def relay_backlog(stack: Stack, events: int) -> Run:
    """Events/s through pricing's outbox relay, from commit to confirm.

    A backlog of `events` `price.changed` rows is committed to pricing's outbox in one
    transaction, as a burst of writers would leave it, and the relay is woken by a real price
    change (which commits one more row and notifies it). The rate is the number of rows divided
    by the time from that commit until the broker had confirmed the last row and the relay had
    marked it sent (its `sent_at`). Writing the rows directly keeps the HTTP and SQLite cost of
    the writers out of the figure: this measures the relay, scenario (a) measures the writers.
    """
    pricing = stack["pricing"]
    db = sqlite3.connect(stack.workdir / "pricing.db", timeout=10)
    try:
        data = json.dumps({"sku": SKU, "price": 39.9, "currency": "EUR"}, separators=(",", ":"))
        correlation = f"bench-relay-{uuid.uuid4().hex[:8]}"
        rows = [(str(uuid.uuid4()), "price.changed", 1, correlation, data) for _ in range(events)]
        for s in stack.services.values():
            s.reset_peak_rss()
        with db:
            first = db.execute("SELECT coalesce(max(id), 0) + 1 FROM outbox").fetchone()[0]
            db.executemany(
                "INSERT INTO outbox (message_id, event_type, version, correlation_id, data) "
                "VALUES (?, ?, ?, ?, ?)",
                rows,
            )
        committed = time.time()
        cpu_before = stack.cpu_seconds()
        status, body = http("PUT", pricing.url(f"/prices/{SKU}"), {"price": 39.9})
        if status != 200:
            raise SystemExit(f"bench: PUT /prices/{SKU} answered {status}: {body[:300]!r}")
        deadline = time.monotonic() + RELAY_TIMEOUT_S
        unsent = events
        while time.monotonic() < deadline:
            stack.check_alive()
            unsent = db.execute(
                "SELECT count(*) FROM outbox WHERE sent_at IS NULL AND id >= ?", (first,)
            ).fetchone()[0]
            if unsent == 0:
                break
            time.sleep(0.05)
        last = db.execute("SELECT max(sent_at) FROM outbox WHERE id >= ?", (first,)).fetchone()[0]
        cpu = {k: v - cpu_before.get(k, 0) for k, v in stack.cpu_seconds().items()}
        log("  CPU s: " + ", ".join(f"{k} {v:.1f}" for k, v in cpu.items()))
    finally:
        db.close()
    sent = events + 1 - unsent
    finished = (
        dt.datetime.strptime(last, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=dt.timezone.utc).timestamp()
        if last and unsent == 0
        else time.time()
    )
    return Run(
        scenario="e",
        rate=sent / max(finished - committed, 1e-3),
        requests=sent,
        non_2xx=unsent,  # rows still unsent when the time ran out
        rss_kib={s.name: s.status_kib("VmHWM") or 0 for s in stack.services.values()},
    )


def delete_topology(amqp_url: str, namespace: str) -> None:
    """Deletes what the services declared under `namespace` (names as in shared's topology.rs).

    A minimal AMQP 0-9-1 client (the standard library has none and the machine has no pika):
    handshake with PLAIN credentials, then queue.delete and exchange.delete on one channel.
    """
    from urllib.parse import unquote, urlparse

    url = urlparse(amqp_url)
    user, password = unquote(url.username or "guest"), unquote(url.password or "guest")
    vhost = unquote(url.path[1:]) if len(url.path) > 1 else "/"
    queues = [
        f"{namespace}.{q}{suffix}"
        for q in ("order.price-events", "inventory.order-events", "pricing.order-events")
        for suffix in ("", ".dlq", ".retry")
    ]
    exchanges = [f"{namespace}.shop.events", f"{namespace}.shop.events.dlx"]

    def shortstr(s: str) -> bytes:
        b = s.encode()
        return struct.pack("B", len(b)) + b

    def longstr(s: bytes) -> bytes:
        return struct.pack(">I", len(s)) + s

    with socket.create_connection((url.hostname or "127.0.0.1", url.port or 5672), timeout=10) as sock:
        buffer = b""

        def send(channel: int, class_id: int, method_id: int, args: bytes) -> None:
            payload = struct.pack(">HH", class_id, method_id) + args
            sock.sendall(struct.pack(">BHI", 1, channel, len(payload)) + payload + b"\xce")

        def expect(class_id: int, method_id: int) -> None:
            nonlocal buffer
            while True:
                while len(buffer) < 7 or len(buffer) < 8 + struct.unpack(">I", buffer[3:7])[0]:
                    chunk = sock.recv(65536)
                    if not chunk:
                        raise OSError("broker closed the connection")
                    buffer += chunk
                kind, _, size = struct.unpack(">BHI", buffer[:7])
                payload, buffer = buffer[7 : 7 + size], buffer[8 + size :]
                if kind != 1:
                    continue  # heartbeats
                got = struct.unpack(">HH", payload[:4])
                if got == (class_id, method_id):
                    return
                raise OSError(f"broker answered {got} instead of {(class_id, method_id)}: {payload[4:]!r}")

        sock.sendall(b"AMQP\x00\x00\x09\x01")
        expect(10, 10)  # connection.start
        send(0, 10, 11, struct.pack(">I", 0) + shortstr("PLAIN")
             + longstr(f"\0{user}\0{password}".encode()) + shortstr("en_US"))
        expect(10, 30)  # connection.tune
        send(0, 10, 31, struct.pack(">HIH", 1, 131072, 0))
        send(0, 10, 40, shortstr(vhost) + shortstr("") + b"\x00")
        expect(10, 41)
        send(1, 20, 10, shortstr(""))
        expect(20, 11)
        for queue in queues:
            send(1, 50, 40, struct.pack(">H", 0) + shortstr(queue) + b"\x00")
            expect(50, 41)
        for exchange in exchanges:
            send(1, 40, 20, struct.pack(">H", 0) + shortstr(exchange) + b"\x00")
            expect(40, 21)
        send(0, 10, 50, struct.pack(">H", 200) + shortstr("bye") + struct.pack(">HH", 0, 0))
        expect(10, 51)


def fmt_ms(us: float | None) -> str:
    return "-" if us is None else f"{us / 1000:.2f}"


def mib(kib: int) -> str:
    return f"{kib / 1024:.1f}"


def summarise(runs: list[Run], order: list[str], labels: dict[str, str]) -> list[list[str]]:
    """One row per scenario: mean rate over rounds; the worst latency and RSS; errors summed."""
    rows = []
    for key in order:
        mine = [r for r in runs if r.scenario == key]
        if not mine:
            continue
        worst = lambda attr: max((getattr(r, attr) for r in mine if getattr(r, attr) is not None), default=None)
        rows.append([
            labels[key],
            f"{sum(r.rate for r in mine) / len(mine):,.0f}",
            fmt_ms(worst("p50_us")),
            fmt_ms(worst("p99_us")),
            fmt_ms(worst("p999_us")),
            str(sum(r.errors for r in mine)),
            *(mib(max(r.rss_kib.get(name, 0) for r in mine)) for name, _, _ in SERVICES),
        ])
    return rows


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = lambda cells: "| " + " | ".join(
        c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
    ) + " |"
    rule = "|" + "|".join("-" * (w + 1) + (":" if i else "-") for i, w in enumerate(widths)) + "|"
    return "\n".join([line(header), rule, *map(line, rows)])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="seconds in total, no targets asserted")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, DBs)")
    parser.add_argument("--target-dir", default=os.environ.get("CARGO_TARGET_DIR", str(ROOT / "target")))
    args = parser.parse_args()

    smoke = args.smoke
    duration = float(os.environ.get("DURATION", 1 if smoke else 10))
    warmup = float(os.environ.get("WARMUP", 0 if smoke else 3))
    rounds = int(os.environ.get("ROUNDS", 1 if smoke else 2))
    relay_events = int(os.environ.get("RELAY_EVENTS", 1000 if smoke else 50_000))
    # The smoke run keeps the full 1,024 connections: fewer did not reproduce the collapse of the
    # old gateway (its breaker opened with 1,024 connections for 3 s, not with 512 for 2 s).
    burst_connections = int(os.environ.get("BURST_CONNECTIONS", 1024))
    burst_seconds = float(os.environ.get("BURST_SECONDS", 3 if smoke else 10))
    # Refusals must be cheap: 5 ms at p99 is the target (0 disables the check). But wrk is a closed
    # loop: each refused connection asks again at once, so a refusal waits behind the others'
    # (Little's law: 512 connections at 10,000 refusals/s is 50 ms), and on a busy CI machine no
    # absolute bound holds; the smoke run checks only that refusals do not queue like admitted work.
    reject_p99_ms = float(os.environ.get("BURST_REJECT_P99_MS", 0 if smoke else 5))
    amqp_url = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")
    namespace = f"bench-{uuid.uuid4().hex[:12]}"
    # DATABASE=postgres: the stateful services on PostgreSQL (a database each at PG_URL) instead of
    # SQLite files. The relay scenario (e) writes its backlog into SQLite directly, so it runs on
    # SQLite only.
    database = os.environ.get("DATABASE", "sqlite")
    if database not in ("sqlite", "postgres"):
        raise SystemExit(f"bench: DATABASE is sqlite or postgres, not {database!r}")
    postgres = Postgres(namespace) if database == "postgres" else None
    if postgres:
        relay_events = 0

    if shutil.which("wrk") is None:
        raise SystemExit("bench: wrk is not installed (apt-get install -y wrk)")

    workdir = Path(tempfile.mkdtemp(prefix="bench-"))
    stack = Stack(Path(args.target_dir) / "release", workdir, amqp_url, namespace, postgres)
    # SIGTERM (CI cancelling the job) unwinds like Ctrl-C, so the services are stopped.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    started = time.monotonic()
    try:
        log(f"starting the stack in {workdir} (namespace {namespace}, {database})")
        if postgres:
            postgres.create()
        stack.start()
        for sku in dict.fromkeys([SKU, *ORDER_SKUS_3]):
            status, body = http("PUT", stack["inventory"].url(f"/stock/{sku}"), {"onHand": RESTOCK})
            if status != 200:
                raise SystemExit(f"bench: restock of {sku} answered {status}: {body[:300]!r}")
        status, body = http("POST", stack["gateway"].url("/api/orders"), json.loads(ORDER_BODY))
        if status != 201:
            raise SystemExit(f"bench: a first order answered {status}: {body[:300]!r}")

        only = set(filter(None, os.environ.get("SCENARIOS", "").split(",")))
        scenarios = [s for s in SCENARIOS if not only or s.key in only]
        burst_result = None
        patient_result = None
        if "burst-patient" in only:
            # Only when asked for, and first when asked for alone: cold, as the wrk burst.
            log(f"burst: {burst_connections} clients honouring Retry-After for {burst_seconds:g} s")
            patient_result = burst(stack, burst_connections, burst_seconds, patient=True)
        if not only or "burst" in only:
            # First, while the stack is cold: the case that used to open the gateway's breaker.
            log(f"burst: {burst_connections} connections for {burst_seconds:g} s")
            burst_result = burst(stack, burst_connections, burst_seconds)
        if warmup > 0:
            log(f"warming up ({warmup:g} s per scenario)")
            for scenario in scenarios:
                wrk(stack, scenario, warmup)
        runs: list[Run] = []
        # Interleaved: every round runs each scenario once, so drift (other work on the machine,
        # a growing database) hits all of them alike, and ratios are taken within a round.
        for r in range(1, rounds + 1):
            for scenario in scenarios:
                log(f"round {r}/{rounds}: {scenario.label} for {duration:g} s")
                run = wrk(stack, scenario, duration)
                log(f"  {run.rate:,.0f} req/s, p99 {fmt_ms(run.p99_us)} ms, errors {run.errors}")
                runs.append(run)
        if relay_events > 0 and (not only or "e" in only):
            log(f"relay: a backlog of {relay_events} events")
            with stack.profiling("e", 5):
                relay = relay_backlog(stack, relay_events)
            log(f"  {relay.rate:,.0f} events/s")
            runs.append(relay)
        stack.check_alive()
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        stack.stop()
        if postgres:
            postgres.drop()
        try:
            delete_topology(amqp_url, namespace)
        except OSError as error:
            log(f"cannot delete the broker topology of {namespace}: {error}")
        if args.keep:
            log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    burst_problems = report_burst(burst_result, burst_connections, reject_p99_ms) if burst_result else []
    if patient_result:
        burst_problems += report_burst(patient_result, burst_connections, reject_p99_ms)
    if not runs:
        return 1 if burst_problems else 0

    labels = {s.key: s.label for s in SCENARIOS}
    labels["e"] = f"(e) outbox relay, {relay_events} events"
    header = ["scenario", "req/s", "p50 ms", "p99 ms", "p99.9 ms", "errors",
              *(f"{name} MiB" for name, _, _ in SERVICES)]
    rows = summarise(runs, [s.key for s in SCENARIOS] + ["e"], labels)
    print()
    print(f"{dt.date.today().isoformat()}, {os.cpu_count()} cores, {database}, {rounds} round(s) of {duration:g} s, "
          f"wrk -t{WRK_THREADS}; latency and RSS: worst round, req/s: mean of rounds; RSS = peak (VmHWM) "
          "during the scenario; (e) req/s = events/s")
    print(table(header, rows))

    def rates(key: str) -> list[float]:
        return [x.rate for x in runs if x.scenario == key]

    def ratio(key: str) -> list[float]:
        # Per round: the two runs were minutes apart at most, under the same conditions.
        return [x / c for x, c in zip(rates(key), rates("c"))]

    pass_through, order_path, relay_rate = ratio("d"), ratio("a64"), rates("e")
    peak_rss = max(max(r.rss_kib.values()) for r in runs)
    errors = sum(r.errors for r in runs)
    checks = [
        ("errors in all scenarios", errors, "= 0", errors == 0, ""),
        ("peak RSS of any service, MiB", peak_rss / 1024, f"<= {TARGET_RSS_MIB}",
         peak_rss / 1024 <= TARGET_RSS_MIB, ""),
    ]
    if pass_through:
        checks.append(("(d)/(c) gateway pass-through", min(pass_through), f">= {TARGET_PASS_THROUGH}",
                       min(pass_through) >= TARGET_PASS_THROUGH, ", ".join(f"{x:.3f}" for x in pass_through)))
    if order_path:
        checks.append(("(a, 64)/(c) order path", min(order_path), f">= {TARGET_ORDER_PATH}",
                       min(order_path) >= TARGET_ORDER_PATH, ", ".join(f"{x:.3f}" for x in order_path)))
    if relay_rate:
        checks.append(("(e) relay events/s", relay_rate[0], f">= {TARGET_RELAY_EVENTS_PER_S}",
                       relay_rate[0] >= TARGET_RELAY_EVENTS_PER_S, ""))
    print()
    print(table(["target", "measured (worst round)", "target", "met", "per round"],
                [[name, f"{value:.3f}" if isinstance(value, float) else str(value), want,
                  "yes" if ok else "MISSED", rounds_text] for name, value, want, ok, rounds_text in checks]))
    print(f"\nbench: finished in {time.monotonic() - started:.0f} s")

    if smoke:
        # A smoke run proves the script and the stack work; a slow CI machine may miss every
        # target, but a scenario where most requests fail, or a relay that never drains, is broken.
        broken = [
            r.scenario
            for r in runs
            if r.requests == 0 or r.errors * 2 > r.requests or (r.scenario == "e" and r.errors)
        ]
        if broken:
            log(f"smoke: scenarios mostly failing: {', '.join(broken)}")
            return 1
        if burst_problems:
            log("smoke: the burst " + "; ".join(burst_problems))
            return 1
        return 0
    return 0 if all(ok for *_, ok, _ in checks) and not burst_problems else 3


if __name__ == "__main__":
    sys.exit(main())
