"""What 64 concurrent callers of the Python client cost the client process, and the floor under it.

Issue 13 asks for 64 concurrent callers through the Python client at >= 1x BullMQ's 64 add()
in flight. On two cores the client process shares the machine with the producer, Redis and the
results service, so its CPU per job counts in the figure as theirs does. This measures the client
alone, against a bare ``grpc.aio`` server on uvloop (a child process) whose ``EnqueueBatch`` and
``Enqueue`` parse the request and answer canned job ids (Conveyor's work is left out), and sets
it beside what any asyncio client must spend:

- ``asyncio``: 64 tasks, each making a future and awaiting it, resolved by a batcher in groups
  as the coalescer does, no gRPC: what waking a caller costs Python's event loop (uvloop);
- ``grpc-batch``: EnqueueBatch calls of prebuilt requests, --batch jobs each (64: what the
  coalescer sends for 64 callers), 2 calls in flight, no per-job Python on the client: grpc's
  cost per job;
- ``request``: ``ConveyorClient.request`` alone (building one EnqueueRequest with its key);
- ``client``: ``ConveyorClient.enqueue`` from 64 callers: the real thing.

``client`` minus the sum of the other three is what the client adds of its own (its coalescer,
retry wrapper, result checks). Prints jobs/s and CPU µs per job of the client process (and of the
bare server, for the record); medians of --reps.

    .venv/bin/python bench/client_cost.py --n 50000 --reps 3
    .venv/bin/python bench/client_cost.py --b-python ../before/.venv/bin/python   # client: before too
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import statistics
import subprocess
import sys
import time

from grpc_floor import free_port, proc_cpu_s  # bench/ is the script's directory, on sys.path

CALLERS = 64
PAYLOAD = {"p": "x" * 92}  # 100 bytes of JSON, as bench/driver.py's


# ---- the bare server (a child: client_cost.py --serve PORT) ----


async def _serve(port: int) -> None:
    import grpc

    from conveyor.v1 import job_pb2
    from conveyor.v1 import producer_service_pb2 as p

    one = p.EnqueueResponse(job_id="bench/01JBENCH0000000000000000000", created=True, state=job_pb2.JOB_STATE_QUEUED)
    canned: dict[int, p.EnqueueBatchResponse] = {}

    async def enqueue(request: p.EnqueueRequest, context: object) -> p.EnqueueResponse:
        return one

    async def enqueue_batch(request: p.EnqueueBatchRequest, context: object) -> p.EnqueueBatchResponse:
        n = len(request.jobs)
        if n not in canned:
            canned[n] = p.EnqueueBatchResponse(results=[one] * n)
        return canned[n]

    handlers = {
        "Enqueue": grpc.unary_unary_rpc_method_handler(
            enqueue,
            request_deserializer=p.EnqueueRequest.FromString,
            response_serializer=p.EnqueueResponse.SerializeToString,
        ),
        "EnqueueBatch": grpc.unary_unary_rpc_method_handler(
            enqueue_batch,
            request_deserializer=p.EnqueueBatchRequest.FromString,
            response_serializer=p.EnqueueBatchResponse.SerializeToString,
        ),
    }
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("conveyor.v1.ProducerService", handlers),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


# ---- the loads (run in a child too, so that --b-python can pick the client's code) ----


async def _asyncio_floor(n: int, batch: int) -> None:
    loop = asyncio.get_running_loop()
    pending: list[asyncio.Future[int]] = []
    due = False

    def flush() -> None:
        nonlocal due
        due = False
        group = pending[:batch]
        del pending[:batch]
        for f in group:
            f.set_result(1)
        if pending:
            due = True
            loop.call_soon(flush)

    async def submit() -> int:
        nonlocal due
        f: asyncio.Future[int] = loop.create_future()
        pending.append(f)
        if not due:
            due = True
            loop.call_soon(flush)
        return await f

    async def caller(k: int) -> None:
        for _ in range(n // CALLERS + (1 if k < n % CALLERS else 0)):
            await submit()

    await asyncio.gather(*(caller(k) for k in range(CALLERS)))


async def _grpc_batch(addr: str, n: int, batch: int) -> None:
    import grpc

    from conveyor.common.client import ConveyorClient
    from conveyor.v1 import producer_service_pb2 as p
    from conveyor.v1 import producer_service_pb2_grpc

    req = p.EnqueueBatchRequest(jobs=[ConveyorClient.request("bench", "demo.noop", PAYLOAD) for _ in range(batch)])
    async with grpc.aio.insecure_channel(addr) as channel:
        stub = producer_service_pb2_grpc.ProducerServiceStub(channel)
        calls = n // batch

        async def lane(k: int) -> None:
            for _ in range(calls // 2 + (1 if k < calls % 2 else 0)):
                await stub.EnqueueBatch(req, timeout=30)

        await asyncio.gather(lane(0), lane(1))


async def _request_only(n: int) -> None:
    from conveyor.common.client import ConveyorClient

    for _ in range(n):
        ConveyorClient.request("bench", "demo.noop", PAYLOAD)


async def _client(addr: str, n: int) -> None:
    from conveyor.common.client import ConveyorClient

    async with ConveyorClient(addr, timeout=30, token="") as client:

        async def caller(k: int) -> None:
            for _ in range(n // CALLERS + (1 if k < n % CALLERS else 0)):
                await client.enqueue("bench", "demo.noop", PAYLOAD)

        await asyncio.gather(*(caller(k) for k in range(CALLERS)))


def load(mode: str, addr: str, n: int, batch: int) -> dict[str, float]:
    runs = {
        "asyncio": lambda: _asyncio_floor(n, batch),
        "grpc-batch": lambda: _grpc_batch(addr, n, batch),
        "request": lambda: _request_only(n),
        "client": lambda: _client(addr, n),
    }
    asyncio.run(runs[mode]())  # warm: imports, channel, code paths
    c0, t0 = time.process_time(), time.perf_counter()
    asyncio.run(runs[mode]())
    t1, c1 = time.perf_counter(), time.process_time()
    return {"jobs_per_s": n / (t1 - t0), "cpu_us_per_job": (c1 - c0) / n * 1e6, "t": t1 - t0}


# ---- the parent ----


def run(python: str, mode: str, addr: str, server_pid: int, n: int, batch: int) -> dict[str, float]:
    s0 = proc_cpu_s(server_pid)
    out = subprocess.run(
        [python, __file__, "--load", mode, "--addr", addr, "--n", str(n), "--batch", str(batch)],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    row: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    # The server also served the warm-up pass; it did the same work twice.
    row["server_us_per_job"] = (proc_cpu_s(server_pid) - s0) / (2 * n) * 1e6
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument(
        "--batch", type=int, default=64, help="jobs per batch of asyncio and grpc-batch (64: as the client sends)"
    )
    ap.add_argument("--b-python", help="also run `client` under this interpreter (another checkout's venv)")
    ap.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--load", help=argparse.SUPPRESS)
    ap.add_argument("--addr", help=argparse.SUPPRESS)
    a = ap.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    if a.serve:
        asyncio.run(_serve(a.serve))
        return
    if a.load:
        print(json.dumps(load(a.load, a.addr, a.n, a.batch)))
        return

    port = free_port()
    server = subprocess.Popen([sys.executable, __file__, "--serve", str(port)], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        addr = f"127.0.0.1:{port}"
        plan = [("asyncio", sys.executable), ("grpc-batch", sys.executable), ("request", sys.executable),
                ("client", sys.executable)] + ([("client-b", a.b_python)] if a.b_python else [])  # fmt: skip
        results: dict[str, list[dict[str, float]]] = {}
        for rep in range(a.reps):
            for name, python in plan:
                row = run(python, name.removesuffix("-b"), addr, server.pid, a.n, a.batch)
                results.setdefault(name, []).append(row)
                print(f"rep {rep + 1}: {name:10s} {row['jobs_per_s']:9,.0f} jobs/s  client "
                      f"{row['cpu_us_per_job']:5.1f} µs/job  bare server {row['server_us_per_job']:5.1f}",
                      file=sys.stderr)  # fmt: skip
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(10)

    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in results[name])

    print(f"\n64 callers, {a.n:,} jobs, medians of {a.reps}; batch {a.batch} for asyncio and grpc-batch")
    print(f"{'':12s} {'jobs/s':>10s} {'client µs/job':>14s} {'bare server µs/job':>19s}")
    for name, _ in plan:
        server_cost = "" if name in ("asyncio", "request") else f"{med(name, 'server_us_per_job'):19.1f}"
        print(f"{name:12s} {med(name, 'jobs_per_s'):10,.0f} {med(name, 'cpu_us_per_job'):14.1f} {server_cost}")
    floor = sum(med(m, "cpu_us_per_job") for m in ("asyncio", "grpc-batch", "request"))
    print(f"\nfloor (asyncio + grpc-batch + request): {floor:.1f} µs/job; the client adds "
          f"{med('client', 'cpu_us_per_job') - floor:.1f} of its own")  # fmt: skip


if __name__ == "__main__":
    main()
