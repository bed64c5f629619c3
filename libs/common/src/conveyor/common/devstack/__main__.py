"""`make up`: a private Redis and PostgreSQL plus every Conveyor service, supervised in the foreground.

Usage: python -m conveyor.common.devstack [--data-dir .run] [--workers 2] [--no-auth]

Owns the local development stack: starts the servers (data kept under --data-dir between
runs), launches results, producer and N workers (each on its own port, with its own health
check) with the same Python, waits for their gRPC health checks, prints example client
commands and streams their logs with a name prefix. Like compose's `restart: unless-stopped`:
when a service, a worker, Redis or PostgreSQL exits unexpectedly it says so and restarts that
one alone, after 1 s doubling to 30 s for a process that keeps dying (back to 1 s once it stayed
up RESTART_RESET seconds); the others keep running and reconnect. Only Ctrl-C or SIGTERM stops
the stack: services first (SIGTERM, then SIGKILL after 10 s), then the servers, exit status 0.
Ports come from CONVEYOR_DEV_{REDIS,PG,PRODUCER,RESULTS,WORKER}_PORT (worker i gets
CONVEYOR_DEV_WORKER_PORT + i - 1). Colour only on a terminal and never with NO_COLOR set.
Authentication is on, as in production: the producer and the results service check the token
file kept in --data-dir, the printed commands present its admin token, and the dashboard asks
each person to sign in with their token (tokens.py);
--no-auth leaves every call open.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conveyor.common.devstack.servers import PostgresServer, RedisServer, postgres_can_reach
from conveyor.common.devstack.tokens import DevTokens, ensure_dashboard_secret, ensure_dev_tokens
from conveyor.common.settings import metrics_addr_beside, metrics_addr_for_member

READY_TIMEOUT = 30.0
STOP_GRACE = 10.0
#: Restart delays: the first after RESTART_FIRST seconds, doubling up to RESTART_MAX.
RESTART_FIRST = 1.0
RESTART_MAX = 30.0
#: A process that stayed up this long counts as healthy again: its next restart waits RESTART_FIRST.
RESTART_RESET = 30.0
_TICK = 0.2
_out_lock = threading.Lock()
_COLORS = ["36", "35", "33", "32", "34", "31"]


def use_color() -> bool:
    """Colour only on a terminal, and never when NO_COLOR is set (https://no-color.org)."""
    return sys.stdout.isatty() and not os.environ.get("NO_COLOR")


def _say(prefix: str, text: str, color: str = "1") -> None:
    if use_color():
        prefix = f"\x1b[{color}m{prefix}\x1b[0m"
    with _out_lock:
        sys.stdout.write(f"{prefix} | {text}\n")
        sys.stdout.flush()


def _note(text: str) -> None:
    _say(f"{'devstack':<9}", text)


def _port(name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    try:
        return int(raw) if raw else default
    except ValueError:
        raise SystemExit(f"{name} must be a port number, got {raw!r}") from None


@dataclass
class Restarts:
    """When to start one process again after it died: 1 s doubling to 30 s, reset once it stayed up."""

    delay: float = RESTART_FIRST
    started: float = field(default_factory=time.monotonic)
    due: float | None = None
    count: int = 0

    def started_now(self) -> None:
        self.started = time.monotonic()
        self.due = None

    def schedule(self) -> float:
        """Record an exit; returns the seconds until the restart."""
        now = time.monotonic()
        if now - self.started >= RESTART_RESET:
            self.delay = RESTART_FIRST
        wait = self.delay
        self.delay = min(self.delay * 2, RESTART_MAX)
        self.due = now + wait
        self.count += 1
        return wait

    @property
    def waiting(self) -> bool:
        return self.due is not None

    @property
    def ready(self) -> bool:
        return self.due is not None and time.monotonic() >= self.due


@dataclass
class Service:
    """One supervised service process and the tail of its output."""

    name: str
    module: str
    addr: str
    env: dict[str, str]
    color: str
    proc: subprocess.Popen[bytes] | None = None
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=40))
    pump: threading.Thread | None = None
    restarts: Restarts = field(default_factory=Restarts)
    serving: bool = False
    slow_noted: bool = False

    def launch(self) -> None:
        if self.pump is not None:
            self.pump.join(2.0)
        self.tail.clear()
        self.serving = self.slow_noted = False
        self.proc = subprocess.Popen(
            [sys.executable, "-m", self.module],
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            process_group=0,  # Ctrl-C reaches only the supervisor, which stops services before servers
        )
        self.restarts.started_now()
        _note(f"{self.name} started (pid {self.proc.pid}, {self.addr})")
        self.pump = threading.Thread(target=self._pump, name=f"pump-{self.name}", daemon=True)
        self.pump.start()

    def _pump(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            self.tail.append(line)
            _say(f"{self.name:<9}", line, self.color)

    @property
    def exited(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def report_exit(self) -> None:
        assert self.proc is not None
        if self.pump is not None:
            self.pump.join(2.0)  # let the last lines arrive before summarising
        _note(f"{self.name} exited unexpectedly with {self.proc.returncode}; its last output:")
        for line in self.tail:
            _note(f"  {line}")


def _serving(addr: str) -> bool:
    with grpc.insecure_channel(addr) as channel:
        # types-grpcio-health-checking declares no methods on HealthStub.
        check: Callable[..., health_pb2.HealthCheckResponse] = health_pb2_grpc.HealthStub(channel).Check  # type: ignore[attr-defined]
        try:
            reply = check(health_pb2.HealthCheckRequest(), timeout=1.0)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def _http_ok(addr: str) -> bool:
    """The dashboard's readiness: GET /healthz answers 200 (it speaks HTTP, not gRPC health)."""
    try:
        with urllib.request.urlopen(f"http://{addr}/healthz", timeout=1.0) as reply:
            return bool(reply.status == 200)
    except OSError:
        return False


def _stop_services(services: list[Service]) -> None:
    running = [s for s in services if s.proc is not None and s.proc.poll() is None]
    for svc in running:
        assert svc.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(svc.proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE
    for svc in running:
        assert svc.proc is not None
        try:
            svc.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _note(f"{svc.name} ignored SIGTERM for {STOP_GRACE:.0f}s: killing it")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(svc.proc.pid, signal.SIGKILL)
            svc.proc.wait()
    for svc in services:
        if svc.pump is not None:
            svc.pump.join(2.0)


class Stack:
    """The servers and services of `make up`, each restarted alone when it dies (until stop is set)."""

    def __init__(self, servers: list[RedisServer | PostgresServer], services: list[Service], stop: threading.Event):
        self.servers = servers
        self.services = services
        self.stop = stop
        self.server_restarts = {id(s): Restarts() for s in servers}
        self.up_once = False

    def tick(self) -> bool:
        """One supervision pass; returns True the first time every service is SERVING."""
        for server in self.servers:
            self._check_server(server)
        for svc in self.services:
            if self.stop.is_set():
                return False
            self._check_service(svc)
        if not self.up_once and all(s.serving for s in self.services):
            self.up_once = True
            return True
        return False

    def _check_server(self, server: RedisServer | PostgresServer) -> None:
        restarts = self.server_restarts[id(server)]
        if not restarts.waiting and not server.running:
            wait = restarts.schedule()
            _note(f"{server.name} exited unexpectedly (log: {server.log_path}); restarting it in {wait:.0f}s")
        if restarts.ready and not self.stop.is_set():
            _note(f"restarting {server.name} (restart {restarts.count})")
            server.kill()  # reap the dead one and any helper it left behind
            try:
                server.start()
            except (RuntimeError, TimeoutError, OSError) as exc:
                restarts.started_now()
                wait = restarts.schedule()
                _note(f"{server.name} did not start: {exc}; trying again in {wait:.0f}s")
                return
            restarts.started_now()
            _note(f"{server.name} is back on port {server.port}")

    def _check_service(self, svc: Service) -> None:
        restarts = svc.restarts
        if not restarts.waiting and svc.exited:
            svc.report_exit()
            wait = restarts.schedule()
            _note(f"restarting {svc.name} in {wait:.0f}s")
        if restarts.ready:
            svc.launch()
            return
        if restarts.waiting or svc.serving:
            return
        if _http_ok(svc.addr) if svc.module == "conveyor.dashboard" else _serving(svc.addr):
            svc.serving = True
            again = " again" if restarts.count else ""
            _note(f"{svc.name} is serving{again} on {svc.addr}")
        elif not svc.slow_noted and time.monotonic() - restarts.started > READY_TIMEOUT:
            svc.slow_noted = True
            _note(f"{svc.name} is not SERVING after {READY_TIMEOUT:.0f}s; still waiting")


def _pg_data_dir(data_dir: Path) -> Path:
    """`data_dir/postgres`, or a stable /tmp directory when the postgres user cannot reach data_dir."""
    data_dir.mkdir(parents=True, exist_ok=True)
    if postgres_can_reach(data_dir):
        return data_dir / "postgres"
    # As root the server runs as `postgres`, which cannot enter e.g. /root; keyed by path so reruns reuse it.
    key = hashlib.sha256(str(data_dir.resolve()).encode()).hexdigest()[:10]
    base = Path("/tmp") / f"conveyor-dev-{key}"
    base.mkdir(exist_ok=True)
    base.chmod(0o755)
    _note(f"postgres cannot reach {data_dir}: keeping PostgreSQL data in {base / 'postgres'} instead")
    return base / "postgres"


def _print_commands(
    producer: str,
    results: str,
    redis_url: str,
    database_url: str,
    metrics: list[tuple[str, str]],
    dashboard: str,
    tokens: DevTokens | None,
) -> None:
    header = ' -H "authorization: Bearer $CONVEYOR_TOKEN"' if tokens else ""
    buf = f"npx buf curl --protocol grpc --http2-prior-knowledge{header}"
    enqueue = '{"queue":"default","type":"demo.sleep","payload":{"seconds":3,"steps":5}}'
    job = '{"jobId":"<JOB_ID>"}'
    calls = [
        ("enqueue a demo job (prints its jobId)", producer, "ProducerService/Enqueue", enqueue),
        ("watch it live (paste the jobId)", producer, "ProducerService/Watch", job),
        ("the job as the producer sees it (Redis)", producer, "ProducerService/GetJob", job),
        ("the job as recorded in PostgreSQL", results, "ResultsService/GetJob", job),
        ("list jobs", results, "ResultsService/ListJobs", '{"queue":"default","pageSize":10}'),
    ]
    up = "Conveyor is up; a process that dies is restarted; Ctrl-C stops everything."
    lines = ["", up, "", f"# the dashboard: http://{dashboard}/"]
    if tokens:
        lines.append(f"# sign in there with the admin token: cat {shlex.quote(str(tokens.admin_path))}")
    lines.append("")
    if tokens:
        lines += [
            f"# tokens are checked ({tokens.file}); this admin token is for you, the CLI and the commands below",
            f"export CONVEYOR_TOKEN=$(cat {shlex.quote(str(tokens.admin_path))})",
            "",
        ]
    lines += ["# buf curl (from the repo root)", "# list services"]
    lines.append(f"{buf} --list-services http://{producer}")
    for title, addr, method, body in calls:
        lines += [f"# {title}", f"{buf} -d {shlex.quote(body)} http://{addr}/conveyor.v1.{method}"]
    lines += ["", "# grpcurl (.venv/bin/grpcurl)", f"grpcurl -plaintext {producer} list"]
    for _, addr, method, body in calls:
        lines.append(f"grpcurl -plaintext{header} -d {shlex.quote(body)} {addr} conveyor.v1.{method}")
    cli = ".venv/bin/conveyor"
    lines += ["", "# the command line", f'{cli} enqueue demo.sleep --payload \'{{"seconds": 3, "steps": 5}}\' --watch']
    lines += [f"{cli} queues", f"{cli} workers", f"{cli} --help"]
    lines += ["", "# Prometheus metrics"] + [f"# {name}: http://{addr}/metrics" for name, addr in metrics]
    lines += ["", f"# redis-cli -u {redis_url}", f"# psql {database_url}", ""]
    with _out_lock:
        print("\n".join(lines), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m conveyor.common.devstack", description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Path(".run"), help="where Redis/PostgreSQL keep data")
    parser.add_argument("--workers", type=int, default=2, help="number of worker processes")
    parser.add_argument("--no-auth", action="store_true", help="leave every call open (no token file)")
    parser.add_argument(
        "--producers",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="producer processes sharing its port (CONVEYOR_PRODUCER_PROCESSES; default: 2 on 2+ cores)",
    )
    args = parser.parse_args(argv)
    producers = max(1, args.producers)

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    data_dir: Path = args.data_dir.resolve()
    redis = RedisServer(port=_port("CONVEYOR_DEV_REDIS_PORT", 56379), data_dir=data_dir / "redis")
    pg = PostgresServer(port=_port("CONVEYOR_DEV_PG_PORT", 55432), data_dir=_pg_data_dir(data_dir))
    services: list[Service] = []
    failed = False
    try:
        redis.start()
        _note(f"redis {redis.url} (data {redis.data_dir}, log {redis.log_path})")
        pg.start()
        _note(f"postgres {pg.url} (data {pg.data_dir}, log {pg.log_path})")

        base = dict(os.environ)
        base.update(REDIS_URL=redis.url, DATABASE_URL=pg.url, CONVEYOR_LOG_FORMAT="console", PYTHONUNBUFFERED="1")
        # The services write to our pipe: they colour their lines only when we print to a terminal.
        if use_color():
            base["FORCE_COLOR"] = "1"
        else:
            base.pop("FORCE_COLOR", None)
            base["NO_COLOR"] = "1"
        tokens = None if args.no_auth else ensure_dev_tokens(data_dir)
        checked: dict[str, str] = {}
        if tokens:
            checked = {"CONVEYOR_AUTH_TOKENS_FILE": str(tokens.file)}
            _note(f"tokens are checked: {tokens.file} (admin token in {tokens.admin_path}; --no-auth to turn off)")
        else:
            base.pop("CONVEYOR_AUTH_TOKENS_FILE", None)
        base.pop("CONVEYOR_TOKEN", None)  # each service gets its own below
        results = f"127.0.0.1:{_port('CONVEYOR_DEV_RESULTS_PORT', 50052)}"
        producer = f"127.0.0.1:{_port('CONVEYOR_DEV_PRODUCER_PORT', 50051)}"
        worker_base = _port("CONVEYOR_DEV_WORKER_PORT", 50061)
        specs = [
            ("results", "conveyor.results", results, checked),
            (
                "producer",
                "conveyor.producer",
                producer,
                {
                    "CONVEYOR_RESULTS_ADDR": results,
                    "CONVEYOR_PRODUCER_PROCESSES": str(producers),
                    **checked,
                },
            ),
        ]
        if tokens:
            specs[1][3]["CONVEYOR_TOKEN"] = tokens.services
        for i in range(args.workers):
            addr = f"127.0.0.1:{worker_base + i}"
            extra = {"CONVEYOR_QUEUES": "default", "CONVEYOR_WORKER_ID": f"worker-{i + 1}"}
            specs.append((f"worker-{i + 1}", "conveyor.worker", addr, extra))
        metrics_urls: list[tuple[str, str]] = []
        dashboard = f"127.0.0.1:{_port('CONVEYOR_DEV_DASHBOARD_PORT', 8080)}"
        dashboard_env = {"CONVEYOR_DASHBOARD_ADDR": dashboard, "CONVEYOR_PRODUCER_ADDR": producer}
        for name in ("CONVEYOR_DASHBOARD_SECRET", "CONVEYOR_DASHBOARD_SECRET_FILE", "CONVEYOR_DASHBOARD_LOGIN"):
            base.pop(name, None)
        if tokens:
            # Each person signs in with their own token (the admin one is in .run/admin.token).
            dashboard_env["CONVEYOR_DASHBOARD_LOGIN"] = "1"
            dashboard_env["CONVEYOR_DASHBOARD_SECRET_FILE"] = str(ensure_dashboard_secret(data_dir))
        specs.append(
            ("dashboard", "conveyor.dashboard", dashboard, {**dashboard_env, "CONVEYOR_RESULTS_ADDR": results})
        )
        for n, (name, module, addr, extra) in enumerate(specs):
            metrics_addr = metrics_addr_beside(addr)
            if module == "conveyor.producer":
                # Each producer process serves its own /metrics: member i on the port + 100 x i.
                for i in range(producers):
                    member = metrics_addr_for_member(metrics_addr, i)
                    metrics_urls.append((name if i == 0 else f"{name} #{i + 1}", member))
            elif module != "conveyor.dashboard":  # HTTP pages, no /metrics
                metrics_urls.append((name, metrics_addr))
            env = {**base, "CONVEYOR_GRPC_ADDR": addr, "CONVEYOR_METRICS_ADDR": metrics_addr, **extra}
            services.append(Service(name, module, addr, env, _COLORS[n % len(_COLORS)]))
        for svc in services:
            if not stop.is_set():
                svc.launch()

        stack = Stack([redis, pg], services, stop)
        while not stop.is_set():
            if stack.tick():
                _print_commands(producer, results, redis.url, pg.url, metrics_urls, dashboard, tokens)
            stop.wait(_TICK)
    except (RuntimeError, TimeoutError, OSError) as exc:
        _note(f"error: {exc}")
        failed = True
    finally:
        _note("stopping services")
        _stop_services(services)
        pg.close()
        redis.close()
        _note("stopped")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
