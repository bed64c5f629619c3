"""ListWorkers with real worker processes: each registers itself, a SIGKILLed one drops off after its TTL,
a cleanly stopped one leaves at once."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest

from conveyor.common.client import ConveyorClient
from conveyor.v1 import admin_service_pb2
from tests.e2e.test_stack import buf_curl
from tests.faults.conftest import FaultStack, StartWorker
from tests.support.wait import wait_for, wait_until

pytestmark = pytest.mark.e2e
TTL_S = 2.0


async def test_workers_register_and_leave(fault_stack: FaultStack, worker_process: StartWorker) -> None:
    ttl = {"CONVEYOR_WORKER_TTL_SECONDS": str(TTL_S)}
    doomed = worker_process("reg-doomed", CONVEYOR_QUEUES="reg-a", CONVEYOR_CONCURRENCY="4", **ttl)
    leaving = worker_process("reg-leaving", CONVEYOR_QUEUES="reg-b,reg-a", CONVEYOR_SHUTDOWN_GRACE_SECONDS="1", **ttl)
    assert doomed.proc is not None and leaving.proc is not None

    async with ConveyorClient(fault_stack.producer.addr) as client:
        # Two long jobs: they keep running (in flight) on whichever workers claimed them.
        jobs = [(await client.enqueue("reg-a", "demo.sleep", {"seconds": 60})).job_id for _ in range(2)]

        async def both_in_flight() -> list[admin_service_pb2.WorkerInfo] | None:
            workers = await client.list_workers()
            return workers if len(workers) == 2 and sum(w.in_flight for w in workers) == 2 else None

        workers = {w.worker_id: w for w in await wait_for(both_in_flight, "two workers and the 2 jobs in flight")}
        assert sorted(workers) == ["reg-doomed", "reg-leaving"]
        assert workers["reg-doomed"].pid == doomed.proc.pid and workers["reg-leaving"].pid == leaving.proc.pid
        assert list(workers["reg-doomed"].queues) == ["reg-a"]
        assert list(workers["reg-leaving"].queues) == ["reg-b", "reg-a"]
        assert workers["reg-doomed"].concurrency == 4
        assert sorted(j for w in workers.values() for j in w.job_ids) == sorted(jobs)
        assert workers["reg-doomed"].ttl.ToMilliseconds() == int(TTL_S * 1000)
        assert (await client.get_queue_stats("reg-a")).stats.workers == 2

        # SIGKILL: no clean-up runs. The entry expires TTL_S after the last heartbeat (Redis's
        # clock), never sooner: the listing drops the worker then, and only then.
        last_beat_s = workers["reg-doomed"].last_heartbeat_time.ToNanoseconds() / 1e9
        doomed.kill()
        for w in await client.list_workers():
            if w.worker_id == "reg-doomed":  # its last entry, unless it expired already
                last_beat_s = w.last_heartbeat_time.ToNanoseconds() / 1e9

        async def doomed_gone() -> bool:
            return [w.worker_id for w in await client.list_workers()] == ["reg-leaving"]

        await wait_for(doomed_gone, "the killed worker to drop off", within=TTL_S + 10)
        assert time.time() >= last_beat_s + TTL_S - 0.01
        assert (await client.get_queue_stats("reg-a")).stats.workers == 1

        # A clean stop (SIGTERM) deregisters: gone as soon as the process has exited.
        assert await asyncio.to_thread(leaving.stop) == 0
        assert await client.list_workers() == []
        assert (await client.get_queue_stats("reg-a")).stats.workers == 0


def test_the_readme_commands_work_over_reflection(fault_stack: FaultStack, worker_process: StartWorker) -> None:
    """buf curl (as in the README) learns the new RPCs from reflection; the producer reaches the results service."""
    worker_process("reg-curl", CONVEYOR_QUEUES="reg-curl")
    base = f"http://{fault_stack.producer.addr}/conveyor.v1.AdminService"
    enqueued = buf_curl(
        f"http://{fault_stack.producer.addr}/conveyor.v1.ProducerService/Enqueue",
        data=json.dumps({"queue": "reg-curl", "type": "demo.echo", "payload": {"n": 1}}),
    )
    assert enqueued.returncode == 0, enqueued.stderr

    def finished_in_postgresql() -> dict[str, Any] | None:
        got = buf_curl(f"{base}/GetQueueStats", data=json.dumps({"queue": "reg-curl"}))
        assert got.returncode == 0, got.stderr
        body: dict[str, Any] = json.loads(got.stdout)
        windows = body.get("finished", {}).get("windows", [])
        return body if windows and windows[0].get("succeeded") == "1" else None

    body = wait_until(finished_in_postgresql, "the echo job counted as succeeded", within=30)
    assert body["stats"]["queue"] == "reg-curl" and body["stats"]["workers"] == 1
    assert [w["window"] for w in body["finished"]["windows"]] == ["60s", "300s", "3600s"]
    assert "finishedUnavailable" not in body

    listed = buf_curl(f"{base}/ListQueues")
    assert listed.returncode == 0, listed.stderr
    assert "reg-curl" in [q["queue"] for q in json.loads(listed.stdout)["queues"]]

    workers = buf_curl(f"{base}/ListWorkers", data=json.dumps({"queue": "reg-curl"}))
    assert workers.returncode == 0, workers.stderr
    assert [w["workerId"] for w in json.loads(workers.stdout)["workers"]] == ["reg-curl"]

    missing = buf_curl(f"{base}/GetQueueStats", data=json.dumps({"queue": "never-used"}))
    assert missing.returncode == 5 * 8, missing  # buf curl exits with the gRPC code times 8
    bad = buf_curl(f"{base}/GetQueueStats", data=json.dumps({"queue": "no spaces"}))
    assert bad.returncode == 3 * 8, bad
    assert "invalid_argument" in bad.stderr
