"""Reading finished jobs from the results service, for jobs that have left Redis."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from conveyor.common import auth
from conveyor.common.codec import reveal_event, reveal_job
from conveyor.common.errors import NotFound, Unavailable
from conveyor.common.tls import ClientTLS
from conveyor.v1 import event_pb2, job_pb2, results_service_pb2, results_service_pb2_grpc


class History:
    """A ResultsService client; without an address, every job not in Redis is unknown.

    Args:
        addr: "host:port" of ResultsService, or "" for none.
        timeout_s: Deadline of each call.
        token: The bearer token to present (CONVEYOR_TOKEN), when ResultsService checks tokens.
        tls: How to dial it (CONVEYOR_TLS_*; ADR 0024); None: as the environment says.
    """

    def __init__(self, addr: str, timeout_s: float = 5.0, token: str = "", tls: ClientTLS | None = None) -> None:
        self._timeout = timeout_s
        self._channel = auth.dial(addr, token, tls=tls) if addr else None
        self._stub = results_service_pb2_grpc.ResultsServiceStub(self._channel) if self._channel else None

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()

    async def get_job(self, job_id: str) -> job_pb2.Job:
        """The job as the results service knows it.

        Raises:
            NotFound: No such job.
            Unavailable: The results service cannot be reached.
        """
        if self._stub is None:
            raise NotFound(f"job {job_id} not found")
        try:
            response = await self._stub.GetJob(
                results_service_pb2.ResultsServiceGetJobRequest(job_id=job_id), timeout=self._timeout
            )
        except grpc.aio.AioRpcError as exc:
            raise _translate(exc, job_id) from None
        return reveal_job(response.job)  # a results service without the key answers it sealed

    async def finished_stats(self, queue: str) -> results_service_pb2.FinishedStats:
        """The queue's recently finished jobs, per window (ResultsService.GetFinishedStats).

        Raises:
            Unavailable: No results service is configured, or it cannot be reached.
        """
        if self._stub is None:
            raise Unavailable("no results service is configured (CONVEYOR_RESULTS_ADDR)")
        try:
            response = await self._stub.GetFinishedStats(
                results_service_pb2.GetFinishedStatsRequest(queue=queue), timeout=self._timeout
            )
        except grpc.aio.AioRpcError as exc:
            raise Unavailable(f"the results service is unavailable ({exc.code().name}): {exc.details()}") from None
        return response.stats

    async def exists(self, job_id: str) -> bool:
        try:
            await self.get_job(job_id)
        except NotFound:
            return False
        return True

    async def events(self, job_id: str, after_event_id: str = "") -> AsyncIterator[event_pb2.JobEvent]:
        """The job's recorded events after ``after_event_id``, oldest first (none if unknown)."""
        if self._stub is None:
            return
        after = after_event_id
        while True:
            try:
                page = await self._stub.ListJobEvents(
                    results_service_pb2.ListJobEventsRequest(job_id=job_id, after_event_id=after),
                    timeout=self._timeout,
                )
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.NOT_FOUND:
                    return
                raise _translate(exc, job_id) from None
            for event in page.events:
                yield reveal_event(event)
            if not page.has_more or not page.events:
                return
            after = page.events[-1].id


def _translate(exc: grpc.aio.AioRpcError, job_id: str) -> Exception:
    if exc.code() == grpc.StatusCode.NOT_FOUND:
        return NotFound(f"job {job_id} not found")
    return Unavailable(f"the results service is unavailable ({exc.code().name}); retry shortly")
