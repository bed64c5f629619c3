"""A producer wired exactly as `python -m conveyor.producer` wires it (conveyor.producer.app), over real gRPC."""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc

from conveyor.common import server
from conveyor.common.redis import REDIS_UNAVAILABLE
from conveyor.common.settings import ProducerSettings
from conveyor.producer.app import ProducerApp, build
from conveyor.v1 import admin_service_pb2_grpc, producer_service_pb2_grpc


@dataclass
class StartedProducer:
    app: ProducerApp
    running: server.RunningServer
    stub: producer_service_pb2_grpc.ProducerServiceAsyncStub
    admin: admin_service_pb2_grpc.AdminServiceAsyncStub
    stop: Callable[[], Awaitable[None]]


async def start_app(redis_url: str, **overrides: Any) -> StartedProducer:
    """Build a producer from ProducerSettings(**overrides) (no results service) and serve it on a free port.

    Its Supervisor drives the server's health, as in ``server.serve``.
    """
    settings = dataclasses.replace(ProducerSettings(), redis_url=redis_url, results_addr="", **overrides)
    app = await build(settings)
    running = await server.start(
        "127.0.0.1:0", app.services, unavailable=REDIS_UNAVAILABLE, max_message_bytes=settings.message_limit
    )
    app.supervisor.on_health(running.set_serving)
    channel = grpc.aio.insecure_channel(
        f"127.0.0.1:{running.port}", options=[("grpc.max_send_message_length", 64 << 20)]
    )

    async def stop() -> None:
        await channel.close()
        await running.stop(0.5)
        for close in app.closers:
            await close()

    return StartedProducer(
        app,
        running,
        producer_service_pb2_grpc.ProducerServiceStub(channel),
        admin_service_pb2_grpc.AdminServiceStub(channel),
        stop,
    )
