"""GetQueueStats, ListQueues and ListWorkers against real Redis, gRPC and in-process workers (issue 5)."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from conveyor.common.client import ConveyorClient
from conveyor.common.errors import NotFound
from conveyor.v1 import admin_service_pb2 as a
from conveyor.v1 import producer_service_pb2 as p
from tests.integration.conftest import Producer, StartWorker, start_producer
from tests.support import handlers as test_handlers
from tests.support.queue_states import assert_live_counts, fill_every_state
from tests.support.wait import wait_for

QUEUE = "stats"


def bad_fields(exc: grpc.aio.AioRpcError) -> list[str]:
    status = rpc_status.from_call(exc)  # type: ignore[arg-type]
    assert status is not None
    fields = []
    for detail in status.details:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            fields += [v.field for v in bad.field_violations]
    return fields


async def test_counts_match_jobs_in_every_state(producer: Producer, start_worker: StartWorker) -> None:
    await start_worker(queues=(QUEUE,), concurrency=3)
    setup = await fill_every_state(producer.stub, producer.admin, QUEUE)

    got = await producer.admin.GetQueueStats(a.GetQueueStatsRequest(queue=QUEUE))
    assert_live_counts(got.stats, QUEUE)
    # This producer has no results service: the live part is still there, and says what is missing.
    assert not got.HasField("finished")
    assert "no results service" in got.finished_unavailable

    # Counts follow the jobs: resume and let the gated jobs finish; everything queued then runs.
    await producer.admin.ResumeQueue(a.ResumeQueueRequest(queue=QUEUE))
    test_handlers.gate.set()

    async def drained() -> a.QueueStats | None:
        s = (await producer.admin.GetQueueStats(a.GetQueueStatsRequest(queue=QUEUE))).stats
        return s if (s.queued, s.active) == (0, 0) else None

    after = await wait_for(drained, "queued and active jobs to run", within=20)
    assert (after.delayed, after.retry_scheduled, after.dead_lettered, after.paused) == (2, 1, 1, False)
    assert not after.bands and not after.HasField("oldest_queued_time")
    assert sum(len(ids) for ids in setup.queued.values()) == 6


async def test_list_queues_shows_every_queue_with_the_same_counts(
    producer: Producer, start_worker: StartWorker
) -> None:
    await start_worker(queues=(QUEUE,), concurrency=3)
    await fill_every_state(producer.stub, producer.admin, QUEUE)
    await producer.stub.Enqueue(p.EnqueueRequest(queue="other", type="test.count"))

    listed = (await producer.admin.ListQueues(a.ListQueuesRequest())).queues
    assert [q.queue for q in listed] == ["other", QUEUE]
    other, stats = listed
    assert (other.queued, other.active, other.workers, other.paused) == (1, 0, 0, False)
    assert [(b.priority, b.queued) for b in other.bands] == [(5, 1)]
    assert_live_counts(stats, QUEUE)


async def test_a_queue_only_a_worker_serves_is_known(producer: Producer, start_worker: StartWorker) -> None:
    await start_worker(queues=("idle",))

    async def listed() -> a.GetQueueStatsResponse | None:
        try:
            return await producer.admin.GetQueueStats(a.GetQueueStatsRequest(queue="idle"))
        except grpc.aio.AioRpcError:
            return None

    got = await wait_for(listed, "the idle queue known through its worker")
    assert (got.stats.queued, got.stats.workers) == (0, 1)
    assert [q.queue for q in (await producer.admin.ListQueues(a.ListQueuesRequest())).queues] == ["idle"]


async def test_unknown_queue_is_not_found_and_bad_names_are_invalid(producer: Producer) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await producer.admin.GetQueueStats(a.GetQueueStatsRequest(queue="never-used"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "never-used" in (err.value.details() or "")

    for bad in ("", "has space", "x" * 65):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await producer.admin.GetQueueStats(a.GetQueueStatsRequest(queue=bad))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert bad_fields(err.value) == ["queue"]

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await producer.admin.ListWorkers(a.ListWorkersRequest(queue="no/slash"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_fields(err.value) == ["queue"]


async def test_an_unreachable_results_service_leaves_the_live_counts(
    redis_url: str, producer: Producer, start_worker: StartWorker
) -> None:
    await producer.stub.Enqueue(p.EnqueueRequest(queue=QUEUE, type="test.count", priority=7))
    # Nothing listens on port 1.
    lonely, stop = await start_producer(redis_url, results_addr="127.0.0.1:1")
    try:
        got = await lonely.admin.GetQueueStats(a.GetQueueStatsRequest(queue=QUEUE))
    finally:
        await stop()
    assert (got.stats.queued, [(b.priority, b.queued) for b in got.stats.bands]) == (1, [(7, 1)])
    assert not got.HasField("finished")
    assert "results service is unavailable" in got.finished_unavailable


async def test_list_workers_shows_each_worker_and_its_jobs_in_flight(
    producer: Producer, start_worker: StartWorker
) -> None:
    first = await start_worker(queues=(QUEUE,), concurrency=3)
    await start_worker(queues=("other", QUEUE), concurrency=7)
    setup = await fill_every_state(producer.stub, producer.admin, QUEUE)

    async def both_listed() -> list[a.WorkerInfo] | None:
        workers = list((await producer.admin.ListWorkers(a.ListWorkersRequest())).workers)
        in_flight = sum(w.in_flight for w in workers)
        return workers if len(workers) == 2 and in_flight == 3 else None

    workers = await wait_for(both_listed, "two workers listed with the 3 gated jobs in flight")
    assert [w.worker_id for w in workers] == ["test-worker-1", "test-worker-2"]
    assert [list(w.queues) for w in workers] == [[QUEUE], ["other", QUEUE]]
    assert [w.concurrency for w in workers] == [3, 7]
    assert sorted(j for w in workers for j in w.job_ids) == sorted(setup.active)
    for w in workers:
        assert w.in_flight == len(w.job_ids)
        assert w.pid > 0 and w.host and w.version
        assert w.started_time.ToNanoseconds() <= w.last_heartbeat_time.ToNanoseconds()
        assert w.ttl.ToMilliseconds() == 10_000

    only_other = (await producer.admin.ListWorkers(a.ListWorkersRequest(queue="other"))).workers
    assert [w.worker_id for w in only_other] == ["test-worker-2"]
    assert (await producer.admin.GetQueueStats(a.GetQueueStatsRequest(queue=QUEUE))).stats.workers == 2

    # A worker that stops cleanly leaves the list at once.
    test_handlers.gate.set()
    await first.stop()
    remaining = (await producer.admin.ListWorkers(a.ListWorkersRequest())).workers
    assert [w.worker_id for w in remaining] == ["test-worker-2"]


async def test_the_python_client(producer: Producer, start_worker: StartWorker) -> None:
    await start_worker(queues=(QUEUE,), concurrency=3)
    await fill_every_state(producer.stub, producer.admin, QUEUE)
    async with ConveyorClient(producer.addr) as client:
        got = await client.get_queue_stats(QUEUE)
        assert_live_counts(got.stats, QUEUE)
        assert got.finished_unavailable
        assert [q.queue for q in await client.list_queues()] == [QUEUE]
        workers = await client.list_workers(QUEUE)
        assert [w.worker_id for w in workers] == ["test-worker-1"]
        with pytest.raises(NotFound):
            await client.get_queue_stats("nope")


async def test_claims_of_a_worker_that_left_are_orphaned(producer: Producer, start_worker: StartWorker) -> None:
    # A long visibility timeout: nobody takes the claims over during the test.
    leaving = await start_worker(queues=(QUEUE,), concurrency=2, shutdown_grace_s=0.2, visibility_timeout_s=600)
    for _ in range(2):
        await producer.stub.Enqueue(p.EnqueueRequest(queue=QUEUE, type="test.gate"))

    async def running() -> a.QueueStats | None:
        s = (await producer.admin.GetQueueStats(a.GetQueueStatsRequest(queue=QUEUE))).stats
        return s if s.active == 2 else None

    before = await wait_for(running, "both gated jobs running")
    assert (before.orphaned, before.workers) == (0, 1)

    # Stopping with the gate closed abandons both attempts (their claims stay pending) and deregisters.
    await leaving.stop()
    after = (await producer.admin.GetQueueStats(a.GetQueueStatsRequest(queue=QUEUE))).stats
    assert (after.active, after.orphaned, after.workers, after.queued) == (2, 2, 0, 0)

    # A new worker under another id is live, but it does not hold those claims: still orphaned.
    await start_worker(queues=(QUEUE,), visibility_timeout_s=600)
    await wait_for(lambda: _workers(producer, 1), "the new worker registered")
    again = (await producer.admin.GetQueueStats(a.GetQueueStatsRequest(queue=QUEUE))).stats
    assert (again.active, again.orphaned, again.workers) == (2, 2, 1)


async def _workers(producer: Producer, n: int) -> bool:
    return len((await producer.admin.ListWorkers(a.ListWorkersRequest())).workers) == n
