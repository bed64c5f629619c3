"""PostgreSQL refusing work is a fault like any other (issue 10, DESIGN.md invariant 8).

A private PostgreSQL is driven into each state with its own commands (a database made
read-only, privileges revoked, the jobs table locked) while a results service, a producer
and two workers run as real processes with a few hundred jobs in flight. The results service
connects as an ordinary role (a superuser would ignore a REVOKE). After each fault: every job
has exactly one SUCCEEDED row, nothing was set aside, health went NOT_SERVING while the
projector could not commit and is SERVING again.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import psycopg
import pytest
import redis.asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conveyor.common.client import ConveyorClient
from conveyor.common.devstack.servers import PostgresServer, RedisServer
from conveyor.common.keys import queue_keys
from conveyor.v1 import event_pb2, job_pb2, results_service_pb2, results_service_pb2_grpc
from tests.conftest import FAST_PG
from tests.support.processes import ServiceProcess
from tests.support.wait import wait_for

pytestmark = pytest.mark.e2e
QUEUE = "pgfaults"
APP_ROLE = "conveyor_app"
APP_DB = "conveyor_app"
JOBS = 300
RETENTION_S = 1
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass
class PgStack:
    redis: RedisServer
    pg: PostgresServer
    app_url: str
    results: ServiceProcess
    producer: ServiceProcess
    workers: list[ServiceProcess]

    def admin(self, dbname: str = APP_DB) -> psycopg.Connection[Any]:
        """A superuser connection to the results database (or another one)."""
        url = self.pg.url.rsplit("/", 1)[0] + "/" + dbname
        # Writable whatever the database's default says (the read-only test sets it).
        return psycopg.connect(url, autocommit=True, options="-c default_transaction_read_only=off")


@pytest.fixture(scope="module")
def stack() -> Iterator[PgStack]:
    with RedisServer() as redis_server, PostgresServer(settings=FAST_PG) as pg_server:
        with psycopg.connect(pg_server.url, autocommit=True) as conn:
            conn.execute(f"CREATE ROLE {APP_ROLE} LOGIN")
            conn.execute(f"CREATE DATABASE {APP_DB} OWNER {APP_ROLE}")
        app_url = f"postgresql://{APP_ROLE}@127.0.0.1:{pg_server.port}/{APP_DB}"
        # A short retention: the outage test outlasts it many times over.
        env = {"REDIS_URL": redis_server.url, "CONVEYOR_RETENTION_SECONDS": str(RETENTION_S)}
        results = ServiceProcess(
            "results",
            {
                **env,
                "DATABASE_URL": app_url,
                "CONVEYOR_DB_LOCK_TIMEOUT_SECONDS": "1",
                "CONVEYOR_UNHEALTHY_AFTER_SECONDS": "1",
                "CONVEYOR_EXIT_AFTER_SECONDS": "0",
            },
        )
        producer = ServiceProcess("producer", {**env, "CONVEYOR_RESULTS_ADDR": results.addr})
        workers = [
            ServiceProcess(
                "worker",
                {
                    **env,
                    "CONVEYOR_QUEUES": QUEUE,
                    "CONVEYOR_WORKER_ID": f"pg-worker-{i}",
                    "CONVEYOR_CONCURRENCY": "20",
                    "CONVEYOR_HANDLERS": "tests.faults.outage_handlers:handlers",
                },
                name=f"pg-worker-{i}",
            )
            for i in range(2)
        ]
        try:
            results.start()
            producer.start()
            for worker in workers:
                worker.start()
            yield PgStack(redis_server, pg_server, app_url, results, producer, workers)
        finally:
            for process in (*workers, producer, results):
                process.kill()


def _health(stack: PgStack) -> int:
    with grpc.insecure_channel(stack.results.addr) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            return int(stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status)  # type: ignore[attr-defined]
        except grpc.RpcError:
            return -1


async def wait_health(stack: PgStack, status: int, within: float = 20.0) -> None:
    async def reached() -> bool:
        return await asyncio.to_thread(_health, stack) == status

    name = health_pb2.HealthCheckResponse.ServingStatus.Name(status)  # type: ignore[arg-type]
    await wait_for(reached, f"results health {name}", within=within, interval=0.1)


async def enqueue(stack: PgStack, n: int = JOBS) -> list[str]:
    async with ConveyorClient(stack.producer.addr) as client:
        batch = [client.request(QUEUE, "outage.nap", {"seconds": 0.02, "n": i}) for i in range(n)]
        ids = [r.job_id for r in await client.enqueue_batch(batch)]
    assert len(set(ids)) == n
    return ids


def final_rows(stack: PgStack, job_ids: list[str]) -> dict[int, int]:
    with stack.admin() as conn:
        cur = conn.execute("SELECT state, count(*) FROM jobs WHERE job_id = ANY(%s) GROUP BY state", (job_ids,))
        return {int(state): int(n) for state, n in cur.fetchall()}


async def wait_projected(stack: PgStack, job_ids: list[str], within: float = 60.0) -> None:
    want = {job_pb2.JOB_STATE_SUCCEEDED: len(job_ids)}

    async def done() -> bool:
        return await asyncio.to_thread(final_rows, stack, job_ids) == want

    await wait_for(done, f"{len(job_ids)} SUCCEEDED rows, one per job", within=within, interval=0.2)


def set_aside_count(stack: PgStack) -> int:
    with stack.admin() as conn:
        row = conn.execute("SELECT count(*) FROM projection_set_aside").fetchone()
        return int(row[0]) if row else 0


def terminate_app_sessions(stack: PgStack) -> None:
    with stack.admin("postgres") as conn:
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (APP_ROLE,))


@pytest.fixture
async def healthy(stack: PgStack) -> AsyncIterator[PgStack]:
    """The stack SERVING with nothing set aside before the test; the fault undone after it whatever happened."""
    await wait_health(stack, SERVING)
    yield stack
    if not stack.pg.running:
        stack.pg.start()
    with stack.admin() as conn:
        conn.execute(f"ALTER DATABASE {APP_DB} RESET default_transaction_read_only")
        conn.execute(f"GRANT ALL ON ALL TABLES IN SCHEMA public TO {APP_ROLE}")


async def check_recovered(stack: PgStack, job_ids: list[str], fault: str) -> None:
    await wait_projected(stack, job_ids)
    await wait_health(stack, SERVING)
    assert set_aside_count(stack) == 0, "a row was set aside that is not bad data"
    assert all(p.proc is not None and p.proc.poll() is None for p in (stack.results, *stack.workers))
    assert fault in stack.results.log_text(), f"the projector never met {fault}"


async def test_database_made_read_only_then_writable(healthy: PgStack) -> None:
    stack = healthy
    with stack.admin() as conn:
        conn.execute(f"ALTER DATABASE {APP_DB} SET default_transaction_read_only = on")
    terminate_app_sessions(stack)  # a failover: every session now lands on a read-only server
    job_ids = await enqueue(stack)
    await wait_health(stack, NOT_SERVING)
    assert final_rows(stack, job_ids).get(job_pb2.JOB_STATE_SUCCEEDED, 0) < len(job_ids)
    with stack.admin() as conn:
        conn.execute(f"ALTER DATABASE {APP_DB} RESET default_transaction_read_only")
    # No session is terminated this time: the projector drops connections that found the database read-only.
    await check_recovered(stack, job_ids, "READ_ONLY")


async def test_privileges_revoked_then_granted_back(healthy: PgStack) -> None:
    stack = healthy
    with stack.admin() as conn:
        conn.execute(f"REVOKE INSERT, UPDATE ON jobs, job_events FROM {APP_ROLE}")
    job_ids = await enqueue(stack)
    await wait_health(stack, NOT_SERVING)
    assert final_rows(stack, job_ids).get(job_pb2.JOB_STATE_SUCCEEDED, 0) < len(job_ids)
    with stack.admin() as conn:
        conn.execute(f"GRANT INSERT, UPDATE ON jobs, job_events TO {APP_ROLE}")
    await check_recovered(stack, job_ids, "PRIVILEGE")


async def test_jobs_table_locked_for_ten_seconds(healthy: PgStack) -> None:
    stack = healthy
    locker = stack.admin()
    try:
        locker.execute("BEGIN")
        locker.execute("LOCK TABLE jobs IN ACCESS EXCLUSIVE MODE")
        job_ids = await enqueue(stack)
        await wait_health(stack, NOT_SERVING)
        # A reader meets the lock too: UNAVAILABLE after the lock timeout, not a hang, never INTERNAL.
        async with grpc.aio.insecure_channel(stack.results.addr) as channel:
            stub = results_service_pb2_grpc.ResultsServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await stub.GetJob(results_service_pb2.ResultsServiceGetJobRequest(job_id=job_ids[0]), timeout=10)
            assert failed.value.code() == grpc.StatusCode.UNAVAILABLE, failed.value
            assert "lock" in (failed.value.details() or "")
        await asyncio.sleep(10)  # the fault itself lasts 10 s (issue 10); nothing waits on it
        assert _health(stack) == NOT_SERVING
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    await check_recovered(stack, job_ids, "LOCK_TIMEOUT")


async def live_records(stack: PgStack, job_ids: list[str]) -> int:
    """How many of ``job_ids`` still have their live record in Redis."""
    client = redis.asyncio.Redis.from_url(stack.redis.url)
    try:
        state = queue_keys(QUEUE).state
        found = await client.hmget(state, [j.split("/")[1] for j in job_ids])
        return sum(1 for v in found if v is not None)
    finally:
        await client.aclose()


async def test_postgres_down_longer_than_the_retention_loses_no_job(healthy: PgStack) -> None:
    stack = healthy
    stack.pg.stop()
    try:
        job_ids = await enqueue(stack)
        async with ConveyorClient(stack.producer.addr) as client:

            async def all_finished() -> bool:
                jobs = [await client.get_job(j) for j in job_ids]
                return all(j.state == job_pb2.JOB_STATE_SUCCEEDED for j in jobs)

            await wait_for(all_finished, "every job SUCCEEDED in Redis with PostgreSQL down", within=60, interval=0.2)
            finished_at = time.monotonic()
            await wait_health(stack, NOT_SERVING)

            async def retention_passed() -> bool:
                return time.monotonic() - finished_at > 5 * RETENTION_S

            await wait_for(retention_passed, "five retentions to pass", within=30, interval=0.1)
            # Five retentions after finishing, with PostgreSQL still down: GetJob finds every job, and a
            # Watch from the start ends at its final event.
            assert await live_records(stack, job_ids) == len(job_ids)
            for job_id in job_ids:
                assert (await client.get_job(job_id)).state == job_pb2.JOB_STATE_SUCCEEDED
            events = [e async for e in client.watch(job_ids[0])]
            assert events and events[-1].type == event_pb2.EVENT_TYPE_SUCCEEDED
    finally:
        stack.pg.start()
    await wait_projected(stack, job_ids)

    async def expired() -> bool:
        return await live_records(stack, job_ids) == 0

    # Projected: now the retention runs, and the records leave Redis.
    await wait_for(expired, "the live records to expire after projection", within=30, interval=0.2)
    await wait_health(stack, SERVING)
    assert set_aside_count(stack) == 0
    async with ConveyorClient(stack.producer.addr) as client:
        # Gone from Redis, served from PostgreSQL.
        assert (await client.get_job(job_ids[0])).state == job_pb2.JOB_STATE_SUCCEEDED


async def test_bad_data_is_set_aside_under_load_then_replayed_and_discarded(healthy: PgStack) -> None:
    stack = healthy
    # An operator's constraint that one job breaks (23514), and an event PostgreSQL cannot take (22P02).
    with stack.admin() as conn:
        conn.execute("ALTER TABLE jobs ADD CONSTRAINT no_forbidden CHECK (NOT labels ? 'forbidden')")
    try:
        async with ConveyorClient(stack.producer.addr) as client:
            labelled = {"seconds": 0.02}
            forbidden = (await client.enqueue(QUEUE, "outage.nap", labelled, labels={"forbidden": "yes"})).job_id
        job_ids = await enqueue(stack)
        poison_id = f"{QUEUE}/01JDQ4ZG0000000000000000PZ"
        poison = event_pb2.JobEvent(type=event_pb2.EVENT_TYPE_SUCCEEDED, attempt=1, result_json=b"{not json")
        admin = redis.asyncio.Redis.from_url(stack.redis.url)
        try:
            await admin.xadd(
                queue_keys(QUEUE).events, {b"j": poison_id.split("/")[1], b"e": poison.SerializeToString()}
            )
        finally:
            await admin.aclose()
        await wait_projected(stack, job_ids)  # the rest projected

        async with grpc.aio.insecure_channel(stack.results.addr) as channel:
            stub = results_service_pb2_grpc.ResultsServiceStub(channel)

            async def set_aside() -> dict[str, set[str]]:
                page = await stub.ListSetAside(results_service_pb2.ListSetAsideRequest(queue=QUEUE), timeout=10)
                found: dict[str, set[str]] = {}
                for e in page.entries:
                    found.setdefault(e.job_id, set()).add(e.sqlstate)
                return found

            async def both_kept() -> bool:
                return set((await set_aside()).keys()) == {forbidden, poison_id}

            await wait_for(both_kept, "the two bad jobs set aside", within=30, interval=0.2)
            assert await set_aside() == {forbidden: {"23514"}, poison_id: {"22P02"}}
            assert await wait_health_value(stack) == SERVING  # bad data is not a fault of the service
            # The constraint fixed: replaying everything projects the forbidden job; the poison stays.
            with stack.admin() as conn:
                conn.execute("ALTER TABLE jobs DROP CONSTRAINT no_forbidden")
            replay = await stub.ReplaySetAside(results_service_pb2.ReplaySetAsideRequest(all=True), timeout=30)
            assert replay.refused_count == 1 and replay.refused[0].job_id == poison_id
            assert replay.replayed >= 1
            assert set((await set_aside()).keys()) == {poison_id}
            assert final_rows(stack, [forbidden]) != {}
            gone = await stub.DiscardSetAside(
                results_service_pb2.DiscardSetAsideRequest(ids=[e.id for e in replay.refused]), timeout=10
            )
            assert gone.discarded == 1
            assert await set_aside() == {}
    finally:
        with stack.admin() as conn:
            conn.execute("ALTER TABLE jobs DROP CONSTRAINT IF EXISTS no_forbidden")
    assert set_aside_count(stack) == 0


async def wait_health_value(stack: PgStack) -> int:
    return await asyncio.to_thread(_health, stack)
