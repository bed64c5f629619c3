"""GetQueueStats with a real results service: live counts from Redis, finished counts from PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from conveyor.common import server
from conveyor.common.redis import REDIS_UNAVAILABLE
from conveyor.results.queries import Queries
from conveyor.results.servicer import ResultsServicer
from conveyor.results.setaside import SetAsideRows
from conveyor.results.store import Store
from conveyor.v1 import admin_service_pb2 as a
from conveyor.v1 import results_service_pb2, results_service_pb2_grpc
from tests.integration.conftest import Producer, StartWorker, start_producer
from tests.integration.results.conftest import StartProjector
from tests.support.queue_states import assert_live_counts, fill_every_state
from tests.support.wait import wait_for

QUEUE = "stats"


@pytest.fixture
async def producer_with_results(redis_url: str, queries: Queries) -> AsyncIterator[Producer]:
    """A producer whose history client talks to a ResultsService on the test database."""
    running = await server.start(
        "127.0.0.1:0",
        [
            server.Service(
                results_service_pb2_grpc.add_ResultsServiceServicer_to_server,
                ResultsServicer(queries, SetAsideRows(queries.pool, Store(queries.pool))),
                results_service_pb2.DESCRIPTOR.services_by_name["ResultsService"].full_name,
            )
        ],
        unavailable=REDIS_UNAVAILABLE,
    )
    producer, stop = await start_producer(redis_url, results_addr=f"127.0.0.1:{running.port}")
    yield producer
    await stop()
    await running.stop(0.5)


async def test_finished_counts_come_from_postgresql_beside_the_live_counts(
    producer_with_results: Producer, start_worker: StartWorker, store: Store, start_projector: StartProjector
) -> None:
    producer = producer_with_results
    await start_worker(queues=(QUEUE,), concurrency=3)
    await start_projector(store)
    await fill_every_state(producer.stub, producer.admin, QUEUE)

    async def projected() -> a.GetQueueStatsResponse | None:
        got = await producer.admin.GetQueueStats(a.GetQueueStatsRequest(queue=QUEUE))
        return got if got.finished.windows and got.finished.windows[0].failed == 1 else None

    got = await wait_for(projected, "the failed job projected into PostgreSQL", within=20)
    assert_live_counts(got.stats, QUEUE)
    assert got.finished_unavailable == ""
    for window in got.finished.windows:
        assert (window.succeeded, window.failed, window.dead_lettered, window.cancelled) == (4, 1, 0, 0)
        assert window.jobs_per_second == pytest.approx(5 / window.window.seconds)
    assert [w.window.seconds for w in got.finished.windows] == [60, 300, 3600]
