#!/usr/bin/env python3
"""Conveyor's benchmarks (DESIGN.md, "Budgets"), optionally side by side with BullMQ in the same run.

    .venv/bin/python bench/run.py [--n 20000] [--reps 3] [--only e2e,bulk,single,conc,latency,mem,finish,watch]
                                  [--json bench/results/conveyor.jsonl] [--with-bullmq] [--pair]

--pair is --only e2e,metrics_off,tracing: the end-to-end figure as shipped (metrics on, tracing
off), with metrics off (CONVEYOR_METRICS_ADDR=off), and with tracing on (OTLP to a sink in this
process), each repetition running the three in a rotated order; the end prints the medians of the
per-repetition ratios.

Every measurement starts a fresh stack: a private redis-server (AOF, appendfsync everysec,
noeviction), a private PostgreSQL (fsync on, synchronous_commit on, track_commit_timestamp on)
and the services as subprocesses of this Python (`python -m conveyor.producer|results|worker`),
then drives it from a separate client process (bench/driver.py). Handlers are `demo.noop`,
payloads are 100-byte JSON objects sent as `payload_json`. Each measurement prints one JSON line;
the end prints a table of medians against the DESIGN.md budget table (see bench/README.md).

With --with-bullmq, ../shared/peers/baseline.py runs once per repetition, interleaved with
Conveyor's repetitions (same machine, same run), and the table shows ratios.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import psycopg
import redis
from google.protobuf.duration_pb2 import Duration
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conveyor.common.devstack.servers import PostgresServer, RedisServer, free_port
from conveyor.common.keys import queue_keys
from conveyor.v1 import admin_service_pb2_grpc, event_pb2, limits_pb2, producer_service_pb2_grpc
from conveyor.v1 import producer_service_pb2 as p

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from driver import JOB_TYPE, PAYLOAD  # noqa: E402

PY = sys.executable
BASELINE = ROOT.parent / "shared" / "peers" / "baseline.py"
QUEUE = "bench"
KEYS = queue_keys(QUEUE)
BAND = KEYS.band(5)  # default priority
SUCCEEDED = 5  # conveyor.v1.JobState.JOB_STATE_SUCCEEDED
CLK = os.sysconf("SC_CLK_TCK")
POLL = 0.02
ALL = (
    "e2e",
    "e2e_b",
    "metrics_off",
    "tracing",
    "controls",
    "bulk",
    "client",
    "client_b",
    "conc",
    "single",
    "latency",
    "mem",
    "finish",
    "watch",
)
ONCE = ("mem", "finish")  # deterministic or slow: first repetition only
BULLMQ_NAMES = {
    "e2e": "e2e",
    "bulk": "bulk",
    "single": "single",
    "conc": "conc",
    "client": "conc",
    "client_b": "conc",
    "latency": "latency",
    "mem": "mem",
}
PG_SETTINGS = {"track_commit_timestamp": "on"}  # fsync and synchronous_commit stay at their durable defaults
#: With --profile only: pg_stat_statements costs PostgreSQL a little on every statement.
PG_PROFILE_SETTINGS = {
    **PG_SETTINGS,
    "shared_preload_libraries": "pg_stat_statements",
    "pg_stat_statements.track": "all",
}
#: The CPU budget per job and process, end to end (bench/README.md, "CPU budget per job, per process"): what
#: 2x BullMQ's e2e asks of two cores, split as the prototype's profile split it. Printed beside each figure.
CPU_BUDGET_US = {
    "results": 12.0,
    "producer": 6.0,
    "worker": 10.0,
    "redis": 14.0,
    "postgres": 16.0,
    "driver": 6.0,
    "bench": 1.0,
}
CPU_BUDGET_US["total"] = sum(CPU_BUDGET_US.values())
SERVICES = ("producer", "worker", "results")


class BenchError(RuntimeError):
    pass


class _CallDetails(
    collections.namedtuple(
        "_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")
    ),
    grpc.ClientCallDetails,
):
    pass


class _Bearer(grpc.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Adds ``authorization: Bearer`` to the bench's own unary calls (warm-up, limits)."""

    def __init__(self, token: str) -> None:
        self._header = ("authorization", f"Bearer {token}")

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        metadata = [*(details.metadata or ()), self._header]
        return continuation(
            _CallDetails(details.method, details.timeout, metadata, details.credentials, details.wait_for_ready,
                         details.compression),
            request,
        )  # fmt: skip


def dial(addr: str) -> grpc.Channel:
    """A channel to a service; with CONVEYOR_TOKEN set (services checking tokens: --b-env
    CONVEYOR_AUTH_TOKENS_FILE=...), every call presents it, as the driver's do."""
    channel = grpc.insecure_channel(addr)
    token = os.environ.get("CONVEYOR_TOKEN", "")
    return grpc.intercept_channel(channel, _Bearer(token)) if token else channel


def log(msg: str) -> None:
    print(f"# {msg}", file=sys.stderr, flush=True)


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    k = (len(xs) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def wait_until(check: Callable[[], Any], what: str, timeout: float, interval: float = POLL) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:.0f} s waiting for {what} (last: {value!r})")
        time.sleep(interval)


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# -- CPU accounting ---------------------------------------------------------------------------


def _stat(pid: int) -> tuple[int, int] | None:
    """(ppid, utime+stime+cutime+cstime in ticks) of ``pid``; cutime/cstime hold reaped children."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    return int(fields[1]), sum(int(x) for x in fields[11:15])


def tree_ticks(root: int) -> int:
    """CPU ticks of ``root`` and all its descendants (e.g. postmaster + backends)."""
    stats: dict[int, tuple[int, int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            s = _stat(int(entry))
            if s is not None:
                stats[int(entry)] = s
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        if pid in stats:
            total += stats[pid][1]
        todo.extend(children.get(pid, []))
    return total


# -- the stack ---------------------------------------------------------------------------------


@dataclass
class Service:
    name: str
    addr: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    #: Where it serves /metrics ("off": nowhere).
    metrics_addr: str = "off"


@dataclass
class Stack:
    """Private Redis + PostgreSQL + services, started fresh; use as a context manager."""

    workdir: Path
    worker: bool = True
    retention_s: float | None = None
    concurrency: int = 50
    #: Extra environment of every service (the B side of a paired comparison, --b-env).
    extra_env: dict[str, str] = field(default_factory=dict)
    profile: bool = False
    #: The interpreter the services run under: another checkout's venv runs that checkout's code
    #: (its editable installs), the other side of a paired before/after of a code change.
    python: str = PY
    services: dict[str, Service] = field(default_factory=dict)
    redis_server: RedisServer | None = None
    pg_server: PostgresServer | None = None
    r: redis.Redis | None = None
    db: psycopg.Connection[Any] | None = None

    def __enter__(self) -> Stack:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self.redis_server = RedisServer(appendonly=True)
        self.redis_server.start()
        self.pg_server = PostgresServer(settings=PG_PROFILE_SETTINGS if self.profile else PG_SETTINGS)
        self.pg_server.start(timeout=60)
        env = dict(
            os.environ,
            REDIS_URL=self.redis_server.url,
            DATABASE_URL=self.pg_server.url,
            CONVEYOR_LOG_LEVEL="warning",
            CONVEYOR_LOG_FORMAT="json",
            PYTHONUNBUFFERED="1",
            **self.extra_env,
        )
        if self.retention_s is not None:
            env["CONVEYOR_RETENTION_SECONDS"] = str(self.retention_s)
        results_addr = f"127.0.0.1:{free_port()}"
        self._spawn("results", env, results_addr)
        self._spawn("producer", env, f"127.0.0.1:{free_port()}", CONVEYOR_RESULTS_ADDR=results_addr)
        if self.worker:
            self._spawn(
                "worker", env, f"127.0.0.1:{free_port()}", CONVEYOR_QUEUES=QUEUE,
                CONVEYOR_CONCURRENCY=str(self.concurrency), CONVEYOR_WORKER_ID="bench-worker-1",
            )  # fmt: skip
        for s in self.services.values():
            self._wait_healthy(s, 60.0)
        self.r = redis.Redis.from_url(self.redis_server.url, socket_timeout=30, socket_connect_timeout=5)
        self.db = psycopg.connect(self.pg_server.url, autocommit=True, connect_timeout=10)
        if self.profile:
            self.db.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")

    def _spawn(self, name: str, env: dict[str, str], addr: str, **extra: str) -> None:
        log_path = self.workdir / f"{name}.log"
        # A port of its own (the default, gRPC port + 1000, may be taken or past 65535).
        metrics_addr = "off" if env.get("CONVEYOR_METRICS_ADDR") == "off" else f"127.0.0.1:{free_port()}"
        with log_path.open("ab") as out:
            proc = subprocess.Popen(
                [self.python, "-m", f"conveyor.{name}"],
                env={**env, "CONVEYOR_GRPC_ADDR": addr, "CONVEYOR_METRICS_ADDR": metrics_addr, **extra},
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                cwd=ROOT, start_new_session=True,
            )  # fmt: skip
        self.services[name] = Service(name, addr, proc, log_path, metrics_addr)

    def _wait_healthy(self, s: Service, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(s.addr) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                if s.proc.poll() is not None:
                    raise BenchError(
                        f"service {s.name} exited with {s.proc.returncode} while starting; "
                        f"last lines of {s.log_path}:\n{tail(s.log_path)}"
                    )
                with contextlib.suppress(grpc.RpcError):
                    r = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                    if r.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                if time.monotonic() > deadline:
                    raise BenchError(
                        f"service {s.name} not SERVING after {timeout:.0f} s; "
                        f"last lines of {s.log_path}:\n{tail(s.log_path)}"
                    )
                time.sleep(0.05)

    def check_alive(self) -> None:
        for s in self.services.values():
            if s.proc.poll() is not None:
                raise BenchError(f"service {s.name} died (exit {s.proc.returncode}); last lines:\n{tail(s.log_path)}")

    def stop(self) -> None:
        for s in reversed(list(self.services.values())):
            if s.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(s.proc.pid, signal.SIGTERM)
        for s in reversed(list(self.services.values())):
            try:
                s.proc.wait(15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(s.proc.pid, signal.SIGKILL)
                s.proc.wait(5)
        for closer in (self.db, self.r):
            if closer is not None:
                with contextlib.suppress(Exception):
                    closer.close()
        for server in (self.pg_server, self.redis_server):
            if server is not None:
                try:
                    server.close()
                except Exception as exc:  # keep stopping the rest
                    log(f"stopping {server.name} failed: {exc}")

    # -- helpers used by the measurements ----------------------------------------------------

    @property
    def producer_addr(self) -> str:
        return self.services["producer"].addr

    def redis_pid(self) -> int:
        assert self.r is not None
        return int(self.r.info("server")["process_id"])

    def postmaster_pid(self) -> int:
        assert self.pg_server is not None
        return int((self.pg_server.data_dir / "postmaster.pid").read_text().split()[0])

    def cpu_ticks(self) -> dict[str, int]:
        out = {name: tree_ticks(s.proc.pid) for name, s in self.services.items()}
        out["redis"] = tree_ticks(self.redis_pid())
        out["postgres"] = tree_ticks(self.postmaster_pid())
        return out

    def used_memory(self) -> int:
        assert self.r is not None
        return int(self.r.info("memory")["used_memory"])

    def succeeded(self) -> int:
        assert self.db is not None
        return int(self.db.execute("SELECT count(*) FROM jobs WHERE state = %s", (SUCCEEDED,)).fetchone()[0])

    def wait_committed(self, n: int, timeout: float) -> float:
        """Poll PostgreSQL until ``n`` jobs are SUCCEEDED; returns the time it saw them."""

        def check() -> bool:
            self.check_alive()
            return self.succeeded() >= n

        wait_until(check, f"{n} SUCCEEDED rows in PostgreSQL", timeout)
        return time.time()

    def wait_handled(self, n: int, timeout: float) -> float:
        """Wait until ``n`` jobs were added to the job stream and every one was acked (stream empty).

        Returns the Redis time of the last outcome event (the newest entry of the event stream).
        """
        assert self.r is not None

        def check() -> bool:
            self.check_alive()
            added = 0
            for stream in KEYS.bands:  # a priority mix spreads the jobs over the bands
                try:
                    info = self.r.xinfo_stream(stream)
                except redis.ResponseError:
                    continue
                if int(info["length"]):
                    return False
                added += int(info["entries-added"])
            return added >= n

        wait_until(check, f"{n} jobs handled (job streams drained)", timeout)
        last = self.r.xrevrange(KEYS.events, "+", "-", count=1)
        return int(last[0][0].split(b"-")[0]) / 1000 if last else time.time()

    def warmup(self, n: int = 100) -> int:
        """Run ``n`` jobs through the whole pipeline (queue discovered, scripts loaded, connections open)."""
        with dial(self.producer_addr) as channel:
            stub = producer_service_pb2_grpc.ProducerServiceStub(channel)
            jobs = [p.EnqueueRequest(queue=QUEUE, type=JOB_TYPE, payload_json=PAYLOAD) for _ in range(n)]
            stub.EnqueueBatch(p.EnqueueBatchRequest(jobs=jobs), timeout=30)
        if self.worker:
            self.wait_committed(n, 60)
        return n

    def set_loose_limits(self) -> None:
        """Limits on every scope, far above what one machine reaches: checked on every claim, never binding."""
        with dial(self.producer_addr) as channel:
            admin = admin_service_pb2_grpc.AdminServiceStub(channel)
            second = Duration(seconds=1)
            admin.SetRateLimit(limits_pb2.SetRateLimitRequest(queue=QUEUE, limit=100_000, period=second), timeout=10)
            admin.SetRateLimit(
                limits_pb2.SetRateLimitRequest(queue=QUEUE, each_key=True, limit=100_000, period=second), timeout=10
            )
            admin.SetConcurrencyLimit(limits_pb2.SetConcurrencyLimitRequest(queue=QUEUE, limit=100_000), timeout=10)
            admin.SetConcurrencyLimit(
                limits_pb2.SetConcurrencyLimitRequest(queue=QUEUE, each_key=True, limit=10_000), timeout=10
            )

    def results_caught_up(self) -> bool:
        """Whether the results service has read and acked every event of the queue."""
        assert self.r is not None
        try:
            groups = self.r.xinfo_groups(KEYS.events)
        except redis.ResponseError:
            return False
        g = next((g for g in groups if g["name"] == b"results"), None)
        return g is not None and int(g["pending"]) == 0 and g.get("lag") == 0

    def wait_results_caught_up(self, timeout: float) -> None:
        def check() -> bool:
            self.check_alive()
            return self.results_caught_up()

        wait_until(check, "the results service to ack every event", timeout, 0.05)

    def driver(self, mode: str, *args: str) -> Driver:
        # The stack's interpreter: with --b-python the driver's client code is the B side's too.
        return Driver(
            self, [self.python, str(HERE / "driver.py"), mode, "--addr", self.producer_addr, "--queue", QUEUE, *args]
        )


class Driver:
    """The load driver subprocess."""

    def __init__(self, stack: Stack, argv: list[str]) -> None:
        self.log_path = stack.workdir / "driver.log"
        self.err = self.log_path.open("ab")
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=self.err, stdin=subprocess.DEVNULL,
                                     start_new_session=True)  # fmt: skip

    def result(self, timeout: float) -> dict[str, Any]:
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise BenchError(f"driver did not finish within {timeout:.0f} s; log:\n{tail(self.log_path)}") from None
        finally:
            self.err.close()
        if self.proc.returncode != 0:
            raise BenchError(f"driver failed ({self.proc.returncode}):\n{tail(self.log_path)}")
        lines = [line for line in out.decode().splitlines() if line.startswith("{")]
        if not lines:
            raise BenchError(f"driver printed no result:\n{tail(self.log_path)}")
        return json.loads(lines[-1])

    def kill(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)


@contextlib.contextmanager
def driver_cleanup(d: Driver) -> Iterator[Driver]:
    try:
        yield d
    finally:
        d.kill()
        with contextlib.suppress(Exception):
            d.err.close()


def parse_env(spec: str | None) -> dict[str, str]:
    """``KEY=VALUE,KEY=VALUE`` as a dict (--b-env)."""
    out: dict[str, str] = {}
    for item in (spec or "").split(","):
        if item.strip():
            key, sep, value = item.strip().partition("=")
            if not sep:
                raise BenchError(f"--b-env: {item!r} is not KEY=VALUE")
            out[key] = value
    return out


def pg_counters(st: Stack, reset: bool = False) -> dict[str, Any]:
    """WAL position and the database's commit and tuple counters, to diff around a measurement
    (``reset``: also start pg_stat_statements afresh, with --profile)."""
    assert st.db is not None
    if st.profile and reset:
        st.db.execute("SELECT pg_stat_statements_reset()")
    st.db.execute("SELECT pg_stat_clear_snapshot()")
    row = st.db.execute(
        "SELECT pg_current_wal_lsn()::text, xact_commit, tup_inserted, tup_updated, tup_deleted"
        " FROM pg_stat_database WHERE datname = current_database()"
    ).fetchone()
    assert row is not None
    return dict(zip(("lsn", "commits", "inserted", "updated", "deleted"), row, strict=True))


def pg_per_job(st: Stack, before: dict[str, Any], after: dict[str, Any], n: int) -> dict[str, Any]:
    """PostgreSQL's work per job between two pg_counters: WAL bytes, rows written, commits; with --profile,
    the statements that cost most (pg_stat_statements: calls, ms and WAL bytes per job)."""
    assert st.db is not None
    row = st.db.execute("SELECT pg_wal_lsn_diff(%s, %s)", (after["lsn"], before["lsn"])).fetchone()
    assert row is not None
    # pg_stat_database counters are sent by the backends when their transactions end, not at once
    # (stats_fetch_consistency); they lag by at most a second or so, hence "about".
    out: dict[str, Any] = {
        "wal_bytes": round(float(row[0]) / n, 1),
        "commits": after["commits"] - before["commits"],
        "tuples_inserted": round((after["inserted"] - before["inserted"]) / n, 2),
        "tuples_updated": round((after["updated"] - before["updated"]) / n, 2),
    }
    if st.profile:
        stmts = st.db.execute(
            "SELECT regexp_replace(left(query, 90), '\\s+', ' ', 'g'), calls, total_exec_time, wal_bytes, rows"
            " FROM pg_stat_statements ORDER BY total_exec_time DESC LIMIT 8"
        ).fetchall()
        out["statements"] = [
            {"query": q, "calls": c, "exec_us_per_job": round(t * 1000 / n, 2),
             "wal_bytes_per_job": round(float(w) / n, 1), "rows_per_job": round(r / n, 2)}
            for q, c, t, w, r in stmts
        ]  # fmt: skip
    return out


def start_profiles(st: Stack, outdir: str | None, label: str) -> list[tuple[str, subprocess.Popen[bytes], Path]]:
    """With --profile DIR: py-spy record (collapsed stacks, 250 Hz) of each Python service until stop_profiles."""
    if not outdir:
        return []
    spy = Path(PY).with_name("py-spy")
    if not spy.exists():
        raise BenchError(f"--profile needs py-spy beside {PY} (make venv installs it with the dev group)")
    Path(outdir).mkdir(parents=True, exist_ok=True)
    spies = []
    for name, s in st.services.items():
        path = Path(outdir) / f"{label}-{name}.txt"
        proc = subprocess.Popen(
            [str(spy), "record", "--pid", str(s.proc.pid), "--rate", "250", "--format", "raw", "--output", str(path)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        spies.append((name, proc, path))
    time.sleep(0.3)  # py-spy attaches before the load starts
    return spies


def stop_profiles(spies: list[tuple[str, subprocess.Popen[bytes], Path]]) -> dict[str, str]:
    for _, proc, _ in spies:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGINT)
    for _, proc, _ in spies:
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return {name: str(path) for name, _, path in spies}


def cpu_report(before: dict[str, int], after: dict[str, int], driver_cpu: float, bench_cpu: float, n: int) -> dict:
    cpu = {k: (after[k] - before[k]) / CLK for k in before}
    cpu["driver"] = driver_cpu
    cpu["bench"] = bench_cpu
    cpu["total"] = sum(cpu.values())
    return {
        "cpu_s": {k: round(v, 3) for k, v in cpu.items()},
        "cpu_us_per_job": {k: round(v / n * 1e6, 2) for k, v in cpu.items()},
    }


class Scraper:
    """Scrapes every service's /metrics every ``interval`` s while the e2e run lasts (0: never), as
    Prometheus would: the queue gauges are read from Redis at scrape time, so scraping has a cost."""

    def __init__(self, stack: Stack, interval: float) -> None:
        self.urls = [f"http://{s.metrics_addr}/metrics" for s in stack.services.values() if s.metrics_addr != "off"]
        self.interval = interval
        self.scrapes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            for url in self.urls:
                with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=5) as r:
                    r.read()
                    self.scrapes += 1

    def __enter__(self) -> Scraper:
        if self.interval > 0:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)


class OtlpSink:
    """A tiny OTLP/gRPC trace collector: accepts every export and counts the spans (tracing's figure)."""

    def __init__(self) -> None:
        from concurrent import futures

        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

        sink = self
        self.spans = 0

        class Servicer(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request: Any, context: Any) -> Any:
                sink.spans += sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)
                return trace_service_pb2.ExportTraceServiceResponse()

        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Servicer(), self.server)
        port = self.server.add_insecure_port("127.0.0.1:0")
        self.addr = f"127.0.0.1:{port}"

    def __enter__(self) -> OtlpSink:
        self.server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.stop(0)


# -- measurements ------------------------------------------------------------------------------


class Bench:
    def __init__(self, a: argparse.Namespace, workdir: Path) -> None:
        self.a = a
        self.workdir = workdir
        self.count = 0

    def stack(self, **kw: Any) -> Stack:
        kw["python"] = kw.get("python") or self.a.a_python or PY
        self.count += 1
        d = self.workdir / f"stack{self.count:02d}"
        d.mkdir()
        return Stack(d, **kw)

    def controls(self) -> list[dict]:
        """e2e with a priority mix, 100 rate keys, and limits configured on every scope but not binding."""
        rows = self.e2e(controls=True)
        return [dict(rows[0], metric="e2e_controls_jobs_per_s")]

    def metrics_off(self) -> list[dict]:
        """e2e with every service's /metrics off (CONVEYOR_METRICS_ADDR=off): paired with e2e (metrics on)."""
        rows = self.e2e(extra_env={"CONVEYOR_METRICS_ADDR": "off"}, tag="metrics-off")
        return [dict(rows[0], metric="e2e_metrics_off_jobs_per_s")]

    def tracing(self) -> list[dict]:
        """e2e with tracing on: every job traced (the SDK's default sampler), spans sent as OTLP over gRPC
        (batched, the SDK's defaults) to a sink in this process that counts them."""
        with OtlpSink() as sink:
            env = {
                "OTEL_TRACES_EXPORTER": "otlp",
                "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{sink.addr}",
                "OTEL_EXPORTER_OTLP_INSECURE": "true",
            }
            rows = self.e2e(extra_env=env, tag="tracing")
            # The services flush their batches at exit (the stack is stopped by now).
            with contextlib.suppress(BenchError):
                wait_until(lambda: sink.spans >= 3 * self.a.n, "spans", 30, 0.1)
            spans = sink.spans
        return [dict(rows[0], metric="e2e_tracing_jobs_per_s", spans_exported=spans)]

    def e2e_b(self) -> list[dict]:
        """e2e with --b-env added to every service's environment: the B side of a paired before/after."""
        rows = self.e2e(extra_env=parse_env(self.a.b_env), tag="b", python=self.a.b_python)
        label = " ".join(x for x in (self.a.b_env, self.a.b_python and f"python={self.a.b_python}") if x)
        return [
            dict(rows[0], metric="e2e_b_jobs_per_s", b_env=label),
            dict(rows[1], metric="projection_lag_b_ms"),
        ]

    def e2e(
        self,
        controls: bool = False,
        extra_env: dict[str, str] | None = None,
        tag: str = "a",
        python: str | None = None,
    ) -> list[dict]:
        n = self.a.n
        env = parse_env(self.a.a_env) if extra_env is None else extra_env
        python = python or self.a.a_python or PY
        with self.stack(worker=True, extra_env=env, profile=bool(self.a.profile), python=python) as st:
            warm = st.warmup(100)
            extra: tuple[str, ...] = ()
            if controls:
                st.set_loose_limits()
                extra = ("--controls",)
            time.sleep(0.5)  # idle and ready: the worker is blocked waiting for work
            assert st.r is not None
            st.r.config_resetstat()
            pg0 = pg_counters(st, reset=True)
            spies = start_profiles(st, self.a.profile, f"{'controls' if controls else 'e2e'}-{tag}-{self.count:02d}")
            cpu0, bench0 = st.cpu_ticks(), time.process_time()
            metrics_on = (env or {}).get("CONVEYOR_METRICS_ADDR") != "off"
            with (
                Scraper(st, self.a.scrape if metrics_on else 0.0) as scraper,
                driver_cleanup(st.driver("batch", "--n", str(n), "--batch", "100",
                                         "--inflight", str(self.a.inflight), *extra)) as d,
            ):  # fmt: skip
                t_handled = st.wait_handled(warm + n, timeout=300)
                t_seen = st.wait_committed(warm + n, timeout=300)
                cpu1, bench1 = st.cpu_ticks(), time.process_time()
                res = d.result(60)
            profiles = stop_profiles(spies)
            pg_calls = pg_per_job(st, pg0, pg_counters(st), n)
            redis_calls = redis_commands(st.r, n)
            t0 = res["t0"]
            assert st.db is not None
            # Exact commit instants: track_commit_timestamp gives each row's committing transaction's time.
            row = st.db.execute(
                """
                SELECT count(*),
                       extract(epoch FROM max(pg_xact_commit_timestamp(xmin)))::float8,
                       percentile_cont(ARRAY[0.5, 0.99]) WITHIN GROUP (ORDER BY lag_ms),
                       max(lag_ms),
                       count(DISTINCT xmin::text)
                FROM (SELECT xmin,
                             extract(epoch FROM pg_xact_commit_timestamp(xmin))::float8 * 1000
                               - last_event_ms AS lag_ms
                      FROM jobs WHERE state = %s AND created_at >= to_timestamp(%s)) s
                """,
                # created_at is the job id's millisecond: compare from t0's millisecond, not after it.
                (SUCCEEDED, math.floor(t0 * 1000) / 1000),
            ).fetchone()
            done, t_commit, (lag50, lag99), lag_max, txns = row
        if done != n:
            raise BenchError(f"e2e: {done} of {n} timed jobs SUCCEEDED in PostgreSQL")
        e2e = {
            "metric": "e2e_jobs_per_s",
            "value": n / (t_commit - t0),
            "handlers_jobs_per_s": n / (t_handled - t0),
            "enqueue_jobs_per_s": res["jobs_per_s"],
            "n": n,
            "inflight": res["inflight"],
            "enqueue_s": res["t1"] - t0,
            "handlers_done_s": t_handled - t0,
            "committed_s": t_commit - t0,
            "committed_poll_s": t_seen - t0,
            "lost": n - done,
            "scrapes": scraper.scrapes,
            "redis_per_job": redis_calls,
            "pg_per_job": pg_calls,
            **({"a_env": self.a.a_env} if self.a.a_env and extra_env is None else {}),
            **({"python": python} if python != PY else {}),
            **({"profiles": profiles} if profiles else {}),
            **cpu_report(cpu0, cpu1, res["cpu_s"], bench1 - bench0, n),
        }
        lag = {
            "metric": "projection_lag_ms",
            "p50": lag50,
            "p99": lag99,
            "max": lag_max,
            "n": done,
            "commits": txns,
            "method": "per job: pg_xact_commit_timestamp(xmin) of its SUCCEEDED row - ms of the outcome "
            "event's Redis stream id (jobs.last_event_ms), during the e2e run",
        }
        return [e2e, lag]

    def enqueue_only(
        self, metric: str, mode: str, n: int, *args: str, env: dict[str, str] | None = None, python: str | None = None
    ) -> list[dict]:
        # --a-env applies here too (e.g. CONVEYOR_PRODUCER_PROCESSES=2 for the unary figures).
        env = parse_env(self.a.a_env) if env is None else env
        with self.stack(worker=False, extra_env=env, python=python) as st:
            # Steady state: the results service knows the queue and is idle (it projects the QUEUED
            # events during the measurement, as it would in production).
            st.warmup(100)
            st.wait_results_caught_up(30)
            spies = start_profiles(st, self.a.profile, f"{mode}-{self.count:02d}")
            cpu0, bench0 = st.cpu_ticks(), time.process_time()
            with driver_cleanup(st.driver(mode, "--n", str(n), *args)) as d:
                res = d.result(300)
            cpu1, bench1 = st.cpu_ticks(), time.process_time()
            profiles = stop_profiles(spies)
        row = {"metric": metric, "value": res["jobs_per_s"], "n": n,
               **{k: res[k] for k in ("inflight", "batch", "idem", "created", "channels") if k in res},
               **({"profiles": profiles} if profiles else {}),
               **cpu_report(cpu0, cpu1, res["cpu_s"], bench1 - bench0, n)}  # fmt: skip
        if "created" in res and res["created"] != n:
            raise BenchError(f"{metric}: only {res['created']} of {n} jobs were created")
        return [row]

    def bulk(self) -> list[dict]:
        return self.enqueue_only("bulk_jobs_per_s", "batch", self.a.n, "--batch", "100", "--inflight",
                                 str(self.a.inflight), "--idem", "--warmup", "100")  # fmt: skip

    def single(self) -> list[dict]:
        return self.enqueue_only("single_jobs_per_s", "single", min(self.a.n, 5000), "--warmup", "20")

    def conc(self) -> list[dict]:
        return self.enqueue_only("concurrent64_jobs_per_s", "conc", self.a.n, "--inflight", "64", "--warmup", "64",
                                 "--conc-channels", str(self.a.conc_channels))  # fmt: skip

    def client(self) -> list[dict]:
        return self.enqueue_only("client64_jobs_per_s", "client", self.a.n, "--inflight", "64", "--warmup", "64")

    def client_b(self) -> list[dict]:
        """client with --b-env / --b-python (services and driver): the B side of a paired before/after."""
        rows = self.enqueue_only("client64_b_jobs_per_s", "client", self.a.n, "--inflight", "64", "--warmup", "64",
                                 env=parse_env(self.a.b_env), python=self.a.b_python)  # fmt: skip
        label = " ".join(x for x in (self.a.b_env, self.a.b_python and f"python={self.a.b_python}") if x)
        return [dict(rows[0], b_env=label)]

    def latency(self) -> list[dict]:
        rate, duration = 200.0, self.a.latency_s
        n = int(rate * duration)
        with self.stack(worker=True) as st:
            warm = st.warmup(100)
            time.sleep(0.5)
            out = st.workdir / "sent.json"
            with driver_cleanup(st.driver("rate", "--rate", str(rate), "--duration", str(duration),
                                          "--out", str(out))) as d:  # fmt: skip
                res = d.result(duration + 120)
            st.wait_handled(warm + n, timeout=60)
            sent = dict(json.loads(out.read_text()))
            assert st.r is not None
            active: dict[str, float] = {}
            created: dict[str, float] = {}
            start = "-"
            while True:
                page = st.r.xrange(KEYS.events, start, "+", count=5000)
                for _entry_id, fields in page:
                    # Stored events leave the job id out: the entry's j field and the queue give it.
                    job_id = f"{QUEUE}/{fields[b'j'].decode()}"
                    if job_id not in sent:
                        continue
                    ev = event_pb2.JobEvent.FromString(fields[b"e"])
                    if ev.type == event_pb2.EVENT_TYPE_ACTIVE and job_id not in active:
                        active[job_id] = ev.time.seconds + ev.time.nanos / 1e9
                    elif ev.type == event_pb2.EVENT_TYPE_QUEUED:  # its time is the job's created_at
                        created[job_id] = ev.time.seconds + ev.time.nanos / 1e9
                if len(page) < 5000:
                    break
                start = "(" + page[-1][0].decode()
        lat = [(active[j] - t) * 1000 for j, t in sent.items() if j in active]
        srv = [(active[j] - created[j]) * 1000 for j in active if j in created]
        if not lat:
            raise BenchError("latency: no ACTIVE events found for the jobs sent")
        return [{
            "metric": "latency_ms",
            "p50": pct(lat, 50), "p99": pct(lat, 99), "max": max(lat),
            "server_p50": pct(srv, 50) if srv else None, "server_p99": pct(srv, 99) if srv else None,
            "n": n, "lost": n - len(lat), "rate": rate, "achieved_rate": res["jobs_per_s"],
            "method": "client time just before the unary Enqueue -> ACTIVE event time (Redis TIME at claim) "
            "in the queue's event stream; server_*: producer created_at -> ACTIVE",
        }]  # fmt: skip

    def _mem(self, idem: bool) -> dict:
        n = self.a.mem_n
        with self.stack(worker=False) as st:
            m0 = st.used_memory()
            args = ["--n", str(n), "--batch", "100", "--inflight", str(self.a.inflight)]
            with driver_cleanup(st.driver("batch", *args, *(["--idem"] if idem else []))) as d:
                res = d.result(300)
            m1 = st.used_memory()
            assert st.r is not None
            caught = True
            try:
                st.wait_results_caught_up(120)
            except BenchError as exc:
                log(str(exc))
                caught = False
            m2 = st.used_memory()
            breakdown = key_breakdown(st.r)
        if res["created"] != n:
            raise BenchError(f"mem: only {res['created']} of {n} jobs were created")
        return {
            "metric": "bytes_per_waiting_job_idem" if idem else "bytes_per_waiting_job",
            "value": (m2 - m0) / n,
            "right_after_enqueue": (m1 - m0) / n,
            "results_caught_up": caught,
            "n": n,
            "idem": idem,
            "breakdown_bytes_per_job": {k: round(v / n, 1) for k, v in breakdown.items()},
        }

    def mem(self) -> list[dict]:
        return [self._mem(False), self._mem(True)]

    def finish(self) -> list[dict]:
        n, retention = self.a.finish_n, 5.0
        with self.stack(worker=True, retention_s=retention) as st:
            assert st.r is not None
            cold = st.used_memory()
            # The baseline is a warm, empty queue: scripts loaded, streams and groups made,
            # connections open, and the warm-up jobs gone again after the retention. What is
            # above it after N more jobs is what grows with the number of jobs ever run.
            warm = st.warmup(100)
            wait_until(lambda: not st.r.hlen(KEYS.state) and not st.r.xlen(KEYS.events),
                       "warm-up jobs to expire", retention + self.a.finish_wait, 0.5)  # fmt: skip
            time.sleep(1.0)
            m0, k0 = st.used_memory(), st.r.dbsize()
            with driver_cleanup(st.driver("batch", "--n", str(n), "--batch", "100",
                                          "--inflight", str(self.a.inflight))) as d:  # fmt: skip
                st.wait_handled(warm + n, timeout=300)
                st.wait_committed(warm + n, timeout=300)
                d.result(60)
            t_done = time.monotonic()
            m_peak = st.used_memory()

            def per_job_left() -> dict[str, int]:
                left = {
                    "state": int(st.r.hlen(KEYS.state)),
                    "events": int(st.r.xlen(KEYS.events)),
                    "done": int(st.r.zcard(KEYS.done)),
                    "jobs": sum(int(st.r.xlen(b)) for b in KEYS.bands if st.r.exists(b)),
                }
                left["idem_keys"] = sum(1 for _ in st.r.scan_iter(match=KEYS.idempotency("*"), count=1000))
                return left

            waited_ok = True
            try:
                wait_until(lambda: not any(per_job_left().values()), "per-job Redis data to expire",
                           retention + self.a.finish_wait, 0.5)  # fmt: skip
            except BenchError:
                waited_ok = False
            time.sleep(0.5)
            m1, k1 = st.used_memory(), st.r.dbsize()
            left = per_job_left()
            waited = time.monotonic() - t_done
            breakdown = key_breakdown(st.r)
            after_poke = None
            if not waited_ok:
                # Diagnostic: does one more job (new traffic) set expiry going?
                st.warmup(1)
                st.wait_committed(warm + n + 1, 30)
                time.sleep(1.5)
                after_poke = {**per_job_left(), "above_baseline": st.used_memory() - m0}
        above = m1 - m0
        return [{
            "metric": "memory_after_finish",
            "value": above,
            "n": n,
            "retention_s": retention,
            "waited_s": round(waited, 1),
            "baseline_bytes": m0,
            "cold_start_bytes": cold,
            "peak_above_baseline": m_peak - m0,
            "keys_before": k0,
            "keys_after": k1,
            "per_job_left": left,
            "key_bytes": breakdown,
            "after_one_more_job": after_poke,
            "back_to_baseline": waited_ok and not any(left.values()) and above < 256 * 1024,
        }]  # fmt: skip

    def watch(self) -> list[dict]:
        jobs, per_job, channels, delay_s = 200, 5, 10, 6
        drivers = self.a.watch_drivers
        payload = json.dumps({"seconds": 3, "steps": 10}).encode()
        # --a-env reaches it too (CONVEYOR_PRODUCER_PROCESSES=2: the streams spread over two processes).
        with self.stack(worker=True, concurrency=jobs, extra_env=parse_env(self.a.a_env)) as st:
            st.warmup(100)
            time.sleep(0.5)
            with dial(st.producer_addr) as channel:
                stub = producer_service_pb2_grpc.ProducerServiceStub(channel)
                req = p.EnqueueRequest(queue=QUEUE, type="demo.sleep", payload_json=payload)
                req.delay.FromSeconds(delay_s)
                t_enq = time.time()
                resp = stub.EnqueueBatch(p.EnqueueBatchRequest(jobs=[req] * jobs), timeout=30)
            run_at = t_enq + delay_s
            ids = [r.job_id for r in resp.results]
            jobs_file = st.workdir / "watch_jobs.json"
            jobs_file.write_text(json.dumps(ids))
            outs = [st.workdir / f"watch_latencies_{i}.json" for i in range(drivers)]
            cpu0, bench0 = st.cpu_ticks(), time.process_time()
            with contextlib.ExitStack() as cleanup:
                ds = [
                    cleanup.enter_context(driver_cleanup(st.driver(
                        "watch", "--jobs-file", str(jobs_file), "--out", str(out), "--per-job", str(per_job),
                        "--channels", str(max(1, channels // drivers)), "--shard", str(i), "--shards", str(drivers),
                        "--timeout", "120",
                    )))
                    for i, out in enumerate(outs)
                ]  # fmt: skip
                # The streams are open and replayed before the jobs run (opened_before_run_at says
                # so); CPU from here on is what delivering live events costs.
                time.sleep(max(0.0, run_at - 0.3 - time.time()))
                spies = start_profiles(st, self.a.profile, f"watch-{self.count:02d}")
                cpu_live0 = st.cpu_ticks()
                results = [d.result(180) for d in ds]
            cpu1, bench1 = st.cpu_ticks(), time.process_time()
            stop_profiles(spies)
            st.check_alive()
        pairs = [pair for out in outs for pair in json.loads(out.read_text())]
        if not pairs:
            raise BenchError(f"watch: no live events received ({results})")
        lat = [ms for ms, _ in pairs]
        total = {k: sum(r[k] for r in results) for k in ("streams", "streams_opened", "streams_ended_final",
                                                         "events_received", "events_replayed", "events_live",
                                                         "errors", "cpu_s")}  # fmt: skip
        firsts = [r["last_first_message"] for r in results]
        delivered = total["events_received"]
        cpu = cpu_report(cpu0, cpu1, total["cpu_s"], bench1 - bench0, delivered)
        live_s = {k: (cpu1[k] - cpu_live0[k]) / CLK for k in cpu_live0}
        by_type = {}
        for name, number in event_pb2.EventType.items():
            xs = [ms for ms, t in pairs if t == number]
            if xs:
                by_type[name.removeprefix("EVENT_TYPE_")] = {"n": len(xs), "p50": pct(xs, 50), "p99": pct(xs, 99)}
        return [{
            "metric": "watch_delivery_ms",
            "p50": pct(lat, 50), "p99": pct(lat, 99), "max": max(lat), "by_type": by_type,
            "streams": total["streams"], "streams_opened": total["streams_opened"],
            "streams_ended_final": total["streams_ended_final"],
            "opened_before_run_at": all(f is not None and f < run_at for f in firsts),
            "events_received": delivered, "events_live": total["events_live"],
            "events_replayed": total["events_replayed"], "errors": total["errors"],
            "first_errors": [e for r in results for e in r["first_errors"]][:5],
            "jobs": jobs, "per_job": per_job, "channels": channels, "delay_s": delay_s, "drivers": drivers,
            "a_env": self.a.a_env,
            "watch_wall_s": max(r["t1"] for r in results) - min(r["t0"] for r in results),
            "producer_cpu_us_per_event": cpu["cpu_us_per_job"]["producer"],
            "producer_live_cpu_us_per_event": round(live_s["producer"] / total["events_live"] * 1e6, 2),
            "driver_cpu_us_per_event": cpu["cpu_us_per_job"]["driver"],
            "cpu_s": cpu["cpu_s"], "cpu_us_per_event": cpu["cpu_us_per_job"],
            "live_cpu_s": {k: round(v, 3) for k, v in live_s.items()},
            "method": "one worker (concurrency 200), 200 demo.sleep jobs (3 s, 10 steps) enqueued with a "
            f"{delay_s} s delay; {drivers} driver process(es) open 5 Watch streams per job (1,000 in all, on the "
            f"producer, {self.a.a_env or 'one process'}) over {channels} channels in all; "
            "latency = client time.time() on receipt - Redis "
            "time of the event id, live events only (event time later than the stream's first message); CPU "
            "over the drivers' run per event received, and the producer's CPU from 0.3 s before the jobs run "
            "per live event (producer_live_cpu_us_per_event)",
        }]  # fmt: skip


def redis_commands(r: redis.Redis, n: int) -> dict[str, Any]:
    """Redis commands per job since the last CONFIG RESETSTAT (the scripts' inner calls included),
    and each script call's size: where Redis's CPU goes."""
    stats = r.info("commandstats")
    rows = {name.removeprefix("cmdstat_"): v for name, v in stats.items()}
    inner = {c: v for c, v in rows.items() if c not in ("evalsha", "eval", "info", "config|resetstat")}
    top = sorted(inner.items(), key=lambda cv: -cv[1]["calls"])[:12]
    scripts = rows.get("evalsha", {"calls": 0, "usec": 0})
    return {
        "calls": round(sum(v["calls"] for v in inner.values()) / n, 2),
        "script_calls": round(scripts["calls"] / n, 3),
        "script_usec": round(scripts["usec"] / n, 1),
        "top": {c: round(v["calls"] / n, 2) for c, v in top},
        # Redis's own time per job by command (a script's inner calls count in both it and them).
        "usec": {c: round(v["usec"] / n, 2) for c, v in sorted(rows.items(), key=lambda cv: -cv[1]["usec"])[:14]},
    }


def key_breakdown(r: redis.Redis) -> dict[str, int]:
    """MEMORY USAGE summed per key family (the idempotency keys grouped as one)."""
    out: dict[str, int] = {}
    keys = list(r.scan_iter(match="conveyor:*", count=1000))
    for i in range(0, len(keys), 1000):
        chunk = keys[i : i + 1000]
        pipe = r.pipeline(transaction=False)
        for k in chunk:
            pipe.execute_command("MEMORY", "USAGE", k, "SAMPLES", "0")
        for k, used in zip(chunk, pipe.execute(), strict=True):
            name = k.decode()
            if ":idem:" in name:
                name = name[: name.index(":idem:")] + ":idem:*"
            out[name] = out.get(name, 0) + int(used or 0)
    return out


# -- BullMQ ------------------------------------------------------------------------------------


def run_bullmq(a: argparse.Namespace, only: list[str]) -> list[dict]:
    names = list(dict.fromkeys(BULLMQ_NAMES[w] for w in only if w in BULLMQ_NAMES))
    if not names:
        return []
    if not BASELINE.exists():
        raise BenchError(f"{BASELINE} not found")
    cmd = [PY, str(BASELINE), "--reps", "1", "--n", str(a.n), "--only", ",".join(names)]
    log("bullmq: " + " ".join(cmd[1:]))
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT, check=False)
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0:
        raise BenchError(f"baseline.py failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return rows


# -- the table ---------------------------------------------------------------------------------


@dataclass
class Figure:
    label: str
    conveyor: tuple[str, str]  # (metric, key)
    bullmq: tuple[str, str] | None
    target: str
    #: (conveyor median, bullmq median or None) -> pass? (None: informational)
    check: Callable[[float, float | None], bool | None]
    unit: str = ""


def _ratio_at_least(k: float) -> Callable[[float, float | None], bool | None]:
    return lambda c, b: None if b is None else c / b >= k


FIGURES = [
    Figure(
        "end to end, jobs/s (-> PG commit)",
        ("e2e_jobs_per_s", "value"),
        ("e2e_jobs_per_s", "value"),
        ">= 2x BullMQ",
        _ratio_at_least(2.0),
    ),
    Figure(
        "  e2e to last handler done (info)",
        ("e2e_jobs_per_s", "handlers_jobs_per_s"),
        ("e2e_jobs_per_s", "value"),
        "info",
        lambda c, b: None,
    ),
    Figure(
        "  e2e B (--b-env), jobs/s (-> PG commit)",
        ("e2e_b_jobs_per_s", "value"),
        ("e2e_jobs_per_s", "value"),
        "info (paired below)",
        lambda c, b: None,
    ),
    Figure("  PG projection lag p99 of B, ms", ("projection_lag_b_ms", "p99"), None, "info", lambda c, b: None),
    Figure(
        "  e2e with controls on (prio mix, 100 keys)",
        ("e2e_controls_jobs_per_s", "value"),
        ("e2e_jobs_per_s", "value"),
        "within 10% of e2e",
        lambda c, b: None,
    ),
    Figure(
        "batch enqueue (100, idem keys), jobs/s",
        ("bulk_jobs_per_s", "value"),
        ("bulk_jobs_per_s", "value"),
        ">= 3x BullMQ",
        _ratio_at_least(3.0),
    ),
    Figure(
        "64 concurrent callers, Python client, jobs/s",
        ("client64_jobs_per_s", "value"),
        ("concurrent64_jobs_per_s", "value"),
        ">= 1x BullMQ",
        _ratio_at_least(1.0),
    ),
    Figure(
        "  client B (--b-env / --b-python), jobs/s",
        ("client64_b_jobs_per_s", "value"),
        ("concurrent64_jobs_per_s", "value"),
        "info (paired below)",
        lambda c, b: None,
    ),
    Figure(
        "  same, plain stubs (no coalescing)",
        ("concurrent64_jobs_per_s", "value"),
        ("concurrent64_jobs_per_s", "value"),
        "info",
        lambda c, b: None,
    ),
    Figure(
        "unary Enqueue one at a time, jobs/s",
        ("single_jobs_per_s", "value"),
        ("single_jobs_per_s", "value"),
        ">= 0.5x BullMQ",
        _ratio_at_least(0.5),
    ),
    Figure("enqueue -> handler start p50, ms", ("latency_ms", "p50"), ("latency_ms", "p50"), "info", lambda c, b: None),
    Figure(
        "enqueue -> handler start p99, ms",
        ("latency_ms", "p99"),
        ("latency_ms", "p99"),
        "<= BullMQ and <= 2 ms",
        lambda c, b: c <= 2.0 and (b is None or c <= b),
    ),
    Figure(
        "Redis bytes per waiting job",
        ("bytes_per_waiting_job", "value"),
        ("bytes_per_waiting_job", "value"),
        "<= 365 B",
        lambda c, b: c <= 365,
    ),
    Figure(
        "  same, every job with an idem key",
        ("bytes_per_waiting_job_idem", "value"),
        None,
        "info (<= 365 B?)",
        lambda c, b: None,
    ),
    Figure(
        "Redis bytes above baseline after finish",
        ("memory_after_finish", "value"),
        None,
        "back to baseline",
        lambda c, b: None,
    ),
    Figure("PG projection lag p50, ms", ("projection_lag_ms", "p50"), None, "info", lambda c, b: None),
    Figure("PG projection lag p99, ms", ("projection_lag_ms", "p99"), None, "< 1000 ms", lambda c, b: c < 1000),
    Figure("Watch delivery p50, ms (1,000 streams)", ("watch_delivery_ms", "p50"), None, "info", lambda c, b: None),
    Figure(
        "Watch delivery p99, ms (1,000 streams)",
        ("watch_delivery_ms", "p99"),
        None,
        "< 50 ms p99 with 1,000 streams",
        lambda c, b: c < 50,
    ),
    Figure(
        "  producer CPU us per Watch event",
        ("watch_delivery_ms", "producer_cpu_us_per_event"),
        None,
        "info",
        lambda c, b: None,
    ),
    Figure(
        "  the same, live events only",
        ("watch_delivery_ms", "producer_live_cpu_us_per_event"),
        None,
        "info",
        lambda c, b: None,
    ),
    Figure(
        "  driver CPU us per Watch event",
        ("watch_delivery_ms", "driver_cpu_us_per_event"),
        None,
        "info",
        lambda c, b: None,
    ),
]


def fmt(x: float | None) -> str:
    if x is None:
        return "-"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:,.2f}"


def median_of(rows: list[dict], peer: str, metric: str, key: str) -> tuple[float, float, float, int] | None:
    xs = [r[key] for r in rows if r.get("peer") == peer and r.get("metric") == metric and r.get(key) is not None]
    if not xs:
        return None
    return statistics.median(xs), min(xs), max(xs), len(xs)


def controls_pairs(rows: list[dict]) -> list[tuple[float, float]]:
    """Per repetition with both figures: (controls / plain e2e throughput, plain / controls CPU per job)."""
    by_rep: dict[int, dict[str, dict]] = {}
    for r in rows:
        if r.get("peer") == "conveyor" and r.get("metric") in ("e2e_jobs_per_s", "e2e_controls_jobs_per_s"):
            by_rep.setdefault(r["rep"], {})[r["metric"]] = r
    return [
        (
            got["e2e_controls_jobs_per_s"]["value"] / got["e2e_jobs_per_s"]["value"],
            got["e2e_jobs_per_s"]["cpu_us_per_job"]["total"]
            / got["e2e_controls_jobs_per_s"]["cpu_us_per_job"]["total"],
        )
        for got in by_rep.values()
        if len(got) == 2
    ]


def e2e_pairs(rows: list[dict], metric: str) -> list[tuple[float, float]]:
    """Per repetition with both: (``metric`` / metrics-off e2e throughput, metrics-off / ``metric`` CPU per job)."""
    base = "e2e_metrics_off_jobs_per_s"
    by_rep: dict[int, dict[str, dict]] = {}
    for r in rows:
        if r.get("peer") == "conveyor" and r.get("metric") in (base, metric):
            by_rep.setdefault(r["rep"], {})[r["metric"]] = r
    return [
        (
            got[metric]["value"] / got[base]["value"],
            got[base]["cpu_us_per_job"]["total"] / got[metric]["cpu_us_per_job"]["total"],
        )
        for got in by_rep.values()
        if len(got) == 2
    ]


def print_pairs(rows: list[dict]) -> None:
    """Issue 11 item 5: metrics on (tracing off) within 5 % of metrics off; tracing on beside it."""
    for metric, label, target in (
        ("e2e_jobs_per_s", "Metrics on / off", ", target >= 0.95"),
        ("e2e_tracing_jobs_per_s", "Tracing on (metrics on) / metrics off", ""),
    ):
        pairs = e2e_pairs(rows, metric)
        if not pairs:
            continue
        speed, cpu = [r for r, _ in pairs], [c for _, c in pairs]
        print(
            f"{label}, e2e paired by repetition ({len(pairs)} pairs){target}: throughput "
            f"{statistics.median(speed):.3f} median ({min(speed):.2f}-{max(speed):.2f}); "
            f"CPU per job off / on {statistics.median(cpu):.3f} median ({min(cpu):.2f}-{max(cpu):.2f})"
        )


def b_pairs(
    rows: list[dict], a_metric: str = "e2e_jobs_per_s", b_metric: str = "e2e_b_jobs_per_s"
) -> list[tuple[dict, dict]]:
    """Per repetition with both: (A row, B row)."""
    by_rep: dict[int, dict[str, dict]] = {}
    for r in rows:
        if r.get("peer") == "conveyor" and r.get("metric") in (a_metric, b_metric):
            by_rep.setdefault(r["rep"], {})[r["metric"]] = r
    return [(g[a_metric], g[b_metric]) for g in by_rep.values() if len(g) == 2]


def _ratios(xs: list[float]) -> str:
    return f"{statistics.median(xs):6.3f}  ({min(xs):.2f}-{max(xs):.2f})"


def print_pair_ratios(pairs: list[tuple[dict, dict]], figure: str, what: str = "") -> None:
    """The header, throughput and CPU-per-job lines of a paired B / A comparison."""
    b_env = pairs[0][1].get("b_env")
    a_env = " ".join(x for x in (pairs[0][0].get("a_env"), pairs[0][0].get("python")) if x) or "defaults"
    print(f"\nB ({b_env}) / A ({a_env}){what}, paired by repetition ({len(pairs)} pairs): median (min-max) of ratios")
    print(f"  {figure + ' throughput':24s}{_ratios([b['value'] / a['value'] for a, b in pairs])}")
    for name in pairs[0][0]["cpu_us_per_job"]:
        ratios = [b["cpu_us_per_job"][name] / max(a["cpu_us_per_job"][name], 1e-9) for a, b in pairs]
        print(f"  CPU/job {name:16s}{_ratios(ratios)}"
              f"   A {statistics.median(a['cpu_us_per_job'][name] for a, _ in pairs):7.1f}"
              f"  B {statistics.median(b['cpu_us_per_job'][name] for _, b in pairs):7.1f} us/job")  # fmt: skip


def print_b_pairs(rows: list[dict]) -> None:
    client_pairs = b_pairs(rows, "client64_jobs_per_s", "client64_b_jobs_per_s")
    if client_pairs:
        print_pair_ratios(client_pairs, "client", ", 64 callers through the client")
    pairs = b_pairs(rows)
    if not pairs:
        return
    print_pair_ratios(pairs, "e2e")
    lags = {(r["rep"], r["metric"]): r for r in rows if r.get("metric") in ("projection_lag_ms", "projection_lag_b_ms")}
    for key in ("wal_bytes", "tuples_inserted", "tuples_updated"):
        ratios = [b["pg_per_job"][key] / max(a["pg_per_job"][key], 1e-9) for a, b in pairs]
        print(f"  PG {key:21s}{_ratios(ratios)}"
              f"   A {statistics.median(a['pg_per_job'][key] for a, _ in pairs):7.1f}"
              f"  B {statistics.median(b['pg_per_job'][key] for _, b in pairs):7.1f} per job")  # fmt: skip
    lag_pairs = [
        (lags[(a["rep"], "projection_lag_ms")]["p99"], lags[(b["rep"], "projection_lag_b_ms")]["p99"])
        for a, b in pairs
        if (a["rep"], "projection_lag_ms") in lags and (b["rep"], "projection_lag_b_ms") in lags
    ]
    if lag_pairs:
        print(f"  projection lag p99 ms   A {statistics.median(x for x, _ in lag_pairs):7.0f}"
              f"  B {statistics.median(y for _, y in lag_pairs):7.0f}")  # fmt: skip


def print_table(rows: list[dict], with_bullmq: bool) -> None:
    header = f"{'figure':41s} {'Conveyor':>10s} {'(min-max)':>19s} {'BullMQ':>10s} {'ratio':>7s}  {'target':24s} result"
    print("\nMedians over repetitions (Conveyor min-max in brackets); ratio = Conveyor / BullMQ, same run")
    print(header)
    print("-" * len(header))
    for f in FIGURES:
        c = median_of(rows, "conveyor", *f.conveyor)
        b = median_of(rows, "bullmq-node", *f.bullmq) if f.bullmq else None
        if c is None:
            continue
        cm = c[0]
        bm = b[0] if b else None
        ratio = f"{cm / bm:.2f}x" if bm else "-"
        verdict = f.check(cm, bm)
        if f.conveyor[0] == "e2e_controls_jobs_per_s":  # against Conveyor's own e2e of the same repetition
            pairs = controls_pairs(rows)
            verdict = statistics.median(r for r, _ in pairs) >= 0.9 if pairs else None
        if f.conveyor[0] == "memory_after_finish":
            ok = [r.get("back_to_baseline") for r in rows if r.get("metric") == "memory_after_finish"]
            verdict = all(ok) if ok else None
        if f.conveyor == ("watch_delivery_ms", "p99"):  # every stream must also have ended with the final event
            ws = [r for r in rows if r.get("peer") == "conveyor" and r.get("metric") == "watch_delivery_ms"]
            verdict = verdict and all(r["streams_ended_final"] == r["streams"] for r in ws)
        if verdict is None and f.target != "info" and bm is None and f.bullmq:
            result = "n/a (no BullMQ figure)"
        else:
            result = {True: "PASS", False: "FAIL", None: ""}[verdict]
        spread = f"({fmt(c[1])}-{fmt(c[2])})" if c[3] > 1 else ""
        print(f"{f.label:41s} {fmt(cm):>10s} {spread:>19s} {fmt(bm):>10s} {ratio:>7s}  {f.target:24s} {result}")
    if not with_bullmq:
        print("(run with --with-bullmq for the BullMQ column and ratios)")
    if any(r.get("metric") == "e2e_metrics_off_jobs_per_s" for r in rows):
        print()
        print_pairs(rows)
    print_b_pairs(rows)
    pairs = controls_pairs(rows)
    if pairs:
        speed, cpu = [r for r, _ in pairs], [c for _, c in pairs]
        print(
            f"\nControls on / off, paired by repetition ({len(pairs)} pairs; target >= 0.90): throughput "
            f"{statistics.median(speed):.3f} median ({min(speed):.2f}-{max(speed):.2f}); "
            f"CPU per job off / on {statistics.median(cpu):.3f} median ({min(cpu):.2f}-{max(cpu):.2f})"
        )

    watch = [
        r for r in rows if r.get("peer") == "conveyor" and r.get("metric") == "watch_delivery_ms" and "by_type" in r
    ]
    if watch:
        # The jobs run in lockstep: QUEUED+ACTIVE start and PROGRESS 100 %+SUCCEEDED end every job at
        # one instant (2,000 deliveries each); the other steps drift apart. Where the p99 comes from:
        print("\nWatch delivery by event type (median over repetitions): p50 / p99 ms")
        for name in watch[0]["by_type"]:
            got = [r["by_type"][name] for r in watch if name in r["by_type"]]
            print(
                f"  {name:10s} {statistics.median(g['p50'] for g in got):8.1f} / "
                f"{statistics.median(g['p99'] for g in got):8.1f}   ({got[0]['n']} events)"
            )

    e2e = [r for r in rows if r.get("peer") == "conveyor" and r.get("metric") == "e2e_jobs_per_s" and "cpu_s" in r]
    if e2e:
        print("\nCPU during end to end (median over repetitions): seconds, us of CPU per job, and the budget")
        print('(bench/README.md, "CPU budget per job, per process": what 2x BullMQ asks of two cores)')
        names = list(e2e[0]["cpu_s"])
        total_us = statistics.median(r["cpu_us_per_job"]["total"] for r in e2e)
        for name in names:
            s = statistics.median(r["cpu_s"][name] for r in e2e)
            us = statistics.median(r["cpu_us_per_job"][name] for r in e2e)
            share = f"{us / total_us * 100:5.1f} %" if total_us and name != "total" else "       "
            budget = CPU_BUDGET_US.get(name)
            over = f"budget {budget:5.1f} us  ({us / budget:4.1f}x)" if budget else ""
            print(f"  {name:10s} {s:8.2f} s {us:9.1f} us/job  {share}  {over}")
        pg = [r["pg_per_job"] for r in e2e if "pg_per_job" in r]
        if pg:
            print(
                f"  PostgreSQL per job: {statistics.median(x['wal_bytes'] for x in pg):.0f} WAL bytes, "
                f"{statistics.median(x['tuples_inserted'] for x in pg):.2f} tuples inserted, "
                f"{statistics.median(x['tuples_updated'] for x in pg):.2f} updated; "
                f"{statistics.median(x['commits'] for x in pg):.0f} commits in all"
            )
        walls = statistics.median(r["committed_s"] for r in e2e)
        print(f"  wall      {walls:8.2f} s   (first enqueue -> last commit); {os.cpu_count()} CPUs")


# -- main --------------------------------------------------------------------------------------


def environment() -> dict:
    def cmd(*argv: str) -> str:
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return "?"

    pg_bin = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"))
    return {
        "metric": "environment",
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "redis": cmd("redis-server", "--version"),
        "postgres": cmd(str(pg_bin[-1]), "--version") if pg_bin else "?",
        "redis_config": "appendonly yes, appendfsync everysec, save '', maxmemory-policy noeviction",
        "postgres_config": "fsync on, synchronous_commit on (defaults), track_commit_timestamp on",
        "services": "producer, results, worker (concurrency 50, demo.noop) as `python -m`; log level warning",
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20000, help="jobs per throughput measurement")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument(
        "--only",
        # The B sides of paired figures need --b-env or --b-python: asked for by name only.
        default=",".join(w for w in ALL if w not in ("e2e_b", "client_b")),
        help="comma list of " + ",".join(ALL),
    )
    ap.add_argument("--json", help="append every measurement to this JSON-lines file")
    ap.add_argument("--with-bullmq", action="store_true", help="also run ../shared/peers/baseline.py, interleaved")
    ap.add_argument(
        "--scrape", type=float, default=1.0, help="e2e: scrape every service's /metrics every S s (0: never)"
    )
    ap.add_argument(
        "--pair",
        action="store_true",
        help="e2e with metrics on, off, and tracing on, paired (= --only e2e,metrics_off,tracing)",
    )
    ap.add_argument("--inflight", type=int, default=4, help="EnqueueBatch calls in flight (e2e, bulk, mem)")
    ap.add_argument("--mem-n", type=int, default=100_000, help="waiting jobs for bytes_per_waiting_job")
    ap.add_argument("--finish-n", type=int, default=None, help="jobs for memory_after_finish (default --n)")
    ap.add_argument("--finish-wait", type=float, default=25.0, help="s to wait beyond the retention")
    ap.add_argument("--latency-s", type=float, default=10.0, help="duration of the 200 jobs/s latency run")
    ap.add_argument("--keep", action="store_true", help="keep the logs directory")
    ap.add_argument(
        "--a-env",
        default="",
        help="e2e, controls and the enqueue-only figures: KEY=VALUE[,KEY=VALUE] added to every service's "
        "environment (the A side)",
    )
    ap.add_argument(
        "--b-env",
        default="",
        help="e2e_b: KEY=VALUE[,KEY=VALUE] added to every service's environment, paired with e2e per repetition",
    )
    ap.add_argument(
        "--a-python",
        default="",
        help="every figure: the interpreter the services run under (another checkout's .venv/bin/python runs "
        "that checkout's code); default this one",
    )
    ap.add_argument(
        "--b-python",
        default="",
        help="e2e_b: the interpreter of the B side, e.g. the .venv/bin/python of a git worktree at the commit "
        "before a change: a paired before/after of code, not settings",
    )
    ap.add_argument(
        "--profile",
        metavar="DIR",
        help="e2e, watch and the enqueue-only figures: py-spy record every Python service into DIR (collapsed stacks) "
        "and read pg_stat_statements "
        "(slows what it watches: for where the CPU goes, not for speed figures)",
    )
    ap.add_argument("--conc-channels", type=int, default=1, help="conc: connections the 64 callers share (default 1)")
    ap.add_argument(
        "--watch-drivers", type=int, default=1, help="watch: client processes sharing the 1,000 streams (default 1)"
    )
    a = ap.parse_args()
    a.finish_n = a.finish_n or a.n
    if a.pair:
        a.only = "e2e,metrics_off,tracing"
    only = [w.strip() for w in a.only.split(",") if w.strip()]
    bad = [w for w in only if w not in ALL]
    if bad:
        ap.error(f"unknown figures {bad}; choose from {','.join(ALL)}")
    for paired in ("e2e_b", "client_b"):
        if paired in only and not (a.b_env or a.b_python):
            ap.error(f"{paired} needs --b-env KEY=VALUE[,...] or --b-python PATH")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)

    workdir = Path(tempfile.mkdtemp(prefix="conveyor-bench-"))
    bench = Bench(a, workdir)
    rows: list[dict] = []
    failures = 0
    started = time.monotonic()

    def emit(row: dict) -> None:
        row.setdefault("ts", time.time())
        rows.append(row)
        print(json.dumps(row), flush=True)
        if a.json:
            with open(a.json, "a") as f:
                f.write(json.dumps(row) + "\n")

    emit({**environment(), "peer": "conveyor", "argv": sys.argv[1:]})
    try:
        for rep in range(a.reps):
            if a.with_bullmq:
                b_only = [w for w in only if not (w in ONCE and rep > 0)]
                try:
                    for row in run_bullmq(a, b_only):
                        row.update(peer="bullmq-node", rep=rep)
                        emit(row)
                except (BenchError, subprocess.TimeoutExpired) as exc:
                    failures += 1
                    emit({"metric": "error", "peer": "bullmq-node", "rep": rep, "error": str(exc)})
            order = list(only)
            for first, other in (("e2e", "controls"), ("e2e", "e2e_b"), ("client", "client_b")):
                if rep % 2 and first in order and other in order:
                    # Paired figures alternate which goes first, so a drift of the machine favours neither.
                    i, j = order.index(first), order.index(other)
                    order[i], order[j] = order[j], order[i]
            paired = [w for w in order if w in ("e2e", "metrics_off", "tracing")]
            if len(paired) > 1:
                # The same for e2e with metrics on / off / tracing: each goes first in turn.
                turn = paired[rep % len(paired) :] + paired[: rep % len(paired)]
                slots = iter(turn)
                order = [next(slots) if w in paired else w for w in order]
            for what in order:
                if what in ONCE and rep > 0:
                    continue
                log(f"rep {rep + 1}/{a.reps}: {what} ({time.monotonic() - started:.0f} s so far)")
                try:
                    for row in getattr(bench, what)():
                        row.update(peer="conveyor", rep=rep)
                        emit(row)
                except Exception as exc:  # report, go on with the next figure
                    failures += 1
                    traceback.print_exc()
                    emit({"metric": "error", "peer": "conveyor", "figure": what, "rep": rep, "error": str(exc)})
    except KeyboardInterrupt:
        log("interrupted")
    finally:
        print_table(rows, a.with_bullmq)
        print(
            f"\n{time.monotonic() - started:.0f} s in all; logs in {workdir}"
            if (failures or a.keep)
            else f"\n{time.monotonic() - started:.0f} s in all"
        )
        if not failures and not a.keep:
            import shutil

            shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
