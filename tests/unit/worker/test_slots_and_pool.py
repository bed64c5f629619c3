"""Slots (reserve before the claim) and the worker's thread pool, without Redis."""

from __future__ import annotations

import asyncio
import contextvars
import threading

from conveyor.worker.runner import Slots
from conveyor.worker.threads import ThreadPool


async def test_slots_reserve_at_most_what_is_free_and_settle_gives_back_the_rest() -> None:
    slots = Slots(5)
    assert slots.reserve(100) == 5 and slots.free == 0
    assert slots.reserve(1) == 0  # nothing left for another queue or maintenance
    slots.settle(5, 2)  # the claim found 2 jobs: 3 come back at once
    assert slots.busy == 2 and slots.reserve(100) == 3
    slots.settle(3, 0)
    slots.give(2)
    assert slots.busy == 0


async def test_wait_free_wakes_when_a_slot_comes_back() -> None:
    slots = Slots(1)
    assert slots.reserve(1) == 1
    waiter = asyncio.create_task(slots.wait_free())
    await asyncio.sleep(0)
    assert not waiter.done()
    slots.give(1)
    await asyncio.wait_for(waiter, 5)


def test_the_pool_grows_to_its_size_and_runs_that_many_at_once_in_the_callers_context() -> None:
    pool = ThreadPool(12)
    barrier = threading.Barrier(12, timeout=10)
    var: contextvars.ContextVar[str] = contextvars.ContextVar("var")
    var.set("from the caller")
    futures = [pool.submit(lambda: (barrier.wait(), var.get())[1]) for _ in range(12)]
    assert [f.result(15) for f in futures] == ["from the caller"] * 12
    assert pool.threads == 12
    # Idle threads are reused, not multiplied.
    assert pool.submit(lambda: 7).result(5) == 7 and pool.threads == 12
    pool.shutdown()


def test_the_pool_reports_a_handlers_exception_and_counts_running_calls() -> None:
    pool = ThreadPool(2)
    release = threading.Event()
    blocked = pool.submit(release.wait, 10)
    failed = pool.submit(lambda: 1 / 0)
    assert isinstance(failed.exception(5), ZeroDivisionError)
    assert pool.running == 1
    release.set()
    assert blocked.result(5) is True
    pool.shutdown()
