"""The set-aside entries (projection_set_aside): list, replay into the jobs table, discard.

The projector keeps here every stream entry it could not fold because of its own data
(pgerrors: SQLSTATE class 22 or 23) or that was not a JobEvent at all. Nothing leaves this
table by itself: an operator replays an entry (after fixing the data, the schema or a
constraint) or discards it explicitly.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from psycopg_pool import AsyncConnectionPool

from conveyor.common.keys import queue_keys
from conveyor.results.projector import Batch
from conveyor.results.store import SetAside, Store

#: Most entries one replay step folds together (ReplaySetAside with all pages through them).
REPLAY_CHUNK = 500

_COLUMNS = "id, queue, job_id, entry_id, event, sqlstate, error, set_aside_at, replays, replayed_at"


@dataclass(frozen=True, slots=True)
class SetAsideRow:
    """One row of projection_set_aside."""

    id: int
    queue: str
    job_id: str
    entry_id: str
    event: bytes
    sqlstate: str
    error: str
    set_aside_at: datetime
    replays: int
    replayed_at: datetime | None


def _row(values: Any) -> SetAsideRow:
    return SetAsideRow(
        int(values[0]),
        values[1],
        values[2],
        values[3],
        bytes(values[4]),
        values[5],
        values[6],
        values[7],
        int(values[8]),
        values[9],
    )


def _stream_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


@dataclass
class ReplayOutcome:
    replayed: int
    refused: list[SetAsideRow]


class SetAsideRows:
    """Reads and changes projection_set_aside.

    Args:
        pool: An open connection pool on the results database.
        store: Writes replayed entries exactly as the projector does.
    """

    def __init__(self, pool: AsyncConnectionPool[Any], store: Store, connect_timeout_s: float = 5.0) -> None:
        self._pool = pool
        self._store = store
        self._timeout = connect_timeout_s

    async def page(self, queue: str, after_id: int, limit: int) -> list[SetAsideRow]:
        """Up to ``limit`` entries with an id above ``after_id`` (of ``queue`` when given), by id."""
        where = "id > %s" + (" AND queue = %s" if queue else "")
        params: tuple[Any, ...] = (after_id, queue, limit) if queue else (after_id, limit)
        async with self._pool.connection(self._timeout) as conn:
            cur = await conn.execute(
                f"SELECT {_COLUMNS} FROM projection_set_aside WHERE {where} ORDER BY id LIMIT %s",
                params,
            )
            return [_row(r) for r in await cur.fetchall()]

    async def get(self, ids: list[int]) -> list[SetAsideRow]:
        """The entries among ``ids`` that exist, by id."""
        async with self._pool.connection(self._timeout) as conn:
            cur = await conn.execute(
                f"SELECT {_COLUMNS} FROM projection_set_aside WHERE id = ANY(%s) ORDER BY id",
                (ids,),
            )
            return [_row(r) for r in await cur.fetchall()]

    async def discard(self, ids: list[int]) -> list[int] | None:
        """Delete every entry of ``ids``; None (and nothing deleted) when one of them does not exist."""
        wanted = set(ids)
        async with self._pool.connection(self._timeout) as conn, conn.transaction():
            cur = await conn.execute(
                "DELETE FROM projection_set_aside WHERE id = ANY(%s) RETURNING id", (list(wanted),)
            )
            deleted = {int(r[0]) for r in await cur.fetchall()}
            if deleted != wanted:
                raise Missing(sorted(wanted - deleted))
        return sorted(deleted)

    async def replay(self, rows: list[SetAsideRow]) -> ReplayOutcome:
        """Fold ``rows`` into the jobs table as the projector would; remove those projected, keep the rest.

        Each queue's entries are folded in stream order, so a job's events apply as they did in
        the stream; the upsert's monotonic guard makes a replay of anything already projected a no-op.
        """
        replayed = 0
        refused: list[SetAsideRow] = []
        for start in range(0, len(rows), REPLAY_CHUNK):
            outcome = await self._replay_chunk(rows[start : start + REPLAY_CHUNK])
            replayed += outcome.replayed
            refused += outcome.refused
        return ReplayOutcome(replayed, refused)

    async def replay_all(self, limit_listed: int) -> tuple[int, int, list[SetAsideRow]]:
        """Replay every entry, a chunk at a time. Returns (replayed, refused count, the first refused)."""
        after, replayed, refused_count = 0, 0, 0
        listed: list[SetAsideRow] = []
        while True:
            chunk = await self.page("", after, REPLAY_CHUNK)
            if not chunk:
                return replayed, refused_count, listed
            outcome = await self._replay_chunk(chunk)
            replayed += outcome.replayed
            refused_count += len(outcome.refused)
            listed += outcome.refused[: max(0, limit_listed - len(listed))]
            after = chunk[-1].id

    async def _replay_chunk(self, rows: list[SetAsideRow]) -> ReplayOutcome:
        batch = Batch()
        by_queue: dict[str, list[SetAsideRow]] = {}
        for row in rows:
            by_queue.setdefault(row.queue, []).append(row)
        for queue, items in by_queue.items():
            items.sort(key=lambda r: _stream_key(r.entry_id))
            entries = []
            for item in items:
                fields: dict[bytes, bytes] = {b"e": item.event}
                ulid = item.job_id.partition("/")[2]
                if ulid:
                    fields[b"j"] = ulid.encode()
                entries.append((item.entry_id.encode(), fields))
            batch.add(queue, queue_keys(queue).events, entries)
        # Entries refused again are written back (with their new error) by the same commit.
        again: list[SetAside] = await self._store.write(batch.finish(), batch.events, batch.malformed)
        refused_keys = {(s.queue, s.entry_id) for s in again}
        done = [r.id for r in rows if (r.queue, r.entry_id) not in refused_keys]
        kept = [r.id for r in rows if (r.queue, r.entry_id) in refused_keys]
        async with self._pool.connection(self._timeout) as conn, conn.transaction():
            if done:
                await conn.execute("DELETE FROM projection_set_aside WHERE id = ANY(%s)", (done,))
            refused: list[SetAsideRow] = []
            if kept:
                cur = await conn.execute(
                    "UPDATE projection_set_aside SET replays = replays + 1, replayed_at = now() "
                    f"WHERE id = ANY(%s) RETURNING {_COLUMNS}",
                    (kept,),
                )
                refused = sorted((_row(r) for r in await cur.fetchall()), key=lambda r: r.id)
        return ReplayOutcome(len(done), refused)


class Missing(LookupError):
    """Ids that name no set-aside entry."""

    def __init__(self, ids: list[int]) -> None:
        super().__init__(f"no set-aside entries with ids {ids}")
        self.ids = ids
