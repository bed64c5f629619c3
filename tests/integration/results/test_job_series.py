"""ResultsService.GetJobSeries through a real channel, over rows in the real PostgreSQL schema."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from psycopg_pool import AsyncConnectionPool

from conveyor.results import queries as queries_module
from conveyor.results.store import Store
from conveyor.v1 import results_service_pb2
from tests.integration.results.conftest import Events, ResultsClient, StartProjector
from tests.integration.results.test_service import bad_request_fields, project
from tests.unit.results.builders import JobHistory

HOUR, DAY, WEEK = (
    results_service_pb2.SERIES_WINDOW_HOUR,
    results_service_pb2.SERIES_WINDOW_DAY,
    results_service_pb2.SERIES_WINDOW_WEEK,
)


async def place(
    pool: AsyncConnectionPool[Any], now: datetime, job_id: str, ago_s: float, wait_s: float, run_s: float
) -> None:
    """Give a finished job a finish ``ago_s`` before ``now``, after ``run_s`` running and ``wait_s`` waiting."""
    finished = now - timedelta(seconds=ago_s)
    started = finished - timedelta(seconds=run_s)
    async with pool.connection() as conn:
        await conn.execute(
            "UPDATE jobs SET finished_at = %s, started_at = %s, created_at = %s, run_at = NULL WHERE job_id = %s",
            (finished, started, started - timedelta(seconds=wait_s), job_id),
        )


async def series(results: ResultsClient, window: Any, queue: str = "") -> results_service_pb2.GetJobSeriesResponse:
    return await results.stub.GetJobSeries(results_service_pb2.GetJobSeriesRequest(queue=queue, window=window))


def totals(reply: results_service_pb2.GetJobSeriesResponse) -> tuple[int, int, int, int]:
    b = reply.buckets
    return (
        sum(x.succeeded for x in b),
        sum(x.failed for x in b),
        sum(x.dead_lettered for x in b),
        sum(x.cancelled for x in b),
    )


async def test_buckets_count_and_time_finished_jobs_per_window_and_queue(
    store: Store,
    pool: AsyncConnectionPool[Any],
    events: Events,
    start_projector: StartProjector,
    results: ResultsClient,
) -> None:
    fast = [JobHistory() for _ in range(3)]
    failed = JobHistory()
    other = JobHistory(queue="other")
    old = JobHistory()
    histories = [j.lifecycle() for j in [*fast, old]]
    histories.append([failed.queued(), failed.active(1.0), failed.failed(2.0)])
    await Events(events.client, "other").add_all(other.lifecycle())
    await project(store, events, start_projector, *histories)
    now = datetime.now(UTC)
    for i, job in enumerate(fast):
        await place(pool, now, job.job_id, ago_s=600, wait_s=4 + i, run_s=2)
    await place(pool, now, failed.job_id, ago_s=1800, wait_s=1, run_s=1)
    await place(pool, now, other.job_id, ago_s=300, wait_s=1, run_s=1)
    await place(pool, now, old.job_id, ago_s=2 * 86400, wait_s=1, run_s=1)

    hour = await series(results, HOUR, "default")
    assert len(hour.buckets) == 60 and hour.bucket.seconds == 60
    assert hour.end.seconds - hour.start.seconds == 3600 and hour.end.seconds % 60 == 0
    assert [b.start.seconds for b in hour.buckets] == list(range(hour.start.seconds, hour.end.seconds, 60))
    assert totals(hour) == (3, 1, 0, 0)
    [busy] = [b for b in hour.buckets if b.succeeded]
    assert busy.succeeded == 3
    assert busy.wait.p50 == pytest.approx(5.0, abs=0.01)  # waits 4, 5, 6
    assert 5.0 < busy.wait.p95 <= 6.0 + 0.01 and busy.wait.p99 <= 6.0 + 0.01
    assert busy.run.p50 == pytest.approx(2.0, abs=0.01) and busy.run.p99 == pytest.approx(2.0, abs=0.01)
    empty = hour.buckets[0]
    assert (empty.succeeded, empty.wait.p50, empty.run.p99) == (0, 0.0, 0.0)

    assert totals(await series(results, HOUR)) == (4, 1, 0, 0)  # every queue
    assert totals(await series(results, HOUR, "other")) == (1, 0, 0, 0)
    day = await series(results, DAY, "default")
    assert (len(day.buckets), day.bucket.seconds, totals(day)) == (96, 900, (3, 1, 0, 0))
    week = await series(results, WEEK, "default")
    assert (len(week.buckets), week.bucket.seconds, totals(week)) == (84, 7200, (4, 1, 0, 0))
    unspecified = await series(results, results_service_pb2.SERIES_WINDOW_UNSPECIFIED, "default")
    assert len(unspecified.buckets) == 60  # the hour
    assert totals(await series(results, HOUR, "never-used")) == (0, 0, 0, 0)


async def test_bad_requests_and_a_query_past_its_time_limit(
    results: ResultsClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    for request, field in (
        (results_service_pb2.GetJobSeriesRequest(queue="no/slash"), "queue"),
        (results_service_pb2.GetJobSeriesRequest(window=9), "window"),  # type: ignore[arg-type]
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await results.stub.GetJobSeries(request)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in bad_request_fields(err.value)

    # A query that would run past the limit is stopped by PostgreSQL and answered cleanly.
    monkeypatch.setattr(queries_module, "SERIES_TIMEOUT_MS", 100)
    # A one-time filter: PostgreSQL evaluates it before reading any row.
    slow = queries_module._SERIES_SQL.replace("WHERE ", "WHERE (SELECT pg_sleep(2)::text) IS NOT NULL AND ")
    monkeypatch.setattr(queries_module, "_SERIES_SQL", slow)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await series(results, WEEK)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "shorter window" in str(err.value.details())
