"""Watch follows a job's whole life: a job retried from the dead letters is followed through its
new attempt, and a Watch ends only at the job's current final event (issue #10 item 6)."""

from __future__ import annotations

import asyncio

import grpc
import redis.asyncio

from conveyor.common.keys import queue_keys
from conveyor.v1 import admin_service_pb2 as a
from conveyor.v1 import event_pb2, job_pb2
from conveyor.v1 import producer_service_pb2 as p
from tests.integration.conftest import Producer, StartWorker
from tests.support import handlers as test_handlers
from tests.support.wait import wait_for

E = event_pb2
ONCE = job_pb2.RetryPolicy(max_attempts=1)
WatchCall = grpc.aio.UnaryStreamCall[p.WatchRequest, p.WatchResponse]


async def _job_events(redis_client: redis.asyncio.Redis, job_id: str) -> list[str]:
    queue, ulid = job_id.split("/")
    entries = await redis_client.xrange(queue_keys(queue).events)
    return [entry_id.decode() for entry_id, fields in entries if fields[b"j"].decode() == ulid]


async def _read_until_active_attempt_2(call: WatchCall) -> list[event_pb2.JobEvent]:
    """Events up to the ACTIVE event of attempt 2; fails if the stream ends before it."""
    events: list[event_pb2.JobEvent] = []
    while True:
        response = await call.read()
        assert isinstance(response, p.WatchResponse), f"Watch ended after {[E.EventType.Name(e.type) for e in events]}"
        events.append(response.event)
        if response.event.type == E.EVENT_TYPE_ACTIVE and response.event.attempt == 2:
            return events


async def _rest(call: WatchCall) -> list[event_pb2.JobEvent]:
    events = []
    while isinstance(response := await call.read(), p.WatchResponse):
        events.append(response.event)
    return events


async def test_a_job_retried_from_the_dead_letters_is_watched_to_its_new_final_event(
    producer: Producer, start_worker: StartWorker, redis_client: redis.asyncio.Redis
) -> None:
    await start_worker()
    job = await producer.stub.Enqueue(p.EnqueueRequest(queue="default", type="test.fail_then_gate", retry=ONCE))
    first_life = [r.event async for r in producer.stub.Watch(p.WatchRequest(job_id=job.job_id), timeout=20)]
    assert [e.type for e in first_life] == [E.EVENT_TYPE_QUEUED, E.EVENT_TYPE_ACTIVE, E.EVENT_TYPE_FAILED]
    failed_id = first_life[-1].id

    # A WatchQueue resumed after the old final event sees the new attempt's events.
    queue_call = producer.stub.WatchQueue(p.WatchQueueRequest(queue="default", after_event_id=failed_id), timeout=30)

    retried = await producer.admin.RetryDeadLetters(a.RetryDeadLettersRequest(queue="default", job_id=job.job_id))
    assert list(retried.job_ids) == [job.job_id]

    async def running_again() -> bool:
        got = await producer.stub.GetJob(p.GetJobRequest(job_id=job.job_id))
        return got.job.state == job_pb2.JOB_STATE_ACTIVE and got.job.attempt == 2

    await wait_for(running_again, "the retried job to run again on attempt 2")

    # While it runs again: a Watch from the start, and one resumed mid-way (after the first
    # ACTIVE), replay past the old FAILED and stay open.
    from_start = producer.stub.Watch(p.WatchRequest(job_id=job.job_id), timeout=30)
    resumed = producer.stub.Watch(p.WatchRequest(job_id=job.job_id, after_event_id=first_life[1].id), timeout=30)
    replayed = await asyncio.wait_for(_read_until_active_attempt_2(from_start), 20)
    assert [e.type for e in replayed] == [
        E.EVENT_TYPE_QUEUED,
        E.EVENT_TYPE_ACTIVE,
        E.EVENT_TYPE_FAILED,
        E.EVENT_TYPE_QUEUED,
        E.EVENT_TYPE_ACTIVE,
    ]
    replayed_resumed = await asyncio.wait_for(_read_until_active_attempt_2(resumed), 20)
    assert [e.id for e in replayed_resumed] == [e.id for e in replayed[2:]]

    test_handlers.gate.set()  # attempt 2 succeeds
    tail_from_start = await asyncio.wait_for(_rest(from_start), 20)
    tail_resumed = await asyncio.wait_for(_rest(resumed), 20)
    assert [e.type for e in tail_from_start] == [E.EVENT_TYPE_SUCCEEDED]
    assert tail_resumed == tail_from_start
    assert await from_start.code() == grpc.StatusCode.OK and await resumed.code() == grpc.StatusCode.OK

    # Every event of the job exactly once, in order, ending at the current final event.
    everything = [e.id for e in replayed + tail_from_start]
    assert everything == await _job_events(redis_client, job.job_id)

    # A Watch started now, after the new final event, replays both lives and ends at SUCCEEDED.
    whole = [r.event async for r in producer.stub.Watch(p.WatchRequest(job_id=job.job_id), timeout=20)]
    assert [e.id for e in whole] == everything and whole[-1].attempt == 2

    queue_events: list[event_pb2.JobEvent] = []
    while not queue_events or queue_events[-1].type != E.EVENT_TYPE_SUCCEEDED:
        response = await asyncio.wait_for(queue_call.read(), 20)
        assert isinstance(response, p.WatchQueueResponse) and response.HasField("event")
        queue_events.append(response.event)
    queue_call.cancel()
    assert [e.id for e in queue_events] == everything[3:]
    assert [(e.type, e.attempt) for e in queue_events][1:] == [(E.EVENT_TYPE_ACTIVE, 2), (E.EVENT_TYPE_SUCCEEDED, 2)]
