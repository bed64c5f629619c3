"""The worker's loop: claim jobs in batches, run them with bounded concurrency, record outcomes in batches.

Per queue, a claimer calls the claim script for as many jobs as there are free
slots (highest priority first) and, when the queue is empty, blocks on the job
streams for new entries; finished attempts go to a completer that records many
outcomes per round trip, each acked atomically with its event (invariant 3).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import socket
import threading
import time
from collections.abc import Coroutine
from importlib import metadata
from typing import Any

import structlog

from conveyor.common import metrics, tracing
from conveyor.common.faults import is_transient
from conveyor.common.ids import ulid_time_ms
from conveyor.common.introspection import WorkerRegistry
from conveyor.common.keys import QueueKeys, queue_keys
from conveyor.common.redis import REDIS_UNAVAILABLE, RedisClient, xread
from conveyor.common.scripts import Claimed, ClaimResult, Heartbeat, Outcome, Scripts
from conveyor.common.settings import WorkerSettings
from conveyor.common.supervise import LoopStatus, Supervisor
from conveyor.v1 import admin_service_pb2, event_pb2, job_pb2
from conveyor.worker.execute import Attempt, Cancellation, run_attempt
from conveyor.worker.handlers import Handlers
from conveyor.worker.threads import ThreadPool

log = structlog.get_logger("conveyor.worker")

try:
    _VERSION = metadata.version("conveyor-worker")
except metadata.PackageNotFoundError:  # running from a source tree without the package installed
    _VERSION = "unknown"

MAX_CLAIM = 100
MAX_COMPLETE = 500
MAINTENANCE_INTERVAL_S = 1.0
EXPIRE_BATCH = 1000


async def _traced_attempt(
    tracer: tracing.Tracer, attempt: Attempt, worker_id: str, run: Coroutine[Any, Any, tuple[int, bytes, int]]
) -> tuple[int, bytes, int]:
    """Run ``run`` (the attempt) inside a ``process {queue}`` CONSUMER span (ADR 0018).

    The span is a child of the job's creation context (the producer's send span, carried in the
    stored Job) and links to it, as the messaging conventions advise for one message at a time.
    It is the current span while the handler runs: an async handler's spans, and a sync
    handler's (the pool runs it in a copy of this context), are its children.
    """
    job = attempt.job
    creation = tracing.job_context(job.traceparent, job.tracestate)
    attributes = tracing.messaging_attributes(job.queue, "process", job.id)
    attributes["messaging.consumer.group.name"] = tracing.CONSUMER_GROUP
    attributes["messaging.client.id"] = worker_id
    attributes["conveyor.job.type"] = job.type
    attributes["conveyor.job.attempt"] = attempt.attempt
    with tracer.start_as_current_span(
        f"process {job.queue}",
        context=creation,
        kind=tracing.SpanKind.CONSUMER,
        attributes=attributes,
        links=tracing.links_to(creation),
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        state, event_bytes, due_ms = await run
        span.set_attribute("conveyor.job.state", job_pb2.JobState.Name(state))  # type: ignore[arg-type]
        if state != job_pb2.JOB_STATE_SUCCEEDED:
            error = event_pb2.JobEvent.FromString(event_bytes).error
            tracing.fail(span, error.kind or "Error", error.message)
    return state, event_bytes, due_ms


class Slots:
    """The worker's concurrency: a hard limit across all its queues and maintenance.

    A slot is reserved *before* the claim (or reclaim, or recovery) that may fill it, and
    whatever the claim did not fill is given back at once: the sum of running attempts and
    outstanding reservations never exceeds ``size``. A slot is given back when its attempt's
    outcome is recorded (or its attempt crashed), which for a sync handler is never before its
    thread (or child process) has really ended.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        #: Slots reserved or filled.
        self.busy = 0
        self._changed = asyncio.Event()

    @property
    def free(self) -> int:
        return self.size - self.busy

    def reserve(self, n: int) -> int:
        """Reserve up to ``n`` free slots now; returns how many were reserved (maybe 0)."""
        got = max(0, min(n, self.free))
        self.busy += got
        return got

    def settle(self, reserved: int, used: int) -> None:
        """A claim that reserved ``reserved`` slots started ``used`` jobs: give back the difference."""
        if used > reserved:  # never expected (the scripts take a count): count them all the same
            log.error("claim_exceeded_reservation", reserved=reserved, used=used)
            self.busy += used - reserved
        else:
            self.give(reserved - used)

    def give(self, n: int = 1) -> None:
        """Give back ``n`` slots (an unused reservation, or an attempt that ended)."""
        if n <= 0:
            return
        self.busy -= n
        if self.busy < 0:  # a bug: never let the limit grow
            log.error("slots_given_back_twice", busy=self.busy)
            self.busy = 0
        self._changed.set()

    async def wait_free(self) -> None:
        while self.free <= 0:
            self._changed.clear()
            await self._changed.wait()


class _Backoff:
    def __init__(self) -> None:
        self.delay = 0.05

    async def sleep(self) -> None:
        await asyncio.sleep(self.delay)
        self.delay = min(self.delay * 2, 2.0)

    def reset(self) -> None:
        self.delay = 0.05


class QueueRunner:
    """Claims and runs the jobs of one queue."""

    def __init__(
        self,
        keys: QueueKeys,
        redis: RedisClient,
        wait_redis: RedisClient,
        scripts: Scripts,
        handlers: Handlers,
        settings: WorkerSettings,
        slots: Slots,
        supervisor: Supervisor | None = None,
        pool: ThreadPool | None = None,
    ) -> None:
        self._keys = keys
        self._pool = pool or ThreadPool(settings.concurrency)
        self._redis = redis
        self._wait_redis = wait_redis
        self._scripts = scripts
        self._handlers = handlers
        self._settings = settings
        self._slots = slots
        #: Outcomes of ended attempts, not yet taken by the completer; ``_outcome_ready`` wakes it.
        self._outcomes: list[Outcome] = []
        self._outcome_ready = asyncio.Event()
        #: Claims held until their outcome is recorded (entry id -> claim); the heartbeat reads it.
        self.active: dict[str, Claimed] = {}
        #: Entries whose outcome is being recorded: a heartbeat that finds them no longer ACTIVE is not a loss.
        self.completing: set[str] = set()
        #: Claim script calls so far (observability; tests use it to know a claim has run).
        self.claims = 0
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._cancels: dict[str, Cancellation] = {}
        self._retention_ms = int(settings.retention_s * 1000)
        self._supervisor = supervisor or Supervisor()
        #: Outcomes taken for recording and not yet recorded: kept across a restart of the loop.
        self._recording: list[Outcome] = []

    def status(self, loop: str) -> LoopStatus:
        """The supervisor's status of this queue's ``loop`` ("claim", "complete", "maintain")."""
        return self._supervisor.status(f"{loop}:{self._keys.queue}")

    async def claim_loop(self, stop: asyncio.Event) -> None:
        """Claim while there is room, until ``stop`` is set."""
        backoff = _Backoff()
        status = self.status("claim")
        consumer = self._settings.worker_id
        # Bound once for every attempt this loop starts: its tasks' contexts are copies of this one.
        structlog.contextvars.bind_contextvars(queue=self._keys.queue, worker=consumer)
        # At start (a restart under the same id, or of this loop) and after any failed claim (its
        # reply may have been lost after the script ran), take back the jobs our pending list says we hold.
        recover = True
        while not stop.is_set():
            await _until(stop, self._slots.wait_free())
            if stop.is_set():
                break
            # Reserve before claiming: the claim asks for no more than it got, the rest goes back.
            reserved = self._slots.reserve(MAX_CLAIM)
            if not reserved:
                continue  # another queue took the free slots between the wake-up and now
            try:
                if recover:
                    # Our own pending list may hold jobs we already run (a loop restart): ask for
                    # enough to see past them, start at most what is reserved; the rest are
                    # recovered on the next turn (or reclaimed by others, never lost).
                    found = await self._scripts.recover(self._keys, consumer, reserved + len(self.active))
                    mine = [c for c in found if c.entry_id not in self.active][:reserved]
                    recover = len(found) >= reserved + len(self.active) and bool(mine)
                    if mine:
                        log.warning("jobs_recovered", queue=self._keys.queue, count=len(mine))
                        self._slots.settle(reserved, len(mine))
                        reserved = 0
                        self._start(mine)
                        continue
                result = await self._scripts.claim(self._keys, consumer, reserved)
                self.claims += 1
                backoff.reset()
                status.ok()
            except Exception as exc:
                self._slots.give(reserved)
                if not is_transient(exc):
                    raise  # a bug: the supervisor logs it and restarts the loop (which recovers first)
                log.warning("claim_failed_redis_unavailable", queue=self._keys.queue, error=str(exc))
                status.failed(exc)
                recover = True
                await _until(stop, backoff.sleep())
                continue
            except BaseException:  # cancelled while claiming: give the reservation back
                self._slots.give(reserved)
                raise
            self._slots.settle(reserved, len(result.claimed))
            if result.claimed:
                self._start(result.claimed)
            else:
                await _until(stop, self._wait_for_work(result))

    async def _wait_for_work(self, result: ClaimResult) -> None:
        """Block until a stream has an entry newer than when the claim found none, or a delayed job is due.

        The signal stream wakes us when a delayed job or a retry is scheduled, so the
        wait is recomputed; nothing busy-polls.
        """
        block_ms = int(self._settings.poll_interval_s * 1000)
        if result.next_due_ms is not None:
            block_ms = max(1, min(block_ms, result.next_due_ms - time.time_ns() // 1_000_000 + 1))
        try:
            # Every key waited on is of this queue: one hash slot, one command on a cluster too.
            await xread(self._wait_redis, dict(result.wait_from), count=1, block=block_ms)
        except Exception as exc:
            if not is_transient(exc):
                raise
            log.warning("wait_failed_redis_unavailable", queue=self._keys.queue, error=str(exc))
            self.status("claim").failed(exc)
            await asyncio.sleep(0.5)

    def _start(self, claimed: list[Claimed]) -> None:
        """Run claimed jobs; each holds a slot its claim reserved (Slots.reserve) until its outcome is recorded.

        One task per attempt and nothing else per job: no done-callbacks (the attempt's own
        coroutine lets go of a claim it crashed on), no queue wake-up (see _run).
        """
        active, cancels, tasks, create_task, run = (
            self.active,
            self._cancels,
            self._tasks,
            asyncio.create_task,
            self._run,
        )
        for c in claimed:
            active[c.entry_id] = c
            cancellation = cancels[c.entry_id] = Cancellation()
            tasks[c.entry_id] = create_task(run(c, cancellation))

    def _attempt_crashed(self, claimed: Claimed, exc: BaseException) -> None:
        """An attempt that failed without an outcome to record lets go of its claim.

        Its claim is no longer renewed (it is reclaimed after the visibility timeout, as if
        this worker had died) and its slot is free: nothing stays ACTIVE forever on a live worker.
        """
        log.error(
            "attempt_crashed",
            queue=self._keys.queue,
            job_id=f"{self._keys.queue}/{claimed.ulid}",
            attempt=claimed.attempt,
            exc_info=exc,
        )
        if self.active.pop(claimed.entry_id, None) is not None:
            self._tasks.pop(claimed.entry_id, None)
            self._cancels.pop(claimed.entry_id, None)
            self._slots.give(1)

    def request_cancel(self, entry_id: str, reason: str) -> None:
        """CancelJob asked this running attempt to stop (called on the loop by the heartbeat thread)."""
        cancellation, task = self._cancels.get(entry_id), self._tasks.get(entry_id)
        if cancellation is None or task is None or cancellation.requested.is_set():
            return
        if cancellation.request(reason):  # an async handler: cancel its task; a thread or child is woken
            task.cancel()

    @property
    def keys(self) -> QueueKeys:
        return self._keys

    async def _run(self, claimed: Claimed, cancellation: Cancellation) -> None:
        try:
            outcome = await self._attempt(claimed, cancellation)
        except Exception as exc:  # a bug (CancelledError, the worker stopping, is not one: it propagates)
            self._attempt_crashed(claimed, exc)
            return
        outcomes = self._outcomes
        outcomes.append(outcome)
        if len(outcomes) == 1:  # the completer waits only when it found none: one wake-up per batch
            self._outcome_ready.set()

    async def _attempt(self, claimed: Claimed, cancellation: Cancellation) -> Outcome:
        queue = self._keys.queue
        job = job_pb2.Job.FromString(claimed.job)
        job.id = job_id = f"{queue}/{claimed.ulid}"
        job.queue = queue
        job_type, rate_key, number = job.type, job.rate_key, claimed.attempt
        attempt = Attempt(job=job, job_bytes=claimed.job, attempt=number)
        worker_id = self._settings.worker_id
        # Each attempt runs in its own task, whose context is a copy of its loop's, where queue
        # and worker are bound already: bind the rest without unbinding.
        structlog.contextvars.bind_contextvars(job_id=job_id, type=job_type, attempt=number)

        async def report(percent: float, message: str) -> None:
            event = event_pb2.JobEvent(type=event_pb2.EVENT_TYPE_PROGRESS, attempt=number, worker=worker_id)
            event.progress.percent = percent
            event.progress.message = message
            event.time.FromNanoseconds(time.time_ns())
            try:
                await self._scripts.progress(self._keys, worker_id, claimed.ulid, number, event.SerializeToString())
            except Exception as exc:
                if not is_transient(exc):
                    raise
                # Progress is best effort: a Redis blip must not fail the attempt; the outcome is what counts.
                log.warning("progress_dropped", error=str(exc))

        async def back_off(seconds: float, whole_queue: bool) -> None:
            key = "" if whole_queue else rate_key
            await self._scripts.back_off(self._keys, key, max(1, round(seconds * 1000)))
            log.info("backed_off", rate_key=key, seconds=seconds)

        wait_s = None
        if number == 1:
            due_ms = ulid_time_ms(claimed.ulid)
            if job.HasField("run_at"):
                due_ms = max(due_ms, job.run_at.ToMilliseconds())
            wait_s = max(0.0, time.time() - due_ms / 1000)
        metrics.tally.started(queue, job_type, wait_s)
        began = time.monotonic()
        if tracing.tracer is None:
            state, event_bytes, due_ms = await run_attempt(
                attempt, self._handlers, worker_id, report, cancellation, back_off, self._pool
            )
        else:
            state, event_bytes, due_ms = await _traced_attempt(
                tracing.tracer,
                attempt,
                worker_id,
                run_attempt(attempt, self._handlers, worker_id, report, cancellation, back_off, self._pool),
            )
        metrics.tally.ended(queue, job_type, state, time.monotonic() - began)
        return Outcome(claimed.band, claimed.entry_id, claimed.ulid, number, state, event_bytes, due_ms, rate_key)

    async def complete_loop(self, stop: asyncio.Event, drained: asyncio.Event) -> None:
        """Record outcomes in batches until ``drained`` is set and none is left.

        The batch being recorded lives on ``self`` so that when this loop fails and the
        supervisor restarts it, the same outcomes are recorded (fenced and idempotent), never dropped.
        """
        backoff = _Backoff()
        status = self.status("complete")
        while True:
            batch = self._recording
            if not batch:
                outcomes = self._outcomes
                if not outcomes:
                    if drained.is_set():
                        return
                    self._outcome_ready.clear()
                    getter = asyncio.ensure_future(self._outcome_ready.wait())
                    drainer = asyncio.ensure_future(drained.wait())
                    await asyncio.wait([getter, drainer], return_when=asyncio.FIRST_COMPLETED)
                    drainer.cancel()
                    getter.cancel()
                    continue
                batch += outcomes[:MAX_COMPLETE]
                del outcomes[:MAX_COMPLETE]
            self.completing.update(o.entry_id for o in batch)
            # The figures of these attempts are tallied; their flush is due this loop turn, but the
            # outcomes must not be visible before them (a scrape between the two).
            metrics.tally.flush()
            try:
                results = await self._scripts.complete(self._keys, self._settings.worker_id, self._retention_ms, batch)
                backoff.reset()
                status.ok()
            except Exception as exc:
                if not is_transient(exc):
                    raise
                # The entries stay pending: retrying the same outcomes is safe (fenced, idempotent),
                # and their claims are still renewed meanwhile: their outcomes are being written.
                log.warning("complete_failed_redis_unavailable", queue=self._keys.queue, error=str(exc))
                status.failed(exc)
                await backoff.sleep()
                continue
            for outcome, event_id in zip(batch, results, strict=True):
                self.active.pop(outcome.entry_id, None)
                self.completing.discard(outcome.entry_id)
                self._tasks.pop(outcome.entry_id, None)
                self._cancels.pop(outcome.entry_id, None)
                if event_id is None:
                    log.warning(
                        "job_outcome_refused",
                        queue=self._keys.queue,
                        ulid=outcome.ulid,
                        reason="the claim moved to another worker",
                    )
            self._slots.give(len(batch))
            self._recording = []

    async def maintain(self, stop: asyncio.Event) -> None:
        """On a timer: take over jobs of dead workers, and expire finished records (idle queues too)."""
        settings = self._settings
        status = self.status("maintain")
        # Bound once for the attempts it starts (reclaimed jobs), as the claim loop does.
        structlog.contextvars.bind_contextvars(queue=self._keys.queue, worker=settings.worker_id)
        visibility_s = settings.visibility_for(self._keys.queue)
        interval = min(MAINTENANCE_INTERVAL_S, visibility_s / 4)
        while not stop.is_set():
            try:
                reserved = self._slots.reserve(MAX_CLAIM)
                if reserved:
                    try:
                        claimed, dead = await self._scripts.reclaim(
                            self._keys,
                            settings.worker_id,
                            int(visibility_s * 1000),
                            reserved,
                            settings.max_deliveries,
                            self._retention_ms,
                        )
                    except BaseException:
                        self._slots.give(reserved)
                        raise
                    self._slots.settle(reserved, len(claimed))
                    if claimed:
                        log.warning("jobs_reclaimed", queue=self._keys.queue, count=len(claimed))
                        self._start(claimed)
                    for ulid in dead:
                        log.error("job_dead_lettered", queue=self._keys.queue, job_id=f"{self._keys.queue}/{ulid}")
                while await self._scripts.expire_records(self._keys, EXPIRE_BATCH) == EXPIRE_BATCH:
                    pass
                status.ok()
            except Exception as exc:
                if not is_transient(exc):
                    raise
                log.warning("maintenance_failed_redis_unavailable", queue=self._keys.queue, error=str(exc))
                status.failed(exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)

    async def drain(self, grace_s: float) -> None:
        """Let running attempts finish within ``grace_s``; cancel the rest (their entries stay pending)."""
        running = {task for task in self._tasks.values() if not task.done()}
        if running:
            _, pending = await asyncio.wait(running, timeout=grace_s)
            for task in pending:
                task.cancel()
            if pending:
                log.warning("jobs_abandoned_at_shutdown", queue=self._keys.queue, count=len(pending))
                await asyncio.gather(*pending, return_exceptions=True)

    def abandon_unrecorded(self) -> None:
        """Stop heartbeating claims whose outcome was not recorded: others reclaim them."""
        self.active.clear()
        self._tasks.clear()
        self._cancels.clear()


async def _until(stop: asyncio.Event, work: object) -> None:
    """Await ``work`` (a coroutine) but give up as soon as ``stop`` is set."""
    task = asyncio.ensure_future(work)  # type: ignore[call-overload]
    stopper = asyncio.ensure_future(stop.wait())
    await asyncio.wait([task, stopper], return_when=asyncio.FIRST_COMPLETED)
    stopper.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, *REDIS_UNAVAILABLE):
            await task


class Runner:
    """Runs every configured queue with one shared concurrency limit.

    Args:
        redis: Client for scripts.
        wait_redis: Client for blocking reads (no socket timeout).
        scripts: Scripts on ``redis``.
        handlers: The job handlers.
        settings: Worker settings (queues, concurrency, worker id, retention, grace).
    """

    def __init__(
        self,
        redis: RedisClient,
        wait_redis: RedisClient,
        scripts: Scripts,
        handlers: Handlers,
        settings: WorkerSettings,
        heartbeat: Heartbeat,
        supervisor: Supervisor | None = None,
    ) -> None:
        self._settings = settings
        self._heartbeat = heartbeat
        self.supervisor = supervisor or settings.supervisor()
        self._registry = WorkerRegistry(heartbeat.client, settings.worker_id)
        self._started_ns = time.time_ns()
        #: One concurrency for all queues and maintenance, and one thread per slot for sync handlers.
        self.slots = Slots(settings.concurrency)
        self.pool = ThreadPool(settings.concurrency)
        self.queues = [
            QueueRunner(
                queue_keys(q), redis, wait_redis, scripts, handlers, settings, self.slots, self.supervisor, self.pool
            )
            for q in settings.queues
        ]

    def worker_info(self) -> admin_service_pb2.WorkerInfo:
        """What this worker reports in the registry (ListWorkers) with each heartbeat."""
        settings = self._settings
        job_ids = [f"{q.keys.queue}/{c.ulid}" for q in self.queues for c in list(q.active.values())]
        info = admin_service_pb2.WorkerInfo(
            worker_id=settings.worker_id,
            host=socket.gethostname(),
            pid=os.getpid(),
            queues=list(settings.queues),
            concurrency=settings.concurrency,
            in_flight=len(job_ids),
            job_ids=job_ids,
            version=_VERSION,
        )
        info.last_heartbeat_time.FromNanoseconds(time.time_ns())
        info.started_time.FromNanoseconds(self._started_ns)
        info.ttl.FromMilliseconds(int(settings.worker_ttl_s * 1000))
        return info

    def _register(self) -> None:
        """Register or refresh this worker in the registry (one round trip); a miss is retried next beat."""
        status = self.supervisor.status("registry")
        try:
            self._registry.beat(self.worker_info().SerializeToString(), int(self._settings.worker_ttl_s * 1000))
            status.ok()
        except Exception as exc:  # never kill the heartbeat thread
            log.warning("worker_registry_beat_failed", error=str(exc))
            status.failed(exc)

    def _beat(self, stopped: threading.Event, loop: asyncio.AbstractEventLoop) -> None:
        """Heartbeat thread: renew every held claim (every third of the visibility timeout, at
        most a second apart, which is also how soon a running attempt sees CancelJob), and this
        worker's registry entry (at least three times per its TTL).

        The thread is its own supervisor: an unexpected error is logged with its traceback and the
        beat starts again after a pause, for as long as the worker runs.
        """
        status = self.supervisor.status("heartbeat")
        while not stopped.is_set():
            try:
                self._beat_until(stopped, loop, status)
                return
            except Exception as exc:
                status.failed(exc)
                log.error("heartbeat_crashed", exc_info=exc)
                stopped.wait(status.next_delay())

    def _beat_until(self, stopped: threading.Event, loop: asyncio.AbstractEventLoop, status: LoopStatus) -> None:
        settings = self._settings
        interval = min(
            min(settings.visibility_for(q.keys.queue) for q in self.queues) / 3, 1.0, settings.worker_ttl_s / 3
        )
        self._register()
        while not stopped.wait(interval):
            self._register()
            failed = False
            for q in self.queues:
                claims = list(q.active.values())
                if not claims:
                    continue
                try:
                    held = self._heartbeat.beat(q.keys, self._settings.worker_id, claims)
                except Exception as exc:  # a missed beat is retried next interval; never kill the thread
                    log.warning("heartbeat_failed", queue=q.keys.queue, error=str(exc))
                    status.failed(exc)
                    failed = True
                    continue
                for c, answer in zip(claims, held, strict=True):
                    if isinstance(answer, str):  # CancelJob's reason
                        loop.call_soon_threadsafe(q.request_cancel, c.entry_id, answer)
                lost = [
                    c.ulid
                    for c, ok in zip(claims, held, strict=True)
                    if ok is False and c.entry_id in q.active and c.entry_id not in q.completing
                ]
                if lost:
                    log.warning("claims_lost", queue=q.keys.queue, count=len(lost), ulids=lost[:10])
            if not failed:
                # Every claim renewed, or none left to renew: a beat that failed before while this
                # worker held jobs must not keep health NOT_SERVING once it holds none.
                status.ok()

    async def run(self, stop: asyncio.Event) -> None:
        """Work until ``stop`` is set, then drain gracefully."""
        log.info("worker_started", worker=self._settings.worker_id, queues=list(self._settings.queues))
        drained = asyncio.Event()
        beating = threading.Event()
        heart = threading.Thread(
            target=self._beat, args=(beating, asyncio.get_running_loop()), name="conveyor-heartbeat", daemon=True
        )
        heart.start()
        sup = self.supervisor
        completers = [
            asyncio.create_task(
                sup.run(f"complete:{q.keys.queue}", functools.partial(q.complete_loop, stop, drained), stop)
            )
            for q in self.queues
        ]
        maintainers = [
            asyncio.create_task(sup.run(f"maintain:{q.keys.queue}", functools.partial(q.maintain, stop), stop))
            for q in self.queues
        ]
        try:
            await asyncio.gather(
                *(sup.run(f"claim:{q.keys.queue}", functools.partial(q.claim_loop, stop), stop) for q in self.queues)
            )
            await asyncio.gather(*(q.drain(self._settings.shutdown_grace_s) for q in self.queues))
        finally:
            drained.set()
            # Outcomes that cannot be recorded within the grace (Redis down) stay pending
            # in Redis and are reclaimed later: at-least-once, never lost.
            _, stuck = await asyncio.wait(completers, timeout=self._settings.shutdown_grace_s)
            for task in stuck:
                task.cancel()
            await asyncio.gather(*completers, *maintainers, return_exceptions=True)
            for q in self.queues:
                q.abandon_unrecorded()
            beating.set()
            self.pool.shutdown()
            await asyncio.to_thread(heart.join)
            try:
                await asyncio.to_thread(self._registry.deregister)
            except Exception as exc:  # its entry then expires after the TTL
                log.warning("worker_deregister_failed", error=str(exc))
        log.info("worker_stopped", worker=self._settings.worker_id)
