"""A WatchQueue subscriber's inbox: bounded, and a dropped backlog becomes one gap before the next event."""

from __future__ import annotations

import asyncio

import pytest

from conveyor.common.settings import ProducerSettings, SettingsError
from conveyor.producer.watch import Gap, QueueSubscription
from conveyor.v1 import event_pb2


def _event(n: int, type: int = event_pb2.EVENT_TYPE_PROGRESS) -> tuple[tuple[int, int], event_pb2.JobEvent]:
    return (n, 0), event_pb2.JobEvent(id=f"{n}-0", type=type)  # type: ignore[arg-type]


async def _drain(sub: QueueSubscription) -> list[tuple[Gap | None, str]]:
    out = []
    while sub.pending:
        gap, _key, event = await sub.next()
        out.append((gap, event.id))
    return out


async def test_the_inbox_never_holds_more_than_the_buffer() -> None:
    sub = QueueSubscription("q", 3, frozenset())
    for n in range(1, 11):
        sub.offer(*_event(n))
        assert sub.pending <= 3
    # 1..9 arrived while full three times: 1-3, 4-6 and 7-9 were dropped, merged into one gap before 10.
    assert await _drain(sub) == [(Gap(9, "10-0"), "10-0")]


async def test_a_gap_comes_with_the_event_after_it_and_events_keep_their_order() -> None:
    sub = QueueSubscription("q", 2, frozenset())
    for n in (1, 2, 3):
        sub.offer(*_event(n))
    first = await sub.next()
    assert first[0] == Gap(2, "3-0") and first[2].id == "3-0"
    for n in (4, 5):
        sub.offer(*_event(n))
    assert await _drain(sub) == [(None, "4-0"), (None, "5-0")]


async def test_filtered_out_events_take_no_room() -> None:
    sub = QueueSubscription("q", 2, frozenset({event_pb2.EVENT_TYPE_SUCCEEDED}))
    for n in range(1, 50):
        sub.offer(*_event(n))
    sub.offer(*_event(50, event_pb2.EVENT_TYPE_SUCCEEDED))
    assert await _drain(sub) == [(None, "50-0")]


async def test_next_waits_for_an_event() -> None:
    sub = QueueSubscription("q", 2, frozenset())
    waiting = asyncio.ensure_future(sub.next())
    await asyncio.sleep(0)
    assert not waiting.done()
    sub.offer(*_event(7))
    gap, key, event = await asyncio.wait_for(waiting, 1)
    assert (gap, key, event.id) == (None, (7, 0), "7-0")


def test_the_buffer_is_a_setting() -> None:
    assert ProducerSettings.from_env({}).watch_buffer == 10_000
    assert ProducerSettings.from_env({"CONVEYOR_WATCH_BUFFER": "500"}).watch_buffer == 500
    with pytest.raises(SettingsError, match="CONVEYOR_WATCH_BUFFER"):
        ProducerSettings.from_env({"CONVEYOR_WATCH_BUFFER": "0"})
