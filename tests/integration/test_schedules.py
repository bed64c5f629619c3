"""Repeatable jobs (issue #5 item 4): the ScheduleService RPCs and the scheduler loop, on real Redis and gRPC."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import grpc
import pytest
import redis.asyncio
from google.protobuf import duration_pb2, timestamp_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from conveyor.common.client import ConveyorClient
from conveyor.common.enqueue import Enqueuer
from conveyor.common.errors import InvalidArgument, NotFound
from conveyor.common.keys import queue_keys
from conveyor.common.redis import make_redis
from conveyor.common.schedules import (
    SCHEDULE_DUE,
    ScheduleStore,
    schedule_key,
    tick_idempotency_key,
)
from conveyor.common.scripts import Scripts
from conveyor.v1 import job_pb2
from conveyor.v1 import producer_service_pb2 as p
from conveyor.v1 import schedule_service_pb2 as s
from conveyor.worker.scheduler import Scheduler
from tests.integration.conftest import Producer
from tests.support.wait import wait_for


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def ts(ms: int) -> timestamp_pb2.Timestamp:
    out = timestamp_pb2.Timestamp()
    out.FromMilliseconds(ms)
    return out


def every(seconds: float, queue: str = "sched", **spec: object) -> s.ScheduleSpec:
    return s.ScheduleSpec(
        interval=duration_pb2.Duration(seconds=int(seconds), nanos=int(seconds % 1 * 1e9)),
        template=p.EnqueueRequest(queue=queue, type="test.count", payload_json=b'{"k": 1}'),
        **spec,  # type: ignore[arg-type]
    )


def cron(expr: str, zone: str = "", queue: str = "sched") -> s.ScheduleSpec:
    return s.ScheduleSpec(cron=expr, time_zone=zone, template=p.EnqueueRequest(queue=queue, type="test.count"))


async def queued_ticks(client: redis.asyncio.Redis, queue: str = "sched") -> list[str]:
    """The idempotency keys of the jobs waiting in ``queue`` (one per fired tick), oldest first."""
    entries = await client.xrange(queue_keys(queue).band(5))
    return [job_pb2.Job.FromString(fields[b"d"]).idempotency_key for _, fields in entries]


def bad_fields(err: grpc.aio.AioRpcError) -> list[str]:
    status = rpc_status.from_call(err)
    assert status is not None
    fields: list[str] = []
    for detail in status.details:
        bad = error_details_pb2.BadRequest()
        assert detail.Unpack(bad)
        fields += [v.field for v in bad.field_violations]
    return fields


@pytest.fixture
async def scheduler(redis_client: redis.asyncio.Redis, redis_url: str) -> AsyncIterator[Scheduler]:
    """A scheduler loop (as every worker runs one), not started: tests call tick_once or run it."""
    client = make_redis(redis_url)
    wait = make_redis(redis_url, blocking=True)
    yield Scheduler(client, wait, Enqueuer(client, Scripts(client), 64 * 1024, 1))
    await client.aclose()
    await wait.aclose()


async def test_create_get_list_update_and_upsert_semantics(producer: Producer) -> None:
    before = now_ms()
    created = await producer.schedules.CreateSchedule(
        s.CreateScheduleRequest(schedule_id="daily", spec=cron("0 9 * * *", "Europe/Berlin"))
    )
    assert created.created
    sched = created.schedule
    assert sched.schedule_id == "daily" and sched.version == 1
    assert sched.spec.time_zone == "Europe/Berlin"
    assert sched.next_fire_at.ToMilliseconds() > before
    assert sched.next_fire_at.ToDatetime().minute == 0
    assert not sched.HasField("last_tick_at") and not sched.last_job_id
    # Create again with the same spec: nothing changes (deploy scripts may call it on every start).
    again = await producer.schedules.CreateSchedule(
        s.CreateScheduleRequest(schedule_id="daily", spec=cron("0 9 * * *", "Europe/Berlin"))
    )
    assert not again.created and again.schedule == sched
    # Create with another spec on an existing id updates it; a template-only change keeps the next tick.
    changed = cron("0 9 * * *", "Europe/Berlin")
    changed.template.priority = 7
    upserted = await producer.schedules.CreateSchedule(s.CreateScheduleRequest(schedule_id="daily", spec=changed))
    assert not upserted.created and upserted.schedule.version == 2
    assert upserted.schedule.next_fire_at == sched.next_fire_at
    # Update with a new timing recomputes the next tick.
    updated = await producer.schedules.UpdateSchedule(s.UpdateScheduleRequest(schedule_id="daily", spec=every(3600)))
    assert updated.schedule.version == 3
    assert abs(updated.schedule.next_fire_at.ToMilliseconds() - (now_ms() + 3_600_000)) < 5_000
    got = await producer.schedules.GetSchedule(s.GetScheduleRequest(schedule_id="daily"))
    assert got.schedule == updated.schedule
    # Update never creates.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await producer.schedules.UpdateSchedule(s.UpdateScheduleRequest(schedule_id="nope", spec=every(60)))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    for method, request in [
        (producer.schedules.GetSchedule, s.GetScheduleRequest(schedule_id="nope")),
        (producer.schedules.DeleteSchedule, s.DeleteScheduleRequest(schedule_id="nope")),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await method(request)  # type: ignore[operator]
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_list_paginates_in_id_order(producer: Producer) -> None:
    ids = [f"s{i:02d}" for i in range(7)]
    for schedule_id in reversed(ids):
        await producer.schedules.CreateSchedule(s.CreateScheduleRequest(schedule_id=schedule_id, spec=every(60)))
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        page = await producer.schedules.ListSchedules(s.ListSchedulesRequest(page_size=3, page_token=token))
        seen += [x.schedule_id for x in page.schedules]
        pages += 1
        token = page.next_page_token
        if not token:
            break
    assert seen == ids and pages == 3
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await producer.schedules.ListSchedules(s.ListSchedulesRequest(page_size=5000))
    assert bad_fields(err.value) == ["page_size"]


def _bad_specs() -> list[tuple[str, s.ScheduleSpec]]:
    both = cron("* * * * *")
    both.interval.seconds = 5
    end_before = every(60)
    end_before.start_at.FromMilliseconds(2_000_000_000_000)
    end_before.end_at.FromMilliseconds(1_999_999_999_000)
    keyed = every(60)
    keyed.template.idempotency_key = "mine"
    run_at = every(60)
    run_at.template.run_at.FromMilliseconds(now_ms() + 60_000)
    zone_without_cron = every(60)
    zone_without_cron.time_zone = "UTC"
    bad_queue = every(60, queue="no spaces")
    bad_priority = every(60)
    bad_priority.template.priority = 42
    no_template = s.ScheduleSpec(interval=duration_pb2.Duration(seconds=5))
    return [
        ("spec.cron", cron("61 * * * *")),
        ("spec.cron", cron("every day")),
        ("spec.cron", cron("0 0 30 2 *")),  # February 30th never comes
        ("spec.time_zone", cron("0 9 * * *", "Mars/Olympus_Mons")),
        ("spec.interval", every(0)),
        ("spec.interval", s.ScheduleSpec(interval=duration_pb2.Duration(seconds=-5), template=every(1).template)),
        ("spec.interval", every(0.5)),
        ("spec.interval", every(4000 * 24 * 3600)),
        ("spec.cron", both),
        ("spec.cron", s.ScheduleSpec(template=every(1).template)),
        ("spec.end_at", end_before),
        ("spec.template.idempotency_key", keyed),
        ("spec.template.run_at", run_at),
        ("spec.time_zone", zone_without_cron),
        ("spec.template.queue", bad_queue),
        ("spec.template.queue", every(60, queue="..")),
        ("spec.template.priority", bad_priority),
        ("spec.template", no_template),
        ("spec.missed_tick_policy", every(60, missed_tick_policy=9)),
    ]


@pytest.mark.parametrize(("field", "spec"), _bad_specs())
async def test_bad_input_names_the_field_and_changes_nothing(
    producer: Producer, redis_client: redis.asyncio.Redis, field: str, spec: s.ScheduleSpec
) -> None:
    kept = (
        await producer.schedules.CreateSchedule(s.CreateScheduleRequest(schedule_id="kept", spec=every(60)))
    ).schedule
    for call in (
        producer.schedules.CreateSchedule(s.CreateScheduleRequest(schedule_id="new", spec=spec)),
        producer.schedules.CreateSchedule(s.CreateScheduleRequest(schedule_id="kept", spec=spec)),
        producer.schedules.UpdateSchedule(s.UpdateScheduleRequest(schedule_id="kept", spec=spec)),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in bad_fields(err.value)
    assert not await redis_client.exists(schedule_key("new"))
    still = (await producer.schedules.GetSchedule(s.GetScheduleRequest(schedule_id="kept"))).schedule
    assert still == kept


@pytest.mark.parametrize("schedule_id", ["", "has space", "x" * 129])
async def test_bad_schedule_id(producer: Producer, schedule_id: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await producer.schedules.CreateSchedule(s.CreateScheduleRequest(schedule_id=schedule_id, spec=every(60)))
    assert bad_fields(err.value) == ["schedule_id"]


async def test_ticks_fire_jobs_and_delete_stops_them(
    producer: Producer, redis_client: redis.asyncio.Redis, scheduler: Scheduler
) -> None:
    stop = asyncio.Event()
    loop = asyncio.create_task(scheduler.run(stop))
    try:
        created = await producer.schedules.CreateSchedule(s.CreateScheduleRequest(schedule_id="fast", spec=every(1)))
        first_tick = created.schedule.next_fire_at.ToMilliseconds()

        async def two_jobs() -> list[str] | None:
            keys = await queued_ticks(redis_client)
            return keys if len(keys) >= 2 else None

        keys = await wait_for(two_jobs, "two ticks fired", within=10)
        assert keys[:2] == [tick_idempotency_key("fast", first_tick), tick_idempotency_key("fast", first_tick + 1000)]
        got = (await producer.schedules.GetSchedule(s.GetScheduleRequest(schedule_id="fast"))).schedule
        assert got.last_tick_at.ToMilliseconds() >= first_tick + 1000
        job = await producer.stub.GetJob(p.GetJobRequest(job_id=got.last_job_id))
        assert job.job.idempotency_key == tick_idempotency_key("fast", got.last_tick_at.ToMilliseconds())

        deleted = await producer.schedules.DeleteSchedule(s.DeleteScheduleRequest(schedule_id="fast"))
        assert deleted.schedule.schedule_id == "fast"
        count = len(await queued_ticks(redis_client))
        # Watch for three more would-be ticks: the loop keeps running, nothing fires.
        deadline = now_ms() + 3000
        wakeups = scheduler.wakeups

        async def three_ticks_passed() -> bool:
            return now_ms() > deadline

        await wait_for(three_ticks_passed, "three tick periods", within=10, interval=0.2)
        assert len(await queued_ticks(redis_client)) == count
        assert scheduler.wakeups - wakeups <= 2  # asleep, not polling: the delete's signal, at most one more
        assert not loop.done()
    finally:
        stop.set()
        await asyncio.wait_for(loop, 5)


async def test_a_claim_fails_on_a_deleted_or_changed_schedule(
    producer: Producer, redis_client: redis.asyncio.Redis, redis_url: str
) -> None:
    await producer.schedules.CreateSchedule(s.CreateScheduleRequest(schedule_id="gone", spec=every(60)))
    client = make_redis(redis_url)
    try:
        store = ScheduleStore(client)
        seen = await store.get("gone")
        assert seen is not None
        # Changed (a new version) since it was read: the compare-and-set fails.
        await producer.schedules.UpdateSchedule(s.UpdateScheduleRequest(schedule_id="gone", spec=every(120)))
        assert not await store.claim(seen, seen.next_ms + 60_000, seen.next_ms, now_ms())
        seen = await store.get("gone")
        assert seen is not None
        # Deleted after it was read (a loop about to fire): the compare-and-set fails, no job.
        await producer.schedules.DeleteSchedule(s.DeleteScheduleRequest(schedule_id="gone"))
        assert not await store.claim(seen, seen.next_ms + 60_000, seen.next_ms, now_ms())
        assert await queued_ticks(redis_client) == []
    finally:
        await client.aclose()


async def test_delete_finishes_a_tick_claimed_just_before(
    producer: Producer, redis_client: redis.asyncio.Redis, redis_url: str
) -> None:
    await producer.schedules.CreateSchedule(s.CreateScheduleRequest(schedule_id="racing", spec=every(60)))
    client = make_redis(redis_url)
    try:
        store = ScheduleStore(client)
        seen = await store.get("racing")
        assert seen is not None
        # A loop claimed the tick and has not enqueued yet when the delete comes in.
        assert await store.claim(seen, seen.next_ms + 60_000, seen.next_ms, now_ms())
        await producer.schedules.DeleteSchedule(s.DeleteScheduleRequest(schedule_id="racing"))
        assert await queued_ticks(redis_client) == [tick_idempotency_key("racing", seen.next_ms)]
        # A tick's key is kept for an hour (the template set no window): long past any lease.
        ttl = await redis_client.pttl(queue_keys("sched").idempotency(tick_idempotency_key("racing", seen.next_ms)))
        assert 3_500_000 < ttl <= 3_600_000
        # The slow loop now enqueues the same tick: same key, same job, nothing new.
        response = await producer.stub.Enqueue(
            p.EnqueueRequest(
                queue="sched", type="test.count", idempotency_key=tick_idempotency_key("racing", seen.next_ms)
            )
        )
        assert not response.created
        assert len(await queued_ticks(redis_client)) == 1
    finally:
        await client.aclose()


async def _simulate_outage(client: redis.asyncio.Redis, schedule_id: str, next_ms: int, anchor_ms: int) -> None:
    """Everything was down: the stored next tick lies in the past."""
    await client.hset(schedule_key(schedule_id), mapping={"next": next_ms, "anchor": anchor_ms})
    await client.zadd(SCHEDULE_DUE, {schedule_id: next_ms})


@pytest.mark.parametrize(
    ("policy", "catch_up_jobs"),
    [(s.MISSED_TICK_POLICY_SKIP, 0), (s.MISSED_TICK_POLICY_UNSPECIFIED, 0), (s.MISSED_TICK_POLICY_ONCE, 1)],
)
async def test_missed_ticks_follow_the_policy(
    producer: Producer,
    redis_client: redis.asyncio.Redis,
    scheduler: Scheduler,
    policy: s.MissedTickPolicy,
    catch_up_jobs: int,
) -> None:
    await producer.schedules.CreateSchedule(
        s.CreateScheduleRequest(schedule_id="tenmin", spec=every(600, missed_tick_policy=policy))
    )
    anchor = now_ms() - 65 * 60_000  # down for 65 minutes: 6 ticks missed
    await _simulate_outage(redis_client, "tenmin", anchor + 600_000, anchor)
    await scheduler.tick_once()
    keys = await queued_ticks(redis_client)
    assert len(keys) == catch_up_jobs
    got = (await producer.schedules.GetSchedule(s.GetScheduleRequest(schedule_id="tenmin"))).schedule
    assert got.next_fire_at.ToMilliseconds() == anchor + 7 * 600_000  # continues with the next tick
    if catch_up_jobs:
        assert keys == [tick_idempotency_key("tenmin", anchor + 6 * 600_000)]  # the latest missed tick
        assert got.last_tick_at.ToMilliseconds() == anchor + 6 * 600_000
    # A second pass (another worker) changes nothing.
    await scheduler.tick_once()
    assert len(await queued_ticks(redis_client)) == catch_up_jobs


async def test_start_and_end_are_honoured(
    producer: Producer, redis_client: redis.asyncio.Redis, scheduler: Scheduler
) -> None:
    start = now_ms() + 3000  # room for a slow CreateSchedule on a loaded machine
    spec = every(1, start_at=ts(start), end_at=ts(start + 2000))
    created = (
        await producer.schedules.CreateSchedule(s.CreateScheduleRequest(schedule_id="window", spec=spec))
    ).schedule
    assert created.next_fire_at.ToMilliseconds() == start
    stop = asyncio.Event()
    loop = asyncio.create_task(scheduler.run(stop))
    try:

        async def finished() -> bool:
            got = (await producer.schedules.GetSchedule(s.GetScheduleRequest(schedule_id="window"))).schedule
            return not got.HasField("next_fire_at")

        await wait_for(finished, "no tick left after end_at", within=10)
        keys = await queued_ticks(redis_client)
        assert keys == [tick_idempotency_key("window", start + k * 1000) for k in range(3)]
    finally:
        stop.set()
        await asyncio.wait_for(loop, 5)


async def test_many_loops_race_for_each_tick_and_one_wins(
    producer: Producer, redis_client: redis.asyncio.Redis, redis_url: str
) -> None:
    clients = [make_redis(redis_url) for _ in range(4)]
    waits = [make_redis(redis_url, blocking=True) for _ in range(4)]
    loops = [Scheduler(c, w, Enqueuer(c, Scripts(c), 64 * 1024, 1)) for c, w in zip(clients, waits, strict=True)]
    await producer.schedules.CreateSchedule(s.CreateScheduleRequest(schedule_id="race", spec=every(60)))
    anchor = now_ms() - 10 * 60_000 + 30_000  # the due tick is 30 s late: on time, fires
    await _simulate_outage(redis_client, "race", anchor + 9 * 60_000, anchor)
    try:
        await asyncio.gather(*(loop.tick_once() for loop in loops))
        assert await queued_ticks(redis_client) == [tick_idempotency_key("race", anchor + 9 * 60_000)]
        assert sum(loop.fired for loop in loops) == 1
    finally:
        for c in [*clients, *waits]:
            await c.aclose()


async def test_a_tick_whose_process_died_is_finished_by_another(
    producer: Producer, redis_client: redis.asyncio.Redis, scheduler: Scheduler, redis_url: str
) -> None:
    await producer.schedules.CreateSchedule(s.CreateScheduleRequest(schedule_id="orphan", spec=every(60)))
    client = make_redis(redis_url)
    try:
        store = ScheduleStore(client)
        seen = await store.get("orphan")
        assert seen is not None
        # A process claimed the tick (lease until now) and died before enqueueing it.
        assert await store.claim(seen, seen.next_ms + 60_000, seen.next_ms, now_ms() - 10_001)
        assert await queued_ticks(redis_client) == []
        await scheduler.tick_once()
        assert await queued_ticks(redis_client) == [tick_idempotency_key("orphan", seen.next_ms)]
        got = (await producer.schedules.GetSchedule(s.GetScheduleRequest(schedule_id="orphan"))).schedule
        assert got.last_tick_at.ToMilliseconds() == seen.next_ms and got.last_job_id
        await scheduler.tick_once()  # nothing left in flight
        assert len(await queued_ticks(redis_client)) == 1
    finally:
        await client.aclose()


async def test_python_client(producer: Producer) -> None:
    async with ConveyorClient(producer.addr) as client:
        spec = client.schedule_spec(
            "reports", "demo.echo", {"kind": "daily"}, cron="0 9 * * *", time_zone="Europe/Berlin"
        )
        assert not spec.template.idempotency_key
        schedule, created = await client.create_schedule("daily-report", spec)
        assert created and schedule.next_fire_at.ToDatetime(UTC).astimezone().tzinfo is not None
        assert (await client.create_schedule("daily-report", spec)) == (schedule, False)
        start = datetime.now(UTC) + timedelta(hours=1)
        every = client.schedule_spec("reports", "demo.echo", every=timedelta(minutes=5), start_at=start, catch_up=True)
        updated = await client.update_schedule("daily-report", every)
        assert updated.version == 2 and updated.spec.missed_tick_policy == s.MISSED_TICK_POLICY_ONCE
        assert updated.next_fire_at.ToDatetime(UTC) == start.replace(microsecond=start.microsecond // 1000 * 1000)
        assert (await client.get_schedule("daily-report")) == updated
        assert [x.schedule_id for x in (await client.list_schedules()).schedules] == ["daily-report"]
        with pytest.raises(InvalidArgument) as bad:
            await client.create_schedule(
                "other", client.schedule_spec("q", "t", cron="0 9 * * *", time_zone="Nowhere/Zone")
            )
        assert list(bad.value.violations) == ["spec.time_zone"]
        assert (await client.delete_schedule("daily-report")).schedule_id == "daily-report"
        with pytest.raises(NotFound):
            await client.get_schedule("daily-report")
        with pytest.raises(NotFound):
            await client.update_schedule("daily-report", every)


async def test_one_broken_schedule_does_not_stop_the_others(
    producer: Producer, redis_client: redis.asyncio.Redis, scheduler: Scheduler
) -> None:
    for schedule_id in ("a-broken", "b-fine"):
        await producer.schedules.CreateSchedule(s.CreateScheduleRequest(schedule_id=schedule_id, spec=every(60)))
        anchor = now_ms() - 9 * 60_000 - 30_000
        await _simulate_outage(redis_client, schedule_id, anchor + 9 * 60_000, anchor)
    await redis_client.hset(schedule_key("a-broken"), "spec", b"\xff not a ScheduleSpec")
    await scheduler.tick_once()
    assert await queued_ticks(redis_client) == [tick_idempotency_key("b-fine", anchor + 9 * 60_000)]


async def test_an_idle_loop_sleeps_and_a_change_wakes_it(producer: Producer, scheduler: Scheduler) -> None:
    stop = asyncio.Event()
    loop = asyncio.create_task(scheduler.run(stop))
    try:
        quiet_until = now_ms() + 1500

        async def quiet_period_over() -> bool:
            return now_ms() > quiet_until

        await wait_for(quiet_period_over, "a quiet period", within=5, interval=0.1)
        assert scheduler.wakeups == 0  # no schedules: one blocking read, no polling
        await producer.schedules.CreateSchedule(s.CreateScheduleRequest(schedule_id="hourly", spec=every(3600)))

        async def woken() -> bool:
            return scheduler.wakeups == 1

        await wait_for(woken, "the create to wake the loop", within=5)
        quiet_until = now_ms() + 1500
        await wait_for(quiet_period_over, "another quiet period", within=5, interval=0.1)
        assert scheduler.wakeups == 1  # asleep until the tick, an hour away
    finally:
        stop.set()
        await asyncio.wait_for(loop, 5)


@pytest.mark.parametrize(
    ("start", "expected"),
    [
        # 2027-03-28: Berlin jumps from 02:00 CET to 03:00 CEST; 02:30 fires right after, at 03:00 CEST.
        (datetime(2027, 3, 27, 12, tzinfo=UTC), datetime(2027, 3, 28, 1, 0, tzinfo=UTC)),
        # 2027-10-31: 03:00 CEST falls back to 02:00 CET; the first 02:30 (CEST) fires.
        (datetime(2027, 10, 30, 12, tzinfo=UTC), datetime(2027, 10, 31, 0, 30, tzinfo=UTC)),
        # The day after each change: 02:30 local again.
        (datetime(2027, 3, 28, 12, tzinfo=UTC), datetime(2027, 3, 29, 0, 30, tzinfo=UTC)),
        (datetime(2027, 10, 31, 12, tzinfo=UTC), datetime(2027, 11, 1, 1, 30, tzinfo=UTC)),
    ],
)
async def test_a_daily_schedule_in_berlin_gets_the_right_instant_on_change_days(
    producer: Producer, start: datetime, expected: datetime
) -> None:
    spec = cron("30 2 * * *", "Europe/Berlin")
    spec.start_at.FromDatetime(start)
    got = (await producer.schedules.CreateSchedule(s.CreateScheduleRequest(schedule_id="nightly", spec=spec))).schedule
    assert got.next_fire_at.ToDatetime(UTC) == expected


async def test_a_delete_that_fails_midway_still_loses_no_tick(
    producer: Producer, redis_client: redis.asyncio.Redis, scheduler: Scheduler, redis_url: str
) -> None:
    await producer.schedules.CreateSchedule(s.CreateScheduleRequest(schedule_id="half", spec=every(60)))
    client = make_redis(redis_url)
    try:
        store = ScheduleStore(client)
        seen = await store.get("half")
        assert seen is not None
        # A loop claimed a tick and died; a DeleteSchedule then stopped the schedule but its
        # producer died too, before finishing the tick (only the first step of a delete ran).
        assert await store.claim(seen, seen.next_ms + 60_000, seen.next_ms, now_ms() - 10_001)
        stored, inflight = await store.delete("half")
        assert stored is not None and inflight is not None and inflight.tick_ms == seen.next_ms
        # Deleted for every client at once...
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await producer.schedules.GetSchedule(s.GetScheduleRequest(schedule_id="half"))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert not (await producer.schedules.ListSchedules(s.ListSchedulesRequest())).schedules
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await producer.schedules.UpdateSchedule(s.UpdateScheduleRequest(schedule_id="half", spec=every(60)))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        # ...and the claimed tick is still made, once, by a loop when the lease runs out; then it is gone.
        await scheduler.tick_once()
        assert await queued_ticks(redis_client) == [tick_idempotency_key("half", seen.next_ms)]
        assert not await redis_client.exists(schedule_key("half"))
        await scheduler.tick_once()
        assert len(await queued_ticks(redis_client)) == 1
    finally:
        await client.aclose()


async def test_create_after_a_delete_that_waits_for_its_tick_starts_afresh(
    producer: Producer, redis_client: redis.asyncio.Redis, redis_url: str
) -> None:
    await producer.schedules.CreateSchedule(s.CreateScheduleRequest(schedule_id="again", spec=every(60)))
    client = make_redis(redis_url)
    try:
        store = ScheduleStore(client)
        seen = await store.get("again")
        assert seen is not None
        assert await store.claim(seen, seen.next_ms + 60_000, seen.next_ms, now_ms())
        await store.delete("again")  # the first step only: waits for the tick in flight
        created = await producer.schedules.CreateSchedule(s.CreateScheduleRequest(schedule_id="again", spec=every(120)))
        assert created.created and created.schedule.version == 1
        assert not created.schedule.HasField("last_tick_at")
    finally:
        await client.aclose()


async def test_a_worker_whose_clock_runs_fast_fires_no_tick_early(
    producer: Producer, redis_client: redis.asyncio.Redis, scheduler: Scheduler, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What is due is decided on Redis's clock, which every loop shares, not on the process's own.
    from conveyor.worker import scheduler as scheduler_module

    real = scheduler_module._local_ms
    monkeypatch.setattr(scheduler_module, "_local_ms", lambda: real() + 120_000)  # two minutes fast
    created = await producer.schedules.CreateSchedule(s.CreateScheduleRequest(schedule_id="fast", spec=every(60)))
    next_ms = created.schedule.next_fire_at.ToMilliseconds()
    assert next_ms > now_ms() + 50_000
    moved, wake_ms = await scheduler.tick_once()
    assert not moved and await queued_ticks(redis_client) == [] and scheduler.fired == 0
    assert wake_ms == next_ms and -125_000 < scheduler.clock_offset_ms < -115_000
    got = (await producer.schedules.GetSchedule(s.GetScheduleRequest(schedule_id="fast"))).schedule
    assert got.next_fire_at.ToMilliseconds() == next_ms
