"""Pruning: finished jobs and their events leave PostgreSQL after CONVEYOR_PG_RETENTION_DAYS (issue 10, item 8).

One loop per results process, under the Supervisor; every ``interval_s`` it deletes finished
jobs older than the retention (by finished_at) with their job_events rows, ``batch`` jobs per
transaction, so no statement holds locks for long or bloats one transaction. Each batch's
transaction first takes a PostgreSQL advisory lock with pg_try_advisory_xact_lock: with several
results processes, one prunes at a time and the others skip the round. Jobs that are not
finished (finished_at NULL: queued, running, re-queued from the dead letters) are never pruned.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import timedelta
from typing import Any

import structlog
from psycopg_pool import AsyncConnectionPool

from conveyor.results.store import MIGRATION_LOCK

log = structlog.get_logger("conveyor.results.prune")

#: pg_advisory lock key of the prune loop (beside the migrations' key).
PRUNE_LOCK = MIGRATION_LOCK + 1

# One batch: the oldest finished jobs past the cutoff, their history rows, then the jobs.
# SKIP LOCKED: a row the projector is updating right now waits for the next round.
PRUNE_BATCH = """
WITH doomed AS (
    SELECT job_id FROM jobs
    -- The states of jobs_finished_idx's predicate (migration 0004): final, so finished_at is set.
    WHERE state IN (5, 6, 7, 8) AND finished_at < now() - %(age)s
    ORDER BY finished_at
    LIMIT %(batch)s
    FOR UPDATE SKIP LOCKED
), history AS (
    DELETE FROM job_events e USING doomed d WHERE e.job_id = d.job_id
), gone AS (
    DELETE FROM jobs j USING doomed d WHERE j.job_id = d.job_id RETURNING 1
)
SELECT count(*) FROM gone
"""


class Pruner:
    """Deletes finished jobs older than ``retention_days`` from PostgreSQL.

    Args:
        pool: An open pool on the results database.
        retention_days: Age (since finished_at) past which a job is deleted; 0 disables pruning.
        interval_s: Time between rounds.
        batch: Most jobs deleted per transaction.
    """

    def __init__(
        self,
        pool: AsyncConnectionPool[Any],
        retention_days: float,
        *,
        interval_s: float = 600.0,
        batch: int = 1000,
        connect_timeout_s: float = 5.0,
    ) -> None:
        self._pool = pool
        self._age = timedelta(days=retention_days)
        self._interval_s = interval_s
        self._batch = batch
        self._timeout = connect_timeout_s
        #: Jobs deleted since start.
        self.pruned = 0

    @property
    def enabled(self) -> bool:
        return self._age > timedelta(0)

    async def prune_once(self, stop: asyncio.Event | None = None) -> int | None:
        """One round: delete batch after batch until none is left. Returns the jobs deleted, or None
        when another process holds the prune lock (it is pruning: this round is skipped)."""
        total = 0
        while stop is None or not stop.is_set():
            async with self._pool.connection(self._timeout) as conn, conn.transaction():
                cur = await conn.execute("SELECT pg_try_advisory_xact_lock(%s)", (PRUNE_LOCK,))
                row = await cur.fetchone()
                if not (row and row[0]):
                    log.info("prune_skipped", reason="another results process is pruning")
                    return None if total == 0 else total
                cur = await conn.execute(PRUNE_BATCH, {"age": self._age, "batch": self._batch})
                row = await cur.fetchone()
                deleted = int(row[0]) if row else 0
            total += deleted
            self.pruned += deleted
            if deleted < self._batch:
                break
        if total:
            log.info("pruned", jobs=total, older_than_days=self._age.total_seconds() / 86400)
        return total

    async def run(self, stop: asyncio.Event) -> None:
        """Prune every ``interval_s`` until ``stop`` is set (errors end the call: the Supervisor restarts it)."""
        if not self.enabled:
            return
        while not stop.is_set():
            await self.prune_once(stop)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self._interval_s)
