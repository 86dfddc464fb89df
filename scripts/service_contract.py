"""What the four service binaries expect from whatever deploys them, read from the workspace's sources.

A deployment (docker-compose.yml, the Kubernetes manifests) repeats facts the code owns: the port a
binary listens on, the variables it reads, the URLs it calls by default, the paths of its probes,
how long it drains. scripts/compose-check.py and scripts/kubernetes-check.py compare a deployment
with these facts; this module reads them, once, from the sources (not from a copy kept here), so a
change in the code that a deployment does not follow fails a check instead of a rollout.

Reading Rust source with regular expressions is deliberately shallow: each pattern matches one
idiom the workspace uses everywhere (`env.parse_or("PORT", 4001)`, `.route("/healthz", get(..))`,
`Duration::from_secs(8)` on a named constant), and fails loudly (CheckFailed) when the idiom is not
found, rather than guessing.
"""

from __future__ import annotations

import json
import re
import urllib.parse
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
# The workspace's service binaries, each the package and binary of the same name.
SERVICE_PACKAGES = ("gateway", "order-service", "inventory-service", "pricing-service")


class CheckFailed(Exception):
    """A disagreement between a deployment and the binaries, or a fact the sources no longer show."""


class Report:
    """Counts the checks that hold and collects, and prints, the ones that do not."""

    def __init__(self) -> None:
        self.passed = 0
        self.failures: list[str] = []

    def check(self, ok: bool, what: str) -> bool:
        if ok:
            self.passed += 1
        else:
            self.failures.append(what)
            print(f"  FAIL {what}")
        return ok


# --------------------------------------------------------------------------------------------------
# Crates and the variables their code reads


def crate_dir_of(package: str) -> Path:
    """The workspace member whose package is `package`."""
    for manifest in ROOT.glob("*/Cargo.toml"):
        if re.search(rf'^name\s*=\s*"{re.escape(package)}"', manifest.read_text(), re.MULTILINE):
            return manifest.parent
    raise CheckFailed(f"no workspace member is the package {package!r}")


def _sources(*dirs: Path) -> str:
    return "\n".join(p.read_text(encoding="utf-8") for d in dirs for p in sorted(d.rglob("*.rs")))


@cache
def names_in_code(crate_dir: Path) -> frozenset[str]:
    """UPPER_SNAKE string literals in a crate's and shared's sources: the variables code can read."""
    text = _sources(crate_dir / "src", ROOT / "shared" / "src")
    return frozenset(re.findall(r'"([A-Z][A-Z0-9_]+)"', text))


def default_port(package: str) -> int:
    """The port the binary listens on when PORT is unset (`env.parse_or("PORT", N)` in config.rs)."""
    config = (crate_dir_of(package) / "src" / "config.rs").read_text(encoding="utf-8")
    m = re.search(r'parse_or\(\s*"PORT"\s*,\s*(\d+)\s*\)', config)
    if not m:
        raise CheckFailed(f"{package}: config.rs reads no PORT with a default")
    return int(m.group(1))


@cache
def default_ports() -> dict[str, int]:
    """Every service package's default port."""
    return {package: default_port(package) for package in SERVICE_PACKAGES}


def default_urls(package: str) -> dict[str, str]:
    """The URL variables config.rs reads for the services it calls, with their defaults
    (`ClientConfig::from_env("inventory", env, "INVENTORY_URL", "http://inventory:4002")`)."""
    config = (crate_dir_of(package) / "src" / "config.rs").read_text(encoding="utf-8")
    return dict(re.findall(r'"([A-Z][A-Z0-9_]*_URL)"\s*,\s*"(https?://[^"]+)"', config))


def uses_broker(package: str) -> bool:
    """Whether the service connects to RabbitMQ (reads the shared messaging settings)."""
    return "MessagingSettings" in _sources(crate_dir_of(package) / "src")


def default_amqp_url() -> str:
    """`shared::messaging::settings::DEFAULT_AMQP_URL`."""
    text = (ROOT / "shared" / "src" / "messaging" / "settings.rs").read_text(encoding="utf-8")
    m = re.search(r'DEFAULT_AMQP_URL:\s*&str\s*=\s*"([^"]+)"', text)
    if not m:
        raise CheckFailed("shared/src/messaging/settings.rs defines no DEFAULT_AMQP_URL")
    return m.group(1)


# --------------------------------------------------------------------------------------------------
# Probes and shutdown


def duration_constant(path: Path, name: str) -> float:
    """The seconds of `const NAME: Duration = Duration::from_secs(N)` (or from_millis) in `path`."""
    text = path.read_text(encoding="utf-8")
    m = re.search(rf"const {name}: Duration = Duration::from_(secs|millis)\((\d+)\)", text)
    if not m:
        raise CheckFailed(f"{path.relative_to(ROOT)} defines no Duration constant {name}")
    return int(m.group(2)) / (1000 if m.group(1) == "millis" else 1)


def drain_seconds() -> float:
    """How long a stopping service keeps serving in-flight requests (`shutdown::DEFAULT_DRAIN`)."""
    return duration_constant(ROOT / "shared" / "src" / "shutdown.rs", "DEFAULT_DRAIN")


def broker_operation_seconds() -> float:
    """The bound on one broker operation, such as the last confirm (`DEFAULT_OPERATION_TIMEOUT`)."""
    return duration_constant(ROOT / "shared" / "src" / "messaging" / "settings.rs", "DEFAULT_OPERATION_TIMEOUT")


def resolve_interval_seconds() -> float:
    """How often a client re-resolves a dependency's name (`BalanceConfig::resolve_every`)."""
    text = (ROOT / "shared" / "src" / "client" / "instances.rs").read_text(encoding="utf-8")
    m = re.search(r"resolve_every: Duration::from_secs\((\d+)\)", text)
    if not m:
        raise CheckFailed("shared/src/client/instances.rs sets no default resolve_every")
    return float(m.group(1))


@dataclass(frozen=True)
class ProbeRoutes:
    liveness: str
    readiness: str
    # Whether the liveness handler awaits nothing: then it cannot wait on a database or a broker.
    liveness_awaits_nothing: bool


def probe_routes() -> ProbeRoutes:
    """The paths shared's health router serves its liveness and readiness handlers on."""
    text = (ROOT / "shared" / "src" / "health.rs").read_text(encoding="utf-8")
    routes = dict((handler, path) for path, handler in re.findall(r'\.route\("([^"]+)",\s*get\((\w+)\)\)', text))
    body = re.search(r"async fn liveness\([^)]*\)[^{]*\{(.*?)\n\}", text, re.DOTALL)
    if "liveness" not in routes or "readiness" not in routes or body is None:
        raise CheckFailed("shared/src/health.rs routes no `liveness` and `readiness` handlers")
    return ProbeRoutes(routes["liveness"], routes["readiness"], ".await" not in body.group(1))


# --------------------------------------------------------------------------------------------------
# The Dockerfile


@dataclass
class Stage:
    name: str
    lines: list[str] = field(default_factory=list)

    def exposed_ports(self) -> set[int]:
        ports: set[int] = set()
        for line in self.lines:
            if line.upper().startswith("EXPOSE "):
                ports.update(int(p.split("/")[0]) for p in line.split()[1:])
        return ports

    def entrypoint(self) -> list[str]:
        for line in self.lines:
            if line.upper().startswith("ENTRYPOINT "):
                return json.loads(line.split(None, 1)[1])
        return []

    def user(self) -> str | None:
        users = [line.split(None, 1)[1] for line in self.lines if line.upper().startswith("USER ")]
        return users[-1] if users else None


def dockerfile_stages(text: str) -> dict[str, Stage]:
    """The named stages of a Dockerfile, with their instructions (continuations joined); a stage
    built `FROM` another stage starts with that stage's instructions."""
    joined = re.sub(r"\\\n", " ", text)
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for raw in joined.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = re.match(r"FROM\s+(\S+)(?:\s+AS\s+(\S+))?", line, re.IGNORECASE)
        if m:
            parent = stages.get(m.group(1))
            current = Stage(m.group(2) or "", list(parent.lines) if parent else [])
            if current.name:
                stages[current.name] = current
            continue
        if current is not None:
            current.lines.append(line)
    return stages


# --------------------------------------------------------------------------------------------------
# Values


def url_targets(value: str) -> list[urllib.parse.SplitResult]:
    """The URLs in a variable's value (a comma-separated list is allowed)."""
    parts = [p.strip() for p in value.split(",") if p.strip()]
    urls = [urllib.parse.urlsplit(p) for p in parts]
    if urls and all(u.scheme and u.hostname for u in urls):
        return urls
    return []
