"""Handlers for the chaos run (bench/chaos.py): `CONVEYOR_HANDLERS=bench.chaos_handlers:handlers`.

`chaos.work` sleeps for the payload's `sleep_ms` (asynchronously), then fails if the payload
says `fail: true` (on every attempt, so such a job ends FAILED once its attempts are used up)
and otherwise returns `{"i": <payload i>, "attempt": <attempt>}`. What a job does is decided by
the driver when it enqueues it, so a run is reproducible from its seed.
"""

from __future__ import annotations

import asyncio
from typing import Any

from conveyor.worker.handlers import Handlers, JobContext

handlers = Handlers()


class ChaosFailure(Exception):
    """The failure a `fail: true` job raises on every attempt (retryable, like any exception)."""


@handlers.register("chaos.work")
async def work(payload: dict[str, Any], ctx: JobContext) -> dict[str, Any]:
    sleep_ms = float(payload.get("sleep_ms", 0.0))
    if sleep_ms > 0:
        await asyncio.sleep(sleep_ms / 1000)
    if payload.get("fail"):
        raise ChaosFailure(f"job {payload.get('i')} is meant to fail (attempt {ctx.attempt})")
    return {"i": payload.get("i"), "attempt": ctx.attempt}
