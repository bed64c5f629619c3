"""Running one attempt of a job: find its handler, call it, turn what happened into an outcome event."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import structlog

from conveyor.common import crypto, logs, tracing
from conveyor.common.codec import dumps, embed_job, length_delimited, timestamp_bytes, varint
from conveyor.common.defaults import retry_policy
from conveyor.v1 import event_pb2, job_pb2
from conveyor.worker.handlers import Flag, Handlers, JobCancelled, JobContext, PermanentError, RateLimited
from conveyor.worker.isolate import IsolatedCall
from conveyor.worker.retry import retry_delay_ms, should_retry
from conveyor.worker.threads import ThreadPool

log = structlog.get_logger("conveyor.worker")

MAX_ERROR_MESSAGE = 4000
#: However often a job is rate limited, it stops after this many attempts (validate.MAX_ATTEMPTS).
MAX_ATTEMPTS_CEILING = 100


@dataclass(slots=True)
class Attempt:
    """One claimed attempt of a job (treat as read-only; not frozen, which made it cost three times as much)."""

    #: As stored, with its id and queue set: a default retry policy is absent, so read it
    #: through retry_policy (filling it in on every job would cost the success path).
    job: job_pb2.Job
    job_bytes: bytes
    attempt: int


def _error(message: str, kind: str, retryable: bool) -> job_pb2.JobError:
    return job_pb2.JobError(message=message[:MAX_ERROR_MESSAGE], kind=kind, retryable=retryable)


_SUCCEEDED = b"\x18" + varint(event_pb2.EVENT_TYPE_SUCCEEDED)


def succeeded_event(attempt: Attempt, worker_id: str, result_json: bytes, now_ns: int) -> bytes:
    """JobEvent{type: SUCCEEDED, attempt, time, worker, result_json, job}, encoded by hand (the
    common outcome of every job; see codec)."""
    return b"".join(
        (
            _SUCCEEDED,
            b"\x20",
            varint(attempt.attempt),
            length_delimited(b"\x2a", timestamp_bytes(now_ns)),
            length_delimited(b"\x32", worker_id.encode()),
            length_delimited(b"\x4a", result_json),
            length_delimited(b"\x62", attempt.job_bytes),
        )
    )


class Cancellation:
    """Set (on the loop, for the heartbeat thread) when CancelJob asks a running attempt to stop.

    One is made per attempt: a plain class with slots (a dataclass with factories cost twice as much).
    """

    __slots__ = ("begun", "interrupt", "reason", "requested", "stop")

    def __init__(self) -> None:
        self.requested = Flag()
        self.reason = "cancelled"
        #: What the handler sees as ``ctx.cancelled``: set on cancel and on timeout.
        self.stop = Flag()
        #: Set while the attempt runs in a thread or child process: CancelJob wakes it through this
        #: instead of cancelling its task (a task cancel then only ever means the worker is stopping).
        self.interrupt: Callable[[], None] | None = None
        #: The attempt's task has begun (before that, a cancel is seen by run_attempt at its start).
        self.begun = False

    def request(self, reason: str) -> bool:
        """CancelJob asked to stop: True if the attempt's task must be cancelled (a running async handler)."""
        self.reason = reason
        self.requested.set()
        self.stop.set()
        if self.interrupt is not None:
            self.interrupt()
            return False
        # A task cancelled before its first step would end without an outcome (and hold its slot).
        return self.begun


class _Stopped(Exception):
    """A thread or child attempt that was asked to stop (cancel or timeout) has really ended."""

    def __init__(self, cancelled: bool) -> None:
        super().__init__("cancelled" if cancelled else "timed out")
        self.cancelled = cancelled


_default_pool: ThreadPool | None = None


def default_pool() -> ThreadPool:
    """A pool for callers that bring none (the runner brings one sized to its concurrency)."""
    global _default_pool
    if _default_pool is None:
        _default_pool = ThreadPool(32)
    return _default_pool


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


async def _held_until_ended(
    done: asyncio.Future[Any], limit_s: float, cancellation: Cancellation, stop: Callable[[bool], None]
) -> Any:
    """Wait for a thread or child attempt; on timeout or cancel, ask it to stop and keep waiting.

    The attempt (so its slot, its concurrency-cap slot and its claim) lasts until the thread
    returns or the child exits, whatever it does. Its outcome was decided when it was asked to
    stop (:class:`_Stopped`); what it returns after that is dropped. Cancelling this task (the
    worker stopping) ends the wait and leaves the claim pending.
    """
    # One future woken by whichever comes first (the call's end, CancelJob, the timeout): an
    # Event, a task waiting on it and asyncio.wait cost more than the rest of a no-op sync job.
    loop = asyncio.get_running_loop()
    first: asyncio.Future[None] = loop.create_future()

    def wake(*_: object) -> None:
        if not first.done():
            first.set_result(None)

    cancellation.interrupt = wake
    done.add_done_callback(wake)
    timer = loop.call_later(limit_s, wake) if limit_s > 0 else None
    try:
        if cancellation.requested.is_set():  # asked before the attempt got here
            wake()
        try:
            await first
        except asyncio.CancelledError:
            # The worker is stopping (its grace is over): the claim stays pending for another
            # worker, so a child must not run on beside that one; it is killed at once.
            stop(True)
            done.add_done_callback(_retrieve)  # nobody awaits it any more: no "never retrieved" noise
            raise
        if done.done():
            return done.result()
        cancelled = cancellation.requested.is_set()
        cancellation.stop.set()
        stop(False)
        log.warning(
            "attempt_stopping",
            reason="cancelled" if cancelled else "timeout",
            detail="its slot, cap slot and claim are held until the handler really returns",
        )
        started = time.perf_counter()
        await asyncio.wait({done})  # the worker stopping cancels this wait (the child was told to stop)
        if not done.cancelled() and done.exception() is not None:
            log.debug("handler_raised_after_stop", error=repr(done.exception()))
        log.info("attempt_stopped", waited_ms=round((time.perf_counter() - started) * 1000, 3))
        raise _Stopped(cancelled)
    finally:
        if timer is not None:
            timer.cancel()
        cancellation.interrupt = None


async def _progress_recorded(ctx: JobContext) -> None:
    """Wait for the progress a sync handler reported from its thread (``progress_threadsafe`` does
    not wait): what it reported before it returned is recorded before its outcome."""
    for sent in ctx._progress_sent:
        with contextlib.suppress(Exception):  # best effort, as progress is (report logs what it drops)
            await asyncio.wrap_future(sent)


async def run_attempt(
    attempt: Attempt,
    handlers: Handlers,
    worker_id: str,
    report: Callable[[float, str], Awaitable[None]],
    cancellation: Cancellation | None = None,
    back_off: Callable[[float, bool], Awaitable[None]] | None = None,
    pool: ThreadPool | None = None,
) -> tuple[int, bytes, int]:
    """Run the job's handler once.

    Returns:
        The new JobState (SUCCEEDED, RETRY_SCHEDULED or FAILED), the serialized outcome
        JobEvent (final ones with the job embedded), and for a retry when it is due (ms).
    """
    job = attempt.job
    cancellation = cancellation or Cancellation()
    cancellation.begun = True
    # The job id is not stored in the event: the entry's j field and the stream say it.
    event = event_pb2.JobEvent()
    result_json = b""
    handler = handlers.get(job.type)
    started = time.perf_counter()
    retry_after_ms = 0
    if cancellation.requested.is_set():  # CancelJob arrived before the attempt began: do not start it
        event.type = event_pb2.EVENT_TYPE_CANCELLED
        event.error.CopyFrom(_error(cancellation.reason, "Cancelled", False))
        log.info("job_cancelled", reason=cancellation.reason)
    elif handler is None:
        event.type = event_pb2.EVENT_TYPE_FAILED
        event.error.CopyFrom(
            _error(f"no handler is registered for job type {job.type!r} on this worker", "UnknownJobType", False)
        )
        log.warning("job_failed", error_kind="UnknownJobType")
    else:
        loop = asyncio.get_running_loop()
        ctx = JobContext(
            job_id=job.id,
            queue=job.queue,
            type=job.type,
            attempt=attempt.attempt,
            worker_id=worker_id,
            labels=dict(job.labels) if job.labels else {},
            _report=report,
            _loop=loop,
            _cancel=cancellation.stop,
            _back_off=back_off,
            rate_key=job.rate_key,
            # The process span (runner) is current here while tracing is on.
            traceparent="" if tracing.tracer is None else tracing.current_traceparent(),
        )
        timeout = job.timeout.ToTimedelta().total_seconds() if job.HasField("timeout") else 0.0
        try:
            # An encrypted queue's payload is opened here, for the handler only (ADR 0025).
            sealed = job.payload_json.startswith(crypto.SEALED_JSON)
            payload_json = (
                crypto.open_if_sealed(job.payload_json, crypto.PAYLOAD, job.id) if sealed else job.payload_json
            )
            payload: dict[str, Any] = json.loads(payload_json) if payload_json else {}
            if handlers.is_isolated(job.type):
                isolated = IsolatedCall(handler, payload, ctx)
                await isolated.start()
                result = await _held_until_ended(isolated.done, timeout, cancellation, isolated.stop)
            elif handlers.is_async(job.type):
                call: Awaitable[Any] = handler(payload, ctx)
                result = await (asyncio.wait_for(call, timeout) if timeout > 0 else call)
            else:
                thread = asyncio.wrap_future((pool or default_pool()).submit(handler, payload, ctx))
                try:
                    result = await _held_until_ended(thread, timeout, cancellation, lambda now: None)
                except asyncio.CancelledError:
                    raise
                except BaseException:
                    await _progress_recorded(ctx)
                    raise
                await _progress_recorded(ctx)
            result_json = dumps(result)
            encryption = crypto.current()
            if encryption.keyring is not None and (sealed or encryption.encrypts(job.queue)):
                result_json = encryption.keyring.seal(result_json, crypto.RESULT, job.id)
            if logs.enabled_for(logging.DEBUG):  # the call alone cost more than the rest of a no-op job's run
                log.debug("job_succeeded", duration_ms=round((time.perf_counter() - started) * 1000, 3))
        except asyncio.CancelledError:
            if not cancellation.requested.is_set():
                raise  # shutting down: the claim stays pending for another worker
            event.type = event_pb2.EVENT_TYPE_CANCELLED
            event.error.CopyFrom(_error(cancellation.reason, "Cancelled", False))
            log.info("job_cancelled", reason=cancellation.reason)
        except (_Stopped, JobCancelled) as exc:
            if exc.cancelled if isinstance(exc, _Stopped) else cancellation.requested.is_set():
                event.type = event_pb2.EVENT_TYPE_CANCELLED
                event.error.CopyFrom(_error(cancellation.reason, "Cancelled", False))
                log.info("job_cancelled", reason=cancellation.reason)
            elif isinstance(exc, _Stopped) or cancellation.stop.is_set():
                event.type = event_pb2.EVENT_TYPE_FAILED
                event.error.CopyFrom(
                    _error(f"the attempt ran longer than its timeout of {timeout:g} s", "Timeout", True)
                )
                log.warning("job_failed", error_kind="Timeout")
            else:  # raised by the handler itself, not by raise_if_cancelled
                event.type = event_pb2.EVENT_TYPE_FAILED
                event.error.CopyFrom(_error(str(exc), type(exc).__name__, True))
                log.warning("job_failed", error_kind=type(exc).__name__, error=str(exc))
        except TimeoutError:
            event.type = event_pb2.EVENT_TYPE_FAILED
            event.error.CopyFrom(_error(f"the attempt ran longer than its timeout of {timeout:g} s", "Timeout", True))
            log.warning("job_failed", error_kind="Timeout")
        except RateLimited as exc:
            event.type = event_pb2.EVENT_TYPE_FAILED
            event.error.CopyFrom(_error(str(exc), "RateLimited", True))
            retry_after_ms = max(1, round(exc.retry_after * 1000))
            log.info("job_rate_limited", retry_after_s=exc.retry_after, whole_queue=exc.whole_queue)
            try:
                await ctx.back_off(exc.retry_after, whole_queue=exc.whole_queue)
            except Exception as err:  # the retry below still waits retry_after; the back-off is best effort
                log.warning("back_off_failed", error=str(err))
        except PermanentError as exc:
            event.type = event_pb2.EVENT_TYPE_FAILED
            event.error.CopyFrom(_error(str(exc) or type(exc).__name__, type(exc).__name__, False))
            log.warning("job_failed", error_kind=type(exc).__name__, error=str(exc), retryable=False)
        except crypto.SealError as exc:
            # No key for it here, or a damaged value: another worker (or this one, once its keyring
            # is fixed) may open it, so the attempt is retried; the message names the key id.
            event.type = event_pb2.EVENT_TYPE_FAILED
            event.error.CopyFrom(_error(str(exc), "SealedPayload", True))
            log.warning("job_failed", error_kind="SealedPayload", error=str(exc))
        except (TypeError, ValueError) as exc:
            # Includes a result that is not JSON-able; the message says which.
            event.type = event_pb2.EVENT_TYPE_FAILED
            event.error.CopyFrom(_error(f"{type(exc).__name__}: {exc}", type(exc).__name__, True))
            log.warning("job_failed", error_kind=type(exc).__name__, error=str(exc), exc_info=exc)
        except Exception as exc:
            event.type = event_pb2.EVENT_TYPE_FAILED
            event.error.CopyFrom(_error(str(exc) or type(exc).__name__, type(exc).__name__, True))
            log.warning("job_failed", error_kind=type(exc).__name__, error=str(exc), exc_info=exc)
    now_ns = time.time_ns()
    if result_json:
        return job_pb2.JOB_STATE_SUCCEEDED, succeeded_event(attempt, worker_id, result_json, now_ns), 0
    event.attempt = attempt.attempt
    event.worker = worker_id
    event.time.FromNanoseconds(now_ns)
    if event.type == event_pb2.EVENT_TYPE_CANCELLED:
        return job_pb2.JOB_STATE_CANCELLED, embed_job(event.SerializeToString(), attempt.job_bytes), 0
    if retry_after_ms and attempt.attempt < MAX_ATTEMPTS_CEILING:
        # Rate limited: not the job's fault, so it does not use up max_attempts.
        due_ms = now_ns // 1_000_000 + retry_after_ms
        event.type = event_pb2.EVENT_TYPE_RETRY_SCHEDULED
        event.next_run_at.FromMilliseconds(due_ms)
        return job_pb2.JOB_STATE_RETRY_SCHEDULED, event.SerializeToString(), due_ms
    policy = retry_policy(job)
    if should_retry(policy, attempt.attempt, event.error.retryable):
        due_ms = now_ns // 1_000_000 + retry_delay_ms(policy, attempt.attempt)
        event.type = event_pb2.EVENT_TYPE_RETRY_SCHEDULED
        event.next_run_at.FromMilliseconds(due_ms)
        log.info("job_retry_scheduled", next_run_at_ms=due_ms, max_attempts=policy.max_attempts)
        return job_pb2.JOB_STATE_RETRY_SCHEDULED, event.SerializeToString(), due_ms
    return job_pb2.JOB_STATE_FAILED, embed_job(event.SerializeToString(), attempt.job_bytes), 0
