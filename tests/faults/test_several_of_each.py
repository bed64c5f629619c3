"""Several of every service at once (issue #12 item 5): 3 producers, 4 workers, 2 results services.

A Watch resumes on another producer without a gap or a repeat; schedule ticks fire once however
many workers run the scheduler; the two results services share the projection without writing
anything twice and prune each job once; and killing one of each under load loses nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import grpc
import psycopg
import pytest

from conveyor.common.client import ConveyorClient
from conveyor.common.devstack.servers import PostgresServer, RedisServer
from conveyor.common.errors import ConveyorError, NotFound
from conveyor.common.keys import queue_keys
from conveyor.common.redis import make_redis
from conveyor.common.schedules import tick_idempotency_key
from conveyor.v1 import event_pb2, job_pb2, producer_service_pb2, producer_service_pb2_grpc
from tests.support.databases import fresh_database
from tests.support.processes import ServiceProcess
from tests.support.schedules import ticks_fired
from tests.support.wait import wait_for

pytestmark = pytest.mark.e2e
E = event_pb2
QUEUES = ("alpha", "beta")
TICKS = "ticks"  # no worker consumes it: every job a tick made stays in its stream to be counted


@dataclass
class Fleet:
    redis: RedisServer
    database_url: str
    producers: list[ServiceProcess]
    workers: list[ServiceProcess]
    results: list[ServiceProcess]


@pytest.fixture(scope="module")
def fleet(pg_server: PostgresServer) -> Iterator[Fleet]:
    database_url = fresh_database(pg_server, "fleet")
    with RedisServer(appendonly=True) as redis_server:
        common = {"REDIS_URL": redis_server.url, "CONVEYOR_RETENTION_SECONDS": "120"}
        results = [
            ServiceProcess(
                "results",
                {
                    **common,
                    "DATABASE_URL": database_url,
                    "CONVEYOR_RESULTS_CONSUMER": f"results-{i}",
                    # A dead one's unwritten events move to the other within seconds, not a minute.
                    "CONVEYOR_PROJECTION_DEFER_MS": "500",
                    "CONVEYOR_RESULTS_CLAIM_IDLE_SECONDS": "4",
                    # Prune what finished over a day ago, every half second (the test ages rows).
                    "CONVEYOR_PG_RETENTION_DAYS": "1",
                    "CONVEYOR_PG_PRUNE_INTERVAL_SECONDS": "0.5",
                    "CONVEYOR_PG_PRUNE_BATCH": "50",
                },
                name=f"results-{i}",
            )
            for i in range(2)
        ]
        producers = [
            ServiceProcess("producer", {**common, "CONVEYOR_RESULTS_ADDR": results[i % 2].addr}, name=f"producer-{i}")
            for i in range(3)
        ]
        workers = [
            ServiceProcess(
                "worker",
                {
                    **common,
                    "CONVEYOR_QUEUES": ",".join(QUEUES),
                    "CONVEYOR_WORKER_ID": f"worker-{i}",
                    "CONVEYOR_CONCURRENCY": "20",
                    "CONVEYOR_HANDLERS": "tests.support.handlers:handlers",
                    "CONVEYOR_VISIBILITY_TIMEOUT_SECONDS": "2",
                },
                name=f"worker-{i}",
            )
            for i in range(4)
        ]
        everyone = [*results, *producers, *workers]
        try:
            for process in everyone:
                process.start(wait=False)
            for process in everyone:
                process.wait_serving(60)
            yield Fleet(redis_server, database_url, producers, workers, results)
        finally:
            for process in everyone:
                process.kill()


def _client(fleet: Fleet, i: int) -> ConveyorClient:
    return ConveyorClient(fleet.producers[i].addr, fleet.results[i % 2].addr, coalesce=False, retries=1)


async def test_a_watch_resumes_on_another_producer_without_gap_or_repeat(fleet: Fleet) -> None:
    async with _client(fleet, 0) as first, _client(fleet, 1) as second:
        job = await first.enqueue("alpha", "demo.sleep", {"seconds": 2, "steps": 8})
        seen: list[event_pb2.JobEvent] = []
        async with grpc.aio.insecure_channel(fleet.producers[0].addr) as channel:
            stub = producer_service_pb2_grpc.ProducerServiceStub(channel)
            call = stub.Watch(producer_service_pb2.WatchRequest(job_id=job.job_id))
            async for response in call:
                seen.append(response.event)
                if response.event.type == E.EVENT_TYPE_PROGRESS:
                    break
            call.cancel()
        # The producer the watcher was on dies (as a pod would); the watcher goes to another one.
        fleet.producers[0].kill()
        async for event in second.watch(job.job_id, after_event_id=seen[-1].id):
            seen.append(event)
        assert seen[-1].type == E.EVENT_TYPE_SUCCEEDED
        ids = [e.id for e in seen]
        assert len(ids) == len(set(ids)), "an event was delivered twice"

        async def recorded() -> bool:
            try:
                history = (await second.list_job_events(job.job_id)).events
            except NotFound:
                return False  # not in PostgreSQL yet
            return [e.id for e in history] == ids

        # The whole history, as the results services recorded it: the watcher saw all of it, in order.
        # (The two results services read the events stream as one consumer group, so one may write
        # a job's last progress a moment after the other wrote its outcome: wait, don't compare once.)
        await wait_for(recorded, "the history in PostgreSQL to be what the watcher saw", within=20, interval=0.1)
    fleet.producers[0].start()


async def test_every_schedule_tick_fires_once_across_four_workers(fleet: Fleet) -> None:
    start = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=3)
    end = start + timedelta(seconds=5)  # ticks at start, start+1 s, ..., start+5 s: six
    async with _client(fleet, 2) as creator, _client(fleet, 1) as reader:
        spec = creator.schedule_spec(TICKS, "test.count", {}, every=timedelta(seconds=1), start_at=start, end_at=end)
        _, created = await creator.create_schedule("fleet-ticks", spec)
        assert created

        async def finished() -> bool:
            got = await reader.get_schedule("fleet-ticks")
            return not got.HasField("next_fire_at") and got.last_tick_at.ToDatetime(UTC) == end

        await wait_for(finished, "the last tick recorded", within=40, interval=0.1)
    redis = make_redis(fleet.redis.url)
    try:
        entries = await redis.xrange(queue_keys(TICKS).band(5))
    finally:
        await redis.aclose()
    keys = [job_pb2.Job.FromString(fields[b"d"]).idempotency_key for _, fields in entries]
    first = int(start.timestamp() * 1000)
    assert keys == [tick_idempotency_key("fleet-ticks", first + k * 1000) for k in range(6)]
    assert sum(ticks_fired(w, "fleet-ticks") for w in fleet.workers) == 6


async def _enqueue_anywhere(clients: list[ConveyorClient], n: int, accepted: dict[str, str]) -> None:
    """Enqueue ``n`` jobs round-robin over the producers; a call a dead producer fails goes to the
    next one with the same idempotency key, as a client behind a load balancer would retry."""
    turn = itertools.count()

    async def one(i: int) -> None:
        key = f"fleet-{i}"
        for _ in range(len(clients) * 3):
            client = clients[next(turn) % len(clients)]
            try:
                got = await client.enqueue(
                    QUEUES[i % 2], "demo.sleep", {"seconds": 0.2, "steps": 1}, idempotency_key=key
                )
            except ConveyorError:
                continue
            accepted[key] = got.job_id
            return
        raise AssertionError(f"no producer took {key}")

    for chunk in range(0, n, 20):
        await asyncio.gather(*(one(i) for i in range(chunk, min(n, chunk + 20))))


async def test_killing_one_of_each_under_load_loses_and_repeats_nothing(fleet: Fleet) -> None:
    n = 400
    clients = [_client(fleet, i) for i in range(3)]
    accepted: dict[str, str] = {}
    try:
        load = asyncio.create_task(_enqueue_anywhere(clients, n, accepted))

        async def a_third() -> bool:
            return len(accepted) >= n // 3

        await wait_for(a_third, "a third of the jobs enqueued", within=30)
        for group in (fleet.producers, fleet.workers, fleet.results):
            group[1].kill()  # SIGKILL: no drain, no cleanup
        await asyncio.wait_for(load, 120)
    finally:
        for client in clients:
            await client.close()
    assert len(accepted) == n
    assert len(set(accepted.values())) == n, "an idempotency key made two jobs"
    ids = sorted(accepted.values())

    def finished_rows() -> list[tuple[str, int]]:
        with psycopg.connect(fleet.database_url) as conn:
            rows = conn.execute(
                "SELECT job_id, state FROM jobs WHERE job_id = ANY(%s) ORDER BY job_id", (ids,)
            ).fetchall()
        return [(str(r[0]), int(r[1])) for r in rows]

    async def all_succeeded() -> bool:
        rows = await asyncio.to_thread(finished_rows)
        return len(rows) == n and all(state == job_pb2.JOB_STATE_SUCCEEDED for _, state in rows)

    await wait_for(all_succeeded, f"all {n} jobs SUCCEEDED in PostgreSQL", within=120, interval=0.5)
    # Each job's recorded history, read back through a surviving results service: every event once,
    # one outcome (a job the killed worker held ran again, so two starts are allowed, never two ends).
    async with ConveyorClient(fleet.producers[0].addr, fleet.results[0].addr, coalesce=False) as reader:
        for job_id in ids[:: max(1, n // 80)]:
            events = (await reader.list_job_events(job_id)).events
            assert len({e.id for e in events}) == len(events), f"{job_id}: an event recorded twice"
            outcomes = Counter(e.type for e in events if e.type == E.EVENT_TYPE_SUCCEEDED)
            assert outcomes[E.EVENT_TYPE_SUCCEEDED] == 1, f"{job_id}: {[e.type for e in events]}"

    # The killed ones come back (as their supervisor would restart them); then pruning, with both
    # results services running its loop: age every finished row past the retention, and each job
    # is deleted once, by one of them.
    for group in (fleet.producers, fleet.workers, fleet.results):
        group[1].start()
    with psycopg.connect(fleet.database_url, autocommit=True) as conn:
        total = conn.execute("SELECT count(*) FROM jobs WHERE finished_at IS NOT NULL").fetchone()
        conn.execute("UPDATE jobs SET finished_at = now() - interval '2 days' WHERE finished_at IS NOT NULL")
    assert total is not None and total[0] >= n

    def remaining() -> int:
        with psycopg.connect(fleet.database_url) as conn:
            row = conn.execute("SELECT count(*) FROM jobs WHERE finished_at IS NOT NULL").fetchone()
        return int(row[0]) if row else -1

    async def none_left() -> bool:
        return await asyncio.to_thread(remaining) == 0

    await wait_for(none_left, "every finished job pruned", within=30, interval=0.2)

    async def all_logged() -> bool:
        # A prune's log line follows its DELETE's commit: the rows can be gone a moment before it is written.
        return sum(_pruned(process) for process in fleet.results) >= total[0]

    with contextlib.suppress(AssertionError):  # a short count is reported by the assert below
        await wait_for(all_logged, "every prune logged", within=15, interval=0.2)
    pruned = [_pruned(process) for process in fleet.results]
    assert sum(pruned) == total[0], f"pruned {pruned}: a job was counted twice, or deleted by something else"


def _pruned(process: ServiceProcess) -> int:
    """Jobs the process's prune loop says it deleted."""
    return sum(int(record["jobs"]) for record in process.records("pruned"))
