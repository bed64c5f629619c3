"""Rate limits, concurrency caps and back-offs (issue #5, items 2 and 3), in-process workers.

The promises across worker processes are tested in tests/faults/test_flow_control_processes.py.
"""

from __future__ import annotations

import itertools
import time

import grpc
import pytest
import redis.asyncio
from google.protobuf.duration_pb2 import Duration

from conveyor.common.keys import queue_keys
from conveyor.common.scripts import Scripts
from conveyor.v1 import admin_service_pb2 as a
from conveyor.v1 import event_pb2, job_pb2
from conveyor.v1 import limits_pb2 as lim
from conveyor.v1 import producer_service_pb2 as p
from tests.integration.conftest import Producer, StartWorker
from tests.integration.test_producer_worker import enqueue, watch_all
from tests.support import handlers as test_handlers
from tests.support import observe
from tests.support.wait import wait_for


def _ms(ms: int) -> Duration:
    d = Duration()
    d.FromMilliseconds(ms)
    return d


async def test_limits_are_set_shown_and_cleared_per_scope(producer: Producer) -> None:
    admin = producer.admin
    await admin.SetRateLimit(lim.SetRateLimitRequest(queue="lq", limit=50, period=_ms(1000)))
    await admin.SetRateLimit(lim.SetRateLimitRequest(queue="lq", each_key=True, limit=5, period=_ms(2000)))
    await admin.SetRateLimit(lim.SetRateLimitRequest(queue="lq", key="vip", limit=20, period=_ms(1000)))
    await admin.SetConcurrencyLimit(lim.SetConcurrencyLimitRequest(queue="lq", limit=8))
    await admin.SetConcurrencyLimit(lim.SetConcurrencyLimitRequest(queue="lq", each_key=True, limit=2))
    shown = (await admin.SetConcurrencyLimit(lim.SetConcurrencyLimitRequest(queue="lq", key="vip", limit=4))).limits
    assert (shown.rate.limit, shown.rate.period.ToMilliseconds()) == (50, 1000)
    assert (shown.rate_per_key.limit, shown.rate_per_key.period.ToMilliseconds()) == (5, 2000)
    assert (shown.concurrency, shown.concurrency_per_key) == (8, 2)
    assert [(k.key, k.rate.limit, k.concurrency) for k in shown.keys] == [("vip", 20, 4)]

    cleared = await admin.ClearRateLimit(lim.ClearRateLimitRequest(queue="lq", key="vip"))
    assert cleared.changed and not cleared.limits.keys[0].HasField("rate")
    assert not (await admin.ClearRateLimit(lim.ClearRateLimitRequest(queue="lq", key="vip"))).changed
    assert (await admin.ClearConcurrencyLimit(lim.ClearConcurrencyLimitRequest(queue="lq"))).changed
    now = (await admin.GetLimits(lim.GetLimitsRequest(queue="lq"))).limits
    assert now.concurrency == 0 and now.rate.limit == 50 and now.concurrency_per_key == 2


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (lim.SetRateLimitRequest(queue="lq", limit=0, period=_ms(1000)), "limit"),
        (lim.SetRateLimitRequest(queue="lq", limit=-5, period=_ms(1000)), "limit"),
        (lim.SetRateLimitRequest(queue="lq", limit=5), "period"),
        (lim.SetRateLimitRequest(queue="lq", limit=5, period=_ms(0)), "period"),
        (lim.SetRateLimitRequest(queue="lq", key="has space", limit=5, period=_ms(1000)), "key"),
        (lim.SetRateLimitRequest(queue="bad queue", limit=5, period=_ms(1000)), "queue"),
        (lim.SetConcurrencyLimitRequest(queue="lq", limit=0), "limit"),
        (lim.SetConcurrencyLimitRequest(queue="lq", each_key=False, limit=3), "each_key"),
        (lim.BackOffRequest(queue="lq", duration=_ms(-1)), "duration"),
        (lim.ClearBackOffRequest(queue="bad queue"), "queue"),
        (lim.ClearBackOffRequest(queue="..", key="api"), "queue"),
        (lim.BackOffRequest(queue=".", duration=_ms(1000)), "queue"),
        (lim.SetConcurrencyLimitRequest(queue="..", limit=3), "queue"),
        (lim.ClearBackOffRequest(queue="lq", key="has space"), "key"),
    ],
)
async def test_bad_limits_are_invalid_name_the_field_and_change_nothing(
    producer: Producer, request_: object, field: str
) -> None:
    before = (await producer.admin.GetLimits(lim.GetLimitsRequest(queue="lq"))).limits
    method = {
        lim.SetRateLimitRequest: producer.admin.SetRateLimit,
        lim.SetConcurrencyLimitRequest: producer.admin.SetConcurrencyLimit,
        lim.BackOffRequest: producer.admin.BackOff,
        lim.ClearBackOffRequest: producer.admin.ClearBackOff,
    }[type(request_)]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await method(request_)  # type: ignore[operator]
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in (info.value.details() or "")
    assert (await producer.admin.GetLimits(lim.GetLimitsRequest(queue="lq"))).limits == before


async def test_a_bad_rate_key_on_enqueue_is_invalid(producer: Producer) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await enqueue(producer, "test.count", rate_key="tenant a")
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "rate_key" in (info.value.details() or "")


async def test_a_key_at_its_cap_waits_in_place_while_other_keys_run(
    producer: Producer, start_worker: StartWorker, redis_client: redis.asyncio.Redis, redis_url: str
) -> None:
    await producer.admin.SetConcurrencyLimit(lim.SetConcurrencyLimitRequest(queue="default", key="slow", limit=1))
    slow = [
        await enqueue(
            producer, "test.observe", rate_key="slow", payload={"redis": redis_url, "group": "slow", "sleep": 0.2}
        )
        for _ in range(4)
    ]
    fast = [
        await enqueue(producer, "test.observe", rate_key=f"fast-{i}", payload={"redis": redis_url, "group": "fast"})
        for i in range(20)
    ]
    await start_worker(concurrency=16)
    await wait_for(lambda: observe.done(redis_client, "fast", len(fast)), "the other keys' jobs", within=10)
    assert await observe.done(redis_client, "fast", len(fast))
    # The fast keys did not wait for the slow key's queue to drain.
    assert not await observe.done(redis_client, "slow", len(slow))
    await wait_for(lambda: observe.done(redis_client, "slow", len(slow)), "the capped key's jobs", within=15)
    starts = await observe.starts(redis_client, "slow")
    assert max(level for _, _, level in starts) == 1  # never two at once
    # FIFO within the key: they started in enqueue order.
    assert [job_id for _, job_id, _ in starts] == [j.job_id for j in slow]
    limits = (await producer.admin.GetLimits(lim.GetLimitsRequest(queue="default"))).limits
    assert limits.running == 0 and not limits.blocked_keys


async def test_a_held_job_keeps_its_priority(
    producer: Producer, start_worker: StartWorker, redis_client: redis.asyncio.Redis, redis_url: str
) -> None:
    # The key may start one job per 300 ms: everything after the first is held, then starts by priority.
    await producer.admin.SetRateLimit(lim.SetRateLimitRequest(queue="default", key="t", limit=1, period=_ms(300)))
    jobs = []
    for prio in (5, 1, 2, 9, 3):
        jobs.append(
            (
                prio,
                await enqueue(
                    producer, "test.observe", rate_key="t", priority=prio, payload={"redis": redis_url, "group": "t"}
                ),
            )
        )
    await start_worker(concurrency=8)
    await wait_for(lambda: observe.done(redis_client, "t", 5), "the held jobs", within=10)
    order = [job_id for _, job_id, _ in await observe.starts(redis_client, "t")]
    first_claim = order[0]  # the first claim reads the highest band first
    assert first_claim == jobs[3][1].job_id
    expected = [j.job_id for _, j in sorted(jobs, key=lambda pj: -pj[0])]
    assert order == expected
    times = [t for t, _, _ in await observe.starts(redis_client, "t")]
    assert all(b - a >= 0.25 for a, b in itertools.pairwise(times))


async def test_a_held_job_can_be_read_and_cancelled_and_never_runs(
    producer: Producer, start_worker: StartWorker, redis_client: redis.asyncio.Redis, redis_url: str
) -> None:
    await producer.admin.SetConcurrencyLimit(lim.SetConcurrencyLimitRequest(queue="default", key="c", limit=1))
    first = await enqueue(
        producer, "test.observe", rate_key="c", payload={"redis": redis_url, "group": "c", "sleep": 0.5}
    )
    held = await enqueue(producer, "test.observe", rate_key="c", payload={"redis": redis_url, "group": "c"})
    await start_worker()
    await wait_for(lambda: observe.started(redis_client, "c", 1), "the first job")

    async def is_held() -> bool:
        blocked = (await producer.admin.GetLimits(lim.GetLimitsRequest(queue="default"))).limits.blocked_keys
        return any(b.key == "c" and b.waiting == 1 for b in blocked)

    await wait_for(is_held, "the second job to be held back")
    # Statistics say why it is not running: held by its key, which is at its cap.
    stats = (await producer.admin.GetQueueStats(a.GetQueueStatsRequest(queue="default"))).stats
    assert (stats.held, stats.queued, stats.active) == (1, 0, 1)
    assert [(k.key, k.concurrency) for k in stats.limits.keys] == [("c", 1)]
    assert [b.key for b in stats.limits.blocked_keys] == ["c"] and stats.limits.running == 1
    job = (await producer.stub.GetJob(p.GetJobRequest(job_id=held.job_id))).job
    assert job.state == job_pb2.JOB_STATE_QUEUED and job.rate_key == "c"
    cancelled = await producer.stub.CancelJob(p.CancelJobRequest(job_id=held.job_id))
    assert cancelled.state == job_pb2.JOB_STATE_CANCELLED
    await wait_for(lambda: observe.done(redis_client, "c", 1), "the first job to finish")
    final = await watch_all(producer, first.job_id)
    assert final[-1].type == event_pb2.EVENT_TYPE_SUCCEEDED
    keys = queue_keys("default")

    async def key_state_gone() -> bool:
        return not await redis_client.exists(keys.held("c"), keys.running("c"))

    await wait_for(key_state_gone, "the key's held and running sets to empty")
    assert [job_id for _, job_id, _ in await observe.starts(redis_client, "c")] == [first.job_id]
    assert not await redis_client.hexists(keys.parked, held.job_id.split("/")[1])


async def test_clearing_a_cap_starts_held_jobs_at_once(
    producer: Producer, start_worker: StartWorker, redis_client: redis.asyncio.Redis, redis_url: str
) -> None:
    await producer.admin.SetConcurrencyLimit(lim.SetConcurrencyLimitRequest(queue="default", each_key=True, limit=1))
    payload = {"redis": redis_url, "group": "w", "sleep": 3}
    await enqueue(producer, "test.observe", rate_key="w", payload=payload)
    waiting = await enqueue(producer, "test.observe", rate_key="w", payload={"redis": redis_url, "group": "w2"})
    # A long poll interval: only the signal of the change can start the held job quickly.
    await start_worker(poll_interval_s=60.0)
    await wait_for(lambda: observe.started(redis_client, "w", 1), "the first job")

    async def held() -> bool:
        blocked = (await producer.admin.GetLimits(lim.GetLimitsRequest(queue="default"))).limits.blocked_keys
        return any(b.key == "w" for b in blocked)

    await wait_for(held, "the second job to be held back")
    assert not await observe.started(redis_client, "w2", 1)
    await producer.admin.ClearConcurrencyLimit(lim.ClearConcurrencyLimitRequest(queue="default", each_key=True))
    await wait_for(lambda: observe.started(redis_client, "w2", 1), "the held job to start after the cap went", within=3)
    assert (await producer.stub.GetJob(p.GetJobRequest(job_id=waiting.job_id))).job.state in (
        job_pb2.JOB_STATE_ACTIVE,
        job_pb2.JOB_STATE_SUCCEEDED,
    )


async def test_a_rate_limited_handler_backs_off_its_key_only_and_is_retried(
    producer: Producer, start_worker: StartWorker, redis_client: redis.asyncio.Redis, redis_url: str
) -> None:
    # max_attempts 1: a rate-limited attempt does not use up the job's attempts.
    limited = await enqueue(
        producer,
        "test.rate_limited",
        rate_key="api",
        payload={"retry_after": 1.0},
        retry=job_pb2.RetryPolicy(max_attempts=1),
    )
    await start_worker(concurrency=8)

    async def backed_off() -> bool:
        limits = (await producer.admin.GetLimits(lim.GetLimitsRequest(queue="default"))).limits
        return [b.key for b in limits.blocked_keys] == ["api"] and not limits.HasField("backed_off_until")

    await wait_for(backed_off, "the handler to back off its key")
    # Same key: held back; another key: runs at once.
    await enqueue(producer, "test.observe", rate_key="api", payload={"redis": redis_url, "group": "api"})
    await enqueue(producer, "test.observe", rate_key="other", payload={"redis": redis_url, "group": "other"})
    await wait_for(lambda: observe.started(redis_client, "other", 1), "the other key's job", within=0.8)
    assert not await observe.started(redis_client, "api", 1)
    events = await watch_all(producer, limited.job_id)
    kinds = [e.type for e in events]
    assert kinds[-1] == event_pb2.EVENT_TYPE_SUCCEEDED and events[-1].attempt == 2
    retry = next(e for e in events if e.type == event_pb2.EVENT_TYPE_RETRY_SCHEDULED)
    assert retry.error.kind == "RateLimited"
    second = next(e for e in events if e.type == event_pb2.EVENT_TYPE_ACTIVE and e.attempt == 2)
    assert second.time.ToMilliseconds() >= retry.next_run_at.ToMilliseconds() >= retry.time.ToMilliseconds() + 990
    await wait_for(lambda: observe.started(redis_client, "api", 1), "the same key's job after the back-off")
    assert (await observe.starts(redis_client, "api"))[0][0] * 1000 >= retry.time.ToMilliseconds() + 990


async def _ran(job_id: str) -> bool:
    return job_id in test_handlers.runs


async def test_back_off_holds_the_whole_queue(
    producer: Producer, start_worker: StartWorker, redis_client: redis.asyncio.Redis, redis_url: str
) -> None:
    until = (await producer.admin.BackOff(lim.BackOffRequest(queue="default", duration=_ms(1000)))).until
    assert until.ToMilliseconds() > time.time() * 1000 + 500
    assert (
        await producer.admin.GetLimits(lim.GetLimitsRequest(queue="default"))
    ).limits.backed_off_until.ToMilliseconds() == until.ToMilliseconds()
    job = await enqueue(producer, "test.observe", payload={"redis": redis_url, "group": "q"})
    await start_worker(poll_interval_s=60.0)  # the claim's wake-up time, not the poll, ends the wait
    await wait_for(lambda: observe.started(redis_client, "q", 1), "the job after the back-off", within=5)
    started_at = (await observe.starts(redis_client, "q"))[0][0]
    assert started_at * 1000 >= until.ToMilliseconds() - 5
    assert job.job_id


async def test_clear_back_off_starts_a_backed_off_queue_at_once_and_is_idempotent(
    producer: Producer, start_worker: StartWorker, redis_client: redis.asyncio.Redis, redis_url: str
) -> None:
    admin = producer.admin
    await admin.BackOff(lim.BackOffRequest(queue="default", duration=_ms(600_000)))
    await enqueue(producer, "test.observe", payload={"redis": redis_url, "group": "q"})
    await start_worker(poll_interval_s=60.0)  # only the clear's wake-up can start the job in time

    async def claimed_and_held() -> bool:  # the worker's claim has seen the job and was refused by the back-off
        stats = (await admin.GetQueueStats(a.GetQueueStatsRequest(queue="default"))).stats
        return stats.workers == 1 and stats.queued == 1

    await wait_for(claimed_and_held, "a worker serving the backed-off queue")
    assert not await observe.started(redis_client, "q", 1)
    cleared = await admin.ClearBackOff(lim.ClearBackOffRequest(queue="default"))
    assert cleared.changed and not cleared.limits.HasField("backed_off_until")
    await wait_for(lambda: observe.started(redis_client, "q", 1), "the job right after ClearBackOff", within=5)
    assert not (await admin.ClearBackOff(lim.ClearBackOffRequest(queue="default"))).changed  # idempotent
    assert not (await admin.ClearBackOff(lim.ClearBackOffRequest(queue="never-used"))).changed


async def test_clear_back_off_of_one_key_starts_its_held_jobs_at_once(
    producer: Producer, start_worker: StartWorker, redis_client: redis.asyncio.Redis, redis_url: str
) -> None:
    admin = producer.admin
    await admin.BackOff(lim.BackOffRequest(queue="default", key="api", duration=_ms(600_000)))
    await start_worker(poll_interval_s=60.0)
    await enqueue(producer, "test.observe", rate_key="api", payload={"redis": redis_url, "group": "api"})
    await enqueue(producer, "test.observe", rate_key="other", payload={"redis": redis_url, "group": "other"})
    await wait_for(lambda: observe.started(redis_client, "other", 1), "the other key's job")

    async def held() -> bool:
        limits = (await admin.GetLimits(lim.GetLimitsRequest(queue="default"))).limits
        return [(b.key, b.waiting) for b in limits.blocked_keys] == [("api", 1)]

    await wait_for(held, "the backed-off key's job held back")
    assert not await observe.started(redis_client, "api", 1)
    # Clearing another key's back-off (or the queue's, not in force) changes nothing.
    assert not (await admin.ClearBackOff(lim.ClearBackOffRequest(queue="default", key="other"))).changed
    assert not (await admin.ClearBackOff(lim.ClearBackOffRequest(queue="default"))).changed
    cleared = await admin.ClearBackOff(lim.ClearBackOffRequest(queue="default", key="api"))
    assert cleared.changed
    await wait_for(lambda: observe.started(redis_client, "api", 1), "the key's job right after ClearBackOff", within=5)
    assert not (await admin.ClearBackOff(lim.ClearBackOffRequest(queue="default", key="api"))).changed


async def test_delayed_and_retried_jobs_keep_their_key(
    producer: Producer, start_worker: StartWorker, redis_client: redis.asyncio.Redis, redis_url: str
) -> None:
    await producer.admin.SetConcurrencyLimit(lim.SetConcurrencyLimitRequest(queue="default", key="d", limit=1))
    payload = {"redis": redis_url, "group": "d", "sleep": 0.6}
    first = await enqueue(producer, "test.observe", rate_key="d", payload=payload)
    later = await enqueue(producer, "test.observe", rate_key="d", payload=payload, delay=_ms(200))
    retried = await enqueue(
        producer, "test.rate_limited", rate_key="d", payload={"retry_after": 0.05}, retry=job_pb2.RetryPolicy()
    )
    await start_worker(concurrency=8)
    await wait_for(lambda: observe.done(redis_client, "d", 2), "both observed jobs", within=10)
    events = await watch_all(producer, retried.job_id)
    assert events[-1].type == event_pb2.EVENT_TYPE_SUCCEEDED
    starts = await observe.starts(redis_client, "d")
    assert [job_id for _, job_id, _ in starts] == [first.job_id, later.job_id]
    assert max(level for _, _, level in starts) == 1
    # The key's slot was never shared: the retried job ran only while no observed job did.
    actives = [e.time.ToMilliseconds() for e in events if e.type == event_pb2.EVENT_TYPE_ACTIVE]
    spans = [(t * 1000, t * 1000 + 600) for t, _, _ in starts]
    assert not any(a <= t < b for t in actives for a, b in spans)
    keys = queue_keys("default")
    assert not await redis_client.exists(keys.rate_keys, keys.held("d"), keys.running("d"))


async def test_a_queue_default_priority_applies_to_jobs_enqueued_without_one(
    producer: Producer, start_worker: StartWorker
) -> None:
    shown = await producer.admin.SetDefaultPriority(lim.SetDefaultPriorityRequest(queue="default", priority=8))
    assert shown.limits.default_priority == 8
    for bad in (0, 10, -1):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await producer.admin.SetDefaultPriority(lim.SetDefaultPriorityRequest(queue="default", priority=bad))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "priority" in (info.value.details() or "")
    assert (await producer.admin.GetLimits(lim.GetLimitsRequest(queue="default"))).limits.default_priority == 8

    async def default_applied() -> bool:  # producers cache the default for up to a second
        probe = await enqueue(producer, "test.count", queue="default")
        got = (await producer.stub.GetJob(p.GetJobRequest(job_id=probe.job_id))).job
        return got.priority == 8

    await wait_for(default_applied, "the new default priority to apply", within=3)
    explicit = await enqueue(producer, "test.count", priority=2)
    assert (await producer.stub.GetJob(p.GetJobRequest(job_id=explicit.job_id))).job.priority == 2
    other = await enqueue(producer, "test.count", queue="other")
    assert (await producer.stub.GetJob(p.GetJobRequest(job_id=other.job_id))).job.priority == 5
    # Jobs at the default outrank explicit lower priorities.
    test_handlers.started.clear()
    await start_worker(queues=("default",))
    await wait_for(lambda: _ran(explicit.job_id), "the explicit low-priority job")
    order = [j for j in test_handlers.started]
    assert order.index(explicit.job_id) == len(order) - 1


@pytest.mark.parametrize("scope", ["key", "each_key"])
async def test_a_cap_set_while_a_keys_jobs_run_counts_them(
    producer: Producer, start_worker: StartWorker, redis_client: redis.asyncio.Redis, redis_url: str, scope: str
) -> None:
    # Without a cap no running set is kept; setting one must count the jobs already running.
    keys = queue_keys("default")
    payload = {"redis": redis_url, "group": "late", "sleep": 1.0}
    for _ in range(3):
        await enqueue(producer, "test.observe", rate_key="late", payload=payload)
    await start_worker(concurrency=8)
    await wait_for(lambda: observe.started(redis_client, "late", 3), "three uncapped jobs of the key")
    assert not await redis_client.exists(keys.running("late"))
    cap = lim.SetConcurrencyLimitRequest(queue="default", limit=2)
    if scope == "key":
        cap.key = "late"
    else:
        cap.each_key = True
    await producer.admin.SetConcurrencyLimit(cap)
    assert await redis_client.scard(keys.running("late")) == 3
    await enqueue(producer, "test.observe", rate_key="late", payload={**payload, "sleep": 0})
    await wait_for(lambda: observe.done(redis_client, "late", 4), "all four jobs", within=10)
    # The fourth started only once two of the three had finished: never more than 3 at once,
    # and at its start at most one other job of the key ran.
    levels = [level for _, _, level in await observe.starts(redis_client, "late")]
    assert sorted(levels[:3]) == [1, 2, 3] and levels[3] <= 2


async def test_a_held_key_whose_job_is_gone_takes_no_start_in_its_window(
    producer: Producer, redis_client: redis.asyncio.Redis
) -> None:
    # A key is ready but its held job vanished (cancelled, expired): the claim starts nothing and
    # gives back the start it took in the key's window, so the key's next job is not held for it.
    keys = queue_keys("default")
    await producer.admin.SetRateLimit(lim.SetRateLimitRequest(queue="default", key="gone", limit=1, period=_ms(60_000)))
    await redis_client.zadd(keys.held("gone"), {"01JGONE0000000000000000000": 1.0})
    await redis_client.zadd(keys.ready, {"gone": 1.0})
    result = await Scripts(redis_client).claim(keys, "w-test", 10)
    assert result.claimed == []
    assert await redis_client.llen(keys.window("gone")) == 0
    assert not await redis_client.zscore(keys.ready, "gone")
    job = await enqueue(producer, "test.count", rate_key="gone")
    claimed = (await Scripts(redis_client).claim(keys, "w-test", 10)).claimed
    assert [c.ulid for c in claimed] == [job.job_id.split("/")[1]]
    assert await redis_client.llen(keys.window("gone")) == 1


async def test_keyed_jobs_without_limits_keep_no_per_key_state(
    producer: Producer, start_worker: StartWorker, redis_client: redis.asyncio.Redis, redis_url: str
) -> None:
    keys = queue_keys("default")
    payload = {"redis": redis_url, "group": "free", "sleep": 0.5}
    await enqueue(producer, "test.observe", rate_key="free", payload=payload)
    await start_worker()
    await wait_for(lambda: observe.started(redis_client, "free", 1), "the keyed job")
    assert not await redis_client.exists(keys.running("free"), keys.window("free"), keys.held("free"))
    await wait_for(lambda: observe.done(redis_client, "free", 1), "the keyed job to finish")


async def test_a_cap_heals_a_leaked_slot_but_counts_jobs_started_in_the_same_claim(
    producer: Producer, redis_client: redis.asyncio.Redis
) -> None:
    # A slot leaked by a job that no longer exists is reclaimed at the cap; a job the same claim
    # just started (its ACTIVE record is written when the claim ends) is not mistaken for one.
    keys = queue_keys("default")
    await producer.admin.SetConcurrencyLimit(lim.SetConcurrencyLimitRequest(queue="default", key="one", limit=1))
    await redis_client.sadd(keys.running("one"), "01JLEAKED00000000000000000")
    jobs = [await enqueue(producer, "test.count", rate_key="one") for _ in range(2)]
    claimed = (await Scripts(redis_client).claim(keys, "w-test", 10)).claimed
    assert [c.ulid for c in claimed] == [jobs[0].job_id.split("/")[1]]
    assert await redis_client.smembers(keys.running("one")) == {claimed[0].ulid.encode()}
    held = (await producer.admin.GetLimits(lim.GetLimitsRequest(queue="default"))).limits.blocked_keys
    assert [(b.key, b.waiting) for b in held] == [("one", 1)]
