"""ProducerService: thin gRPC methods over Enqueuer, Watcher and JobReader.

Watch and WatchQueue send responses that the Watcher serialized already (once per event
for all watchers, ADR 0011), so the service is registered with :func:`add_to_server`,
which lets those two methods hand bytes to gRPC.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from opentelemetry import context as otel_context

from conveyor.common import tracing
from conveyor.common.enqueue import Enqueuer
from conveyor.producer.cancel import Canceller
from conveyor.producer.coalesce import Coalescer
from conveyor.producer.jobs import JobReader
from conveyor.producer.watch import Watcher
from conveyor.v1 import producer_service_pb2, producer_service_pb2_grpc

Context = grpc.aio.ServicerContext[Any, Any]


class ProducerServicer(producer_service_pb2_grpc.ProducerServiceServicer):
    """The front door: validates and enqueues jobs, streams their events."""

    def __init__(
        self, enqueuer: Enqueuer, watcher: Watcher, jobs: JobReader, canceller: Canceller, max_batch: int = 1000
    ) -> None:
        self._enqueuer = enqueuer
        self._coalescer = Coalescer(enqueuer, max_batch)
        self._watcher = watcher
        self._jobs = jobs
        self._canceller = canceller
        # Watch and WatchQueue are the Watcher's generators, not generators around them: a layer
        # of async generator costs about 4 us on every event sent to every watcher (ADR 0011).
        self.Watch = watcher.watch  # type: ignore[method-assign]
        self.WatchQueue = watcher.watch_queue  # type: ignore[method-assign]

    async def Enqueue(
        self, request: producer_service_pb2.EnqueueRequest, context: Context
    ) -> producer_service_pb2.EnqueueResponse:
        if tracing.tracer is None:
            # Calls to the same queue that arrive together share one write (ADR 0032).
            return await self._coalescer.enqueue(request)
        # Traced: each call's job gets its send span in the caller's trace, written on its own.
        token = otel_context.attach(tracing.context_from_metadata(context.invocation_metadata()))
        try:
            (response,) = await self._enqueuer.enqueue([request], batch=False)
        finally:
            otel_context.detach(token)
        return response

    async def EnqueueBatch(
        self, request: producer_service_pb2.EnqueueBatchRequest, context: Context
    ) -> producer_service_pb2.EnqueueBatchResponse:
        if tracing.tracer is None:
            results = await self._enqueuer.enqueue(list(request.jobs), batch=True)
            return producer_service_pb2.EnqueueBatchResponse(results=results)
        # The caller's trace context (W3C traceparent metadata) parents each job's send span.
        token = otel_context.attach(tracing.context_from_metadata(context.invocation_metadata()))
        try:
            results = await self._enqueuer.enqueue(list(request.jobs), batch=True)
        finally:
            otel_context.detach(token)
        return producer_service_pb2.EnqueueBatchResponse(results=results)

    async def Watch(  # type: ignore[override]  # serialized WatchResponse messages (see add_to_server)
        self, request: producer_service_pb2.WatchRequest, context: Context
    ) -> AsyncIterator[bytes]:
        # Only a fallback: __init__ binds Watch to the Watcher's generator itself.
        async for data in self._watcher.watch(request, context):
            yield data

    async def WatchQueue(  # type: ignore[override]  # serialized WatchQueueResponse messages
        self, request: producer_service_pb2.WatchQueueRequest, context: Context
    ) -> AsyncIterator[bytes]:
        # Only a fallback: __init__ binds WatchQueue to the Watcher's generator itself.
        async for data in self._watcher.watch_queue(request, context):
            yield data

    async def GetJob(
        self, request: producer_service_pb2.GetJobRequest, context: Context
    ) -> producer_service_pb2.GetJobResponse:
        return producer_service_pb2.GetJobResponse(job=await self._jobs.get(request.job_id))

    async def CancelJob(
        self, request: producer_service_pb2.CancelJobRequest, context: Context
    ) -> producer_service_pb2.CancelJobResponse:
        return await self._canceller.cancel(request.job_id, request.reason)


#: Methods whose servicer yields responses already serialized.
PRESERIALIZED = ("Watch", "WatchQueue")


def _bytes_or_message(response: Any) -> bytes:
    # Bytes pass through untouched; a message (from any other code path) is serialized as usual.
    return response if response.__class__ is bytes else response.SerializeToString()


class _Recorder:
    """Stands in for a server to learn the handlers the generated registration function builds."""

    def __init__(self) -> None:
        self.service = ""
        self.handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        self.service, self.handlers = service, dict(handlers)


def add_to_server(
    servicer: ProducerServicer,
    server: grpc.aio.Server,
    generated: Callable[[Any, Any], None] = producer_service_pb2_grpc.add_ProducerServiceServicer_to_server,
) -> None:
    """Register ``servicer`` as the generated function would, with Watch and WatchQueue sending bytes.

    The generated handlers serialize every response with the message's SerializeToString;
    for the streaming methods that would be once per watcher, so their serializer lets the
    servicer's bytes through instead. Every other method keeps the generated handler.
    """
    recorder = _Recorder()
    generated(servicer, recorder)
    handlers = recorder.handlers
    for name in PRESERIALIZED:
        handler = handlers[name]
        assert handler.unary_stream is not None
        handlers[name] = grpc.unary_stream_rpc_method_handler(
            handler.unary_stream,
            request_deserializer=handler.request_deserializer,
            response_serializer=_bytes_or_message,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(recorder.service, handlers),))
    server.add_registered_method_handlers(recorder.service, handlers)
