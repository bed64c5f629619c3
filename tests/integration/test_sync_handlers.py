"""Sync handlers held to their promises (issue #10 item 4), with a real Runner on real Redis.

A sync handler runs in the worker's own pool (one thread per slot); its slot, its
concurrency-cap slot and its claim last until its thread returns, whatever cancel or timeout
decided; ``ctx.cancelled`` tells it to stop; ``isolate=True`` runs it in a child process that
is killed when it does not.
"""

from __future__ import annotations

import asyncio
import os

import pytest
import redis.asyncio
from google.protobuf.duration_pb2 import Duration

from conveyor.v1 import event_pb2, job_pb2
from conveyor.v1 import limits_pb2 as lim
from conveyor.v1 import producer_service_pb2 as p
from conveyor.worker.isolate import KILL_AFTER_S
from tests.integration.conftest import Producer, StartWorker, WorkerHandle
from tests.integration.test_producer_worker import enqueue, watch_all
from tests.support import handlers as test_handlers
from tests.support.processes import ServiceProcess
from tests.support.wait import wait_for

E = event_pb2
ONCE = job_pb2.RetryPolicy(max_attempts=1)
tracker = test_handlers.tracker


@pytest.fixture(autouse=True)
def _fresh_tracker() -> None:
    tracker.clear()


def _ms(ms: int) -> Duration:
    d = Duration()
    d.FromMilliseconds(ms)
    return d


async def _cancel(producer: Producer, job_id: str, reason: str = "stop") -> p.CancelJobResponse:
    return await producer.stub.CancelJob(p.CancelJobRequest(job_id=job_id, reason=reason))


async def _slots_free(worker: WorkerHandle) -> bool:
    return worker.runner.slots.busy == 0 and not any(q.active for q in worker.runner.queues)


async def test_a_pool_of_concurrency_40_runs_40_sync_handlers_at_once(
    producer: Producer, start_worker: StartWorker
) -> None:
    """More than asyncio's default executor would (min(32, cores + 4)): each waits on a barrier
    that opens only when all 40 run at the same time."""
    test_handlers.set_barrier(40, timeout=15)
    jobs = [await enqueue(producer, "test.barrier", queue="pool40", retry=ONCE) for _ in range(40)]
    worker = await start_worker(queues=("pool40",), concurrency=40)
    finals = await asyncio.gather(*(watch_all(producer, j.job_id) for j in jobs))
    assert [events[-1].type for events in finals] == [E.EVENT_TYPE_SUCCEEDED] * 40
    assert tracker.most("barrier") == 40
    assert worker.runner.pool.threads == 40
    await wait_for(lambda: _slots_free(worker), "every slot to come back")


async def test_a_capped_key_never_runs_more_than_its_cap_with_sync_handlers_that_ignore_cancel_and_timeout(
    producer: Producer, start_worker: StartWorker
) -> None:
    """The timed-out (and the cancelled) attempts' threads run on; the next held job of the key
    starts only when one of them has really returned."""
    await producer.admin.SetConcurrencyLimit(lim.SetConcurrencyLimitRequest(queue="capq", key="k", limit=2))
    payload = {"group": "capped", "sleep": 0.6}
    timed = [
        await enqueue(
            producer, "test.tracked_sync", queue="capq", rate_key="k", payload=payload, timeout=_ms(100), retry=ONCE
        )
        for _ in range(5)
    ]
    cancelled = [
        await enqueue(producer, "test.tracked_sync", queue="capq", rate_key="k", payload=payload, retry=ONCE)
        for _ in range(3)
    ]
    worker = await start_worker(queues=("capq",), concurrency=8)
    watching = [asyncio.create_task(watch_all(producer, j.job_id)) for j in [*timed, *cancelled]]
    for job in cancelled:  # cancel each (held or running): a running one's handler ignores it
        await _cancel(producer, job.job_id, "not needed")
    finals = [events[-1] for events in await asyncio.gather(*watching)]
    assert [f.type for f in finals[:5]] == [E.EVENT_TYPE_FAILED] * 5
    assert {f.error.kind for f in finals[:5]} == {"Timeout"}
    assert [f.type for f in finals[5:]] == [E.EVENT_TYPE_CANCELLED] * 3
    assert tracker.most("capped") <= 2, f"{tracker.most('capped')} handlers of a key capped at 2 ran at once"
    assert tracker.most("capped") == 2
    # Every attempt that started had its thread end before its outcome was recorded.
    assert tracker.ended["capped"] == len(tracker.levels["capped"]) >= 5
    await wait_for(lambda: _slots_free(worker), "every slot to come back")


async def test_a_timed_out_sync_handler_that_ignores_it_keeps_its_slot_until_its_thread_returns(
    producer: Producer, start_worker: StartWorker
) -> None:
    job = await enqueue(
        producer,
        "test.tracked_sync",
        queue="held",
        payload={"group": "held", "sleep": 0.8},
        timeout=_ms(50),
        retry=ONCE,
    )
    worker = await start_worker(queues=("held",), concurrency=1)
    events = await watch_all(producer, job.job_id)
    assert events[-1].type == E.EVENT_TYPE_FAILED and events[-1].error.kind == "Timeout"
    # The outcome was recorded only after the handler really returned, so nothing ran beside it.
    assert tracker.ended["held"] == 1
    await wait_for(lambda: _slots_free(worker), "the slot to come back")


@pytest.mark.parametrize("kind", ["test.sync_until_cancelled", "test.sync_raise_if_cancelled"])
async def test_a_cancelled_sync_handler_that_checks_ctx_cancelled_stops(
    producer: Producer, start_worker: StartWorker, kind: str
) -> None:
    job = await enqueue(producer, kind, queue="polite", retry=ONCE)
    worker = await start_worker(queues=("polite",), concurrency=2)
    await wait_for(lambda: _running(worker), "the handler to start")
    reply = await _cancel(producer, job.job_id, "user asked")
    assert reply.cancel_requested
    events = await watch_all(producer, job.job_id)
    assert events[-1].type == E.EVENT_TYPE_CANCELLED and events[-1].error.message == "user asked"
    await wait_for(lambda: _slots_free(worker), "the slot to come back")
    # Both handlers run for 30 s unless they see the flag: the pool's thread is free again.
    assert worker.runner.pool.running == 0


async def test_a_timeout_sets_ctx_cancelled_for_a_sync_handler(producer: Producer, start_worker: StartWorker) -> None:
    job = await enqueue(producer, "test.sync_raise_if_cancelled", queue="polite-t", timeout=_ms(200), retry=ONCE)
    worker = await start_worker(queues=("polite-t",), concurrency=1)
    events = await watch_all(producer, job.job_id)
    assert events[-1].type == E.EVENT_TYPE_FAILED and events[-1].error.kind == "Timeout"
    assert tracker.ended["raise_if_cancelled"] == 1
    await wait_for(lambda: _slots_free(worker), "the slot to come back")
    assert worker.runner.pool.running == 0


async def _running(worker: WorkerHandle) -> bool:
    return worker.runner.pool.running > 0


async def _notes(r: redis.asyncio.Redis, key: str) -> list[str]:
    return [n.decode() for n in await r.lrange(key, 0, -1)]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_an_isolated_handler_that_ignores_cancel_is_killed_and_its_slot_comes_back(
    producer: Producer, start_worker: StartWorker, redis_client: redis.asyncio.Redis, redis_url: str
) -> None:
    payload = {"redis": redis_url, "key": "iso:stubborn", "sleep": 60}
    job = await enqueue(producer, "test.isolated_stubborn", queue="iso", payload=payload, retry=ONCE)
    worker = await start_worker(queues=("iso",), concurrency=1)
    notes = await wait_for(lambda: _notes(redis_client, "iso:stubborn"), "the child to start", within=20)
    pid = int(notes[0].split()[1])
    assert pid != os.getpid() and _alive(pid)
    await _cancel(producer, job.job_id, "kill it")
    events = await watch_all(producer, job.job_id)
    assert events[-1].type == E.EVENT_TYPE_CANCELLED and events[-1].error.message == "kill it"
    # The outcome is recorded once the child has exited: it ignored SIGTERM, SIGKILL ended it.
    assert not _alive(pid)
    assert await _notes(redis_client, "iso:stubborn") == [f"pid {pid}"]
    await wait_for(lambda: _slots_free(worker), "the slot to come back")
    # The slot is usable again: the next job runs.
    nxt = await enqueue(producer, "test.isolated_echo", queue="iso", payload={"echo": "after"}, retry=ONCE)
    assert (await watch_all(producer, nxt.job_id))[-1].type == E.EVENT_TYPE_SUCCEEDED
    assert KILL_AFTER_S == 2.0


async def test_an_isolated_handler_that_ignores_its_timeout_is_killed(
    producer: Producer, start_worker: StartWorker, redis_client: redis.asyncio.Redis, redis_url: str
) -> None:
    payload = {"redis": redis_url, "key": "iso:timeout", "sleep": 60}
    # 3 s, not less: the child must have started and noted its pid before the timeout, even on a
    # loaded machine (a fresh interpreter importing the handlers took over 300 ms at load 7).
    job = await enqueue(
        producer, "test.isolated_stubborn", queue="iso-t", payload=payload, timeout=_ms(3000), retry=ONCE
    )
    worker = await start_worker(queues=("iso-t",), concurrency=1)
    events = await watch_all(producer, job.job_id)
    assert events[-1].type == E.EVENT_TYPE_FAILED and events[-1].error.kind == "Timeout"
    notes = await _notes(redis_client, "iso:timeout")
    assert len(notes) == 1 and not _alive(int(notes[0].split()[1]))
    await wait_for(lambda: _slots_free(worker), "the slot to come back")


async def test_an_isolated_handler_sees_ctx_cancelled_on_sigterm(
    producer: Producer, start_worker: StartWorker, redis_client: redis.asyncio.Redis, redis_url: str
) -> None:
    payload = {"redis": redis_url, "key": "iso:polite"}
    job = await enqueue(producer, "test.isolated_polite", queue="iso-p", payload=payload, retry=ONCE)
    worker = await start_worker(queues=("iso-p",), concurrency=1)
    await wait_for(lambda: _notes(redis_client, "iso:polite"), "the child to start", within=20)
    await _cancel(producer, job.job_id)
    events = await watch_all(producer, job.job_id)
    assert events[-1].type == E.EVENT_TYPE_CANCELLED
    assert (await _notes(redis_client, "iso:polite"))[1:] == ["saw cancelled"]
    await wait_for(lambda: _slots_free(worker), "the slot to come back")


async def test_an_isolated_handler_returns_its_result_progress_and_errors_through_the_pipe(
    producer: Producer, start_worker: StartWorker
) -> None:
    ok = await enqueue(producer, "test.isolated_echo", queue="iso-e", payload={"echo": [1, "two"]}, retry=ONCE)
    bad = await enqueue(producer, "test.isolated_echo", queue="iso-e", payload={"permanent": "no such user"})
    await start_worker(queues=("iso-e",), concurrency=2)
    events = await watch_all(producer, ok.job_id)
    assert [e.type for e in events][-2:] == [E.EVENT_TYPE_PROGRESS, E.EVENT_TYPE_SUCCEEDED]
    assert events[-2].progress.message == "half way in a child"
    result = events[-1].result.struct_value
    assert result["echo"] == [1, "two"] and int(result["pid"]) != os.getpid()
    failed = (await watch_all(producer, bad.job_id))[-1]
    assert failed.type == E.EVENT_TYPE_FAILED
    assert (failed.error.kind, failed.error.message, failed.error.retryable) == (
        "PermanentError",
        "no such user",
        False,
    )


async def test_a_worker_process_kills_an_isolated_handler_on_cancel_and_leaves_no_child_when_it_stops(
    producer: Producer, redis_client: redis.asyncio.Redis, redis_url: str
) -> None:
    """The deployed path: `python -m conveyor.worker` with its fork server."""
    worker = ServiceProcess(
        "worker",
        {
            "REDIS_URL": redis_url,
            "CONVEYOR_QUEUES": "iso-proc",
            "CONVEYOR_CONCURRENCY": "2",
            "CONVEYOR_WORKER_ID": "iso-proc-worker",
            "CONVEYOR_HANDLERS": "tests.support.handlers:handlers",
            "CONVEYOR_SHUTDOWN_GRACE_SECONDS": "0.5",
            "CONVEYOR_SCHEDULER": "false",
        },
        name="iso-proc-worker",
    )
    await asyncio.to_thread(worker.start)
    try:
        payload = {"redis": redis_url, "key": "iso:proc:1", "sleep": 60}
        job = await enqueue(producer, "test.isolated_stubborn", queue="iso-proc", payload=payload, retry=ONCE)
        notes = await wait_for(lambda: _notes(redis_client, "iso:proc:1"), "the child to start", within=30)
        first = int(notes[0].split()[1])
        await _cancel(producer, job.job_id)
        assert (await watch_all(producer, job.job_id))[-1].type == E.EVENT_TYPE_CANCELLED
        assert not _alive(first)
        echo = await enqueue(producer, "test.isolated_echo", queue="iso-proc", payload={"echo": 1}, retry=ONCE)
        assert (await watch_all(producer, echo.job_id))[-1].type == E.EVENT_TYPE_SUCCEEDED
        # Stopping the worker while a stubborn child runs: the child does not outlive it.
        payload = {"redis": redis_url, "key": "iso:proc:2", "sleep": 60}
        await enqueue(producer, "test.isolated_stubborn", queue="iso-proc", payload=payload, retry=ONCE)
        notes = await wait_for(lambda: _notes(redis_client, "iso:proc:2"), "the second child to start", within=30)
        second = int(notes[0].split()[1])
        assert await asyncio.to_thread(worker.stop, 20) == 0, worker.log_tail()
        await wait_for(lambda: _gone(second), "the child to be gone after its worker stopped", within=10)
    finally:
        worker.kill()


async def _gone(pid: int) -> bool:
    return not _alive(pid)
