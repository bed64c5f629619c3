"""The worker opens a sealed payload for the handler only and seals the result (ADR 0025)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from conveyor.common import crypto
from conveyor.common.crypto import Encryption, Keyring
from conveyor.v1 import event_pb2, job_pb2
from conveyor.worker.execute import Attempt, run_attempt
from conveyor.worker.handlers import Handlers, JobContext

JOB_ID = "vault/01JD0000000000000000000000"
SECRET = b'{"pin":"SECRET-PIN-1234"}'

seen: list[dict[str, Any]] = []
handlers = Handlers()


@handlers.register("vault.echo")
async def echo(payload: dict[str, Any], ctx: JobContext) -> dict[str, Any]:
    seen.append(payload)
    return {"echo": payload["pin"]}


async def _report(percent: float, message: str) -> None:
    return None


@pytest.fixture(autouse=True)
def _reset() -> Iterator[None]:
    seen.clear()
    yield
    crypto.configure(Encryption(None))


def _attempt(payload_json: bytes) -> Attempt:
    job = job_pb2.Job(id=JOB_ID, queue="vault", type="vault.echo", payload_json=payload_json)
    stored = job_pb2.Job(type="vault.echo", payload_json=payload_json)
    return Attempt(job=job, job_bytes=stored.SerializeToString(), attempt=1)


async def test_handler_gets_plaintext_and_the_result_is_sealed() -> None:
    ring = Keyring.parse(crypto.new_key_entry("k1"))
    crypto.configure(Encryption(ring, frozenset({"vault"})))
    state, data, _ = await run_attempt(_attempt(ring.seal(SECRET, crypto.PAYLOAD, JOB_ID)), handlers, "w1", _report)
    assert state == job_pb2.JOB_STATE_SUCCEEDED
    assert seen == [{"pin": "SECRET-PIN-1234"}]
    assert b"SECRET-PIN" not in data
    event = event_pb2.JobEvent.FromString(data)
    assert crypto.key_id_of(event.result_json) == "k1"
    assert ring.open(event.result_json, crypto.RESULT, JOB_ID) == b'{"echo":"SECRET-PIN-1234"}'


async def test_a_sealed_payload_seals_its_result_even_where_the_queue_is_not_listed() -> None:
    ring = Keyring.parse(crypto.new_key_entry("k1"))
    crypto.configure(Encryption(ring))  # this worker was not told the queue is encrypted
    _, data, _ = await run_attempt(_attempt(ring.seal(SECRET, crypto.PAYLOAD, JOB_ID)), handlers, "w1", _report)
    assert crypto.is_sealed(event_pb2.JobEvent.FromString(data).result_json)


async def test_without_the_key_the_attempt_fails_retryably_naming_the_key() -> None:
    sealed = Keyring.parse(crypto.new_key_entry("gone")).seal(SECRET, crypto.PAYLOAD, JOB_ID)
    crypto.configure(Encryption(Keyring.parse(crypto.new_key_entry("other"))))
    state, data, _ = await run_attempt(_attempt(sealed), handlers, "w1", _report)
    assert seen == []
    assert state == job_pb2.JOB_STATE_RETRY_SCHEDULED
    event = event_pb2.JobEvent.FromString(data)
    assert event.error.kind == "SealedPayload" and event.error.retryable
    assert "'gone'" in event.error.message and b"SECRET-PIN" not in data


async def test_clear_payloads_of_clear_queues_are_untouched() -> None:
    crypto.configure(Encryption(Keyring.parse(crypto.new_key_entry("k1")), frozenset({"other"})))
    _, data, _ = await run_attempt(_attempt(SECRET), handlers, "w1", _report)
    assert event_pb2.JobEvent.FromString(data).result_json == b'{"echo":"SECRET-PIN-1234"}'
