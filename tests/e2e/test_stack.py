"""The whole stack as separate processes: producer, two workers, results, Redis, PostgreSQL."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from conveyor.common.client import ConveyorClient
from conveyor.common.devstack.servers import PostgresServer, RedisServer
from conveyor.common.keys import queue_keys
from conveyor.common.redis import make_redis
from conveyor.v1 import event_pb2, job_pb2, results_service_pb2, results_service_pb2_grpc
from tests.support.databases import fresh_database
from tests.support.processes import ServiceProcess
from tests.support.wait import wait_for, wait_until

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
QUEUE = "e2e"
RETENTION = "2"


@dataclass
class Stack:
    redis: RedisServer
    database_url: str
    results: ServiceProcess
    producer: ServiceProcess
    workers: list[ServiceProcess]


@pytest.fixture(scope="module")
def stack(pg_server: PostgresServer) -> Iterator[Stack]:
    database_url = fresh_database(pg_server, "e2e")
    with RedisServer() as redis_server:
        common = {"REDIS_URL": redis_server.url, "CONVEYOR_RETENTION_SECONDS": RETENTION}
        processes: list[ServiceProcess] = []
        try:
            results = ServiceProcess("results", {**common, "DATABASE_URL": database_url})
            processes.append(results.start())
            producer = ServiceProcess("producer", {**common, "CONVEYOR_RESULTS_ADDR": results.addr})
            processes.append(producer.start())
            workers = []
            for i in (1, 2):
                worker = ServiceProcess(
                    "worker",
                    {**common, "CONVEYOR_QUEUES": QUEUE, "CONVEYOR_WORKER_ID": f"e2e-worker-{i}"},
                    name=f"worker-{i}",
                )
                processes.append(worker.start())
                workers.append(worker)
            yield Stack(redis_server, database_url, results, producer, workers)
            # Graceful shutdown: every service drains and exits 0 on SIGTERM.
            codes = {p.name: p.stop() for p in reversed(processes)}
            assert codes == {p.name: 0 for p in processes}, {p.name: p.log_tail() for p in processes}
        finally:
            for p in processes:
                p.kill()


async def results_job(stack: Stack, job_id: str) -> job_pb2.Job | None:
    async with grpc.aio.insecure_channel(stack.results.addr) as channel:
        stub = results_service_pb2_grpc.ResultsServiceStub(channel)
        try:
            reply = await stub.GetJob(results_service_pb2.ResultsServiceGetJobRequest(job_id=job_id))
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise
        return reply.job


async def test_a_job_runs_end_to_end_and_lands_in_postgresql(stack: Stack) -> None:
    async with ConveyorClient(stack.producer.addr, stack.results.addr) as client:
        created = await client.enqueue(QUEUE, "demo.sleep", {"seconds": 0.3, "steps": 3}, labels={"suite": "e2e"})
        events = [e async for e in client.watch(created.job_id)]
        assert [e.type for e in events] == [
            event_pb2.EVENT_TYPE_QUEUED,
            event_pb2.EVENT_TYPE_ACTIVE,
            event_pb2.EVENT_TYPE_PROGRESS,
            event_pb2.EVENT_TYPE_PROGRESS,
            event_pb2.EVENT_TYPE_PROGRESS,
            event_pb2.EVENT_TYPE_SUCCEEDED,
        ]
        assert events[1].worker in {"e2e-worker-1", "e2e-worker-2"}

        async def succeeded() -> job_pb2.Job | None:
            job = await results_job(stack, created.job_id)
            return job if job is not None and job.state == job_pb2.JOB_STATE_SUCCEEDED else None

        job = await wait_for(succeeded, "the outcome in PostgreSQL")
        assert job.result.struct_value["steps"] == 3
        assert job.payload["seconds"] == 0.3
        assert job.attempt == 1 and job.labels["suite"] == "e2e"
        listed = await client.list_jobs(queue=QUEUE, state=job_pb2.JOB_STATE_SUCCEEDED)
        assert created.job_id in {j.id for j in listed.jobs}


async def test_watch_replays_from_postgresql_after_the_job_left_redis(stack: Stack) -> None:
    redis = make_redis(stack.redis.url)
    keys = queue_keys(QUEUE)
    try:
        async with ConveyorClient(stack.producer.addr, stack.results.addr) as client:
            created = await client.enqueue(QUEUE, "demo.echo", {"n": 1})
            live = [e async for e in client.watch(created.job_id)]
            ulid = created.job_id.split("/")[1]

            async def gone_from_redis() -> bool:
                # Completing other jobs sweeps records older than the retention.
                await client.enqueue(QUEUE, "demo.noop")
                return not await redis.hexists(keys.state, ulid)

            await wait_for(gone_from_redis, "the live record to expire", within=20, interval=0.5)
            replay = [e async for e in client.watch(created.job_id)]
            assert [(e.id, e.type) for e in replay] == [(e.id, e.type) for e in live]
            assert replay[-1].result == live[-1].result
            assert (await client.get_job(created.job_id)).state == job_pb2.JOB_STATE_SUCCEEDED
    finally:
        await redis.aclose()


def buf_curl(*args: str, data: str | None = None) -> subprocess.CompletedProcess[str]:
    cmd = ["npx", "--no-install", "buf", "curl", "--protocol", "grpc", "--http2-prior-knowledge", *args]
    if data is not None:
        cmd += ["-d", data]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)


def test_an_external_client_drives_the_stack_over_reflection(stack: Stack) -> None:
    """buf curl knows nothing of our code: it learns the schema from server reflection."""
    base = f"http://{stack.producer.addr}"
    services = buf_curl("--list-services", base)
    assert services.returncode == 0, services.stderr
    assert "conveyor.v1.ProducerService" in services.stdout.split()

    health = buf_curl(f"{base}/grpc.health.v1.Health/Check")
    assert json.loads(health.stdout) == {"status": "SERVING"}

    enqueued = buf_curl(
        f"{base}/conveyor.v1.ProducerService/Enqueue",
        data=json.dumps({"queue": QUEUE, "type": "demo.sleep", "payload": {"seconds": 0.2, "steps": 2}}),
    )
    assert enqueued.returncode == 0, enqueued.stderr
    job_id = json.loads(enqueued.stdout)["jobId"]

    watched = buf_curl(f"{base}/conveyor.v1.ProducerService/Watch", data=json.dumps({"jobId": job_id}))
    assert watched.returncode == 0, watched.stderr
    decoder = json.JSONDecoder()
    text, messages = watched.stdout.strip(), []
    while text:
        message, end = decoder.raw_decode(text)
        messages.append(message)
        text = text[end:].strip()
    assert [m["event"]["type"] for m in messages] == [
        "EVENT_TYPE_QUEUED",
        "EVENT_TYPE_ACTIVE",
        "EVENT_TYPE_PROGRESS",
        "EVENT_TYPE_PROGRESS",
        "EVENT_TYPE_SUCCEEDED",
    ]
    assert messages[-1]["event"]["result"] == {"slept": 0.2, "steps": 2}

    results_base = f"http://{stack.results.addr}"

    def in_postgresql() -> bool:
        found = buf_curl(f"{results_base}/conveyor.v1.ResultsService/GetJob", data=json.dumps({"jobId": job_id}))
        return found.returncode == 0 and json.loads(found.stdout)["job"]["state"] == "JOB_STATE_SUCCEEDED"

    wait_until(in_postgresql, "buf curl to see the outcome in ResultsService", within=20)

    bad = buf_curl(f"{base}/conveyor.v1.ProducerService/Enqueue", data=json.dumps({"queue": "no spaces", "type": "t"}))
    assert bad.returncode == 3 * 8, bad  # buf curl exits with the gRPC code times 8
    assert "invalid_argument" in bad.stderr


def test_a_schedule_over_reflection_fires_jobs_that_run_and_are_recorded(stack: Stack) -> None:
    """ScheduleService through buf curl; the stack's workers fire the ticks, run the jobs, PostgreSQL has them."""
    base = f"http://{stack.producer.addr}"
    assert "conveyor.v1.ScheduleService" in buf_curl("--list-services", base).stdout.split()
    spec = {"interval": "1s", "template": {"queue": QUEUE, "type": "demo.echo", "payload": {"tick": True}}}
    created = buf_curl(
        f"{base}/conveyor.v1.ScheduleService/CreateSchedule", data=json.dumps({"scheduleId": "e2e", "spec": spec})
    )
    assert created.returncode == 0, created.stderr
    assert json.loads(created.stdout)["created"] is True

    def fired() -> str:
        got = buf_curl(f"{base}/conveyor.v1.ScheduleService/GetSchedule", data=json.dumps({"scheduleId": "e2e"}))
        return str(json.loads(got.stdout)["schedule"].get("lastJobId", ""))

    job_id = wait_until(fired, "a tick to fire", within=20)
    deleted = buf_curl(f"{base}/conveyor.v1.ScheduleService/DeleteSchedule", data=json.dumps({"scheduleId": "e2e"}))
    assert deleted.returncode == 0, deleted.stderr

    def in_postgresql() -> bool:
        found = buf_curl(
            f"http://{stack.results.addr}/conveyor.v1.ResultsService/GetJob", data=json.dumps({"jobId": job_id})
        )
        return found.returncode == 0 and json.loads(found.stdout)["job"]["state"] == "JOB_STATE_SUCCEEDED"

    wait_until(in_postgresql, "the tick's job to succeed and be recorded", within=20)

    bad = buf_curl(
        f"{base}/conveyor.v1.ScheduleService/CreateSchedule",
        data=json.dumps({"scheduleId": "bad", "spec": {**spec, "interval": None, "cron": "61 * * * *"}}),
    )
    assert bad.returncode == 3 * 8, bad
    assert "spec.cron" in bad.stderr
    missing = buf_curl(f"{base}/conveyor.v1.ScheduleService/GetSchedule", data=json.dumps({"scheduleId": "e2e"}))
    assert missing.returncode == 5 * 8, missing  # NOT_FOUND after the delete


async def test_redis_returns_to_baseline_after_jobs_finish_and_the_retention_passes(stack: Stack) -> None:
    """Invariant 7: nothing in Redis grows with the number of jobs ever run."""
    redis = make_redis(stack.redis.url)
    keys = queue_keys("retention")
    per_job = [keys.state, keys.done, keys.events, *keys.bands, keys.delayed, keys.parked, keys.dead]

    async def size(key: str) -> int:
        kind = (await redis.type(key)).decode()
        if kind == "hash":
            return int(await redis.hlen(key))
        if kind == "zset":
            return int(await redis.zcard(key))
        if kind == "stream":
            return int(await redis.xlen(key))
        return 0

    try:
        async with ConveyorClient(stack.producer.addr, stack.results.addr) as client:
            baseline_keys = await redis.dbsize()
            requests = [client.request("retention", "demo.noop", {"i": i}, idempotency_key="") for i in range(2000)]
            for i in range(0, len(requests), 500):
                await client.enqueue_batch(requests[i : i + 500])
            # The stack's workers serve QUEUE only: start one for this queue.
            worker = ServiceProcess(
                "worker",
                {"REDIS_URL": stack.redis.url, "CONVEYOR_RETENTION_SECONDS": RETENTION, "CONVEYOR_QUEUES": "retention"},
                name="retention-worker",
            ).start()
            try:

                async def back_to_baseline() -> bool:
                    return not any([await size(key) for key in per_job])

                await wait_for(back_to_baseline, "per-job data to leave Redis", within=40, interval=0.5)
            finally:
                worker.stop()
            # Only fixed per-queue keys are left (streams, groups), whatever the number of jobs.
            assert await redis.dbsize() - baseline_keys <= len(keys.bands) + 4
    finally:
        await redis.aclose()


def test_flow_control_through_buf_curl_as_the_readme_shows(stack: Stack) -> None:
    """The README's flow-control calls, made by a client that knows only reflection."""
    base = f"http://{stack.producer.addr}/conveyor.v1.AdminService"
    calls = [
        ("SetRateLimit", {"queue": "flow", "limit": 50, "period": "1s"}),
        ("SetRateLimit", {"queue": "flow", "eachKey": True, "limit": 10, "period": "60s"}),
        ("SetRateLimit", {"queue": "flow", "key": "acme", "limit": 100, "period": "60s"}),
        ("SetConcurrencyLimit", {"queue": "flow", "limit": 20}),
        ("BackOff", {"queue": "flow", "key": "acme", "duration": "300s"}),
        ("SetDefaultPriority", {"queue": "flow", "priority": 3}),
    ]
    for method, body in calls:
        done = buf_curl(f"{base}/{method}", data=json.dumps(body))
        assert done.returncode == 0, done.stderr
    limits = json.loads(buf_curl(f"{base}/GetLimits", data=json.dumps({"queue": "flow"})).stdout)["limits"]
    assert limits["rate"] == {"limit": 50, "period": "1s"}
    assert limits["ratePerKey"] == {"limit": 10, "period": "60s"}
    assert limits["keys"] == [{"key": "acme", "rate": {"limit": 100, "period": "60s"}}]
    assert limits["concurrency"] == 20
    assert limits["defaultPriority"] == 3
    assert [b["key"] for b in limits["blockedKeys"]] == ["acme"]
    bad = buf_curl(f"{base}/SetRateLimit", data=json.dumps({"queue": "flow", "limit": 0, "period": "1s"}))
    assert bad.returncode != 0 and "invalid_argument" in bad.stderr.lower() and "limit" in bad.stderr
    cleared = buf_curl(f"{base}/ClearRateLimit", data=json.dumps({"queue": "flow", "key": "acme"}))
    assert json.loads(cleared.stdout)["changed"] is True
