"""Load driver for bench/run.py: one client process that enqueues jobs over gRPC and reports.

Not meant to be run by hand (bench/run.py starts it), but it can be:

    .venv/bin/python bench/driver.py batch --addr 127.0.0.1:50051 --n 20000 --batch 100 --inflight 4

Modes (all with 100-byte JSON payloads sent as ``payload_json``):
  batch   EnqueueBatch of --batch jobs, --inflight batches in flight; --idem gives every job a
          unique idempotency key
  single  unary Enqueue awaited one at a time
  conc    unary Enqueue from --inflight concurrent callers
  rate    unary Enqueue awaited, paced at --rate jobs/s for --duration s; writes
          [[job_id, t_send], ...] to --out (t_send: epoch seconds just before the call)
  watch   opens --per-job Watch streams for every job id in --jobs-file (a JSON list), spread
          round-robin over --channels channels (one HTTP/2 connection each), and reads them until
          they end; writes [latency ms, event type] of every live event to --out. An event is live
          when its Redis time (ms part of its id) is later than the arrival of its stream's first
          message (earlier ones were replayed from history); latency = time.time() on receipt - that
          time. With --shards N, this process opens only every Nth stream (from --shard), so that N
          driver processes share the streams (bench/run.py --watch-drivers).

Prints one JSON line: n, t0, t1 (epoch seconds around the timed part), jobs_per_s, and the
driver's own CPU seconds over the timed part (cpu_s). Before t0 it connects, checks health
and does --warmup jobs (not counted) unless --warmup 0.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conveyor.common import auth
from conveyor.v1 import event_pb2, producer_service_pb2_grpc
from conveyor.v1 import producer_service_pb2 as p

#: Presented on every call when the services check tokens (run.py passes the bench's CONVEYOR_TOKEN).
TOKEN = os.environ.get("CONVEYOR_TOKEN", "")

JOB_TYPE = "demo.noop"


def payload_100() -> bytes:
    """A JSON object whose serialized form is exactly 100 bytes."""
    head, tail = b'{"p":"', b'"}'
    body = head + b"x" * (100 - len(head) - len(tail)) + tail
    json.loads(body)
    assert len(body) == 100
    return body


PAYLOAD = payload_100()


def cpu_s() -> float:
    t = os.times()
    return t.user + t.system


async def wait_healthy(channel: grpc.aio.Channel, within: float) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + within
    while True:
        try:
            r = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2.0)
            if r.status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.aio.AioRpcError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError("producer not SERVING")
        await asyncio.sleep(0.05)


#: --controls: jobs cycle through priorities 1-9 and 100 rate keys (tenants).
CONTROLS = {"on": False}
_seq = iter(range(1 << 62))


def request(queue: str, key: str = "") -> p.EnqueueRequest:
    req = p.EnqueueRequest(queue=queue, type=JOB_TYPE, payload_json=PAYLOAD, idempotency_key=key)
    if CONTROLS["on"]:
        i = next(_seq)
        req.priority = i % 9 + 1
        req.rate_key = f"tenant-{i % 100}"
    return req


async def run_batch(stub: producer_service_pb2_grpc.ProducerServiceStub, a: argparse.Namespace) -> dict:
    n, size = a.n, a.batch
    key_prefix = f"k{os.getpid()}-{time.time_ns()}-" if a.idem else ""
    starts = list(range(0, n, size))
    next_index = 0
    created = 0

    async def sender() -> None:
        nonlocal next_index, created
        while next_index < len(starts):
            start = starts[next_index]
            next_index += 1
            m = min(size, n - start)
            if key_prefix:
                jobs = [request(a.queue, f"{key_prefix}{start + k}") for k in range(m)]
            else:
                jobs = [request(a.queue) for _ in range(m)]
            resp = await stub.EnqueueBatch(p.EnqueueBatchRequest(jobs=jobs), timeout=a.timeout)
            created += sum(1 for r in resp.results if r.created)

    c0, t0 = cpu_s(), time.time()
    await asyncio.gather(*(sender() for _ in range(a.inflight)))
    t1, c1 = time.time(), cpu_s()
    return {
        "n": n,
        "created": created,
        "batch": size,
        "inflight": a.inflight,
        "idem": a.idem,
        "t0": t0,
        "t1": t1,
        "jobs_per_s": n / (t1 - t0),
        "cpu_s": c1 - c0,
    }


async def run_single(stub: producer_service_pb2_grpc.ProducerServiceStub, a: argparse.Namespace) -> dict:
    c0, t0 = cpu_s(), time.time()
    for _ in range(a.n):
        await stub.Enqueue(request(a.queue), timeout=a.timeout)
    t1, c1 = time.time(), cpu_s()
    return {"n": a.n, "t0": t0, "t1": t1, "jobs_per_s": a.n / (t1 - t0), "cpu_s": c1 - c0}


async def run_conc(stub: producer_service_pb2_grpc.ProducerServiceStub, a: argparse.Namespace) -> dict:
    n, c = a.n, a.inflight
    # --conc-channels > 1: the callers spread over that many connections (as callers in several
    # services would be), which a producer with several processes shares out between them.
    channels = [
        auth.dial(a.addr, TOKEN, options=[("grpc.use_local_subchannel_pool", 1), ("bench.conc", k)])
        for k in range(a.conc_channels - 1)
    ]
    stubs = [stub, *(producer_service_pb2_grpc.ProducerServiceStub(ch) for ch in channels)]
    for extra in stubs[1:]:
        await extra.Enqueue(request(a.queue), timeout=a.timeout)  # connected before timing

    async def caller(k: int) -> None:
        mine = stubs[k % len(stubs)]
        for _ in range(n // c + (1 if k < n % c else 0)):
            await mine.Enqueue(request(a.queue), timeout=a.timeout)

    c0, t0 = cpu_s(), time.time()
    await asyncio.gather(*(caller(k) for k in range(c)))
    t1, c1 = time.time(), cpu_s()
    for ch in channels:
        await ch.close()
    rate = n / (t1 - t0)
    return {"n": n, "inflight": c, "channels": len(stubs), "t0": t0, "t1": t1, "jobs_per_s": rate, "cpu_s": c1 - c0}


async def run_client(stub: producer_service_pb2_grpc.ProducerServiceStub, a: argparse.Namespace) -> dict:
    """`--inflight` concurrent callers of the Python client's enqueue (it coalesces them into batches;
    each job gets the client's own idempotency key, as every user's does)."""
    from conveyor.common.client import ConveyorClient

    n, c = a.n, a.inflight
    payload = json.loads(PAYLOAD)
    async with ConveyorClient(a.addr, timeout=a.timeout) as client:

        async def caller(k: int) -> None:
            for _ in range(n // c + (1 if k < n % c else 0)):
                await client.enqueue(a.queue, JOB_TYPE, payload)

        c0, t0 = cpu_s(), time.time()
        await asyncio.gather(*(caller(k) for k in range(c)))
        t1, c1 = time.time(), cpu_s()
    return {"n": n, "inflight": c, "t0": t0, "t1": t1, "jobs_per_s": n / (t1 - t0), "cpu_s": c1 - c0}


async def run_rate(stub: producer_service_pb2_grpc.ProducerServiceStub, a: argparse.Namespace) -> dict:
    n = int(a.rate * a.duration)
    sent: list[tuple[str, float]] = []
    c0, t0 = cpu_s(), time.time()
    p0 = time.perf_counter()
    for i in range(n):
        wait = p0 + i / a.rate - time.perf_counter()
        if wait > 0:
            await asyncio.sleep(wait)
        ts = time.time()
        r = await stub.Enqueue(request(a.queue), timeout=a.timeout)
        sent.append((r.job_id, ts))
    t1, c1 = time.time(), cpu_s()
    return {"sent": sent, "n": n, "rate": a.rate, "t0": t0, "t1": t1, "jobs_per_s": n / (t1 - t0), "cpu_s": c1 - c0}


FINAL_TYPES = {
    event_pb2.EVENT_TYPE_SUCCEEDED,
    event_pb2.EVENT_TYPE_FAILED,
    event_pb2.EVENT_TYPE_CANCELLED,
    event_pb2.EVENT_TYPE_DEAD_LETTERED,
}


async def run_watch(a: argparse.Namespace) -> dict:
    """Many Watch streams on one producer; live-event latencies go to ``a.out``."""
    job_ids: list[str] = a.job_ids
    pairs = [(job, r) for r in range(a.per_job) for job in job_ids]
    mine = [k for k in range(len(pairs)) if k % a.shards == a.shard]
    # A local subchannel pool per channel: otherwise channels to the same target share one connection.
    channels = [
        auth.dial(a.addr, TOKEN, options=[("grpc.use_local_subchannel_pool", 1), ("bench.channel", k)])
        for k in range(a.channels)
    ]
    try:
        for ch in channels:
            await wait_healthy(ch, 30.0)
        stubs = [producer_service_pb2_grpc.ProducerServiceStub(ch) for ch in channels]
        latencies: list[tuple[float, int]] = []
        first_at: list[float] = []  # per stream, epoch s of its first message
        ended_final = 0
        replayed = 0
        received = 0
        errors: list[str] = []

        async def one(k: int, job_id: str) -> None:
            nonlocal ended_final, replayed, received
            first_ms = None
            last_type = None
            try:
                call = stubs[k % len(stubs)].Watch(p.WatchRequest(job_id=job_id), timeout=a.timeout)
                async for resp in call:
                    now = time.time()
                    received += 1
                    ev = resp.event
                    ev_ms = int(ev.id.split("-", 1)[0])
                    if first_ms is None:
                        first_ms = now * 1000
                        first_at.append(now)
                    if ev_ms > first_ms:
                        latencies.append((now * 1000 - ev_ms, ev.type))
                    else:
                        replayed += 1
                    last_type = ev.type
            except grpc.aio.AioRpcError as exc:
                errors.append(f"{exc.code().name}: {exc.details()}")
            if last_type in FINAL_TYPES:
                ended_final += 1

        c0, t0 = cpu_s(), time.time()
        await asyncio.gather(*(one(k, pairs[k][0]) for k in mine))
        t1, c1 = time.time(), cpu_s()
    finally:
        for ch in channels:
            await ch.close()
    return {
        "latencies_ms": latencies,
        "streams": len(mine),
        "streams_opened": len(first_at),
        "streams_ended_final": ended_final,
        "last_first_message": max(first_at) if first_at else None,
        "events_received": received,
        "events_replayed": replayed,
        "events_live": len(latencies),
        "errors": len(errors),
        "first_errors": errors[:5],
        "channels": a.channels,
        "t0": t0,
        "t1": t1,
        "cpu_s": c1 - c0,
    }


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["batch", "single", "conc", "client", "rate", "watch"])
    ap.add_argument("--addr", required=True)
    ap.add_argument("--queue", default="bench")
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--inflight", type=int, default=4)
    ap.add_argument("--idem", action="store_true")
    ap.add_argument("--rate", type=float, default=200.0)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--warmup", type=int, default=0, help="jobs enqueued (same mode) before timing")
    ap.add_argument("--timeout", type=float, default=30.0, help="deadline of each RPC, s")
    ap.add_argument("--out", help="rate mode: where to write the send times; watch: the latencies")
    ap.add_argument("--jobs-file", help="watch mode: JSON list of job ids to watch")
    ap.add_argument("--per-job", type=int, default=5, help="watch mode: streams per job")
    ap.add_argument("--channels", type=int, default=10, help="watch mode: gRPC channels (connections)")
    ap.add_argument("--conc-channels", type=int, default=1, help="conc mode: connections the callers share")
    ap.add_argument("--controls", action="store_true", help="a priority mix and 100 rate keys")
    ap.add_argument("--shard", type=int, default=0, help="watch mode: which share of the streams this process opens")
    ap.add_argument("--shards", type=int, default=1, help="watch mode: driver processes sharing the streams")
    return ap.parse_args()


async def main(a: argparse.Namespace) -> dict:
    if a.mode == "watch":
        out = await run_watch(a)
        out.update(mode=a.mode)
        return out
    async with auth.dial(a.addr, TOKEN) as channel:
        await wait_healthy(channel, 30.0)
        stub = producer_service_pb2_grpc.ProducerServiceStub(channel)
        if a.warmup:
            if a.mode == "batch":
                key = f"warm-{os.getpid()}-" if a.idem else ""
                jobs = [request(a.queue, f"{key}{k}" if key else "") for k in range(a.warmup)]
                await stub.EnqueueBatch(p.EnqueueBatchRequest(jobs=jobs), timeout=a.timeout)
            else:
                for _ in range(a.warmup):
                    await stub.Enqueue(request(a.queue), timeout=a.timeout)
        run = {"batch": run_batch, "single": run_single, "conc": run_conc, "client": run_client, "rate": run_rate}[
            a.mode
        ]
        out = await run(stub, a)
    out.update(mode=a.mode, warmup=a.warmup)
    return out


if __name__ == "__main__":
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    args = parse_args()
    CONTROLS["on"] = args.controls
    if args.mode == "watch":
        with open(args.jobs_file) as f:
            args.job_ids = json.load(f)
    result = asyncio.run(main(args))
    sent = result.pop("sent", None)
    if sent is not None:
        with open(args.out, "w") as f:
            json.dump(sent, f)
    lat = result.pop("latencies_ms", None)
    if lat is not None:
        with open(args.out, "w") as f:
            json.dump(lat, f)
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
