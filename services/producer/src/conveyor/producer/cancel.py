"""CancelJob: stop a job wherever it is (waiting, delayed, or running)."""

from __future__ import annotations

import time

from conveyor.common.errors import FailedPrecondition, InvalidArgument, NotFound
from conveyor.common.ids import parse_job_id
from conveyor.common.keys import queue_keys
from conveyor.common.scripts import Scripts
from conveyor.producer.history import History
from conveyor.v1 import event_pb2, job_pb2, producer_service_pb2

MAX_REASON = 1000


class Canceller:
    """Cancels jobs.

    Args:
        scripts: Scripts on the queues' Redis.
        history: The results service, to tell a finished job from an unknown one.
        retention_ms: How long the cancelled job's live record stays in Redis.
    """

    def __init__(self, scripts: Scripts, history: History, retention_ms: int) -> None:
        self._scripts = scripts
        self._history = history
        self._retention_ms = retention_ms

    async def cancel(self, job_id: str, reason: str = "") -> producer_service_pb2.CancelJobResponse:
        """Cancel ``job_id``.

        Raises:
            InvalidArgument: Malformed id or over-long reason.
            NotFound: No such job.
            FailedPrecondition: The job already finished (other than cancelled).
        """
        parsed = parse_job_id(job_id)
        if parsed is None:
            raise InvalidArgument({"job_id": "must be a job id like '<queue>/<ULID>'"})
        if len(reason) > MAX_REASON:
            raise InvalidArgument({"reason": f"must be at most {MAX_REASON} characters"})
        queue, ulid = parsed
        reason = reason or "cancelled"
        event = event_pb2.JobEvent(type=event_pb2.EVENT_TYPE_CANCELLED)
        event.time.FromNanoseconds(time.time_ns())
        event.error.message = reason
        event.error.kind = "Cancelled"
        outcome, state = await self._scripts.cancel(
            queue_keys(queue), ulid, event.SerializeToString(), self._retention_ms, reason
        )
        if outcome == 1:
            return producer_service_pb2.CancelJobResponse(state=job_pb2.JOB_STATE_CANCELLED)
        if outcome == 2:
            return producer_service_pb2.CancelJobResponse(state=job_pb2.JOB_STATE_ACTIVE, cancel_requested=True)
        if outcome == 0:
            if state == job_pb2.JOB_STATE_CANCELLED:  # repeating a cancel is harmless
                return producer_service_pb2.CancelJobResponse(state=job_pb2.JOB_STATE_CANCELLED)
            raise _finished(job_id, state)
        job = await self._history.get_job(job_id)  # NotFound when nobody knows it
        if job.state == job_pb2.JOB_STATE_CANCELLED:
            return producer_service_pb2.CancelJobResponse(state=job_pb2.JOB_STATE_CANCELLED)
        if job.state in (job_pb2.JOB_STATE_UNSPECIFIED,):
            raise NotFound(f"job {job_id} not found")
        raise _finished(job_id, job.state)


def _finished(job_id: str, state: int) -> FailedPrecondition:
    name = job_pb2.JobState.Name(state).removeprefix("JOB_STATE_")  # type: ignore[arg-type]
    return FailedPrecondition(f"job {job_id} already finished ({name}); only unfinished jobs can be cancelled", job_id)
