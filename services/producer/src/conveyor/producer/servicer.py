"""ProducerService: thin gRPC methods over Enqueuer, Watcher and JobReader."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

from conveyor.producer.cancel import Canceller
from conveyor.producer.enqueue import Enqueuer
from conveyor.producer.jobs import JobReader
from conveyor.producer.watch import Watcher
from conveyor.v1 import producer_service_pb2, producer_service_pb2_grpc

Context = grpc.aio.ServicerContext[Any, Any]


class ProducerServicer(producer_service_pb2_grpc.ProducerServiceServicer):
    """The front door: validates and enqueues jobs, streams their events."""

    def __init__(self, enqueuer: Enqueuer, watcher: Watcher, jobs: JobReader, canceller: Canceller) -> None:
        self._enqueuer = enqueuer
        self._watcher = watcher
        self._jobs = jobs
        self._canceller = canceller

    async def Enqueue(
        self, request: producer_service_pb2.EnqueueRequest, context: Context
    ) -> producer_service_pb2.EnqueueResponse:
        (response,) = await self._enqueuer.enqueue([request], batch=False)
        return response

    async def EnqueueBatch(
        self, request: producer_service_pb2.EnqueueBatchRequest, context: Context
    ) -> producer_service_pb2.EnqueueBatchResponse:
        results = await self._enqueuer.enqueue(list(request.jobs), batch=True)
        return producer_service_pb2.EnqueueBatchResponse(results=results)

    async def Watch(
        self, request: producer_service_pb2.WatchRequest, context: Context
    ) -> AsyncIterator[producer_service_pb2.WatchResponse]:
        async for event in self._watcher.watch(request.job_id, request.after_event_id):
            yield producer_service_pb2.WatchResponse(event=event)

    async def WatchQueue(
        self, request: producer_service_pb2.WatchQueueRequest, context: Context
    ) -> AsyncIterator[producer_service_pb2.WatchQueueResponse]:
        async for response in self._watcher.watch_queue(
            request.queue, request.after_event_id, request.replay, request.event_types
        ):
            yield response

    async def GetJob(
        self, request: producer_service_pb2.GetJobRequest, context: Context
    ) -> producer_service_pb2.GetJobResponse:
        return producer_service_pb2.GetJobResponse(job=await self._jobs.get(request.job_id))

    async def CancelJob(
        self, request: producer_service_pb2.CancelJobRequest, context: Context
    ) -> producer_service_pb2.CancelJobResponse:
        return await self._canceller.cancel(request.job_id, request.reason)
