"""A stack of real processes to break: private Redis, PostgreSQL database, results, producer; workers per test."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from conveyor.common.devstack.servers import PostgresServer, RedisServer
from tests.support.databases import fresh_database
from tests.support.processes import ServiceProcess

QUEUE = "faults"


@dataclass
class FaultStack:
    redis: RedisServer
    database_url: str
    results: ServiceProcess
    producer: ServiceProcess
    #: CONVEYOR_RETENTION_SECONDS of every process; a test module may set RETENTION_SECONDS.
    retention: str = "60"

    def env(self) -> dict[str, str]:
        return {"REDIS_URL": self.redis.url, "CONVEYOR_RETENTION_SECONDS": self.retention}


@pytest.fixture(scope="module")
def fault_stack(pg_server: PostgresServer, request: pytest.FixtureRequest) -> Iterator[FaultStack]:
    retention = str(getattr(request.module, "RETENTION_SECONDS", "60"))
    database_url = fresh_database(pg_server, "faults")
    with RedisServer() as redis_server:
        common = {"REDIS_URL": redis_server.url, "CONVEYOR_RETENTION_SECONDS": retention}
        results = ServiceProcess("results", {**common, "DATABASE_URL": database_url})
        producer = ServiceProcess("producer", {**common, "CONVEYOR_RESULTS_ADDR": results.addr})
        try:
            results.start()
            producer.start()
            yield FaultStack(redis_server, database_url, results, producer, retention)
        finally:
            producer.kill()
            results.kill()


@pytest.fixture(scope="module")
def private_redis() -> Iterator[RedisServer]:
    """A Redis of the test module's own, to drive into faults (no AOF: nothing here restarts it)."""
    with RedisServer(appendonly=False) as server:
        yield server


StartWorker = Callable[..., ServiceProcess]


@pytest.fixture
def worker_process(fault_stack: FaultStack) -> Iterator[StartWorker]:
    """Factory: start a worker process on the fault stack (killed at teardown)."""
    started: list[ServiceProcess] = []

    def start(name: str, wait: bool = True, **env: str) -> ServiceProcess:
        worker = ServiceProcess(
            "worker",
            {
                **fault_stack.env(),
                "CONVEYOR_QUEUES": QUEUE,
                "CONVEYOR_WORKER_ID": name,
                "CONVEYOR_HANDLERS": "tests.support.handlers:handlers",
                "CONVEYOR_VISIBILITY_TIMEOUT_SECONDS": "2",
                **env,
            },
            name=name,
        )
        started.append(worker)
        return worker.start(wait=wait)

    yield start
    for worker in started:
        worker.kill()
