"""The worker's own thread pool for sync handlers, sized to its concurrency.

Not asyncio's default executor (at most min(32, cores + 4) threads, shared with everything
else that uses ``to_thread``), and not a ``ThreadPoolExecutor`` (the interpreter joins its
threads at exit, so one handler that never returns would hang the worker's shutdown): daemon
threads, started on demand up to ``size``. Every sync attempt holds a worker slot until its
thread returns, so at most ``size`` calls are ever queued or running and none waits for a thread.
"""

from __future__ import annotations

import contextvars
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

_Work = tuple[Future[Any], contextvars.Context, Callable[..., Any], tuple[Any, ...]]


class ThreadPool:
    """Up to ``size`` daemon threads running submitted calls in the caller's context (contextvars)."""

    def __init__(self, size: int, name: str = "conveyor-handler") -> None:
        if size < 1:
            raise ValueError("a thread pool needs at least one thread")
        self.size = size
        self._name = name
        self._work: queue.SimpleQueue[_Work | None] = queue.SimpleQueue()
        #: Threads waiting for work, and calls put and not yet taken (both under the lock).
        self._waiting = 0
        self._queued = 0
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        #: Calls submitted and not yet returned (observability; tests read it).
        self.running = 0

    @property
    def threads(self) -> int:
        """How many threads were started so far."""
        return len(self._threads)

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        """Run ``fn(*args)`` on a pool thread; the future gets its result or exception."""
        future: Future[Any] = Future()
        with self._lock:
            self.running += 1
            self._queued += 1
            # Never leave a call queued behind busy threads while the pool may still grow.
            if self._queued > self._waiting and len(self._threads) < self.size:
                thread = threading.Thread(
                    target=self._serve, name=f"{self._name}-{len(self._threads) + 1}", daemon=True
                )
                self._threads.append(thread)
                thread.start()
            self._work.put((future, contextvars.copy_context(), fn, args))
        return future

    def _serve(self) -> None:
        while True:
            with self._lock:
                self._waiting += 1
            work = self._work.get()
            with self._lock:
                self._waiting -= 1
                if work is not None:
                    self._queued -= 1
            if work is None:
                return
            future, context, fn, args = work
            result: Any = None
            error: BaseException | None = None
            run = future.set_running_or_notify_cancel()
            if run:
                try:
                    result = context.run(fn, *args)
                except BaseException as exc:
                    error = exc
            # Counted out before the caller hears of it: a caller that saw the future done sees running drop.
            with self._lock:
                self.running -= 1
            if run:
                if error is not None:
                    future.set_exception(error)
                else:
                    future.set_result(result)
            del work, future, result, error

    def shutdown(self) -> None:
        """Let idle threads end (a thread still running a handler ends when it returns; it never blocks exit)."""
        for _ in self._threads:
            self._work.put(None)
