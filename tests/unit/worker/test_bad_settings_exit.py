"""A worker given a queue name no API accepts refuses to start, with one line saying why."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conveyor.common.server import EXIT_BAD_SETTING
from conveyor.common.validate import QUEUE_RULE


@pytest.mark.parametrize("queues", ["default,..", ".", "bad queue"])
def test_a_worker_with_a_bad_queue_name_exits_with_one_line(queues: str) -> None:
    env = {**os.environ, "CONVEYOR_QUEUES": queues, "REDIS_URL": "redis://127.0.0.1:1/0"}
    done = subprocess.run(
        [sys.executable, "-m", "conveyor.worker"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == EXIT_BAD_SETTING, done.stderr
    assert done.stderr.startswith("error: CONVEYOR_QUEUES: queue ") and QUEUE_RULE in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
