"""Rows PostgreSQL refuses for their own data are set aside, listed, replayed and discarded over real gRPC."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
import redis.asyncio
from psycopg_pool import AsyncConnectionPool

from conveyor.common.keys import QUEUES
from conveyor.results.store import Store
from conveyor.v1 import job_pb2, results_service_pb2
from tests.integration.results.conftest import Events, ResultsClient, StartProjector
from tests.unit.results.builders import JobHistory, stored

R = results_service_pb2
QUEUE = "setaside"


async def fetch(pool: AsyncConnectionPool[Any], query: str, *params: Any) -> list[tuple[Any, ...]]:
    async with pool.connection() as conn:
        cur = await conn.execute(query.encode(), params)
        return list(await cur.fetchall())


async def list_all(results: ResultsClient, queue: str = "", page_size: int = 1) -> list[R.SetAsideEntry]:
    found: list[R.SetAsideEntry] = []
    token = ""
    while True:
        page = await results.stub.ListSetAside(
            R.ListSetAsideRequest(queue=queue, page_size=page_size, page_token=token), timeout=10
        )
        found.extend(page.entries)
        token = page.next_page_token
        if not token:
            return found


async def state_of(pool: AsyncConnectionPool[Any], job_id: str) -> int | None:
    rows = await fetch(pool, "SELECT state FROM jobs WHERE job_id = %s", job_id)
    return int(rows[0][0]) if rows else None


async def test_bad_rows_are_set_aside_the_rest_projected_then_replayed_or_discarded(
    store: Store,
    pool: AsyncConnectionPool[Any],
    redis_client: redis.asyncio.Redis,
    start_projector: StartProjector,
    results: ResultsClient,
) -> None:
    events = Events(redis_client, QUEUE)
    # An operator's constraint the data breaks (SQLSTATE 23514), and a value PostgreSQL refuses (22P02).
    async with pool.connection() as conn:
        await conn.execute("ALTER TABLE jobs ADD CONSTRAINT no_forbidden CHECK (type <> 'forbidden')")
    good, forbidden, bad_json = JobHistory(QUEUE), JobHistory(QUEUE, type="forbidden"), JobHistory(QUEUE)
    poison = bad_json.succeeded(3, None)
    poison.result_json = b"{not json"
    for event in [*good.lifecycle(), *forbidden.lifecycle(), bad_json.queued(0), poison]:
        await events.add(event)
    # An entry that is no JobEvent at all.
    await redis_client.sadd(QUEUES, QUEUE)  # type: ignore[misc]
    garbage_id = (
        await redis_client.xadd(events.stream, {b"j": b"01JDQ4ZG0000000000000000AA", b"e": b"\xff\xff"})
    ).decode()

    await start_projector(store)
    await events.wait_caught_up()  # every entry acked: projected or set aside, in the same commit
    assert await state_of(pool, good.job_id) == job_pb2.JOB_STATE_SUCCEEDED
    assert await state_of(pool, forbidden.job_id) is None
    assert await state_of(pool, bad_json.job_id) is None

    listed = await list_all(results, QUEUE)
    by_job: dict[str, list[R.SetAsideEntry]] = {}
    for entry in listed:
        by_job.setdefault(entry.job_id, []).append(entry)
    assert {j: len(es) for j, es in by_job.items()} == {
        forbidden.job_id: 4,
        bad_json.job_id: 2,
        f"{QUEUE}/01JDQ4ZG0000000000000000AA": 1,
    }
    assert {e.sqlstate for e in by_job[forbidden.job_id]} == {"23514"}
    assert {e.sqlstate for e in by_job[bad_json.job_id]} == {"22P02"}
    (garbage,) = by_job[f"{QUEUE}/01JDQ4ZG0000000000000000AA"]
    assert garbage.sqlstate == "" and garbage.entry_id == garbage_id and garbage.event == b"\xff\xff"
    assert "malformed" in garbage.error
    # Kept as it was in the stream.
    assert by_job[bad_json.job_id][-1].event == stored(poison)
    assert [e.id for e in listed] == sorted(e.id for e in listed)
    assert await list_all(results, "other") == []

    # Replayed while the data is still refused: kept, with the new error and a replay counted.
    forbidden_ids = [e.id for e in by_job[forbidden.job_id]]
    again = await results.stub.ReplaySetAside(R.ReplaySetAsideRequest(ids=forbidden_ids), timeout=10)
    assert again.replayed == 0 and again.refused_count == 4
    assert {(e.replays, e.sqlstate) for e in again.refused} == {(1, "23514")}
    assert all(e.HasField("replayed_at") for e in again.refused)

    # The constraint dropped: replaying all projects the job and removes its entries; the rest stay.
    async with pool.connection() as conn:
        await conn.execute("ALTER TABLE jobs DROP CONSTRAINT no_forbidden")
    done = await results.stub.ReplaySetAside(R.ReplaySetAsideRequest(all=True), timeout=10)
    assert done.replayed == 4 and done.refused_count == 3
    assert await state_of(pool, forbidden.job_id) == job_pb2.JOB_STATE_SUCCEEDED
    left = await list_all(results, page_size=2)
    assert {e.job_id for e in left} == {bad_json.job_id, garbage.job_id}

    # Discarding is explicit, by id; an unknown id changes nothing.
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await results.stub.DiscardSetAside(R.DiscardSetAsideRequest(ids=[garbage.id, 999_999]), timeout=10)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND and "999999" in (missing.value.details() or "")
    assert len(await list_all(results)) == 3
    gone = await results.stub.DiscardSetAside(R.DiscardSetAsideRequest(ids=[e.id for e in left]), timeout=10)
    assert gone.discarded == 3
    assert await list_all(results) == []
    assert await state_of(pool, bad_json.job_id) is None


@pytest.mark.parametrize(
    ("call", "request_", "field"),
    [
        ("ReplaySetAside", R.ReplaySetAsideRequest(), "ids"),
        ("ReplaySetAside", R.ReplaySetAsideRequest(ids=[1], all=True), "ids"),
        ("ReplaySetAside", R.ReplaySetAsideRequest(ids=[0]), "ids"),
        ("DiscardSetAside", R.DiscardSetAsideRequest(), "ids"),
        ("DiscardSetAside", R.DiscardSetAsideRequest(ids=list(range(1, 1002))), "ids"),
        ("ListSetAside", R.ListSetAsideRequest(page_size=1001), "page_size"),
        ("ListSetAside", R.ListSetAsideRequest(queue="no spaces"), "queue"),
        ("ListSetAside", R.ListSetAsideRequest(page_token="nope"), "page_token"),
    ],
)
async def test_bad_requests_are_invalid_argument_naming_the_field(
    results: ResultsClient, call: str, request_: Any, field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await getattr(results.stub, call)(request_, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in (info.value.details() or "")


async def test_replay_of_unknown_ids_is_not_found(results: ResultsClient) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await results.stub.ReplaySetAside(R.ReplaySetAsideRequest(ids=[12345]), timeout=10)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_page_token_for_another_queue_is_refused(
    store: Store, pool: AsyncConnectionPool[Any], results: ResultsClient
) -> None:
    async with pool.connection() as conn:
        for n in range(3):
            await conn.execute(
                "INSERT INTO projection_set_aside (queue, job_id, entry_id, event, sqlstate, error)"
                " VALUES ('a', '', %s, '', '', 'x')",
                (f"{n}-0",),
            )
    page = await results.stub.ListSetAside(R.ListSetAsideRequest(queue="a", page_size=2), timeout=10)
    assert len(page.entries) == 2 and page.next_page_token
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await results.stub.ListSetAside(R.ListSetAsideRequest(queue="b", page_token=page.next_page_token), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
