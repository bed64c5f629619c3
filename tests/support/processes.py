"""Services as real subprocesses (`python -m conveyor.<service>`), for end-to-end and fault tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conveyor.common.devstack.servers import free_port

ROOT = Path(__file__).resolve().parents[2]


class ServiceProcess:
    """One service process in its own process group, logging to a file."""

    def __init__(
        self, service: str, env: Mapping[str, str], name: str | None = None, health_port: bool = False
    ) -> None:
        self.service = service
        self.name = name or service
        self.port = free_port()
        self.addr = f"127.0.0.1:{self.port}"
        #: With ``health_port``: the plaintext grpc.health.v1 port (CONVEYOR_HEALTH_ADDR) readiness is read
        #: from, for services whose gRPC port speaks TLS.
        self.health_addr = f"127.0.0.1:{free_port()}" if health_port else ""
        self._env = {
            **os.environ,
            "CONVEYOR_LOG_FORMAT": "json",
            "CONVEYOR_LOG_LEVEL": "info",
            "PYTHONUNBUFFERED": "1",
            # Free ports are random: the default metrics port (gRPC + 1000) could be anyone's.
            "CONVEYOR_METRICS_ADDR": "off",
            # Workers may load handlers from tests.support.handlers.
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH", "")])),
            **env,
            "CONVEYOR_GRPC_ADDR": self.addr,
            **({"CONVEYOR_HEALTH_ADDR": self.health_addr} if self.health_addr else {}),
        }
        self._log = Path(tempfile.mkstemp(prefix=f"conveyor-{self.name}-", suffix=".log")[1])
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0, wait: bool = True) -> ServiceProcess:
        with self._log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", f"conveyor.{self.service}"],
                env=self._env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        if wait:
            self.wait_serving(timeout)
        return self

    def wait_serving(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.health_addr or self.addr) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            check = stub.Check  # type: ignore[attr-defined]
            while time.monotonic() < deadline:
                if self.proc is not None and self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
                try:
                    if (
                        check(health_pb2.HealthCheckRequest(), timeout=1).status
                        == health_pb2.HealthCheckResponse.SERVING
                    ):
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.05)
        raise TimeoutError(f"{self.name} not SERVING after {timeout} s:\n{self.log_tail()}")

    def log_text(self) -> str:
        return self._log.read_text(errors="replace")

    def records(self, event: str) -> list[dict[str, Any]]:
        """The JSON log records of ``event`` this process wrote, in order (other lines skipped)."""
        found = []
        for line in self.log_text().splitlines():
            if f'"{event}"' not in line:
                continue
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("event") == event:
                found.append(record)
        return found

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL the process group: no cleanup, as a crash."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 15.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None
