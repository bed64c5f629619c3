"""/metrics on every service of a real stack, scraped after known work and parsed with the
Prometheus text parser."""

from __future__ import annotations

import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conveyor.common.client import ConveyorClient
from conveyor.common.devstack.servers import PostgresServer, RedisServer, free_port
from conveyor.common.errors import ConveyorError
from tests.support.processes import ServiceProcess
from tests.support.wait import wait_for

pytestmark = pytest.mark.e2e

QUEUE = "metrics"


@dataclass
class Scraped:
    producer: str
    worker: str
    results: str
    producer_addr: str
    results_addr: str


def scrape(addr: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://{addr}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    found = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            found[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return found


@pytest.fixture(scope="module")
def stack(pg_server: PostgresServer) -> Iterator[Scraped]:
    database = f"metrics_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_server.url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{database}"')
    database_url = pg_server.url.rsplit("/", 1)[0] + f"/{database}"
    ports = {name: f"127.0.0.1:{free_port()}" for name in ("producer", "worker", "results")}
    with RedisServer() as redis_server:
        common = {"REDIS_URL": redis_server.url}
        processes: list[ServiceProcess] = []
        try:
            results = ServiceProcess(
                "results", {**common, "DATABASE_URL": database_url, "CONVEYOR_METRICS_ADDR": ports["results"]}
            ).start()
            processes.append(results)
            producer_env = {**common, "CONVEYOR_RESULTS_ADDR": results.addr, "CONVEYOR_METRICS_ADDR": ports["producer"]}
            producer = ServiceProcess("producer", producer_env).start()
            processes.append(producer)
            worker_env = {**common, "CONVEYOR_QUEUES": QUEUE, "CONVEYOR_CONCURRENCY": "7"}
            processes.append(ServiceProcess("worker", {**worker_env, "CONVEYOR_METRICS_ADDR": ports["worker"]}).start())
            yield Scraped(ports["producer"], ports["worker"], ports["results"], producer.addr, results.addr)
        finally:
            for p in reversed(processes):
                p.kill()


def jobs(found: dict[tuple[str, tuple[tuple[str, str], ...]], float], event: str, type_: str) -> float:
    return found.get(("conveyor_jobs_total", (("event", event), ("queue", QUEUE), ("type", type_))), 0.0)


async def test_every_service_serves_its_metrics_after_known_work(stack: Scraped) -> None:
    async with ConveyorClient(stack.producer_addr, stack.results_addr) as client:
        ids = [(await client.enqueue(QUEUE, "demo.echo", {"n": n})).job_id for n in range(3)]
        ids += [(await client.enqueue(QUEUE, "demo.fail", {"permanent": True})).job_id for _ in range(2)]
        with pytest.raises(ConveyorError):
            await client.enqueue(QUEUE, "")

        async def recorded() -> bool:
            try:
                return all([(await client.list_job_events(j)).events[-1].type in (5, 6) for j in ids])
            except (ConveyorError, IndexError):
                return False

        await wait_for(recorded, "every job's outcome in PostgreSQL")

    producer = scrape(stack.producer)
    assert jobs(producer, "enqueued", "demo.echo") == 3
    assert jobs(producer, "enqueued", "demo.fail") == 2
    refused = [
        value
        for (name, labels), value in producer.items()
        if name == "conveyor_rpc_requests_total" and ("code", "INVALID_ARGUMENT") in labels
    ]
    assert sum(refused) >= 1, "the refused enqueue is counted with its code"
    assert producer[("conveyor_queue_scrape_ok", ())] == 1
    assert producer[("conveyor_queue_jobs", (("queue", QUEUE), ("state", "queued")))] == 0
    assert producer[("conveyor_queue_jobs", (("queue", QUEUE), ("state", "dead_lettered")))] == 2
    assert producer[("conveyor_queue_backlog", (("queue", QUEUE),))] == 0
    assert producer[("conveyor_projection_lag_seconds", (("queue", QUEUE),))] >= 0

    worker = scrape(stack.worker)
    assert jobs(worker, "started", "demo.echo") == 3
    assert jobs(worker, "succeeded", "demo.echo") == 3
    assert jobs(worker, "failed", "demo.fail") == 2
    duration = (("outcome", "succeeded"), ("queue", QUEUE), ("type", "demo.echo"))
    assert worker[("conveyor_job_duration_seconds_count", duration)] == 3
    assert worker[("conveyor_job_wait_seconds_count", (("queue", QUEUE),))] == 5
    assert worker[("conveyor_worker_slots", ())] == 7
    assert worker[("conveyor_worker_slots_in_use", ())] == 0

    results = scrape(stack.results)
    list_events = (("code", "OK"), ("method", "/conveyor.v1.ResultsService/ListJobEvents"))
    assert results[("conveyor_rpc_requests_total", list_events)] >= 5
    assert results[("process_cpu_seconds_total", ())] > 0
