"""The handler API: register functions by job type; they get the payload and a context.

Example::

    from conveyor.worker.handlers import Handlers, JobContext

    handlers = Handlers()

    @handlers.register("emails.send")
    async def send(payload: dict, ctx: JobContext) -> dict:
        await ctx.progress(50, "rendered")
        return {"sent": True}

Point the worker at it with ``CONVEYOR_HANDLERS=myapp.jobs:handlers``.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import threading
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

JSON = Any
Handler = Callable[[dict[str, Any], "JobContext"], Awaitable[JSON] | JSON]


class PermanentError(Exception):
    """Raise from a handler when retrying cannot help (bad input, a missing record...).

    The job fails at once, whatever attempts it has left.
    """


@dataclass
class JobContext:
    """What a handler knows about the job it runs, and how it reports progress.

    Attributes:
        job_id: The job's id.
        queue: Its queue.
        type: Its handler name.
        attempt: 1 for the first run, 2 for the first retry...
        worker_id: The worker running it.
        labels: The job's labels.
    """

    job_id: str
    queue: str
    type: str
    attempt: int
    worker_id: str
    labels: Mapping[str, str]
    _report: Callable[[float, str], Awaitable[None]] = field(repr=False)
    _loop: asyncio.AbstractEventLoop = field(repr=False)
    _cancel: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def cancelled(self) -> bool:
        """True once CancelJob asked this attempt to stop.

        An async handler is cancelled for you (``asyncio.CancelledError`` at its next
        await); a sync handler, which runs in a thread, should check this between steps.
        """
        return self._cancel.is_set()

    async def progress(self, percent: float, message: str = "") -> None:
        """Report progress (0-100) from an async handler; watchers see it at once.

        Args:
            percent: How far the job is, 0 to 100.
            message: A short note for people.
        """
        await self._report(max(0.0, min(100.0, float(percent))), message)

    def progress_threadsafe(self, percent: float, message: str = "") -> None:
        """Report progress from a sync handler (it runs in a thread); does not wait.

        Args:
            percent: How far the job is, 0 to 100.
            message: A short note for people.
        """
        asyncio.run_coroutine_threadsafe(self.progress(percent, message), self._loop)


class Handlers:
    """A registry of handlers by job type.

    Handlers may be ``async def`` (run on the worker's event loop) or plain ``def``
    (run in a thread so they cannot stall the loop). They receive the payload (a dict)
    and a :class:`JobContext`, and return a JSON-able value, which becomes the result.
    """

    def __init__(self) -> None:
        self._handlers: dict[str, Handler] = {}
        self._async: dict[str, bool] = {}

    def register(self, job_type: str) -> Callable[[Handler], Handler]:
        """Decorator registering a handler for ``job_type``.

        Raises:
            ValueError: ``job_type`` already has a handler.
        """

        def decorate(fn: Handler) -> Handler:
            if job_type in self._handlers:
                raise ValueError(f"a handler for {job_type!r} is already registered")
            self._handlers[job_type] = fn
            self._async[job_type] = inspect.iscoroutinefunction(fn)
            return fn

        return decorate

    def get(self, job_type: str) -> Handler | None:
        """The handler for ``job_type``, or None."""
        return self._handlers.get(job_type)

    def is_async(self, job_type: str) -> bool:
        """Whether the handler for ``job_type`` is a coroutine function."""
        return self._async.get(job_type, False)

    def __iter__(self) -> Iterator[str]:
        return iter(self._handlers)

    def __len__(self) -> int:
        return len(self._handlers)

    def merge(self, other: Handlers) -> None:
        """Add ``other``'s handlers; a type registered twice is an error."""
        for job_type, fn in other._handlers.items():
            self.register(job_type)(fn)


def load_handlers(specs: tuple[str, ...]) -> Handlers:
    """Load ``module:attribute`` Handlers objects and merge them.

    Raises:
        ValueError: A spec is malformed or does not name a Handlers object.
    """
    merged = Handlers()
    for spec in specs:
        module_name, _, attr = spec.partition(":")
        if not module_name or not attr:
            raise ValueError(f"CONVEYOR_HANDLERS entry {spec!r}: expected 'module:attribute'")
        found = getattr(importlib.import_module(module_name), attr, None)
        if not isinstance(found, Handlers):
            raise ValueError(f"CONVEYOR_HANDLERS entry {spec!r}: not a conveyor.worker.handlers.Handlers object")
        merged.merge(found)
    return merged
