"""Demo handlers shipped with the worker: demo.echo, demo.sleep, demo.fail, demo.noop."""

from __future__ import annotations

import asyncio
from typing import Any

from conveyor.worker.handlers import Handlers, JobContext, PermanentError

handlers = Handlers()


@handlers.register("demo.echo")
async def echo(payload: dict[str, Any], ctx: JobContext) -> dict[str, Any]:
    """Returns the payload."""
    return payload


@handlers.register("demo.noop")
async def noop(payload: dict[str, Any], ctx: JobContext) -> None:
    """Does nothing (benchmarks)."""
    return None


@handlers.register("demo.sleep")
async def sleep(payload: dict[str, Any], ctx: JobContext) -> dict[str, Any]:
    """Sleeps ``seconds`` (default 1) in ``steps`` (default 4) steps, reporting progress after each."""
    seconds = float(payload.get("seconds", 1))
    steps = max(1, int(payload.get("steps", 4)))
    for step in range(1, steps + 1):
        await asyncio.sleep(seconds / steps)
        await ctx.progress(100 * step / steps, f"step {step} of {steps}")
    return {"slept": seconds, "steps": steps}


@handlers.register("demo.fail")
async def fail(payload: dict[str, Any], ctx: JobContext) -> None:
    """Fails with ``message``; ``permanent: true`` makes the failure not retryable."""
    message = str(payload.get("message", "demo failure"))
    if payload.get("permanent"):
        raise PermanentError(message)
    raise RuntimeError(message)
