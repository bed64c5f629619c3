"""Prometheus metrics: `/metrics` on every service (issue #11 item 3).

Each process serves its own registry over HTTP on CONVEYOR_METRICS_ADDR (prometheus_client's
exposition server, in a daemon thread, so a scrape never waits on the event loop). What one
process counts (RPCs, jobs it ran, its slots) is exported by that process; what is the state of
the whole system (queue depths, the oldest waiting job, pending entries, projection lag) is read
from Redis when scraped, by the producer, at a bounded cost: at most CONVEYOR_METRICS_MAX_QUEUES
queues, a fixed handful of commands each.

Names follow Prometheus conventions (`conveyor_` prefix, base units, `_total` counters). Label
values that come from clients (queue, job type) are bounded: past MAX_LABEL_VALUES distinct values
a label reads "other", so a caller inventing names cannot grow the registry without bound.
"""

from __future__ import annotations

import asyncio
import bisect
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import grpc
from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from conveyor.common.introspection import QueueSnapshot, snapshot_of
from conveyor.common.keys import QUEUES, RESULTS_GROUP, WORKER_GROUP, queue_keys
from conveyor.common.scripts import _source, _text

#: Distinct values one client-chosen label may take in one process before it reads "other".
MAX_LABEL_VALUES = 200
OTHER = "other"

_DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)

RPCS = Counter("conveyor_rpc_requests", "gRPC calls served, by method and status code.", ["method", "code"])
RPC_SECONDS = Histogram(
    "conveyor_rpc_duration_seconds",
    "Time to serve a gRPC call (a stream: its whole life).",
    ["method"],
    buckets=_DURATION_BUCKETS,
)
JOBS = Counter(
    "conveyor_jobs",
    "Jobs by what happened to them in this process: enqueued (producer); started, succeeded, failed, "
    "retried, dead_lettered, cancelled (worker).",
    ["queue", "type", "event"],
)
HANDLER_SECONDS = Histogram(
    "conveyor_job_duration_seconds",
    "How long a handler ran, by queue, type and outcome.",
    ["queue", "type", "outcome"],
    buckets=_DURATION_BUCKETS,
)
WAIT_SECONDS = Histogram(
    "conveyor_job_wait_seconds",
    "From enqueue (or due time) to the start of the attempt, by queue.",
    ["queue"],
    buckets=_DURATION_BUCKETS,
)
SLOTS_IN_USE = Gauge("conveyor_worker_slots_in_use", "Jobs this worker runs now (its concurrency slots taken).")
SLOTS = Gauge("conveyor_worker_slots", "This worker's concurrency.")


class _Bounded:
    """Label values chosen by clients, capped at MAX_LABEL_VALUES distinct ones (then OTHER)."""

    def __init__(self) -> None:
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, value: str) -> str:
        if value in self._seen:
            return value
        with self._lock:
            if len(self._seen) >= MAX_LABEL_VALUES:
                return OTHER
            self._seen.add(value)
            return value


bounded_queue = _Bounded()
bounded_type = _Bounded()


#: Labelled children already made: prometheus_client's labels() validates, locks and builds a
#: tuple on every call (about 1.5 µs each); a job costs four of them. Label values are bounded
#: (OTHER past MAX_LABEL_VALUES), and only unfolded ones are kept, so these dicts are too.
_jobs: dict[tuple[str | None, ...], Any] = {}
_waits: dict[tuple[str | None, ...], Any] = {}
_durations: dict[tuple[str | None, ...], Any] = {}


def _child(cache: dict[tuple[str | None, ...], Any], metric: Any, queue: str, type_: str | None, *fixed: str) -> Any:
    """``metric``'s child for (queue, type, *fixed) with the client-chosen values bounded; cached."""
    key = (queue, type_, *fixed)
    child = cache.get(key)
    if child is None:
        values = [bounded_queue(queue)] if type_ is None else [bounded_queue(queue), bounded_type(type_)]
        child = metric.labels(*values, *fixed)
        if values == [v for v in (queue, type_) if v is not None]:  # folded into OTHER: not kept
            cache[key] = child
    return child


def job_event(queue: str, type_: str, event: str, n: int = 1) -> None:
    """Count ``n`` jobs of (queue, type) that had ``event`` (enqueued, started, succeeded...)."""
    _child(_jobs, JOBS, queue, type_, event).inc(n)


#: A final JobState's name in conveyor_jobs_total{event} and conveyor_job_duration_seconds{outcome}.
OUTCOMES = {4: "retried", 5: "succeeded", 6: "failed", 7: "dead_lettered", 8: "cancelled"}


def job_started(queue: str, type_: str, wait_s: float | None) -> None:
    """A worker started an attempt; ``wait_s`` is how long a first attempt waited since it was due."""
    _child(_jobs, JOBS, queue, type_, "started").inc()
    if wait_s is not None:
        _child(_waits, WAIT_SECONDS, queue, None).observe(wait_s)


def job_ended(queue: str, type_: str, state: int, seconds: float) -> None:
    """A worker's attempt ended in ``state`` (a JobState) after ``seconds`` of handler time."""
    outcome = OUTCOMES.get(state, "other")
    _child(_jobs, JOBS, queue, type_, outcome).inc()
    _child(_durations, HANDLER_SECONDS, queue, type_, outcome).observe(seconds)


class JobTally:
    """The worker's per-job figures, counted in plain dicts and added to the metrics once per loop turn.

    ``conveyor_jobs_total{started|<outcome>}``, ``conveyor_job_wait_seconds`` and
    ``conveyor_job_duration_seconds`` get exactly what :func:`job_started` and :func:`job_ended`
    would give them, but a job costs two dict updates and a ``bisect`` instead of four locked
    prometheus_client updates (about 5 µs; ADR 0029). The first tally of a loop turn schedules the
    flush with ``call_soon``, and the worker's completer flushes before it records a batch, so a
    recorded outcome is never ahead of its figures. Used on one event loop only (the worker's).
    """

    def __init__(self) -> None:
        self._counts: dict[tuple[str, str, str], int] = {}
        #: (histogram, queue, type or None, *fixed) -> [count per bucket..., sum]
        self._observed: dict[tuple[Any, ...], list[float]] = {}
        self._scheduled = False

    def started(self, queue: str, type_: str, wait_s: float | None) -> None:
        """As :func:`job_started`."""
        key = (queue, type_, "started")
        self._counts[key] = self._counts.get(key, 0) + 1
        if wait_s is not None:
            self._observe((WAIT_SECONDS, queue, None), wait_s)
        if not self._scheduled:
            self._schedule()

    def ended(self, queue: str, type_: str, state: int, seconds: float) -> None:
        """As :func:`job_ended`."""
        outcome = OUTCOMES.get(state, "other")
        key = (queue, type_, outcome)
        self._counts[key] = self._counts.get(key, 0) + 1
        self._observe((HANDLER_SECONDS, queue, type_, outcome), seconds)
        if not self._scheduled:
            self._schedule()

    def _observe(self, key: tuple[Any, ...], amount: float) -> None:
        tally = self._observed.get(key)
        if tally is None:
            tally = self._observed[key] = [0.0] * (len(_BOUNDS) + 1)
        # prometheus_client's observe counts the first bucket whose bound is >= amount: bisect_left.
        tally[bisect.bisect_left(_BOUNDS, amount)] += 1
        tally[-1] += amount

    def _schedule(self) -> None:
        self._scheduled = True
        try:
            asyncio.get_running_loop().call_soon(self.flush)
        except RuntimeError:  # no loop (a test calling it directly): at once
            self.flush()

    def flush(self) -> None:
        """Add what was counted since the last flush to the Prometheus metrics."""
        self._scheduled = False
        if not self._counts and not self._observed:
            return
        counts, self._counts = self._counts, {}
        observed, self._observed = self._observed, {}
        for (queue, type_, event), n in counts.items():
            _child(_jobs, JOBS, queue, type_, event).inc(n)
        for (metric, queue, type_, *fixed), tally in observed.items():
            child = _child(_waits if metric is WAIT_SECONDS else _durations, metric, queue, type_, *fixed)
            # The child's own values, as its observe() would update them (one lock each, per turn).
            for i, hits in enumerate(tally[:-1]):
                if hits:
                    child._buckets[i].inc(hits)
            child._sum.inc(tally[-1])


#: The upper bounds of the job histograms' buckets, +Inf last (as prometheus_client keeps them).
_BOUNDS = [*map(float, _DURATION_BUCKETS), float("inf")]

#: The worker's tally (one event loop per process).
tally = JobTally()


_rpcs: dict[tuple[str, grpc.StatusCode], Any] = {}
_rpc_seconds: dict[str, Any] = {}


def rpc_finished(method: str, code: grpc.StatusCode, seconds: float) -> None:
    """Count one served call (method names are the server's own: bounded, and so are these caches)."""
    counter = _rpcs.get((method, code))
    if counter is None:
        counter = _rpcs[(method, code)] = RPCS.labels(method, code.name)
    counter.inc()
    timer = _rpc_seconds.get(method)
    if timer is None:
        timer = _rpc_seconds[method] = RPC_SECONDS.labels(method)
    timer.observe(seconds)


def serve(addr: str) -> Callable[[], None] | None:
    """Serve this process's metrics on ``addr`` ("host:port"; "" or "off": not at all).

    Returns what stops the HTTP server and closes its socket, or None.
    """
    if not addr or addr == "off":
        return None
    host, _, port = addr.rpartition(":")
    server, thread = start_http_server(int(port), addr=host or "0.0.0.0")

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(5)

    return stop


class QueueCollector(Collector):
    """Every known queue's live state, read from Redis at scrape time (the producer registers it).

    Bounded: the first ``max_queues`` queues by name (the rest counted in
    conveyor_queues_not_exported); per queue one queue_stats script call and three commands for
    the projection lag. A Redis fault makes the scrape report conveyor_queue_scrape_ok 0 and
    nothing else, never an error page.
    """

    def __init__(self, client: Any, max_queues: int = 200) -> None:
        #: A synchronous redis-py client: collect() runs in the exposition server's thread.
        self._client = client
        self._max = max_queues
        self._stats = client.register_script(_source("queue_stats"))

    def describe(self) -> Iterable[Any]:
        return []  # collected on demand only: no Redis call at registration

    def collect(self) -> Iterator[Any]:
        ok = GaugeMetricFamily("conveyor_queue_scrape_ok", "1 when the queue metrics could be read from Redis.")
        try:
            families = self._read()
        except Exception:
            ok.add_metric([], 0)
            yield ok
            return
        ok.add_metric([], 1)
        yield ok
        yield from families

    def _read(self) -> list[Any]:
        names = sorted(m.decode() for m in self._client.smembers(QUEUES))
        shown, hidden = names[: self._max], max(0, len(names) - self._max)
        jobs = GaugeMetricFamily("conveyor_queue_jobs", "Jobs in each state now, by queue.", labels=["queue", "state"])
        backlog = GaugeMetricFamily(
            "conveyor_queue_backlog",
            "Jobs ready to start and waiting for a worker (queued + held back by limits): what an "
            "autoscaler scales workers on.",
            labels=["queue"],
        )
        paused = GaugeMetricFamily("conveyor_queue_paused", "1 while the queue is paused.", labels=["queue"])
        oldest = GaugeMetricFamily(
            "conveyor_queue_oldest_waiting_seconds", "Age of the oldest job waiting to be claimed.", labels=["queue"]
        )
        pending = GaugeMetricFamily(
            "conveyor_queue_pending_entries", "Stream entries claimed by workers and not yet acked.", labels=["queue"]
        )
        lag = GaugeMetricFamily(
            "conveyor_projection_lag_seconds",
            "Age of the oldest event of the queue not yet committed to PostgreSQL (0 when all are).",
            labels=["queue"],
        )
        for name in shown:
            keys = queue_keys(name)
            snap: QueueSnapshot = snapshot_of(self._stats(keys=keys.script_keys(), args=[WORKER_GROUP]))
            now_ms = snap.read_us / 1000
            queued, active = snap.queued, snap.active
            for state, value in (
                ("queued", queued),
                ("held", snap.held),
                ("delayed", snap.delayed),
                ("retry_scheduled", snap.retry_scheduled),
                ("active", active),
                ("dead_lettered", snap.dead_lettered),
            ):
                jobs.add_metric([name, state], value)
            backlog.add_metric([name], queued + snap.held)
            paused.add_metric([name], 1 if snap.paused else 0)
            oldest.add_metric([name], _age_s(snap.oldest_queued_id, now_ms))
            pending.add_metric([name], active)
            lag.add_metric([name], self._projection_lag(keys.events, now_ms))
        not_exported = GaugeMetricFamily(
            "conveyor_queues_not_exported", "Queues left out of these metrics (CONVEYOR_METRICS_MAX_QUEUES)."
        )
        not_exported.add_metric([], hidden)
        return [jobs, backlog, paused, oldest, pending, lag, not_exported]

    def _projection_lag(self, events: str, now_ms: float) -> float:
        """The oldest event the results service has not committed: pending for it, or not yet read."""
        client = self._client
        try:
            groups = client.xinfo_groups(events)
        except Exception as exc:
            if "no such key" in str(exc).lower():
                return 0.0
            raise
        group = next((g for g in groups if _text(g.get("name")) == RESULTS_GROUP), None)
        if group is None:
            first = client.xrange(events, count=1)
            return _age_s(_text(first[0][0]), now_ms) if first else 0.0
        oldest_ms: float | None = None
        summary = client.xpending(events, RESULTS_GROUP)
        if summary.get("pending"):
            oldest_ms = _ms(_text(summary["min"]))
        last = _text(group.get("last-delivered-id"))
        unread = client.xrange(events, min=f"({last}", count=1)
        if unread:
            ms = _ms(_text(unread[0][0]))
            oldest_ms = ms if oldest_ms is None else min(oldest_ms, ms)
        return 0.0 if oldest_ms is None else max(0.0, (now_ms - oldest_ms) / 1000)


def _ms(entry_id: str) -> float:
    return float(entry_id.split("-", 1)[0])


def _age_s(entry_id: str, now_ms: float) -> float:
    return max(0.0, (now_ms - _ms(entry_id)) / 1000) if entry_id else 0.0


def register_queue_collector(client: Any, max_queues: int) -> QueueCollector:
    """Export every queue's state from this process (the producer)."""
    collector = QueueCollector(client, max_queues)
    REGISTRY.register(collector)
    return collector
