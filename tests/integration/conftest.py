"""In-process producer and workers on the session Redis, behind real gRPC channels."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace

import grpc
import pytest
import redis as sync_redis
import redis.asyncio

from conveyor.common import server
from conveyor.common.enqueue import Enqueuer
from conveyor.common.redis import REDIS_UNAVAILABLE, make_redis
from conveyor.common.schedules import ScheduleStore
from conveyor.common.scripts import Heartbeat, Scripts
from conveyor.common.settings import WorkerSettings
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
from conveyor.producer.watch import WATCHER_BUFFER, Watcher
from conveyor.v1 import (
    admin_service_pb2,
    admin_service_pb2_grpc,
    producer_service_pb2,
    producer_service_pb2_grpc,
    schedule_service_pb2,
    schedule_service_pb2_grpc,
)
from conveyor.worker.runner import Runner
from tests.support import handlers as test_handlers


@dataclass
class Producer:
    addr: str
    stub: producer_service_pb2_grpc.ProducerServiceAsyncStub
    channel: grpc.aio.Channel
    admin: admin_service_pb2_grpc.AdminServiceAsyncStub
    schedules: schedule_service_pb2_grpc.ScheduleServiceAsyncStub


async def start_producer(
    redis_url: str, results_addr: str = "", watch_buffer: int = WATCHER_BUFFER
) -> tuple[Producer, Callable[[], Awaitable[None]]]:
    client = make_redis(redis_url)
    tail = make_redis(redis_url, blocking=True)
    scripts = Scripts(client)
    history = History(results_addr)
    watcher = Watcher(client, tail, scripts, history, watch_buffer)
    enqueuer = Enqueuer(client, scripts, 64 * 1024, 1000)
    servicer = ProducerServicer(
        enqueuer,
        watcher,
        JobReader(client, history),
        Canceller(scripts, history, 300_000),
    )
    admin = AdminServicer(
        DeadLetters(client, scripts),
        QueueControls(client),
        FlowLimits(scripts),
        stats=Stats(client, history),
        reencryptor=RedisReEncryptor(client),
    )
    schedules = ScheduleServicer(ScheduleStore(client), enqueuer, 64 * 1024)
    running = await server.start(
        "127.0.0.1:0",
        [
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
        ],
        unavailable=REDIS_UNAVAILABLE,
    )
    addr = f"127.0.0.1:{running.port}"
    channel = grpc.aio.insecure_channel(addr)

    async def stop() -> None:
        await channel.close()
        await running.stop(0.5)
        await watcher.close()
        await history.close()
        await client.aclose()
        await tail.aclose()

    return (
        Producer(
            addr,
            producer_service_pb2_grpc.ProducerServiceStub(channel),
            channel,
            admin_service_pb2_grpc.AdminServiceStub(channel),
            schedule_service_pb2_grpc.ScheduleServiceStub(channel),
        ),
        stop,
    )


@pytest.fixture
async def producer(redis_client: redis.asyncio.Redis, redis_url: str) -> AsyncIterator[Producer]:
    p, stop = await start_producer(redis_url)
    yield p
    await stop()


@dataclass
class WorkerHandle:
    settings: WorkerSettings
    stop_event: asyncio.Event
    task: asyncio.Task[None]
    runner: Runner

    async def stop(self) -> None:
        self.stop_event.set()
        await asyncio.wait_for(self.task, 15)


StartWorker = Callable[..., Awaitable[WorkerHandle]]


@pytest.fixture
async def start_worker(redis_client: redis.asyncio.Redis, redis_url: str) -> AsyncIterator[StartWorker]:
    """Factory: start an in-process worker (Runner) with the test handlers; stopped at teardown."""
    started: list[tuple[WorkerHandle, list[redis.asyncio.Redis]]] = []
    beats: list[sync_redis.Redis] = []
    test_handlers.runs.clear()
    test_handlers.started.clear()
    test_handlers.gate.clear()

    async def start(**overrides: object) -> WorkerHandle:
        settings = replace(
            WorkerSettings(redis_url=redis_url, worker_id=f"test-worker-{len(started) + 1}", poll_interval_s=1.0),
            **overrides,  # type: ignore[arg-type]
        )
        client = make_redis(redis_url)
        wait = make_redis(redis_url, blocking=True)
        beat = sync_redis.Redis.from_url(redis_url)
        runner = Runner(client, wait, Scripts(client), test_handlers.handlers, settings, Heartbeat(beat))
        stop = asyncio.Event()
        handle = WorkerHandle(settings, stop, asyncio.create_task(runner.run(stop)), runner)
        started.append((handle, [client, wait]))
        beats.append(beat)
        return handle

    yield start
    test_handlers.gate.set()
    for handle, clients in started:
        await handle.stop()
        for c in clients:
            await c.aclose()
    for beat in beats:
        beat.close()
