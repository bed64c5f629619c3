import json

import pytest
from google.protobuf import struct_pb2

from conveyor.common.codec import decode_event, embed_job, json_to_struct, public_event, struct_to_json
from conveyor.common.defaults import DEFAULT_RETRY
from conveyor.common.ids import ulid_time_ms
from conveyor.v1 import event_pb2, job_pb2


def test_struct_to_json_keeps_whole_numbers_whole() -> None:
    s = struct_pb2.Struct()
    s.update({"n": 3, "x": 1.5, "nested": {"list": [1, "a", None, True]}})
    assert json.loads(struct_to_json(s)) == {"n": 3, "x": 1.5, "nested": {"list": [1, "a", None, True]}}
    assert b" " not in struct_to_json(s)


def test_struct_with_nan_is_refused() -> None:
    s = struct_pb2.Struct()
    s.update({"bad": float("nan")})
    with pytest.raises(ValueError):
        struct_to_json(s)


def test_embed_job_is_the_same_as_setting_the_field() -> None:
    job = job_pb2.Job(id="q/01ARZ3NDEKTSV4RRFFQ69G5FAV", queue="q", type="t", payload_json=b'{"a":1}')
    event = event_pb2.JobEvent(job_id=job.id, type=event_pb2.EVENT_TYPE_SUCCEEDED, attempt=2)
    decoded = event_pb2.JobEvent.FromString(embed_job(event.SerializeToString(), job.SerializeToString()))
    expected = event_pb2.JobEvent()
    expected.CopyFrom(event)
    expected.job.CopyFrom(job)
    assert decoded == expected


def test_public_event_converts_stored_json_to_wire_types() -> None:
    event = event_pb2.JobEvent(result_json=b'{"ok":true}')
    event.job.payload_json = b'{"a":[1,2]}'
    public = public_event(event)
    assert not public.result_json and not public.job.payload_json
    assert public.result.struct_value["ok"] is True
    assert public.job.payload == json_to_struct(b'{"a":[1,2]}')


_ULID = "01ARZ3NDEKTSV4RRFFQ69G5FAV"


def test_a_final_event_restores_the_default_retry_policy_its_stored_job_leaves_out() -> None:
    stored_job = job_pb2.Job(type="t", priority=5, payload_json=b"{}").SerializeToString()
    event = event_pb2.JobEvent(type=event_pb2.EVENT_TYPE_SUCCEEDED, attempt=1).SerializeToString()
    decoded = decode_event(b"1-0", embed_job(event, stored_job), f"q/{_ULID}")
    assert decoded.job.id == f"q/{_ULID}" and decoded.job.queue == "q"
    assert decoded.job.retry == DEFAULT_RETRY
    assert decoded.job.created_at.ToMilliseconds() == ulid_time_ms(_ULID)


def test_a_final_event_keeps_a_policy_of_the_jobs_own() -> None:
    own = job_pb2.RetryPolicy(max_attempts=9, backoff=job_pb2.BACKOFF_FIXED)
    stored_job = job_pb2.Job(type="t", retry=own).SerializeToString()
    event = event_pb2.JobEvent(type=event_pb2.EVENT_TYPE_FAILED).SerializeToString()
    assert decode_event(b"1-0", embed_job(event, stored_job), f"q/{_ULID}").job.retry == own


def test_a_final_event_keeps_a_created_at_stored_before_adr_0010() -> None:
    old = job_pb2.Job(type="t", retry=DEFAULT_RETRY)
    old.created_at.FromNanoseconds(1_795_619_270_889_123_456)
    event = event_pb2.JobEvent(type=event_pb2.EVENT_TYPE_CANCELLED).SerializeToString()
    decoded = decode_event(b"1-0", embed_job(event, old.SerializeToString()), f"q/{_ULID}")
    assert decoded.job.created_at.ToNanoseconds() == 1_795_619_270_889_123_456


def test_a_queued_event_names_only_the_type_and_priority_as_before() -> None:
    event = event_pb2.JobEvent(type=event_pb2.EVENT_TYPE_QUEUED, job=job_pb2.Job(type="t", priority=5))
    decoded = decode_event(b"1-0", event.SerializeToString(), f"q/{_ULID}")
    assert decoded.job == job_pb2.Job(id=f"q/{_ULID}", queue="q", type="t", priority=5)


def test_dumps_of_none_is_null_as_the_encoder_writes_it() -> None:
    import json

    from conveyor.common.codec import dumps

    assert dumps(None) == json.dumps(None).encode() == b"null"
    assert dumps({"a": None, "b": [1, "é"]}) == '{"a":null,"b":[1,"é"]}'.encode()
