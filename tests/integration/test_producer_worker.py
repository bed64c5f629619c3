"""The producer and workers over real gRPC channels and a real Redis."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import redis.asyncio
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from conveyor.common.keys import queue_keys
from conveyor.common.scripts import Scripts
from conveyor.v1 import event_pb2, job_pb2
from conveyor.v1 import producer_service_pb2 as p
from tests.integration.conftest import Producer, StartWorker
from tests.support import handlers as test_handlers
from tests.support.wait import wait_for

E = event_pb2


async def watch_all(producer: Producer, job_id: str, after: str = "") -> list[event_pb2.JobEvent]:
    call = producer.stub.Watch(p.WatchRequest(job_id=job_id, after_event_id=after), timeout=20)
    return [r.event async for r in call]


async def enqueue(producer: Producer, type: str = "test.count", **kw: object) -> p.EnqueueResponse:
    return await producer.stub.Enqueue(p.EnqueueRequest(queue=str(kw.pop("queue", "default")), type=type, **kw))  # type: ignore[arg-type]


async def test_watch_follows_a_job_from_queued_to_succeeded(producer: Producer, start_worker: StartWorker) -> None:
    job = await enqueue(producer, "demo.sleep", payload={"seconds": 0.2, "steps": 2})
    assert job.created and job.state == job_pb2.JOB_STATE_QUEUED
    watching = asyncio.create_task(watch_all(producer, job.job_id))
    await start_worker()
    events = await watching
    assert [e.type for e in events] == [
        E.EVENT_TYPE_QUEUED,
        E.EVENT_TYPE_ACTIVE,
        E.EVENT_TYPE_PROGRESS,
        E.EVENT_TYPE_PROGRESS,
        E.EVENT_TYPE_SUCCEEDED,
    ]
    assert [e.progress.percent for e in events[2:4]] == [50, 100]
    assert events[1].attempt == 1 and events[1].worker == "test-worker-1"
    assert events[-1].result.struct_value["slept"] == 0.2
    assert all(e.job_id == job.job_id for e in events)
    ids = [e.id for e in events]
    assert len(set(ids)) == len(ids)
    # The final event carries the job with its payload, as clients see it (a Struct).
    assert events[-1].job.payload["steps"] == 2 and not events[-1].job.payload_json


async def test_watch_replays_a_finished_job_then_ends(producer: Producer, start_worker: StartWorker) -> None:
    await start_worker()
    job = await enqueue(producer, "demo.sleep", payload={"seconds": 0.05, "steps": 1})
    live = await watch_all(producer, job.job_id)
    replay = await watch_all(producer, job.job_id)
    assert replay == live
    assert replay[-1].type == E.EVENT_TYPE_SUCCEEDED


async def test_watch_resumes_after_an_event_without_gap_or_repeat(
    producer: Producer, start_worker: StartWorker
) -> None:
    await start_worker()
    job = await enqueue(producer, "demo.sleep", payload={"seconds": 0.6, "steps": 3})
    call = producer.stub.Watch(p.WatchRequest(job_id=job.job_id), timeout=20)
    first_two = []
    async for response in call:
        first_two.append(response.event)
        if len(first_two) == 2:
            break
    call.cancel()  # the client drops the stream, as on a disconnect
    assert first_two[-1].type == E.EVENT_TYPE_ACTIVE
    rest = await watch_all(producer, job.job_id, after=first_two[-1].id)
    everything = await watch_all(producer, job.job_id)
    assert first_two + rest == everything
    assert rest[-1].type == E.EVENT_TYPE_SUCCEEDED


async def test_enqueue_with_same_idempotency_key_returns_same_job(
    producer: Producer, redis_client: redis.asyncio.Redis
) -> None:
    first = await enqueue(producer, idempotency_key="order-42")
    again = await enqueue(producer, idempotency_key="order-42")
    other_queue = await enqueue(producer, idempotency_key="order-42", queue="other")
    assert first.created and not again.created
    assert again.job_id == first.job_id
    assert again.state == job_pb2.JOB_STATE_QUEUED
    assert other_queue.created and other_queue.job_id != first.job_id
    assert await redis_client.xlen(queue_keys("default").band(5)) == 1


async def test_idempotency_outlives_the_job_in_redis(
    producer: Producer, start_worker: StartWorker, redis_client: redis.asyncio.Redis
) -> None:
    await start_worker(retention_s=0.001)
    first = await enqueue(producer, idempotency_key="once")
    final = (await watch_all(producer, first.job_id))[-1]
    keys = queue_keys("default")
    # Retention counts from projection: the results service's step after its commit (no PostgreSQL here).
    await Scripts(redis_client).projected(keys, [(first.job_id.split("/")[1], final.id)], 1)
    # Another completion sweeps expired records; then the job is gone from Redis.
    await watch_all(producer, (await enqueue(producer)).job_id)
    await wait_for(lambda: _gone(redis_client, keys.state, first.job_id), "record expiry")
    again = await enqueue(producer, idempotency_key="once")
    assert again.job_id == first.job_id and not again.created
    assert again.state == job_pb2.JOB_STATE_UNSPECIFIED


async def _gone(client: redis.asyncio.Redis, key: str, job_id: str) -> bool:
    return not await client.hexists(key, job_id.split("/")[1])


async def test_enqueue_batch_returns_results_in_order_and_runs_them_all(
    producer: Producer, start_worker: StartWorker
) -> None:
    reqs = [p.EnqueueRequest(queue="default", type="test.count", payload={"i": i}) for i in range(50)]
    reqs.insert(10, p.EnqueueRequest(queue="second", type="test.count", idempotency_key="same"))
    reqs.insert(20, p.EnqueueRequest(queue="second", type="test.count", idempotency_key="same"))
    response = await producer.stub.EnqueueBatch(p.EnqueueBatchRequest(jobs=reqs))
    assert len(response.results) == 52
    assert [r.job_id.split("/")[0] for r in response.results].count("second") == 2
    assert response.results[10].job_id == response.results[20].job_id
    assert response.results[10].created and not response.results[20].created
    # The duplicate sees the state of the job the same batch just made.
    assert response.results[20].state == response.results[10].state == job_pb2.JOB_STATE_QUEUED
    await start_worker(queues=("default", "second"))
    unique = {r.job_id for r in response.results}
    await wait_for(lambda: _ran(unique), "all batch jobs ran")
    assert all(test_handlers.runs[j] == 1 for j in unique)


async def _ran(ids: set[str]) -> bool:
    return ids <= set(test_handlers.runs)


def _bad_request_fields(err: grpc.aio.AioRpcError) -> list[str]:
    status = rpc_status.from_call(err)
    assert status is not None
    fields = []
    for detail in status.details:
        bad = error_details_pb2.BadRequest()
        assert detail.Unpack(bad)
        fields += [v.field for v in bad.field_violations]
    return fields


BAD_INPUT = [
    (p.EnqueueRequest(queue="", type="t"), grpc.StatusCode.INVALID_ARGUMENT, "queue"),
    (p.EnqueueRequest(queue="x" * 65, type="t"), grpc.StatusCode.INVALID_ARGUMENT, "queue"),
    (p.EnqueueRequest(queue="bad queue", type="t"), grpc.StatusCode.INVALID_ARGUMENT, "queue"),
    (p.EnqueueRequest(queue=".", type="t"), grpc.StatusCode.INVALID_ARGUMENT, "queue"),
    (p.EnqueueRequest(queue="..", type="t"), grpc.StatusCode.INVALID_ARGUMENT, "queue"),
    (p.EnqueueRequest(queue="q", type=""), grpc.StatusCode.INVALID_ARGUMENT, "type"),
    (p.EnqueueRequest(queue="q", type="t" * 129), grpc.StatusCode.INVALID_ARGUMENT, "type"),
    (p.EnqueueRequest(queue="q", type="no spaces"), grpc.StatusCode.INVALID_ARGUMENT, "type"),
    (p.EnqueueRequest(queue="q", type="t", priority=42), grpc.StatusCode.INVALID_ARGUMENT, "priority"),
    (
        p.EnqueueRequest(queue="q", type="t", delay=duration_pb2.Duration(seconds=-3)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "delay",
    ),
    (
        p.EnqueueRequest(queue="q", type="t", payload_json=b"\x00garbage"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "payload_json",
    ),
    (
        p.EnqueueRequest(queue="q", type="t", payload_json=b'{"a":"' + b"x" * 70_000 + b'"}'),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        None,
    ),
]


@pytest.mark.parametrize(("request_", "code", "field"), BAD_INPUT)
async def test_bad_input_gets_its_status_and_writes_nothing(
    producer: Producer,
    redis_client: redis.asyncio.Redis,
    request_: p.EnqueueRequest,
    code: grpc.StatusCode,
    field: str | None,
) -> None:
    before = sorted(await redis_client.keys("*"))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await producer.stub.Enqueue(request_)
    assert info.value.code() == code
    assert "Traceback" not in (info.value.details() or "")
    if field is not None:
        assert _bad_request_fields(info.value) == [field]
    with pytest.raises(grpc.aio.AioRpcError) as batch_info:
        await producer.stub.EnqueueBatch(p.EnqueueBatchRequest(jobs=[p.EnqueueRequest(queue="q", type="t"), request_]))
    assert batch_info.value.code() == code
    if field is not None:
        assert _bad_request_fields(batch_info.value) == [f"jobs[1].{field}"]
    assert sorted(await redis_client.keys("*")) == before


async def test_garbage_bytes_are_invalid_argument_and_write_nothing(
    producer: Producer, redis_client: redis.asyncio.Redis
) -> None:
    raw = producer.channel.unary_unary("/conveyor.v1.ProducerService/Enqueue")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await raw(b"\xff\xff\xff\xff garbage")
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _bad_request_fields(info.value) == ["request"]
    assert await redis_client.keys("*") == []


async def test_empty_batch_is_invalid(producer: Producer) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await producer.stub.EnqueueBatch(p.EnqueueBatchRequest())
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize(
    ("job_id", "code"),
    [
        ("default/01ARZ3NDEKTSV4RRFFQ69G5FAV", grpc.StatusCode.NOT_FOUND),
        ("not-a-job-id", grpc.StatusCode.INVALID_ARGUMENT),
    ],
)
async def test_unknown_or_malformed_job_ids(producer: Producer, job_id: str, code: grpc.StatusCode) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as watch_info:
        await watch_all(producer, job_id)
    assert watch_info.value.code() == code
    with pytest.raises(grpc.aio.AioRpcError) as get_info:
        await producer.stub.GetJob(p.GetJobRequest(job_id=job_id))
    assert get_info.value.code() == code


async def test_malformed_after_event_id_is_invalid(producer: Producer) -> None:
    job = await enqueue(producer)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await watch_all(producer, job.job_id, after="yesterday")
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _bad_request_fields(info.value) == ["after_event_id"]


async def test_get_job_shows_a_queued_job_then_its_outcome(producer: Producer, start_worker: StartWorker) -> None:
    job = await enqueue(producer, "demo.echo", payload={"hello": "world"}, labels={"team": "a"})
    queued = (await producer.stub.GetJob(p.GetJobRequest(job_id=job.job_id))).job
    assert queued.state == job_pb2.JOB_STATE_QUEUED
    assert queued.payload["hello"] == "world" and queued.labels["team"] == "a"
    await start_worker()
    await watch_all(producer, job.job_id)
    done = (await producer.stub.GetJob(p.GetJobRequest(job_id=job.job_id))).job
    assert done.state == job_pb2.JOB_STATE_SUCCEEDED
    assert done.result.struct_value["hello"] == "world"
    assert done.attempt == 1 and done.worker == "test-worker-1"


async def test_failures_are_clear_outcomes_not_crashes(producer: Producer, start_worker: StartWorker) -> None:
    await start_worker()
    unknown = await enqueue(producer, "no.such.handler")
    once = job_pb2.RetryPolicy(max_attempts=1)
    failing = await enqueue(producer, "demo.fail", payload={"message": "boom"}, retry=once)
    bad_result = await enqueue(producer, "test.unserializable", retry=once)
    sync_job = await enqueue(producer, "test.sync", payload={"a": 1})
    unknown_events = await watch_all(producer, unknown.job_id)
    assert unknown_events[-1].type == E.EVENT_TYPE_FAILED
    assert unknown_events[-1].error.kind == "UnknownJobType" and not unknown_events[-1].error.retryable
    failed = (await watch_all(producer, failing.job_id))[-1]
    assert failed.type == E.EVENT_TYPE_FAILED and "boom" in failed.error.message and failed.error.kind == "RuntimeError"
    assert (await watch_all(producer, bad_result.job_id))[-1].error.kind == "TypeError"
    sync_events = await watch_all(producer, sync_job.job_id)
    assert [e.type for e in sync_events][-2:] == [E.EVENT_TYPE_PROGRESS, E.EVENT_TYPE_SUCCEEDED]
    assert sync_events[-1].result.struct_value["thread"] is True


async def test_timeout_fails_the_attempt(producer: Producer, start_worker: StartWorker) -> None:
    await start_worker()
    job = await enqueue(
        producer,
        "demo.sleep",
        payload={"seconds": 5, "steps": 1},
        timeout=duration_pb2.Duration(nanos=100_000_000),
        retry=job_pb2.RetryPolicy(max_attempts=1),
    )
    final = (await watch_all(producer, job.job_id))[-1]
    assert final.type == E.EVENT_TYPE_FAILED and final.error.kind == "Timeout"


async def test_several_workers_share_a_queue_and_run_each_job_once(
    producer: Producer, start_worker: StartWorker, redis_client: redis.asyncio.Redis
) -> None:
    for _ in range(3):
        await start_worker(concurrency=20)
    reqs = [p.EnqueueRequest(queue="default", type="test.count") for _ in range(600)]
    ids: set[str] = set()
    for i in range(0, 600, 200):
        ids |= {
            r.job_id for r in (await producer.stub.EnqueueBatch(p.EnqueueBatchRequest(jobs=reqs[i : i + 200]))).results
        }
    await wait_for(lambda: _ran(ids), "all jobs ran", within=30)
    keys = queue_keys("default")
    await wait_for(lambda: _stream_empty(redis_client, keys.band(5)), "acks")
    assert sum(test_handlers.runs.values()) == 600
    assert set(test_handlers.runs.values()) == {1}
    active_by_worker: dict[str, int] = {}
    for _, fields in await redis_client.xrange(keys.events):
        event = event_pb2.JobEvent.FromString(fields[b"e"])
        if event.type == E.EVENT_TYPE_ACTIVE:
            active_by_worker[event.worker] = active_by_worker.get(event.worker, 0) + 1
    assert sum(active_by_worker.values()) == 600
    assert len(active_by_worker) == 3, active_by_worker


async def _stream_empty(client: redis.asyncio.Redis, key: str) -> bool:
    return await client.xlen(key) == 0 and (await client.xpending(key, "workers"))["pending"] == 0


async def test_higher_priority_runs_first(producer: Producer, start_worker: StartWorker) -> None:
    low = [await enqueue(producer, priority=1) for _ in range(5)]
    high = await enqueue(producer, priority=9)
    await start_worker(concurrency=1)
    await wait_for(lambda: _ran({j.job_id for j in [*low, high]}), "all ran")
    assert test_handlers.started[0] == high.job_id
    assert test_handlers.started[1:] == [j.job_id for j in low]  # FIFO within a band


async def test_health_and_reflection(producer: Producer) -> None:
    health = health_pb2_grpc.HealthStub(producer.channel)
    for service in ["", "conveyor.v1.ProducerService"]:
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(producer.channel)
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name async for r in responses for s in r.list_services_response.service}
    assert {"conveyor.v1.ProducerService", "grpc.health.v1.Health"} <= names


async def test_a_high_priority_job_behind_10000_low_priority_ones_starts_next(
    producer: Producer, start_worker: StartWorker
) -> None:
    low = p.EnqueueRequest(queue="default", type="test.count", priority=1)
    for _ in range(10):
        await producer.stub.EnqueueBatch(p.EnqueueBatchRequest(jobs=[low] * 1000))
    high = await enqueue(producer, priority=9)
    await start_worker(concurrency=1)
    await wait_for(lambda: _ran({high.job_id}), "the high-priority job")
    assert test_handlers.started[0] == high.job_id
