"""The supervisor restarts failing loops with backoff, keeps their work, and tells the truth on health."""

from __future__ import annotations

import asyncio
import time

import pytest
from redis import exceptions as rx

from conveyor.common.supervise import LoopsFailing, Supervisor
from tests.support.wait import wait_for


async def test_a_crashing_loop_is_restarted_and_its_work_retried() -> None:
    sup = Supervisor(unhealthy_after_s=60)
    stop = asyncio.Event()
    pending = [1, 2, 3]
    done: list[int] = []
    calls = 0

    async def body() -> None:
        nonlocal calls
        calls += 1
        while pending:
            if calls < 3:
                raise RuntimeError(f"crash {calls}")  # a bug: restarted, the item is not lost
            done.append(pending.pop(0))
        stop.set()

    await asyncio.wait_for(sup.run("work", body, stop), 10)
    assert done == [1, 2, 3]
    assert calls == 3
    assert sup.status("work").restarts == 2


async def test_backoff_grows_and_is_capped() -> None:
    sup = Supervisor()
    status = sup.status("x")
    delays = [status.next_delay() for _ in range(12)]
    assert delays[0] <= 0.05
    assert delays[3] > delays[0]
    assert max(delays) <= 5.0
    status.ok()
    assert status.next_delay() <= 0.05


async def test_health_follows_a_loop_that_keeps_failing_then_recovers() -> None:
    sup = Supervisor(unhealthy_after_s=0.3, exit_after_s=0)
    changes: list[bool] = []

    async def listener(serving: bool) -> None:
        changes.append(serving)

    sup.on_health(listener)
    stop = asyncio.Event()
    broken = True

    async def body() -> None:
        status = sup.status("claim")
        while not stop.is_set():
            if broken:
                raise rx.ReadOnlyError("You can't write against a read only replica.")
            status.ok()
            await asyncio.sleep(0.01)

    watcher = asyncio.create_task(sup.watch(stop))
    runner = asyncio.create_task(sup.run("claim", body, stop))
    await wait_for(lambda: _async(changes == [False]), "NOT_SERVING after the loop kept failing")
    assert sup.failing()[0].last_error.startswith("ReadOnlyError")
    broken = False
    await wait_for(lambda: _async(changes == [False, True]), "SERVING again once the loop made progress", within=15)
    stop.set()
    await asyncio.gather(watcher, runner)


async def test_a_loop_failing_past_the_exit_time_ends_the_process() -> None:
    sup = Supervisor(unhealthy_after_s=0.1, exit_after_s=0.4)
    stop = asyncio.Event()

    async def body() -> None:
        raise rx.ConnectionError("Connection refused")

    runner = asyncio.create_task(sup.run("complete", body, stop))
    started = time.monotonic()
    with pytest.raises(LoopsFailing) as info:
        await asyncio.wait_for(sup.watch(stop), 10)
    assert info.value.names == ["complete"]
    assert time.monotonic() - started >= 0.4
    stop.set()
    await asyncio.wait_for(runner, 10)


async def test_a_failure_a_loop_handles_itself_counts_too() -> None:
    sup = Supervisor(unhealthy_after_s=0.05, exit_after_s=0)
    status = sup.status("heartbeat")
    status.failed(rx.ConnectionError("down"))
    await wait_for(lambda: _async(bool(sup.failing())), "the handled failure to count")
    status.ok()
    assert sup.failing() == []


async def _async(value: bool) -> bool:
    return value


async def test_a_restarted_loop_that_runs_on_has_recovered(monkeypatch: pytest.MonkeyPatch) -> None:
    """A loop that never reports progress itself (it only waits) is healthy once it stops failing."""
    from conveyor.common import supervise

    monkeypatch.setattr(supervise, "SETTLE_S", 0.2)
    sup = Supervisor(unhealthy_after_s=60)
    stop = asyncio.Event()
    calls = 0

    async def body() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("a bug, once")
        await stop.wait()

    runner = asyncio.create_task(sup.run("scheduler", body, stop))
    await wait_for(lambda: _async(sup.status("scheduler").failing_since is not None), "the failure")
    await wait_for(lambda: _async(sup.status("scheduler").failing_since is None), "recovery after settling")
    stop.set()
    await runner
