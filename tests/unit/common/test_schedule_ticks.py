"""The pure tick computation of schedules: cron in a zone (daylight saving), intervals, start/end, missed ticks."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

from conveyor.common.schedules import MISSED_GRACE_MS, Timing, cron_error, tick_idempotency_key

BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")


def ms(dt: datetime) -> int:
    return int(dt.timestamp() * 1000)


def ticks(timing: Timing, after: datetime, n: int, anchor_ms: int = 0) -> list[datetime]:
    out: list[datetime] = []
    t = ms(after)
    for _ in range(n):
        t = timing.tick_after(anchor_ms, t)
        if not t:
            break
        out.append(datetime.fromtimestamp(t / 1000, UTC))
    return out


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)  # type: ignore[misc]


def test_daily_0230_berlin_across_spring_forward_fires_right_after_the_gap() -> None:
    # 2026-03-29 02:00 CET jumps to 03:00 CEST: 02:30 does not exist that day, it fires at 03:00 CEST.
    timing = Timing(cron="30 2 * * *", zone=BERLIN)
    assert ticks(timing, datetime(2026, 3, 27, 12, tzinfo=BERLIN), 4) == [
        utc(2026, 3, 28, 1, 30),  # 02:30 CET
        utc(2026, 3, 29, 1, 0),  # 03:00 CEST, right after the jump
        utc(2026, 3, 30, 0, 30),  # 02:30 CEST
        utc(2026, 3, 31, 0, 30),
    ]


def test_daily_0230_berlin_across_fall_back_fires_once() -> None:
    # 2026-10-25 03:00 CEST falls back to 02:00 CET: 02:30 happens twice, the tick fires once (the first).
    timing = Timing(cron="30 2 * * *", zone=BERLIN)
    assert ticks(timing, datetime(2026, 10, 24, 12, tzinfo=BERLIN), 3) == [
        utc(2026, 10, 25, 0, 30),  # 02:30 CEST
        utc(2026, 10, 26, 1, 30),  # 02:30 CET; not 2026-10-25 01:30 UTC (the repeated 02:30)
        utc(2026, 10, 27, 1, 30),
    ]


def test_daily_0900_keeps_local_time_across_both_changes() -> None:
    timing = Timing(cron="0 9 * * *", zone=NEW_YORK)
    # 2026-03-08: EST (UTC-5) -> EDT (UTC-4); 2026-11-01: EDT -> EST.
    assert ticks(timing, datetime(2026, 3, 7, 12, tzinfo=NEW_YORK), 2) == [utc(2026, 3, 8, 13), utc(2026, 3, 9, 13)]
    assert ticks(timing, datetime(2026, 3, 6, 12, tzinfo=NEW_YORK), 1) == [utc(2026, 3, 7, 14)]
    assert ticks(timing, datetime(2026, 10, 31, 12, tzinfo=NEW_YORK), 2) == [utc(2026, 11, 1, 14), utc(2026, 11, 2, 14)]
    for tick in ticks(Timing(cron="0 9 * * *", zone=BERLIN), datetime(2026, 3, 25, tzinfo=BERLIN), 10):
        assert tick.astimezone(BERLIN).hour == 9


def test_new_york_0230_on_change_days() -> None:
    timing = Timing(cron="30 2 * * *", zone=NEW_YORK)
    spring = ticks(timing, datetime(2026, 3, 7, 12, tzinfo=NEW_YORK), 2)
    assert spring == [utc(2026, 3, 8, 7), utc(2026, 3, 9, 6, 30)]  # 03:00 EDT, then 02:30 EDT
    assert ticks(timing, datetime(2026, 10, 31, 12, tzinfo=NEW_YORK), 1) == [utc(2026, 11, 1, 7, 30)]  # 02:30 EST
    # In New York the repeated hour is 01:00-02:00: 01:30 fires once, at 01:30 EDT.
    fall = ticks(Timing(cron="30 1 * * *", zone=NEW_YORK), datetime(2026, 10, 31, 12, tzinfo=NEW_YORK), 2)
    assert fall == [utc(2026, 11, 1, 5, 30), utc(2026, 11, 2, 6, 30)]


def test_cron_defaults_to_utc_and_ticks_are_strictly_after() -> None:
    timing = Timing(cron="*/15 * * * *")
    assert ticks(timing, utc(2026, 1, 1, 12, 0), 2) == [utc(2026, 1, 1, 12, 15), utc(2026, 1, 1, 12, 30)]
    assert ticks(timing, utc(2026, 1, 1, 12, 0, 0).replace(microsecond=500_000), 1) == [utc(2026, 1, 1, 12, 15)]


def test_interval_grid_from_anchor() -> None:
    timing = Timing(interval_ms=1000)
    anchor = ms(utc(2026, 1, 1))
    assert timing.tick_after(anchor, anchor) == anchor + 1000  # no start: first tick one interval after
    assert timing.tick_after(anchor, anchor + 1) == anchor + 1000
    assert timing.tick_after(anchor, anchor + 1000) == anchor + 2000
    assert timing.tick_after(anchor, anchor + 2500) == anchor + 3000


def test_start_is_a_tick_and_nothing_fires_before_it() -> None:
    start = ms(utc(2026, 1, 1, 10))
    timing = Timing(interval_ms=60_000, start_ms=start)
    assert timing.tick_after(timing.anchor(start - 3_600_000), start - 3_600_000) == start
    cron = Timing(cron="*/5 * * * *", start_ms=start + 1)
    assert cron.tick_after(0, start - 3_600_000) == start + 300_000


def test_nothing_fires_after_end() -> None:
    end = ms(utc(2026, 1, 1, 10, 2))
    timing = Timing(interval_ms=60_000, start_ms=ms(utc(2026, 1, 1, 10)), end_ms=end)
    anchor = timing.anchor(0)
    assert timing.tick_after(anchor, anchor) == anchor + 60_000
    assert timing.tick_after(anchor, anchor + 60_000) == end  # a tick exactly at the end fires
    assert timing.tick_after(anchor, end) == 0
    assert Timing(cron="0 * * * *", end_ms=end).tick_after(0, end) == 0


def test_plan_on_time_fires_the_due_tick() -> None:
    timing = Timing(interval_ms=1000)
    anchor = 1_000_000
    assert timing.plan(anchor, anchor + 5000, anchor + 5010, catch_up_once=False) == (anchor + 5000, anchor + 6000)
    # a short hiccup (within the grace) still fires each tick, one by one
    late = anchor + 5000 + MISSED_GRACE_MS - 1
    assert timing.plan(anchor, anchor + 5000, late, catch_up_once=False) == (anchor + 5000, anchor + 6000)


def test_plan_missed_ticks_skip_and_once() -> None:
    timing = Timing(interval_ms=600_000)  # every 10 minutes
    anchor = 0
    due = 600_000
    now = due + 65 * 60_000  # down for 65 minutes: ticks at 10, 20, ..., 70 min were missed
    cutoff = now - MISSED_GRACE_MS
    last_missed = cutoff // 600_000 * 600_000
    skip = timing.plan(anchor, due, now, catch_up_once=False)
    once = timing.plan(anchor, due, now, catch_up_once=True)
    assert skip == (0, last_missed + 600_000)
    assert once == (last_missed, last_missed + 600_000)
    assert skip[1] > cutoff


def test_plan_missed_cron_ticks() -> None:
    timing = Timing(cron="0 * * * *", zone=BERLIN)  # hourly
    due = ms(utc(2026, 1, 1, 0))
    now = ms(utc(2026, 1, 1, 5, 30))
    assert timing.plan(0, due, now, catch_up_once=True) == (ms(utc(2026, 1, 1, 5)), ms(utc(2026, 1, 1, 6)))
    assert timing.plan(0, due, now, catch_up_once=False) == (0, ms(utc(2026, 1, 1, 6)))


def test_cron_errors_and_keys() -> None:
    assert cron_error("0 9 * * MON-FRI") is None
    assert cron_error("61 * * * *")
    assert cron_error("* * * *")
    assert cron_error("not a cron")
    assert tick_idempotency_key("daily", 123) == "schedule:daily:123"


def test_plan_never_catches_up_past_the_end() -> None:
    end = 3 * 600_000
    timing = Timing(interval_ms=600_000, start_ms=0, end_ms=end)  # ticks at 0, 10, 20, 30 min
    now = 5 * 3_600_000  # down from before the first tick until long after the end
    assert timing.plan(0, 0, now, catch_up_once=True) == (end, 0)  # the last real tick, then none left
    assert timing.plan(0, 0, now, catch_up_once=False) == (0, 0)
    cron = Timing(cron="0 * * * *", end_ms=ms(utc(2026, 1, 1, 2, 30)))
    due = ms(utc(2026, 1, 1, 0))
    assert cron.plan(0, due, ms(utc(2026, 1, 2)), catch_up_once=True) == (ms(utc(2026, 1, 1, 2)), 0)
