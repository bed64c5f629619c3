"""Handlers used by the tests (beside the shipped demo handlers)."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections import Counter
from typing import Any

import structlog

from conveyor.worker.demo import handlers as demo
from conveyor.worker.handlers import Handlers, JobContext, PermanentError, RateLimited

handlers = Handlers()
handlers.merge(demo)

#: How many times each job id ran, across every in-process worker.
runs: Counter[str] = Counter()
#: Jobs of type test.gate wait for this event.
gate = asyncio.Event()
#: Order in which jobs started.
started: list[str] = []


@handlers.register("test.count")
async def count(payload: dict[str, Any], ctx: JobContext) -> int:
    runs[ctx.job_id] += 1
    started.append(ctx.job_id)
    return runs[ctx.job_id]


@handlers.register("test.gate")
async def gated(payload: dict[str, Any], ctx: JobContext) -> str:
    started.append(ctx.job_id)
    await gate.wait()
    return "opened"


@handlers.register("test.fail_then_gate")
async def fail_then_gate(payload: dict[str, Any], ctx: JobContext) -> int:
    """Fails on attempt 1; any later attempt (a retry from the dead letters) waits for ``gate``."""
    started.append(ctx.job_id)
    if ctx.attempt == 1:
        raise ValueError("fails on attempt 1")
    await gate.wait()
    return ctx.attempt


@handlers.register("test.sync")
def sync_handler(payload: dict[str, Any], ctx: JobContext) -> dict[str, Any]:
    ctx.progress_threadsafe(50, "half way in a thread")
    return {"thread": threading.current_thread().name != "MainThread", "echo": payload}


@handlers.register("test.unserializable")
async def unserializable(payload: dict[str, Any], ctx: JobContext) -> object:
    return object()


@handlers.register("test.flaky")
async def flaky(payload: dict[str, Any], ctx: JobContext) -> int:
    """Fails until attempt ``succeed_on``."""
    runs[ctx.job_id] += 1
    if ctx.attempt < int(payload.get("succeed_on", 2)):
        raise ConnectionError(f"flaky failure on attempt {ctx.attempt}")
    return ctx.attempt


@handlers.register("test.crash")
async def crash(payload: dict[str, Any], ctx: JobContext) -> int:
    """Kills its own worker process (no cleanup, as a segfault would) while attempt < ``until``."""
    if ctx.attempt < int(payload.get("until", 1_000_000)):
        os._exit(1)
    return ctx.attempt


@handlers.register("test.spin")
async def spin(payload: dict[str, Any], ctx: JobContext) -> int:
    """Holds the event loop with CPU work for ``seconds``: only a heartbeat thread can keep the claim."""
    deadline = time.monotonic() + float(payload.get("seconds", 1))
    n = 0
    while time.monotonic() < deadline:
        n += 1
    return ctx.attempt


@handlers.register("test.sync_until_cancelled")
def sync_until_cancelled(payload: dict[str, Any], ctx: JobContext) -> str:
    """A sync handler that stops cooperatively when its job is cancelled."""
    started.append(ctx.job_id)
    deadline = time.monotonic() + 30
    while not ctx.cancelled and time.monotonic() < deadline:
        time.sleep(0.01)
    return "stopped"


_observers: dict[str, Any] = {}


def _observer(url: str) -> Any:
    """One async Redis client per URL (per process) for test.observe."""
    import redis.asyncio

    if url not in _observers:
        _observers[url] = redis.asyncio.Redis.from_url(url)
    return _observers[url]


@handlers.register("test.observe")
async def observe(payload: dict[str, Any], ctx: JobContext) -> int:
    """Records, in the Redis at ``payload["redis"]``, when it started and how many jobs of its group
    (``payload["group"]``, default the queue) were running at that moment; then sleeps ``sleep`` s
    (``first_sleep`` on attempt 1, if given). Works across worker processes."""
    began = time.time()
    r = _observer(str(payload["redis"]))
    group = str(payload.get("group", ctx.queue))
    running = int(await r.incr(f"obs:{group}:running"))
    try:
        await r.rpush(f"obs:{group}:starts", f"{began:.6f} {ctx.job_id} {running}")
        await r.rpush(f"obs:{group}:levels", running)
        seconds = float(payload.get("sleep", 0))
        if ctx.attempt == 1:
            seconds = float(payload.get("first_sleep", seconds))
        if seconds:
            await asyncio.sleep(seconds)
    finally:
        await r.decr(f"obs:{group}:running")
    await r.rpush(f"obs:{group}:done", ctx.job_id)
    return running


@handlers.register("test.rate_limited")
async def rate_limited(payload: dict[str, Any], ctx: JobContext) -> int:
    """Says "slow down" (RateLimited) on attempts before ``until``; then succeeds."""
    runs[ctx.job_id] += 1
    started.append(ctx.job_id)
    if ctx.attempt < int(payload.get("until", 2)):
        raise RateLimited(float(payload.get("retry_after", 1)), whole_queue=bool(payload.get("whole_queue", False)))
    return ctx.attempt


@handlers.register("test.chatty")
async def chatty(payload: dict[str, Any], ctx: JobContext) -> int:
    """Reports ``steps`` progress events at once, each with a ``size``-byte message."""
    steps, message = int(payload.get("steps", 100)), "x" * int(payload.get("size", 8192))
    for step in range(1, steps + 1):
        await ctx.progress(100 * step / steps, message)
    return steps


class Tracker:
    """Handlers running now, per group, across the threads of one process (the in-process workers).

    Each start records how many of its group were running at that moment (the level), so the
    highest level seen is the most that ever ran at once; ``ended`` counts handlers that really
    returned (their thread ended), not outcomes recorded.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.running: Counter[str] = Counter()
        self.levels: dict[str, list[int]] = {}
        self.ended: Counter[str] = Counter()

    def enter(self, group: str) -> None:
        with self._lock:
            self.running[group] += 1
            self.levels.setdefault(group, []).append(self.running[group])

    def leave(self, group: str) -> None:
        with self._lock:
            self.running[group] -= 1
            self.ended[group] += 1

    def most(self, group: str) -> int:
        with self._lock:
            return max(self.levels.get(group, [0]))

    def clear(self) -> None:
        with self._lock:
            self.running.clear()
            self.levels.clear()
            self.ended.clear()


tracker = Tracker()
#: Jobs of type test.barrier wait here until ``parties`` of them run at once (set_barrier).
_barrier: list[threading.Barrier] = []


def set_barrier(parties: int, timeout: float = 30.0) -> None:
    _barrier[:] = [threading.Barrier(parties, timeout=timeout)]


@handlers.register("test.tracked_sync")
def tracked_sync(payload: dict[str, Any], ctx: JobContext) -> str:
    """Sleeps ``sleep`` s in its thread, ignoring cancel and timeout; counted in ``tracker`` under ``group``."""
    group = str(payload.get("group", ctx.queue))
    tracker.enter(group)
    try:
        time.sleep(float(payload.get("sleep", 0)))
    finally:
        tracker.leave(group)
    return "slept"


@handlers.register("test.tracked_async")
async def tracked_async(payload: dict[str, Any], ctx: JobContext) -> str:
    """:func:`tracked_sync` as an async handler (cancel and timeout do stop it)."""
    group = str(payload.get("group", ctx.queue))
    tracker.enter(group)
    try:
        await asyncio.sleep(float(payload.get("sleep", 0)))
    finally:
        tracker.leave(group)
    return "slept"


@handlers.register("test.barrier")
def barrier(payload: dict[str, Any], ctx: JobContext) -> int:
    """Waits until all parties of the barrier (set_barrier) run at once; fails if they never do."""
    tracker.enter("barrier")
    try:
        return _barrier[0].wait()
    finally:
        tracker.leave("barrier")


@handlers.register("test.sync_raise_if_cancelled")
def sync_raise_if_cancelled(payload: dict[str, Any], ctx: JobContext) -> str:
    """Works in small steps, calling ctx.raise_if_cancelled() between them (for up to 30 s)."""
    tracker.enter("raise_if_cancelled")
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            ctx.raise_if_cancelled()
            time.sleep(0.01)
        return "finished"
    finally:
        tracker.leave("raise_if_cancelled")


def _note(payload: dict[str, Any], what: str) -> None:
    """Record ``what`` in the list ``payload["key"]`` of the Redis at ``payload["redis"]`` (from any process)."""
    import redis as sync_redis

    with sync_redis.Redis.from_url(str(payload["redis"])) as r:
        r.rpush(str(payload["key"]), what)


@handlers.register("test.isolated_stubborn", isolate=True)
def isolated_stubborn(payload: dict[str, Any], ctx: JobContext) -> str:
    """In a child process: notes its pid, then sleeps ``sleep`` s whatever happens (cancel, SIGTERM)."""
    _note(payload, f"pid {os.getpid()}")
    deadline = time.monotonic() + float(payload.get("sleep", 60))
    while time.monotonic() < deadline:
        time.sleep(0.05)
    _note(payload, "returned")
    return "slept"


@handlers.register("test.isolated_polite", isolate=True)
def isolated_polite(payload: dict[str, Any], ctx: JobContext) -> str:
    """In a child process: notes its pid, then works until ``ctx.cancelled`` (SIGTERM) and notes that."""
    _note(payload, f"pid {os.getpid()}")
    deadline = time.monotonic() + 60
    while not ctx.cancelled and time.monotonic() < deadline:
        time.sleep(0.01)
    _note(payload, "saw cancelled")
    return "stopped"


@handlers.register("test.isolated_echo", isolate=True)
def isolated_echo(payload: dict[str, Any], ctx: JobContext) -> dict[str, Any]:
    """In a child process: reports progress, then returns its pid and payload, or raises as asked."""
    ctx.progress_threadsafe(50, "half way in a child")
    if payload.get("permanent"):
        raise PermanentError(str(payload["permanent"]))
    if payload.get("rate_limited"):
        raise RateLimited(float(payload["rate_limited"]))
    return {"pid": os.getpid(), "echo": payload.get("echo"), "traceparent": ctx.traceparent}


@handlers.register("test.traced")
async def traced(payload: dict[str, Any], ctx: JobContext) -> str:
    """Adds a span of its own (tracing tests): a child of the worker's process span."""
    from opentelemetry import trace

    with trace.get_tracer("tests.handlers").start_as_current_span("render", attributes={"pages": 2}):
        await asyncio.sleep(0)
    return "rendered"


@handlers.register("test.traced_sync")
def traced_sync(payload: dict[str, Any], ctx: JobContext) -> str:
    """The same in a plain function, which runs in the worker's threads."""
    from opentelemetry import trace

    with trace.get_tracer("tests.handlers").start_as_current_span("render in a thread"):
        pass
    return "rendered"


_LOG_FIELDS = ("job_id", "queue", "type", "attempt", "worker")


@handlers.register("test.log_context")
async def log_context(payload: dict[str, Any], ctx: JobContext) -> dict[str, Any]:
    """Returns the logging context its log lines carry (structlog's contextvars)."""
    bound = structlog.contextvars.get_contextvars()
    return {k: bound.get(k) for k in _LOG_FIELDS}


@handlers.register("test.log_context_sync")
def log_context_sync(payload: dict[str, Any], ctx: JobContext) -> dict[str, Any]:
    """As test.log_context, from a sync handler's thread."""
    bound = structlog.contextvars.get_contextvars()
    return {k: bound.get(k) for k in _LOG_FIELDS}
