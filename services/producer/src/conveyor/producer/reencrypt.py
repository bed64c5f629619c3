"""AdminService.ReEncrypt: a queue's parked jobs sealed again with the active key; the rest counted (ADR 0025).

A parked job (delayed, waiting for a retry, held back by its rate key) is a hash field whose
value can be replaced in place: each one is rewritten by a compare-and-set script (replaced
only if it is still the value read), so a job promoted, cancelled or changed meanwhile is left
alone. A stream entry cannot be changed in place (re-adding it changes its entry id, which live
records, claims and dead-letter ids point at), so waiting jobs, dead letters and events are only
counted, by key id: they leave Redis as jobs run, as dead letters are retried or purged, and as
events pass the retention. When no count names the old key, it can be removed.
"""

from __future__ import annotations

from collections import Counter

from conveyor.common import crypto
from conveyor.common.codec import varint
from conveyor.common.errors import FailedPrecondition
from conveyor.common.ids import make_job_id
from conveyor.common.keys import queue_keys
from conveyor.common.redis import RedisClient, register_script
from conveyor.common.validate import check_queue
from conveyor.v1 import admin_service_pb2, event_pb2, job_pb2

_PAYLOAD_TAG = bytes([(5 << 3) | 2])  # Job.payload_json, written last as the producer writes it
_PAGE = 500
# KEYS[1] the queue's parked hash; ARGV[1] ulid, ARGV[2] the value read, ARGV[3] its replacement.
_COMPARE_AND_SET = """
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
  return 1
end
return 0
"""


def _other_key(data: bytes, active: str) -> str:
    """The key id of a value sealed with a key other than ``active``, else ""."""
    if not data.startswith(crypto.SEALED_JSON):
        return ""
    key_id = crypto.key_id_of(data)
    return "" if key_id == active else key_id


class RedisReEncryptor:
    def __init__(self, client: RedisClient) -> None:
        self._redis = client
        self._cas = register_script(client, _COMPARE_AND_SET)

    async def run(self, queue: str, encryption: crypto.Encryption) -> admin_service_pb2.ReEncryptResponse:
        check_queue(queue)
        keyring = encryption.keyring
        if keyring is None:
            raise FailedPrecondition(
                "this producer has no keyring: start it with CONVEYOR_KEYRING_FILE or CONVEYOR_KEYRING "
                "holding the new active key first and the old keys after it",
                subject="keyring",
                kind="NO_KEYRING",
            )
        keys = queue_keys(queue)
        left: Counter[tuple[str, str]] = Counter()
        resealed = await self._parked(queue, keys.parked, keyring, encryption.encrypts(queue), left)
        for stream in (*keys.bands, keys.admitted):
            await self._count(stream, "waiting", keyring.active, left)
        await self._count(keys.dead, "dead_letters", keyring.active, left)
        await self._count(keys.events, "events", keyring.active, left)
        return admin_service_pb2.ReEncryptResponse(
            key_id=keyring.active,
            parked_reencrypted=resealed,
            remaining=[
                admin_service_pb2.SealedElsewhere(place=place, key_id=key_id, count=n)
                for (place, key_id), n in sorted(left.items())
            ],
        )

    async def _parked(
        self, queue: str, parked: str, keyring: crypto.Keyring, seal_clear: bool, left: Counter[tuple[str, str]]
    ) -> int:
        resealed = 0
        cursor = 0
        while True:
            cursor, found = await self._redis.hscan(parked, cursor, count=_PAGE)
            for ulid, raw in found.items():
                job = job_pb2.Job.FromString(raw)
                payload = job.payload_json
                job_id = make_job_id(queue, ulid.decode())
                if payload.startswith(crypto.SEALED_JSON):
                    if crypto.key_id_of(payload) == keyring.active:
                        continue
                    try:
                        plain = keyring.open(payload, crypto.PAYLOAD, job_id)
                    except crypto.SealError:
                        left["parked", crypto.key_id_of(payload)] += 1
                        continue
                elif seal_clear and payload:
                    plain = payload
                else:
                    continue
                sealed = keyring.seal(plain, crypto.PAYLOAD, job_id)
                job.ClearField("payload_json")
                value = job.SerializeToString() + _PAYLOAD_TAG + varint(len(sealed)) + sealed
                if await self._cas(keys=[parked], args=[ulid, raw, value]):
                    resealed += 1
            if not cursor:
                return resealed

    async def _count(self, stream: str, place: str, active: str, left: Counter[tuple[str, str]]) -> None:
        start = "-"
        while True:
            entries = await self._redis.xrange(stream, start, "+", count=_PAGE)
            for _, fields in entries:
                job_bytes = fields.get(b"d", b"")
                if crypto.SEALED_JSON in job_bytes:
                    key_id = _other_key(job_pb2.Job.FromString(job_bytes).payload_json, active)
                    if key_id:
                        left[place, key_id] += 1
                event_bytes = fields.get(b"e", b"")
                if crypto.SEALED_JSON in event_bytes:
                    event = event_pb2.JobEvent.FromString(event_bytes)
                    for value in (event.result_json, event.job.payload_json):
                        if key_id := _other_key(value, active):
                            left[place, key_id] += 1
            if len(entries) < _PAGE:
                return
            last = entries[-1][0]
            start = "(" + (last.decode() if isinstance(last, bytes) else last)
