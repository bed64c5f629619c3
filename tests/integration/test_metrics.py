"""Prometheus metrics: queue state read from a real Redis at scrape time, RPCs counted by the
interceptor on real gRPC calls, and the exposition served over HTTP and parsed back."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator

import grpc
import pytest
import redis
import redis.asyncio
from google.protobuf.duration_pb2 import Duration
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from conveyor.common import metrics
from conveyor.common.devstack.servers import free_port
from conveyor.common.keys import RESULTS_GROUP, queue_keys
from conveyor.common.settings import ProducerSettings, ResultsSettings, WorkerSettings
from conveyor.v1 import admin_service_pb2
from conveyor.v1 import producer_service_pb2 as p
from tests.integration.conftest import Producer


def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(registry).decode()
    found = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            found[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return found


@pytest.fixture
def sync_redis(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


async def test_queue_state_is_read_from_redis_when_scraped(producer: Producer, sync_redis: redis.Redis) -> None:
    registry = CollectorRegistry()
    registry.register(metrics.QueueCollector(sync_redis, max_queues=1))
    for i in range(3):
        await producer.stub.Enqueue(p.EnqueueRequest(queue="m-a", type="t", payload_json=b'{"i": %d}' % i))
    await producer.stub.Enqueue(p.EnqueueRequest(queue="m-a", type="t", delay=Duration(seconds=3600)))
    await producer.stub.Enqueue(p.EnqueueRequest(queue="m-b", type="t"))
    await producer.admin.PauseQueue(admin_service_pb2.PauseQueueRequest(queue="m-a"))

    got = samples(registry)
    assert got[("conveyor_queue_scrape_ok", ())] == 1
    assert got[("conveyor_queue_jobs", (("queue", "m-a"), ("state", "queued")))] == 3
    assert got[("conveyor_queue_jobs", (("queue", "m-a"), ("state", "delayed")))] == 1
    assert got[("conveyor_queue_jobs", (("queue", "m-a"), ("state", "active")))] == 0
    assert got[("conveyor_queue_backlog", (("queue", "m-a"),))] == 3
    assert got[("conveyor_queue_paused", (("queue", "m-a"),))] == 1
    assert got[("conveyor_queue_oldest_waiting_seconds", (("queue", "m-a"),))] >= 0
    # No results service has read the events yet: the lag is the oldest event's age.
    assert got[("conveyor_projection_lag_seconds", (("queue", "m-a"),))] >= 0
    # Bounded: only the first queue by name is exported, the other one is counted.
    assert ("conveyor_queue_backlog", (("queue", "m-b"),)) not in got
    assert got[("conveyor_queues_not_exported", ())] == 1

    # Once the results group has read and acked every event, nothing lags.
    events = queue_keys("m-a").events
    read = sync_redis.xreadgroup(RESULTS_GROUP, "r", {events: ">"})
    assert read[0][1], "the queue has events"
    sync_redis.xack(events, RESULTS_GROUP, *[entry_id for entry_id, _ in read[0][1]])
    got = samples(registry)
    assert got[("conveyor_projection_lag_seconds", (("queue", "m-a"),))] == 0


def test_a_redis_that_cannot_answer_makes_the_scrape_say_so() -> None:
    registry = CollectorRegistry()
    registry.register(metrics.QueueCollector(redis.Redis(port=free_port(), socket_connect_timeout=0.5)))
    got = samples(registry)
    assert got == {("conveyor_queue_scrape_ok", ()): 0}


def _rpc_count(method: str, code: str) -> float:
    value = REGISTRY.get_sample_value("conveyor_rpc_requests_total", {"method": method, "code": code})
    return value or 0.0


async def test_rpcs_are_counted_by_method_and_code(producer: Producer) -> None:
    enqueue = "/conveyor.v1.ProducerService/Enqueue"
    ok, bad = _rpc_count(enqueue, "OK"), _rpc_count(enqueue, "INVALID_ARGUMENT")
    await producer.stub.Enqueue(p.EnqueueRequest(queue="m-rpc", type="t"))
    with pytest.raises(grpc.aio.AioRpcError):
        await producer.stub.Enqueue(p.EnqueueRequest(queue="m-rpc", type=""))
    assert _rpc_count(enqueue, "OK") == ok + 1
    assert _rpc_count(enqueue, "INVALID_ARGUMENT") == bad + 1
    count = REGISTRY.get_sample_value("conveyor_rpc_duration_seconds_count", {"method": enqueue})
    assert count is not None and count >= 2


def test_the_exposition_is_served_over_http() -> None:
    port = free_port()
    stop = metrics.serve(f"127.0.0.1:{port}")
    assert stop is not None
    try:
        metrics.job_event("m-http", "t", "enqueued", 2)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            text = reply.read().decode()
        families = {f.name: f for f in text_string_to_metric_families(text)}
        jobs = families["conveyor_jobs"]
        assert any(
            s.labels == {"queue": "m-http", "type": "t", "event": "enqueued"} and s.value >= 2 for s in jobs.samples
        )
        assert "process_cpu_seconds" in families
    finally:
        stop()
    assert metrics.serve("off") is None and metrics.serve("") is None


def test_client_chosen_label_values_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics, "MAX_LABEL_VALUES", 3)
    bounded = metrics._Bounded()
    assert [bounded(v) for v in ("a", "b", "c", "d", "a", "e")] == ["a", "b", "c", "other", "a", "other"]


def test_cached_children_count_into_other_past_the_bound_and_the_cache_stays_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(metrics, "bounded_queue", metrics._Bounded())
    monkeypatch.setattr(metrics, "bounded_type", metrics._Bounded())
    monkeypatch.setattr(metrics, "MAX_LABEL_VALUES", 2)
    monkeypatch.setattr(metrics, "_jobs", {})

    def value(queue: str) -> float:
        return metrics.JOBS.labels(queue, "bounded-t", "started")._value.get()  # type: ignore[no-any-return]

    other_before = value(metrics.OTHER)
    for queue in ("bq-1", "bq-2", "bq-3", "bq-4", "bq-1"):
        metrics.job_started(queue, "bounded-t", None)
    assert value("bq-1") == 2 and value("bq-2") == 1
    assert value(metrics.OTHER) == other_before + 2  # bq-3 and bq-4, past the bound
    assert set(metrics._jobs) == {("bq-1", "bounded-t", "started"), ("bq-2", "bounded-t", "started")}


def test_the_default_address_is_beside_the_grpc_port() -> None:
    assert ProducerSettings.from_env({}).metrics_addr == "127.0.0.1:51051"
    assert WorkerSettings.from_env({"CONVEYOR_GRPC_ADDR": "0.0.0.0:50062"}).metrics_addr == "0.0.0.0:51062"
    assert ResultsSettings.from_env({"CONVEYOR_METRICS_ADDR": "off"}).metrics_addr == "off"
    assert ProducerSettings.from_env({"CONVEYOR_GRPC_ADDR": "127.0.0.1:0"}).metrics_addr == "off"
    assert ProducerSettings.from_env({}).metrics_max_queues == 200


async def test_redis_client_is_not_needed_at_registration(redis_client: redis.asyncio.Redis) -> None:
    # describe() returns nothing, so registering the collector reads nothing from Redis.
    registry = CollectorRegistry()
    collector = metrics.QueueCollector(redis.Redis(port=free_port()))
    registry.register(collector)
    assert list(collector.describe()) == []
