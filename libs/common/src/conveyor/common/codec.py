"""Conversions between the wire forms and the stored forms of contract messages.

Clients send payloads as ``google.protobuf.Struct`` (what grpcurl speaks) or as
JSON bytes; Conveyor stores and moves them as compact JSON bytes, converted once
at the door (ADR 0003). Responses always carry the Struct/Value forms.
"""

from __future__ import annotations

import contextlib
import functools
import json
from typing import Any

from google.protobuf import json_format, struct_pb2

from conveyor.common import crypto
from conveyor.common.defaults import DEFAULT_RETRY
from conveyor.common.ids import ulid_time_ms
from conveyor.v1 import event_pb2, job_pb2

_JOB_FIELD_TAG = bytes([(12 << 3) | 2])  # JobEvent.job, length-delimited


def _plain(value: Any) -> Any:
    """Struct numbers are doubles; give handlers 3 rather than 3.0 when it is whole."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def struct_to_json(value: struct_pb2.Struct) -> bytes:
    """Compact JSON bytes of a Struct."""
    return dumps(_plain(json_format.MessageToDict(value)))


def value_to_python(value: struct_pb2.Value) -> Any:
    """The JSON-able Python form of a set Value, whole numbers as ints (as payloads are stored)."""
    return _plain(json_format.MessageToDict(value))


# json.dumps with non-default options builds a new encoder on every call; keep one.
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def dumps(value: Any) -> bytes:
    """Compact JSON bytes of a JSON-able value."""
    if value is None:  # what most handlers return: the encoder's set-up alone costs microseconds
        return b"null"
    return _ENCODER.encode(value).encode()


def json_to_struct(data: bytes) -> struct_pb2.Struct:
    """A Struct from JSON bytes of an object."""
    out = struct_pb2.Struct()
    if data:
        out.update(json.loads(data))
    return out


def json_to_value(data: bytes) -> struct_pb2.Value:
    """A Value from JSON bytes."""
    out = struct_pb2.Value()
    if data:
        json_format.Parse(data, out)
    return out


# Hand encoding of the few protobuf messages built for every job (the producer's Job and
# QUEUED event, the worker's SUCCEEDED event): building and serializing message objects cost
# more than the rest of the work on the job. tests/unit check them against protobuf.
_SMALL_VARINTS = tuple(bytes((i,)) for i in range(128))


def varint(n: int) -> bytes:
    """A non-negative int as a protobuf varint."""
    if n < 0x80:
        return _SMALL_VARINTS[n]
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def length_delimited(tag: bytes, value: bytes) -> bytes:
    """A length-delimited field (string, bytes, message) with its tag."""
    return tag + varint(len(value)) + value


@functools.lru_cache(maxsize=4)
def timestamp_bytes(now_ns: int) -> bytes:
    """google.protobuf.Timestamp{seconds, nanos} of ``now_ns``, serialized (one batch shares a time)."""
    seconds, nanos = divmod(now_ns, 1_000_000_000)
    return b"\x08" + varint(seconds) + (b"\x10" + varint(nanos) if nanos else b"")


def embed_job(event: bytes, job: bytes) -> bytes:
    """Serialized JobEvent ``event`` with ``job`` (serialized Job) set as its ``job`` field.

    Protobuf parsers merge repeated occurrences of a message field, so appending the
    field is the same as setting it, without parsing and re-serializing the job.
    """
    return event + _JOB_FIELD_TAG + varint(len(job)) + job


def public_payload(data: bytes, job_id: str) -> struct_pb2.Struct:
    """A stored payload (JSON bytes) as clients see it: a Struct, opened when it is sealed and
    this process holds its key, else ``{"$sealed": "<sealed value>"}`` (ADR 0025)."""
    if data.startswith(crypto.SEALED_JSON):
        data = crypto.try_open(data, crypto.PAYLOAD, job_id)
        if data.startswith(crypto.SEALED_JSON):
            out = struct_pb2.Struct()
            out.update({crypto.SEALED_KEY: crypto.sealed_token(data)})
            return out
    return json_to_struct(data)


def public_result(data: bytes, job_id: str) -> struct_pb2.Value:
    """A stored result (JSON bytes) as clients see it: opened when it is sealed and this process
    holds its key, else the sealed value as a string (ADR 0025)."""
    if data.startswith(crypto.SEALED_JSON):
        data = crypto.try_open(data, crypto.RESULT, job_id)
    return json_to_value(data)


def public_job(job: job_pb2.Job) -> job_pb2.Job:
    """``job`` as clients see it: payload as a Struct."""
    if job.payload_json:
        out = job_pb2.Job()
        out.CopyFrom(job)
        out.payload.CopyFrom(public_payload(job.payload_json, job.id))
        out.ClearField("payload_json")
        return out
    return job


def public_event(event: event_pb2.JobEvent) -> event_pb2.JobEvent:
    """``event`` as clients see it: result as a Value, the job's payload as a Struct."""
    if not event.result_json and not event.job.payload_json:
        return event
    out = event_pb2.JobEvent()
    out.CopyFrom(event)
    if event.result_json:
        out.result.CopyFrom(public_result(event.result_json, event.job_id))
        out.ClearField("result_json")
    if event.job.payload_json:
        out.job.CopyFrom(public_job(event.job))
    return out


def restore_job(job: job_pb2.Job, job_id: str, queue: str) -> job_pb2.Job:
    """A stored Job as it was enqueued: fill in what Redis does not store.

    The id and queue are known from the key (ADR 0001). ADR 0010: created_at is the
    millisecond of the job id's ULID, and a job stored without a retry policy has the
    default one. Jobs stored before ADR 0010 carry both, and keep them.
    """
    job.id = job_id
    job.queue = queue
    if not job.HasField("created_at"):
        job.created_at.FromMilliseconds(ulid_time_ms(job_id[len(queue) + 1 :]))
    if not job.HasField("retry"):
        job.retry.CopyFrom(DEFAULT_RETRY)
    return job


def decode_event(event_id: bytes | str, data: bytes, job_id: str) -> event_pb2.JobEvent:
    """A JobEvent read from an event stream entry, with its id and its job's id filled in.

    Redis stores events without the job id (the entry's ``j`` field and the stream's
    queue give it), to keep each event small (ADR 0001). A final event carries the
    stored Job, restored as such; a QUEUED or DELAYED event carries only the job's type
    and priority, which gain just the id and queue.
    """
    event = event_pb2.JobEvent.FromString(data)
    event.id = event_id.decode() if isinstance(event_id, bytes) else event_id
    event.job_id = job_id
    if event.HasField("job"):
        queue = job_id.rpartition("/")[0]
        if event.type in FINAL_EVENTS:
            restore_job(event.job, job_id, queue)
        else:
            event.job.id = job_id
            event.job.queue = queue
    return event


FINAL_EVENTS = frozenset(
    {
        event_pb2.EVENT_TYPE_SUCCEEDED,
        event_pb2.EVENT_TYPE_FAILED,
        event_pb2.EVENT_TYPE_DEAD_LETTERED,
        event_pb2.EVENT_TYPE_CANCELLED,
    }
)
FINAL_STATES = frozenset(
    {
        job_pb2.JOB_STATE_SUCCEEDED,
        job_pb2.JOB_STATE_FAILED,
        job_pb2.JOB_STATE_DEAD_LETTERED,
        job_pb2.JOB_STATE_CANCELLED,
    }
)
#: The state a job is in right after each event.
STATE_AFTER_EVENT = {
    event_pb2.EVENT_TYPE_QUEUED: job_pb2.JOB_STATE_QUEUED,
    event_pb2.EVENT_TYPE_DELAYED: job_pb2.JOB_STATE_DELAYED,
    event_pb2.EVENT_TYPE_ACTIVE: job_pb2.JOB_STATE_ACTIVE,
    event_pb2.EVENT_TYPE_PROGRESS: job_pb2.JOB_STATE_ACTIVE,
    event_pb2.EVENT_TYPE_RETRY_SCHEDULED: job_pb2.JOB_STATE_RETRY_SCHEDULED,
    event_pb2.EVENT_TYPE_SUCCEEDED: job_pb2.JOB_STATE_SUCCEEDED,
    event_pb2.EVENT_TYPE_FAILED: job_pb2.JOB_STATE_FAILED,
    event_pb2.EVENT_TYPE_DEAD_LETTERED: job_pb2.JOB_STATE_DEAD_LETTERED,
    event_pb2.EVENT_TYPE_CANCELLED: job_pb2.JOB_STATE_CANCELLED,
}


def reveal_job(job: job_pb2.Job) -> job_pb2.Job:
    """In place, ``job`` (as a server answered it) with the payload and result the server left
    sealed (it held no key: ``{"$sealed": ...}``, a sealed string) opened by this process's
    keyring, when it holds their key: how the CLI and the dashboard read them (ADR 0025)."""
    keyring = crypto.current().keyring
    if keyring is None:
        return job
    fields = job.payload.fields
    if len(fields) == 1 and crypto.SEALED_KEY in fields:
        try:
            plain = keyring.open(fields[crypto.SEALED_KEY].string_value, crypto.PAYLOAD, job.id)
        except crypto.SealError:
            pass
        else:
            job.payload.CopyFrom(json_to_struct(plain))
    if job.HasField("result") and job.result.string_value.startswith(crypto.PREFIX):
        with contextlib.suppress(crypto.SealError):
            job.result.CopyFrom(json_to_value(keyring.open(job.result.string_value, crypto.RESULT, job.id)))
    return job


def reveal_event(event: event_pb2.JobEvent) -> event_pb2.JobEvent:
    """In place, ``event`` with what its server left sealed opened here, as reveal_job does."""
    keyring = crypto.current().keyring
    if keyring is None:
        return event
    if event.HasField("result") and event.result.string_value.startswith(crypto.PREFIX):
        with contextlib.suppress(crypto.SealError):
            event.result.CopyFrom(json_to_value(keyring.open(event.result.string_value, crypto.RESULT, event.job_id)))
    if event.HasField("job"):
        reveal_job(event.job)
    return event
