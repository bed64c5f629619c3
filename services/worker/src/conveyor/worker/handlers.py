"""The handler API: register functions by job type; they get the payload and a context.

Example::

    from conveyor.worker.handlers import Handlers, JobContext

    handlers = Handlers()

    @handlers.register("emails.send")
    async def send(payload: dict, ctx: JobContext) -> dict:
        await ctx.progress(50, "rendered")
        return {"sent": True}

A plain ``def`` runs in the worker's own threads (one per slot of its concurrency) and
keeps its slot until it returns, even after a cancel or timeout: check ``ctx.cancelled``
between steps. A handler that cannot is registered with ``isolate=True`` (a child process
per attempt, killed on cancel or timeout; ADR 0012)::

    @handlers.register("reports.render")
    def render(payload: dict, ctx: JobContext) -> dict:
        for page in payload["pages"]:
            ctx.raise_if_cancelled()
            ...
        return {"rendered": len(payload["pages"])}

    @handlers.register("pdf.convert", isolate=True)
    def convert(payload: dict, ctx: JobContext) -> dict:
        return {"bytes": run_the_c_library(payload["url"])}

Point the worker at it with ``CONVEYOR_HANDLERS=myapp.jobs:handlers``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib
import inspect
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

JSON = Any
Handler = Callable[[dict[str, Any], "JobContext"], Awaitable[JSON] | JSON]


class PermanentError(Exception):
    """Raise from a handler when retrying cannot help (bad input, a missing record...).

    The job fails at once, whatever attempts it has left.
    """


class JobCancelled(Exception):
    """Raised by :meth:`JobContext.raise_if_cancelled` once the attempt was cancelled or timed out.

    Let it propagate: the attempt's outcome (CANCELLED, or a Timeout failure) was already
    decided when the flag was set; whatever the handler returns or raises after that is ignored.
    """


class Flag:
    """A one-way flag: set once on the worker's event loop, read from anywhere.

    Reading or writing one attribute is atomic in CPython, so a sync handler in its thread
    may poll it; a threading.Event (a lock and a condition) cost more per job than the rest
    of starting it.
    """

    __slots__ = ("_set",)

    def __init__(self) -> None:
        self._set = False

    def set(self) -> None:
        self._set = True

    def is_set(self) -> bool:
        return self._set


class RateLimited(Exception):
    """Raise from a handler when the service it calls said "slow down" (HTTP 429, a quota).

    Starts of the job's rate key (or, with ``whole_queue=True`` or when the job has no
    rate key, of its whole queue) are held back for ``retry_after`` seconds across every
    worker, and this job runs again after that. The retry does not use up the job's
    ``max_attempts`` (only the absolute ceiling of 100 attempts applies).

    Args:
        retry_after: Seconds to hold back starts (e.g. the Retry-After header).
        whole_queue: Hold back the whole queue rather than the job's rate key.
    """

    def __init__(self, retry_after: float, *, whole_queue: bool = False, message: str = "") -> None:
        super().__init__(message or f"rate limited: retry after {retry_after:g} s")
        self.retry_after = max(0.001, float(retry_after))
        self.whole_queue = whole_queue

    def __reduce__(self) -> tuple[Any, ...]:
        # Comes back from an isolated attempt's process through a pipe (pickled).
        return (_rate_limited, (self.retry_after, self.whole_queue, str(self)))


def _rate_limited(retry_after: float, whole_queue: bool, message: str) -> RateLimited:
    return RateLimited(retry_after, whole_queue=whole_queue, message=message)


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
        rate_key: Its flow-control key ("" when none).
        traceparent: While tracing is on, the W3C traceparent of this attempt's ``process`` span
            ("" when off): to continue the trace where the current span does not reach, as in an
            ``isolate=True`` handler's child process or a message to another system.
    """

    job_id: str
    queue: str
    type: str
    attempt: int
    worker_id: str
    labels: Mapping[str, str]
    _report: Callable[[float, str], Awaitable[None]] = field(repr=False)
    _loop: asyncio.AbstractEventLoop = field(repr=False)
    _back_off: Callable[[float, bool], Awaitable[None]] | None = field(default=None, repr=False)
    rate_key: str = ""
    _cancel: Flag = field(default_factory=Flag, repr=False)
    traceparent: str = ""
    #: Progress reported from the handler's thread: the worker records it before the outcome.
    _progress_sent: list[concurrent.futures.Future[None]] = field(default_factory=list, repr=False)

    @property
    def cancelled(self) -> bool:
        """True once CancelJob asked this attempt to stop, or its timeout passed.

        An async handler is cancelled for you (``asyncio.CancelledError`` at its next
        await); a sync handler, which runs in a thread, should check this between steps
        (or call :meth:`raise_if_cancelled`): its thread, its worker slot, its concurrency-cap
        slot and its claim are held until it returns. One that cannot check should be
        registered with ``isolate=True``.
        """
        return self._cancel.is_set()

    def raise_if_cancelled(self) -> None:
        """Raise :class:`JobCancelled` if the attempt was cancelled or timed out (see :attr:`cancelled`)."""
        if self._cancel.is_set():
            raise JobCancelled(f"job {self.job_id} attempt {self.attempt} was cancelled or timed out")

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
        self._progress_sent.append(asyncio.run_coroutine_threadsafe(self.progress(percent, message), self._loop))

    async def back_off(self, seconds: float, *, whole_queue: bool = False) -> None:
        """Hold back starts of this job's rate key (or of the whole queue) for ``seconds``.

        Every worker sees it at once; running jobs go on. Raising :class:`RateLimited`
        does this and retries the job; call this directly to slow down but still finish.
        """
        if self._back_off is not None:
            await self._back_off(max(0.001, float(seconds)), whole_queue or not self.rate_key)

    def back_off_threadsafe(self, seconds: float, *, whole_queue: bool = False) -> None:
        """:meth:`back_off` from a sync handler (it runs in a thread); waits until it is recorded."""
        asyncio.run_coroutine_threadsafe(self.back_off(seconds, whole_queue=whole_queue), self._loop).result(10)


class Handlers:
    """A registry of handlers by job type.

    Handlers may be ``async def`` (run on the worker's event loop) or plain ``def`` (run
    in the worker's own pool of threads, one per slot of its concurrency, so they cannot
    stall the loop). They receive the payload (a dict) and a :class:`JobContext`, and
    return a JSON-able value, which becomes the result.

    ``isolate=True`` runs each attempt in a child process (forked from a fork server): on
    cancel or timeout the child gets SIGTERM (which sets ``ctx.cancelled``) and SIGKILL 2 s
    later, so even a handler that never checks ``ctx.cancelled`` gives back its slot. The
    handler must be a module-level function (it is sent to the child by name), and its
    payload, result and exceptions pass through a pipe (pickled).
    """

    def __init__(self) -> None:
        self._handlers: dict[str, Handler] = {}
        self._async: dict[str, bool] = {}
        self._isolated: set[str] = set()

    def register(self, job_type: str, *, isolate: bool = False) -> Callable[[Handler], Handler]:
        """Decorator registering a handler for ``job_type``.

        Args:
            job_type: The job type it runs.
            isolate: Run each attempt in a child process that cancel and timeout kill.

        Raises:
            ValueError: ``job_type`` already has a handler.
        """

        def decorate(fn: Handler) -> Handler:
            if job_type in self._handlers:
                raise ValueError(f"a handler for {job_type!r} is already registered")
            self._handlers[job_type] = fn
            self._async[job_type] = inspect.iscoroutinefunction(fn)
            if isolate:
                self._isolated.add(job_type)
            return fn

        return decorate

    def isolated_modules(self) -> list[str]:
        """The modules defining ``isolate=True`` handlers (the fork server imports them once)."""
        return sorted({getattr(self._handlers[t], "__module__", "") for t in self._isolated} - {"", "__main__"})

    def is_isolated(self, job_type: str) -> bool:
        """Whether ``job_type``'s attempts run in a child process (``isolate=True``)."""
        return job_type in self._isolated

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
            self.register(job_type, isolate=other.is_isolated(job_type))(fn)


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
