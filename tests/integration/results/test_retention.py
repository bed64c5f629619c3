"""Retention counts from projection (issue 10): a finished job stays in Redis until PostgreSQL has its outcome."""

from __future__ import annotations

import math
import time

import redis.asyncio

from conveyor.common.keys import queue_keys
from conveyor.common.scripts import Scripts
from conveyor.results.store import Store
from conveyor.v1 import job_pb2, results_service_pb2
from conveyor.v1 import producer_service_pb2 as p
from tests.integration.conftest import Producer, StartWorker
from tests.integration.results.conftest import ResultsClient, StartProjector
from tests.support import handlers as test_handlers
from tests.support.wait import wait_for

RETENTION_S = 0.3


async def test_finished_jobs_stay_until_projected_then_leave_after_the_retention_even_when_idle(
    producer: Producer,
    start_worker: StartWorker,
    redis_client: redis.asyncio.Redis,
    store: Store,
    start_projector: StartProjector,
    results: ResultsClient,
) -> None:
    await start_worker(retention_s=RETENTION_S)
    keys = queue_keys("default")
    reqs = [p.EnqueueRequest(queue="default", type="test.count") for _ in range(300)]
    ids = [r.job_id for r in (await producer.stub.EnqueueBatch(p.EnqueueBatchRequest(jobs=reqs))).results]

    async def all_ran() -> bool:
        return set(ids) <= set(test_handlers.runs)

    await wait_for(all_ran, "all jobs ran")
    finished_at = time.monotonic()

    async def all_final_in_redis() -> bool:
        return await redis_client.zcard(keys.done) == len(ids)

    await wait_for(all_final_in_redis, "every outcome recorded")
    scores = {score for _, score in await redis_client.zrange(keys.done, 0, -1, withscores=True)}
    assert scores == {math.inf}, "a finished job got an expiry before it was projected"

    # Several retentions later, with the worker's expiry timer running, nothing was projected: all still there.
    async def retention_passed_thrice() -> bool:
        return time.monotonic() - finished_at > 3 * RETENTION_S

    await wait_for(retention_passed_thrice, "three retentions to pass")
    assert await redis_client.hlen(keys.state) == len(ids)
    for job_id in ids[:: len(ids) // 10]:
        got = await producer.stub.GetJob(p.GetJobRequest(job_id=job_id))
        assert got.job.state == job_pb2.JOB_STATE_SUCCEEDED

    # Projected: the records get their expiry from the commit, and the worker's timer drops them.
    await start_projector(store, retention_s=RETENTION_S)

    async def nothing_left() -> bool:
        sizes = [
            await redis_client.hlen(keys.state),
            await redis_client.zcard(keys.done),
            await redis_client.xlen(keys.band(5)),
        ]
        return sizes == [0, 0, 0]

    await wait_for(nothing_left, "live records and job entries to leave Redis after projection", within=15)
    for job_id in ids[:: len(ids) // 10]:
        got = await results.stub.GetJob(results_service_pb2.ResultsServiceGetJobRequest(job_id=job_id))
        assert got.job.state == job_pb2.JOB_STATE_SUCCEEDED


async def test_projection_never_extends_an_expiry_nor_brings_back_a_requeued_job(
    redis_client: redis.asyncio.Redis,
) -> None:
    scripts = Scripts(redis_client)
    keys = queue_keys("proj")
    # Live records: state|attempt|priority|entry id|first event id|final event id (prelude RECORD).
    await redis_client.hset(
        keys.state,
        mapping={
            "final": "5|1|5||100-0|300-0",
            "expiring": "5|1|5||100-0|300-0",
            "rerun": "6|2|5||100-0|900-0",  # finished again after a retry from the dead letters
            "running": "3|2|5|1-0|100-0|",
        },
    )
    await redis_client.zadd(keys.done, {"final": math.inf, "expiring": 1000.0, "rerun": math.inf})
    jobs = [("final", "300-0"), ("expiring", "300-0"), ("rerun", "300-0"), ("running", "300-0"), ("gone", "300-0")]
    assert await scripts.projected(keys, jobs, 60_000) == 1
    scores = dict(await redis_client.zrange(keys.done, 0, -1, withscores=True))
    assert abs(scores[b"final"] - (time.time() * 1000 + 60_000)) < 10_000
    assert scores[b"expiring"] == 1000.0  # LT: never later
    assert scores[b"rerun"] == math.inf  # its newer outcome (900-0) is not projected yet
    assert b"running" not in scores and b"gone" not in scores  # XX: never put back
    # The newer outcome projected: now it expires too.
    assert await scripts.projected(keys, [("rerun", "900-0")], 60_000) == 1
    assert await scripts.projected(keys, [], 60_000) == 0


async def test_projection_acks_the_committed_entries_after_setting_the_expiry_in_one_step(
    redis_client: redis.asyncio.Redis,
) -> None:
    """ADR 0030: the batch's acks travel packed in projected.lua's call, thousands at a time."""
    scripts = Scripts(redis_client)
    keys = queue_keys("proj-ack")
    await redis_client.xgroup_create(keys.events, "results", id="0", mkstream=True)
    ids = [await redis_client.xadd(keys.events, {"e": b"x"}) for _ in range(2500)]
    await redis_client.xreadgroup("results", "c1", {keys.events: ">"}, count=5000)
    await redis_client.hset(keys.state, "done", "5|1|5||100-0|300-0")
    await redis_client.zadd(keys.done, {"done": math.inf})
    # Acks alone (every job of the batch held back or unfinished): nothing expires, all are acked.
    assert await scripts.projected(keys, [], 60_000, ids[:1200]) == 0
    assert (await redis_client.xpending(keys.events, "results"))["pending"] == 1300
    assert await scripts.projected(keys, [("done", "300-0")], 60_000, ids[1200:]) == 1
    assert (await redis_client.xpending(keys.events, "results"))["pending"] == 0
    assert (await redis_client.zscore(keys.done, "done") or math.inf) < math.inf
    # A stream whose group went away (deleted, Redis restarted empty): nothing to ack, the expiry is set.
    await redis_client.zadd(keys.done, {"done": math.inf})
    await redis_client.xgroup_destroy(keys.events, "results")
    assert await scripts.projected(keys, [("done", "300-0")], 60_000, ids[:1]) == 1
