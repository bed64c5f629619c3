"""ConveyorClient.request and the coalescer's batching, with the gRPC calls replaced by gates.

The coalescer's rules (how calls are grouped, how many batches are out, what a caller gets when
its batch fails) are timing-free here: each batch waits on a gate the test opens. The same code
against a real producer is in tests/integration/test_client.py.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from types import MappingProxyType
from typing import Any

import pytest

from conveyor.common.client import CLIENT_KEY_WINDOW, ConveyorClient, _Coalescer
from conveyor.common.errors import InvalidArgument, Unavailable
from conveyor.v1 import job_pb2
from conveyor.v1 import producer_service_pb2 as p
from tests.support.wait import wait_for


def test_request_sets_every_option_given() -> None:
    req = ConveyorClient.request(
        "mail",
        "mail.send",
        {"to": "a@example.com"},
        idempotency_key="order-7",
        priority=9,
        timeout=timedelta(seconds=90),
        max_attempts=4,
        labels={"tenant": "acme"},
        rate_key="acme",
        delay=timedelta(milliseconds=1500),
    )
    expected = p.EnqueueRequest(
        queue="mail",
        type="mail.send",
        payload_json=b'{"to":"a@example.com"}',
        idempotency_key="order-7",
        priority=9,
        labels={"tenant": "acme"},
        rate_key="acme",
    )
    expected.timeout.FromTimedelta(timedelta(seconds=90))
    expected.delay.FromTimedelta(timedelta(milliseconds=1500))
    expected.retry.CopyFrom(job_pb2.RetryPolicy(max_attempts=4))
    assert req == expected
    assert not req.HasField("idempotency_window")


def test_request_takes_any_mapping_for_payload_and_labels() -> None:
    req = ConveyorClient.request("q", "t", MappingProxyType({"a": 1}), labels=MappingProxyType({"k": "v"}))
    assert (req.payload_json, dict(req.labels)) == (b'{"a":1}', {"k": "v"})


def test_request_leaves_unset_options_unset() -> None:
    req = ConveyorClient.request("mail", "mail.send")
    assert req.payload_json == b"{}"
    for field in ("delay", "timeout", "retry"):
        assert not req.HasField(field)
    assert (req.priority, req.rate_key, dict(req.labels)) == (0, "", {})


def test_request_without_a_key_gets_a_fresh_client_key_with_its_window() -> None:
    keys = {ConveyorClient.request("q", "t").idempotency_key for _ in range(10_000)}
    assert len(keys) == 10_000
    assert all(key.startswith("client:") and len(key.encode()) <= 128 for key in keys)
    req = ConveyorClient.request("q", "t")
    assert req.idempotency_window.ToTimedelta() == CLIENT_KEY_WINDOW


def _key_in_child(conn: Any) -> None:
    conn.send(ConveyorClient.request("q", "t").idempotency_key)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_does_not_hand_out_its_parents_keys() -> None:
    ConveyorClient.request("q", "t")  # the parent holds random bytes drawn for keys to come
    ctx = multiprocessing.get_context("fork")
    mine, theirs = ctx.Pipe()
    child = ctx.Process(target=_key_in_child, args=(theirs,))
    child.start()
    child_key = mine.recv()
    child.join(10)
    parent_next = {ConveyorClient.request("q", "t").idempotency_key for _ in range(400)}
    assert child_key not in parent_next


def test_keys_made_from_many_threads_are_distinct() -> None:
    def make(_: int) -> list[str]:
        return [ConveyorClient.request("q", "t").idempotency_key for _ in range(2_000)]

    with ThreadPoolExecutor(8) as pool:
        keys = [k for chunk in pool.map(make, range(8)) for k in chunk]
    assert len(set(keys)) == len(keys) == 16_000


class GatedClient:
    """What the coalescer calls on its client: EnqueueBatch and Enqueue, each held until released."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.unary: list[str] = []
        self.out = 0
        self.most_out = 0
        self.held: list[asyncio.Event] = []  # one per call, in the order they were made
        self.all_open = False
        self.fail_with: Exception | None = None
        self.bad_type = "bad"

    async def enqueue_batch(self, requests: list[p.EnqueueRequest]) -> list[p.EnqueueResponse]:
        self.batches.append([r.idempotency_key for r in requests])
        return await self._held(
            lambda: [self._answer(r) for r in requests], bad=any(r.type == self.bad_type for r in requests)
        )

    async def _enqueue_one(self, req: p.EnqueueRequest) -> p.EnqueueResponse:
        self.unary.append(req.idempotency_key)
        return await self._held(lambda: self._answer(req), bad=req.type == self.bad_type)

    async def _held(self, answer: Any, bad: bool) -> Any:
        self.out += 1
        self.most_out = max(self.most_out, self.out)
        gate = asyncio.Event()
        if self.all_open:
            gate.set()
        self.held.append(gate)
        try:
            await gate.wait()
        finally:
            self.out -= 1
        if bad:
            raise InvalidArgument({"type": "bad"})
        if self.fail_with is not None:
            raise self.fail_with
        return answer()

    def open_all(self) -> None:
        self.all_open = True
        for gate in self.held:
            gate.set()

    @staticmethod
    def _answer(req: p.EnqueueRequest) -> p.EnqueueResponse:
        return p.EnqueueResponse(job_id=f"q/{req.idempotency_key}", created=True)


def _req(key: str, type: str = "t") -> p.EnqueueRequest:
    return p.EnqueueRequest(queue="q", type=type, idempotency_key=key)


async def _until(cond: Any, what: str) -> None:
    async def check() -> bool:
        return bool(cond())

    await wait_for(check, what, 5, interval=0)


async def test_a_lone_call_goes_alone_as_a_unary_enqueue() -> None:
    fake = GatedClient()
    fake.open_all()
    coalescer = _Coalescer(fake)  # type: ignore[arg-type]
    result = await coalescer.submit(_req("k1"))
    assert result.job_id == "q/k1"
    assert (fake.unary, fake.batches) == (["k1"], [])


async def test_calls_made_together_go_together_in_one_batch() -> None:
    fake = GatedClient()
    coalescer = _Coalescer(fake)  # type: ignore[arg-type]
    calls = [asyncio.ensure_future(coalescer.submit(_req(f"k{i}"))) for i in range(64)]
    await _until(lambda: fake.out == 1, "a batch out")
    assert [len(b) for b in fake.batches] == [64] and not fake.unary
    fake.open_all()
    results = await asyncio.gather(*calls)
    assert [r.job_id for r in results] == [f"q/k{i}" for i in range(64)]
    assert fake.batches == [[f"k{i}" for i in range(64)]]


async def test_calls_woken_by_one_answer_go_together_in_the_next_batch() -> None:
    fake = GatedClient()
    fake.open_all()
    coalescer = _Coalescer(fake)  # type: ignore[arg-type]

    async def caller(k: int) -> None:
        for round in range(3):
            await coalescer.submit(_req(f"k{k}-{round}"))

    await asyncio.gather(*(caller(k) for k in range(16)))
    assert [len(b) for b in fake.batches] == [16, 16, 16] and not fake.unary


async def test_no_more_than_max_batch_jobs_go_in_one_call() -> None:
    fake = GatedClient()
    coalescer = _Coalescer(fake)  # type: ignore[arg-type]
    calls = [asyncio.ensure_future(coalescer.submit(_req(f"k{i}"))) for i in range(_Coalescer.MAX_BATCH + 20)]
    await _until(lambda: fake.out == 2, "two batches out")
    assert [len(b) for b in fake.batches] == [_Coalescer.MAX_BATCH, 20]
    fake.open_all()
    await asyncio.gather(*calls)


async def test_calls_made_while_both_slots_are_out_go_together_when_one_comes_free() -> None:
    fake = GatedClient()
    coalescer = _Coalescer(fake)  # type: ignore[arg-type]
    first = asyncio.ensure_future(coalescer.submit(_req("a0")))
    await _until(lambda: fake.out == 1, "one call out")
    # A lone call went out at once; the next calls made together take the other slot.
    second = [asyncio.ensure_future(coalescer.submit(_req(f"b{i}"))) for i in range(3)]
    await _until(lambda: fake.out == 2, "two out")
    later = [asyncio.ensure_future(coalescer.submit(_req(f"c{i}"))) for i in range(7)]
    fake.held[0].set()
    await first
    await _until(lambda: len(fake.batches) == 2, "the waiting calls sent")
    fake.open_all()
    await asyncio.gather(*second, *later)
    assert fake.unary == ["a0"]
    assert fake.batches == [[f"b{i}" for i in range(3)], [f"c{i}" for i in range(7)]]


async def test_a_bad_call_in_a_batch_fails_alone_and_the_others_are_enqueued() -> None:
    fake = GatedClient()
    fake.open_all()
    coalescer = _Coalescer(fake)  # type: ignore[arg-type]
    calls = [coalescer.submit(_req(f"k{i}", type="bad" if i == 3 else "t")) for i in range(8)]
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert isinstance(results[3], InvalidArgument)
    assert [r.job_id for i, r in enumerate(results) if i != 3] == [f"q/k{i}" for i in range(8) if i != 3]


async def test_a_failed_batch_fails_each_of_its_callers() -> None:
    fake = GatedClient()
    fake.open_all()
    fake.fail_with = Unavailable("producer unreachable")
    coalescer = _Coalescer(fake)  # type: ignore[arg-type]
    results = await asyncio.gather(*(coalescer.submit(_req(f"k{i}")) for i in range(6)), return_exceptions=True)
    assert all(isinstance(r, Unavailable) for r in results)
    assert sum(len(b) for b in fake.batches) == 6


async def test_a_cancelled_send_cancels_its_callers_and_frees_its_slot() -> None:
    fake = GatedClient()
    coalescer = _Coalescer(fake)  # type: ignore[arg-type]
    calls = [asyncio.ensure_future(coalescer.submit(_req(f"k{i}"))) for i in range(6)]
    await _until(lambda: fake.out == 1, "the batch out")
    for task in list(coalescer._tasks):
        task.cancel()
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert all(isinstance(r, asyncio.CancelledError) for r in results)
    await _until(lambda: not coalescer._tasks, "the slots freed")
    fake.open_all()
    assert (await coalescer.submit(_req("after"))).job_id == "q/after"
