"""Concurrent unary Enqueue calls to one queue share one enqueue script call (ADR 0032).

A unary Enqueue used to cost the producer a Redis round trip and a script call of its own:
about a quarter of its CPU per call, and Redis's per-call cost on top. Callers that arrive
while earlier writes to the same queue are still out wait for the next write and go in it
together, as a database's group commit does: one caller alone is written at once (nothing
waits on a timer), and the busier the queue, the more calls each write carries.

Each caller keeps what a unary Enqueue promises on its own: its request is validated in its
own call (a bad one is refused alone and nothing is written for it); its job is written
atomically with the others of the write (one Lua call: all or none, as a batch); when the
write fails, every caller in it gets the status a lone Enqueue would have got. Jobs of one
write keep their callers' arrival order, and two callers with the same idempotency key in one
write get the same job, as in an EnqueueBatch.
"""

from __future__ import annotations

import asyncio

from conveyor.common.enqueue import Enqueuer
from conveyor.common.validate import ValidJob
from conveyor.v1 import producer_service_pb2

Response = producer_service_pb2.EnqueueResponse
Waiter = tuple[ValidJob, "asyncio.Future[Response]"]

#: Writes of one queue out at once. More than one keeps Redis busy while a write's reply is on
#: its way back; a few are enough for the calls that arrive meanwhile to gather.
WRITES_IN_FLIGHT = 2


class _QueueWrites:
    __slots__ = ("in_flight", "waiting")

    def __init__(self) -> None:
        self.waiting: list[Waiter] = []
        self.in_flight = 0


class Coalescer:
    """Gathers the unary Enqueue calls of each queue into shared writes.

    Args:
        enqueuer: Validates and writes (its ``write`` is one script call per queue).
        max_jobs: Most jobs in one write (the producer's EnqueueBatch limit).
    """

    def __init__(self, enqueuer: Enqueuer, max_jobs: int, in_flight: int = WRITES_IN_FLIGHT) -> None:
        self._enqueuer = enqueuer
        self._max_jobs = max(1, max_jobs)
        self._in_flight = max(1, in_flight)
        self._queues: dict[str, _QueueWrites] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        #: Writes made so far and the jobs they carried (tests and the benchmark read them).
        self.writes = 0
        self.jobs = 0

    async def enqueue(self, request: producer_service_pb2.EnqueueRequest) -> Response:
        valid = self._enqueuer.validate_one(request)  # a bad request is refused here, alone
        queue = request.queue
        writes = self._queues.get(queue)
        if writes is None:
            writes = self._queues[queue] = _QueueWrites()
        if writes.in_flight < self._in_flight and not writes.waiting:
            # Room for a write and nobody waiting: this call writes its job itself, in its own
            # task, as a lone Enqueue always did (no task or future of its own to pay for).
            writes.in_flight += 1
            try:
                (response,) = await self._enqueuer.write([valid], batch=False)
                self.writes += 1
                self.jobs += 1
                return response
            finally:
                self._written(queue, writes)
        future: asyncio.Future[Response] = asyncio.get_running_loop().create_future()
        writes.waiting.append((valid, future))
        # A caller that goes away (cancelled, deadline) leaves its job to be written or not, as
        # a lone call cancelled during its script call would; the write skips its future.
        return await future

    def _written(self, queue: str, writes: _QueueWrites) -> None:
        """A write ended: the callers that gathered meanwhile go in the next one."""
        writes.in_flight -= 1
        if writes.waiting:
            self._start(queue, writes)
        elif not writes.in_flight:
            del self._queues[queue]

    def _start(self, queue: str, writes: _QueueWrites) -> None:
        batch, writes.waiting = writes.waiting[: self._max_jobs], writes.waiting[self._max_jobs :]
        writes.in_flight += 1
        task = asyncio.get_running_loop().create_task(self._write(queue, writes, batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _write(self, queue: str, writes: _QueueWrites, batch: list[Waiter]) -> None:
        try:
            # One queue's jobs: a failed write raises (batch=False), as a lone Enqueue's would.
            responses = await self._enqueuer.write([valid for valid, _ in batch], batch=False)
        except Exception as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
        except BaseException:  # the producer is stopping: its callers' calls end with it
            for _, future in batch:
                future.cancel()
            raise
        else:
            self.writes += 1
            self.jobs += len(batch)
            for (_, future), response in zip(batch, responses, strict=True):
                if not future.done():
                    future.set_result(response)
        finally:
            self._written(queue, writes)
