"""Server interceptor: request context, one log line per RPC, errors to gRPC status.

This is the only place that aborts an RPC. ConveyorError subclasses carry their
code and google.rpc details; store outages become UNAVAILABLE; anything else is
logged with its traceback and sent as INTERNAL "internal error" — never a stack
trace on the wire.

It also ends server streams (Watch) when the server shuts down: ``shutdown()`` makes
every open stream end at once with UNAVAILABLE, so a client resumes on another
replica with ``after_event_id`` instead of hanging until the grace period expires.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import grpc
import structlog
from google.protobuf import any_pb2
from google.rpc import status_pb2
from grpc_status import rpc_status

from conveyor.common import faults, metrics
from conveyor.common.auth import CALLER, OPEN_SERVICES, Authorizer
from conveyor.common.errors import ConveyorError, Internal, InvalidArgument, Unavailable

log = structlog.get_logger("conveyor.rpc")

Continuation = Callable[[grpc.HandlerCallDetails], Awaitable["grpc.RpcMethodHandler[Any, Any] | None"]]

#: Why an open server stream ends when its server shuts down (a client retries elsewhere).
SHUTTING_DOWN = (
    "server shutting down; call again (another replica answers), "
    "and resume a Watch with after_event_id set to the id of the last event received"
)


class _OpenStream:
    """A server stream in progress: its task, and whether it is inside the servicer's generator."""

    __slots__ = ("inside", "stopping", "task")

    def __init__(self, task: asyncio.Task[Any] | None) -> None:
        self.task = task
        #: True while the task awaits the servicer's next response (a cancel lands in the servicer).
        self.inside = False
        #: Set by shutdown(): end the stream at the next chance.
        self.stopping = False


def to_status(err: ConveyorError) -> grpc.Status:
    """The gRPC status (with packed google.rpc details) that stands for ``err``."""
    details = []
    for message in err.details():
        packed = any_pb2.Any()
        packed.Pack(message)
        details.append(packed)
    return rpc_status.to_status(status_pb2.Status(code=err.code.value[0], message=err.message, details=details))


class ServerInterceptor(grpc.aio.ServerInterceptor):
    """Binds rpc/peer/request_id into the log context and maps exceptions to statuses.

    Args:
        unavailable: Exception types meaning a backing store is down (mapped to UNAVAILABLE).
        classify: Asked in turn what an exception means for the caller (None: not theirs); the
            Redis table (faults.client_error) is always asked first.
        auth: Checks each call's bearer token and role (None: every caller is let in).
    """

    def __init__(
        self,
        unavailable: tuple[type[BaseException], ...] = (),
        classify: Sequence[Callable[[BaseException], ConveyorError | None]] = (),
        auth: Authorizer | None = None,
    ) -> None:
        self._auth = auth
        self._unavailable = unavailable
        self._classify = (faults.client_error, *classify)
        self._streams: set[_OpenStream] = set()
        # A method's wrapped handler is the same for every call: build it once, not per call
        # (that cost a third as much as the whole gRPC call).
        self._wrapped: dict[str, grpc.RpcMethodHandler[Any, Any] | None] = {}
        self._closing = False

    def shutdown(self) -> None:
        """End every open server stream with UNAVAILABLE (SHUTTING_DOWN), and any stream started from now on.

        A stream waiting for its next response is cancelled there (the servicer's ``finally``
        blocks run); one busy sending a response ends right after that send. Unary calls are
        not touched: they finish within the server's grace period.
        """
        self._closing = True
        for open_stream in list(self._streams):
            open_stream.stopping = True
            if open_stream.inside and open_stream.task is not None:
                open_stream.task.cancel()

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        method = handler_call_details.method
        if method in self._wrapped:
            return self._wrapped[method]
        handler = await continuation(handler_call_details)
        wrapped = handler
        if handler is not None:
            deserializer = _lenient(handler.request_deserializer)
            if handler.unary_unary is not None:
                wrapped = grpc.unary_unary_rpc_method_handler(
                    self._wrap_unary(handler.unary_unary, method),
                    request_deserializer=deserializer,
                    response_serializer=handler.response_serializer,
                )
            elif handler.unary_stream is not None:
                wrapped = grpc.unary_stream_rpc_method_handler(
                    self._wrap_stream(handler.unary_stream, method),
                    request_deserializer=deserializer,
                    response_serializer=handler.response_serializer,
                )
        self._wrapped[method] = wrapped
        return wrapped

    def _wrap_unary(self, behavior: Any, method: str) -> Any:
        async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            started = time.perf_counter()
            with structlog.contextvars.bound_contextvars(rpc=method, request_id=_request_id(context)):
                code = grpc.StatusCode.OK
                try:
                    _check_parsed(request)
                    self._authorize(method, request, context)
                    return await behavior(request, context)
                except BaseException as exc:
                    code, status = self._status_for(exc, context)
                    if status is not None:
                        await context.abort(status.code, status.details, status.trailing_metadata)
                    raise
                finally:
                    _finished(method, code, started)

        return unary

    def _wrap_stream(self, behavior: Any, method: str) -> Any:
        async def stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            started = time.perf_counter()
            with structlog.contextvars.bound_contextvars(rpc=method, request_id=_request_id(context)):
                code = grpc.StatusCode.OK
                try:
                    _check_parsed(request)
                    self._authorize(method, request, context)
                    async for response in self._until_shutdown(behavior(request, context)):
                        yield response
                except BaseException as exc:
                    code, status = self._status_for(exc, context)
                    if status is not None:
                        await context.abort(status.code, status.details, status.trailing_metadata)
                    raise
                finally:
                    _finished(method, code, started)

        return stream

    def _authorize(self, method: str, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        if self._auth is not None and not method.startswith(OPEN_SERVICES):
            token = self._auth.identify(context.invocation_metadata())
            # Bound before the role check, so a refused call's log line says who was refused.
            structlog.contextvars.bind_contextvars(caller=token.name)
            CALLER.set(token)
            self._auth.authorize(token, method, request)

    async def _until_shutdown(self, responses: AsyncIterator[Any]) -> AsyncIterator[Any]:
        """``responses``, until shutdown() ends them with Unavailable(SHUTTING_DOWN).

        The stream runs in the RPC's own task (no task per response): shutdown() cancels that
        task only while it waits inside ``responses``, so the cancellation never lands in
        gRPC's own send of a response.
        """
        task = asyncio.current_task()
        me = _OpenStream(task)
        self._streams.add(me)
        try:
            while True:
                if self._closing or me.stopping:
                    raise Unavailable(SHUTTING_DOWN)
                me.inside = True
                try:
                    response = await anext(responses)
                except StopAsyncIteration:
                    return
                except asyncio.CancelledError:
                    if not me.stopping or task is None:
                        raise  # the client went away, or the server's grace expired
                    task.uncancel()
                    raise Unavailable(SHUTTING_DOWN) from None
                finally:
                    me.inside = False
                yield response
        finally:
            self._streams.discard(me)
            aclose = getattr(responses, "aclose", None)
            if aclose is not None:
                await aclose()  # the servicer's finally blocks run now, not at garbage collection

    def _status_for(
        self, exc: BaseException, context: grpc.aio.ServicerContext[Any, Any]
    ) -> tuple[grpc.StatusCode, grpc.Status | None]:
        """The code the RPC ends with for ``exc``, and the status to abort with (None: nothing to map).

        The code is known before aborting (context.abort raises), so the rpc_finished line
        reports the real code rather than OK.
        """
        if isinstance(exc, grpc.aio.AbortError):
            code = context.code()
            return (code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN), None
        if not isinstance(exc, Exception):  # cancellation, shutdown: let it through
            return grpc.StatusCode.CANCELLED, None
        if isinstance(exc, ConveyorError):
            err = exc
        elif (known := self._known(exc)) is not None:
            log.warning("backend_fault", error=str(exc), error_type=type(exc).__name__, status=known.code.name)
            err = known
        elif isinstance(exc, self._unavailable):
            log.warning("backend_unavailable", error=str(exc), error_type=type(exc).__name__)
            err = Unavailable(f"a backing store is unavailable ({type(exc).__name__}); retry shortly")
        else:
            log.error("rpc_failed", exc_info=exc)
            err = Internal("internal error")
        status = to_status(err)
        return status.code, status

    def _known(self, exc: BaseException) -> ConveyorError | None:
        for classify in self._classify:
            err = classify(exc)
            if err is not None:
                return err
        return None


def _request_id(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    """The caller's x-request-id, or a new one."""
    for key, value in context.invocation_metadata() or ():
        if key == "x-request-id":
            return str(value)
    return os.urandom(8).hex()


class _Unparsable:
    """Stands in for a request whose bytes are not the message they claim to be."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _lenient(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """Wrap a request deserializer so garbage bytes become INVALID_ARGUMENT, not INTERNAL."""
    if deserializer is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:
            return _Unparsable(exc)

    return parse


def _check_parsed(request: Any) -> None:
    if isinstance(request, _Unparsable):
        raise InvalidArgument({"request": f"the request bytes are not a valid protobuf message ({request.error})"})


def _finished(method: str, code: grpc.StatusCode, started: float) -> None:
    seconds = time.perf_counter() - started
    metrics.rpc_finished(method, code, seconds)
    duration_ms = round(seconds * 1000, 3)
    if code == grpc.StatusCode.OK:
        # Debug level: the hot path (Enqueue) would spend more on this line than on its work.
        log.debug("rpc_finished", rpc=method, code=code.name, duration_ms=duration_ms)
    else:
        log.info("rpc_finished", rpc=method, code=code.name, duration_ms=duration_ms)
