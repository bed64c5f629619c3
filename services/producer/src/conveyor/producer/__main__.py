"""Producer process: `python -m conveyor.producer`. Wiring only."""

from __future__ import annotations

from conveyor.common import logs, server
from conveyor.common.enqueue import Enqueuer
from conveyor.common.redis import REDIS_UNAVAILABLE, connect_redis, make_redis
from conveyor.common.schedules import ScheduleStore
from conveyor.common.scripts import Scripts
from conveyor.common.settings import ProducerSettings
from conveyor.producer.admin import AdminServicer
from conveyor.producer.cancel import Canceller
from conveyor.producer.controls import QueueControls
from conveyor.producer.dead_letters import DeadLetters
from conveyor.producer.history import History
from conveyor.producer.jobs import JobReader
from conveyor.producer.limits import FlowLimits
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


async def run() -> None:
    settings = ProducerSettings.from_env()
    logs.configure(service="producer", level=settings.log_level, fmt=settings.log_format)
    redis = await connect_redis(settings.redis_url, wait=True)
    tail_redis = make_redis(settings.redis_url, blocking=True)
    scripts = Scripts(redis)
    history = History(settings.results_addr)
    watcher = Watcher(redis, tail_redis, scripts, history, settings.watch_buffer)
    enqueuer = Enqueuer(redis, scripts, settings.max_payload_bytes, settings.max_batch)
    servicer = ProducerServicer(
        enqueuer=enqueuer,
        watcher=watcher,
        jobs=JobReader(redis, history),
        canceller=Canceller(scripts, history, int(settings.retention_s * 1000)),
    )
    admin = AdminServicer(
        DeadLetters(redis, scripts), QueueControls(redis), FlowLimits(scripts), stats=Stats(redis, history)
    )
    schedules = ScheduleServicer(ScheduleStore(redis), enqueuer, settings.max_payload_bytes)
    await server.serve(
        settings.grpc_addr,
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
        grace=settings.shutdown_grace_s,
        unavailable=REDIS_UNAVAILABLE,
        on_shutdown=[watcher.close, history.close, redis.aclose, tail_redis.aclose],
    )


def main() -> None:
    server.run_process(run)


if __name__ == "__main__":
    main()
