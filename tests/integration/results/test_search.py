"""ListJobs' payload (``where``) and ``labels`` filters against real PostgreSQL, through a real gRPC channel."""

from __future__ import annotations

import json
import math
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2
from psycopg_pool import AsyncConnectionPool

from conveyor.results.queries import FieldCondition, JobFilter, list_jobs_sql
from conveyor.results.store import Store
from conveyor.v1 import results_service_pb2
from tests.integration.results.conftest import Events, ResultsClient, StartProjector
from tests.integration.results.test_service import bad_request_fields, project
from tests.unit.results.builders import JobHistory

R = results_service_pb2


def value(v: Any) -> struct_pb2.Value:
    """A Value holding the JSON-able ``v`` (None: the JSON null)."""
    holder = struct_pb2.Struct()
    holder.update({"v": v})
    return holder.fields["v"]


def cond(path: str, op: int = R.FIELD_OPERATOR_EQ, v: Any = ..., **kw: Any) -> results_service_pb2.FieldFilter:
    f = R.FieldFilter(path=path, op=op, **kw)  # type: ignore[arg-type]
    if v is not ...:
        f.value.CopyFrom(value(v))
    return f


async def ids(results: ResultsClient, **request: Any) -> set[str]:
    page = await results.stub.ListJobs(R.ListJobsRequest(**request))
    assert not page.next_page_token
    return {j.id for j in page.jobs}


@pytest.fixture
async def jobs(store: Store, events: Events, start_projector: StartProjector) -> dict[str, str]:
    """Five jobs: four finished (their payload is in PostgreSQL) and one still queued (labels only)."""
    made = {
        "gold": JobHistory(
            payload={"customer": {"id": 42, "tier": "gold"}, "amount": 10.5, "tags": ["a", "b"], "note": None},
            labels={"team": "billing", "env": "prod"},
            created=1.0,
        ),
        "silver": JobHistory(
            payload={"customer": {"id": 7, "tier": "silver"}, "amount": 99, "tags": ["b"]},
            labels={"team": "billing", "env": "dev"},
            created=2.0,
        ),
        "strings": JobHistory(
            payload={"customer": {"id": "42"}, "amount": "cheap", "tags": "a"}, labels={"team": "ops"}, created=3.0
        ),
        "plain": JobHistory(payload={"other": True}, created=4.0),
    }
    finished = [j.lifecycle(start=j.job.created_at.seconds % 100) for j in made.values()]
    waiting = JobHistory(payload={"customer": {"id": 42}}, labels={"team": "billing"}, created=5.0)
    await project(store, events, start_projector, *finished, [waiting.queued()])
    return {**{k: j.job_id for k, j in made.items()}, "waiting": waiting.job_id}


async def test_each_operator_on_nested_payload_fields(results: ResultsClient, jobs: dict[str, str]) -> None:
    async def names(*where: results_service_pb2.FieldFilter, **request: Any) -> set[str]:
        found = await ids(results, where=list(where), **request)
        return {k for k, v in jobs.items() if v in found}

    # eq: exact, type included (42 is not "42"); objects and lists exactly, not "contains".
    assert await names(cond("customer.id", v=42)) == {"gold"}
    assert await names(cond("customer.id", R.FIELD_OPERATOR_UNSPECIFIED, v=42)) == {"gold"}
    assert await names(cond("customer.id", v="42")) == {"strings"}
    assert await names(cond("customer", v={"id": 7, "tier": "silver"})) == {"silver"}
    assert await names(cond("customer", v={"id": 7})) == set()
    assert await names(cond("tags", v=["b"])) == {"silver"}
    assert await names(cond("note", v=None)) == {"gold"}
    assert await names(cond("amount", v=10.5)) == {"gold"}
    assert await names(cond("customer.id.deeper", v=42)) == set()
    # ne: differs or missing, among jobs whose payload is known (finished).
    assert await names(cond("customer.tier", R.FIELD_OPERATOR_NE, "gold")) == {"silver", "strings", "plain"}
    # Ordering: numbers with numbers, strings with strings.
    assert await names(cond("amount", R.FIELD_OPERATOR_LT, 50)) == {"gold"}
    assert await names(cond("amount", R.FIELD_OPERATOR_LE, 10.5)) == {"gold"}
    assert await names(cond("amount", R.FIELD_OPERATOR_GT, 10.5)) == {"silver"}
    assert await names(cond("amount", R.FIELD_OPERATOR_GE, 10.5)) == {"gold", "silver"}
    assert await names(cond("amount", R.FIELD_OPERATOR_GE, "a")) == {"strings"}
    assert await names(cond("customer.tier", R.FIELD_OPERATOR_GT, "h")) == {"silver"}
    # exists: the field is there, even as null.
    assert await names(cond("note", R.FIELD_OPERATOR_EXISTS)) == {"gold"}
    assert await names(cond("customer.tier", R.FIELD_OPERATOR_EXISTS)) == {"gold", "silver"}
    # contains: a list holding the value, or a scalar equal to it; sub-objects.
    assert await names(cond("tags", R.FIELD_OPERATOR_CONTAINS, "a")) == {"gold", "strings"}
    assert await names(cond("tags", R.FIELD_OPERATOR_CONTAINS, ["b", "a"])) == {"gold"}
    assert await names(cond("customer", R.FIELD_OPERATOR_CONTAINS, {"tier": "gold"})) == {"gold"}
    # Every condition must hold, with the other filters too.
    assert await names(cond("customer.id", v=42), cond("amount", R.FIELD_OPERATOR_GT, 50)) == set()
    assert await names(cond("tags", R.FIELD_OPERATOR_CONTAINS, "b"), cond("amount", R.FIELD_OPERATOR_GT, 50)) == {
        "silver"
    }
    assert await names(cond("customer.id", v=42), queue="other") == set()
    assert await names(cond("customer.id", v=42), labels={"env": "prod"}) == {"gold"}


async def test_labels_must_all_match(results: ResultsClient, jobs: dict[str, str]) -> None:
    async def names(**labels: str) -> set[str]:
        found = await ids(results, labels=labels)
        return {k for k, v in jobs.items() if v in found}

    # A queued job carries its labels already (its payload only once finished).
    assert await names(team="billing") == {"gold", "silver", "waiting"}
    assert await names(team="billing", env="prod") == {"gold"}
    assert await names(team="billing", env="staging") == set()
    assert await names(env="prod") == {"gold"}
    assert await names(team="nobody") == set()
    assert await names() == set(jobs)


async def test_paging_with_filters_is_complete_and_checks_the_token(
    store: Store, events: Events, start_projector: StartProjector, results: ResultsClient
) -> None:
    made = [
        JobHistory(payload={"i": i, "kind": "even" if i % 2 == 0 else "odd"}, labels={"p": "x"}, created=float(i // 2))
        for i in range(25)
    ]
    await project(store, events, start_projector, *[j.lifecycle(start=float(i)) for i, j in enumerate(made)])
    where = [cond("kind", v="even"), cond("i", R.FIELD_OPERATOR_GE, 2)]
    got: list[str] = []
    sizes: list[int] = []
    token = ""
    while True:
        page = await results.stub.ListJobs(
            R.ListJobsRequest(where=where, labels={"p": "x"}, page_size=4, page_token=token)
        )
        got += [j.id for j in page.jobs]
        sizes.append(len(page.jobs))
        token = page.next_page_token
        if len(sizes) == 1:
            first_token = token
        if not token:
            break
    expected = [j for i, j in enumerate(made) if i % 2 == 0 and i >= 2]
    expected.sort(key=lambda j: (j.job.created_at.ToMicroseconds(), j.job_id), reverse=True)
    assert got == [j.job_id for j in expected]
    assert sizes == [4, 4, 4]

    # The token belongs to these filters: another value, operator, path, label or none at all is refused.
    for changed in [
        {"where": [cond("kind", v="odd"), where[1]], "labels": {"p": "x"}},
        {"where": [cond("kind", R.FIELD_OPERATOR_NE, "even"), where[1]], "labels": {"p": "x"}},
        {"where": [cond("kind", v="even")], "labels": {"p": "x"}},
        {"where": where, "labels": {"p": "y"}},
        {"where": where},
        {},
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await results.stub.ListJobs(R.ListJobsRequest(page_token=first_token, page_size=4, **changed))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert list(bad_request_fields(err.value)) == ["page_token"]
    # 2.0 is 2: the same filters spelled with a whole double keep the token valid.
    same = [cond("kind", v="even"), cond("i", R.FIELD_OPERATOR_GE, 2.0)]
    page = await results.stub.ListJobs(
        R.ListJobsRequest(where=same, labels={"p": "x"}, page_size=4, page_token=first_token)
    )
    assert [j.id for j in page.jobs] == got[4:8]


BIG = "x" * 5000


@pytest.mark.parametrize(
    ("where", "labels", "field"),
    [
        ([cond("", v=1)], {}, "where[0].path"),
        ([cond("a..b", v=1)], {}, "where[0].path"),
        ([cond("a.", v=1)], {}, "where[0].path"),
        ([cond("k" * 129, v=1)], {}, "where[0].path"),
        ([cond(".".join("a" * 17), v=1)], {}, "where[0].path"),
        ([cond("a", 99, 1)], {}, "where[0].op"),
        ([cond("a")], {}, "where[0].value"),
        ([cond("ok", v=1), cond("a", R.FIELD_OPERATOR_EXISTS, 1)], {}, "where[1].value"),
        ([cond("a", R.FIELD_OPERATOR_LT, True)], {}, "where[0].value"),
        ([cond("a", R.FIELD_OPERATOR_GE, {"x": 1})], {}, "where[0].value"),
        ([cond("a", R.FIELD_OPERATOR_NE)], {}, "where[0].value"),
        ([cond("a", v=math.inf)], {}, "where[0].value"),
        ([cond("a", v=[1, math.nan])], {}, "where[0].value"),
        ([cond("a", v=BIG)], {}, "where[0].value"),
        ([cond("a", v=1)] * 17, {}, "where"),
        ([], {"": "x"}, "labels['']"),
        ([], {"k": "v" * 257}, "labels['k']"),
        ([], {f"k{i}": "v" for i in range(33)}, "labels"),
    ],
)
async def test_bad_filters_are_invalid_argument_naming_the_field(
    results: ResultsClient,
    jobs: dict[str, str],
    pool: AsyncConnectionPool[Any],
    where: list[results_service_pb2.FieldFilter],
    labels: dict[str, str],
    field: str,
) -> None:
    async def table() -> list[tuple[Any, ...]]:
        async with pool.connection() as conn:
            cur = await conn.execute("SELECT job_id, state, payload::text, labels::text FROM jobs ORDER BY job_id")
            return await cur.fetchall()

    before = await table()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await results.stub.ListJobs(R.ListJobsRequest(where=where, labels=labels))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    violations = bad_request_fields(err.value)
    assert field in violations, violations
    assert "Traceback" not in (err.value.details() or "")
    assert await table() == before


async def test_payload_and_label_conditions_are_served_by_the_gin_indexes(pool: AsyncConnectionPool[Any]) -> None:
    # 5,000 finished jobs (half without labels), one with customer.id 42 and label team=rare; statistics fresh.
    # Queued jobs (no payload yet) stay out of the partial jobs_payload_idx, unlabelled ones out of jobs_labels_idx.
    async with pool.connection() as conn:
        await conn.execute(
            """
            INSERT INTO jobs (job_id, queue, type, state, payload, labels, created_at, updated_at,
                              last_event_ms, last_event_seq)
            SELECT 'default/' || lpad(i::text, 26, '0'), 'default', 'demo.echo', 5,
                   jsonb_build_object('customer', jsonb_build_object('id', i), 'tier', 'gold', 'tags', '["a"]'::jsonb),
                   CASE WHEN i = 42 THEN '{"team": "rare"}'::jsonb
                        WHEN i % 2 = 0 THEN '{"team": "common"}'::jsonb ELSE '{}'::jsonb END,
                   now() - i * interval '1 second', now(), i, 0
            FROM generate_series(1, 5000) AS i
            """
        )
        await conn.execute("ANALYZE jobs")

    async def plan(filters: JobFilter) -> str:
        query, params = list_jobs_sql(filters, None, 101)
        async with pool.connection() as conn:
            cur = await conn.execute(b"EXPLAIN (FORMAT JSON) " + query.as_bytes(conn), params)
            row = await cur.fetchone()
        assert row is not None
        return json.dumps(row[0])

    assert "jobs_payload_idx" in await plan(JobFilter(where=(FieldCondition(("customer", "id"), "eq", 42),)))
    assert "jobs_payload_idx" in await plan(JobFilter(where=(FieldCondition(("customer",), "contains", {"id": 7}),)))
    assert "jobs_labels_idx" in await plan(JobFilter(labels=(("team", "rare"),)))
    # And the answer through the index is right.
    query, params = list_jobs_sql(JobFilter(where=(FieldCondition(("customer", "id"), "eq", 42),)), None, 101)
    async with pool.connection() as conn:
        cur = await conn.execute(query, params)
        assert [r[0] for r in await cur.fetchall()] == ["default/" + "42".zfill(26)]
