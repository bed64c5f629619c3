"""What fanning one event out to 1,000 server streams costs a Python gRPC server on this machine.

Issue 13 item 6 asks for 1,000 concurrent Watch streams with p99 delivery under 50 ms. This
measures the floor under `bench/run.py --only watch`: a bare ``grpc.aio`` server on uvloop (as
the producer runs) holds --streams server streams (``/bench.Floor/Stream``, opened by one client
process over 10 connections, as the watch figure's driver does), and on each ``Fire`` call puts
--per-burst messages of --size bytes (already serialized: Watch sends shared bytes, ADR 0011)
on every stream at once. Nothing else runs: no Redis, no replay, no interceptor.

Each message carries the server's clock when the burst began; the client's receive time minus
that is its latency (same machine clock). Prints p50/p99/max over all deliveries, the time to
the last delivery of each burst, and the server's and client's CPU µs per delivery.

    .venv/bin/python bench/stream_floor.py --streams 1000 --bursts 20 --per-burst 2
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

import grpc

CLK = os.sysconf("SC_CLK_TCK")


def proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLK


async def _serve(port: int, size: int) -> None:
    queues: set[asyncio.Queue[bytes]] = set()

    async def stream(request: bytes, context: object):  # type: ignore[no-untyped-def]
        q: asyncio.Queue[bytes] = asyncio.Queue()
        queues.add(q)
        try:
            yield b"open"
            while True:
                yield await q.get()
        finally:
            queues.discard(q)

    async def fire(request: bytes, context: object) -> bytes:
        per_burst = int(request or b"1")
        began = struct.pack(">d", time.time())
        message = began + b"x" * max(0, size - len(began))
        for q in queues:
            for _ in range(per_burst):
                q.put_nowait(message)
        return str(len(queues)).encode()

    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "bench.Floor",
                {
                    "Stream": grpc.unary_stream_rpc_method_handler(stream),
                    "Fire": grpc.unary_unary_rpc_method_handler(fire),
                },
            )
        ]
    )
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


async def _client(addr: str, server_pid: int, a: argparse.Namespace) -> dict[str, float]:
    channels = [grpc.aio.insecure_channel(addr, options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(10)]
    latencies: list[float] = []
    opened = 0
    all_open = asyncio.Event()
    all_delivered = asyncio.Event()
    expected = a.streams * a.per_burst * a.bursts
    last_of_burst: dict[float, float] = {}

    async def reader(i: int) -> None:
        nonlocal opened
        call = channels[i % len(channels)].unary_stream("/bench.Floor/Stream")(b"")
        async for message in call:
            if message == b"open":
                opened += 1
                if opened == a.streams:
                    all_open.set()
                continue
            now = time.time()
            (began,) = struct.unpack(">d", message[:8])
            latencies.append((now - began) * 1000)
            if len(latencies) == expected:
                all_delivered.set()
            last_of_burst[began] = max(last_of_burst.get(began, 0.0), now)

    readers = [asyncio.ensure_future(reader(i)) for i in range(a.streams)]
    await asyncio.wait_for(all_open.wait(), 60)
    fire = channels[0].unary_unary("/bench.Floor/Fire")
    await asyncio.sleep(0.5)  # let the opening settle before the timed bursts
    s0, c0 = proc_cpu_s(server_pid), time.process_time()
    for _ in range(a.bursts):
        await fire(str(a.per_burst).encode(), timeout=30)
        await asyncio.sleep(a.gap)  # bursts apart, as a job's events are
    with contextlib.suppress(TimeoutError):  # a short count is reported, not hidden
        await asyncio.wait_for(all_delivered.wait(), 60)
    s1, c1 = proc_cpu_s(server_pid), time.process_time()
    for r in readers:
        r.cancel()
    for c in channels:
        await c.close()
    latencies.sort()
    spans = sorted((last - began) * 1000 for began, last in last_of_burst.items())
    n = len(latencies)
    return {
        "deliveries": n,
        "expected": expected,
        "p50_ms": latencies[n // 2],
        "p99_ms": latencies[min(n - 1, int(n * 0.99))],
        "max_ms": latencies[-1],
        "burst_to_last_ms_median": statistics.median(spans),
        # The Fire calls and the gaps' idle time are in these too: small beside the deliveries.
        "server_us_per_delivery": (s1 - s0) / n * 1e6,
        "client_us_per_delivery": (c1 - c0) / n * 1e6,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--streams", type=int, default=1000)
    ap.add_argument("--bursts", type=int, default=20)
    ap.add_argument("--per-burst", type=int, default=2, help="messages per stream per burst (2: QUEUED and ACTIVE)")
    ap.add_argument("--size", type=int, default=120, help="bytes per message (a WatchResponse is 60-150)")
    ap.add_argument("--gap", type=float, default=0.3, help="s between bursts")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", help="append the figures as one JSON line to this file")
    a = ap.parse_args()
    import uvloop

    if a.serve:
        uvloop.run(_serve(a.serve, a.size))
        return
    import socket

    runs = []
    for rep in range(a.reps):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        proc = subprocess.Popen(
            [sys.executable, __file__, "--serve", str(port), "--size", str(a.size)],
            stdout=subprocess.PIPE,
            start_new_session=True,
        )
        try:
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != b"ready":
                raise RuntimeError("the stream server did not start")
            runs.append(uvloop.run(_client(f"127.0.0.1:{port}", proc.pid, a)))
            print(f"# rep {rep + 1}/{a.reps}: {json.dumps(runs[-1])}", file=sys.stderr, flush=True)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    print(
        f"\n{a.streams} streams, {a.bursts} bursts of {a.per_burst} message(s) per stream "
        f"({a.streams * a.per_burst} deliveries at once), {a.size} B; medians of {a.reps}"
    )
    print(f"  latency p50 {med['p50_ms']:.1f} ms, p99 {med['p99_ms']:.1f} ms, max {med['max_ms']:.1f} ms")
    print(f"  burst to its last delivery {med['burst_to_last_ms_median']:.1f} ms")
    print(
        f"  server CPU {med['server_us_per_delivery']:.1f} µs per delivery, "
        f"client {med['client_us_per_delivery']:.1f} µs; {med['deliveries']:.0f} of {med['expected']:.0f} delivered"
    )
    if a.json:
        with open(a.json, "a") as f:
            f.write(json.dumps({"metric": "stream_floor", "args": vars(a), "runs": runs, "median": med}) + "\n")


if __name__ == "__main__":
    main()
