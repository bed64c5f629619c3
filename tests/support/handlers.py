"""Handlers used by the tests (beside the shipped demo handlers)."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections import Counter
from typing import Any

from conveyor.worker.demo import handlers as demo
from conveyor.worker.handlers import Handlers, JobContext

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
