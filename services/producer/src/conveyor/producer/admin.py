"""AdminService: thin gRPC methods over QueueControls and DeadLetters."""

from __future__ import annotations

from typing import Any

import grpc

from conveyor.producer.controls import QueueControls
from conveyor.producer.dead_letters import DeadLetters
from conveyor.producer.stats import Stats
from conveyor.v1 import admin_service_pb2, admin_service_pb2_grpc

Context = grpc.aio.ServicerContext[Any, Any]


class AdminServicer(admin_service_pb2_grpc.AdminServiceServicer):
    """Operator controls: pause/resume, dead letters, statistics and introspection."""

    def __init__(self, dead_letters: DeadLetters, controls: QueueControls, *, stats: Stats) -> None:
        self._dead = dead_letters
        self._controls = controls
        self._stats = stats

    async def PauseQueue(
        self, request: admin_service_pb2.PauseQueueRequest, context: Context
    ) -> admin_service_pb2.PauseQueueResponse:
        return admin_service_pb2.PauseQueueResponse(changed=await self._controls.pause(request.queue))

    async def ResumeQueue(
        self, request: admin_service_pb2.ResumeQueueRequest, context: Context
    ) -> admin_service_pb2.ResumeQueueResponse:
        return admin_service_pb2.ResumeQueueResponse(changed=await self._controls.resume(request.queue))

    async def ListDeadLetters(
        self, request: admin_service_pb2.ListDeadLettersRequest, context: Context
    ) -> admin_service_pb2.ListDeadLettersResponse:
        return await self._dead.page(request.queue, request.page_size, request.page_token)

    async def RetryDeadLetters(
        self, request: admin_service_pb2.RetryDeadLettersRequest, context: Context
    ) -> admin_service_pb2.RetryDeadLettersResponse:
        job_ids = await self._dead.retry(request.queue, request.job_id, request.all)
        return admin_service_pb2.RetryDeadLettersResponse(job_ids=job_ids)

    async def PurgeDeadLetters(
        self, request: admin_service_pb2.PurgeDeadLettersRequest, context: Context
    ) -> admin_service_pb2.PurgeDeadLettersResponse:
        return admin_service_pb2.PurgeDeadLettersResponse(
            purged=await self._dead.purge(request.queue, request.job_id, request.all)
        )

    async def GetQueueStats(
        self, request: admin_service_pb2.GetQueueStatsRequest, context: Context
    ) -> admin_service_pb2.GetQueueStatsResponse:
        return await self._stats.queue(request.queue)

    async def ListQueues(
        self, request: admin_service_pb2.ListQueuesRequest, context: Context
    ) -> admin_service_pb2.ListQueuesResponse:
        return admin_service_pb2.ListQueuesResponse(queues=await self._stats.queues())

    async def ListWorkers(
        self, request: admin_service_pb2.ListWorkersRequest, context: Context
    ) -> admin_service_pb2.ListWorkersResponse:
        return admin_service_pb2.ListWorkersResponse(workers=await self._stats.workers(request.queue))
