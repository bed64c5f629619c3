"""The worker's Python work per job, without Redis: its claim/run/complete loops on a fake script layer.

    .venv/bin/python bench/worker_loop_cost.py [--n 20000] [--reps 7] [--mode async|sync]
    /work/wt-base/.venv/bin/python bench/worker_loop_cost.py ...   # the same, on that checkout's code

bench/worker_cost.py measures a real worker process against a real Redis, which is the figure
that counts but moves by ±15 % on a shared machine. This one isolates what a change to the
worker's own code is worth: a real QueueRunner (concurrency 50, uvloop, the real Scripts client
side: argument packing and reply parsing) whose claim and complete scripts are replaced by
in-memory fakes that answer as Redis would (the claim hands out pre-built replies of stored
jobs, as the producer's build_job writes them; the complete answers an event id per outcome).
It reports the process CPU time (time.process_time) per job from the first claim to the last
outcome, the median of --reps runs of N jobs. No network I/O, so the figure is below
worker_cost.py's by the socket and Redis-client cost per round trip (per batch, not per job).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from typing import Any

import uvloop
from worker_cost_handlers import handlers  # the same no-op handlers as bench/worker_cost.py

from conveyor.common import logs
from conveyor.common.enqueue import build_job
from conveyor.common.keys import queue_keys
from conveyor.common.scripts import Scripts
from conveyor.common.settings import WorkerSettings
from conveyor.common.validate import validate_all
from conveyor.v1 import producer_service_pb2 as p
from conveyor.worker.runner import QueueRunner, Slots

PAYLOAD = b'{"data": "' + b"x" * 88 + b'"}'


def stored_job(job_type: str) -> bytes:
    valid = validate_all([p.EnqueueRequest(queue="cost", type=job_type, payload_json=PAYLOAD)], 1 << 20, False)[0]
    return build_job(valid, 5, time.time_ns())[0]


class FakeRedis:
    """What the claim and complete scripts would answer, in memory."""

    def __init__(self, n: int, job: bytes) -> None:
        now_ms = int(time.time() * 1000)
        self.left = n
        self.n = n
        self.job = job
        self.seq = 0
        self.now_ms = now_ms
        self.recorded = 0
        self.all_recorded = asyncio.Event()
        # A ULID whose time part is now (Crockford base32 of the ms, then 16 random characters).
        alphabet = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
        head = "".join(alphabet[(now_ms >> (5 * i)) & 31] for i in reversed(range(10)))
        self.ulid_head = head

    async def claim(self, keys: Any = None, args: Any = None) -> Any:
        count = int(args[2])
        take = min(count, self.left)
        self.left -= take
        raw: list[Any] = []
        for _ in range(take):
            self.seq += 1
            ulid = f"{self.ulid_head}{self.seq:016d}"
            raw += [
                5,
                f"{self.now_ms}-{self.seq}".encode(),
                ulid.encode(),
                1,
                self.job,
                f"{self.now_ms}-{self.seq}".encode(),
            ]
        if not take:
            await self.all_recorded.wait()
        return [raw, [b"0-0"] * 11, None]

    async def recover(self, keys: Any = None, args: Any = None) -> Any:
        return []

    async def complete(self, keys: Any = None, args: Any = None) -> Any:
        count = int(args[3])
        self.recorded += count
        if self.recorded >= self.n:
            self.all_recorded.set()
        return [f"{self.now_ms}-{i}".encode() for i in range(count)]


async def run_once(n: int, job_type: str) -> float:
    settings = WorkerSettings(redis_url="redis://127.0.0.1:1/0", worker_id="cost-worker", poll_interval_s=1.0)
    fake = FakeRedis(n, stored_job(job_type))
    scripts = Scripts.__new__(Scripts)
    scripts._claim = fake.claim  # type: ignore[assignment]
    scripts._complete = fake.complete  # type: ignore[assignment]
    scripts._recover = fake.recover  # type: ignore[assignment]
    slots = Slots(50)
    runner = QueueRunner(queue_keys("cost"), None, None, scripts, handlers, settings, slots)  # type: ignore[arg-type]
    stop, drained = asyncio.Event(), asyncio.Event()
    started = time.process_time()
    completer = asyncio.create_task(runner.complete_loop(stop, drained))
    claimer = asyncio.create_task(runner.claim_loop(stop))
    await asyncio.wait([asyncio.ensure_future(fake.all_recorded.wait()), claimer, completer],
                       return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
    for task in (claimer, completer):
        if task.done():
            task.result()  # a crash of a loop is a failed measurement
    spent = time.process_time() - started
    stop.set()
    drained.set()
    await asyncio.gather(claimer, completer, return_exceptions=True)
    return spent / n * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--mode", choices=["async", "sync"], default="async")
    a = ap.parse_args()
    logs.configure(service="worker", level="warning", fmt="json")  # as the bench's worker processes
    job_type = "cost.noop" if a.mode == "async" else "cost.noop_sync"
    figures = []
    for _ in range(a.reps):
        figures.append(
            uvloop.run(run_once(a.n, job_type)) if hasattr(uvloop, "run") else asyncio.run(run_once(a.n, job_type))
        )
    figures.sort()
    print(
        f"{a.mode}: {statistics.median(figures):.2f} µs of worker CPU per job (median of {a.reps}, "
        f"min {figures[0]:.2f}, max {figures[-1]:.2f}, n={a.n}; no Redis I/O)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
