"""Tracing (ADR 0018): one job gives one trace across producer, worker and results.

The producer, a worker and the results projector run in-process on the real Redis and
PostgreSQL, behind real gRPC channels; spans go to the SDK's InMemorySpanExporter.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

import pytest
import redis.asyncio
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from conveyor.common import tracing
from conveyor.common.keys import queue_keys
from conveyor.results.store import Store
from conveyor.v1 import job_pb2
from conveyor.v1 import producer_service_pb2 as p
from tests.integration.conftest import Producer, StartWorker
from tests.integration.results.conftest import StartProjector
from tests.integration.test_producer_worker import watch_all
from tests.support import handlers as test_handlers
from tests.support.wait import wait_for

# One provider for the test process: the API lets the global provider (the one handlers reach
# through opentelemetry.trace.get_tracer) be set once, so every test shares it and its exporter.
EXPORTER = InMemorySpanExporter()
PROVIDER = TracerProvider()
PROVIDER.add_span_processor(SimpleSpanProcessor(EXPORTER))

CALLER_TRACE = 0x0AF7651916CD43DD8448EB211C80319C
CALLER_SPAN = 0xB7AD6B7169203331
CALLER = [("traceparent", f"00-{CALLER_TRACE:032x}-{CALLER_SPAN:016x}-01"), ("tracestate", "vendor=abc")]


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Tracing on for this test, as OTEL_TRACES_EXPORTER would switch it on, with spans kept in memory."""
    EXPORTER.clear()
    tracing.install(PROVIDER)
    try:
        yield EXPORTER
    finally:
        tracing.install(None)
        EXPORTER.clear()


def named(finished: Sequence[ReadableSpan], name: str) -> list[ReadableSpan]:
    return [s for s in finished if s.name == name]


async def spans_of_job(exporter: InMemorySpanExporter, job_id: str, names: set[str]) -> list[ReadableSpan]:
    """Wait until every span named in ``names`` about ``job_id`` has ended; return all of the job's trace."""

    async def ready() -> list[ReadableSpan] | None:
        finished = exporter.get_finished_spans()
        mine = [s for s in finished if (s.attributes or {}).get("messaging.message.id") == job_id]
        if not names <= {s.name for s in mine}:
            return None
        trace_id = mine[0].context.trace_id
        return [s for s in finished if s.context.trace_id == trace_id]

    return await wait_for(ready, f"spans {sorted(names)} of {job_id}", within=20)


async def test_one_job_gives_one_trace_across_producer_worker_and_results(
    spans: InMemorySpanExporter,
    producer: Producer,
    start_worker: StartWorker,
    store: Store,
    start_projector: StartProjector,
) -> None:
    reply = await producer.stub.Enqueue(p.EnqueueRequest(queue="default", type="test.traced"), metadata=CALLER)
    await start_worker()
    await start_projector(store)
    got = await spans_of_job(spans, reply.job_id, {"send default", "process default", "upsert jobs"})

    # One trace: the caller's, continued from its traceparent metadata.
    assert {s.context.trace_id for s in got} == {CALLER_TRACE}
    (send,) = named(got, "send default")
    (process,) = named(got, "process default")
    (render,) = named(got, "render")
    (write,) = named(got, "upsert jobs")

    assert send.kind == SpanKind.PRODUCER
    assert send.parent is not None and send.parent.span_id == CALLER_SPAN and send.parent.is_remote
    assert dict(send.attributes or {}) == {
        "messaging.system": "conveyor",
        "messaging.destination.name": "default",
        "messaging.operation.type": "send",
        "messaging.operation.name": "send",
        "messaging.message.id": reply.job_id,
        "conveyor.job.type": "test.traced",
        "conveyor.job.created": True,
    }

    # The worker's span: a child of the job's creation context (the send span), and linked to it.
    assert process.kind == SpanKind.CONSUMER
    assert process.parent is not None and process.parent.span_id == send.context.span_id
    assert [link.context.span_id for link in process.links] == [send.context.span_id]
    attributes = dict(process.attributes or {})
    assert attributes == {
        "messaging.system": "conveyor",
        "messaging.destination.name": "default",
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
        "messaging.message.id": reply.job_id,
        "messaging.consumer.group.name": "workers",
        "messaging.client.id": "test-worker-1",
        "conveyor.job.type": "test.traced",
        "conveyor.job.attempt": 1,
        "conveyor.job.state": "JOB_STATE_SUCCEEDED",
    }
    assert process.status.status_code == StatusCode.UNSET
    # The handler's own span is inside the process span.
    assert render.parent is not None and render.parent.span_id == process.context.span_id
    assert process.start_time <= render.start_time <= render.end_time <= process.end_time  # type: ignore[operator]

    # The results service's PostgreSQL write of the outcome, in the same trace.
    assert write.kind == SpanKind.CLIENT
    assert write.parent is not None and write.parent.span_id == send.context.span_id
    assert (write.attributes or {})["db.system.name"] == "postgresql"
    assert (write.attributes or {})["messaging.message.id"] == reply.job_id
    assert process.end_time <= write.end_time  # type: ignore[operator]

    # The stored job carries the send span's context, the caller's tracestate with it.
    job = (await producer.stub.GetJob(p.GetJobRequest(job_id=reply.job_id))).job
    assert job.traceparent == f"00-{CALLER_TRACE:032x}-{send.context.span_id:016x}-01"
    assert job.tracestate == "vendor=abc"


async def test_a_sync_handlers_span_is_inside_the_process_span_and_a_call_without_context_starts_a_trace(
    spans: InMemorySpanExporter, producer: Producer, start_worker: StartWorker
) -> None:
    reply = await producer.stub.Enqueue(p.EnqueueRequest(queue="default", type="test.traced_sync"))
    await start_worker()
    got = await spans_of_job(spans, reply.job_id, {"send default", "process default"})
    (send,) = named(got, "send default")
    (process,) = named(got, "process default")
    render = await wait_for(
        lambda: _async(named(spans.get_finished_spans(), "render in a thread")), "the sync handler's span"
    )
    assert send.parent is None  # no traceparent came with the call: the job's trace starts here
    assert process.parent is not None and process.parent.span_id == send.context.span_id
    assert render[0].parent is not None and render[0].parent.span_id == process.context.span_id
    assert render[0].context.trace_id == send.context.trace_id


async def test_an_isolated_handler_gets_its_process_spans_traceparent_to_continue_the_trace(
    spans: InMemorySpanExporter, producer: Producer, start_worker: StartWorker
) -> None:
    reply = await producer.stub.Enqueue(p.EnqueueRequest(queue="iso-traced", type="test.isolated_echo"))
    await start_worker(queues=("iso-traced",))
    got = await spans_of_job(spans, reply.job_id, {"process iso-traced"})
    (process,) = named(got, "process iso-traced")
    events = await watch_all(producer, reply.job_id)
    result = events[-1].result.struct_value
    ctx = process.context
    assert result["traceparent"] == f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"
    assert int(result["pid"]) != os.getpid()  # ran in the child process


async def test_a_retried_job_keeps_its_trace_each_attempt_a_process_span_of_it(
    spans: InMemorySpanExporter, producer: Producer, start_worker: StartWorker
) -> None:
    test_handlers.gate.set()  # attempt 2 of test.fail_then_gate runs through
    retry = job_pb2.RetryPolicy(max_attempts=2, backoff=job_pb2.BACKOFF_FIXED)
    retry.base.FromMilliseconds(100)
    reply = await producer.stub.Enqueue(p.EnqueueRequest(queue="retried", type="test.fail_then_gate", retry=retry))
    await start_worker(queues=("retried",))

    async def two_attempts() -> list[ReadableSpan] | None:
        got = named(spans.get_finished_spans(), "process retried")
        return got if len(got) == 2 else None

    first, second = sorted(await wait_for(two_attempts, "two process spans"), key=lambda s: s.start_time or 0)
    (send,) = named(spans.get_finished_spans(), "send retried")
    for span in (first, second):  # the stored job (parked between attempts) kept its context
        assert span.parent is not None and span.parent.span_id == send.context.span_id
        assert span.context.trace_id == send.context.trace_id
        assert (span.attributes or {})["messaging.message.id"] == reply.job_id
    assert [(s.attributes or {})["conveyor.job.attempt"] for s in (first, second)] == [1, 2]
    assert first.status.status_code == StatusCode.ERROR
    assert (first.attributes or {})["conveyor.job.state"] == "JOB_STATE_RETRY_SCHEDULED"
    assert second.status.status_code == StatusCode.UNSET


async def test_a_failed_job_has_its_error_on_the_process_span(
    spans: InMemorySpanExporter, producer: Producer, start_worker: StartWorker
) -> None:
    reply = await producer.stub.Enqueue(
        p.EnqueueRequest(
            queue="default", type="demo.fail", payload_json=b'{"message": "printer on fire", "permanent": true}'
        )
    )
    await start_worker()
    got = await spans_of_job(spans, reply.job_id, {"process default"})
    (process,) = named(got, "process default")
    assert process.status.status_code == StatusCode.ERROR
    assert process.status.description == "PermanentError: printer on fire"
    (event,) = process.events
    assert event.name == "exception"
    assert dict(event.attributes or {}) == {"exception.type": "PermanentError", "exception.message": "printer on fire"}
    assert (process.attributes or {})["conveyor.job.state"] == "JOB_STATE_FAILED"


async def test_a_batch_gives_each_job_its_own_send_span_under_the_callers_span(
    spans: InMemorySpanExporter, producer: Producer
) -> None:
    reply = await producer.stub.EnqueueBatch(
        p.EnqueueBatchRequest(
            jobs=[
                p.EnqueueRequest(queue="default", type="demo.noop"),
                p.EnqueueRequest(queue="other", type="demo.noop"),
            ]
        ),
        metadata=CALLER,
    )
    ids = [r.job_id for r in reply.results]
    sends = {(s.attributes or {})["messaging.message.id"]: s for s in spans.get_finished_spans()}
    assert set(sends) == set(ids)
    assert [sends[i].name for i in ids] == ["send default", "send other"]
    for span in sends.values():
        assert span.kind == SpanKind.PRODUCER
        assert span.parent is not None and span.parent.span_id == CALLER_SPAN
        assert (span.attributes or {})["messaging.batch.message_count"] == 2
    assert sends[ids[0]].context.span_id != sends[ids[1]].context.span_id


async def test_with_tracing_off_nothing_is_added_to_the_stored_job_and_no_span_is_made(
    producer: Producer, redis_client: redis.asyncio.Redis, start_worker: StartWorker
) -> None:
    assert tracing.tracer is None
    EXPORTER.clear()
    assert tracing.current_traceparent() == ""
    reply = await producer.stub.Enqueue(
        p.EnqueueRequest(queue="untraced", type="demo.echo", payload_json=b'{"a":1}'), metadata=CALLER
    )
    ulid = reply.job_id.split("/", 1)[1]
    entries = await redis_client.xrange(queue_keys("untraced").band(5))
    (stored,) = [fields[b"d"] for _, fields in entries if fields[b"j"].decode() == ulid]
    job = job_pb2.Job.FromString(stored)
    assert job.traceparent == "" and job.tracestate == ""
    assert b"traceparent" not in stored and CALLER[0][1].encode() not in stored
    # Exactly the fields of an untraced job: type, priority, payload.
    assert [f.name for f, _ in job.ListFields()] == ["type", "payload_json", "priority"]

    await start_worker(queues=("untraced",))

    async def done() -> bool:
        got = (await producer.stub.GetJob(p.GetJobRequest(job_id=reply.job_id))).job
        return got.state == job_pb2.JOB_STATE_SUCCEEDED

    await wait_for(done, "the untraced job to succeed")
    assert EXPORTER.get_finished_spans() == ()


async def _async(value: list[ReadableSpan]) -> list[ReadableSpan]:
    return value
