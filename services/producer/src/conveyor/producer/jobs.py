"""GetJob: a live job from Redis, or a finished one from the results service."""

from __future__ import annotations

from conveyor.common.codec import FINAL_STATES, decode_event, public_job, public_result, restore_job
from conveyor.common.errors import InvalidArgument
from conveyor.common.ids import parse_job_id
from conveyor.common.keys import queue_keys
from conveyor.common.redis import RedisClient, hget
from conveyor.common.scripts import HELD, Record
from conveyor.producer.history import History
from conveyor.v1 import job_pb2


class JobReader:
    """Looks jobs up where they are: Redis while live, PostgreSQL (via History) after."""

    def __init__(self, redis: RedisClient, history: History) -> None:
        self._redis = redis
        self._history = history

    async def get(self, job_id: str) -> job_pb2.Job:
        parsed = parse_job_id(job_id)
        if parsed is None:
            raise InvalidArgument({"job_id": "must be a job id like '<queue>/<ULID>'"})
        queue, ulid = parsed
        keys = queue_keys(queue)
        for _ in range(3):  # the job may finish between reading its record and its entry
            raw = await hget(self._redis, keys.state, ulid)
            if raw is None:
                return await self._history.get_job(job_id)
            record = Record.parse(raw)
            if record.state in FINAL_STATES and record.final_event_id:
                entries = await self._redis.xrange(keys.events, record.final_event_id, record.final_event_id)
                if entries:
                    event = decode_event(entries[0][0], entries[0][1][b"e"], job_id)
                    job = public_job(event.job)
                    job.state = record.state  # type: ignore[assignment]
                    job.attempt = record.attempt
                    if event.result_json:
                        job.result.CopyFrom(public_result(event.result_json, job_id))
                    if event.HasField("error"):
                        job.error.CopyFrom(event.error)
                    job.finished_at.CopyFrom(event.time)
                    job.updated_at.CopyFrom(event.time)
                    job.worker = event.worker
                    return job
            else:
                data: bytes | None = None
                if record.entry_id and record.entry_id != HELD:
                    # In its band's stream, or in the admitted stream if its rate key held it back first.
                    for stream in (keys.band(record.priority), keys.admitted):
                        entries = await self._redis.xrange(stream, record.entry_id, record.entry_id)
                        if entries:
                            data = entries[0][1][b"d"]
                            break
                else:  # delayed, waiting for a retry, or held back by its rate key: parked meanwhile
                    data = await hget(self._redis, keys.parked, ulid)
                if data is not None:
                    job = public_job(restore_job(job_pb2.Job.FromString(data), job_id, queue))
                    job.state = record.state  # type: ignore[assignment]
                    job.attempt = record.attempt
                    if record.consumer:
                        job.worker = record.consumer
                    return job
        return await self._history.get_job(job_id)
