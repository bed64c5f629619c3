"""Redis and PostgreSQL outages, a results service killed mid-batch, a producer stopped mid-Watch (invariants 1-5).

One private Redis (AOF everysec) and one private PostgreSQL for this module, because the
tests stop and start them; the results service and a producer run as real processes for
the whole module, workers per test. Every test uses its own queue.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

import grpc
import psycopg
import pytest

from conveyor.common.client import ConveyorClient
from conveyor.common.devstack.servers import PostgresServer, RedisServer
from conveyor.common.keys import RESULTS_GROUP, WORKER_GROUP, queue_keys
from conveyor.common.redis import make_redis
from conveyor.common.scripts import Scripts
from conveyor.v1 import (
    event_pb2,
    job_pb2,
    producer_service_pb2,
    producer_service_pb2_grpc,
    results_service_pb2,
    results_service_pb2_grpc,
)
from tests.conftest import FAST_PG
from tests.faults.lossy_proxy import LossyProxy
from tests.support.processes import ServiceProcess
from tests.support.wait import wait_for

pytestmark = pytest.mark.e2e
E = event_pb2
SUCCEEDED = job_pb2.JOB_STATE_SUCCEEDED
RESULTS_CONSUMER = "results-outages"
HANDLERS = {"CONVEYOR_HANDLERS": "tests.faults.outage_handlers:handlers"}


@dataclass
class OutageStack:
    redis: RedisServer
    pg: PostgresServer
    results: ServiceProcess
    producer: ServiceProcess

    def env(self) -> dict[str, str]:
        return {"REDIS_URL": self.redis.url, "CONVEYOR_RETENTION_SECONDS": "120"}

    def ensure_up(self) -> None:
        """After a test that failed half-way: servers and services running again for the next one."""
        if not self.redis.running:
            self.redis.start()
        if not self.pg.running:
            self.pg.start()
        for service in (self.results, self.producer):
            if service.proc is None or service.proc.poll() is not None:
                service.start()


@pytest.fixture(scope="module")
def stack() -> Iterator[OutageStack]:
    with RedisServer() as redis_server, PostgresServer(settings=FAST_PG) as pg_server:
        env = {"REDIS_URL": redis_server.url, "CONVEYOR_RETENTION_SECONDS": "120"}
        results = ServiceProcess(
            "results",
            {**env, "DATABASE_URL": pg_server.url, "CONVEYOR_RESULTS_CONSUMER": RESULTS_CONSUMER},
        )
        producer = ServiceProcess("producer", {**env, "CONVEYOR_RESULTS_ADDR": results.addr})
        try:
            results.start()
            producer.start()
            yield OutageStack(redis_server, pg_server, results, producer)
        finally:
            producer.kill()
            results.kill()


@pytest.fixture
def up(stack: OutageStack) -> Iterator[OutageStack]:
    """The stack, put back together after the test whatever the test broke."""
    stack.ensure_up()
    yield stack
    stack.ensure_up()


StartService = Callable[..., ServiceProcess]


@pytest.fixture
def spawn(up: OutageStack) -> Iterator[StartService]:
    """Factory: start a worker or producer process on the stack (killed at teardown)."""
    started: list[ServiceProcess] = []

    def start(service: str, name: str, wait: bool = True, **env: str) -> ServiceProcess:
        extra = {
            "producer": {"CONVEYOR_RESULTS_ADDR": up.results.addr},
            "worker": {"CONVEYOR_WORKER_ID": name},
            "results": {"DATABASE_URL": up.pg.url, "CONVEYOR_RESULTS_CONSUMER": name},
        }[service]
        process = ServiceProcess(service, {**up.env(), **extra, **env}, name=name)
        started.append(process)
        return process.start(wait=wait)

    yield start
    for process in started:
        process.kill()


def alive(*processes: ServiceProcess) -> dict[str, bool]:
    return {p.name: p.proc is not None and p.proc.poll() is None for p in processes}


# -- PostgreSQL and ResultsService checks ------------------------------------------------------


async def pg_states(stack: OutageStack, queue: str) -> Counter[int] | None:
    """Rows per state of ``queue`` in PostgreSQL, or None while it cannot be reached."""
    try:
        async with await psycopg.AsyncConnection.connect(stack.pg.url, autocommit=True, connect_timeout=2) as conn:
            cur = await conn.execute("SELECT state, count(*) FROM jobs WHERE queue = %s GROUP BY state", (queue,))
            return Counter({int(state): int(n) for state, n in await cur.fetchall()})
    except psycopg.OperationalError:
        return None


async def wait_all_final(stack: OutageStack, queue: str, n: int, within: float) -> None:
    async def done() -> bool:
        states = await pg_states(stack, queue)
        return states is not None and states == Counter({SUCCEEDED: n})

    await wait_for(done, f"{n} SUCCEEDED rows of {queue} in PostgreSQL", within=within, interval=0.1)


async def histories(stack: OutageStack, job_ids: list[str]) -> dict[str, list[event_pb2.JobEvent]]:
    """Every job's history from ResultsService.ListJobEvents, all pages."""
    gate = asyncio.Semaphore(32)
    async with grpc.aio.insecure_channel(stack.results.addr) as channel:
        stub = results_service_pb2_grpc.ResultsServiceStub(channel)

        async def one(job_id: str) -> list[event_pb2.JobEvent]:
            events: list[event_pb2.JobEvent] = []
            after = ""
            async with gate:
                while True:
                    page = await stub.ListJobEvents(
                        results_service_pb2.ListJobEventsRequest(job_id=job_id, after_event_id=after), timeout=10
                    )
                    events.extend(page.events)
                    if not page.has_more:
                        return events
                    after = page.events[-1].id

        found = await asyncio.gather(*(one(j) for j in job_ids))
    return dict(zip(job_ids, found, strict=True))


def _key(event_id: str) -> tuple[int, int]:
    ms, _, seq = event_id.partition("-")
    return int(ms), int(seq)


def _one_run(types: Sequence[int]) -> bool:
    """QUEUED, one or more ACTIVE (a reclaim), one SUCCEEDED last."""
    return (
        len(types) >= 3
        and types[0] == E.EVENT_TYPE_QUEUED
        and types[-1] == E.EVENT_TYPE_SUCCEEDED
        and set(types[1:-1]) == {E.EVENT_TYPE_ACTIVE}
    )


def check_histories(found: dict[str, list[event_pb2.JobEvent]], expected: list[int] | None) -> None:
    """Each job's history is exactly ``expected`` (event types; None: see _one_run), ids unique and ascending."""
    types = {job_id: [e.type for e in events] for job_id, events in found.items()}
    wrong = {
        j: [E.EventType.Name(t) for t in ts]
        for j, ts in types.items()
        if (ts != expected if expected is not None else not _one_run(ts))
    }
    assert not wrong, f"{len(wrong)} jobs with another history, e.g. {list(wrong.items())[:3]}"
    for job_id, events in found.items():
        keys = [_key(e.id) for e in events]
        assert keys == sorted(set(keys)), f"{job_id}: event ids repeat or are out of order: {[e.id for e in events]}"


# -- Redis checks --------------------------------------------------------------------------------


async def enqueue_many(client: ConveyorClient, queue: str, n: int, type_: str, payload: dict[str, Any]) -> list[str]:
    ids: list[str] = []
    for start in range(0, n, 1000):
        batch = [client.request(queue, type_, {**payload, "n": i}) for i in range(start, min(n, start + 1000))]
        ids += [r.job_id for r in await client.enqueue_batch(batch)]
    assert len(set(ids)) == n
    return ids


async def waiting_jobs(redis_url: str, queue: str) -> int:
    """Entries in the queue's job streams: waiting or running (acked ones are deleted)."""
    redis = make_redis(redis_url)
    try:
        return sum([int(await redis.xlen(band)) for band in queue_keys(queue).bands])
    finally:
        await redis.aclose()


# -- 1. Redis down: UNAVAILABLE at once, and back by itself ------------------------------------


async def test_enqueue_answers_unavailable_while_redis_is_down_and_recovers(up: OutageStack) -> None:
    queue = "outage-unavailable"
    request = producer_service_pb2.EnqueueRequest(queue=queue, type="demo.noop")
    async with grpc.aio.insecure_channel(up.producer.addr) as channel:
        stub = producer_service_pb2_grpc.ProducerServiceStub(channel)
        await stub.Enqueue(request, timeout=5)
        up.redis.stop()
        try:
            started = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await stub.Enqueue(request, timeout=10)
            took = time.monotonic() - started
        finally:
            up.redis.start()
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE, failed.value
        assert took < 3.0, f"UNAVAILABLE took {took:.2f} s"
        message = failed.value.details() or ""
        assert "retry" in message.lower(), message
        assert "Traceback" not in message and 'File "' not in message, message
        # Back without restarting the producer: the very first call after Redis returned succeeds.
        reply = await stub.Enqueue(request, timeout=5)
        assert reply.created and reply.job_id.startswith(queue + "/")
    assert alive(up.producer) == {"producer": True}
    assert "rpc_failed" not in up.producer.log_text()  # no INTERNAL with a traceback in the log either


# -- 2. Redis restarted (AOF) under load: every job once, nobody crashed ------------------------


async def test_redis_restart_with_jobs_queued_loses_nothing(up: OutageStack, spawn: StartService) -> None:
    queue, n = "outage-redis", 500
    # A claim whose reply the restart swallows is only taken back after the visibility timeout
    # (test_a_claim_whose_reply_is_lost_is_not_stranded): keep it short so that this test checks
    # the outcome (exactly one SUCCEEDED per job, nothing lost) without waiting 30 s for it.
    worker = spawn(
        "worker",
        "worker-redis",
        CONVEYOR_QUEUES=queue,
        CONVEYOR_CONCURRENCY="20",
        CONVEYOR_VISIBILITY_TIMEOUT_SECONDS="2",
        **HANDLERS,
    )
    async with ConveyorClient(up.producer.addr) as client:
        # No progress reports: see test_progress_report_during_a_redis_restart_does_not_fail_the_attempt.
        job_ids = await enqueue_many(client, queue, n, "outage.nap", {"seconds": 0.05})

    async def some_done() -> int:
        left = await waiting_jobs(up.redis.url, queue)
        return left if 0 < left <= n - 40 else 0

    left = await wait_for(some_done, "the worker to finish some jobs", within=15)
    assert left > 100, f"only {left} jobs left: the restart would not be under load"
    up.redis.stop()  # SIGTERM: Redis writes out its AOF and exits

    def noticed(service: ServiceProcess) -> Callable[[], Awaitable[bool]]:
        async def check() -> bool:
            return "redis_unavailable" in service.log_text()

        return check

    await wait_for(noticed(worker), "the worker to notice Redis is gone", within=10)
    await wait_for(noticed(up.results), "the results service to notice Redis is gone", within=10)
    up.redis.start()  # same port, same AOF

    await wait_all_final(up, queue, n, within=40)
    assert await waiting_jobs(up.redis.url, queue) == 0
    assert alive(worker, up.results, up.producer) == {"worker-redis": True, "results": True, "producer": True}
    # Exactly one outcome per job; a claim stranded by the restart shows as a second ACTIVE (reclaimed).
    found = await histories(up, job_ids)
    check_histories(found, None)
    runs = Counter(sum(e.type == E.EVENT_TYPE_ACTIVE for e in events) for events in found.values())
    assert runs[1] >= n - 100, f"ACTIVE events per job: {dict(runs)}"


async def test_progress_report_during_a_redis_restart_does_not_fail_the_attempt(
    up: OutageStack, spawn: StartService
) -> None:
    queue, n = "outage-progress", 5
    worker = spawn("worker", "worker-progress", CONVEYOR_QUEUES=queue)
    async with ConveyorClient(up.producer.addr) as client:
        job_ids = await enqueue_many(client, queue, n, "demo.sleep", {"seconds": 2, "steps": 20})

        async def all_running() -> bool:
            states = [(await client.get_job(j)).state for j in job_ids]
            return all(s == job_pb2.JOB_STATE_ACTIVE for s in states)

        await wait_for(all_running, "every job running")
    before = worker.log_text().count("redis_unavailable")
    up.redis.stop()
    try:
        # Down long enough (the claim loop's backoff retried twice) for progress reports to meet it.
        async def outage_felt() -> bool:
            return worker.log_text().count("redis_unavailable") >= before + 3

        await wait_for(outage_felt, "the worker to meet the outage", within=10)
    finally:
        up.redis.start()
    await wait_all_final(up, queue, n, within=20)
    found = await histories(up, job_ids)
    runs = {
        j: [E.EventType.Name(e.type) for e in events if e.type != E.EVENT_TYPE_PROGRESS] for j, events in found.items()
    }
    assert all(t == ["EVENT_TYPE_QUEUED", "EVENT_TYPE_ACTIVE", "EVENT_TYPE_SUCCEEDED"] for t in runs.values()), runs


# -- 3. PostgreSQL down under load: workers carry on, results catch up ---------------------------


async def test_postgres_down_stops_nobody_and_results_catch_up(up: OutageStack, spawn: StartService) -> None:
    queue, n = "outage-pg", 1000
    worker = spawn("worker", "worker-pg", CONVEYOR_QUEUES=queue, CONVEYOR_CONCURRENCY="50")
    keys = queue_keys(queue)
    async with ConveyorClient(up.producer.addr) as client:
        first = await enqueue_many(client, queue, n // 2, "demo.noop", {})

        async def some_projected() -> bool:
            states = await pg_states(up, queue)
            return states is not None and states[SUCCEEDED] > 0

        await wait_for(some_projected, "the first outcomes in PostgreSQL", within=15)
        up.pg.stop()
        try:
            second = await enqueue_many(client, queue, n - n // 2, "demo.noop", {})
            redis = make_redis(up.redis.url)
            try:

                async def drained() -> bool:
                    pending = await redis.xpending(keys.band(5), WORKER_GROUP)
                    return await waiting_jobs(up.redis.url, queue) == 0 and pending["pending"] == 0

                await wait_for(drained, "the worker to finish every job with PostgreSQL down", within=20)
                events = int(await redis.xlen(keys.events))
                waiting = (await redis.xpending(keys.events, RESULTS_GROUP))["pending"]
                lag = await _group_lag(redis, keys.events)
            finally:
                await redis.aclose()
            assert events >= 3 * (n - n // 2), events  # the second half's QUEUED, ACTIVE, SUCCEEDED at least
            assert waiting + lag > 0, "no event waits in Redis: were they dropped?"

            async def complained() -> bool:
                return "postgres_unavailable" in up.results.log_text()

            await wait_for(complained, "the results service to notice PostgreSQL is gone", within=10)
            assert alive(worker, up.results) == {"worker-pg": True, "results": True}
            # ResultsService itself answers UNAVAILABLE rather than hanging.
            async with grpc.aio.insecure_channel(up.results.addr) as channel:
                stub = results_service_pb2_grpc.ResultsServiceStub(channel)
                started = time.monotonic()
                with pytest.raises(grpc.aio.AioRpcError) as failed:
                    await stub.GetJob(results_service_pb2.ResultsServiceGetJobRequest(job_id=first[0]), timeout=15)
                assert failed.value.code() == grpc.StatusCode.UNAVAILABLE, failed.value
                assert time.monotonic() - started < 8
        finally:
            up.pg.start()
    await wait_all_final(up, queue, n, within=30)
    assert alive(worker, up.results) == {"worker-pg": True, "results": True}
    check_histories(
        await histories(up, first + second), [E.EVENT_TYPE_QUEUED, E.EVENT_TYPE_ACTIVE, E.EVENT_TYPE_SUCCEEDED]
    )


async def _group_lag(redis: Any, stream: str) -> int:
    for group in await redis.xinfo_groups(stream):
        if group["name"] == RESULTS_GROUP.encode():
            return int(group.get("lag") or 0)
    return 0


# -- 4. Results service SIGKILLed mid-batch, restarted under the same consumer name --------------


async def test_results_killed_mid_batch_no_duplicates_no_gaps(up: OutageStack, spawn: StartService) -> None:
    queue, n = "outage-results", 5000
    spawn("worker", "worker-results", CONVEYOR_QUEUES=queue, CONVEYOR_CONCURRENCY="100")
    async with ConveyorClient(up.producer.addr) as client:
        job_ids = await enqueue_many(client, queue, n, "demo.noop", {})

    async def part_way() -> int:
        states = await pg_states(up, queue)
        done = states[SUCCEEDED] if states else 0
        return done if 0 < done < n * 0.8 else 0

    await wait_for(part_way, "some outcomes projected", within=20, interval=0.01)
    up.results.kill()  # SIGKILL: batches read, maybe committed, not acked
    states = await pg_states(up, queue)
    assert states is not None and states[SUCCEEDED] < n, "the batch finished before the kill"
    redis = make_redis(up.redis.url)
    try:
        # Mid-batch: the dead process holds events it read and never acked.
        held = await redis.xpending(queue_keys(queue).events, RESULTS_GROUP)
        assert held["pending"] > 0, held
        up.results.start()  # same consumer name, same address: it re-reads what it held
        await wait_all_final(up, queue, n, within=30)

        async def all_acked() -> bool:
            return bool((await redis.xpending(queue_keys(queue).events, RESULTS_GROUP))["pending"] == 0)

        await wait_for(all_acked, "every event acked by the results service", within=10)
    finally:
        await redis.aclose()
    found = await histories(up, job_ids)
    check_histories(found, [E.EVENT_TYPE_QUEUED, E.EVENT_TYPE_ACTIVE, E.EVENT_TYPE_SUCCEEDED])


# -- 5. Watch across producers: the stream ends when its producer stops, resumes on another ------


async def _watch(
    stub: producer_service_pb2_grpc.ProducerServiceStub, job_id: str, after: str = ""
) -> AsyncIterator[event_pb2.JobEvent]:
    call = stub.Watch(producer_service_pb2.WatchRequest(job_id=job_id, after_event_id=after), timeout=30)
    async for response in cast(AsyncIterator[producer_service_pb2.WatchResponse], call):
        yield response.event


async def test_watch_ends_unavailable_when_its_producer_stops_and_resumes_on_another(
    up: OutageStack, spawn: StartService
) -> None:
    queue = "outage-watch"
    spawn("worker", "worker-watch", CONVEYOR_QUEUES=queue)
    # The default grace (10 s): a stream left open until the grace expires would show here.
    producer_a = spawn("producer", "producer-a")
    producer_b = up.producer
    async with ConveyorClient(producer_b.addr) as client:
        job = await client.enqueue(queue, "demo.sleep", {"seconds": 3, "steps": 6})
    first: list[event_pb2.JobEvent] = []
    async with grpc.aio.insecure_channel(producer_a.addr) as channel_a:
        stub_a = producer_service_pb2_grpc.ProducerServiceStub(channel_a)
        call = stub_a.Watch(producer_service_pb2.WatchRequest(job_id=job.job_id), timeout=30)
        stopped_at = 0.0
        ended: grpc.StatusCode | None = None
        details = ""
        try:
            async for response in call:
                first.append(response.event)
                if len(first) == 2:
                    producer_a.signal(signal.SIGTERM)
                    stopped_at = time.monotonic()
            ended = grpc.StatusCode.OK
        except grpc.aio.AioRpcError as exc:
            ended, details = exc.code(), exc.details() or ""
        took = time.monotonic() - stopped_at
    assert len(first) >= 2
    assert first[-1].type not in (E.EVENT_TYPE_SUCCEEDED,), "the job finished before producer A stopped"
    assert ended == grpc.StatusCode.UNAVAILABLE, (ended, details)
    assert "after_event_id" in details, details
    assert took < 3.0, f"the stream took {took:.1f} s to end after SIGTERM"
    assert await asyncio.to_thread(producer_a.wait, 15) == 0, producer_a.log_tail()

    async with grpc.aio.insecure_channel(producer_b.addr) as channel_b:
        stub_b = producer_service_pb2_grpc.ProducerServiceStub(channel_b)
        rest = [e async for e in _watch(stub_b, job.job_id, first[-1].id)]
        full = [e async for e in _watch(stub_b, job.job_id)]
    joined = [(e.id, e.type) for e in first + rest]
    assert joined == [(e.id, e.type) for e in full], "a gap or a repeat across producers"
    assert full[-1].type == E.EVENT_TYPE_SUCCEEDED
    assert [e.type for e in full].count(E.EVENT_TYPE_PROGRESS) == 6


# -- 6. A reply lost on its way back (Redis stopping right after a command, a cut connection) ----


@pytest.fixture
async def lossy(up: OutageStack) -> AsyncIterator[LossyProxy]:
    proxy = await LossyProxy(up.redis.port).start()
    yield proxy
    await proxy.close()


async def _start_behind(proxy: LossyProxy, spawn: StartService, service: str, name: str, **env: str) -> ServiceProcess:
    # The proxy runs on this event loop: wait for SERVING in a thread, not on the loop.
    process = spawn(service, name, wait=False, REDIS_URL=proxy.url, **env)
    await asyncio.to_thread(process.wait_serving, 30)
    return process


async def _script_sha(up: OutageStack, name: str) -> bytes:
    redis = make_redis(up.redis.url)
    try:
        return str(getattr(Scripts(redis), name).sha).encode()
    finally:
        await redis.aclose()


async def test_a_claim_whose_reply_is_lost_is_not_stranded(
    up: OutageStack, spawn: StartService, lossy: LossyProxy
) -> None:
    queue = "outage-lost-claim"
    await _start_behind(
        lossy,
        spawn,
        "worker",
        "worker-lost-claim",
        CONVEYOR_QUEUES=queue,
        CONVEYOR_VISIBILITY_TIMEOUT_SECONDS="30",
        **HANDLERS,
    )
    async with ConveyorClient(up.producer.addr) as client:
        warm = await client.enqueue(queue, "outage.nap", {"seconds": 0})  # the claim script is loaded and has run

        async def warm_done() -> bool:
            return (await client.get_job(warm.job_id)).state == SUCCEEDED

        await wait_for(warm_done, "a first job through the proxy")
        lossy.arm(await _script_sha(up, "_claim"))
        job_ids = await enqueue_many(client, queue, 5, "outage.nap", {"seconds": 0})
        await asyncio.wait_for(lossy.fired.wait(), 10)

        async def all_done() -> bool:
            return all([(await client.get_job(j)).state == SUCCEEDED for j in job_ids])

        # Well before the 30-s visibility timeout: the worker knows it may hold jobs it was never told of.
        await wait_for(all_done, "the jobs of the lost claim to run", within=5)
    await wait_all_final(up, queue, len(job_ids) + 1, within=20)  # the warm-up job too
    found = await histories(up, job_ids)
    check_histories(found, [E.EVENT_TYPE_QUEUED, E.EVENT_TYPE_ACTIVE, E.EVENT_TYPE_SUCCEEDED])


async def test_an_enqueue_whose_reply_is_lost_makes_one_job_and_a_keyed_retry_finds_it(
    up: OutageStack, spawn: StartService, lossy: LossyProxy
) -> None:
    queue = "outage-lost-enqueue"
    producer = await _start_behind(lossy, spawn, "producer", "producer-lossy")
    redis = make_redis(up.redis.url)

    async def jobs() -> int:
        return int(await redis.hlen(queue_keys(queue).state))  # type: ignore[misc]

    async def lose_one(stub: Any, request: producer_service_pb2.EnqueueRequest) -> grpc.StatusCode:
        lossy.arm(await _script_sha(up, "_enqueue"))
        try:
            await stub.Enqueue(request, timeout=10)
        except grpc.aio.AioRpcError as exc:
            return exc.code()
        finally:
            # The producer may answer as soon as its connection is cut, before Redis's reply
            # (the proof that the script ran) reaches the proxy: wait for it, with a deadline.
            await asyncio.wait_for(lossy.fired.wait(), 10)
        return grpc.StatusCode.OK

    try:
        async with grpc.aio.insecure_channel(producer.addr) as channel:
            stub = producer_service_pb2_grpc.ProducerServiceStub(channel)
            plain = producer_service_pb2.EnqueueRequest(queue=queue, type="demo.noop")
            await stub.Enqueue(plain, timeout=5)  # the script is loaded, the queue registered
            # No idempotency key: answered OK, exactly one job; answered UNAVAILABLE, at most one
            # (the producer must not send the script again by itself after an ambiguous failure).
            before = await jobs()
            answer = await lose_one(stub, plain)
            made = await jobs() - before
            assert made == 1 if answer == grpc.StatusCode.OK else made <= 1, (answer, made)
            # With a key, the retry a client makes after UNAVAILABLE gets the job the lost call made.
            keyed = producer_service_pb2.EnqueueRequest(queue=queue, type="demo.noop", idempotency_key="lost-reply")
            before = await jobs()
            answer = await lose_one(stub, keyed)
            retried = await stub.Enqueue(keyed, timeout=5)
            assert await jobs() - before == 1
            assert answer == grpc.StatusCode.OK or not retried.created, (answer, retried)
    finally:
        await redis.aclose()


# -- 7. Started while Redis is down: wait for it with backoff, no crash loop -------------------


async def _started_while_redis_is_down(
    up: OutageStack, spawn: StartService, service: str, name: str, **env: str
) -> ServiceProcess:
    up.redis.stop()
    try:
        process = spawn(service, name, wait=False, **env)

        async def retried() -> bool:
            assert alive(process)[name], f"{name} exited while Redis was down:\n{process.log_tail()}"
            return process.log_text().count("redis_unavailable_at_start") >= 3

        await wait_for(retried, f"{name} to keep waiting for Redis", within=10)
    finally:
        up.redis.start()
    await asyncio.to_thread(process.wait_serving, 15)  # by itself, no restart
    assert "redis_connected" in process.log_text()
    return process


async def test_results_started_while_redis_is_down_waits_for_it(up: OutageStack, spawn: StartService) -> None:
    late = await _started_while_redis_is_down(up, spawn, "results", "results-late")
    # Leave gracefully: what it read is committed and acked, nothing stays pending under its name.
    assert await asyncio.to_thread(late.stop) == 0, late.log_tail()


async def test_worker_started_while_redis_is_down_waits_for_it(up: OutageStack, spawn: StartService) -> None:
    queue = "outage-late-worker"
    await _started_while_redis_is_down(up, spawn, "worker", "worker-late", CONVEYOR_QUEUES=queue, **HANDLERS)
    async with ConveyorClient(up.producer.addr) as client:
        job = await client.enqueue(queue, "outage.nap", {"seconds": 0})

        async def done() -> bool:
            return (await client.get_job(job.job_id)).state == SUCCEEDED

        await wait_for(done, "the late worker to run a job", within=10)
