#!/usr/bin/env python3
"""Checks that docker-compose.yml agrees with the Dockerfile and with the four service binaries.

A compose file is configuration nobody compiles: a misspelt variable, a URL with the wrong port or a
health check on the wrong path only shows up when someone runs `docker compose up`. CI has no Docker
engine, so this script checks it two ways:

Static (always):
  * the file parses; every application service is built from ./Dockerfile with a `--target` that is
    a stage of it, and that stage EXPOSEs the service's port and runs the binary of that name;
  * each application service has a health check that GETs /healthz on its own port (with a tool the
    runtime image installs), and `restart: unless-stopped`;
  * `depends_on` names existing services with valid conditions, `service_healthy` only on services
    that have a health check, no cycles; a service waits (healthy) for every service its URLs name
    and, when it has an AMQP_URL, for rabbitmq;
  * every URL in an environment names a compose service and the port that service listens on
    (its PORT, or the binary's default); comma-separated lists are checked entry by entry;
  * every variable set for a service is a name the service's code (its crate or `shared`) mentions,
    so a typo such as AMQP_ULR fails here instead of silently falling back to a default;
  * SQLite files live on a named volume of their own; only gateway and rabbitmq publish ports (and
    the observability profile's tools, each its own UI);
  * every service with an AMQP_URL sets AMQP_QUEUE_TYPE to `classic` or `quorum`, all the same, and
    `classic` when the host sets nothing (compose runs one broker node);
  * a postgres:// DATABASE_URL names the compose `postgres` service on 5432, a database of its own
    that the server's init script creates, and the service waits for the server to be healthy;
  * a service runs more than one replica (`deploy.replicas`) only on PostgreSQL: replicas of a
    SQLite service would each need the one file, which is correct on one host only by accident.

Several --compose files are merged as compose merges them (mappings key by key, later files win;
lists such as volumes and ports are concatenated), so an override such as
docker-compose.postgres.yml is checked as the stack it makes.

Runtime (unless --static-only): "every variable a service reads is set or has a default that works
under compose" cannot be read off the source, so it is proven by running: the four release binaries
are started with exactly the environment compose gives them (interpolated from this process's
environment like compose does), in the order `depends_on` allows, with two rewrites only: SQLite
paths under /app move to a temporary directory; when `rabbitmqctl` can be used, AMQP_URL's
virtual host becomes a throw-away one (host and port stay as written); and a postgres:// URL gets a
throw-away database of its own, created and dropped here, and the server's local superuser (the
development server trusts it). So the run shares nothing with other users of the broker or the
database server and leaves nothing behind. Replicas run as one process each here (on one host they
would all want the same port); the replica test (tests/replicas) runs several. The compose DNS names must resolve to
loopback (.ci/run adds them to /etc/hosts). The check waits for every /healthz and /readyz, places
an order through the gateway on its published port, reads it back, waits for pricing to count the
units sold (so the event went through RabbitMQ), then stops everything with SIGTERM, as
`docker compose stop` would, and expects each to exit 0 within compose's 10 s grace period.

The facts about the binaries (ports, variables, the Dockerfile's stages) come from
scripts/service_contract.py, which scripts/kubernetes-check.py reads them from too.

Parsing uses PyYAML's safe_load (which also resolves the `<<:` merge keys the file uses); it ships
with the development machines' Python and .ci/run installs it with pip when it is missing. A
hand-written YAML subset parser would be one more thing to trust.

Usage: python3 scripts/compose-check.py [--static-only] [--profile release|debug] [--keep] [--compose FILE]...
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

try:
    import yaml
except ImportError:  # pragma: no cover - depends on the machine
    sys.exit("compose-check: PyYAML is missing: python3 -m pip install pyyaml")

from service_contract import (
    DOCKERFILE,
    ROOT,
    CheckFailed,
    Report,
    crate_dir_of,
    default_ports,
    dockerfile_stages,
    names_in_code,
    url_targets,
)

COMPOSE_FILE = ROOT / "docker-compose.yml"

BROKER = "rabbitmq"
AMQP_PORT = 5672
DATABASE_SERVER = "postgres"
POSTGRES_PORT = 5432
# Where the init scripts of the official image go; their CREATE DATABASE statements are read.
INIT_DIR = "/docker-entrypoint-initdb.d"
MANAGEMENT_PORT = 15672
PUBLIC_SERVICE = "gateway"
# The optional tools of `docker compose --profile observability up`, and the UI port each may publish.
OBSERVABILITY_PROFILE = "observability"
OBSERVABILITY_UI_PORTS = {"jaeger": {16686}, "prometheus": {9090}, "grafana": {3000}}
VALID_CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}
# The queue types the services accept (AMQP_QUEUE_TYPE), and the one compose's single broker node
# keeps by default (a quorum queue on one node replicates to nobody).
QUEUE_TYPES = {"classic", "quorum"}
DEFAULT_QUEUE_TYPE = "classic"

# Runtime budgets. Startup includes SQLite migrations and seeding; readiness includes the AMQP
# connection and topology declaration; both take well under a second here, the margin is for a
# loaded 2-core CI machine. The event budget covers outbox relay + broker + consumer.
HEALTHY_WITHIN_S = 30.0
READY_WITHIN_S = 60.0
EVENT_WITHIN_S = 30.0
# `docker compose stop` sends SIGTERM and kills after 10 s: a service must drain within that.
STOP_GRACE_S = 10.0
HTTP_TIMEOUT_S = 5.0


# --------------------------------------------------------------------------------------------------
# Reading the files


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's variable substitution: ${VAR}, ${VAR:-default}, ${VAR-default}, $VAR and $$."""

    def substitute(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group("braced") or m.group("bare")
        op, default = m.group("op"), m.group("default") or ""
        current = env.get(name)
        if op == ":-" and not current:
            return default
        if op == "-" and current is None:
            return default
        return current or ""

    pattern = r"\$\$|\$\{(?P<braced>\w+)(?:(?P<op>:?-)(?P<default>[^}]*))?\}|\$(?P<bare>\w+)"
    return re.sub(pattern, substitute, value)


def environment_of(service: dict, host_env: dict[str, str]) -> dict[str, str]:
    """A service's environment as compose would hand it to the container."""
    raw = service.get("environment") or {}
    if isinstance(raw, list):
        pairs = {}
        for item in raw:
            key, sep, val = str(item).partition("=")
            # `- KEY` without a value passes the host's value through, as compose does.
            pairs[key] = val if sep else host_env.get(key, "")
        raw = pairs
    return {str(k): interpolate("" if v is None else str(v), host_env) for k, v in raw.items()}


def merge(base, override):
    """Compose's merge of an override file: mappings key by key (later wins), lists concatenated
    without repeats (volumes, ports), anything else replaced."""
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            merged[key] = merge(base[key], value) if key in base else value
        return merged
    if isinstance(base, list) and isinstance(override, list):
        return base + [item for item in override if item not in base]
    return override


def databases_created(services: dict) -> set[str]:
    """The databases the `postgres` service's mounted init scripts create."""
    created: set[str] = set()
    for volume in (services.get(DATABASE_SERVER) or {}).get("volumes", []):
        source, _, target = str(volume).partition(":")
        target = target.split(":")[0]
        if not target.startswith(INIT_DIR) or not source.startswith("."):
            continue
        path = ROOT / source
        if path.is_file():
            for name in re.findall(r'CREATE\s+DATABASE\s+"?(\w+)"?', path.read_text(), re.IGNORECASE):
                created.add(name)
    return created


# --------------------------------------------------------------------------------------------------
# The static checks


@dataclass
class AppService:
    name: str
    binary: str
    port: int
    env: dict[str, str]
    depends_on: dict[str, str]


def normalise_depends_on(raw) -> dict[str, str]:
    if raw is None:
        return {}
    if isinstance(raw, list):
        return {str(name): "service_started" for name in raw}
    return {str(name): (spec or {}).get("condition", "service_started") for name, spec in raw.items()}


def static_checks(compose: dict, dockerfile: str, host_env: dict[str, str], report: Report) -> dict[str, AppService]:
    services: dict = compose.get("services") or {}
    stages = dockerfile_stages(dockerfile)
    check = report.check

    check(BROKER in services, f"a `{BROKER}` service exists")
    check(PUBLIC_SERVICE in services, f"a `{PUBLIC_SERVICE}` service exists")
    broker = services.get(BROKER, {})
    broker_test = " ".join(map(str, (broker.get("healthcheck") or {}).get("test", [])))
    check("rabbitmq-diagnostics" in broker_test, "rabbitmq has a rabbitmq-diagnostics health check")

    apps: dict[str, AppService] = {}
    for name, svc in services.items():
        if "build" not in svc:
            check("image" in svc, f"{name}: has an image or a build")
            continue
        build = svc["build"] if isinstance(svc["build"], dict) else {"context": svc["build"]}
        target = build.get("target")
        if not check(bool(target), f"{name}: build names a Dockerfile target"):
            continue
        check(build.get("context", ".") in (".", "./"), f"{name}: builds from the repository root")
        check(build.get("dockerfile", "Dockerfile") == "Dockerfile", f"{name}: builds from ./Dockerfile")
        env = environment_of(svc, host_env)
        try:
            port = int(env.get("PORT") or default_ports()[target])
        except (KeyError, ValueError):
            check(False, f"{name}: PORT is a number or {target} has a known default")
            continue
        apps[name] = AppService(name, target, port, env, normalise_depends_on(svc.get("depends_on")))

        stage = stages.get(target)
        if check(stage is not None, f"{name}: Dockerfile has a stage `{target}`"):
            check(port in stage.exposed_ports(), f"{name}: stage `{target}` EXPOSEs {port}")
            entry = stage.entrypoint()
            check(bool(entry) and Path(entry[0]).name == target, f"{name}: stage `{target}` runs the `{target}` binary")

        hc = svc.get("healthcheck") or {}
        test = [str(t) for t in hc.get("test", [])]
        urls = [urllib.parse.urlsplit(t) for t in test if t.startswith("http")]
        ok = len(urls) == 1 and urls[0].path == "/healthz" and urls[0].port == port
        ok = ok and urls[0].hostname in ("127.0.0.1", "localhost")
        check(ok, f"{name}: health check GETs http://127.0.0.1:{port}/healthz (has {test})")
        if len(test) > 1 and test[0] == "CMD":
            tool = test[1]
            installed = re.search(rf"apt-get install[^\n]*\b{re.escape(tool)}\b", re.sub(r"\\\n", " ", dockerfile))
            check(bool(installed), f"{name}: the runtime image installs `{tool}`, which the health check runs")
        check(svc.get("restart") == "unless-stopped", f"{name}: restart: unless-stopped")

        # Volumes: the SQLite file must live on a named volume, so it survives re-creation.
        db = env.get("DATABASE_URL", "")
        if db.startswith("sqlite://"):
            path = db[len("sqlite://"):].split("?")[0]
            path = path if path.startswith("/") else "/app/" + path  # relative to WORKDIR /app
            mounts = [str(v).split(":") for v in svc.get("volumes", [])]
            named = [m for m in mounts if len(m) >= 2 and m[0] in (compose.get("volumes") or {})]
            check(
                any(path.startswith(m[1].rstrip("/") + "/") for m in named),
                f"{name}: DATABASE_URL {db} lies on a declared named volume",
            )

    # Only the gateway and RabbitMQ's management UI reach the host.
    for name, svc in services.items():
        published = [str(p) for p in svc.get("ports", [])]
        container_ports = {int(p.split(":")[-1].split("/")[0]) for p in published}
        if name == PUBLIC_SERVICE and name in apps:
            check(container_ports == {apps[name].port}, f"{name}: publishes exactly its port {apps[name].port}")
        elif name == BROKER:
            check(container_ports <= {MANAGEMENT_PORT}, f"{name}: publishes only the management UI")
        elif OBSERVABILITY_PROFILE in (svc.get("profiles") or []):
            # The observability tools are there to be looked at: each publishes its own UI.
            check(container_ports <= OBSERVABILITY_UI_PORTS.get(name, set()), f"{name}: publishes only its UI")
        else:
            check(not published, f"{name}: publishes no port (only {PUBLIC_SERVICE} and {BROKER} may)")

    # depends_on is well-formed and acyclic.
    for name, svc in services.items():
        for dep, cond in normalise_depends_on(svc.get("depends_on")).items():
            check(dep in services, f"{name}: depends_on {dep}, which exists")
            check(cond in VALID_CONDITIONS, f"{name}: depends_on {dep} with a valid condition ({cond})")
            if cond == "service_healthy" and dep in services:
                check("healthcheck" in services[dep], f"{name}: waits for {dep} to be healthy, which has a health check")
    try:
        start_order(services)
    except CheckFailed as e:
        check(False, str(e))

    # URLs name services and their ports; a service waits for what it calls.
    for app in apps.values():
        known = names_in_code(crate_dir_of(app.binary))
        for key, value in app.env.items():
            check(key in known, f"{app.name}: {key} is read by the code of {app.binary} or shared (typo?)")
            for url in url_targets(value):
                host, port = url.hostname, url.port
                if url.scheme == "amqp":
                    check(host == BROKER and port == AMQP_PORT, f"{app.name}: {key} points at {BROKER}:{AMQP_PORT}")
                    check(app.depends_on.get(BROKER) == "service_healthy", f"{app.name}: waits for {BROKER} to be healthy")
                elif url.scheme in ("postgres", "postgresql"):
                    check(key == "DATABASE_URL", f"{app.name}: a postgres:// URL is the DATABASE_URL (is {key})")
                    check(host == DATABASE_SERVER and port == POSTGRES_PORT,
                          f"{app.name}: {key} points at {DATABASE_SERVER}:{POSTGRES_PORT}")
                    check(app.depends_on.get(DATABASE_SERVER) == "service_healthy",
                          f"{app.name}: waits for {DATABASE_SERVER} to be healthy")
                    database = url.path.lstrip("/")
                    check(database in databases_created(services),
                          f"{app.name}: database `{database}` is created by {DATABASE_SERVER}'s init script")
                elif url.scheme in ("http", "https"):
                    if not check(host in apps, f"{app.name}: {key} host `{host}` is a compose application service"):
                        continue
                    check(port == apps[host].port, f"{app.name}: {key} uses port {port}, {host} listens on {apps[host].port}")
                    check(app.depends_on.get(host) == "service_healthy", f"{app.name}: waits for {host} ({key}) to be healthy")
    # Each service its own database; replicas only where the database is shared by design.
    databases = [a.env["DATABASE_URL"].split("?")[0] for a in apps.values() if a.env.get("DATABASE_URL", "").startswith("postgres")]
    check(len(databases) == len(set(databases)), "every service on PostgreSQL has a database of its own")
    for app in apps.values():
        replicas = int(((services[app.name].get("deploy") or {}).get("replicas")) or 1)
        if replicas > 1:
            check(app.env.get("DATABASE_URL", "").startswith("postgres"),
                  f"{app.name}: {replicas} replicas only on PostgreSQL (a SQLite file belongs to one process)")
            check(not services[app.name].get("ports"), f"{app.name}: replicas publish no port")
    if DATABASE_SERVER in services:
        server = services[DATABASE_SERVER]
        test = " ".join(map(str, (server.get("healthcheck") or {}).get("test", [])))
        check("pg_isready" in test, f"{DATABASE_SERVER} has a pg_isready health check")
        check(str(server.get("image", "")).startswith("postgres:"), f"{DATABASE_SERVER} runs the postgres image")
    # One queue type for every service on the broker, classic unless the host asks otherwise.
    on_broker = [a for a in apps.values() if "AMQP_URL" in a.env]
    for app in on_broker:
        value = app.env.get("AMQP_QUEUE_TYPE", "")
        check(value.lower() in QUEUE_TYPES, f"{app.name}: AMQP_QUEUE_TYPE is one of {sorted(QUEUE_TYPES)} (is {value!r})")
        default = environment_of(services[app.name], {}).get("AMQP_QUEUE_TYPE", "")
        check(default == DEFAULT_QUEUE_TYPE, f"{app.name}: AMQP_QUEUE_TYPE is {DEFAULT_QUEUE_TYPE} unless the host sets it")
    types = {a.env.get("AMQP_QUEUE_TYPE", "").lower() for a in on_broker}
    check(len(types) <= 1, f"every service on {BROKER} declares the same queue type (has {sorted(types)})")
    return apps


def start_order(services: dict) -> list[str]:
    """Services in an order that respects depends_on (what compose does); fails on a cycle."""
    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        if name in order:
            return
        if name in visiting:
            raise CheckFailed(f"depends_on has a cycle: {' -> '.join(path + [name])}")
        visiting.add(name)
        for dep in normalise_depends_on((services.get(name) or {}).get("depends_on")):
            if dep in services:
                visit(dep, path + [name])
        visiting.discard(name)
        order.append(name)

    for name in services:
        visit(name, [])
    return order


# --------------------------------------------------------------------------------------------------
# The runtime check


def http(method: str, url: str, body: dict | None = None, headers: dict[str, str] | None = None):
    """(status, headers, parsed JSON or text); never raises for an HTTP status."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    if data is not None:
        req.add_header("content-type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT_S) as resp:
            status, hdrs, raw = resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as e:
        status, hdrs, raw = e.code, e.headers, e.read()
    try:
        return status, hdrs, json.loads(raw) if raw else None
    except ValueError:
        return status, hdrs, raw.decode(errors="replace")


def eventually(what: str, within_s: float, probe, procs: dict[str, "Running"] | None = None):
    """Polls `probe` until it returns something truthy; bounded, and fails early if a service died."""
    deadline = time.monotonic() + within_s
    last = None
    while True:
        for run in (procs or {}).values():
            if run.proc.poll() is not None:
                raise CheckFailed(f"{run.name} exited with {run.proc.returncode} while waiting for {what}")
        try:
            result = probe()
            if result:
                return result
            last = result
        except (OSError, urllib.error.URLError) as e:
            last = e
        if time.monotonic() > deadline:
            raise CheckFailed(f"{what}: not within {within_s:.0f}s (last: {last!r})")
        time.sleep(0.2)  # poll interval, not synchronisation: the loop above is the bound


@dataclass
class Running:
    name: str
    port: int
    proc: subprocess.Popen
    log: Path


class Broker:
    """A throw-away RabbitMQ virtual host when rabbitmqctl is usable, else the URL as written."""

    def __init__(self) -> None:
        self.vhost: str | None = None

    def __enter__(self) -> "Broker":
        if shutil.which("rabbitmqctl") is None:
            print("  note: rabbitmqctl not found: the services use AMQP_URL's virtual host as written")
            return self
        vhost = f"compose-check-{uuid.uuid4().hex[:12]}"
        try:
            self._ctl("add_vhost", vhost)
            self.vhost = vhost
            self._ctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
            print(f"  using the throw-away virtual host {vhost}")
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
            print(f"  note: cannot create a virtual host ({e}): using AMQP_URL as written")
            self.__exit__(None, None, None)
        return self

    def __exit__(self, *exc) -> None:
        if self.vhost:
            try:
                self._ctl("delete_vhost", self.vhost)
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
                print(f"  warning: could not delete virtual host {self.vhost}: {e}")
            self.vhost = None

    @staticmethod
    def _ctl(*args: str) -> None:
        # rabbitmqctl boots an Erlang VM per call (1-3 s); 60 s only guards against a wedged node.
        subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)

    def rewrite(self, amqp_url: str) -> str:
        if not self.vhost:
            return amqp_url
        u = urllib.parse.urlsplit(amqp_url)
        return urllib.parse.urlunsplit((u.scheme, u.netloc, "/" + urllib.parse.quote(self.vhost, safe=""), u.query, ""))


class Databases:
    """A throw-away database per postgres:// DATABASE_URL, on the server its host and port name,
    created on entry and dropped (with whatever connections are left) on exit."""

    # The development server trusts its local superuser; the compose file's user and password
    # exist only in the compose server.
    SUPERUSER = "postgres"

    def __init__(self) -> None:
        self.created: list[tuple[str, int, str]] = []
        self.prefix = f"compose_check_{uuid.uuid4().hex[:8]}"

    def __enter__(self) -> "Databases":
        return self

    def __exit__(self, *exc) -> None:
        for host, port, name in self.created:
            try:
                self._psql(host, port, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
                print(f"  warning: could not drop database {name}: {e}")
        self.created.clear()

    @classmethod
    def _psql(cls, host: str, port: int, statement: str) -> None:
        subprocess.run(["psql", "-h", host, "-p", str(port), "-U", cls.SUPERUSER, "-d", "postgres",
                        "-v", "ON_ERROR_STOP=1", "-qc", statement],
                       check=True, capture_output=True, timeout=30)

    def rewrite(self, database_url: str) -> str:
        u = urllib.parse.urlsplit(database_url)
        if u.scheme not in ("postgres", "postgresql"):
            return database_url
        if shutil.which("psql") is None:
            raise CheckFailed("psql is needed to create the throw-away databases of a postgres:// DATABASE_URL")
        host, port = u.hostname or "127.0.0.1", u.port or POSTGRES_PORT
        name = f"{self.prefix}_{u.path.lstrip('/')}"
        self._psql(host, port, f"CREATE DATABASE {name}")
        self.created.append((host, port, name))
        print(f"  using the throw-away database {name}")
        return urllib.parse.urlunsplit((u.scheme, f"{self.SUPERUSER}@{host}:{port}", "/" + name, u.query, ""))


def runtime_check(compose: dict, apps: dict[str, AppService], profile: str, keep: bool, report: Report) -> None:
    target_dir = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    for app in apps.values():
        binary = target_dir / profile / app.binary
        if not binary.is_file():
            raise CheckFailed(f"{binary} is missing: run `cargo build --{profile}` first" if profile == "release"
                              else f"{binary} is missing: run `cargo build` first")

    # The compose DNS names must reach this machine, as they reach the containers under compose.
    hosts = {BROKER} | {u.hostname for a in apps.values() for v in a.env.values() for u in url_targets(v)}
    for host in sorted(h for h in hosts if h):
        try:
            addr = socket.gethostbyname(host)
        except OSError:
            addr = None
        if not (addr or "").startswith("127."):
            raise CheckFailed(
                f"`{host}` resolves to {addr}, not loopback: add `127.0.0.1 {' '.join(sorted(hosts))}` to /etc/hosts"
            )
    for app in apps.values():
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", app.port)) == 0:
                raise CheckFailed(f"port {app.port} ({app.name}) is already in use: stop whatever listens there")

    work = Path(tempfile.mkdtemp(prefix="compose-check-"))
    running: dict[str, Running] = {}
    ok = False
    try:
        with Broker() as broker, Databases() as databases:
            for name in start_order(compose["services"]):
                if name not in apps:
                    continue
                app = apps[name]
                for dep, cond in app.depends_on.items():
                    if cond == "service_healthy" and dep in running:
                        wait_healthy(running[dep], running)
                running[name] = start(app, work, profile, target_dir, broker, databases)
            for run in running.values():
                wait_healthy(run, running)
            report.check(True, "every service answers /healthz")
            for run in running.values():
                eventually(f"{run.name} /readyz is 200", READY_WITHIN_S,
                           lambda r=run: http("GET", f"http://127.0.0.1:{r.port}/readyz")[0] == 200, running)
            report.check(True, "every service is ready (/readyz 200)")
            place_and_read_order(apps[PUBLIC_SERVICE], running, work, report)
            stop_all(running, report)
            ok = True
    finally:
        for run in running.values():
            if run.proc.poll() is None:
                os.killpg(run.proc.pid, signal.SIGKILL)
                run.proc.wait()
        if not ok:
            for run in running.values():
                print(f"  --- last lines of {run.name}'s log ({run.log}) ---")
                print("\n".join(run.log.read_text(errors="replace").splitlines()[-25:]))
        if ok and not keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"  logs and databases kept in {work}")


def start(app: AppService, work: Path, profile: str, target_dir: Path, broker: Broker, databases: Databases) -> Running:
    cwd = work / app.name
    (cwd / "data").mkdir(parents=True)
    env = dict(app.env)
    db = env.get("DATABASE_URL", "")
    if db.startswith("sqlite:///app/"):
        # The container's WORKDIR /app becomes this service's scratch directory.
        env["DATABASE_URL"] = "sqlite://" + str(cwd) + "/" + db[len("sqlite:///app/"):]
    elif db:
        env["DATABASE_URL"] = databases.rewrite(db)
    if "AMQP_URL" in env:
        env["AMQP_URL"] = broker.rewrite(env["AMQP_URL"])
    log = work / f"{app.name}.log"
    proc = subprocess.Popen(
        [str(target_dir / profile / app.binary)],
        cwd=cwd,
        env=env,  # exactly compose's environment: nothing inherited from this process
        stdin=subprocess.DEVNULL,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group, so cleanup can never miss a child
    )
    print(f"  started {app.name} ({app.binary}, pid {proc.pid}, port {app.port})")
    return Running(app.name, app.port, proc, log)


def wait_healthy(run: Running, procs: dict[str, Running]) -> None:
    eventually(f"{run.name} /healthz is 200", HEALTHY_WITHIN_S,
               lambda: http("GET", f"http://127.0.0.1:{run.port}/healthz")[0] == 200, procs)


def place_and_read_order(gateway: AppService, running: dict[str, Running], work: Path, report: Report) -> None:
    base = f"http://127.0.0.1:{gateway.port}"
    sku, qty = "BK-12", 2
    status, _, price = http("GET", f"{base}/api/prices/{sku}")
    if not report.check(status == 200 and isinstance(price, dict), f"GET /api/prices/{sku} is 200 (got {status}: {price})"):
        return
    sold_before = price.get("unitsSold", 0)

    correlation = f"compose-check-{uuid.uuid4().hex[:8]}"
    status, headers, order = http("POST", f"{base}/api/orders", {"items": [{"sku": sku, "qty": qty}]},
                                  {"x-correlation-id": correlation})
    if not report.check(status == 201 and isinstance(order, dict), f"POST /api/orders is 201 (got {status}: {order})"):
        return
    order_id = order.get("id")
    location = headers.get("location", "")
    report.check(location == f"/api/orders/{order_id}", f"Location is /api/orders/{order_id} (got {location!r})")
    report.check(headers.get("x-correlation-id") == correlation, "the gateway echoes the correlation ID")

    status, _, again = http("GET", f"{base}/api/orders/{order_id}")
    report.check(
        status == 200 and isinstance(again, dict) and again.get("id") == order_id and again.get("status") == "placed",
        f"GET /api/orders/{order_id} reads the placed order back (got {status}: {again})",
    )

    # order.placed: order's outbox relay -> RabbitMQ -> pricing's consumer counts the units sold.
    def counted():
        status, _, now = http("GET", f"{base}/api/prices/{sku}")
        return status == 200 and isinstance(now, dict) and now.get("unitsSold", 0) >= sold_before + qty

    try:
        eventually("pricing counts the units of order.placed", EVENT_WITHIN_S, counted, running)
        report.check(True, "order.placed travelled through RabbitMQ to pricing")
    except CheckFailed as e:
        report.check(False, str(e))

    seen = [r.name for r in running.values() if correlation in r.log.read_text(errors="replace")]
    print(f"  correlation ID {correlation} appears in the logs of: {', '.join(seen) or 'none'}")


def stop_all(running: dict[str, Running], report: Report) -> None:
    # Dependents first, as compose stops them.
    for run in reversed(list(running.values())):
        run.proc.send_signal(signal.SIGTERM)
        try:
            code = run.proc.wait(timeout=STOP_GRACE_S)
            report.check(code == 0, f"{run.name} exits 0 on SIGTERM (got {code})")
        except subprocess.TimeoutExpired:
            report.check(False, f"{run.name} stops within {STOP_GRACE_S:.0f}s of SIGTERM")


# --------------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--static-only", action="store_true", help="skip starting the binaries")
    parser.add_argument("--profile", default="release", choices=["release", "debug"], help="which build to run")
    parser.add_argument("--keep", action="store_true", help="keep the temporary logs and databases")
    parser.add_argument("--compose", type=Path, action="append",
                        help="a compose file to check; several are merged in order (default docker-compose.yml)")
    args = parser.parse_args()

    report = Report()
    host_env = dict(os.environ)
    try:
        files = args.compose or [COMPOSE_FILE]
        compose: dict = {}
        for file in files:
            compose = merge(compose, yaml.safe_load(file.read_text()) or {})
        shown = " + ".join(f.name for f in files)
        print(f"compose-check: static agreement of {shown}, Dockerfile and code")
        apps = static_checks(compose, DOCKERFILE.read_text(), host_env, report)
        if report.failures:
            raise CheckFailed("static checks failed")
        print(f"  {report.passed} static checks hold")
        if not args.static_only:
            print("compose-check: the binaries under compose's environment")
            runtime_check(compose, apps, args.profile, args.keep, report)
    except CheckFailed as e:
        if str(e) not in report.failures:
            report.failures.append(str(e))
        print(f"compose-check: FAILED: {e}")
        for failure in report.failures:
            print(f"  - {failure}")
        return 1
    except yaml.YAMLError as e:
        print(f"compose-check: FAILED: a compose file does not parse: {e}")
        return 1
    if report.failures:
        print(f"compose-check: FAILED ({len(report.failures)} of {report.passed + len(report.failures)} checks)")
        for failure in report.failures:
            print(f"  - {failure}")
        return 1
    print(f"compose-check: OK, {report.passed} checks hold")
    return 0


if __name__ == "__main__":
    sys.exit(main())
