"""Workers that die, stall or are told to stop: nothing is lost, nothing recorded twice (invariant 4)."""

from __future__ import annotations

import asyncio
import signal

import grpc
import pytest

from conveyor.common.client import ConveyorClient
from conveyor.common.keys import queue_keys
from conveyor.common.redis import make_redis
from conveyor.v1 import event_pb2, job_pb2, results_service_pb2, results_service_pb2_grpc
from tests.faults.conftest import QUEUE, FaultStack, StartWorker
from tests.support.wait import wait_for

pytestmark = pytest.mark.e2e
E = event_pb2


async def _results_job(stack: FaultStack, job_id: str) -> tuple[job_pb2.Job | None, list[event_pb2.JobEvent]]:
    async with grpc.aio.insecure_channel(stack.results.addr) as channel:
        stub = results_service_pb2_grpc.ResultsServiceStub(channel)
        try:
            job = (await stub.GetJob(results_service_pb2.ResultsServiceGetJobRequest(job_id=job_id))).job
            events = (await stub.ListJobEvents(results_service_pb2.ListJobEventsRequest(job_id=job_id))).events
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return None, []
            raise
        return job, list(events)


async def test_sigkill_mid_job_and_another_worker_finishes_it(
    fault_stack: FaultStack, worker_process: StartWorker
) -> None:
    first = worker_process("doomed")
    async with ConveyorClient(fault_stack.producer.addr) as client:
        job = await client.enqueue(QUEUE, "demo.sleep", {"seconds": 3, "steps": 6})

        async def running_on_doomed() -> bool:
            got = await client.get_job(job.job_id)
            return got.state == job_pb2.JOB_STATE_ACTIVE and got.worker == "doomed"

        await wait_for(running_on_doomed, "the job to start on the doomed worker")
        first.kill()  # SIGKILL: no cleanup, the claim stays pending
        worker_process("rescuer")
        events = await asyncio.wait_for(_collect(client, job.job_id), 30)
    actives = [(e.attempt, e.worker) for e in events if e.type == E.EVENT_TYPE_ACTIVE]
    assert actives == [(1, "doomed"), (2, "rescuer")]
    assert events[-1].type == E.EVENT_TYPE_SUCCEEDED and events[-1].worker == "rescuer"
    assert [e.type for e in events].count(E.EVENT_TYPE_SUCCEEDED) == 1

    async def in_postgresql() -> tuple[job_pb2.Job | None, list[event_pb2.JobEvent]] | None:
        found = await _results_job(fault_stack, job.job_id)
        return found if found[0] is not None and found[0].state == job_pb2.JOB_STATE_SUCCEEDED else None

    row, history = await wait_for(in_postgresql, "the outcome in PostgreSQL", within=20)
    assert row is not None and row.attempt == 2 and row.worker == "rescuer"
    assert [e.type for e in history].count(E.EVENT_TYPE_ACTIVE) == 2
    assert [e.type for e in history].count(E.EVENT_TYPE_SUCCEEDED) == 1


async def _collect(client: ConveyorClient, job_id: str) -> list[event_pb2.JobEvent]:
    return [e async for e in client.watch(job_id)]


async def test_a_job_that_keeps_killing_its_workers_is_dead_lettered(
    fault_stack: FaultStack, worker_process: StartWorker
) -> None:
    env = {"CONVEYOR_MAX_DELIVERIES": "2", "CONVEYOR_VISIBILITY_TIMEOUT_SECONDS": "1"}
    redis = make_redis(fault_stack.redis.url)
    try:
        async with ConveyorClient(fault_stack.producer.addr) as client:
            job = await client.enqueue(QUEUE, "test.crash", {"note": "poison"})
            # These workers die as soon as they claim the job, maybe before they report SERVING.
            worker = worker_process("victim-0", wait=False, **env)
            restarts = 0

            async def dead_lettered() -> bool:
                nonlocal worker, restarts
                if (await client.get_job(job.job_id)).state == job_pb2.JOB_STATE_DEAD_LETTERED:
                    return True
                if worker.proc is not None and worker.proc.poll() is not None:  # it crashed: replace it
                    restarts += 1
                    worker = worker_process(f"victim-{restarts}", wait=False, **env)
                return False

            await wait_for(dead_lettered, "the poison job to be dead-lettered", within=45, interval=0.2)
            assert restarts >= 2  # it killed two workers before the third one dead-lettered it
            events = await asyncio.wait_for(_collect(client, job.job_id), 10)
        final = events[-1]
        assert final.type == E.EVENT_TYPE_DEAD_LETTERED and final.error.kind == "DeliveryLimit"
        assert [e.type for e in events].count(E.EVENT_TYPE_ACTIVE) == 2
        dead = await redis.xrange(queue_keys(QUEUE).dead)
        assert [fields[b"j"].decode() for _, fields in dead] == [job.job_id.split("/")[1]]
        # Indexed by job id, so RetryDeadLetters / PurgeDeadLetters of it need no scan.
        index = await redis.hgetall(queue_keys(QUEUE).dead_index)  # type: ignore[misc]
        assert index == {job.job_id.split("/")[1].encode(): dead[0][0]}

        async def recorded() -> bool:
            row, _ = await _results_job(fault_stack, job.job_id)
            return row is not None and row.state == job_pb2.JOB_STATE_DEAD_LETTERED

        await wait_for(recorded, "the dead letter in PostgreSQL", within=20)
        row, _ = await _results_job(fault_stack, job.job_id)
        assert row is not None and row.payload["note"] == "poison"
    finally:
        await redis.aclose()


async def test_sigterm_lets_a_busy_worker_finish_its_jobs_and_exit_0(
    fault_stack: FaultStack, worker_process: StartWorker
) -> None:
    worker = worker_process("graceful", CONVEYOR_SHUTDOWN_GRACE_SECONDS="15")
    async with ConveyorClient(fault_stack.producer.addr) as client:
        jobs = [await client.enqueue(QUEUE, "demo.sleep", {"seconds": 1.5, "steps": 3}) for _ in range(5)]

        async def all_active() -> bool:
            states = [(await client.get_job(j.job_id)).state for j in jobs]
            return all(s == job_pb2.JOB_STATE_ACTIVE for s in states)

        await wait_for(all_active, "all five jobs running")
        worker.signal(signal.SIGTERM)
        code = await asyncio.to_thread(worker.wait, 20)
        assert code == 0, worker.log_tail()
        states = {(await client.get_job(j.job_id)).state for j in jobs}
    assert states == {job_pb2.JOB_STATE_SUCCEEDED}
    assert "jobs_abandoned_at_shutdown" not in worker.log_text()
