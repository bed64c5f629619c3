"""The complete script on its own: one batch of mixed outcomes, written with batched commands.

The script reads every record in one command and writes them, the acks and the expiries
together at the end; these tests pin down that a batch still behaves job by job.
"""

from __future__ import annotations

import redis.asyncio

from conveyor.common.keys import WORKER_GROUP, queue_keys
from conveyor.common.scripts import Claimed, Outcome, Record, Scripts
from conveyor.v1 import event_pb2, job_pb2
from tests.integration.conftest import Producer
from tests.integration.test_producer_worker import enqueue

SUCCEEDED = event_pb2.JobEvent(type=event_pb2.EVENT_TYPE_SUCCEEDED).SerializeToString()
RETRY = event_pb2.JobEvent(type=event_pb2.EVENT_TYPE_RETRY_SCHEDULED).SerializeToString()
FAILED = event_pb2.JobEvent(type=event_pb2.EVENT_TYPE_FAILED).SerializeToString()


def outcome(c: Claimed, state: int, event: bytes, **kw: object) -> Outcome:
    return Outcome(c.band, c.entry_id, c.ulid, c.attempt, state, event, **kw)  # type: ignore[arg-type]


async def test_a_batch_of_mixed_outcomes_across_bands_is_recorded_job_by_job(
    producer: Producer, redis_client: redis.asyncio.Redis
) -> None:
    keys = queue_keys("default")
    scripts = Scripts(redis_client)
    for prio in (9, 5, 5, 1):
        await enqueue(producer, "test.count", priority=prio)
    claimed = (await scripts.claim(keys, "w-a", 10)).claimed
    assert [c.band for c in claimed] == [9, 5, 5, 1]
    ok, retried, failed, fenced = claimed
    stale = Outcome(fenced.band, fenced.entry_id, fenced.ulid, fenced.attempt, job_pb2.JOB_STATE_SUCCEEDED, SUCCEEDED)
    due_ms = 4_000_000_000_000
    batch = [
        outcome(ok, job_pb2.JOB_STATE_SUCCEEDED, SUCCEEDED),
        outcome(ok, job_pb2.JOB_STATE_SUCCEEDED, SUCCEEDED),  # the same outcome twice in one batch
        outcome(retried, job_pb2.JOB_STATE_RETRY_SCHEDULED, RETRY, due_ms=due_ms),
        outcome(failed, job_pb2.JOB_STATE_FAILED, FAILED),
    ]
    # Another consumer's outcome for a job it does not hold is fenced off, and changes nothing.
    assert await scripts.complete(keys, "w-b", 60_000, [stale]) == [None]
    ids = await scripts.complete(keys, "w-a", 60_000, batch)
    assert ids[0] and ids[1] is None and ids[2] and ids[3]

    async def record(c: Claimed) -> Record:
        return Record.parse(await redis_client.hget(keys.state, c.ulid))

    assert (await record(ok)).state == job_pb2.JOB_STATE_SUCCEEDED
    assert (await record(ok)).final_event_id == ids[0]
    assert (await record(retried)).state == job_pb2.JOB_STATE_RETRY_SCHEDULED
    assert await redis_client.zscore(keys.delayed, retried.ulid) == due_ms
    assert await redis_client.hexists(keys.parked, retried.ulid)
    assert (await record(failed)).state == job_pb2.JOB_STATE_FAILED
    assert [f[b"j"].decode() for _, f in await redis_client.xrange(keys.dead)] == [failed.ulid]
    assert (await record(fenced)).state == job_pb2.JOB_STATE_ACTIVE
    # Finished jobs wait out the retention in the done set; the retried one does not.
    assert set(await redis_client.zrange(keys.done, 0, -1)) == {ok.ulid.encode(), failed.ulid.encode()}
    # Every accepted entry left its stream and the group's pending list; the fenced one stayed.
    for c in (ok, retried, failed):
        assert await redis_client.xrange(keys.band(c.band), c.entry_id, c.entry_id) == []
    pending = await redis_client.xpending(keys.band(1), WORKER_GROUP)
    assert pending["pending"] == 1
    for band in (9, 5):
        assert (await redis_client.xpending(keys.band(band), WORKER_GROUP))["pending"] == 0
    events = [(f[b"j"].decode(), eid.decode()) for eid, f in await redis_client.xrange(keys.events)]
    assert (ok.ulid, ids[0]) in events and sum(1 for u, _ in events if u == ok.ulid) == 3  # QUEUED, ACTIVE, final


async def test_a_cancel_request_is_cleared_by_the_outcome(
    producer: Producer, redis_client: redis.asyncio.Redis
) -> None:
    keys = queue_keys("default")
    scripts = Scripts(redis_client)
    await enqueue(producer, "test.count")
    await enqueue(producer, "test.count")
    first, second = (await scripts.claim(keys, "w-a", 10)).claimed
    await redis_client.hset(keys.cancel, first.ulid, "stop")
    ids = await scripts.complete(keys, "w-a", 60_000, [outcome(first, job_pb2.JOB_STATE_CANCELLED, SUCCEEDED)])
    assert ids[0] and not await redis_client.hexists(keys.cancel, first.ulid)
    # With no cancel request left, an outcome needs no clean-up and is recorded all the same.
    ids = await scripts.complete(keys, "w-a", 60_000, [outcome(second, job_pb2.JOB_STATE_SUCCEEDED, SUCCEEDED)])
    assert ids[0] and Record.parse(await redis_client.hget(keys.state, second.ulid)).state == 5


async def test_projection_of_more_jobs_than_one_read_of_records_sets_every_expiry(
    redis_client: redis.asyncio.Redis,
) -> None:
    """projected.lua reads the records 1,000 at a time: a larger batch still reaches every job,
    and a job with no record or not finished is left alone."""
    from conveyor.common.ids import new_ulid
    from conveyor.common.scripts import NewJob

    keys = queue_keys("default")
    scripts = Scripts(redis_client)
    job = job_pb2.Job(type="test.count", priority=5).SerializeToString()
    queued = event_pb2.JobEvent(type=event_pb2.EVENT_TYPE_QUEUED).SerializeToString()
    jobs = [NewJob(ulid=new_ulid(), priority=5, job=job, queued_event=queued) for _ in range(2100)]
    for i in range(0, len(jobs), 100):
        await scripts.enqueue(keys, jobs[i : i + 100])
    claimed: list[Claimed] = []
    while len(claimed) < 2050:
        claimed += (await scripts.claim(keys, "w-a", min(500, 2050 - len(claimed)))).claimed
    finished: list[tuple[str, str]] = []
    for i in range(0, 2050, 500):
        batch = [outcome(c, job_pb2.JOB_STATE_SUCCEEDED, SUCCEEDED) for c in claimed[i : i + 500]]
        ids = await scripts.complete(keys, "w-a", 60_000, batch)
        finished += [(c.ulid, str(e)) for c, e in zip(claimed[i : i + 500], ids, strict=True)]
    waiting = [(j.ulid, "0-1") for j in jobs[2050:]]
    unknown = [(new_ulid(), "0-1")]
    assert await scripts.projected(keys, finished + waiting + unknown, 60_000) == 2050
    scores = await redis_client.zmscore(keys.done, [u for u, _ in finished])
    assert all(s is not None and s != float("inf") for s in scores)
