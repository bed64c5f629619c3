"""What every watcher of a tail shares: one serialized response per event, and a cheap bounded inbox."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc

from conveyor.producer.servicer import PRESERIALIZED, _bytes_or_message, add_to_server
from conveyor.producer.watch import LiveEvent, Subscription
from conveyor.v1 import event_pb2, producer_service_pb2, producer_service_pb2_grpc


def _live(n: int, type: int = event_pb2.EVENT_TYPE_PROGRESS) -> LiveEvent:
    event = event_pb2.JobEvent(id=f"{n}-0", job_id="q/01M90V0CXFC3KJE43D5E3ZAR32", type=type)  # type: ignore[arg-type]
    event.progress.percent = 50
    return LiveEvent((n, 0), event)


def test_one_encoding_is_both_a_watch_and_a_watch_queue_response() -> None:
    live = _live(1)
    assert producer_service_pb2.WatchResponse.FromString(live.data).event == live.event
    as_queue = producer_service_pb2.WatchQueueResponse.FromString(live.data)
    assert as_queue.WhichOneof("item") == "event" and as_queue.event == live.event
    assert live.data is live.data  # serialized once, however many watchers send it


def test_the_final_event_is_known_without_decoding() -> None:
    assert not _live(1).final
    assert _live(2, event_pb2.EVENT_TYPE_SUCCEEDED).final


async def test_the_inbox_holds_at_most_the_buffer_then_an_overflow_mark() -> None:
    sub = Subscription("u", buffer=3)
    for n in range(1, 10):
        sub.offer(_live(n))
    assert [x.key if x is not None else None for x in sub.inbox] == [(1, 0), (2, 0), (3, 0), None]
    assert sub.overflowed


async def test_wait_returns_when_an_event_arrives_and_at_once_when_one_is_there() -> None:
    sub = Subscription("u", buffer=10)
    waiting = asyncio.ensure_future(sub.wait())
    await asyncio.sleep(0)
    assert not waiting.done()
    sub.offer(_live(1))
    sub.offer(_live(2))
    await asyncio.wait_for(waiting, 1)
    await asyncio.wait_for(sub.wait(), 1)
    assert [x.key for x in sub.inbox if x is not None] == [(1, 0), (2, 0)]


async def test_a_cancelled_wait_leaves_no_waiter_behind() -> None:
    sub = Subscription("u", buffer=10)
    waiting = asyncio.ensure_future(sub.wait())
    await asyncio.sleep(0)
    waiting.cancel()
    await asyncio.gather(waiting, return_exceptions=True)
    sub.offer(_live(1))  # must not touch the cancelled waiter
    assert len(sub.inbox) == 1


class _Details(grpc.HandlerCallDetails):
    def __init__(self, method: str) -> None:
        self.method = method
        self.invocation_metadata = ()


class _Server:
    def __init__(self) -> None:
        self.generic: list[Any] = []
        self.registered: dict[str, Any] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        self.generic.extend(handlers)

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        self.registered = {f"/{service}/{name}": h for name, h in handlers.items()}


def test_only_the_streaming_methods_send_bytes_as_they_are() -> None:
    servicer = producer_service_pb2_grpc.ProducerServiceServicer()  # type: ignore[abstract]
    plain, ours = _Server(), _Server()
    producer_service_pb2_grpc.add_ProducerServiceServicer_to_server(servicer, plain)  # type: ignore[arg-type]
    add_to_server(servicer, ours)  # type: ignore[arg-type]
    assert ours.registered.keys() == plain.registered.keys()
    for path, handler in ours.registered.items():
        generated = plain.registered[path]
        assert handler.request_deserializer == generated.request_deserializer
        if path.rsplit("/", 1)[1] in PRESERIALIZED:
            assert handler.response_serializer is _bytes_or_message
            assert handler.response_streaming and not handler.request_streaming
        else:
            assert handler.response_serializer == generated.response_serializer
    (generic,) = ours.generic
    assert generic.service(_Details("/conveyor.v1.ProducerService/Watch")).response_serializer is _bytes_or_message


def test_bytes_pass_through_and_messages_are_still_serialized() -> None:
    data = _live(1).data
    assert _bytes_or_message(data) is data
    response = producer_service_pb2.WatchResponse(event=_live(1).event)
    assert _bytes_or_message(response) == data


def test_watch_and_watch_queue_are_served_by_the_watchers_own_generators() -> None:
    import inspect

    from conveyor.producer.history import History
    from conveyor.producer.servicer import ProducerServicer
    from conveyor.producer.watch import Watcher

    watcher = Watcher(None, None, None, History(""))  # type: ignore[arg-type]
    servicer = ProducerServicer(None, watcher, None, None)  # type: ignore[arg-type]
    assert servicer.Watch == watcher.watch and servicer.WatchQueue == watcher.watch_queue
    # gRPC tells generator handlers from others by this; it must hold without our interceptor too.
    assert inspect.isasyncgenfunction(servicer.Watch) and inspect.isasyncgenfunction(servicer.WatchQueue)
