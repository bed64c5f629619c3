"""ResultsService.ReEncryptJobs and the payload-search refusal on encrypted queues (ADR 0025), on real PostgreSQL."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from psycopg_pool import AsyncConnectionPool

from conveyor.common import crypto
from conveyor.common.crypto import Encryption, Keyring
from conveyor.results.store import Store, unpack_events
from conveyor.v1 import event_pb2, results_service_pb2
from tests.integration.results.conftest import Events, ResultsClient, StartProjector
from tests.integration.results.test_service import project
from tests.unit.results.builders import JobHistory

R = results_service_pb2
QUEUE = "vault"
OLD, NEW, GONE = crypto.new_key_entry("old"), crypto.new_key_entry("new"), crypto.new_key_entry("gone")


@pytest.fixture(autouse=True)
def _reset() -> Iterator[None]:
    yield
    crypto.configure(Encryption(None))


def sealed_history(ring: Keyring | None, payload: dict[str, Any], result: dict[str, Any]) -> JobHistory:
    """A finished job of QUEUE whose payload and result are sealed with ``ring`` (None: in clear)."""
    job = JobHistory(queue=QUEUE, payload=payload)
    if ring is not None:
        job.payload_json = ring.seal(job.payload_json, crypto.PAYLOAD, job.job_id)
    job.result = (
        ring.seal(json.dumps(result).encode(), crypto.RESULT, job.job_id) if ring else json.dumps(result).encode()
    )
    return job


def lifecycle(job: JobHistory) -> list[event_pb2.JobEvent]:
    events = job.lifecycle(start=1.0)
    events[-1].result_json = job.result
    return events


async def stored_key_ids(pool: AsyncConnectionPool[Any], job_id: str) -> tuple[set[str], set[str]]:
    """Key ids ("" for clear) of the job's row values, and of the values in its stored events."""
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT payload::text, result::text FROM jobs WHERE job_id = %s", (job_id,))
        row = await cur.fetchone()
        assert row is not None
        cur = await conn.execute("SELECT events FROM job_events WHERE job_id = %s", (job_id,))
        packed = [bytes(r[0]) for r in await cur.fetchall()]
    in_events = set()
    for p in packed:
        for _, _, data in unpack_events(p):
            event = event_pb2.JobEvent.FromString(data)
            for value in (event.result_json, event.job.payload_json):
                if value:
                    in_events.add(crypto.key_id_of(value))
    return {crypto.key_id_of(row[0]), crypto.key_id_of(row[1])}, in_events


async def test_reencrypt_seals_old_and_clear_values_again_reports_unreadable_and_pages(
    store: Store,
    events: Events,
    start_projector: StartProjector,
    results: ResultsClient,
    pool: AsyncConnectionPool[Any],
) -> None:
    events = Events(events.client, QUEUE)
    old_ring = Keyring.parse(OLD)
    old = sealed_history(old_ring, {"pin": "1111"}, {"ok": 1})
    clear = sealed_history(None, {"pin": "2222"}, {"ok": 2})
    lost = sealed_history(Keyring.parse(GONE), {"pin": "3333"}, {"ok": 3})
    other_queue = JobHistory(queue="emails", payload={"to": "a@b"})
    await project(store, events, start_projector, lifecycle(old), lifecycle(clear), lifecycle(lost))
    await project(store, Events(events.client, "emails"), start_projector, other_queue.lifecycle(start=1.0))

    crypto.configure(Encryption(Keyring.parse(f"{NEW}\n{OLD}"), frozenset({QUEUE})))
    # Before: both keys open what they sealed; what no key opens is answered sealed, not an error.
    got = (await results.stub.GetJob(R.ResultsServiceGetJobRequest(job_id=old.job_id))).job
    assert got.payload["pin"] == "1111" and got.result.struct_value["ok"] == 1
    unopened = (await results.stub.GetJob(R.ResultsServiceGetJobRequest(job_id=lost.job_id))).job
    assert unopened.payload[crypto.SEALED_KEY].startswith("$conveyor-sealed:v1:gone:")

    after, done, unreadable, examined = "", 0, set(), 0
    for _ in range(5):  # 3 jobs, 2 per call
        step = await results.stub.ReEncryptJobs(R.ReEncryptJobsRequest(queue=QUEUE, after_job_id=after, max_jobs=2))
        assert step.key_id == "new"
        done += step.jobs_reencrypted
        examined += step.examined
        unreadable |= set(step.unreadable)
        after = step.next_after_job_id
        if not after:
            break
    assert examined == 3 and done == 2 and unreadable == {lost.job_id}
    for job, pin in ((old, "1111"), (clear, "2222")):
        assert await stored_key_ids(pool, job.job_id) == ({"new"}, {"new"})
        got = (await results.stub.GetJob(R.ResultsServiceGetJobRequest(job_id=job.job_id))).job
        assert got.payload["pin"] == pin
        history = await results.stub.ListJobEvents(R.ListJobEventsRequest(job_id=job.job_id))
        assert history.events[-1].job.payload["pin"] == pin and history.events[-1].result.struct_value["ok"]
    assert await stored_key_ids(pool, lost.job_id) == ({"gone"}, {"gone"})  # left as it was
    assert await stored_key_ids(pool, other_queue.job_id) == ({""}, {""})  # another queue: untouched

    again = await results.stub.ReEncryptJobs(R.ReEncryptJobsRequest(queue=QUEUE))
    assert again.jobs_reencrypted == 0 and again.events_reencrypted == 0 and list(again.unreadable) == [lost.job_id]

    # The old key can go: everything it sealed was sealed again.
    crypto.configure(Encryption(Keyring.parse(NEW), frozenset({QUEUE})))
    assert (await results.stub.GetJob(R.ResultsServiceGetJobRequest(job_id=old.job_id))).job.payload["pin"] == "1111"


async def test_reencrypt_refuses_without_a_keyring_and_bad_arguments(results: ResultsClient) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await results.stub.ReEncryptJobs(R.ReEncryptJobsRequest(queue=QUEUE))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "no keyring" in (err.value.details() or "")
    crypto.configure(Encryption(Keyring.parse(NEW)))
    for request in (
        R.ReEncryptJobsRequest(queue="bad queue!"),
        R.ReEncryptJobsRequest(queue=QUEUE, max_jobs=20_000),
        R.ReEncryptJobsRequest(queue=QUEUE, after_job_id="nope"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await results.stub.ReEncryptJobs(request)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_payload_search_refuses_encrypted_queues_and_says_why(results: ResultsClient) -> None:
    crypto.configure(Encryption(Keyring.parse(NEW), frozenset({QUEUE})))
    where = [R.FieldFilter(path="pin", op=R.FIELD_OPERATOR_EXISTS)]
    for request, says in (
        (R.ListJobsRequest(queue=QUEUE, where=where), "queue 'vault' is encrypted at rest"),
        (R.ListJobsRequest(where=where), "need a queue that is not encrypted: the payloads of vault"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await results.stub.ListJobs(request)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert says in (err.value.details() or "")
    # A clear queue is searched; an encrypted one is still listed without payload conditions.
    await results.stub.ListJobs(R.ListJobsRequest(queue="emails", where=where))
    await results.stub.ListJobs(R.ListJobsRequest(queue=QUEUE, labels={"team": "a"}))
    crypto.configure(Encryption(Keyring.parse(NEW), frozenset({"*"})))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await results.stub.ListJobs(R.ListJobsRequest(queue="emails", where=where))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
