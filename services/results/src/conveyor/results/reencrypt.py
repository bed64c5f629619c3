"""ReEncryptJobs: seal one queue's stored payloads and results again with the active key (ADR 0025).

PostgreSQL holds a sealed value in two places: the ``payload``/``result`` jsonb columns of
``jobs`` (a jsonb string, ``"$conveyor-sealed:v1:<key id>:..."``) and inside the serialized
events of ``job_events`` (``JobEvent.result_json``, and the payload of the job a final event
carries). One call walks at most ``max_jobs`` rows of the queue in job id order, and in one
transaction per call rewrites the values sealed with another key than the active one (and,
for a queue encrypted here, the values still in clear), locking those rows (``FOR UPDATE``)
so that a concurrent projector upsert waits instead of being lost.

A later event projected from Redis may still carry a value sealed with the old key (a job
that was waiting in Redis during the rotation): it stays readable while the old key is in
the keyring; running the command again after Redis has let go of those jobs catches it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from psycopg.rows import TupleRow
from psycopg_pool import AsyncConnectionPool

from conveyor.common import crypto
from conveyor.results.store import pack_event, unpack_events
from conveyor.v1 import event_pb2

MAX_UNREADABLE = 100

_SELECT_JOBS = """
SELECT job_id, payload::text, result::text FROM jobs
WHERE job_id > %s AND job_id < %s AND queue = %s
ORDER BY job_id
LIMIT %s
FOR UPDATE
"""
_UPDATE_JOB = "UPDATE jobs SET payload = %s::jsonb, result = %s::jsonb WHERE job_id = %s"
_SELECT_EVENTS = """
SELECT job_id, first_ms, first_seq, events FROM job_events WHERE job_id = ANY(%s) FOR UPDATE
"""
_UPDATE_EVENTS = "UPDATE job_events SET events = %s WHERE job_id = %s AND first_ms = %s AND first_seq = %s"


@dataclass
class Outcome:
    key_id: str
    examined: int = 0
    jobs: int = 0
    events: int = 0
    unreadable: list[str] = field(default_factory=list)
    next_after: str = ""


class _Resealer:
    def __init__(self, keyring: crypto.Keyring, seal_clear: bool) -> None:
        self.keyring = keyring
        self.seal_clear = seal_clear
        self.unreadable: set[str] = set()

    def value(self, data: bytes, kind: str, job_id: str) -> bytes | None:
        """``data`` sealed with the active key, or None when it already is (or cannot be opened)."""
        if crypto.is_sealed(data):
            if crypto.key_id_of(data) == self.keyring.active:
                return None
            try:
                plain = self.keyring.open(data, kind, job_id)
            except crypto.SealError:
                self.unreadable.add(job_id)
                return None
        elif self.seal_clear:
            plain = data
        else:
            return None
        return self.keyring.seal(plain, kind, job_id)

    def event(self, data: bytes, job_id: str) -> bytes | None:
        """A serialized JobEvent with its result and its job's payload sealed again, or None if unchanged."""
        event = event_pb2.JobEvent.FromString(data)
        changed = False
        if event.result_json and (new := self.value(event.result_json, crypto.RESULT, job_id)) is not None:
            event.result_json = new
            changed = True
        if event.job.payload_json and (new := self.value(event.job.payload_json, crypto.PAYLOAD, job_id)) is not None:
            event.job.payload_json = new
            changed = True
        return event.SerializeToString() if changed else None


async def reencrypt_jobs(
    pool: AsyncConnectionPool[Any], queue: str, after: str, limit: int, encryption: crypto.Encryption
) -> Outcome:
    """One bounded step of ReEncryptJobs for ``queue`` (see the module's docstring)."""
    keyring = encryption.keyring
    assert keyring is not None
    resealer = _Resealer(keyring, seal_clear=encryption.encrypts(queue))
    outcome = Outcome(key_id=keyring.active)
    # Job ids are "<queue>/<ULID>": the queue's ids sort between "<queue>/" and "<queue>0" ('0' follows '/').
    low = max(after, f"{queue}/")
    async with pool.connection() as conn, conn.transaction():
        cur = conn.cursor()
        await cur.execute(_SELECT_JOBS, (low, f"{queue}0", queue, limit))
        rows: list[TupleRow] = await cur.fetchall()
        outcome.examined = len(rows)
        if len(rows) == limit:
            outcome.next_after = rows[-1][0]
        updates = []
        for job_id, payload, result in rows:
            new_payload = resealer.value(payload.encode(), crypto.PAYLOAD, job_id) if payload is not None else None
            new_result = resealer.value(result.encode(), crypto.RESULT, job_id) if result is not None else None
            if new_payload is not None or new_result is not None:
                updates.append(
                    (
                        new_payload.decode() if new_payload is not None else payload,
                        new_result.decode() if new_result is not None else result,
                        job_id,
                    )
                )
        if updates:
            await cur.executemany(_UPDATE_JOB, updates)
        outcome.jobs = len(updates)
        if rows:
            await cur.execute(_SELECT_EVENTS, ([row[0] for row in rows],))
            history = await cur.fetchall()
            event_updates = []
            for job_id, first_ms, first_seq, packed in history:
                records = unpack_events(bytes(packed))
                out, changed = [], 0
                for ms, seq, data in records:
                    new = resealer.event(data, job_id)
                    changed += new is not None
                    out.append(pack_event(ms, seq, data if new is None else new))
                if changed:
                    outcome.events += changed
                    event_updates.append((b"".join(out), job_id, first_ms, first_seq))
            if event_updates:
                await cur.executemany(_UPDATE_EVENTS, event_updates)
    outcome.unreadable = sorted(resealer.unreadable)[:MAX_UNREADABLE]
    return outcome
