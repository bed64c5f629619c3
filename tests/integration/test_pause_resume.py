"""Pause and resume a queue (issue #5, item 5)."""

from __future__ import annotations

import grpc
import pytest

from conveyor.v1 import admin_service_pb2 as a
from conveyor.v1 import event_pb2, job_pb2
from conveyor.v1 import producer_service_pb2 as p
from tests.integration.conftest import Producer, StartWorker
from tests.integration.test_producer_worker import enqueue, watch_all
from tests.support import handlers as test_handlers
from tests.support.wait import wait_for


async def _ran(job_id: str) -> bool:
    return job_id in test_handlers.runs


async def test_a_paused_queue_keeps_its_jobs_and_resume_starts_them_at_once(
    producer: Producer, start_worker: StartWorker
) -> None:
    assert (await producer.admin.PauseQueue(a.PauseQueueRequest(queue="default"))).changed
    assert not (await producer.admin.PauseQueue(a.PauseQueueRequest(queue="default"))).changed
    # A long poll interval: only the resume signal can wake the worker quickly.
    worker = await start_worker(queues=("default", "other"), poll_interval_s=60.0)
    default_queue = worker.runner.queues[0]
    held = [await enqueue(producer, "test.count") for _ in range(5)]
    assert all(j.state == job_pb2.JOB_STATE_QUEUED for j in held)  # enqueues are accepted and kept

    async def claimed() -> bool:  # the worker has claimed (nothing) on the paused queue
        return default_queue.claims > 0

    await wait_for(claimed, "a claim on the paused queue")
    assert not any(j.job_id in test_handlers.runs for j in held)
    # The same worker keeps serving an unpaused queue.
    marker = await enqueue(producer, "test.count", queue="other")
    await wait_for(lambda: _ran(marker.job_id), "the unpaused queue's job")
    assert not any(j.job_id in test_handlers.runs for j in held)

    assert (await producer.admin.ResumeQueue(a.ResumeQueueRequest(queue="default"))).changed
    for job in held:
        await wait_for(lambda j=job: _ran(j.job_id), "paused jobs to run after resume", within=10)
    assert not (await producer.admin.ResumeQueue(a.ResumeQueueRequest(queue="default"))).changed


async def test_running_jobs_finish_while_paused_and_the_pause_outlives_workers(
    producer: Producer, start_worker: StartWorker
) -> None:
    first = await start_worker()
    running = await enqueue(producer, "test.gate")
    await wait_for(lambda: _started(running.job_id), "the job to start")
    await producer.admin.PauseQueue(a.PauseQueueRequest(queue="default"))
    waiting = await enqueue(producer, "test.count")
    test_handlers.gate.set()
    assert (await watch_all(producer, running.job_id))[-1].type == event_pb2.EVENT_TYPE_SUCCEEDED
    await first.stop()
    await start_worker(worker_id="after-restart", queues=("default", "other"))  # a new worker: still paused
    marker = await enqueue(producer, "test.count", queue="other")
    await wait_for(lambda: _ran(marker.job_id), "the new worker to be working")
    state = (await producer.stub.GetJob(p.GetJobRequest(job_id=waiting.job_id))).job.state
    assert state == job_pb2.JOB_STATE_QUEUED
    await producer.admin.ResumeQueue(a.ResumeQueueRequest(queue="default"))
    await wait_for(lambda: _ran(waiting.job_id), "the job to run after resume")


async def _started(job_id: str) -> bool:
    return job_id in test_handlers.started


async def test_pause_with_a_bad_queue_name_is_invalid(producer: Producer) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await producer.admin.PauseQueue(a.PauseQueueRequest(queue="no spaces"))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
