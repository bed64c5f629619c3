"""No-op handlers for bench/worker_cost.py: `cost.noop` (async) and `cost.noop_sync` (a plain def,
run in the worker's threads). Both return None, like `demo.noop`: the figure is the worker's own work."""

from __future__ import annotations

from typing import Any

from conveyor.worker.handlers import Handlers, JobContext

handlers = Handlers()


@handlers.register("cost.noop")
async def noop(payload: dict[str, Any], ctx: JobContext) -> None:
    return None


@handlers.register("cost.noop_sync")
def noop_sync(payload: dict[str, Any], ctx: JobContext) -> None:
    return None
