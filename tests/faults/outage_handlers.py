"""Handlers for the outage tests, beside the demo handlers (CONVEYOR_HANDLERS=tests.faults.outage_handlers:handlers)."""

from __future__ import annotations

import asyncio
from typing import Any

from conveyor.worker.demo import handlers as demo
from conveyor.worker.handlers import Handlers, JobContext

handlers = Handlers()
handlers.merge(demo)


@handlers.register("outage.nap")
async def nap(payload: dict[str, Any], ctx: JobContext) -> float:
    """Sleeps ``seconds`` without touching Redis (no progress reports): only the claim and the outcome do."""
    seconds = float(payload.get("seconds", 0.05))
    await asyncio.sleep(seconds)
    return seconds
