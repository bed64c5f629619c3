import pytest
from google.protobuf import duration_pb2

from conveyor.common.errors import InvalidArgument, ResourceExhausted
from conveyor.common.validate import QUEUE_RULE, check_queue, queue_problem, validate_all
from conveyor.v1 import producer_service_pb2 as p


def ok(**kw: object) -> p.EnqueueRequest:
    base: dict[str, object] = {"queue": "default", "type": "demo.echo"}
    base.update(kw)
    return p.EnqueueRequest(**base)  # type: ignore[arg-type]


def violations(req: p.EnqueueRequest, batch: bool = False) -> dict[str, str]:
    with pytest.raises(InvalidArgument) as info:
        validate_all([req], 1000, batch)
    return info.value.violations


def test_a_valid_request_passes_with_defaults() -> None:
    (job,) = validate_all([ok(payload={"a": 1})], 1000, False)
    assert job.priority == 0  # the queue's default, filled in by the Enqueuer
    assert job.payload_json == b'{"a":1}'


@pytest.mark.parametrize(
    ("req", "field"),
    [
        (ok(queue=""), "queue"),
        (ok(queue="has space"), "queue"),
        (ok(queue="x" * 65), "queue"),
        (ok(queue="a/b"), "queue"),
        (ok(queue="."), "queue"),
        (ok(queue=".."), "queue"),
        (ok(queue="..."), "queue"),
        (ok(type=""), "type"),
        (ok(type="bad type"), "type"),
        (ok(type="t" * 129), "type"),
        (ok(priority=10), "priority"),
        (ok(priority=-1), "priority"),
        (ok(payload_json=b"\xff\xfe"), "payload_json"),
        (ok(payload_json=b"[1,2]"), "payload_json"),
        (ok(payload_json=b"{not json"), "payload_json"),
        (ok(payload_json=b'{"a":1} {"b":2}'), "payload_json"),
        (ok(payload_json=b'{"a":1} x'), "payload_json"),
        (ok(payload_json=b"   "), "payload_json"),
        # UTF-8 only, as the field says: not UTF-16, not with a byte order mark (neither would
        # be stored as jsonb by the results service).
        (ok(payload_json='{"a":1}'.encode("utf-16")), "payload_json"),
        (ok(payload_json=b'\xef\xbb\xbf{"a":1}'), "payload_json"),
        (ok(payload_json=b'{"a":NaN}'), "payload_json"),
        (ok(payload_json=b'{"a":[1,Infinity]}'), "payload_json"),
        (ok(payload_json=b'{"a":{"b":-Infinity}}'), "payload_json"),
        (ok(payload_json=b"{}", payload={"a": 1}), "payload_json"),
        (ok(delay=duration_pb2.Duration(seconds=-1)), "delay"),
        (ok(timeout=duration_pb2.Duration(seconds=-5)), "timeout"),
        (ok(idempotency_key="k" * 257), "idempotency_key"),
        (ok(idempotency_window=duration_pb2.Duration(seconds=-1)), "idempotency_window"),
        (ok(labels={"": "x"}), "labels['']"),
    ],
)
def test_bad_fields_are_named(req: p.EnqueueRequest, field: str) -> None:
    assert field in violations(req)


@pytest.mark.parametrize("text", [b"{}", b' {"a": [1, {"b": null}]}\n', '{"é":"ü"}'.encode(), b'{"\\u00e9":1}'])
def test_json_objects_with_whitespace_around_them_are_kept_byte_for_byte(text: bytes) -> None:
    (job,) = validate_all([ok(payload_json=text)], 1000, False)
    assert job.payload_json == text


def test_batch_violations_name_the_job_index() -> None:
    with pytest.raises(InvalidArgument) as info:
        validate_all([ok(), ok(queue="")], 1000, True)
    assert list(info.value.violations) == ["jobs[1].queue"]


def test_oversize_payload_is_resource_exhausted() -> None:
    with pytest.raises(ResourceExhausted, match="limit is 1000 bytes"):
        validate_all([ok(payload_json=b'{"a":"' + b"x" * 1000 + b'"}')], 1000, False)


def test_delays_resolve_to_a_due_time_and_the_past_means_now() -> None:
    import time

    from google.protobuf import timestamp_pb2

    now_ms = time.time_ns() // 1_000_000
    (delayed,) = validate_all([ok(delay=duration_pb2.Duration(seconds=5))], 1000, False)
    assert abs(delayed.due_ms - (now_ms + 5000)) < 1000
    at = timestamp_pb2.Timestamp()
    at.FromMilliseconds(now_ms + 60_000)
    (scheduled,) = validate_all([ok(run_at=at)], 1000, False)
    assert scheduled.due_ms == now_ms + 60_000
    at.FromMilliseconds(now_ms - 60_000)
    (past,) = validate_all([ok(run_at=at)], 1000, False)
    assert past.due_ms == 0
    assert "delay" in violations(ok(delay=duration_pb2.Duration(seconds=400 * 86400)))
    assert "delay" in violations(ok(delay=duration_pb2.Duration(seconds=1), run_at=at))


def test_the_retry_policy_gets_the_queue_defaults() -> None:
    from conveyor.v1 import job_pb2

    (job,) = validate_all([ok()], 1000, False)
    assert job.retry.max_attempts == 3 and job.retry.backoff == job_pb2.BACKOFF_EXPONENTIAL
    assert job.retry.base.ToMilliseconds() == 1000 and job.retry.cap.ToMilliseconds() == 300_000
    (custom,) = validate_all([ok(retry=job_pb2.RetryPolicy(max_attempts=1))], 1000, False)
    assert custom.retry.max_attempts == 1 and custom.retry.jitter == 0
    assert "retry.jitter" in violations(ok(retry=job_pb2.RetryPolicy(jitter=2)))
    assert "retry.max_attempts" in violations(ok(retry=job_pb2.RetryPolicy(max_attempts=1000)))


@pytest.mark.parametrize("queue", [".", "..", "...", "../x", "a/b", "has space", "x" * 65])
def test_path_like_and_malformed_queue_names_are_refused_with_the_reason(queue: str) -> None:
    assert queue_problem(queue) == QUEUE_RULE
    with pytest.raises(InvalidArgument) as info:
        check_queue(queue)
    assert info.value.violations == {"queue": QUEUE_RULE}
    assert "'..'" in QUEUE_RULE  # the message says why dots alone are refused


@pytest.mark.parametrize("queue", ["default", "emails.v2", ".hidden", "a..b", "_", "-", "x" * 64])
def test_names_with_dots_among_other_characters_are_queue_names(queue: str) -> None:
    assert queue_problem(queue) is None
    check_queue(queue)
    (job,) = validate_all([ok(queue=queue)], 1000, False)
    assert job.request.queue == queue


def test_an_empty_queue_is_required() -> None:
    assert queue_problem("") == "required"
