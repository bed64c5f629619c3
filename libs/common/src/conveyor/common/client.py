"""ConveyorClient: the Python client for ProducerService and ResultsService.

Example::

    async with ConveyorClient("127.0.0.1:50051") as client:
        job_id = (await client.enqueue("default", "demo.echo", {"hello": "world"})).job_id
        async for event in client.watch(job_id):
            print(event.type, event.progress.percent)

Errors arrive as :class:`conveyor.common.errors.ConveyorError` subclasses
(``InvalidArgument`` carries ``violations``). Calls that fail with UNAVAILABLE or
DEADLINE_EXCEEDED are retried; that is safe for Enqueue because the client gives
every job an idempotency key when the caller did not.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from datetime import timedelta
from types import TracebackType
from typing import Any, Self, TypeVar

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from conveyor.common.codec import dumps
from conveyor.common.errors import ConveyorError, Internal, InvalidArgument
from conveyor.v1 import (
    event_pb2,
    job_pb2,
    producer_service_pb2,
    producer_service_pb2_grpc,
    results_service_pb2,
    results_service_pb2_grpc,
)

T = TypeVar("T")

RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
#: Window for keys the client makes up only to make its own retries safe.
CLIENT_KEY_WINDOW = timedelta(minutes=10)


def from_rpc_error(exc: grpc.aio.AioRpcError | grpc.RpcError) -> ConveyorError:
    """The ConveyorError that a failed call stands for, with google.rpc details unpacked."""
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    message = (exc.details() if hasattr(exc, "details") else None) or str(code)
    status = rpc_status.from_call(exc) if isinstance(exc, grpc.Call) else None
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        violations: dict[str, str] = {}
        details: list[Any] = list(status.details) if status else []
        for detail in details:
            if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                violations.update({v.field: v.description for v in bad.field_violations})
        return InvalidArgument(violations or {"request": message})
    cls = ConveyorError.by_code.get(code, Internal)
    err = cls(message)
    err.code = code  # type: ignore[misc]
    return err


class ConveyorClient:
    """An async client. Use as ``async with``, or call :meth:`close`.

    Args:
        producer_addr: "host:port" of ProducerService.
        results_addr: "host:port" of ResultsService (for :meth:`list_jobs`); optional.
        timeout: Deadline of each unary call, in seconds.
        retries: Extra tries for UNAVAILABLE / DEADLINE_EXCEEDED.
    """

    def __init__(
        self,
        producer_addr: str,
        results_addr: str | None = None,
        *,
        timeout: float = 10.0,
        retries: int = 3,
    ) -> None:
        self._channel = grpc.aio.insecure_channel(producer_addr)
        self._producer = producer_service_pb2_grpc.ProducerServiceStub(self._channel)
        self._results_channel = grpc.aio.insecure_channel(results_addr) if results_addr else None
        self._results = (
            results_service_pb2_grpc.ResultsServiceStub(self._results_channel) if self._results_channel else None
        )
        self._timeout = timeout
        self._retries = retries

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channels."""
        await self._channel.close()
        if self._results_channel is not None:
            await self._results_channel.close()

    async def _call(self, fn: Callable[[], Awaitable[T]]) -> T:
        delay = 0.05
        for attempt in range(self._retries + 1):
            try:
                return await fn()
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in RETRYABLE or attempt == self._retries:
                    raise from_rpc_error(exc) from None
            await asyncio.sleep(delay * (1 + random.random()))
            delay = min(delay * 2, 1.0)
        raise AssertionError("unreachable")

    @staticmethod
    def request(
        queue: str,
        type: str,
        payload: Mapping[str, Any] | None = None,
        *,
        idempotency_key: str | None = None,
        priority: int = 0,
        timeout: timedelta | None = None,
        max_attempts: int = 0,
        labels: Mapping[str, str] | None = None,
    ) -> producer_service_pb2.EnqueueRequest:
        """Build an EnqueueRequest (payload sent as compact JSON bytes).

        Args:
            queue: Queue name.
            type: Handler name.
            payload: A JSON-able mapping.
            idempotency_key: Makes retries safe across processes; when None the client
                makes one up (honoured for 10 minutes) so that its own retries are safe.
            priority: 1 (lowest) to 9 (highest); 0 means the default.
            timeout: Longest one attempt may run.
            max_attempts: Attempts in all; 0 means the queue default.
            labels: Free-form labels.
        """
        req = producer_service_pb2.EnqueueRequest(
            queue=queue,
            type=type,
            payload_json=dumps(dict(payload or {})),
            priority=priority,
            labels=dict(labels or {}),
        )
        if idempotency_key is None:
            req.idempotency_key = f"client:{uuid.uuid4().hex}"
            req.idempotency_window.FromTimedelta(CLIENT_KEY_WINDOW)
        else:
            req.idempotency_key = idempotency_key
        if timeout is not None:
            req.timeout.FromTimedelta(timeout)
        if max_attempts:
            req.retry.max_attempts = max_attempts
        return req

    async def enqueue(
        self, queue: str, type: str, payload: Mapping[str, Any] | None = None, **options: Any
    ) -> producer_service_pb2.EnqueueResponse:
        """Enqueue one job; ``options`` are those of :meth:`request`.

        Returns:
            The job id, whether it was newly created, and its state.

        Raises:
            InvalidArgument: A field is bad (see ``violations``).
            ResourceExhausted: The payload is over the limit.
            Unavailable: Redis or the producer could not be reached after retries.
        """
        req = self.request(queue, type, payload, **options)
        return await self._call(lambda: self._producer.Enqueue(req, timeout=self._timeout))

    async def enqueue_batch(
        self, requests: Sequence[producer_service_pb2.EnqueueRequest]
    ) -> list[producer_service_pb2.EnqueueResponse]:
        """Enqueue many jobs (built with :meth:`request`) in one call; results in order.

        Raises:
            InvalidArgument: A job is bad; nothing was enqueued.
        """
        req = producer_service_pb2.EnqueueBatchRequest(jobs=requests)
        response = await self._call(lambda: self._producer.EnqueueBatch(req, timeout=self._timeout))
        return list(response.results)

    async def get_job(self, job_id: str) -> job_pb2.Job:
        """The job's current state, payload and outcome.

        Raises:
            NotFound: No such job.
        """
        req = producer_service_pb2.GetJobRequest(job_id=job_id)
        response = await self._call(lambda: self._producer.GetJob(req, timeout=self._timeout))
        return response.job

    async def watch(self, job_id: str, after_event_id: str = "") -> AsyncIterator[event_pb2.JobEvent]:
        """Yield the job's events until its final one, resuming after a dropped stream.

        Raises:
            NotFound: No such job.
        """
        last = after_event_id
        attempts = 0
        while True:
            call = self._producer.Watch(producer_service_pb2.WatchRequest(job_id=job_id, after_event_id=last))
            try:
                async for response in call:
                    attempts = 0
                    last = response.event.id
                    yield response.event
                return
            except grpc.aio.AioRpcError as exc:
                attempts += 1
                if exc.code() not in RETRYABLE or attempts > self._retries:
                    raise from_rpc_error(exc) from None
                await asyncio.sleep(0.1 * attempts)

    async def list_jobs(self, **filters: Any) -> results_service_pb2.ListJobsResponse:
        """One page of ResultsService.ListJobs; ``filters`` are ListJobsRequest fields."""
        if self._results is None:
            raise ValueError("ConveyorClient was created without results_addr")
        stub = self._results
        req = results_service_pb2.ListJobsRequest(**filters)
        return await self._call(lambda: stub.ListJobs(req, timeout=self._timeout))
