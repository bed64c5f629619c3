"""ConveyorClient: the Python client for ProducerService, ScheduleService and ResultsService.

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
import os
import random
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any, Self, TypeVar, cast

import grpc
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from conveyor.common import auth
from conveyor.common.codec import dumps, reveal_event, reveal_job
from conveyor.common.errors import ConveyorError, Internal, InvalidArgument, ResourceExhausted
from conveyor.common.tls import ClientTLS
from conveyor.v1 import (
    admin_service_pb2,
    admin_service_pb2_grpc,
    event_pb2,
    job_pb2,
    limits_pb2,
    producer_service_pb2,
    producer_service_pb2_grpc,
    results_service_pb2,
    results_service_pb2_grpc,
    schedule_service_pb2,
    schedule_service_pb2_grpc,
)

T = TypeVar("T")

RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
#: Window for keys the client makes up only to make its own retries safe.
CLIENT_KEY_WINDOW = timedelta(minutes=10)


def from_rpc_error(exc: grpc.aio.AioRpcError | grpc.RpcError) -> ConveyorError:
    """The ConveyorError that a failed call stands for, with google.rpc details unpacked."""
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    message = (exc.details() if hasattr(exc, "details") else None) or str(code)
    # AioRpcError is not a grpc.Call but has the methods from_call reads.
    status = rpc_status.from_call(cast(grpc.Call, exc)) if hasattr(exc, "trailing_metadata") else None
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


_STATUS_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}
_CLIENT_KEY_WINDOW = duration_pb2.Duration(seconds=int(CLIENT_KEY_WINDOW.total_seconds()))


class _KeySource:
    """Idempotency keys for the client's own retries: 96 random bits each, as unguessable as a
    uuid4's, drawn from the OS 4 KiB at a time (a uuid4 per key was a system call, about 2 µs).
    A forked child throws away what its parent drew, so the two never hand out the same key."""

    _KEYS_PER_DRAW = 341
    _HEX = 24  # 12 bytes

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._drop()
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._drop)

    def _drop(self) -> None:
        self._hex = ""
        self._at = 0

    def __call__(self) -> str:
        with self._lock:
            at = self._at
            if at >= len(self._hex):
                self._hex = os.urandom(self._KEYS_PER_DRAW * self._HEX // 2).hex()
                at = 0
            self._at = at + self._HEX
            buffer = self._hex
        return "client:" + buffer[at : at + self._HEX]


_client_key = _KeySource()


def _duration(value: timedelta) -> duration_pb2.Duration:
    out = duration_pb2.Duration()
    out.FromTimedelta(value)
    return out


class PartiallyEnqueued(Exception):
    """EnqueueBatch accepted some jobs and not others (their queues' writes failed; ADR 0014).

    A batch is atomic per queue, not across queues: this says exactly which jobs exist.
    Send :attr:`failed_requests` again (or the whole batch: with the same idempotency keys,
    which :meth:`ConveyorClient.request` always sets, the accepted jobs come back with
    ``created`` false and the same ids).

    Attributes:
        results: Every result, in request order; a job not accepted has ``error`` set.
        accepted: Request index -> result, for each accepted job.
        failures: Request index -> the error (``Unavailable``, ``ResourceExhausted``...) of
            each job not accepted.
        failed_requests: Request index -> the request, for each job not accepted.
    """

    def __init__(
        self,
        requests: Sequence[producer_service_pb2.EnqueueRequest],
        results: Sequence[producer_service_pb2.EnqueueResponse],
    ) -> None:
        self.results = list(results)
        self.accepted: dict[int, producer_service_pb2.EnqueueResponse] = {}
        self.failures: dict[int, ConveyorError] = {}
        self.failed_requests: dict[int, producer_service_pb2.EnqueueRequest] = {}
        for index, (req, result) in enumerate(zip(requests, results, strict=True)):
            if result.HasField("error"):
                code = _STATUS_BY_NUMBER.get(result.error.code, grpc.StatusCode.UNKNOWN)
                self.failures[index] = ConveyorError.by_code.get(code, Internal)(result.error.message)
                self.failed_requests[index] = req
            else:
                self.accepted[index] = result
        messages = sorted({e.message for e in self.failures.values()})
        super().__init__(
            f"{len(self.accepted)} of {len(self.results)} jobs enqueued; "
            f"{len(self.failures)} not: {'; '.join(messages)}"
        )

    @property
    def accepted_ids(self) -> list[str]:
        """Job ids of the accepted jobs, in request order."""
        return [result.job_id for result in self.accepted.values()]


def _scope(
    req: limits_pb2.SetRateLimitRequest
    | limits_pb2.SetConcurrencyLimitRequest
    | limits_pb2.ClearRateLimitRequest
    | limits_pb2.ClearConcurrencyLimitRequest,
    key: str | None,
    each_key: bool,
) -> None:
    if key is not None and each_key:
        raise ValueError("give key or each_key, not both")
    if key is not None:
        req.key = key
    elif each_key:
        req.each_key = True


class ConveyorClient:
    """An async client. Use as ``async with``, or call :meth:`close`.

    Args:
        producer_addr: "host:port" of ProducerService.
        results_addr: "host:port" of ResultsService (for :meth:`list_jobs`); optional.
        timeout: Deadline of each unary call, in seconds.
        retries: Extra tries for UNAVAILABLE / DEADLINE_EXCEEDED.
        coalesce: Send concurrent :meth:`enqueue` calls together as EnqueueBatch calls.
        token: Bearer token sent on every call, for servers with authentication on; by default
            the environment's ``CONVEYOR_TOKEN`` or ``CONVEYOR_TOKEN_FILE`` (as the CLI reads them), "" for none.
        tls: How to dial (TLS, mTLS; ADR 0024); by default as the environment says
            (``CONVEYOR_TLS``, ``CONVEYOR_TLS_CA_FILE``, ``CONVEYOR_TLS_CLIENT_CERT_FILE`` /
            ``_KEY_FILE``, ``CONVEYOR_TLS_SERVER_NAME``), plaintext when it says nothing.
            :class:`conveyor.common.tls.TLSConfigError` if its files cannot be used.
    """

    def __init__(
        self,
        producer_addr: str,
        results_addr: str | None = None,
        *,
        timeout: float = 10.0,
        retries: int = 3,
        coalesce: bool = True,
        token: str | None = None,
        per_call_token: bool = False,
        tls: ClientTLS | None = None,
    ) -> None:
        if token is None:
            token = auth.presented_token()
        if tls is None:
            tls = ClientTLS.from_env()
        # per_call_token: calls made while auth.CALL_TOKEN is set present that token (the dashboard's login).
        self._channel = auth.dial(producer_addr, token, tls=tls, per_call=per_call_token)
        self._producer = producer_service_pb2_grpc.ProducerServiceStub(self._channel)
        self._admin = admin_service_pb2_grpc.AdminServiceStub(self._channel)
        self._results_channel = (
            auth.dial(results_addr, token, tls=tls, per_call=per_call_token) if results_addr else None
        )
        self._results = (
            results_service_pb2_grpc.ResultsServiceStub(self._results_channel) if self._results_channel else None
        )
        self._schedules = schedule_service_pb2_grpc.ScheduleServiceStub(self._channel)
        self._timeout = timeout
        self._retries = retries
        self._coalescer = _Coalescer(self) if coalesce else None

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
        rate_key: str = "",
        delay: timedelta | None = None,
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
            rate_key: Flow-control key (e.g. a tenant id) for per-key rate limits and caps.
            delay: Start no sooner than this from now.
        """
        # One constructor call with only the fields that are set: each keyword and each
        # message-field setter is a trip through the protobuf runtime (ADR 0033).
        fields: dict[str, Any] = {
            "queue": queue,
            "type": type,
            "payload_json": dumps(payload if isinstance(payload, dict) else dict(payload or {})),
        }
        if priority:
            fields["priority"] = priority
        if labels:
            fields["labels"] = labels if isinstance(labels, dict) else dict(labels)
        if rate_key:
            fields["rate_key"] = rate_key
        if delay is not None:
            fields["delay"] = _duration(delay)
        if idempotency_key is None:
            fields["idempotency_key"] = _client_key()
            fields["idempotency_window"] = _CLIENT_KEY_WINDOW
        else:
            fields["idempotency_key"] = idempotency_key
        if timeout is not None:
            fields["timeout"] = _duration(timeout)
        if max_attempts:
            fields["retry"] = job_pb2.RetryPolicy(max_attempts=max_attempts)
        req = producer_service_pb2.EnqueueRequest(**fields)
        return req

    async def enqueue(
        self, queue: str, type: str, payload: Mapping[str, Any] | None = None, **options: Any
    ) -> producer_service_pb2.EnqueueResponse:
        """Enqueue one job; ``options`` are those of :meth:`request`.

        Concurrent calls from one client are coalesced into EnqueueBatch calls (one
        gRPC call carries many jobs), unless the client was made with ``coalesce=False``.
        Each call still gets its own result or its own error.

        Returns:
            The job id, whether it was newly created, and its state.

        Raises:
            InvalidArgument: A field is bad (see ``violations``).
            ResourceExhausted: The payload is over the limit.
            Unavailable: Redis or the producer could not be reached after retries.
        """
        req = self.request(queue, type, payload, **options)
        if self._coalescer is not None:
            return await self._coalescer.submit(req)
        return await self._call(lambda: self._producer.Enqueue(req, timeout=self._timeout))

    async def enqueue_batch(
        self, requests: Sequence[producer_service_pb2.EnqueueRequest]
    ) -> list[producer_service_pb2.EnqueueResponse]:
        """Enqueue many jobs (built with :meth:`request`) in one call; results in order.

        Validation is all or none; writing is atomic per queue, not across queues (ADR 0014).

        Raises:
            InvalidArgument: A job is bad; nothing was enqueued.
            PartiallyEnqueued: Some queues' jobs were written and others' were not: it says
                which (``accepted``, ``failures``); send ``failed_requests`` again.
            Unavailable, ResourceExhausted: No job was written (after retries).
        """
        req = producer_service_pb2.EnqueueBatchRequest(jobs=requests)
        response = await self._call(lambda: self._producer.EnqueueBatch(req, timeout=self._timeout))
        results = list(response.results)
        if any(result.HasField("error") for result in results):
            raise PartiallyEnqueued(requests, results)
        return results

    async def _enqueue_one(self, req: producer_service_pb2.EnqueueRequest) -> producer_service_pb2.EnqueueResponse:
        return await self._call(lambda: self._producer.Enqueue(req, timeout=self._timeout))

    async def set_rate_limit(
        self, queue: str, limit: int, period: timedelta, *, key: str | None = None, each_key: bool = False
    ) -> limits_pb2.QueueLimits:
        """At most ``limit`` starts per ``period`` across all workers: of the whole queue, of
        each rate key (``each_key``) or of one ``key``. Returns the queue's limits now."""
        req = limits_pb2.SetRateLimitRequest(queue=queue, limit=limit)
        _scope(req, key, each_key)
        req.period.FromTimedelta(period)
        return (await self._call(lambda: self._admin.SetRateLimit(req, timeout=self._timeout))).limits

    async def set_concurrency_limit(
        self, queue: str, limit: int, *, key: str | None = None, each_key: bool = False
    ) -> limits_pb2.QueueLimits:
        """At most ``limit`` jobs running at once across all workers (queue, each key, or one key)."""
        req = limits_pb2.SetConcurrencyLimitRequest(queue=queue, limit=limit)
        _scope(req, key, each_key)
        return (await self._call(lambda: self._admin.SetConcurrencyLimit(req, timeout=self._timeout))).limits

    async def clear_rate_limit(self, queue: str, *, key: str | None = None, each_key: bool = False) -> bool:
        """Remove a rate limit; False when there was none."""
        req = limits_pb2.ClearRateLimitRequest(queue=queue)
        _scope(req, key, each_key)
        return (await self._call(lambda: self._admin.ClearRateLimit(req, timeout=self._timeout))).changed

    async def clear_concurrency_limit(self, queue: str, *, key: str | None = None, each_key: bool = False) -> bool:
        """Remove a concurrency cap; False when there was none."""
        req = limits_pb2.ClearConcurrencyLimitRequest(queue=queue)
        _scope(req, key, each_key)
        return (await self._call(lambda: self._admin.ClearConcurrencyLimit(req, timeout=self._timeout))).changed

    async def get_limits(self, queue: str) -> limits_pb2.QueueLimits:
        """The queue's limits, back-off, keys held back and jobs running now."""
        req = limits_pb2.GetLimitsRequest(queue=queue)
        return (await self._call(lambda: self._admin.GetLimits(req, timeout=self._timeout))).limits

    async def set_default_priority(self, queue: str, priority: int) -> limits_pb2.QueueLimits:
        """The priority (1-9) of the queue's jobs enqueued without one; producers apply it within a second."""
        req = limits_pb2.SetDefaultPriorityRequest(queue=queue, priority=priority)
        return (await self._call(lambda: self._admin.SetDefaultPriority(req, timeout=self._timeout))).limits

    async def back_off(self, queue: str, duration: timedelta, *, key: str = "") -> datetime:
        """Hold back starts of the queue (or of one rate key) for ``duration``; returns the end."""
        req = limits_pb2.BackOffRequest(queue=queue, key=key)
        req.duration.FromTimedelta(duration)
        response = await self._call(lambda: self._admin.BackOff(req, timeout=self._timeout))
        return response.until.ToDatetime(tzinfo=UTC)

    async def clear_back_off(self, queue: str, *, key: str = "") -> bool:
        """End the back-off of the queue (or of one rate key) now; False when none was in force."""
        req = limits_pb2.ClearBackOffRequest(queue=queue, key=key)
        return (await self._call(lambda: self._admin.ClearBackOff(req, timeout=self._timeout))).changed

    async def get_job(self, job_id: str) -> job_pb2.Job:
        """The job's current state, payload and outcome.

        Raises:
            NotFound: No such job.
        """
        req = producer_service_pb2.GetJobRequest(job_id=job_id)
        response = await self._call(lambda: self._producer.GetJob(req, timeout=self._timeout))
        return reveal_job(response.job)

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
                    yield reveal_event(response.event)
                return
            except grpc.aio.AioRpcError as exc:
                attempts += 1
                if exc.code() not in RETRYABLE or attempts > self._retries:
                    raise from_rpc_error(exc) from None
                await asyncio.sleep(0.1 * attempts)

    async def watch_queue(
        self,
        queue: str,
        after_event_id: str = "",
        replay: bool = False,
        event_types: Sequence[event_pb2.EventType.ValueType] = (),
    ) -> AsyncIterator[producer_service_pb2.WatchQueueResponse]:
        """Yield every event of ``queue`` (and gap markers) forever, resuming after a dropped stream.

        Each item has either ``event`` (``event.id``, ``event.job_id``) or ``gap``
        (``WhichOneof("item")`` says which). Starts now, or replays what Redis holds
        (``replay``), or resumes after ``after_event_id``. After a disconnect it resumes
        after the last event it yielded (no gap, no repeat while Redis holds the
        events); before any event arrived it calls again with the same start.

        Raises:
            InvalidArgument: Bad queue name, event id or event type.
        """
        last = after_event_id
        attempts = 0
        while True:
            request = producer_service_pb2.WatchQueueRequest(
                queue=queue, after_event_id=last, replay=replay and not last, event_types=event_types
            )
            call = self._producer.WatchQueue(request)
            try:
                async for response in call:
                    attempts = 0
                    if response.HasField("event"):
                        last = response.event.id
                        reveal_event(response.event)
                    yield response
                return
            except grpc.aio.AioRpcError as exc:
                attempts += 1
                if exc.code() not in RETRYABLE or attempts > self._retries:
                    raise from_rpc_error(exc) from None
                await asyncio.sleep(0.1 * attempts)
            finally:
                call.cancel()

    async def list_jobs(
        self, request: results_service_pb2.ListJobsRequest | None = None, **filters: Any
    ) -> results_service_pb2.ListJobsResponse:
        """One page of ResultsService.ListJobs: ``request``, or one made of ``filters`` (ListJobsRequest fields)."""
        if self._results is None:
            raise ValueError("ConveyorClient was created without results_addr")
        stub = self._results
        if request is not None and filters:
            raise TypeError("give a ListJobsRequest or its fields, not both")
        req = request if request is not None else results_service_pb2.ListJobsRequest(**filters)
        response = await self._call(lambda: stub.ListJobs(req, timeout=self._timeout))
        for job in response.jobs:
            reveal_job(job)
        return response

    async def delete_jobs(self, job_ids: Sequence[str]) -> results_service_pb2.DeleteJobsResponse:
        """Delete finished jobs (1-1000 ids) and their history from the results database (ResultsService.DeleteJobs).

        Jobs not finished or not recorded are left alone and listed in ``response.refused`` with the reason.
        """
        if self._results is None:
            raise ValueError("ConveyorClient was created without results_addr")
        stub = self._results
        req = results_service_pb2.DeleteJobsRequest(job_ids=list(job_ids))
        return await self._call(lambda: stub.DeleteJobs(req, timeout=self._timeout))

    async def get_job_series(
        self, window: results_service_pb2.SeriesWindow.ValueType, queue: str = ""
    ) -> results_service_pb2.GetJobSeriesResponse:
        """Finished jobs per bucket over the last hour, day or week (ResultsService.GetJobSeries), of a queue or all."""
        if self._results is None:
            raise ValueError("ConveyorClient was created without results_addr")
        stub = self._results
        req = results_service_pb2.GetJobSeriesRequest(queue=queue, window=window)
        return await self._call(lambda: stub.GetJobSeries(req, timeout=self._timeout))

    async def get_queue_stats(self, queue: str) -> admin_service_pb2.GetQueueStatsResponse:
        """A queue's live counts (one instant) and, when the results service answers, its finished jobs.

        ``response.finished_unavailable`` says why ``response.finished`` is missing.

        Raises:
            NotFound: The queue was never used and no worker serves it.
        """
        req = admin_service_pb2.GetQueueStatsRequest(queue=queue)
        return await self._call(lambda: self._admin.GetQueueStats(req, timeout=self._timeout))

    async def list_queues(self) -> list[admin_service_pb2.QueueStats]:
        """Every known queue, by name, with its live counts."""
        req = admin_service_pb2.ListQueuesRequest()
        return list((await self._call(lambda: self._admin.ListQueues(req, timeout=self._timeout))).queues)

    async def list_workers(self, queue: str = "") -> list[admin_service_pb2.WorkerInfo]:
        """The live worker processes (only those serving ``queue``, if given), by worker id."""
        req = admin_service_pb2.ListWorkersRequest(queue=queue)
        return list((await self._call(lambda: self._admin.ListWorkers(req, timeout=self._timeout))).workers)

    async def submit(self, req: producer_service_pb2.EnqueueRequest) -> producer_service_pb2.EnqueueResponse:
        """Enqueue one request built with :meth:`request` (and changed as needed, e.g. ``run_at``)."""
        return await self._call(lambda: self._producer.Enqueue(req, timeout=self._timeout))

    async def cancel_job(self, job_id: str, reason: str = "") -> job_pb2.JobState.ValueType:
        """Cancel a job: a waiting one never runs, a running one is asked to stop.

        Returns:
            The job's state after the call (CANCELLED, or ACTIVE while a running attempt stops).

        Raises:
            NotFound: No such job.
            FailedPrecondition: The job already finished.
        """
        req = producer_service_pb2.CancelJobRequest(job_id=job_id, reason=reason)
        return (await self._call(lambda: self._producer.CancelJob(req, timeout=self._timeout))).state

    async def list_job_events(
        self, job_id: str, after_event_id: str = "", page_size: int = 0
    ) -> results_service_pb2.ListJobEventsResponse:
        """One page of a job's history as recorded in PostgreSQL (ResultsService.ListJobEvents)."""
        if self._results is None:
            raise ValueError("ConveyorClient was created without results_addr")
        stub = self._results
        req = results_service_pb2.ListJobEventsRequest(
            job_id=job_id, after_event_id=after_event_id, page_size=page_size
        )
        response = await self._call(lambda: stub.ListJobEvents(req, timeout=self._timeout))
        for event in response.events:
            reveal_event(event)
        return response

    async def reencrypt_redis(self, queue: str) -> admin_service_pb2.ReEncryptResponse:
        """AdminService.ReEncrypt (admin): the queue's parked jobs in Redis sealed again with the
        producer's active key, and counts of what Redis still holds sealed with other keys."""
        req = admin_service_pb2.ReEncryptRequest(queue=queue)
        return await self._call(lambda: self._admin.ReEncrypt(req, timeout=self._timeout))

    async def reencrypt_jobs(
        self, queue: str, after_job_id: str = "", max_jobs: int = 0
    ) -> results_service_pb2.ReEncryptJobsResponse:
        """One step of ResultsService.ReEncryptJobs (admin): seal the queue's stored jobs again with
        the results service's active key; call again with ``next_after_job_id`` until it is empty."""
        if self._results is None:
            raise ValueError("ConveyorClient was created without results_addr")
        stub = self._results
        req = results_service_pb2.ReEncryptJobsRequest(queue=queue, after_job_id=after_job_id, max_jobs=max_jobs)
        return await self._call(lambda: stub.ReEncryptJobs(req, timeout=self._timeout))

    async def pause_queue(self, queue: str) -> bool:
        """Pause a queue (nothing new starts); False when it was paused already."""
        req = admin_service_pb2.PauseQueueRequest(queue=queue)
        return (await self._call(lambda: self._admin.PauseQueue(req, timeout=self._timeout))).changed

    async def resume_queue(self, queue: str) -> bool:
        """Resume a paused queue; False when it was not paused."""
        req = admin_service_pb2.ResumeQueueRequest(queue=queue)
        return (await self._call(lambda: self._admin.ResumeQueue(req, timeout=self._timeout))).changed

    async def list_dead_letters(
        self, queue: str, page_size: int = 0, page_token: str = ""
    ) -> admin_service_pb2.ListDeadLettersResponse:
        """One page of a queue's dead letters, oldest first."""
        req = admin_service_pb2.ListDeadLettersRequest(queue=queue, page_size=page_size, page_token=page_token)
        response = await self._call(lambda: self._admin.ListDeadLetters(req, timeout=self._timeout))
        for letter in response.dead_letters:
            reveal_job(letter.job)
            reveal_event(letter.event)
        return response

    async def retry_dead_letters(self, queue: str, job_id: str = "", *, all: bool = False) -> list[str]:
        """Put one dead letter (or all of the queue's) back as new attempts; the job ids queued again.

        With ``all`` the server takes at most 1,000 per call and says ``more``: this calls again until none are left.
        """
        req = admin_service_pb2.RetryDeadLettersRequest(queue=queue, job_id=job_id, all=all)
        retried: list[str] = []
        while True:
            reply = await self._call(lambda: self._admin.RetryDeadLetters(req, timeout=self._timeout))
            retried += reply.job_ids
            if not reply.more:
                return retried

    async def purge_dead_letters(self, queue: str, job_id: str = "", *, all: bool = False) -> int:
        """Delete one dead letter (or all of the queue's) for good; how many were deleted.

        With ``all`` the server deletes at most 1,000 per call and says ``more``: this calls again until none are left.
        """
        req = admin_service_pb2.PurgeDeadLettersRequest(queue=queue, job_id=job_id, all=all)
        purged = 0
        while True:
            reply = await self._call(lambda: self._admin.PurgeDeadLetters(req, timeout=self._timeout))
            purged += reply.purged
            if not reply.more:
                return purged

    @classmethod
    def schedule_spec(
        cls,
        queue: str,
        type: str,
        payload: Mapping[str, Any] | None = None,
        *,
        cron: str = "",
        time_zone: str = "",
        every: timedelta | None = None,
        start_at: datetime | None = None,
        end_at: datetime | None = None,
        catch_up: bool = False,
        **options: Any,
    ) -> schedule_service_pb2.ScheduleSpec:
        """Build a ScheduleSpec: set ``cron`` (with ``time_zone``) or ``every``.

        Args:
            queue, type, payload, options: The job template, as for :meth:`request`
                (no idempotency_key: each tick derives its own).
            cron: A 5-field cron expression, e.g. "0 9 * * MON-FRI".
            time_zone: IANA zone of ``cron``, e.g. "Europe/Berlin"; empty means UTC.
            every: A fixed interval instead of ``cron``.
            start_at, end_at: No tick before / after these (timezone-aware datetimes).
            catch_up: Missed ticks (everything was down) fire one job (ONCE) instead of
                being skipped (SKIP).
        """
        spec = schedule_service_pb2.ScheduleSpec(
            cron=cron,
            time_zone=time_zone,
            template=cls.request(queue, type, payload, idempotency_key="", **options),
            missed_tick_policy=schedule_service_pb2.MISSED_TICK_POLICY_ONCE
            if catch_up
            else schedule_service_pb2.MISSED_TICK_POLICY_SKIP,
        )
        if every is not None:
            spec.interval.FromTimedelta(every)
        if start_at is not None:
            spec.start_at.FromDatetime(start_at)
        if end_at is not None:
            spec.end_at.FromDatetime(end_at)
        return spec

    async def create_schedule(
        self, schedule_id: str, spec: schedule_service_pb2.ScheduleSpec
    ) -> tuple[schedule_service_pb2.Schedule, bool]:
        """Create the schedule, or replace an existing one's spec (an upsert; the same spec changes nothing).

        Returns:
            The stored schedule (with its next tick) and whether the id was new.

        Raises:
            InvalidArgument: A field is bad (``spec.cron``, ``spec.template.queue``...); nothing changed.
        """
        req = schedule_service_pb2.CreateScheduleRequest(schedule_id=schedule_id, spec=spec)
        response = await self._call(lambda: self._schedules.CreateSchedule(req, timeout=self._timeout))
        return response.schedule, response.created

    async def update_schedule(
        self, schedule_id: str, spec: schedule_service_pb2.ScheduleSpec
    ) -> schedule_service_pb2.Schedule:
        """Replace an existing schedule's spec.

        Raises:
            NotFound: No such schedule (nothing is created).
            InvalidArgument: A field is bad; nothing changed.
        """
        req = schedule_service_pb2.UpdateScheduleRequest(schedule_id=schedule_id, spec=spec)
        return (await self._call(lambda: self._schedules.UpdateSchedule(req, timeout=self._timeout))).schedule

    async def delete_schedule(self, schedule_id: str) -> schedule_service_pb2.Schedule:
        """Stop and remove a schedule; no job is made for it after this returns.

        Raises:
            NotFound: No such schedule (also on a retry whose first try deleted it).
        """
        req = schedule_service_pb2.DeleteScheduleRequest(schedule_id=schedule_id)
        return (await self._call(lambda: self._schedules.DeleteSchedule(req, timeout=self._timeout))).schedule

    async def get_schedule(self, schedule_id: str) -> schedule_service_pb2.Schedule:
        """One schedule, with its next tick and its last fired tick and job.

        Raises:
            NotFound: No such schedule.
        """
        req = schedule_service_pb2.GetScheduleRequest(schedule_id=schedule_id)
        return (await self._call(lambda: self._schedules.GetSchedule(req, timeout=self._timeout))).schedule

    async def list_schedules(
        self, page_size: int = 0, page_token: str = ""
    ) -> schedule_service_pb2.ListSchedulesResponse:
        """One page of schedules in id order; pass ``next_page_token`` back for the next."""
        req = schedule_service_pb2.ListSchedulesRequest(page_size=page_size, page_token=page_token)
        return await self._call(lambda: self._schedules.ListSchedules(req, timeout=self._timeout))

    async def pause_schedule(self, schedule_id: str) -> tuple[schedule_service_pb2.Schedule, bool]:
        """Stop a schedule firing until :meth:`resume_schedule`; returns it and whether it changed.

        Raises:
            NotFound: No such schedule.
        """
        req = schedule_service_pb2.PauseScheduleRequest(schedule_id=schedule_id)
        response = await self._call(lambda: self._schedules.PauseSchedule(req, timeout=self._timeout))
        return response.schedule, response.changed

    async def resume_schedule(self, schedule_id: str) -> tuple[schedule_service_pb2.Schedule, bool]:
        """Let a paused schedule fire again from its next tick after now; returns it and whether it changed.

        Raises:
            NotFound: No such schedule.
        """
        req = schedule_service_pb2.ResumeScheduleRequest(schedule_id=schedule_id)
        response = await self._call(lambda: self._schedules.ResumeSchedule(req, timeout=self._timeout))
        return response.schedule, response.changed

    async def who_am_i(self) -> admin_service_pb2.WhoAmIResponse:
        """The name, role and queues of the token this client presents.

        Raises:
            Unauthenticated: No token, or an unknown or revoked one.
        """
        req = admin_service_pb2.WhoAmIRequest()
        return await self._call(lambda: self._admin.WhoAmI(req, timeout=self._timeout))


class _Coalescer:
    """Gathers concurrent enqueue calls into EnqueueBatch calls.

    Whatever is waiting when a slot is free goes out together in one call, on the next turn of
    the event loop (so every caller woken by the same answer is in it; a lone call goes alone,
    as a unary Enqueue, and never waits for company). At most IN_FLIGHT calls are out: a call
    made while one batch is out goes at once in the other slot; calls made while both are out
    wait and go together in the next (ADR 0033).

    An EnqueueBatch's validation is all or none, so when one bad job makes it fail with
    INVALID_ARGUMENT or RESOURCE_EXHAUSTED, its jobs are sent again one by one and each caller
    gets its own answer; when only some queues' jobs were written (PartiallyEnqueued), the
    others are sent again one by one.
    """

    MAX_BATCH = 500
    IN_FLIGHT = 2

    def __init__(self, client: ConveyorClient) -> None:
        self._client = client
        self._pending: list[
            tuple[producer_service_pb2.EnqueueRequest, asyncio.Future[producer_service_pb2.EnqueueResponse]]
        ] = []
        self._flush_due = False
        #: The batches out, one task each (the loop keeps only weak references to tasks).
        self._tasks: set[asyncio.Task[None]] = set()

    async def submit(self, req: producer_service_pb2.EnqueueRequest) -> producer_service_pb2.EnqueueResponse:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[producer_service_pb2.EnqueueResponse] = loop.create_future()
        self._pending.append((req, future))
        if not self._flush_due and len(self._tasks) < self.IN_FLIGHT:
            # call_soon runs after the callbacks already due: every caller woken by the same
            # answer has added its call by then.
            self._flush_due = True
            loop.call_soon(self._flush)
        return await future

    def _flush(self) -> None:
        self._flush_due = False
        loop = asyncio.get_running_loop()
        while self._pending and len(self._tasks) < self.IN_FLIGHT:
            # Everything waiting goes in one call: splitting it to keep both slots busy cost the
            # producer 10 µs per job more (gRPC's price per call) for 7 % more speed (ADR 0033).
            batch = self._pending[: self.MAX_BATCH]
            del self._pending[: self.MAX_BATCH]
            task = loop.create_task(self._send_batch(batch))
            self._tasks.add(task)
            task.add_done_callback(self._sent)

    def _sent(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if self._pending and not self._flush_due:
            self._flush_due = True
            asyncio.get_running_loop().call_soon(self._flush)

    async def _send_batch(
        self,
        batch: list[tuple[producer_service_pb2.EnqueueRequest, asyncio.Future[producer_service_pb2.EnqueueResponse]]],
    ) -> None:
        try:
            await self._send_or_fail(batch)
        except asyncio.CancelledError:
            # The client is going away: nobody may be left waiting for an answer that won't come.
            for _, future in batch:
                future.cancel()
            raise

    async def _send_or_fail(
        self,
        batch: list[tuple[producer_service_pb2.EnqueueRequest, asyncio.Future[producer_service_pb2.EnqueueResponse]]],
    ) -> None:
        if len(batch) == 1:
            req, future = batch[0]
            await self._settle(future, self._client._enqueue_one(req))
            return
        try:
            results = await self._client.enqueue_batch([req for req, _ in batch])
        except (InvalidArgument, ResourceExhausted):
            await asyncio.gather(*(self._settle(f, self._client._enqueue_one(r)) for r, f in batch))
            return
        except PartiallyEnqueued as partial:
            # Jobs of the queues that were written get their results; the others are sent
            # again one by one (each has an idempotency key, so a repeat is safe).
            for index, result in partial.accepted.items():
                if not batch[index][1].done():
                    batch[index][1].set_result(result)
            await asyncio.gather(
                *(self._settle(batch[i][1], self._client._enqueue_one(r)) for i, r in partial.failed_requests.items())
            )
            return
        except Exception as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(result)

    @staticmethod
    async def _settle(
        future: asyncio.Future[producer_service_pb2.EnqueueResponse],
        call: Awaitable[producer_service_pb2.EnqueueResponse],
    ) -> None:
        try:
            result = await call
        except Exception as exc:
            if not future.done():
                future.set_exception(exc)
        else:
            if not future.done():
                future.set_result(result)
