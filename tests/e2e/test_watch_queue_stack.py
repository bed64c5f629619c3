"""WatchQueue against the producer process, with buf curl learning the schema from reflection."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import threading
from typing import Any

import pytest

from conveyor.common.client import ConveyorClient
from tests.e2e.test_stack import QUEUE, ROOT, Stack, stack  # noqa: F401  (the module's own stack)

pytestmark = pytest.mark.e2e


def _messages(lines: list[str]) -> list[dict[str, Any]]:
    decoder = json.JSONDecoder()
    text, out = "".join(lines).strip(), []
    while text:
        try:
            message, end = decoder.raw_decode(text)
        except json.JSONDecodeError:
            break  # a message still being written
        out.append(message)
        text = text[end:].strip()
    return out


async def _run_job(addr: str) -> tuple[str, int]:
    async with ConveyorClient(addr) as client:
        job = await client.enqueue(QUEUE, "demo.sleep", {"seconds": 0.2, "steps": 2})
        return job.job_id, len([e async for e in client.watch(job.job_id)])  # until SUCCEEDED


def test_buf_curl_tails_a_queue_over_reflection(stack: Stack) -> None:  # noqa: F811
    job_id, watched = asyncio.run(_run_job(stack.producer.addr))
    cmd = ["npx", "--no-install", "buf", "curl", "--protocol", "grpc", "--http2-prior-knowledge"]
    cmd += ["-d", json.dumps({"queue": QUEUE, "replay": True})]
    cmd += [f"http://{stack.producer.addr}/conveyor.v1.ProducerService/WatchQueue"]
    lines: list[str] = []
    done = threading.Event()
    # Its own process group: npx runs buf as a child, which proc.kill() alone would leave holding the pipe
    # (the reader thread then never ends, and closing the pipe under it hangs the test).
    with subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, process_group=0
    ) as proc:

        def read() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.append(line)
                if any(
                    m.get("event", {}).get("jobId") == job_id and m["event"]["type"] == "EVENT_TYPE_SUCCEEDED"
                    for m in _messages(lines)
                ):
                    done.set()
                    return

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            assert done.wait(30), (lines, proc.poll())
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            reader.join(10)
    mine = [m["event"] for m in _messages(lines) if m.get("event", {}).get("jobId") == job_id]
    assert [e["type"] for e in mine] == [
        "EVENT_TYPE_QUEUED",
        "EVENT_TYPE_ACTIVE",
        "EVENT_TYPE_PROGRESS",
        "EVENT_TYPE_PROGRESS",
        "EVENT_TYPE_SUCCEEDED",
    ]
    assert watched == len(mine)
    assert mine[-1]["result"] == {"slept": 0.2, "steps": 2}
