"""`make up` behaves like compose's `restart: unless-stopped`: a dead process comes back alone; only SIGTERM stops all.

The dev stack runs as a real process (`python -m conveyor.common.devstack`) with its own Redis,
PostgreSQL, results, producer and two workers. A worker and then redis-server are SIGKILLed;
each is restarted while the rest keep running, and jobs enqueued afterwards run to the end.
SIGTERM then stops everything with exit status 0 and leaves no process behind.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conveyor.common.client import ConveyorClient
from conveyor.common.devstack.servers import free_port
from conveyor.common.errors import ConveyorError
from conveyor.common.server import EXIT_ADDRESS_IN_USE
from conveyor.v1 import job_pb2
from tests.support.wait import wait_for, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[2]
_STARTED = re.compile(r"devstack\s*\| (\S+) started \(pid (\d+), ")


def _two_free_ports() -> int:
    """A port p with p and p + 1 both free a moment ago (the two workers' ports)."""
    while True:
        port = free_port()
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port


@dataclass
class DevStack:
    proc: subprocess.Popen[str]
    redis_url: str
    producer: str
    results: str
    workers: list[str]
    data_dir: Path
    lines: list[str] = field(default_factory=list)

    def output(self) -> str:
        return "\n".join(self.lines)

    def saw(self, text: str, after: int = 0) -> bool:
        return any(text in line for line in self.lines[after:])

    def pids(self, name: str) -> list[int]:
        """Every pid the stack started ``name`` with, oldest first."""
        return [int(m[2]) for line in list(self.lines) if (m := _STARTED.search(line)) and m[1] == name]


def _serving(addr: str) -> bool:
    with grpc.insecure_channel(addr) as channel:
        check = health_pb2_grpc.HealthStub(channel).Check  # type: ignore[attr-defined]
        try:
            reply = check(health_pb2.HealthCheckRequest(), timeout=1.0)
        except grpc.RpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0): only a reaped (or not-yet-reaped-by-init) process is gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False


def _redis_pid(url: str) -> int:
    with redis.Redis.from_url(url) as client:
        return int(client.info("server")["process_id"])


@pytest.fixture(scope="module")
def devstack() -> Iterator[DevStack]:
    # Under /tmp and world-traversable: as root, PostgreSQL runs as `postgres` and must reach its data.
    data_dir = Path(tempfile.mkdtemp(prefix="conveyor-devstack-test-", dir="/tmp"))
    data_dir.chmod(0o755)
    ports = {
        "CONVEYOR_DEV_REDIS_PORT": free_port(),
        "CONVEYOR_DEV_PG_PORT": free_port(),
        "CONVEYOR_DEV_PRODUCER_PORT": free_port(),
        "CONVEYOR_DEV_RESULTS_PORT": free_port(),
        "CONVEYOR_DEV_WORKER_PORT": _two_free_ports(),
    }
    env = {**os.environ, **{k: str(v) for k, v in ports.items()}, "PYTHONUNBUFFERED": "1"}
    env.pop("NO_COLOR", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "conveyor.common.devstack", "--data-dir", str(data_dir), "--workers", "2"],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        process_group=0,
    )
    worker_port = ports["CONVEYOR_DEV_WORKER_PORT"]
    stack = DevStack(
        proc=proc,
        redis_url=f"redis://127.0.0.1:{ports['CONVEYOR_DEV_REDIS_PORT']}/0",
        producer=f"127.0.0.1:{ports['CONVEYOR_DEV_PRODUCER_PORT']}",
        results=f"127.0.0.1:{ports['CONVEYOR_DEV_RESULTS_PORT']}",
        workers=[f"127.0.0.1:{worker_port}", f"127.0.0.1:{worker_port + 1}"],
        data_dir=data_dir,
    )

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            stack.lines.append(line.rstrip("\n"))

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        wait_until(lambda: stack.saw("Conveyor is up") or proc.poll() is not None, "the dev stack to be up", within=90)
        assert proc.poll() is None, stack.output()
        yield stack
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        reader.join(5)
        if proc.stdout is not None:
            proc.stdout.close()
        shutil.rmtree(data_dir, ignore_errors=True)


async def _run_a_job(stack: DevStack, payload: dict[str, float]) -> job_pb2.Job:
    """Enqueue a demo job (retrying while the producer cannot reach Redis yet) and wait until it succeeded."""
    async with ConveyorClient(
        stack.producer, stack.results, retries=0, timeout=5, token=(stack.data_dir / "admin.token").read_text().strip()
    ) as client:

        async def enqueued() -> str:
            try:
                return (await client.enqueue("default", "demo.sleep", payload)).job_id
            except ConveyorError:
                return ""

        job_id = await wait_for(enqueued, "an Enqueue to succeed", within=60, interval=0.2)

        async def finished() -> job_pb2.Job | None:
            try:
                job = await client.get_job(job_id)
            except ConveyorError:
                return None
            return job if job.state == job_pb2.JOB_STATE_SUCCEEDED else None

        done = await wait_for(finished, f"job {job_id} to succeed", within=90, interval=0.2)
        assert done is not None
        return done


async def test_a_killed_worker_is_restarted_alone_and_jobs_still_run(devstack: DevStack) -> None:
    assert all(_serving(addr) for addr in devstack.workers), "each worker has its own health port"
    before = {name: devstack.pids(name) for name in ("results", "producer", "worker-2")}
    victim = devstack.pids("worker-1")[-1]
    mark = len(devstack.lines)
    os.kill(victim, signal.SIGKILL)

    wait_until(lambda: devstack.saw("worker-1 exited unexpectedly with -9", mark), "the exit to be reported", within=30)
    wait_until(lambda: devstack.saw("worker-1 is serving again", mark), "worker-1 to be restarted", within=60)
    assert devstack.pids("worker-1")[-1] != victim
    assert _serving(devstack.workers[0])
    assert {name: devstack.pids(name) for name in before} == before, "nothing else was restarted"
    job = await _run_a_job(devstack, {"seconds": 0.1, "steps": 1})
    assert job.state == job_pb2.JOB_STATE_SUCCEEDED
    assert devstack.proc.poll() is None


async def test_a_killed_redis_is_restarted_and_the_services_reconnect(devstack: DevStack) -> None:
    victim = _redis_pid(devstack.redis_url)
    services = {name: devstack.pids(name) for name in ("results", "producer", "worker-1", "worker-2")}
    mark = len(devstack.lines)
    os.kill(victim, signal.SIGKILL)

    wait_until(lambda: devstack.saw("redis exited unexpectedly", mark), "the Redis crash to be reported", within=30)
    wait_until(lambda: devstack.saw("redis is back", mark), "Redis to be restarted", within=60)
    assert _redis_pid(devstack.redis_url) != victim
    job = await _run_a_job(devstack, {"seconds": 0.1, "steps": 2})
    assert job.result.struct_value["steps"] == 2
    addrs = [devstack.producer, devstack.results, *devstack.workers]
    wait_until(lambda: all(_serving(a) for a in addrs), "every service SERVING again", within=60)
    # The services reconnected by themselves: none of them was restarted.
    assert {name: devstack.pids(name) for name in services} == services
    assert devstack.proc.poll() is None


async def test_a_killed_postgresql_is_restarted_and_outcomes_still_land(devstack: DevStack) -> None:
    postmaster = int(next(devstack.data_dir.glob("**/postmaster.pid")).read_text().split()[0])
    services = {name: devstack.pids(name) for name in ("results", "producer", "worker-1", "worker-2")}
    mark = len(devstack.lines)
    os.kill(postmaster, signal.SIGKILL)

    wait_until(lambda: devstack.saw("postgres exited unexpectedly", mark), "the crash to be reported", within=30)
    wait_until(lambda: devstack.saw("postgres is back", mark), "PostgreSQL to be restarted", within=90)
    job = await _run_a_job(devstack, {"seconds": 0.1, "steps": 1})
    async with ConveyorClient(
        devstack.producer,
        devstack.results,
        retries=0,
        timeout=5,
        token=(devstack.data_dir / "admin.token").read_text().strip(),
    ) as client:

        async def recorded() -> bool:
            try:
                listed = await client.list_jobs(queue="default", state=job_pb2.JOB_STATE_SUCCEEDED)
            except ConveyorError:
                return False
            return job.id in {j.id for j in listed.jobs}

        await wait_for(recorded, "the outcome in PostgreSQL", within=90, interval=0.3)
    assert {name: devstack.pids(name) for name in services} == services
    assert devstack.proc.poll() is None


def test_a_second_worker_started_by_hand_on_a_port_in_use_fails_clearly(devstack: DevStack) -> None:
    addr = devstack.workers[0]
    env = {**os.environ, "REDIS_URL": devstack.redis_url, "CONVEYOR_GRPC_ADDR": addr, "CONVEYOR_WORKER_ID": "by-hand"}
    done = subprocess.run(
        [sys.executable, "-m", "conveyor.worker"], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == EXIT_ADDRESS_IN_USE, done.stdout + done.stderr
    assert f"cannot listen on {addr}: the address is already in use" in done.stderr
    assert _serving(addr), "the stack's worker keeps its port"


def test_sigterm_stops_everything_with_exit_0(devstack: DevStack) -> None:
    pids = [pid for name in ("results", "producer", "worker-1", "worker-2") for pid in devstack.pids(name)]
    pids.append(_redis_pid(devstack.redis_url))
    postmaster = next(devstack.data_dir.glob("**/postmaster.pid"))
    pids.append(int(postmaster.read_text().split()[0]))

    devstack.proc.send_signal(signal.SIGTERM)
    assert devstack.proc.wait(60) == 0, devstack.output()
    wait_until(lambda: not any(_alive(pid) for pid in pids), "every process of the stack to be gone", within=30)
    assert devstack.saw("stopped")
    assert "\x1b[" not in devstack.output(), "output to a pipe carries no ANSI colour"
