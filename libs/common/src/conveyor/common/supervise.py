"""Every background loop of a process runs under one Supervisor (DESIGN.md invariants 8 and 9).

A loop that raises is restarted with capped exponential backoff and jitter: a Redis or
PostgreSQL fault (see faults.py) is logged as a warning, anything else once with its traceback.
Loops also report faults they handle themselves (``LoopStatus.failed``) and every step that
worked (``LoopStatus.ok``). From that the supervisor tells the truth on ``grpc.health.v1``: a
process with a loop failing for ``unhealthy_after_s`` says NOT_SERVING, and one failing for
``exit_after_s`` exits non-zero (LoopsFailing) so that its orchestrator restarts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import structlog

from conveyor.common import faults

log = structlog.get_logger("conveyor.supervise")

#: First and longest wait before a failed loop runs again.
FIRST_DELAY_S = 0.05
MAX_DELAY_S = 5.0
#: A restarted loop that runs this long without failing again has recovered.
SETTLE_S = 2.0
#: How often health is recomputed.
CHECK_INTERVAL_S = 0.25
#: Exit status of a process whose loops kept failing (EX_SOFTWARE would say bug; this is "try again").
EXIT_LOOPS_FAILING = 75  # EX_TEMPFAIL


class LoopsFailing(Exception):
    """A loop failed longer than the supervisor's exit time: the process exits (EXIT_LOOPS_FAILING) for a restart."""

    def __init__(self, names: Sequence[str]) -> None:
        super().__init__(f"loops failing too long: {', '.join(names)}")
        self.names = list(names)


@dataclass
class LoopStatus:
    """How one loop is doing. Cheap to update: loops call ``ok`` on every step that worked.

    Safe to update from another thread (plain attribute writes): the heartbeat thread does.
    """

    name: str
    #: Monotonic time of the first failure of the current streak; None while the loop works.
    failing_since: float | None = None
    #: Monotonic time of the latest failure.
    last_failed_at: float = 0.0
    last_error: str = ""
    failures: int = 0
    restarts: int = 0
    _delay: float = field(default=FIRST_DELAY_S, repr=False)

    def ok(self) -> None:
        """The loop made progress: its failure streak (if any) is over."""
        if self.failing_since is not None:
            log.info("loop_recovered", loop=self.name, failures=self.failures)
            self.failing_since = None
            self.failures = 0
        self._delay = FIRST_DELAY_S

    def failed(self, exc: BaseException) -> None:
        """The loop met ``exc`` and will try again."""
        self.last_failed_at = time.monotonic()
        if self.failing_since is None:
            self.failing_since = self.last_failed_at
        self.failures += 1
        self.last_error = f"{type(exc).__name__}: {exc}"

    def next_delay(self) -> float:
        """The wait before the next try: doubling up to MAX_DELAY_S, with jitter (half to full)."""
        delay = self._delay
        self._delay = min(self._delay * 2, MAX_DELAY_S)
        return delay * (0.5 + random.random() / 2)

    def failing_for(self, now: float) -> float:
        return 0.0 if self.failing_since is None else now - self.failing_since


class Supervisor:
    """Runs loops, restarts them when they fail, and reports the process's health.

    Args:
        unhealthy_after_s: A loop failing this long turns health NOT_SERVING.
        exit_after_s: A loop failing this long ends the process (LoopsFailing); 0 never.
    """

    def __init__(self, *, unhealthy_after_s: float = 5.0, exit_after_s: float = 300.0) -> None:
        self.unhealthy_after_s = unhealthy_after_s
        self.exit_after_s = exit_after_s
        self.loops: dict[str, LoopStatus] = {}
        self.serving = True
        self._listeners: list[Callable[[bool], Awaitable[None]]] = []

    def status(self, name: str) -> LoopStatus:
        """The status of loop ``name`` (created on first use)."""
        found = self.loops.get(name)
        if found is None:
            found = self.loops[name] = LoopStatus(name)
        return found

    def on_health(self, listener: Callable[[bool], Awaitable[None]]) -> None:
        """Call ``listener(serving)`` whenever health changes."""
        self._listeners.append(listener)

    async def run(self, name: str, body: Callable[[], Awaitable[None]], stop: asyncio.Event) -> None:
        """Run ``body()`` until it returns (it should once ``stop`` is set), restarting it when it raises."""
        status = self.status(name)
        loop = asyncio.get_running_loop()
        while True:
            # A loop that ran SETTLE_S since its restart without failing again has recovered, even
            # if it never reports progress itself.
            started = time.monotonic()
            settled = loop.call_later(SETTLE_S, _settle, status, started)
            try:
                await body()
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                status.failed(exc)
                status.restarts += 1
                fault = faults.redis_fault(exc)
                if fault is not None or _transient(exc):
                    log.warning(
                        "loop_fault", loop=name, fault=fault.name if fault else type(exc).__name__, error=str(exc)
                    )
                elif status.failures == 1:
                    log.error("loop_crashed", loop=name, exc_info=exc)
                else:  # the traceback was logged at the start of this streak
                    log.error("loop_crashed_again", loop=name, failures=status.failures, error=status.last_error)
            finally:
                settled.cancel()
            if stop.is_set():
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), status.next_delay())
            if stop.is_set():
                return

    def failing(self, now: float | None = None) -> list[LoopStatus]:
        """Loops failing for at least ``unhealthy_after_s``."""
        now = time.monotonic() if now is None else now
        limit = self.unhealthy_after_s
        return [s for s in self.loops.values() if s.failing_since is not None and s.failing_for(now) >= limit]

    async def watch(self, stop: asyncio.Event) -> None:
        """Recompute health until ``stop`` is set; raise LoopsFailing past the exit time."""
        while not stop.is_set():
            now = time.monotonic()
            failing = self.failing(now)
            serving = not failing
            if serving != self.serving:
                self.serving = serving
                if serving:
                    log.info("health_serving")
                else:
                    log.error(
                        "health_not_serving",
                        loops={s.name: s.last_error for s in failing},
                        failing_s=round(max(s.failing_for(now) for s in failing), 1),
                    )
                for listener in self._listeners:
                    await listener(serving)
            if self.exit_after_s > 0:
                doomed = [s.name for s in failing if s.failing_for(now) >= self.exit_after_s]
                if doomed:
                    log.critical("loops_failing_exit", loops=doomed, exit_after_s=self.exit_after_s)
                    raise LoopsFailing(doomed)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), CHECK_INTERVAL_S)


def _settle(status: LoopStatus, started: float) -> None:
    if status.failing_since is not None and status.last_failed_at < started:
        status.ok()


_EXTRA_TRANSIENT: list[Callable[[BaseException], bool]] = []


def register_transient(check: Callable[[BaseException], bool]) -> None:
    """Let a service add what else counts as a passing fault (the results service: PostgreSQL's)."""
    _EXTRA_TRANSIENT.append(check)


def _transient(exc: BaseException) -> bool:
    return any(check(exc) for check in _EXTRA_TRANSIENT)
