"""The worker's own CPU per job, with no-op handlers: what dispatch, context, logging context,
metrics and outcome encoding cost (issue #13 item 4).

    .venv/bin/python bench/worker_cost.py [--n 20000] [--reps 5] [--modes async,sync]
        [--python PATH] [--b-python PATH] [--profile DIR]

A private Redis (AOF off) and, per repetition and mode, one fresh `python -m conveyor.worker`
(concurrency 50, metrics server off: the counters are still counted in-process) on a queue of
its own. The queue is paused, N jobs are written through the producer's own path (the
Enqueuer: validation, build_job, the enqueue script, batches of 100), the worker is measured
idle for 2 s (its heartbeat, registry beat and maintenance: the idle baseline), then the queue
is resumed and the worker runs them all. Its CPU (utime+stime of /proc/<pid>/stat) from the
resume to the moment the job streams are empty (every outcome recorded), minus the idle rate
over the same time, divided by N, is the figure. Modes: `async` runs `cost.noop` (an async def
returning None, as demo.noop), `sync` runs `cost.noop_sync` (a plain def, in the worker's
threads). A warm-up of 500 jobs runs first, so scripts are loaded and the queue is known.

`--python` runs the worker under another interpreter (another checkout's venv runs that
checkout's code); with `--b-python` each repetition runs B and A back to back, in alternating
order, and the paired B / A ratio of CPU per job is printed (> 1: B cost more). `--profile DIR`
records each measured run with py-spy (raw collapsed stacks, idle frames left out, which is
py-spy's default) into DIR/<side>-<mode>-<rep>.txt; the CPU figure of a profiled run includes
what the sampling costs the process, so compare figures without --profile.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import grpc
import redis
import redis.asyncio as aioredis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conveyor.common.devstack.servers import RedisServer, free_port
from conveyor.common.enqueue import Enqueuer
from conveyor.common.keys import queue_keys
from conveyor.common.scripts import Scripts
from conveyor.v1 import producer_service_pb2 as p

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CLK = os.sysconf("SC_CLK_TCK")
PAYLOAD = json.dumps({"data": "x" * 88}).encode()  # 100 bytes of JSON, as the e2e driver sends
MODES = {"async": "cost.noop", "sync": "cost.noop_sync"}
WARMUP = 500
SPY_FLAGS = os.environ.get("WORKER_COST_SPY_FLAGS", "").split()
CONCURRENCY = 50


def ticks(pid: int) -> int:
    raw = Path(f"/proc/{pid}/stat").read_text()
    fields = raw[raw.rindex(")") + 2 :].split()
    return sum(int(x) for x in fields[11:15])


def script_calls(r: redis.Redis) -> int:
    stats: dict = r.info("commandstats")  # type: ignore[assignment]
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


def wait_until(check: object, what: str, timeout: float, interval: float = 0.01) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


async def enqueue(url: str, queue: str, job_type: str, n: int) -> None:
    client = aioredis.Redis.from_url(url)
    enqueuer = Enqueuer(client, Scripts(client), 1 << 20, 100)
    for i in range(0, n, 100):
        requests = [p.EnqueueRequest(queue=queue, type=job_type, payload_json=PAYLOAD) for _ in range(min(100, n - i))]
        await enqueuer.enqueue(requests, batch=True)
    await client.aclose()


class Worker:
    def __init__(self, python: str, url: str, queue: str, logdir: Path) -> None:
        self.addr = f"127.0.0.1:{free_port()}"
        self.log_path = logdir / f"worker-{queue}.log"
        env = dict(
            os.environ,
            REDIS_URL=url,
            CONVEYOR_QUEUES=queue,
            CONVEYOR_CONCURRENCY=str(CONCURRENCY),
            CONVEYOR_WORKER_ID=f"cost-{queue}",
            CONVEYOR_HANDLERS="conveyor.worker.demo:handlers,worker_cost_handlers:handlers",
            CONVEYOR_LOG_LEVEL="warning",
            CONVEYOR_LOG_FORMAT="json",
            CONVEYOR_GRPC_ADDR=self.addr,
            CONVEYOR_METRICS_ADDR="off",
            PYTHONPATH=os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH", "")])),
            PYTHONUNBUFFERED="1",
        )
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen(
                [python, "-m", "conveyor.worker"], env=env, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
            )  # fmt: skip

    def wait_serving(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.addr) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                if self.proc.poll() is not None:
                    raise SystemExit(f"worker exited with {self.proc.returncode}; see {self.log_path}")
                with contextlib.suppress(grpc.RpcError):
                    if (
                        stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0).status
                        == health_pb2.HealthCheckResponse.SERVING
                    ):
                        return
                if time.monotonic() > deadline:
                    raise SystemExit(f"worker not SERVING after {timeout:.0f} s; see {self.log_path}")
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def run_once(python: str, url: str, queue: str, mode: str, n: int, logdir: Path, profile: Path | None) -> dict:
    r = redis.Redis.from_url(url)
    keys = queue_keys(queue)
    job_type = MODES[mode]

    def backlog() -> int:
        return sum(int(r.xlen(band)) for band in keys.bands)

    worker = Worker(python, url, queue, logdir)
    spy = None
    try:
        worker.wait_serving()
        asyncio.run(enqueue(url, queue, job_type, WARMUP))
        wait_until(lambda: backlog() == 0 and int(r.hlen(keys.state)) >= WARMUP, "the warm-up", 60)
        r.set(keys.paused, b"1")
        asyncio.run(enqueue(url, queue, job_type, n))
        if backlog() != n:
            raise SystemExit(f"expected {n} waiting jobs, found {backlog()}")
        if profile is not None:
            spy_bin = Path(python).with_name("py-spy")
            if not spy_bin.exists():
                spy_bin = Path(sys.executable).with_name("py-spy")
            profile.parent.mkdir(parents=True, exist_ok=True)
            spy = subprocess.Popen(
                [str(spy_bin), "record", "--pid", str(worker.proc.pid), "--rate", "250", *SPY_FLAGS,
                 "--format", "raw", "--output", str(profile)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip
        time.sleep(0.5)
        idle_t0, idle_c0 = time.monotonic(), ticks(worker.proc.pid)
        time.sleep(2.0)
        idle_t1, idle_c1 = time.monotonic(), ticks(worker.proc.pid)
        idle_rate = (idle_c1 - idle_c0) / (idle_t1 - idle_t0)
        calls0 = script_calls(r)
        t0, c0 = time.monotonic(), ticks(worker.proc.pid)
        # As ResumeQueue does: drop the flag and wake the blocked claimer through the signal stream.
        r.delete(keys.paused)
        r.xadd(keys.signal, {"s": "resume"}, maxlen=16, approximate=True)
        wait_until(lambda: backlog() == 0, f"{n} jobs handled", 600)
        t1, c1 = time.monotonic(), ticks(worker.proc.pid)
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(30)
        calls = script_calls(r) - calls0
        busy = (c1 - c0) - idle_rate * (t1 - t0)
        return {
            "us_per_job": busy / CLK / n * 1e6,
            "raw_us_per_job": (c1 - c0) / CLK / n * 1e6,
            "idle_cpu_pct": idle_rate / CLK * 100,
            "jobs_per_s": n / (t1 - t0),
            # Claim, complete, heartbeat and maintenance scripts (and the bench's own none): round trips.
            "jobs_per_script_call": n / max(1, calls),
        }
    finally:
        if spy is not None and spy.poll() is None:
            spy.kill()
        worker.stop()
        r.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--modes", default="async,sync")
    ap.add_argument("--python", default=sys.executable, help="the worker's interpreter (side A)")
    ap.add_argument("--b-python", default=None, help="side B's interpreter: paired runs, B / A printed")
    ap.add_argument("--profile", default=None, help="py-spy raw profiles of each measured run into this directory")
    ap.add_argument("--json", default=None, help="write every row here")
    a = ap.parse_args()
    modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    sides = {"A": a.python, **({"B": a.b_python} if a.b_python else {})}
    rows: list[dict] = []
    logdir = Path(os.environ.get("TMPDIR", "/tmp")) / f"worker-cost-{os.getpid()}"
    logdir.mkdir(parents=True, exist_ok=True)
    with RedisServer(appendonly=False) as server:
        for rep in range(a.reps):
            for mode in modes:
                order = list(sides) if rep % 2 == 0 else list(reversed(sides))
                for side in order:
                    queue = f"cost{rep}{mode}{side}"
                    prof = Path(a.profile) / f"{side}-{mode}-{rep}.txt" if a.profile else None
                    row = run_once(sides[side], server.url, queue, mode, a.n, logdir, prof)
                    row.update(side=side, mode=mode, rep=rep)
                    rows.append(row)
                    print(
                        f"rep {rep} {mode:5} {side}: {row['us_per_job']:6.2f} µs/job "
                        f"(raw {row['raw_us_per_job']:.2f}, idle {row['idle_cpu_pct']:.1f} % CPU), "
                        f"{row['jobs_per_s']:,.0f} jobs/s, {row['jobs_per_script_call']:.1f} jobs per script call",
                        flush=True,
                    )
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    print(f"\nworker CPU per job, µs (median of {a.reps}, n={a.n}, concurrency {CONCURRENCY}, no-op handlers)")
    for mode in modes:
        line = f"{mode:5}"
        for side in sides:
            xs = [r["us_per_job"] for r in rows if r["mode"] == mode and r["side"] == side]
            line += f"  {side}: {statistics.median(xs):6.2f} ({min(xs):.2f}-{max(xs):.2f})"
        if "B" in sides:
            ratios = []
            for rep in range(a.reps):
                pair = {r["side"]: r["us_per_job"] for r in rows if r["mode"] == mode and r["rep"] == rep}
                ratios.append(pair["B"] / pair["A"])
            line += f"  B / A: {statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
