"""What a unary gRPC call costs a Python server on this machine, before any of Conveyor's work.

Issue 13 item 5 asks where a unary Enqueue's server CPU goes. This measures the floor under it:
the same client (grpc.aio on uvloop, as bench/driver.py) calls, one at a time and from 64
concurrent callers over 8 connections,

- ``aio``: a bare ``grpc.aio`` server on uvloop (as the services run) whose one method returns
  an empty reply, with no interceptor and no protobuf (bytes in, bytes out);
- ``aio-proto``: the same, parsing the request as an ``EnqueueRequest`` and answering an
  ``EnqueueResponse`` with a job id (the messages' cost);
- ``aio-icpt``: ``aio-proto`` behind Conveyor's server interceptor (conveyor.common.interceptors:
  the request id, log context, error mapping and RPC metrics every service's calls go through);
- ``sync``: grpc's thread-pool server (``grpc.server``, 16 threads) with the bare method;
- ``producer-b`` (with ``--b-python``): the same under another checkout's interpreter (a before);
- ``producer`` (with ``--producer``): Conveyor's producer (Redis and PostgreSQL started as in
  bench/run.py, no worker) answering real ``Enqueue`` calls: what our own work adds to the floor.

and prints, per server and mode, calls/s and the server process's CPU µs per call (utime+stime
from /proc around the timed part), with the client's. Medians of --reps.

With ``--batch N`` the call is an ``EnqueueBatch`` of N jobs (the driver's job, without
idempotency keys, so that the producer creates N new jobs on every call), one call at a time and
4 in flight on one connection (as bench/run.py's ``bulk`` figure), and each figure is also given
per job: ``aio-proto`` parses the ``EnqueueBatchRequest`` and answers N results with job ids, and
``producer`` is the real ``EnqueueBatch`` (validation, ids, the enqueue script on a Redis with AOF,
the response). This is the floor under the batch enqueue figure (issue 13, 3x BullMQ's addBulk).

    .venv/bin/python bench/grpc_floor.py --n 5000 --reps 3 --producer
    .venv/bin/python bench/grpc_floor.py --only producer,producer-b --producer --b-python ../before/.venv/bin/python
    .venv/bin/python bench/grpc_floor.py --batch 100 --n 300 --reps 3 --producer
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent import futures
from pathlib import Path

import grpc

HERE = Path(__file__).resolve().parent
METHOD = "/bench.Floor/Call"
CLK = os.sysconf("SC_CLK_TCK")


def proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLK


# ---- the servers (run as a child: python grpc_floor.py --serve KIND --port P) ----


def serve(kind: str, port: int, batch: int = 0) -> None:
    if kind == "sync":
        server = grpc.server(futures.ThreadPoolExecutor(16))
        server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler("bench.Floor", {"Call": grpc.unary_unary_rpc_method_handler(_bare)})]
        )
        server.add_insecure_port(f"127.0.0.1:{port}")
        server.start()
        print("ready", flush=True)
        server.wait_for_termination()
        return
    import uvloop

    uvloop.install()
    asyncio.run(_serve_aio(kind, port, batch))


def _bare(request: bytes, context: object) -> bytes:
    return b""


async def _serve_aio(kind: str, port: int, batch: int) -> None:
    from conveyor.v1 import producer_service_pb2 as p

    async def bare(request: bytes, context: object) -> bytes:
        return b""

    async def proto(request: p.EnqueueRequest, context: object) -> p.EnqueueResponse:
        return p.EnqueueResponse(job_id=f"{request.queue}/01JAAAAAAAAAAAAAAAAAAAAAAA", created=True)

    async def proto_batch(request: p.EnqueueBatchRequest, context: object) -> p.EnqueueBatchResponse:
        # What any EnqueueBatch must do at least: read every job, answer each with its id.
        return p.EnqueueBatchResponse(
            results=[
                p.EnqueueResponse(job_id=f"{job.queue}/01JAAAAAAAAAAAAAAAAAAAAAAA", created=True, state=1)
                for job in request.jobs
            ]
        )

    if kind == "aio":
        handler = grpc.unary_unary_rpc_method_handler(bare)
    elif batch:
        handler = grpc.unary_unary_rpc_method_handler(
            proto_batch,
            request_deserializer=p.EnqueueBatchRequest.FromString,
            response_serializer=p.EnqueueBatchResponse.SerializeToString,
        )
    else:
        handler = grpc.unary_unary_rpc_method_handler(
            proto,
            request_deserializer=p.EnqueueRequest.FromString,
            response_serializer=p.EnqueueResponse.SerializeToString,
        )
    interceptors = []
    if kind == "aio-icpt":
        from conveyor.common import logs
        from conveyor.common.interceptors import ServerInterceptor

        logs.configure("floor", "warning", "json")  # as bench/run.py runs the services

        interceptors.append(ServerInterceptor())
    server = grpc.aio.server(interceptors=interceptors)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("bench.Floor", {"Call": handler})])
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


# ---- the client (in this process) ----


def _request(batch: int) -> bytes:
    sys.path.insert(0, str(HERE))
    from driver import PAYLOAD

    from conveyor.v1 import producer_service_pb2 as p

    job = p.EnqueueRequest(queue="bench", type="demo.noop", payload_json=PAYLOAD)
    if batch:
        return p.EnqueueBatchRequest(jobs=[job] * batch).SerializeToString()
    return job.SerializeToString()


async def _load(addr: str, method: str, request: bytes, mode: str, n: int) -> tuple[float, float]:
    """Calls/s and this process's CPU s over n calls (after 50 untimed ones)."""
    channels = [
        grpc.aio.insecure_channel(addr, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(8 if mode == "conc" else 1)
    ]
    calls = [c.unary_unary(method) for c in channels]
    for _ in range(50):
        await calls[0](request, timeout=10)
    t0, c0 = time.perf_counter(), time.process_time()
    if mode == "single":
        call = calls[0]
        for _ in range(n):
            await call(request, timeout=10)
    else:
        left = [n]

        async def caller(i: int) -> None:
            call = calls[i % len(calls)]
            while left[0] > 0:
                left[0] -= 1
                await call(request, timeout=10)

        # conc: 64 callers over 8 connections; batch4: 4 batches in flight on one (bench/run.py's bulk).
        await asyncio.gather(*(caller(i) for i in range(64 if mode == "conc" else 4)))
    t1, c1 = time.perf_counter(), time.process_time()
    for c in channels:
        await c.close()
    return n / (t1 - t0), c1 - c0


def measure(addr: str, pid: int, method: str, request: bytes, mode: str, n: int) -> dict[str, float]:
    import uvloop

    s0 = proc_cpu_s(pid)
    rate, client_cpu = uvloop.run(_load(addr, method, request, mode, n))
    server_cpu = proc_cpu_s(pid) - s0
    # The untimed warm-up calls are in the server's figure too: 50 of n, small; subtract pro rata.
    return {
        "calls_per_s": rate,
        "server_us_per_call": server_cpu / (n + 50) * 1e6,
        "client_us_per_call": client_cpu / n * 1e6,
    }


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def modes(batch: int) -> tuple[str, str]:
    return ("single", "batch4") if batch else ("single", "conc")


def run_floor(kind: str, n: int, request: bytes, batch: int) -> dict[str, dict[str, float]]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve", kind, "--port", str(port), "--batch", str(batch)],
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != b"ready":
            raise RuntimeError(f"server {kind} did not start")
        method_request = b"" if kind in ("aio", "sync") else request
        return {m: measure(f"127.0.0.1:{port}", proc.pid, METHOD, method_request, m, n) for m in modes(batch)}
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def run_producer(n: int, request: bytes, python: str | None, batch: int) -> dict[str, dict[str, float]]:
    sys.path.insert(0, str(HERE))
    from run import PY, Stack

    with (
        tempfile.TemporaryDirectory(prefix="conveyor-floor-") as d,
        Stack(Path(d), worker=False, python=python or PY) as st,
    ):
        producer = st.services["producer"]
        method = "/conveyor.v1.ProducerService/" + ("EnqueueBatch" if batch else "Enqueue")
        figures = {}
        for m in modes(batch):
            ticks0 = st.cpu_ticks()
            figures[m] = measure(producer.addr, producer.proc.pid, method, request, m, n)
            ticks1 = st.cpu_ticks()
            # What the same calls cost the rest of the stack: Redis (the enqueue script, AOF) and the
            # results service (reading and acking the QUEUED events, as in production).
            for name in ("redis", "results"):
                figures[m][f"{name}_us_per_call"] = (ticks1[name] - ticks0[name]) / CLK / (n + 50) * 1e6
        return figures


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--serve", choices=["aio", "aio-proto", "aio-icpt", "sync"], help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument(
        "--batch", type=int, default=0, help="each call an EnqueueBatch of this many jobs (figures also per job)"
    )
    ap.add_argument("--n", type=int, default=5000, help="calls per figure (5,000)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--producer", action="store_true", help="also Conveyor's producer answering Enqueue")
    ap.add_argument("--only", default="", help="a comma list of the servers to measure (default all)")
    ap.add_argument(
        "--b-python", help="with --producer: also the producer run by this interpreter (another checkout's venv)"
    )
    ap.add_argument("--json", help="append the figures as one JSON line to this file")
    a = ap.parse_args()
    if a.serve:
        serve(a.serve, a.port, a.batch)
        return
    request = _request(a.batch)
    kinds = ["aio", "aio-proto", "aio-icpt", "sync"] + (["producer"] if a.producer else [])
    if a.producer and a.b_python:
        kinds.append("producer-b")
    if a.only:
        kinds = [k for k in kinds if k in a.only.split(",")]
    runs: dict[str, list[dict[str, dict[str, float]]]] = {k: [] for k in kinds}
    for rep in range(a.reps):
        for kind in kinds:
            print(f"# rep {rep + 1}/{a.reps}: {kind}", file=sys.stderr, flush=True)
            if kind.startswith("producer"):
                runs[kind].append(run_producer(a.n, request, a.b_python if kind == "producer-b" else None, a.batch))
            else:
                runs[kind].append(run_floor(kind, a.n, request, a.batch))
    table: dict[str, dict[str, dict[str, float]]] = {}
    per = max(a.batch, 1)
    what = f"EnqueueBatch calls of {a.batch} jobs" if a.batch else "Unary gRPC calls"
    print(f"\n{what}, {a.n} per figure, medians of {a.reps}; CPU in µs per call (and per job)")
    print(
        f"{'server':12s} {'mode':7s} {'calls/s':>9s} {'jobs/s':>9s} {'server CPU':>18s} {'client CPU':>18s}"
        "  (producer: the rest of the stack, µs per job)"
    )
    for kind, reps in runs.items():
        table[kind] = {}
        for mode in modes(a.batch):
            med = {k: statistics.median(r[mode][k] for r in reps) for k in reps[0][mode]}
            table[kind][mode] = med
            server, client = med["server_us_per_call"], med["client_us_per_call"]
            others = "".join(
                f"  {name} {med[f'{name}_us_per_call'] / per:.1f}"
                for name in ("redis", "results")
                if f"{name}_us_per_call" in med
            )
            print(
                f"{kind:12s} {mode:7s} {med['calls_per_s']:9,.0f} {med['calls_per_s'] * per:9,.0f}"
                f" {server:8.0f} ({server / per:6.1f}) {client:8.0f} ({client / per:6.1f}){others}"
            )
    if a.json:
        with open(a.json, "a") as f:
            row = {"metric": "grpc_floor", "n": a.n, "reps": a.reps, "batch": a.batch, "figures": table}
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
