"""Validation of EnqueueRequest: bad input is refused before anything is written.

Returns plain values; every violation names its field (``jobs[3].queue`` in a
batch) so that the INVALID_ARGUMENT status carries a google.rpc.BadRequest a
person can act on.
"""

from __future__ import annotations

import json
import json.scanner
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

from conveyor.common.codec import struct_to_json
from conveyor.common.defaults import DEFAULT_RETRY, fill_retry_defaults
from conveyor.common.errors import InvalidArgument, ResourceExhausted
from conveyor.common.ids import QUEUE_RE
from conveyor.common.keys import MAX_PRIORITY, MIN_PRIORITY
from conveyor.v1 import job_pb2, producer_service_pb2

TYPE_RE = re.compile(r"^[A-Za-z0-9_.:\-]{1,128}$")
#: Rate keys appear inside Redis key names and the admin API: printable, no whitespace.
RATE_KEY_RE = re.compile(r"^[!-~]{1,128}$")
MAX_IDEMPOTENCY_KEY = 256
DEFAULT_IDEMPOTENCY_WINDOW_MS = 24 * 3600 * 1000
MAX_IDEMPOTENCY_WINDOW_MS = 30 * 24 * 3600 * 1000
MAX_LABELS = 32
MAX_LABEL_KEY = 64
MAX_LABEL_VALUE = 256
MAX_ATTEMPTS = 100
MAX_DELAY_MS = 365 * 24 * 3600 * 1000
#: Why a queue name is refused (the one rule: ids.QUEUE_RE).
QUEUE_RULE = (
    "must be 1-64 characters from A-Z a-z 0-9 _ . - and not only dots ('.' and '..' would make job ids look like paths)"
)


def queue_problem(queue: str) -> str | None:
    """Why ``queue`` cannot be a queue name, or None when it can.

    Every place a queue name enters (Enqueue, EnqueueBatch, schedules, the admin and results
    RPCs, a worker's CONVEYOR_QUEUES) asks this, so they all refuse the same names the same way.
    """
    if not queue:
        return "required"
    if not QUEUE_RE.match(queue):
        return QUEUE_RULE
    return None


def check_queue(queue: str, field: str = "queue") -> None:
    """Raise InvalidArgument naming ``field`` when ``queue`` is not a valid queue name."""
    problem = queue_problem(queue)
    if problem is not None:
        raise InvalidArgument({field: problem})


# Made once per job on the enqueue path: not frozen, as a frozen dataclass's __init__ costs
# twice as much (object.__setattr__ per field).
@dataclass(slots=True)
class ValidJob:
    """An EnqueueRequest that passed validation, with its payload as JSON bytes."""

    request: producer_service_pb2.EnqueueRequest
    payload_json: bytes
    #: 1-9, or 0 for the queue's default priority.
    priority: int
    idempotency_window_ms: int
    #: The retry policy with the queue defaults filled in (DEFAULT_RETRY itself when the
    #: request named none or one equal to it: read it, never modify it).
    retry: job_pb2.RetryPolicy
    #: When the job becomes due (ms since the epoch), or 0 for now.
    due_ms: int = 0


def _not_json(constant: str) -> object:
    # Python's scanner takes NaN and Infinity; JSON (and PostgreSQL's jsonb, where the payload
    # ends up) does not.
    raise ValueError(f"{constant} is not JSON")


# The C scanner json.loads itself uses (typeshed types make_scanner as the class it is in Python).
_scan_json: Callable[[str, int], tuple[object, int]] = json.scanner.make_scanner(
    json.JSONDecoder(parse_constant=_not_json)  # type: ignore[arg-type]
)
#: The whitespace JSON allows around a value (RFC 8259; json.decoder.WHITESPACE).
_JSON_SPACE = " \t\n\r"


def _json_value(payload: bytes) -> object:
    """The value of UTF-8 JSON text, as ``json.loads`` reads it from a str.

    ``json.loads`` of bytes first guesses the encoding (UTF-16 and UTF-32 too) and then walks
    three layers of Python: 1.7 µs for the 100-byte payload of a typical job, against 0.3 µs for
    its C scanner called directly (issue 13). Strict UTF-8 is what the field promises.

    Raises:
        UnicodeDecodeError: Not UTF-8.
        ValueError: Not one JSON value (with only whitespace around it), or NaN or Infinity in it.
    """
    text = payload.decode()
    try:
        value, end = _scan_json(text, len(text) - len(text.lstrip(_JSON_SPACE)))
    except StopIteration:
        raise ValueError("not JSON") from None
    if end != len(text) and text[end:].strip(_JSON_SPACE):
        raise ValueError("extra data after the JSON value")
    return value


def _duration_ms(seconds: int, nanos: int) -> int:
    return seconds * 1000 + nanos // 1_000_000


def validate(
    request: producer_service_pb2.EnqueueRequest, max_payload_bytes: int, prefix: str = "", now_ms: int = 0
) -> tuple[ValidJob | None, dict[str, str]]:
    """Check one request.

    Returns:
        The valid job (or None) and the violations, field path -> why.

    Raises:
        ResourceExhausted: The payload is over ``max_payload_bytes``.
    """
    bad: dict[str, str] = {}
    if (queue_problem_ := queue_problem(request.queue)) is not None:
        bad[f"{prefix}queue"] = queue_problem_
    if not request.type:
        bad[f"{prefix}type"] = "required"
    elif not TYPE_RE.match(request.type):
        bad[f"{prefix}type"] = "must be 1-128 characters from A-Z a-z 0-9 _ . : -"

    payload = b"{}"
    if request.HasField("payload") and request.payload_json:
        bad[f"{prefix}payload_json"] = "set either payload or payload_json, not both"
    elif request.payload_json:
        payload = bytes(request.payload_json)
        try:
            if not isinstance(_json_value(payload), dict):
                bad[f"{prefix}payload_json"] = "must be a JSON object"
        except (UnicodeDecodeError, ValueError):
            bad[f"{prefix}payload_json"] = "must be UTF-8 JSON text of an object"
    elif request.HasField("payload"):
        try:
            payload = struct_to_json(request.payload)
        except ValueError as exc:  # NaN or infinity cannot be JSON
            bad[f"{prefix}payload"] = f"cannot be represented as JSON: {exc}"
    if len(payload) > max_payload_bytes:
        raise ResourceExhausted(
            f"{prefix}payload is {len(payload)} bytes as JSON; the limit is {max_payload_bytes} bytes"
        )

    if len(request.idempotency_key.encode()) > MAX_IDEMPOTENCY_KEY:
        bad[f"{prefix}idempotency_key"] = f"must be at most {MAX_IDEMPOTENCY_KEY} bytes"
    window_ms = DEFAULT_IDEMPOTENCY_WINDOW_MS
    if request.HasField("idempotency_window"):
        w = request.idempotency_window
        window_ms = _duration_ms(w.seconds, w.nanos)
        if w.seconds < 0 or w.nanos < 0:
            bad[f"{prefix}idempotency_window"] = "must not be negative"
        elif window_ms > MAX_IDEMPOTENCY_WINDOW_MS:
            bad[f"{prefix}idempotency_window"] = "must be at most 30 days"
        elif window_ms == 0:
            window_ms = DEFAULT_IDEMPOTENCY_WINDOW_MS

    # 0: the queue's default, filled in by the Enqueuer (it knows the queue's settings).
    priority = request.priority
    if priority and not MIN_PRIORITY <= priority <= MAX_PRIORITY:
        bad[f"{prefix}priority"] = f"must be 0 (default) or {MIN_PRIORITY}-{MAX_PRIORITY}"

    due_ms = 0
    if request.HasField("delay") and request.HasField("run_at"):
        bad[f"{prefix}delay"] = "set either delay or run_at, not both"
    elif request.HasField("delay"):
        delay_ms = _duration_ms(request.delay.seconds, request.delay.nanos)
        if request.delay.seconds < 0 or request.delay.nanos < 0:
            bad[f"{prefix}delay"] = "must not be negative"
        elif delay_ms > MAX_DELAY_MS:
            bad[f"{prefix}delay"] = "must be at most 365 days"
        elif delay_ms > 0:
            due_ms = now_ms + delay_ms
    elif request.HasField("run_at"):
        run_at_ms = request.run_at.seconds * 1000 + request.run_at.nanos // 1_000_000
        if not 0 <= request.run_at.nanos < 1_000_000_000:
            bad[f"{prefix}run_at"] = "nanos must be 0 to 999,999,999"
        elif run_at_ms > now_ms + MAX_DELAY_MS:
            bad[f"{prefix}run_at"] = "must be at most 365 days ahead"
        elif run_at_ms > now_ms:
            due_ms = run_at_ms  # a time in the past means now

    if request.HasField("timeout") and (request.timeout.seconds < 0 or request.timeout.nanos < 0):
        bad[f"{prefix}timeout"] = "must not be negative"
    if request.HasField("retry"):
        retry = job_pb2.RetryPolicy()
        retry.CopyFrom(request.retry)
        if not 0 <= retry.max_attempts <= MAX_ATTEMPTS:
            bad[f"{prefix}retry.max_attempts"] = f"must be 0 (default) to {MAX_ATTEMPTS}"
        for name in ("base", "cap"):
            d = getattr(retry, name)
            if d.seconds < 0 or d.nanos < 0:
                bad[f"{prefix}retry.{name}"] = "must not be negative"
        if not 0.0 <= retry.jitter <= 1.0:
            bad[f"{prefix}retry.jitter"] = "must be between 0 and 1"
        fill_retry_defaults(retry)
        if retry == DEFAULT_RETRY:
            retry = DEFAULT_RETRY  # stored as no policy at all, like a request that names none (ADR 0010)
    else:
        retry = DEFAULT_RETRY

    if len(request.labels) > MAX_LABELS:
        bad[f"{prefix}labels"] = f"at most {MAX_LABELS} labels"
    for key, value in request.labels.items():
        if not key or len(key.encode()) > MAX_LABEL_KEY:
            bad[f"{prefix}labels[{key!r}]"] = f"keys must be 1-{MAX_LABEL_KEY} bytes"
        elif len(value.encode()) > MAX_LABEL_VALUE:
            bad[f"{prefix}labels[{key!r}]"] = f"values must be at most {MAX_LABEL_VALUE} bytes"

    if request.rate_key and not RATE_KEY_RE.match(request.rate_key):
        bad[f"{prefix}rate_key"] = "must be 1-128 bytes of printable characters"

    if bad:
        return None, bad
    return ValidJob(request, payload, priority, window_ms, retry, due_ms), bad


def validate_all(
    requests: list[producer_service_pb2.EnqueueRequest], max_payload_bytes: int, batch: bool
) -> list[ValidJob]:
    """Validate every request; raise one InvalidArgument naming every bad field."""
    valid: list[ValidJob] = []
    bad: dict[str, str] = {}
    now_ms = time.time_ns() // 1_000_000
    for i, request in enumerate(requests):
        job, violations = validate(request, max_payload_bytes, f"jobs[{i}]." if batch else "", now_ms)
        bad.update(violations)
        if job is not None:
            valid.append(job)
    if bad:
        raise InvalidArgument(bad)
    return valid
