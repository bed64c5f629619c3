"""Dead letters: list, retry (as new attempts of the same job ids) and purge."""

from __future__ import annotations

from conveyor.common.codec import decode_event, public_event, public_job, restore_job
from conveyor.common.errors import FailedPrecondition, InvalidArgument
from conveyor.common.ids import make_job_id, parse_job_id, parse_stream_id, stream_id_key
from conveyor.common.keys import QueueKeys, queue_keys
from conveyor.common.redis import RedisClient
from conveyor.common.scripts import DEAD_LETTERS_PER_CALL, Scripts
from conveyor.common.validate import check_queue
from conveyor.v1 import admin_service_pb2, job_pb2

DEFAULT_PAGE = 100
MAX_PAGE = 1000


def queue_of(queue: str) -> QueueKeys:
    """The keys of ``queue``, or InvalidArgument naming the field."""
    check_queue(queue)
    return queue_keys(queue)


def _target(queue: str, job_id: str, all_: bool) -> str:
    """The ulid named by job_id, or "" for all; exactly one of them must be given."""
    if bool(job_id) == all_:
        raise InvalidArgument({"job_id": "set exactly one of job_id and all"})
    if not job_id:
        return ""
    parsed = parse_job_id(job_id)
    if parsed is None:
        raise InvalidArgument({"job_id": "must be a job id like '<queue>/<ULID>'"})
    if parsed[0] != queue:
        raise InvalidArgument({"job_id": f"belongs to queue {parsed[0]!r}, not {queue!r}"})
    return parsed[1]


class DeadLetters:
    """Operations on the queues' dead-letter streams."""

    def __init__(self, redis: RedisClient, scripts: Scripts) -> None:
        self._redis = redis
        self._scripts = scripts

    async def page(self, queue: str, page_size: int, page_token: str) -> admin_service_pb2.ListDeadLettersResponse:
        keys = queue_of(queue)
        if page_size < 0 or page_size > MAX_PAGE:
            raise InvalidArgument({"page_size": f"must be 0 (default {DEFAULT_PAGE}) to {MAX_PAGE}"})
        size = page_size or DEFAULT_PAGE
        start = "-"
        if page_token:
            if parse_stream_id(page_token) is None:
                raise InvalidArgument({"page_token": "not a token from ListDeadLetters; start without one"})
            start = "(" + page_token
        entries = await self._redis.xrange(keys.dead, start, "+", count=size + 1)
        out = admin_service_pb2.ListDeadLettersResponse()
        for entry_id, fields in entries[:size]:
            job_id = make_job_id(queue, fields[b"j"].decode())
            letter = out.dead_letters.add(id=entry_id.decode())
            letter.job.CopyFrom(public_job(restore_job(job_pb2.Job.FromString(fields[b"d"]), job_id, queue)))
            letter.event.CopyFrom(public_event(decode_event(b"0-0", fields[b"e"], job_id)))
            letter.event.id = ""  # the event's own id lives in the event stream, not here
            letter.event.ClearField("job")
            letter.dead_at.FromMilliseconds(stream_id_key(entry_id)[0])
        if len(entries) > size:
            out.next_page_token = entries[size - 1][0].decode()
        return out

    async def retry(self, queue: str, job_id: str, all_: bool) -> tuple[list[str], bool]:
        """Queue one dead letter again, or (all) up to DEAD_LETTERS_PER_CALL of the oldest.

        Returns the job ids queued again and whether dead letters are left (call again).
        """
        keys = queue_of(queue)
        ulid = _target(queue, job_id, all_)
        retried, more = await self._scripts.retry_dead(keys, ulid, DEAD_LETTERS_PER_CALL)
        if ulid and not retried:
            raise FailedPrecondition(f"job {job_id} is not a dead letter of queue {queue!r}", job_id)
        return [make_job_id(queue, u) for u in retried], more

    async def purge(self, queue: str, job_id: str, all_: bool) -> tuple[int, bool]:
        """Delete one dead letter, or (all) up to DEAD_LETTERS_PER_CALL of the oldest; returns (deleted, more)."""
        keys = queue_of(queue)
        ulid = _target(queue, job_id, all_)
        purged, more = await self._scripts.purge_dead(keys, ulid, DEAD_LETTERS_PER_CALL)
        if ulid and not purged:
            raise FailedPrecondition(f"job {job_id} is not a dead letter of queue {queue!r}", job_id)
        return purged, more
