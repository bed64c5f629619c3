"""AdminService: thin gRPC methods over QueueControls and DeadLetters."""

from __future__ import annotations

from typing import Any

import grpc

from conveyor.common import auth, crypto
from conveyor.common.errors import Unimplemented
from conveyor.producer.controls import QueueControls
from conveyor.producer.dead_letters import DeadLetters
from conveyor.producer.limits import FlowLimits
from conveyor.producer.reencrypt import RedisReEncryptor
from conveyor.producer.stats import Stats
from conveyor.v1 import admin_service_pb2, admin_service_pb2_grpc, limits_pb2

Context = grpc.aio.ServicerContext[Any, Any]


class AdminServicer(admin_service_pb2_grpc.AdminServiceServicer):
    """Operator controls: pause/resume, flow limits, dead letters, statistics and introspection."""

    def __init__(
        self,
        dead_letters: DeadLetters,
        controls: QueueControls,
        limits: FlowLimits,
        *,
        stats: Stats,
        reencryptor: RedisReEncryptor | None = None,
    ) -> None:
        self._dead = dead_letters
        self._controls = controls
        self._limits = limits
        self._stats = stats
        self._reencryptor = reencryptor

    async def ReEncrypt(
        self, request: admin_service_pb2.ReEncryptRequest, context: Context
    ) -> admin_service_pb2.ReEncryptResponse:
        if self._reencryptor is None:
            raise Unimplemented("ReEncrypt is not wired in this producer")
        return await self._reencryptor.run(request.queue, crypto.current())

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
        job_ids, more = await self._dead.retry(request.queue, request.job_id, request.all)
        return admin_service_pb2.RetryDeadLettersResponse(job_ids=job_ids, more=more)

    async def PurgeDeadLetters(
        self, request: admin_service_pb2.PurgeDeadLettersRequest, context: Context
    ) -> admin_service_pb2.PurgeDeadLettersResponse:
        purged, more = await self._dead.purge(request.queue, request.job_id, request.all)
        return admin_service_pb2.PurgeDeadLettersResponse(purged=purged, more=more)

    async def SetRateLimit(
        self, request: limits_pb2.SetRateLimitRequest, context: Context
    ) -> limits_pb2.SetRateLimitResponse:
        return limits_pb2.SetRateLimitResponse(limits=await self._limits.set_rate(request))

    async def ClearRateLimit(
        self, request: limits_pb2.ClearRateLimitRequest, context: Context
    ) -> limits_pb2.ClearRateLimitResponse:
        changed, limits = await self._limits.clear("rate", request)
        return limits_pb2.ClearRateLimitResponse(changed=changed, limits=limits)

    async def SetConcurrencyLimit(
        self, request: limits_pb2.SetConcurrencyLimitRequest, context: Context
    ) -> limits_pb2.SetConcurrencyLimitResponse:
        return limits_pb2.SetConcurrencyLimitResponse(limits=await self._limits.set_concurrency(request))

    async def ClearConcurrencyLimit(
        self, request: limits_pb2.ClearConcurrencyLimitRequest, context: Context
    ) -> limits_pb2.ClearConcurrencyLimitResponse:
        changed, limits = await self._limits.clear("conc", request)
        return limits_pb2.ClearConcurrencyLimitResponse(changed=changed, limits=limits)

    async def GetLimits(self, request: limits_pb2.GetLimitsRequest, context: Context) -> limits_pb2.GetLimitsResponse:
        return limits_pb2.GetLimitsResponse(limits=await self._limits.get(request.queue))

    async def SetDefaultPriority(
        self, request: limits_pb2.SetDefaultPriorityRequest, context: Context
    ) -> limits_pb2.SetDefaultPriorityResponse:
        return limits_pb2.SetDefaultPriorityResponse(limits=await self._limits.set_default_priority(request))

    async def BackOff(self, request: limits_pb2.BackOffRequest, context: Context) -> limits_pb2.BackOffResponse:
        response = limits_pb2.BackOffResponse()
        response.until.FromMilliseconds(await self._limits.back_off(request))
        return response

    async def ClearBackOff(
        self, request: limits_pb2.ClearBackOffRequest, context: Context
    ) -> limits_pb2.ClearBackOffResponse:
        changed, limits = await self._limits.clear_back_off(request)
        return limits_pb2.ClearBackOffResponse(changed=changed, limits=limits)

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

    # --- who is calling (dashauth) ---
    async def WhoAmI(
        self, request: admin_service_pb2.WhoAmIRequest, context: Context
    ) -> admin_service_pb2.WhoAmIResponse:
        """The caller's token as the interceptor identified it (auth.CALLER); no token checked: admin."""
        token = auth.CALLER.get()
        if token is None:
            return admin_service_pb2.WhoAmIResponse(role=admin_service_pb2.ROLE_ADMIN, authentication=False)
        return admin_service_pb2.WhoAmIResponse(
            name=token.name, role=ROLES[token.role], queues=sorted(token.queues), authentication=True
        )

    # --- end who is calling ---


ROLES = {
    auth.Role.PRODUCER: admin_service_pb2.ROLE_PRODUCER,
    auth.Role.READER: admin_service_pb2.ROLE_READER,
    auth.Role.ADMIN: admin_service_pb2.ROLE_ADMIN,
}
