"""Attempts of ``isolate=True`` handlers: each in a child process that cancel and timeout can kill.

Children are forked by a multiprocessing fork server (ADR 0012): a small single-threaded
process started once, which imports the handler modules and forks a child per attempt. Forking
the worker itself is not safe (its heartbeat thread, handler threads and event loop may hold
locks a child would inherit locked), and spawning a fresh interpreter per attempt costs a whole
import of the handler's dependencies.

The child runs the handler with a context whose ``cancelled`` flag its SIGTERM handler sets,
whose progress and back-off go up the pipe, and sends back ("ok", result) or ("error",
exception), pickled. To stop it the worker sends SIGTERM, then SIGKILL after
:data:`KILL_AFTER_S`; the attempt (and its slot) ends when the process has exited.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import multiprocessing.connection
import signal
import sys
from dataclasses import dataclass
from typing import Any

import structlog

from conveyor.worker.handlers import Flag, Handler, JobContext

log = structlog.get_logger("conveyor.worker")

#: Seconds between SIGTERM and SIGKILL for an isolated attempt asked to stop.
KILL_AFTER_S = 2.0

_context = multiprocessing.get_context("forkserver")
_preloaded: set[str] = set()


class ChildDied(Exception):
    """The isolated attempt's process ended without sending its outcome (killed, crashed, os._exit)."""


@dataclass
class _ChildContext(JobContext):
    """The JobContext of an isolated attempt, inside the child: reports go up the pipe."""

    _conn: Any = None

    def _send(self, message: tuple[Any, ...]) -> None:
        self._conn.send(message)

    async def progress(self, percent: float, message: str = "") -> None:
        self._send(("progress", max(0.0, min(100.0, float(percent))), message))

    def progress_threadsafe(self, percent: float, message: str = "") -> None:
        self._send(("progress", max(0.0, min(100.0, float(percent))), message))

    async def back_off(self, seconds: float, *, whole_queue: bool = False) -> None:
        self._send(("back_off", max(0.001, float(seconds)), whole_queue))

    def back_off_threadsafe(self, seconds: float, *, whole_queue: bool = False) -> None:
        self._send(("back_off", max(0.001, float(seconds)), whole_queue))


async def _unused_report(percent: float, message: str) -> None:  # pragma: no cover - replaced by the pipe
    return None


def _child_main(
    conn: multiprocessing.connection.Connection, handler: Handler, payload: dict[str, Any], fields: dict[str, Any]
) -> None:
    """Runs in the child: the handler once, its outcome up the pipe."""
    stop = Flag()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    ctx = _ChildContext(**fields, _report=_unused_report, _loop=None, _cancel=stop, _conn=conn)  # type: ignore[arg-type]
    try:
        result = handler(payload, ctx)
        if asyncio.iscoroutine(result):
            result = asyncio.run(result)
        conn.send(("ok", result))
    except BaseException as exc:
        try:
            conn.send(("error", exc))
        except Exception:  # not picklable: keep its kind and message
            conn.send(("error", RuntimeError(f"{type(exc).__name__}: {exc}")))
    finally:
        conn.close()


def prepare(modules: list[str]) -> None:
    """Start the fork server now, importing ``modules`` (those of the isolated handlers) once.

    Called at worker start, before any handler thread exists, so the first isolated attempt
    does not pay for it; without it the server starts at the first isolated attempt.
    """
    for module in modules:
        _preload(module)
    if modules:
        from multiprocessing import forkserver

        forkserver.ensure_running()


def _preload(module: str) -> None:
    """Have the fork server import the handler's module once (before it starts), not each child."""
    if module in _preloaded:
        return
    _preloaded.add(module)
    _context.set_forkserver_preload(sorted({"conveyor.worker.isolate", *_preloaded}))


class IsolatedCall:
    """One isolated attempt: start it, read its pipe on the event loop, stop it on request.

    ``done`` resolves (with the handler's result, or its exception, or :class:`ChildDied`)
    only once the child process has exited.
    """

    def __init__(self, handler: Handler, payload: dict[str, Any], ctx: JobContext) -> None:
        self._handler = handler
        self._payload = payload
        self._ctx = ctx
        self._loop = asyncio.get_running_loop()
        self.done: asyncio.Future[Any] = self._loop.create_future()
        self._outcome: tuple[Any, ...] | None = None
        self._proc: Any = None
        self._conn: multiprocessing.connection.Connection | None = None
        self._kill: asyncio.TimerHandle | None = None
        self._stopping = False

    async def start(self) -> None:
        module = getattr(self._handler, "__module__", "") or ""
        if module and module != "__main__" and module in sys.modules:
            _preload(module)
        ctx = self._ctx
        fields = {
            "job_id": ctx.job_id,
            "queue": ctx.queue,
            "type": ctx.type,
            "attempt": ctx.attempt,
            "worker_id": ctx.worker_id,
            "labels": dict(ctx.labels),
            "rate_key": ctx.rate_key,
            "traceparent": ctx.traceparent,
        }
        reader, writer = _context.Pipe(duplex=False)
        proc = _context.Process(
            target=_child_main,
            args=(writer, self._handler, self._payload, fields),
            name=f"conveyor-isolated-{ctx.job_id}",
            daemon=True,
        )
        try:
            # Talking to the fork server (and starting it the first time) blocks: not on the loop.
            await asyncio.to_thread(proc.start)
        finally:
            writer.close()
        self._proc, self._conn = proc, reader
        self._loop.add_reader(reader.fileno(), self._readable)
        self._loop.add_reader(proc.sentinel, self._exited)
        log.debug("isolated_attempt_started", pid=proc.pid)

    def _readable(self) -> None:
        conn = self._conn
        if conn is None:
            return
        try:
            while conn.poll():
                self._message(conn.recv())
        except (EOFError, OSError):
            self._loop.remove_reader(conn.fileno())

    def _message(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "progress":
            self._loop.create_task(self._ctx.progress(message[1], message[2]))
        elif kind == "back_off":
            self._loop.create_task(self._ctx.back_off(message[1], whole_queue=message[2]))
        else:
            self._outcome = message

    def _exited(self) -> None:
        proc, conn = self._proc, self._conn
        self._loop.remove_reader(proc.sentinel)
        if conn is not None:
            self._readable()  # what it sent just before it exited
            self._loop.remove_reader(conn.fileno())
            conn.close()
            self._conn = None
        if self._kill is not None:
            self._kill.cancel()
        proc.join()  # it has exited: reaps at once
        code = proc.exitcode
        proc.close()
        if self.done.done():
            return
        if self._outcome is not None and self._outcome[0] == "ok":
            self.done.set_result(self._outcome[1])
        elif self._outcome is not None:
            self.done.set_exception(self._outcome[1])
        else:
            how = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
            self.done.set_exception(ChildDied(f"the isolated attempt's process ended ({how}) without an outcome"))

    def stop(self, now: bool = False) -> None:
        """SIGTERM now (the child's ``ctx.cancelled`` turns true), SIGKILL after :data:`KILL_AFTER_S`.

        With ``now`` (the worker is stopping), SIGKILL at once.
        """
        if self._proc is None or self.done.done():
            return
        if now:
            log.warning("isolated_attempt_killed", pid=self._proc.pid, reason="worker stopping")
            self._proc.kill()
            return
        if self._stopping:
            return
        self._stopping = True
        pid = self._proc.pid
        self._proc.terminate()
        log.info("isolated_attempt_terminated", pid=pid)

        def kill() -> None:
            if not self.done.done():
                log.warning("isolated_attempt_killed", pid=pid, after_s=KILL_AFTER_S)
                self._proc.kill()

        self._kill = self._loop.call_later(KILL_AFTER_S, kill)
