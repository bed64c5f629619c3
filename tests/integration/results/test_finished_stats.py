"""ResultsService.GetFinishedStats over real PostgreSQL: windows, states, and an index behind the query."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from psycopg_pool import AsyncConnectionPool

from conveyor.results.queries import FINISHED_STATS_SQL
from conveyor.v1 import job_pb2, results_service_pb2
from tests.integration.results.conftest import ResultsClient
from tests.integration.results.test_service import bad_request_fields

J = job_pb2


async def insert_finished(pool: AsyncConnectionPool[Any], rows: list[tuple[str, str, int, str | None]]) -> None:
    """Job rows as the projector leaves them: (job id, queue, state, finished how long ago or None)."""
    async with pool.connection() as conn:
        for job_id, queue, state, ago in rows:
            await conn.execute(
                "INSERT INTO jobs (job_id, queue, state, created_at, updated_at, finished_at, last_event_ms,"
                " last_event_seq) VALUES (%s, %s, %s, now() - interval '3 hours', now(),"
                " now() - %s::interval, 1, 0)",
                (job_id, queue, state, ago),
            )


async def test_counts_per_window_and_final_state(pool: AsyncConnectionPool[Any], results: ResultsClient) -> None:
    rows: list[tuple[str, str, int, str | None]] = []

    def add(n: int, state: int, ago: str | None, queue: str = "q") -> None:
        for _ in range(n):
            rows.append((f"{queue}/{len(rows):026d}", queue, state, ago))

    add(3, J.JOB_STATE_SUCCEEDED, "10 seconds")
    add(2, J.JOB_STATE_FAILED, "30 seconds")
    add(4, J.JOB_STATE_SUCCEEDED, "2 minutes")
    add(1, J.JOB_STATE_DEAD_LETTERED, "4 minutes")
    add(5, J.JOB_STATE_SUCCEEDED, "30 minutes")
    add(1, J.JOB_STATE_CANCELLED, "59 minutes")
    add(6, J.JOB_STATE_SUCCEEDED, "2 hours")  # older than every window
    add(7, J.JOB_STATE_SUCCEEDED, "5 seconds", queue="other")  # another queue
    add(2, J.JOB_STATE_ACTIVE, None)  # not finished
    await insert_finished(pool, rows)

    stats = (await results.stub.GetFinishedStats(results_service_pb2.GetFinishedStatsRequest(queue="q"))).stats
    got = [(w.window.seconds, w.succeeded, w.failed, w.dead_lettered, w.cancelled) for w in stats.windows]
    assert got == [(60, 3, 2, 0, 0), (300, 7, 2, 1, 0), (3600, 12, 2, 1, 1)]
    assert [w.jobs_per_second for w in stats.windows] == pytest.approx([5 / 60, 10 / 300, 16 / 3600])
    assert stats.as_of.seconds > 0

    empty = (await results.stub.GetFinishedStats(results_service_pb2.GetFinishedStatsRequest(queue="unused"))).stats
    assert [(w.window.seconds, w.succeeded + w.failed, w.jobs_per_second) for w in empty.windows] == [
        (60, 0, 0.0),
        (300, 0, 0.0),
        (3600, 0, 0.0),
    ]


async def test_a_bad_queue_is_invalid(results: ResultsClient) -> None:
    for bad in ("", "a b"):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await results.stub.GetFinishedStats(results_service_pb2.GetFinishedStatsRequest(queue=bad))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert list(bad_request_fields(err.value)) == ["queue"]


async def test_the_query_reads_the_finished_index(pool: AsyncConnectionPool[Any]) -> None:
    # 20 queues x 2,000 jobs finished over the last two days, and as many not finished.
    async with pool.connection() as conn:
        await conn.execute(
            "INSERT INTO jobs (job_id, queue, state, created_at, updated_at, finished_at, last_event_ms,"
            " last_event_seq)"
            " SELECT 'q' || (i % 20) || '/' || lpad(i::text, 26, '0'), 'q' || (i % 20),"
            "  CASE WHEN i % 2 = 0 THEN 5 ELSE 1 END, now(), now(),"
            "  CASE WHEN i % 2 = 0 THEN now() - (i || ' seconds')::interval END, 1, 0"
            " FROM generate_series(1, 80000) AS i"
        )
        await conn.execute("ANALYZE jobs")
        cur = await conn.execute("EXPLAIN " + FINISHED_STATS_SQL.replace("%s", "'q7'"))
        plan = "\n".join(row[0] for row in await cur.fetchall())
    assert "jobs_queue_finished_idx" in plan, plan
    assert "Seq Scan" not in plan, plan
