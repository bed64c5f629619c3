#!/usr/bin/env python3
"""Chaos run: jobs arriving, handlers failing, workers SIGKILLed and production faults drawn at random.

    .venv/bin/python bench/chaos.py [--jobs 20000] [--workers 3] [--fail-rate 0.05] [--kill-every 2-6]
        [--faults all] [--fault-every 2-5] [--fault-hold 3-6] [--rate 200] [--keys 20] [--key-cap 5]
        [--retention 10] [--seed N] [--deadline 900] [--stall 60] [--json FILE] [--keep]

Starts a private stack (as bench/run.py: redis-server with AOF, PostgreSQL with fsync on,
`python -m conveyor.results` connecting as the non-superuser role `conveyor_app`, and
`conveyor.producer`), plus N workers running `bench/chaos_handlers.py` (`chaos.work`: sleeps
0-200 ms, fails on every attempt when its payload says so). The driver decides from the seed
which jobs fail and enqueues them with `EnqueueBatch` at --rate jobs/s (idempotency keys, so a
batch a fault refused is sent again safely), spread over per-key capped rate keys. Meanwhile a
killer SIGKILLs a random worker every 2-6 s and starts a replacement, and a chaos loop draws one
fault at a time from --faults (Redis full, made a replica, a BUSY script, SCRIPT FLUSH, CLIENT
KILL, CLIENT PAUSE WRITE; PostgreSQL read-only, privileges revoked, the jobs table locked,
stopped and restarted), holds it and undoes it, printing each with its time and duration.
Until every job is final in PostgreSQL (or the deadline, or a stall).

Then it checks, from PostgreSQL, Redis, `ResultsService.ListJobEvents` and gRPC health: one row
per job and no other; every row final with the right outcome; nothing pending, queued or parked
in Redis; the dead-letter stream right; every job's history right; every process SERVING; no
concurrency-cap slot leaked nor ever exceeded; no worker crashed; Redis memory back to its
baseline after the retention. Prints a summary table and PASS/FAIL per check; exits 1 when a
check fails. bench/README.md ("Chaos run") says how each fault is made and each check measured.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import psycopg
import redis
import redis.asyncio
from google.protobuf.duration_pb2 import Duration
from grpc_health.v1 import health_pb2, health_pb2_grpc

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from run import PG_SETTINGS, BenchError, Stack, log, tail  # noqa: E402

from conveyor.common.client import ConveyorClient  # noqa: E402
from conveyor.common.devstack.servers import PostgresServer, RedisServer, free_port  # noqa: E402
from conveyor.common.keys import WORKER_GROUP, queue_keys  # noqa: E402
from conveyor.v1 import (  # noqa: E402
    event_pb2,
    job_pb2,
    producer_service_pb2,
    producer_service_pb2_grpc,
    results_service_pb2,
    results_service_pb2_grpc,
)

PY = sys.executable
T = TypeVar("T")
QUEUE = "chaos"
KEYS = queue_keys(QUEUE)
JOB_TYPE = "chaos.work"
HANDLERS = "bench.chaos_handlers:handlers"
BATCH = 500
ENQUEUE_INFLIGHT = 4
HISTORY_INFLIGHT = 32
VISIBILITY_S = 2
MAX_DELIVERIES = 10
MAX_ATTEMPTS = 3
#: The role the services connect to PostgreSQL as: not a superuser, so REVOKE and read-only bite.
APP_ROLE = "conveyor_app"
#: Every fault the chaos loop draws from (worker_kill is the separate killer's schedule).
FAULTS = (
    "redis_full",
    "redis_replica",
    "redis_busy",
    "script_flush",
    "client_kill",
    "client_pause",
    "pg_readonly",
    "pg_revoke",
    "pg_lock",
    "pg_restart",
    "worker_kill",
)
#: EnqueueBatch answers the driver retries (same idempotency keys, so a retry never duplicates).
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED)
#: A worker exiting with this code asks to be restarted (the Supervisor's limit): the pool does, as an orchestrator.
EXIT_RESTART_ME = 75

QUEUED, ACTIVE, SUCCEEDED, FAILED, DEAD = 1, 3, 5, 6, 7  # conveyor.v1.JobState
FINAL_STATES = (SUCCEEDED, FAILED, DEAD)
ET = event_pb2
FINAL_EVENTS = {ET.EVENT_TYPE_SUCCEEDED, ET.EVENT_TYPE_FAILED, ET.EVENT_TYPE_DEAD_LETTERED, ET.EVENT_TYPE_CANCELLED}
EVENT_FOR_STATE = {SUCCEEDED: ET.EVENT_TYPE_SUCCEEDED, FAILED: ET.EVENT_TYPE_FAILED, DEAD: ET.EVENT_TYPE_DEAD_LETTERED}
STATE_NAMES = {v: k.removeprefix("JOB_STATE_") for k, v in job_pb2.JobState.items()}
EVENT_NAMES = {v: k.removeprefix("EVENT_TYPE_") for k, v in event_pb2.EventType.items()}


# -- workers ----------------------------------------------------------------------------------


@dataclass
class Worker:
    worker_id: str
    addr: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    started: float
    killed_at: float | None = None


@dataclass
class Pool:
    """The worker processes: started, killed and replaced by the chaos driver."""

    stack: ChaosStack
    workdir: Path
    concurrency: int
    workers: list[Worker] = field(default_factory=list)
    next_id: int = 1

    def env(self) -> dict[str, str]:
        assert self.stack.redis_server is not None
        return dict(
            os.environ,
            REDIS_URL=self.stack.redis_server.url,
            PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p),
            PYTHONUNBUFFERED="1",
            CONVEYOR_LOG_LEVEL="warning",
            CONVEYOR_LOG_FORMAT="json",
            CONVEYOR_QUEUES=QUEUE,
            CONVEYOR_HANDLERS=HANDLERS,
            CONVEYOR_CONCURRENCY=str(self.concurrency),
            CONVEYOR_VISIBILITY_TIMEOUT_SECONDS=str(VISIBILITY_S),
            CONVEYOR_MAX_DELIVERIES=str(MAX_DELIVERIES),
            CONVEYOR_RETENTION_SECONDS=str(self.stack.retention_s or 300),
        )

    def spawn(self) -> Worker:
        worker_id = f"chaos-w{self.next_id}"
        self.next_id += 1
        addr = f"127.0.0.1:{free_port()}"
        log_path = self.workdir / f"{worker_id}.log"
        with log_path.open("ab") as out:
            proc = subprocess.Popen(
                [PY, "-m", "conveyor.worker"],
                env={**self.env(), "CONVEYOR_WORKER_ID": worker_id, "CONVEYOR_GRPC_ADDR": addr},
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                cwd=ROOT, start_new_session=True,
            )  # fmt: skip
        w = Worker(worker_id, addr, proc, log_path, time.monotonic())
        self.workers.append(w)
        return w

    @property
    def alive(self) -> list[Worker]:
        return [w for w in self.workers if w.killed_at is None and w.proc.poll() is None]

    def died_on_their_own(self) -> list[Worker]:
        return [w for w in self.workers if w.killed_at is None and w.proc.poll() is not None]

    def kill(self, w: Worker) -> None:
        w.killed_at = time.monotonic()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(w.proc.pid, signal.SIGKILL)
        w.proc.wait(10)

    def stop_all(self) -> None:
        live = [w for w in self.workers if w.proc.poll() is None]
        for w in live:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(w.proc.pid, signal.SIGTERM)
        for w in live:
            try:
                w.proc.wait(15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(w.proc.pid, signal.SIGKILL)
                w.proc.wait(5)


async def wait_healthy(w: Worker, within_s: float) -> None:
    deadline = time.monotonic() + within_s
    async with grpc.aio.insecure_channel(w.addr) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            if w.proc.poll() is not None:
                raise BenchError(
                    f"worker {w.worker_id} exited with {w.proc.returncode} while starting:\n{tail(w.log_path)}"
                )
            with contextlib.suppress(grpc.RpcError):
                r = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            if time.monotonic() > deadline:
                raise BenchError(f"worker {w.worker_id} not SERVING after {within_s:.0f} s:\n{tail(w.log_path)}")
            await asyncio.sleep(0.05)


# -- the stack: services on a non-superuser PostgreSQL role ------------------------------------


@dataclass
class ChaosStack(Stack):
    """bench/run.py's stack, with the results service connecting as ``APP_ROLE`` (not a superuser).

    The role owns the database (so the results service's migrations create and own the tables),
    but it is no superuser: ``REVOKE`` on its table and ``default_transaction_read_only`` bite.
    The driver itself reads and injects faults as the superuser ``conveyor``.
    """

    app_url: str = ""

    def start(self) -> None:
        self.redis_server = RedisServer(appendonly=True)
        self.redis_server.start()
        self.pg_server = PostgresServer(settings=PG_SETTINGS)
        self.pg_server.start(timeout=60)
        with psycopg.connect(self.pg_server.url, autocommit=True, connect_timeout=10) as admin:
            admin.execute(f"CREATE ROLE {APP_ROLE} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE")
            admin.execute(f"ALTER DATABASE conveyor OWNER TO {APP_ROLE}")
            admin.execute(f"GRANT CREATE ON SCHEMA public TO {APP_ROLE}")
        self.app_url = self.pg_server.url.replace("://conveyor@", f"://{APP_ROLE}@", 1)
        env = dict(
            os.environ,
            REDIS_URL=self.redis_server.url,
            DATABASE_URL=self.app_url,
            CONVEYOR_LOG_LEVEL="warning",
            CONVEYOR_LOG_FORMAT="json",
            PYTHONUNBUFFERED="1",
        )
        if self.retention_s is not None:
            env["CONVEYOR_RETENTION_SECONDS"] = str(self.retention_s)
        results_addr = f"127.0.0.1:{free_port()}"
        self._spawn("results", env, results_addr)
        self._spawn("producer", env, f"127.0.0.1:{free_port()}", CONVEYOR_RESULTS_ADDR=results_addr)
        for s in self.services.values():
            self._wait_healthy(s, 60.0)
        self.r = redis.Redis.from_url(self.redis_server.url, socket_timeout=5, socket_connect_timeout=5)
        self.db = self.observe_db()

    def observe_db(self) -> psycopg.Connection[Any]:
        """The driver's superuser connection, reconnected when a fault broke it; short timeouts."""
        if self.db is not None and not self.db.closed and not self.db.broken:
            return self.db
        if self.db is not None:
            with contextlib.suppress(Exception):
                self.db.close()
            self.db = None
        assert self.pg_server is not None
        self.db = psycopg.connect(
            self.pg_server.url,
            autocommit=True,
            connect_timeout=3,
            options="-c statement_timeout=5000 -c lock_timeout=500",
        )
        return self.db


# -- the faults ---------------------------------------------------------------------------------


def parse_faults(spec: str) -> list[str]:
    """``--faults``: "all", "none", or a comma list of names; "-name" removes one (``all,-pg_restart``)."""
    chosen: list[str] = []
    for raw in spec.split(","):
        item = raw.strip()
        if not item:
            continue
        drop = item.startswith("-")
        name = item.removeprefix("-")
        names = list(FAULTS) if name == "all" else [] if name == "none" else [name]
        for n in names:
            if n not in FAULTS:
                raise ValueError(f"unknown fault {n!r}; known: {', '.join(FAULTS)}")
            if drop:
                chosen = [c for c in chosen if c != n]
            elif n not in chosen:
                chosen.append(n)
    return chosen


@dataclass
class FaultDeck:
    """Draws faults at random, each enabled one once per round (a shuffled deck, refilled when empty).

    So a short run still sees every kind, in an order the seed decides.
    """

    names: list[str]
    rng: random.Random
    deck: list[str] = field(default_factory=list)

    def draw(self) -> str:
        if not self.names:
            raise ValueError("no fault to draw")
        if not self.deck:
            self.deck = list(self.names)
            self.rng.shuffle(self.deck)
        return self.deck.pop()


def parse_range(text: str, what: str) -> tuple[float, float]:
    """ "2-6" -> (2.0, 6.0); "3" -> (3.0, 3.0)."""
    lo, _, hi = text.partition("-")
    try:
        a, b = float(lo), float(hi or lo)
    except ValueError:
        raise ValueError(f"{what} {text!r}: expected MIN-MAX seconds, e.g. 2-6") from None
    if not 0 < a <= b:
        raise ValueError(f"{what} {text!r}: expected 0 < MIN <= MAX")
    return a, b


def mib(n: float) -> str:
    return f"{n / 2**20:.2f} MiB"


@dataclass
class Injector:
    """Each fault: drive Redis or PostgreSQL into it with its own commands, hold it, and undo it.

    Every method returns what it did (for the log and the summary) and always undoes the fault,
    also when the run ends meanwhile (``done``: the hold is cut short).
    """

    stack: ChaosStack
    done: asyncio.Event

    async def hold(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.done.wait(), seconds)

    def redis(self) -> redis.asyncio.Redis:
        assert self.stack.redis_server is not None
        return redis.asyncio.Redis.from_url(self.stack.redis_server.url, socket_timeout=15)

    async def pg(self, autocommit: bool = True) -> psycopg.AsyncConnection[Any]:
        assert self.stack.pg_server is not None
        return await psycopg.AsyncConnection.connect(self.stack.pg_server.url, autocommit=autocommit, connect_timeout=5)

    # Redis

    async def redis_full(self, hold: float) -> str:
        r = self.redis()
        try:
            before = (await r.config_get("maxmemory"))["maxmemory"]
            used = int((await r.info("memory"))["used_memory"])
            limit = used + 64 * 1024
            await r.config_set("maxmemory-policy", "noeviction")
            await r.config_set("maxmemory", limit)
            try:
                await self.hold(hold)
            finally:
                await r.config_set("maxmemory", before)
            return f"maxmemory {mib(limit)} (used {mib(used)} + 64 KiB), noeviction; then maxmemory {before}"
        finally:
            await r.aclose()

    async def redis_replica(self, hold: float) -> str:
        # A replica of a port nobody listens on: it keeps its data and answers READONLY to writes,
        # as a primary demoted by a failover does. (A replica of a real, empty server would wipe it.)
        port = free_port()
        r = self.redis()
        try:
            await r.execute_command("REPLICAOF", "127.0.0.1", str(port))
            try:
                await self.hold(hold)
            finally:
                await r.execute_command("REPLICAOF", "NO", "ONE")
            return f"REPLICAOF 127.0.0.1 {port} (nobody listens), then REPLICAOF NO ONE"
        finally:
            await r.aclose()

    async def redis_busy(self, hold: float) -> str:
        assert self.stack.redis_server is not None
        url = self.stack.redis_server.url
        r = self.redis()
        threshold = (await r.config_get("busy-reply-threshold"))["busy-reply-threshold"]
        await r.config_set("busy-reply-threshold", 1000)
        blocker = redis.Redis.from_url(url, socket_timeout=None)
        answer: list[str] = []

        def spin() -> None:
            try:
                blocker.eval("local i = 0 while true do i = i + 1 end", 0)
            except redis.RedisError as exc:  # "Script killed by user"
                answer.append(str(exc))

        thread = threading.Thread(target=spin, daemon=True)
        thread.start()
        killer = redis.Redis.from_url(url, socket_timeout=5)
        kills = 0
        try:
            await self.hold(1.0 + hold)  # the threshold, then BUSY for `hold`
        finally:

            def kill() -> int:
                n = 0
                while thread.is_alive():
                    with contextlib.suppress(redis.RedisError):
                        n += 1
                        killer.script_kill()
                    thread.join(0.05)
                return n

            kills = await asyncio.to_thread(kill)
            killer.close()
            blocker.close()
            await r.config_set("busy-reply-threshold", threshold)
            await r.aclose()
        return (
            f"EVAL busy loop, busy-reply-threshold 1000 ms, SCRIPT KILL after {1 + hold:.1f} s "
            f"({kills} tries): {answer[:1]}"
        )

    async def script_flush(self, hold: float) -> str:
        r = self.redis()
        try:
            for _ in range(5):
                await r.script_flush()
                await asyncio.sleep(0.1)
            return "SCRIPT FLUSH x5, 0.1 s apart"
        finally:
            await r.aclose()

    async def client_kill(self, hold: float) -> str:
        r = self.redis()
        try:
            killed = []
            for _ in range(3):
                killed.append(int(await r.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")))
                await asyncio.sleep(0.5)
            return f"CLIENT KILL TYPE normal x3, 0.5 s apart: {killed} connections"
        finally:
            await r.aclose()

    async def client_pause(self, hold: float) -> str:
        r = self.redis()
        try:
            await r.execute_command("CLIENT", "PAUSE", "5000", "WRITE")
            await asyncio.sleep(5.0)  # the pause ends by itself; never cut short
            return "CLIENT PAUSE 5000 WRITE"
        finally:
            await r.aclose()

    # PostgreSQL

    async def terminate_app_sessions(self, conn: psycopg.AsyncConnection[Any]) -> int:
        cur = await conn.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE usename = %s", (APP_ROLE,)
        )
        row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def pg_readonly(self, hold: float) -> str:
        conn = await self.pg()
        try:
            await conn.execute("ALTER DATABASE conveyor SET default_transaction_read_only = on")
            first = await self.terminate_app_sessions(conn)
            try:
                await self.hold(hold)
            finally:
                await conn.execute("ALTER DATABASE conveyor RESET default_transaction_read_only")
                # Sessions opened meanwhile stay read-only: end them too, as a failover back does.
                second = await self.terminate_app_sessions(conn)
            return (
                f"ALTER DATABASE SET default_transaction_read_only = on, {first} {APP_ROLE} sessions terminated; "
                f"then RESET, {second} terminated"
            )
        finally:
            await conn.close()

    async def pg_revoke(self, hold: float) -> str:
        conn = await self.pg()
        try:
            await conn.execute(f"REVOKE ALL ON TABLE jobs FROM {APP_ROLE}")
            try:
                await self.hold(hold)
            finally:
                await conn.execute(f"GRANT ALL ON TABLE jobs TO {APP_ROLE}")
            return f"REVOKE ALL ON jobs FROM {APP_ROLE}, then GRANT ALL"
        finally:
            await conn.close()

    async def pg_lock(self, hold: float) -> str:
        conn = await self.pg(autocommit=False)
        try:
            t = time.monotonic()
            async with conn.transaction():
                await conn.execute("LOCK TABLE jobs IN ACCESS EXCLUSIVE MODE")
                waited = time.monotonic() - t
                await asyncio.sleep(10.0)  # the brief's 10 s, never cut short
            return f"LOCK TABLE jobs IN ACCESS EXCLUSIVE MODE held 10 s (granted after {waited:.2f} s)"
        finally:
            await conn.close()

    async def pg_restart(self, hold: float) -> str:
        server = self.stack.pg_server
        assert server is not None
        t = time.monotonic()
        await asyncio.to_thread(server.stop)
        stopped = time.monotonic() - t
        try:
            await self.hold(hold)
        finally:
            await asyncio.to_thread(server.start, 60.0)
        return f"PostgreSQL stopped (fast shutdown, {stopped:.1f} s), down {hold:.1f} s, started again"


# -- Redis and PostgreSQL observations -------------------------------------------------------


def redis_queue_state(stack: ChaosStack) -> dict[str, Any]:
    """Lengths, pending entries, delayed/parked jobs, and how far the results service is behind."""
    r = stack.r
    assert r is not None
    out: dict[str, Any] = {"xlen": 0, "pending": 0, "bands": {}}
    for band, key in enumerate(KEYS.bands, start=1):
        if not r.exists(key):
            continue
        xlen = int(r.xlen(key))
        try:
            pending = int(r.xpending(key, WORKER_GROUP)["pending"])
        except Exception:  # no group yet
            pending = 0
        out["xlen"] += xlen
        out["pending"] += pending
        if xlen or pending:
            out["bands"][band] = {"xlen": xlen, "pending": pending}
    out["delayed"] = int(r.zcard(KEYS.delayed))
    out["parked"] = int(r.hlen(KEYS.parked))
    out["results_pending"], out["results_lag"] = None, None
    with contextlib.suppress(Exception):
        for g in r.xinfo_groups(KEYS.events):
            if g["name"] == b"results":
                out["results_pending"], out["results_lag"] = int(g["pending"]), g.get("lag")
    return out


def settled(s: dict[str, Any]) -> bool:
    return (
        s["xlen"] == 0 and s["pending"] == 0 and s["delayed"] == 0 and s["parked"] == 0
        and s["results_pending"] == 0 and s["results_lag"] == 0
    )  # fmt: skip


def held_by(stack: ChaosStack, worker_id: str) -> int:
    """Entries ``worker_id`` holds (claimed, no outcome yet) across the job streams."""
    r = stack.r
    assert r is not None
    held = 0
    for key in KEYS.bands:
        with contextlib.suppress(Exception):
            for c in r.xinfo_consumers(key, WORKER_GROUP):
                if c["name"].decode() == worker_id:
                    held += int(c["pending"])
    return held


def pg_states(stack: ChaosStack) -> Counter[int] | None:
    """Rows per state, or None while PostgreSQL cannot answer (a fault is on: stopped, locked...)."""
    try:
        db = stack.observe_db()
        rows = db.execute("SELECT state, count(*) FROM jobs WHERE queue = %s GROUP BY state", (QUEUE,)).fetchall()
    except psycopg.Error:
        return None
    return Counter({int(s): int(n) for s, n in rows})


# -- the run ---------------------------------------------------------------------------------


@dataclass
class Run:
    a: argparse.Namespace
    stack: ChaosStack
    pool: Pool
    fail: dict[str, bool] = field(default_factory=dict)  # job id -> meant to fail
    index: dict[str, int] = field(default_factory=dict)  # job id -> i
    kills: list[dict[str, Any]] = field(default_factory=list)
    faults: list[dict[str, Any]] = field(default_factory=list)
    restarts: list[dict[str, Any]] = field(default_factory=list)  # workers that exited 75 and were restarted
    history_errors: Counter[str] = field(default_factory=Counter)  # ListJobEvents status -> jobs
    crashes: list[dict[str, Any]] = field(default_factory=list)  # workers that exited otherwise (restarted too)
    enqueue_retries: Counter[str] = field(default_factory=Counter)  # status code -> EnqueueBatch retries
    replayed: int = 0  # jobs a retried EnqueueBatch found already made (created = false)
    max_running_per_key: int = 0  # sampled SCARD of the per-key running sets
    peak_memory: int = 0  # sampled INFO memory used_memory
    t0: float = 0.0  # wall clock of the start of the run (enqueue and chaos start together)
    t_enqueued: float = 0.0
    t_final_seen: float | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)
    errors: list[str] = field(default_factory=list)
    starting: set[asyncio.Task[None]] = field(default_factory=set)

    async def enqueue(self) -> None:
        a = self.a
        rng = random.Random(a.seed)
        retry = job_pb2.RetryPolicy(max_attempts=MAX_ATTEMPTS, backoff=job_pb2.BACKOFF_EXPONENTIAL, jitter=0.1)
        retry.base.FromMilliseconds(50)
        retry.cap.FromMilliseconds(200)
        window = Duration()
        window.FromSeconds(int(a.idempotency_window))
        plan: list[tuple[int, bool, bytes]] = []
        for i in range(a.jobs):
            fail = rng.random() < a.fail_rate
            payload = {"i": i, "fail": fail, "sleep_ms": round(rng.uniform(0, a.sleep_ms), 3)}
            plan.append((i, fail, json.dumps(payload, separators=(",", ":")).encode()))
        sem = asyncio.Semaphore(ENQUEUE_INFLIGHT)
        seen: dict[str, int] = {}
        async with grpc.aio.insecure_channel(self.stack.producer_addr) as channel:
            stub = producer_service_pb2_grpc.ProducerServiceStub(channel)

            async def send(chunk: list[tuple[int, bool, bytes]]) -> None:
                req = producer_service_pb2.EnqueueBatchRequest(
                    jobs=[
                        producer_service_pb2.EnqueueRequest(
                            queue=QUEUE, type=JOB_TYPE, payload_json=p, retry=retry,
                            idempotency_key=f"chaos-{a.seed}-{i}", idempotency_window=window,
                            rate_key=f"k{i % a.keys}" if a.keys else "",
                        )
                        for i, _, p in chunk
                    ]
                )  # fmt: skip
                # Redis faults refuse a batch (UNAVAILABLE, RESOURCE_EXHAUSTED): send it again, as a
                # client should; the idempotency keys make the retry return the jobs already made.
                deadline = time.monotonic() + a.enqueue_retry_s
                delay = 0.1
                while True:
                    try:
                        async with sem:
                            resp = await stub.EnqueueBatch(req, timeout=15)
                        break
                    except grpc.aio.AioRpcError as err:
                        if err.code() not in RETRYABLE or time.monotonic() > deadline:
                            raise BenchError(
                                f"EnqueueBatch of jobs {chunk[0][0]}-{chunk[-1][0]}: {err.code().name} {err.details()}"
                            ) from None
                        self.enqueue_retries[err.code().name] += 1
                        await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                        delay = min(delay * 2, 2.0)
                if len(resp.results) != len(chunk):
                    raise BenchError(f"EnqueueBatch answered {len(resp.results)} results for {len(chunk)} jobs")
                for (i, fail, _), res in zip(chunk, resp.results, strict=True):
                    if not res.job_id:
                        raise BenchError(f"job {i} has no id: {res}")
                    if res.job_id in seen and seen[res.job_id] != i:
                        raise BenchError(f"job id {res.job_id} returned for jobs {seen[res.job_id]} and {i}")
                    if not res.created:
                        self.replayed += 1
                    seen[res.job_id] = i
                    self.fail[res.job_id] = fail
                    self.index[res.job_id] = i

            # Paced (--rate): jobs keep arriving while the faults come and go, as production traffic does.
            size = max(1, min(BATCH, int(a.rate / 5))) if a.rate else BATCH
            start = time.monotonic()

            async def paced(k: int) -> None:
                if a.rate:
                    await asyncio.sleep(max(0.0, start + k / a.rate - time.monotonic()))
                await send(plan[k : k + size])

            await asyncio.gather(*(paced(k) for k in range(0, len(plan), size)))
            self.t_enqueued = time.time()
        retries = sum(self.enqueue_retries.values())
        log(
            f"enqueued {len(self.fail)} jobs in {self.t_enqueued - self.t0:.2f} s "
            f"({sum(self.fail.values())} meant to fail; {retries} batch retries {dict(self.enqueue_retries)}, "
            f"{self.replayed} jobs found already made by an earlier try)"
        )
        if len(self.fail) != a.jobs:
            raise BenchError(f"{a.jobs} jobs planned, {len(self.fail)} distinct ids returned")

    async def killer(self) -> None:
        lo, hi = self.a.kill_lo, self.a.kill_hi
        rng = random.Random(f"{self.a.seed}-killer")
        while not self.done.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.done.wait(), rng.uniform(lo, hi))
            if self.done.is_set():
                return
            alive = self.pool.alive
            if not alive:
                continue
            victim = rng.choice(alive)
            try:
                held: int | None = held_by(self.stack, victim.worker_id)
            except redis.RedisError:  # Redis is in a fault of its own
                held = None
            self.pool.kill(victim)
            fresh = self.pool.spawn()
            self.kills.append(
                {"t": round(time.time() - self.t0, 2), "worker": victim.worker_id, "held": held,
                 "uptime_s": round(victim.killed_at - victim.started, 1),  # type: ignore[operator]
                 "replacement": fresh.worker_id}
            )  # fmt: skip
            log(f"killed {victim.worker_id} (holding {held} jobs), started {fresh.worker_id}")
            # The next interval runs from this kill: a replacement may itself be killed while starting.
            self.watch_start(fresh)

    def watch_start(self, w: Worker) -> None:
        starting = asyncio.create_task(self.started(w))
        self.starting.add(starting)
        starting.add_done_callback(self.starting.discard)

    async def started(self, w: Worker) -> None:
        """A replacement that fails to start (not killed by us meanwhile) ends the run with an error.

        Starting while a fault is on can take long (the worker waits for Redis): 120 s.
        """
        try:
            await wait_healthy(w, 120)
        except BenchError as exc:
            # One that exited is watch_final's: recorded as a crash and restarted.
            if w.killed_at is None and w.proc.poll() is None:
                self.errors.append(str(exc))
                self.done.set()

    async def chaos(self) -> None:
        """Draw a fault at random every --fault-every seconds, hold it, undo it; one at a time."""
        a = self.a
        names = [n for n in a.fault_list if n != "worker_kill"]
        if not names:
            return
        rng = random.Random(f"{a.seed}-faults")
        deck = FaultDeck(names, rng)
        injector = Injector(self.stack, self.done)
        while not self.done.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.done.wait(), rng.uniform(a.fault_lo, a.fault_hi))
            if self.done.is_set():
                return
            name = deck.draw()
            hold = rng.uniform(a.hold_lo, a.hold_hi)
            t = time.time() - self.t0
            log(f"[{t:6.1f} s] fault {name}: on")
            started = time.monotonic()
            ok = True
            try:
                detail = await getattr(injector, name)(hold)
            except Exception as exc:  # the tool's own failure to inject or undo: shown, and fails the run
                ok = False
                detail = f"INJECTION FAILED: {type(exc).__name__}: {exc}"
                self.errors.append(f"fault {name} at {t:.1f} s: {detail}")
            took = time.monotonic() - started
            self.faults.append(
                {"t": round(t, 2), "fault": name, "duration_s": round(took, 2), "ok": ok, "what": detail}
            )
            log(f"[{time.time() - self.t0:6.1f} s] fault {name}: off after {took:.1f} s: {detail}")

    async def sampler(self) -> None:
        """Every 0.5 s: the fullest per-key running set (the cap), and Redis used_memory (its peak)."""
        prefix = KEYS.per_key_prefix
        while not self.done.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.done.wait(), 0.5)
            with contextlib.suppress(redis.RedisError):
                r = self.stack.r
                assert r is not None
                self.peak_memory = max(self.peak_memory, int(r.info("memory")["used_memory"]))
                for key in r.scan_iter(match=f"{prefix}run:*", count=1000):
                    self.max_running_per_key = max(self.max_running_per_key, int(r.scard(key)))

    async def progress(self) -> None:
        while not self.done.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.done.wait(), self.a.progress)
            if not self.done.is_set():
                self.print_progress()

    def print_progress(self) -> None:
        st = pg_states(self.stack)
        if st is None:
            pg = "postgres: (not answering)"
        else:
            final = sum(st[s] for s in FINAL_STATES)
            pg = (
                f"final {final}/{self.a.jobs} (succeeded {st[SUCCEEDED]}, failed {st[FAILED]}, dead {st[DEAD]}; "
                f"rows {sum(st.values())})"
            )
        try:
            rs = redis_queue_state(self.stack)
            rd = (
                f"redis: stream {rs['xlen']}, pending {rs['pending']}, delayed {rs['delayed']}, "
                f"results lag {rs['results_lag']}"
            )
        except redis.RedisError as exc:
            rd = f"redis: ({type(exc).__name__})"
        log(
            f"[{time.time() - self.t0:6.1f} s] {pg} | {rd} | workers alive {len(self.pool.alive)}, "
            f"killed {len(self.kills)} | faults {len(self.faults)}"
        )

    async def watch_final(self) -> None:
        """Until every job is final in PostgreSQL (or the deadline, or a service died)."""
        deadline = time.monotonic() + self.a.deadline
        stall_since, stall_final = time.monotonic(), None
        while not self.done.is_set():
            try:
                self.stack.check_alive()
            except BenchError as exc:
                self.errors.append(str(exc))
                break
            for w in self.pool.died_on_their_own():
                # Restarted as an orchestrator would. Exit 75 is the Supervisor asking for it (past
                # CONVEYOR_EXIT_AFTER_SECONDS); any other exit is a crash, and fails a check.
                w.killed_at = time.monotonic()
                fresh = self.pool.spawn()
                rc = w.proc.returncode
                last = [ln for ln in tail(w.log_path, 200).splitlines() if ln.strip()]
                error = next((ln for ln in reversed(last) if not ln.startswith((" ", "{"))), last[-1] if last else "")
                entry = {"t": round(time.time() - self.t0, 2), "worker": w.worker_id, "exit": rc, "last": error[:200]}
                (self.restarts if rc == EXIT_RESTART_ME else self.crashes).append(entry)
                log(f"{w.worker_id} exited {rc} by itself ({error[:200]}): started {fresh.worker_id}")
                self.watch_start(fresh)
            st = pg_states(self.stack)
            if st is not None and self.fail and sum(st[s] for s in FINAL_STATES) >= len(self.fail):
                self.t_final_seen = time.time()
                break
            # Stalled: Redis has nothing left to do (streams empty, nothing pending or delayed, the
            # results group caught up) yet PostgreSQL lacks outcomes, for --stall seconds: they were
            # acked without being written, and waiting for the deadline would not bring them back.
            # A reading Redis or PostgreSQL cannot give (a fault is on) neither starts nor ends a stall.
            quiet: bool | None = None
            with contextlib.suppress(redis.RedisError):
                quiet = bool(self.t_enqueued) and settled(redis_queue_state(self.stack))
            final = sum(st[s] for s in FINAL_STATES) if st is not None else stall_final
            if quiet is False or final != stall_final:
                stall_since, stall_final = time.monotonic(), final
            elif quiet and time.monotonic() - stall_since > self.a.stall:
                self.errors.append(
                    f"stalled: for {self.a.stall:g} s Redis has had nothing left to do and the results group is "
                    f"caught up, but PostgreSQL holds {final} final rows of {len(self.fail)} ({st and dict(st)}): "
                    "outcomes were acked without being written"
                )
                break
            if time.monotonic() > deadline:
                self.errors.append(f"deadline: not every job final after {self.a.deadline:.0f} s ({st and dict(st)})")
                break
            await asyncio.sleep(0.2)
        self.done.set()

    async def drive(self) -> None:
        self.t0 = time.time()
        background = [
            asyncio.create_task(self.progress()),
            asyncio.create_task(self.sampler()),
            asyncio.create_task(self.chaos()),
        ]
        if "worker_kill" in self.a.fault_list:
            background.append(asyncio.create_task(self.killer()))
        try:
            await self.enqueue()
            await self.watch_final()
        except BenchError as exc:
            self.errors.append(str(exc))
        finally:
            self.done.set()
            for task in self.starting:
                task.cancel()
            # The chaos task undoes its fault on `done` (cut short) before it returns: wait for it.
            await asyncio.gather(*background, *self.starting, return_exceptions=True)
        self.print_progress()

    async def histories(self) -> dict[str, list[event_pb2.JobEvent]]:
        assert self.stack.services["results"]
        out: dict[str, list[event_pb2.JobEvent]] = {}
        sem = asyncio.Semaphore(HISTORY_INFLIGHT)
        async with grpc.aio.insecure_channel(self.stack.services["results"].addr) as channel:
            stub = results_service_pb2_grpc.ResultsServiceStub(channel)

            async def one(job_id: str) -> None:
                events: list[event_pb2.JobEvent] = []
                after = ""
                async with sem:
                    while True:
                        req = results_service_pb2.ListJobEventsRequest(
                            job_id=job_id, after_event_id=after, page_size=1000
                        )
                        try:
                            resp = await call_retrying(lambda req=req: stub.ListJobEvents(req, timeout=60))  # type: ignore[misc]
                        except grpc.aio.AioRpcError as err:
                            # NOT_FOUND: PostgreSQL holds no trace of the job (its events were lost);
                            # the "every job has events" check names it.
                            self.history_errors[err.code().name] += 1
                            break
                        events.extend(resp.events)
                        if not resp.has_more or not resp.events:
                            break
                        after = resp.events[-1].id
                out[job_id] = events

            await asyncio.gather(*(one(j) for j in self.fail))
        return out


async def call_retrying(call: Callable[[], Awaitable[T]], within_s: float = 60.0) -> T:
    """A unary call, sent again while it answers a retryable status (a fault's aftermath), up to ``within_s``."""
    deadline = time.monotonic() + within_s
    delay = 0.1
    while True:
        try:
            return await call()
        except grpc.aio.AioRpcError as err:
            if err.code() not in RETRYABLE or time.monotonic() > deadline:
                raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)


# -- verification ----------------------------------------------------------------------------


@dataclass
class Check:
    name: str
    ok: bool
    detail: str = ""


def sid(event_id: str) -> tuple[int, int]:
    ms, _, seq = event_id.partition("-")
    return int(ms), int(seq or 0)


def few(xs: list[Any] | set[Any], k: int = 3) -> str:
    """``len(xs)`` and the first ``k`` of them, for a check's detail."""
    return f"{len(xs)} {sorted(xs)[:k] if isinstance(xs, set) else xs[:k]}"


JobEvents = dict[str, list[event_pb2.JobEvent]]


def verify(run: Run, rs: dict[str, Any], histories: JobEvents) -> tuple[list[Check], dict[str, Any]]:
    stack, n = run.stack, len(run.fail)
    db, r = stack.db, stack.r
    assert db is not None and r is not None
    checks: list[Check] = []
    figures: dict[str, Any] = {}

    def check(name: str, ok: bool, detail: str) -> None:
        checks.append(Check(name, ok, detail))

    # PostgreSQL: one row per job, every row final, the right outcome.
    q = "SELECT count(*), count(DISTINCT job_id) FROM jobs WHERE queue = %s"
    total, distinct = db.execute(q, (QUEUE,)).fetchone()
    all_rows = db.execute("SELECT count(*) FROM jobs").fetchone()[0]
    check(
        "rows: count(*) = count(distinct job_id) = jobs",
        total == distinct == n == all_rows,
        f"count {total}, distinct {distinct}, jobs {n}, rows in table {all_rows}",
    )
    q = "SELECT job_id, state, attempts, error, result->'i', payload->'i', worker FROM jobs WHERE queue = %s"
    rows = db.execute(q, (QUEUE,)).fetchall()
    by_id = {row[0]: row for row in rows}
    missing = [j for j in run.fail if j not in by_id]
    extra = [j for j in by_id if j not in run.fail]
    check(
        "rows: exactly the enqueued job ids", not missing and not extra, f"missing {few(missing)}, unknown {few(extra)}"
    )
    states = Counter(int(row[1]) for row in rows)
    not_final = [row[0] for row in rows if row[1] not in FINAL_STATES]
    named = {STATE_NAMES[k]: v for k, v in states.items()}
    check("rows: every job final (none pending)", not not_final, f"not final {few(not_final)}; states {named}")
    wrong_fail = [j for j, f in run.fail.items() if f and j in by_id and by_id[j][1] not in (FAILED, DEAD)]
    wrong_ok = [j for j, f in run.fail.items() if not f and j in by_id and by_id[j][1] not in (SUCCEEDED, DEAD)]
    check(
        "rows: fail-jobs FAILED, the others SUCCEEDED (or DEAD_LETTERED)",
        not wrong_fail and not wrong_ok,
        f"fail-jobs not failed {few(wrong_fail)}, others not succeeded {few(wrong_ok)}",
    )
    early = [row[0] for row in rows if row[1] == FAILED and row[2] < MAX_ATTEMPTS]
    kinds = Counter((row[3] or {}).get("kind") for row in rows if row[1] == FAILED)
    check(
        f"rows: FAILED only after {MAX_ATTEMPTS} attempts, error ChaosFailure",
        not early and set(kinds) <= {"ChaosFailure"},
        f"too few attempts {few(early)}; error kinds {dict(kinds)}",
    )
    bad_result = [row[0] for row in rows if row[1] == SUCCEEDED and row[4] != row[5]]
    check("rows: every SUCCEEDED result matches its payload", not bad_result, few(bad_result))

    dead_rows = [row for row in rows if row[1] == DEAD]
    dead_why: Counter[str] = Counter()
    for row in dead_rows:
        err = row[3] or {}
        dead_why[f"{'fail-job' if run.fail.get(row[0]) else 'healthy'}: {err.get('kind')}: {err.get('message')}"] += 1
    figures["dead_lettered_why"] = dict(dead_why)
    figures["dead_lettered_ids"] = [row[0] for row in dead_rows][:10]

    # Redis: nothing left to do, nothing pending, the dead-letter stream right.
    check(
        "redis: job streams empty (XLEN 0), no entry pending (XPENDING 0)",
        rs["xlen"] == 0 and rs["pending"] == 0,
        f"xlen {rs['xlen']}, pending {rs['pending']} {rs['bands']}",
    )
    check(
        "redis: delayed zset and parked hash empty",
        rs["delayed"] == 0 and rs["parked"] == 0,
        f"delayed {rs['delayed']}, parked {rs['parked']}",
    )
    check(
        "redis: results service caught up (group pending 0, lag 0)",
        rs["results_pending"] == 0 and rs["results_lag"] == 0,
        f"pending {rs['results_pending']}, lag {rs['results_lag']}",
    )
    live_not_final = []
    for ulid, rec in r.hscan_iter(KEYS.state, count=1000):
        if int(rec.split(b"|", 1)[0]) not in FINAL_STATES:
            live_not_final.append((ulid.decode(), rec.decode(errors="replace")[:60]))
    check("redis: no live record in a non-final state", not live_not_final, few(live_not_final))
    dead_entries = [fields[b"j"].decode() for _, fields in r.xrange(KEYS.dead, "-", "+")]
    dead_expected = {row[0].split("/", 1)[1] for row in rows if row[1] in (FAILED, DEAD)}
    dup_dead = [u for u, c in Counter(dead_entries).items() if c > 1]
    check(
        "redis: dead-letter stream = the FAILED + DEAD_LETTERED jobs, once each",
        not dup_dead and set(dead_entries) == dead_expected,
        f"entries {len(dead_entries)}, expected {len(dead_expected)}, twice {few(dup_dead)}, "
        f"missing {few(dead_expected - set(dead_entries))}, extra {few(set(dead_entries) - dead_expected)}",
    )

    # History, via ResultsService.ListJobEvents.
    no_history: list[str] = []
    not_one_final: list[Any] = []
    final_not_last: list[Any] = []
    final_mismatch: list[Any] = []
    wrong_attempt: list[Any] = []
    not_queued_first: list[Any] = []
    unordered: list[str] = []
    reclaims = 0  # ACTIVE right after ACTIVE/PROGRESS: an attempt that took over a dead worker's claim
    reruns = 0  # healthy jobs whose handler was started more than once
    active_total = 0
    for job_id, events in histories.items():
        if not events:
            no_history.append(job_id)
            continue
        types = [e.type for e in events]
        finals = [k for k, t in enumerate(types) if t in FINAL_EVENTS]
        if len(finals) != 1:
            not_one_final.append((job_id, [EVENT_NAMES[types[k]] for k in finals]))
        elif finals[0] != len(types) - 1:
            final_not_last.append((job_id, [EVENT_NAMES[t] for t in types[finals[0] :]]))
        row = by_id.get(job_id)
        if finals and row is not None:
            last = events[finals[-1]]
            if last.type != EVENT_FOR_STATE.get(row[1]):
                final_mismatch.append((job_id, STATE_NAMES[row[1]], EVENT_NAMES[last.type]))
            if last.attempt != row[2]:
                wrong_attempt.append((job_id, row[2], last.attempt))
        if types[0] != ET.EVENT_TYPE_QUEUED:
            not_queued_first.append((job_id, EVENT_NAMES[types[0]]))
        ids = [sid(e.id) for e in events]
        if any(b <= a for a, b in itertools.pairwise(ids)):
            unordered.append(job_id)
        actives = types.count(ET.EVENT_TYPE_ACTIVE)
        reclaims += sum(
            1
            for prev, t in itertools.pairwise(types)
            if t == ET.EVENT_TYPE_ACTIVE and prev in (ET.EVENT_TYPE_ACTIVE, ET.EVENT_TYPE_PROGRESS)
        )
        active_total += actives
        if not run.fail[job_id] and actives > 1:
            reruns += 1
    check(
        "history: every job has events (ListJobEvents)",
        not no_history,
        f"{few(no_history)}; ListJobEvents errors {dict(run.history_errors)}",
    )
    check("history: exactly one final event per job", not not_one_final, few(not_one_final))
    check(
        "history: final event is the last, first is QUEUED, ids increase",
        not final_not_last and not not_queued_first and not unordered,
        f"after final {few(final_not_last, 2)}, first not QUEUED {few(not_queued_first, 2)}, "
        f"unordered {few(unordered, 2)}",
    )
    check(
        "history: final event = row state, its attempt = row attempts",
        not final_mismatch and not wrong_attempt,
        f"state {few(final_mismatch)}, attempt {few(wrong_attempt)}",
    )

    figures.update(
        jobs=n,
        meant_to_fail=sum(run.fail.values()),
        succeeded=states[SUCCEEDED],
        failed=states[FAILED],
        dead_lettered=states[DEAD],
        attempts_started=active_total,
        attempts_in_rows=sum(int(row[2]) for row in rows),
        reclaimed_attempts=reclaims,
        healthy_jobs_run_more_than_once=reruns,
    )
    return checks, figures


# -- after the run: health, leaks, memory ---------------------------------------------------------


async def health_of(addr: str) -> str:
    async with grpc.aio.insecure_channel(addr) as channel:
        try:
            r = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=2.0)
        except grpc.aio.AioRpcError as err:
            return err.code().name
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(r.status))


async def check_health(run: Run, within_s: float) -> Check:
    """Every service and every live worker answers SERVING (waited for: a loop may still be backing off)."""
    targets = {name: s.addr for name, s in run.stack.services.items()}
    targets.update({w.worker_id: w.addr for w in run.pool.alive})
    deadline = time.monotonic() + within_s
    while True:
        status = {name: await health_of(addr) for name, addr in targets.items()}
        bad = {k: v for k, v in status.items() if v != "SERVING"}
        if not bad or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    return Check(
        f"health: every service and worker SERVING again ({len(targets)} processes, waited up to {within_s:.0f} s)",
        not bad,
        f"not SERVING: {bad}",
    )


def leaked_slots(r: redis.Redis) -> dict[str, Any]:
    """What flow control still holds for the queue: running-set members, held jobs, keys ready or pending admission."""
    prefix = KEYS.per_key_prefix
    running = {k.decode(): int(r.scard(k)) for k in r.scan_iter(match=f"{prefix}run:*", count=1000)}
    held = {k.decode(): int(r.zcard(k)) for k in r.scan_iter(match=f"{prefix}held:*", count=1000)}
    try:
        admitted = int(r.xpending(KEYS.admitted, WORKER_GROUP)["pending"])
    except redis.ResponseError:
        admitted = 0
    return {
        "running": {k: v for k, v in running.items() if v},
        "held": {k: v for k, v in held.items() if v},
        "ready": int(r.zcard(KEYS.ready)),
        "rate_keys": int(r.hlen(KEYS.rate_keys)),
        "admitted_pending": admitted,
    }


def check_leaks(run: Run) -> list[Check]:
    r = run.stack.r
    assert r is not None
    left = leaked_slots(r)
    checks = [
        Check(
            "redis: no slot or cap leaked (per-key running sets and held sets empty, nothing ready or admitted)",
            not left["running"]
            and not left["held"]
            and not left["ready"]
            and not left["admitted_pending"]
            and not left["rate_keys"],
            f"{left}",
        )
    ]
    if run.a.keys and run.a.key_cap:
        checks.append(
            Check(
                f"flow control: no key ever had more than its cap of {run.a.key_cap} running (sampled every 0.5 s)",
                run.max_running_per_key <= run.a.key_cap,
                f"largest running set seen: {run.max_running_per_key}",
            )
        )
    return checks


@dataclass
class Memory:
    """INFO memory used_memory, less what is not the queue's transient data.

    ``used_memory`` counts the replication backlog (Redis makes one, 1 MiB by default, once it
    has been a replica: the redis_replica fault) and the dead-letter stream holds the FAILED and
    DEAD_LETTERED jobs for good (they are data, kept until an operator retries or purges them):
    both are taken out, so what is compared is what finished jobs leave behind.
    """

    used: int
    backlog: int
    dead: int

    @property
    def compared(self) -> int:
        return self.used - self.backlog - self.dead


def memory(r: redis.Redis) -> Memory:
    info = r.info("memory")
    dead = int(r.memory_usage(KEYS.dead, samples=0) or 0)
    return Memory(int(info["used_memory"]), int(info.get("mem_replication_backlog", 0)), dead)


def transient_left(r: redis.Redis) -> dict[str, int]:
    """What the retention (and the idempotency window) must remove: live records, events, idempotency keys."""
    idem = sum(1 for _ in r.scan_iter(match=f"conveyor:{{{QUEUE}}}:idem:*", count=1000))
    return {
        "live records": int(r.hlen(KEYS.state)),
        "done": int(r.zcard(KEYS.done)),
        "events": int(r.xlen(KEYS.events)) if r.exists(KEYS.events) else 0,
        "idempotency keys": idem,
    }


async def check_memory(run: Run, baseline: Memory) -> tuple[Check, dict[str, Any]]:
    """Wait until the retention and the idempotency window removed what finished jobs left, then compare.

    Passes when ``used_memory - replication backlog - dead-letter stream`` is at most the same
    figure before the first enqueue plus ``--mem-tolerance-mb``. Waits (polling, with a deadline of
    retention + idempotency window + 60 s after the last enqueue) for that and for no live record,
    event or idempotency key to be left.
    """
    a = run.a
    r = run.stack.r
    assert r is not None
    tolerance = int(a.mem_tolerance_mb * 2**20)
    deadline = run.t_enqueued + a.retention + a.idempotency_window + 60.0
    log(
        f"waiting for the retention ({a.retention:g} s) and the idempotency window ({a.idempotency_window:g} s) "
        f"to clear Redis (until {max(0.0, deadline - time.time()):.0f} s from now at the latest)"
    )
    while True:
        try:
            now, left = memory(r), transient_left(r)
        except redis.RedisError as exc:
            now, left = None, {"error": str(exc)}  # type: ignore[dict-item]
        ok = now is not None and not any(left.values()) and now.compared <= baseline.compared + tolerance
        if ok or time.time() > deadline:
            break
        await asyncio.sleep(1.0)
    figures: dict[str, Any] = {
        "memory_baseline_used": baseline.used,
        "memory_peak_used": run.peak_memory,
        "memory_after_used": now.used if now else None,
        "memory_after_backlog": now.backlog if now else None,
        "memory_after_dead_stream": now.dead if now else None,
    }
    detail = (
        f"baseline {mib(baseline.compared)}, after {mib(now.compared) if now else '?'} "
        f"(used {mib(now.used) if now else '?'} - backlog {mib(now.backlog) if now else '?'} - dead letters "
        f"{mib(now.dead) if now else '?'}), tolerance {mib(tolerance)}; left: {left}"
    )
    figures["memory_detail"] = detail
    return (
        Check(
            f"redis: memory back to baseline after the retention (used_memory - backlog - dead letters "
            f"<= baseline + {a.mem_tolerance_mb:g} MiB; no live record, event or idempotency key left)",
            ok,
            detail,
        ),
        figures,
    )


def worker_log_counts(pool: Pool) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """What the workers logged about chaos: reclaims, refused (fenced) outcomes, lost claims, dead letters, errors.

    Also the (worker, ulid) pairs of the `claims_lost` warnings (the first 10 ulids of each).
    """
    counts: Counter[str] = Counter()
    lost: list[tuple[str, str]] = []
    for w in pool.workers:
        try:
            lines = w.log_path.read_text(errors="replace").splitlines()
        except OSError:
            continue
        for line in lines:
            try:
                rec = json.loads(line)
            except ValueError:
                if line.strip():
                    counts["non-JSON lines"] += 1
                continue
            ev = rec.get("event", "")
            if ev == "jobs_reclaimed":
                counts["jobs_reclaimed (sum of counts)"] += int(rec.get("count", 0))
            elif ev == "job_failed":
                counts["job_failed (handler raised)"] += 1
            elif ev:
                counts[ev] += 1
            if ev == "claims_lost":
                lost += [(w.worker_id, u) for u in rec.get("ulids", [])]
    return dict(counts), lost


def classify_lost(lost: list[tuple[str, str]], histories: dict[str, list[event_pb2.JobEvent]]) -> Counter[str]:
    """Was a `claims_lost` warning true? True when another worker started an attempt after this one's."""
    out: Counter[str] = Counter()
    for worker, ulid in lost:
        events = histories.get(f"{QUEUE}/{ulid}", [])
        mine = [k for k, e in enumerate(events) if e.type == ET.EVENT_TYPE_ACTIVE and e.worker == worker]
        taken = mine and any(e.type == ET.EVENT_TYPE_ACTIVE and e.worker != worker for e in events[mine[0] + 1 :])
        final = next((e for e in events if e.type in FINAL_EVENTS), None)
        if taken:
            out["taken over by another worker (true)"] += 1
        elif final is not None and final.worker == worker:
            out[f"finished by the same worker, {EVENT_NAMES[final.type]} (spurious)"] += 1
        else:
            out["other"] += 1
    return out


def print_summary(run: Run, checks: list[Check], figures: dict[str, Any], wlog: dict[str, int]) -> None:
    a = run.a
    t_end = figures.get("last_commit_wall") or run.t_final_seen or time.time()
    duration = t_end - run.t0
    held = sum(k["held"] for k in run.kills)
    print()
    print(
        f"Chaos run: {a.jobs} jobs, {a.workers} workers (concurrency {a.concurrency}), fail rate {a.fail_rate}, "
        f"kill every {a.kill_lo:g}-{a.kill_hi:g} s, seed {a.seed}"
    )
    print(
        f"  faults {','.join(a.fault_list) or 'none'}: one every {a.fault_lo:g}-{a.fault_hi:g} s, "
        f"held {a.hold_lo:g}-{a.hold_hi:g} s; retention {a.retention:g} s; per-key cap {a.key_cap} over {a.keys} keys"
    )
    print(
        f"  visibility timeout {VISIBILITY_S} s, delivery limit {MAX_DELIVERIES}, retry: {MAX_ATTEMPTS} attempts, "
        f"exponential 50-200 ms; handler sleep 0-{a.sleep_ms:g} ms"
    )
    meant = figures.get("meant_to_fail", sum(run.fail.values()))
    rows = [
        (
            "jobs enqueued",
            f"{figures.get('jobs', len(run.fail))} ({meant} meant to fail)",
        ),
        ("succeeded", figures.get("succeeded")),
        ("failed", figures.get("failed")),
        ("dead-lettered", figures.get("dead_lettered")),
        (
            "workers killed (SIGKILL)",
            f"{len(run.kills)} (holding {held} claimed jobs in all, read just before each kill)",
        ),
        ("workers started", len(run.pool.workers)),
        (
            "attempts started (ACTIVE events)",
            f"{figures.get('attempts_started')} (rows' attempts sum {figures.get('attempts_in_rows')})",
        ),
        ("reclaimed attempts (ACTIVE after ACTIVE)", figures.get("reclaimed_attempts")),
        ("healthy jobs run more than once", figures.get("healthy_jobs_run_more_than_once")),
        (
            "EnqueueBatch retries (refused by a fault)",
            f"{sum(run.enqueue_retries.values())} {dict(run.enqueue_retries)}; {run.replayed} jobs already made",
        ),
        ("largest per-key running set seen", f"{run.max_running_per_key} (cap {a.key_cap}, {a.keys} keys)"),
        (
            "Redis used_memory",
            f"baseline {mib(figures.get('memory_baseline_used') or 0)}, "
            f"peak {mib(figures.get('memory_peak_used') or 0)}, after {mib(figures.get('memory_after_used') or 0)}",
        ),
        (
            "enqueue (EnqueueBatch)",
            f"{run.t_enqueued - run.t0:.2f} s ({f'paced at {a.rate:g} jobs/s' if a.rate else 'all at once'})",
        ),
        ("duration (first enqueue -> last commit)", f"{duration:.2f} s"),
        ("throughput", f"{len(run.fail) / duration:,.0f} jobs/s" if duration > 0 else "-"),
    ]
    width = max(len(k) for k, _ in rows)
    print()
    for k, v in rows:
        print(f"  {k:{width}s}  {v}")
    if figures.get("dead_lettered_why"):
        print("  dead letters, why:")
        for why, c in figures["dead_lettered_why"].items():
            print(f"    {c:5d} x {why}")
    if wlog:
        print("  worker logs: " + ", ".join(f"{k} {v}" for k, v in sorted(wlog.items())))
    if figures.get("claims_lost_warnings"):
        print(
            "  claims_lost warnings, per ulid: "
            + ", ".join(f"{v} {k}" for k, v in figures["claims_lost_warnings"].items())
        )
    if run.kills:
        print("  kills: " + ", ".join(f"{k['t']}s {k['worker']}({k['held']})" for k in run.kills))
    if run.restarts:
        print(
            "  workers that exited 75 and were restarted: "
            + ", ".join(f"{x['t']}s {x['worker']}" for x in run.restarts)
        )
    if run.crashes:
        print(
            "  workers that crashed and were restarted: "
            + ", ".join(f"{x['t']}s {x['worker']} exit {x['exit']}: {x['last']}" for x in run.crashes)
        )
    if run.faults:
        print()
        print(f"  faults ({len(run.faults)}; kinds {dict(Counter(f['fault'] for f in run.faults))}):")
        print(f"    {'at (s)':>8}  {'lasted (s)':>10}  {'fault':14s}  what")
        for f in run.faults:
            print(f"    {f['t']:8.1f}  {f['duration_s']:10.1f}  {f['fault']:14s}  {f['what']}")
    not_drawn = [n for n in a.fault_list if n != "worker_kill" and n not in {f["fault"] for f in run.faults}]
    if not_drawn:
        print(f"  enabled but not drawn before the jobs were done (run longer: more --jobs): {', '.join(not_drawn)}")
    print()
    width = max(len(c.name) for c in checks) if checks else 10
    for c in checks:
        print(f"  {'PASS' if c.ok else 'FAIL'}  {c.name:{width}s}  {'' if c.ok else c.detail}".rstrip())
    passed = all(c.ok for c in checks) and bool(checks)
    print(f"\n  RESULT: {'PASS' if passed else 'FAIL'} ({sum(c.ok for c in checks)}/{len(checks)} checks)")


async def main_async(a: argparse.Namespace, workdir: Path) -> int:
    started = time.monotonic()
    log(f"starting the stack in {workdir}")
    with ChaosStack(workdir, worker=False, retention_s=a.retention) as stack:
        pool = Pool(stack, workdir, a.concurrency)
        try:
            for _ in range(a.workers):
                pool.spawn()
            await asyncio.gather(*(wait_healthy(w, 60) for w in pool.workers))
            if a.keys and a.key_cap:
                async with ConveyorClient(stack.producer_addr) as client:
                    await client.set_concurrency_limit(QUEUE, a.key_cap, each_key=True)
            assert stack.r is not None
            baseline = memory(stack.r)
            log(
                f"stack up in {time.monotonic() - started:.1f} s: {a.workers} workers; results connects as "
                f"{APP_ROLE}; faults {','.join(a.fault_list) or 'none'}; Redis used_memory {mib(baseline.used)}"
            )
            run = Run(a, stack, pool)
            await run.drive()
            checks: list[Check] = []
            if run.errors:
                for e in run.errors:
                    log(f"error: {e}")
                checks.append(
                    Check("run: finished before the deadline, no service died, every fault injected and undone",
                          False, run.errors[0][:300])
                )  # fmt: skip
            else:
                checks.append(
                    Check("run: finished before the deadline, no service died, every fault injected and undone", True)
                )
            checks.append(
                Check(
                    f"workers: none exited by itself (exit {EXIT_RESTART_ME}, asking for a restart, is counted apart)",
                    not run.crashes,
                    f"{len(run.crashes)} crashes (restarted): {run.crashes[:3]}",
                )
            )
            # Let Redis settle: stragglers reclaimed, results caught up.
            settle_deadline = time.monotonic() + a.settle
            rs = redis_queue_state(stack)
            while not settled(rs) and time.monotonic() < settle_deadline:
                await asyncio.sleep(0.25)
                rs = redis_queue_state(stack)
            db = stack.observe_db()
            last = db.execute(
                "SELECT extract(epoch FROM max(pg_xact_commit_timestamp(xmin))) FROM jobs WHERE queue = %s", (QUEUE,)
            ).fetchone()[0]
            log("reading every job's history (ListJobEvents)")
            t_hist = time.monotonic()
            histories = await run.histories()
            log(f"read {len(histories)} histories in {time.monotonic() - t_hist:.1f} s")
            more, figures = verify(run, rs, histories)
            checks += more
            figures["last_commit_wall"] = float(last) if last is not None else None
            checks.append(await check_health(run, a.health_within))
            checks += check_leaks(run)
            mem_check, mem_figures = await check_memory(run, baseline)
            checks.append(mem_check)
            figures.update(mem_figures)
            wlog, lost = worker_log_counts(pool)
            if lost:
                figures["claims_lost_warnings"] = dict(classify_lost(lost, histories))
            print_summary(run, checks, figures, wlog)
            if a.json:
                record = {
                    "metric": "chaos",
                    "ts": time.time(),
                    "argv": sys.argv[1:],
                    "figures": {k: v for k, v in figures.items() if k != "dead_lettered_ids"},
                    "kills": run.kills,
                    "faults": run.faults,
                    "crashes": run.crashes,
                    "restarts": run.restarts,
                    "worker_logs": wlog,
                    "checks": {c.name: c.ok for c in checks},
                    "duration_s": (figures["last_commit_wall"] or time.time()) - run.t0,
                }
                with Path(a.json).open("a") as f:  # noqa: ASYNC230 - once, at the end
                    f.write(json.dumps(record) + "\n")
            failed = [c for c in checks if not c.ok]
            if failed and figures.get("dead_lettered_ids"):
                log(f"dead-lettered job ids: {figures['dead_lettered_ids']}")
            return 1 if failed else 0
        finally:
            pool.stop_all()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=20000)
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=50, help="jobs each worker runs at once")
    ap.add_argument("--fail-rate", type=float, default=0.05, help="share of jobs whose handler always fails")
    ap.add_argument("--kill-every", default="2-6", help="seconds between worker kills, min-max (uniform)")
    ap.add_argument(
        "--faults",
        default="all",
        help=f"faults to draw: all (default), none, or a comma list; -name drops one. Known: {', '.join(FAULTS)}",
    )
    ap.add_argument("--fault-every", default="2-5", help="seconds between one fault's end and the next, min-max")
    ap.add_argument(
        "--fault-hold",
        default="3-6",
        help="seconds a fault lasts, min-max (not client_pause: 5 s, pg_lock: 10 s, script_flush, client_kill)",
    )
    ap.add_argument(
        "--rate",
        type=float,
        default=200.0,
        help="jobs enqueued per second (batches of rate/5, 5 a second), so the faults land while jobs arrive; "
        "0: all at once in batches of 500",
    )
    ap.add_argument("--keys", type=int, default=20, help="rate keys the jobs are spread over (0: none)")
    ap.add_argument("--key-cap", type=int, default=5, help="concurrency cap of each rate key (0: none)")
    ap.add_argument("--retention", type=float, default=10.0, help="CONVEYOR_RETENTION_SECONDS of every service")
    ap.add_argument("--idempotency-window", type=float, default=60.0, help="s the enqueue idempotency keys live")
    ap.add_argument("--enqueue-retry-s", type=float, default=120.0, help="s to keep retrying a refused EnqueueBatch")
    ap.add_argument("--mem-tolerance-mb", type=float, default=2.0, help="memory check tolerance above the baseline")
    ap.add_argument("--health-within", type=float, default=60.0, help="s to wait for every process to be SERVING")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument(
        "--sleep-ms",
        type=float,
        default=200.0,
        help="handler sleeps uniform 0..this ms (with 20 ms, 20,000 jobs finish in ~4 s: one kill at most)",
    )
    ap.add_argument("--deadline", type=float, default=900.0, help="give up when not every job is final after this (s)")
    ap.add_argument(
        "--settle",
        type=float,
        default=120.0,
        help="s to wait for Redis to drain after the last outcome (an entry the results reader lost in flight "
        "is claimed back after 60 s idle)",
    )
    ap.add_argument(
        "--stall",
        type=float,
        default=60.0,
        help="end the run when Redis has had nothing left to do for this long while PostgreSQL lacks outcomes (s)",
    )
    ap.add_argument("--progress", type=float, default=3.0, help="seconds between progress lines")
    ap.add_argument("--json", help="append the run's figures and checks to this JSON-lines file")
    ap.add_argument("--keep", action="store_true", help="keep the logs directory even when every check passes")
    a = ap.parse_args()
    try:
        a.kill_lo, a.kill_hi = parse_range(a.kill_every, "--kill-every")
        a.fault_lo, a.fault_hi = parse_range(a.fault_every, "--fault-every")
        a.hold_lo, a.hold_hi = parse_range(a.fault_hold, "--fault-hold")
        a.fault_list = parse_faults(a.faults)
    except ValueError as exc:
        ap.error(str(exc))
    if a.rate < 0:
        ap.error("--rate must be at least 0")
    if a.workers < 1 or a.jobs < 1 or not 0 <= a.fail_rate <= 1:
        ap.error("--workers and --jobs must be at least 1, --fail-rate between 0 and 1")
    if a.keys < 0 or a.key_cap < 0 or a.retention < 1 or a.idempotency_window < 1:
        ap.error("--keys and --key-cap must be at least 0, --retention and --idempotency-window at least 1")

    workdir = Path(tempfile.mkdtemp(prefix="conveyor-chaos-"))
    rc = 1
    try:
        rc = asyncio.run(main_async(a, workdir))
    except KeyboardInterrupt:
        log("interrupted")
    except Exception:
        traceback.print_exc()
    finally:
        if rc == 0 and not a.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"\nlogs in {workdir}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
