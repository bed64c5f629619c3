"""Every Redis key Conveyor uses, in one place.

All keys of one queue carry the hash tag ``{<queue>}`` so that a queue lives on a
single Redis Cluster slot (Lua scripts touch several of them at once) while
different queues spread across shards.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

PREFIX = "conveyor"
#: Consumer group of the workers on every job stream.
WORKER_GROUP = "workers"
#: Consumer group of the results service on every event stream.
RESULTS_GROUP = "results"
#: Priority bands, lowest to highest. Each band is its own stream.
MIN_PRIORITY = 1
MAX_PRIORITY = 9
#: The "band" of the admitted stream (claims from it carry this band).
ADMITTED_BAND = 10
DEFAULT_PRIORITY = 5
BANDS = tuple(range(MIN_PRIORITY, MAX_PRIORITY + 1))

#: Every queue ever used (discovery for the results service and operators).
QUEUES = f"{PREFIX}:queues"
#: ZSET queue name -> ms of its last registration (queue_registry.py): how long it has been idle.
#: Its hash tag ``{conveyor:queues}`` hashes exactly as the untagged ``conveyor:queues`` does, so
#: the two registry keys share one Redis Cluster slot and one script can write both (ADR 0026).
QUEUES_TOUCHED = f"{{{QUEUES}}}:touched"
#: Where QUEUES_TOUCHED was before ADR 0026 (another slot); moved by redis.migrate_registry at connect.
LEGACY_QUEUES_TOUCHED = f"{PREFIX}:queues:touched"


@dataclass(frozen=True, slots=True)
class QueueKeys:
    """The keys of one queue."""

    queue: str
    #: HASH job ulid -> live record (see scripts.Record).
    state: str
    #: STREAM of JobEvents (fields j=ulid, e=JobEvent bytes), read by Watch and the results service.
    events: str
    #: ZSET of finished job ulids, scored by the time their live record expires.
    done: str
    #: ZSET of delayed and retry-scheduled job ulids, scored by the ms they become due.
    delayed: str
    #: HASH ulid -> Job bytes of jobs waiting in ``delayed`` (they have no stream entry meanwhile).
    parked: str
    #: STREAM of wake-up signals (capped): a delayed job or a retry was scheduled.
    signal: str
    #: STREAM of dead letters: final failures and poison jobs (j=ulid, d=Job bytes, e=final JobEvent).
    dead: str
    #: HASH ulid -> reason, for running jobs asked to stop by CancelJob.
    cancel: str
    #: STRING present while the queue is paused (PauseQueue); kept until ResumeQueue.
    paused: str
    #: Job streams by priority band, lowest band first (fields j=ulid, d=Job bytes[, k=rate key]).
    bands: tuple[str, ...]
    #: STREAM through which a job held back by its key's limits starts once admitted ("band" 10):
    #: every entry is read in the step that adds it, so it is only ever pending or gone.
    admitted: str
    #: HASH of flow-control settings: rate, conc, key_rate, key_conc, rate:<key>, conc:<key>.
    limits: str
    #: ZSET rate key -> ms until which it starts nothing (rate window full, at its cap, backed off).
    blocked: str
    #: ZSET rate key -> order of its first held job, for keys with held jobs that may start now.
    ready: str
    #: HASH ulid -> rate key, for parked (delayed, retry-scheduled) and held jobs that have one
    #: (a job in a stream carries its key as the entry's field k).
    rate_keys: str
    #: LIST of the queue's recent start times (ms, newest first): its sliding rate window.
    starts: str
    #: STRING present (with a TTL) while the whole queue is backed off.
    backoff: str
    #: Prefix of the per-key keys: <prefix>held:<k> (ZSET of held ulids by order),
    #: <prefix>run:<k> (SET of running ulids), <prefix>starts:<k> (LIST, its rate window).
    per_key_prefix: str
    #: HASH job ulid -> its entry id in ``dead``: RetryDeadLetters / PurgeDeadLetters of one job
    #: find it without scanning the stream (written where jobs are dead-lettered, removed where
    #: they are retried or purged).
    dead_index: str
    #: ZSET of the retry-scheduled job ulids among ``delayed`` (same scores): queue stats count
    #: delayed and retry-scheduled jobs with two ZCARDs instead of reading every record.
    retrying: str

    def band(self, priority: int) -> str:
        """The job stream of one priority band."""
        return self.bands[priority - MIN_PRIORITY]

    def idempotency(self, key: str) -> str:
        """The key that remembers which job an idempotency key made."""
        return f"{PREFIX}:{{{self.queue}}}:idem:{key}"

    def script_keys(self) -> list[str]:
        """The fixed KEYS of every per-queue script (see the .lua headers for their positions)."""
        return [
            self.state,
            self.events,
            self.done,
            *self.bands,
            self.delayed,
            self.parked,
            self.signal,
            self.dead,
            self.cancel,
            self.paused,
            self.admitted,
            self.limits,
            self.blocked,
            self.ready,
            self.rate_keys,
            self.starts,
            self.backoff,
            self.dead_index,
            self.retrying,
        ]

    def held(self, rate_key: str) -> str:
        """ZSET of one rate key's jobs held back by its limits, in claim order."""
        return f"{self.per_key_prefix}held:{rate_key}"

    def running(self, rate_key: str) -> str:
        """SET of one rate key's running job ulids (what its cap counts; kept only while a cap applies)."""
        return f"{self.per_key_prefix}run:{rate_key}"

    def window(self, rate_key: str) -> str:
        """LIST of one rate key's recent start times, newest first (its rate limit's sliding window)."""
        return f"{self.per_key_prefix}starts:{rate_key}"


@lru_cache(maxsize=1024)
def queue_keys(queue: str) -> QueueKeys:
    """Keys of ``queue`` (cached: few queues, many calls; bounded, since any well-formed name a
    client sends in GetJob, Watch or CancelJob reaches it)."""
    base = f"{PREFIX}:{{{queue}}}"
    return QueueKeys(
        queue=queue,
        state=f"{base}:state",
        events=f"{base}:events",
        done=f"{base}:done",
        delayed=f"{base}:delayed",
        parked=f"{base}:parked",
        signal=f"{base}:signal",
        dead=f"{base}:dead",
        cancel=f"{base}:cancel",
        paused=f"{base}:paused",
        bands=tuple(f"{base}:jobs:{p}" for p in BANDS),
        admitted=f"{base}:jobs:admitted",
        limits=f"{base}:limits",
        blocked=f"{base}:blocked",
        ready=f"{base}:ready",
        rate_keys=f"{base}:ratekeys",
        starts=f"{base}:starts",
        backoff=f"{base}:backoff",
        per_key_prefix=f"{base}:key:",
        dead_index=f"{base}:dead:idx",
        retrying=f"{base}:retrying",
    )


#: SET of registered worker ids (ListWorkers). It and the entries below share the hash tag
#: ``{registry}``, so the registry lives on one Redis Cluster slot and one script can read it;
#: they start ``conveyor:workers:``, never ``conveyor:{``, so no queue's keys can collide with them.
WORKERS = f"{PREFIX}:workers:{{registry}}"


def worker_key(worker_id: str) -> str:
    """STRING: a live worker's WorkerInfo bytes, expiring unless its heartbeat refreshes it."""
    return f"{WORKERS}:{worker_id}"
