"""The producer's wiring: clients, pools and servicers from ProducerSettings (used by __main__ and tests)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from conveyor.common import server
from conveyor.common.enqueue import Enqueuer
from conveyor.common.redis import RedisClient, connect_redis, make_redis
from conveyor.common.schedules import ScheduleStore
from conveyor.common.scripts import Scripts
from conveyor.common.settings import ProducerSettings
from conveyor.common.supervise import Supervisor
from conveyor.producer.admin import AdminServicer
from conveyor.producer.cancel import Canceller
from conveyor.producer.controls import QueueControls
from conveyor.producer.dead_letters import DeadLetters
from conveyor.producer.history import History
from conveyor.producer.jobs import JobReader
from conveyor.producer.limits import FlowLimits
from conveyor.producer.reencrypt import RedisReEncryptor
from conveyor.producer.schedules import ScheduleServicer
from conveyor.producer.servicer import ProducerServicer, add_to_server
from conveyor.producer.stats import Stats
from conveyor.producer.watch import Watcher
from conveyor.v1 import (
    admin_service_pb2,
    admin_service_pb2_grpc,
    producer_service_pb2,
    schedule_service_pb2,
    schedule_service_pb2_grpc,
)


@dataclass
class ProducerApp:
    """What a producer process serves, and what it closes on the way out."""

    services: list[server.Service]
    watcher: Watcher
    #: Enqueue, GetJob, CancelJob (CONVEYOR_REDIS_POOL_SIZE).
    redis: RedisClient
    #: Watch/WatchQueue replays and checks (CONVEYOR_WATCH_REDIS_POOL_SIZE).
    watch_redis: RedisClient
    #: AdminService and ScheduleService (CONVEYOR_ADMIN_REDIS_POOL_SIZE).
    admin_redis: RedisClient
    #: Runs the Watch/WatchQueue event tails; its health is the server's.
    supervisor: Supervisor
    closers: list[Callable[[], Awaitable[Any]]] = field(default_factory=list)


async def build(settings: ProducerSettings) -> ProducerApp:
    """Connect (waiting for Redis) and wire the producer's services.

    Three Redis pools, so that a burst on one cannot take the others' connections: the hot
    path (Enqueue, GetJob, CancelJob), Watch/WatchQueue replays, and the admin and schedule
    RPCs. Each pool that is used up answers its own callers UNAVAILABLE; the others go on.
    The event tails (one blocking read per watched queue) have their own client as before.
    """
    redis = await connect_redis(settings.redis_url, wait=True, max_connections=settings.redis_pool_size)
    watch_redis = make_redis(settings.redis_url, max_connections=settings.watch_redis_pool_size)
    admin_redis = make_redis(settings.redis_url, max_connections=settings.admin_redis_pool_size)
    tail_redis = make_redis(settings.redis_url, blocking=True)
    scripts = Scripts(redis)
    admin_scripts = Scripts(admin_redis)
    history = History(settings.results_addr, token=settings.token, tls=settings.client_tls)
    supervisor = settings.supervisor()
    watcher = Watcher(
        watch_redis,
        tail_redis,
        Scripts(watch_redis),
        history,
        settings.watch_buffer,
        settings.max_watches,
        supervisor,
    )
    enqueuer = Enqueuer(redis, scripts, settings.max_payload_bytes, settings.max_batch)
    servicer = ProducerServicer(
        enqueuer=enqueuer,
        watcher=watcher,
        jobs=JobReader(redis, history),
        canceller=Canceller(scripts, history, int(settings.retention_s * 1000)),
        max_batch=settings.max_batch,
    )
    admin = AdminServicer(
        DeadLetters(admin_redis, admin_scripts),
        QueueControls(admin_redis),
        FlowLimits(admin_scripts),
        stats=Stats(admin_redis, history),
        reencryptor=RedisReEncryptor(admin_redis),
    )
    schedules = ScheduleServicer(ScheduleStore(admin_redis), enqueuer, settings.max_payload_bytes)
    services = [
        server.Service(
            add_to_server,
            servicer,
            producer_service_pb2.DESCRIPTOR.services_by_name["ProducerService"].full_name,
        ),
        server.Service(
            admin_service_pb2_grpc.add_AdminServiceServicer_to_server,
            admin,
            admin_service_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name,
        ),
        server.Service(
            schedule_service_pb2_grpc.add_ScheduleServiceServicer_to_server,
            schedules,
            schedule_service_pb2.DESCRIPTOR.services_by_name["ScheduleService"].full_name,
        ),
    ]
    closers: list[Callable[[], Awaitable[Any]]] = [
        watcher.close,
        history.close,
        *(client.aclose for client in (redis, watch_redis, admin_redis, tail_redis)),
    ]
    return ProducerApp(services, watcher, redis, watch_redis, admin_redis, supervisor, closers)
