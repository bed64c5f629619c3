"""Running one attempt of a job: find its handler, call it, turn what happened into an outcome event."""

from __future__ import annotations

import asyncio
import json
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import structlog

from conveyor.common.codec import dumps, embed_job
from conveyor.v1 import event_pb2, job_pb2
from conveyor.worker.handlers import Handlers, JobContext, PermanentError

log = structlog.get_logger("conveyor.worker")

MAX_ERROR_MESSAGE = 4000


@dataclass(frozen=True, slots=True)
class Attempt:
    """One claimed attempt of a job."""

    job: job_pb2.Job
    job_bytes: bytes
    attempt: int


def _error(message: str, kind: str, retryable: bool) -> job_pb2.JobError:
    return job_pb2.JobError(message=message[:MAX_ERROR_MESSAGE], kind=kind, retryable=retryable)


async def run_attempt(
    attempt: Attempt,
    handlers: Handlers,
    worker_id: str,
    report: Callable[[float, str], Awaitable[None]],
) -> tuple[int, bytes]:
    """Run the job's handler once.

    Returns:
        The final JobState and the serialized outcome JobEvent (with the job embedded).
    """
    job = attempt.job
    # The job id is not stored in the event: the entry's j field and the stream say it.
    event = event_pb2.JobEvent(attempt=attempt.attempt, worker=worker_id)
    handler = handlers.get(job.type)
    started = time.perf_counter()
    if handler is None:
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
            labels=dict(job.labels),
            _report=report,
            _loop=loop,
        )
        timeout = job.timeout.ToTimedelta().total_seconds() if job.HasField("timeout") else 0.0
        try:
            payload: dict[str, Any] = json.loads(job.payload_json) if job.payload_json else {}
            if handlers.is_async(job.type):
                call: Awaitable[Any] = handler(payload, ctx)
            else:
                call = asyncio.to_thread(handler, payload, ctx)
            result = await (asyncio.wait_for(call, timeout) if timeout > 0 else call)
            event.result_json = dumps(result)
            event.type = event_pb2.EVENT_TYPE_SUCCEEDED
            log.debug("job_succeeded", duration_ms=round((time.perf_counter() - started) * 1000, 3))
        except TimeoutError:
            event.type = event_pb2.EVENT_TYPE_FAILED
            event.error.CopyFrom(_error(f"the attempt ran longer than its timeout of {timeout:g} s", "Timeout", True))
            log.warning("job_failed", error_kind="Timeout")
        except PermanentError as exc:
            event.type = event_pb2.EVENT_TYPE_FAILED
            event.error.CopyFrom(_error(str(exc) or type(exc).__name__, type(exc).__name__, False))
            log.warning("job_failed", error_kind=type(exc).__name__, error=str(exc), retryable=False)
        except (TypeError, ValueError) as exc:
            # Includes a result that is not JSON-able; the message says which.
            event.type = event_pb2.EVENT_TYPE_FAILED
            event.error.CopyFrom(_error(f"{type(exc).__name__}: {exc}", type(exc).__name__, True))
            log.warning("job_failed", error_kind=type(exc).__name__, error=str(exc), exc_info=exc)
        except Exception as exc:
            event.type = event_pb2.EVENT_TYPE_FAILED
            detail = "".join(traceback.format_exception_only(exc)).strip()
            event.error.CopyFrom(_error(detail, type(exc).__name__, True))
            log.warning("job_failed", error_kind=type(exc).__name__, error=str(exc), exc_info=exc)
    event.time.FromNanoseconds(time.time_ns())
    state = job_pb2.JOB_STATE_SUCCEEDED if event.type == event_pb2.EVENT_TYPE_SUCCEEDED else job_pb2.JOB_STATE_FAILED
    return state, embed_job(event.SerializeToString(), attempt.job_bytes)
