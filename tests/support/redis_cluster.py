"""A real Redis Cluster on this machine: 6 `redis-server` processes (3 primaries, 3 replicas).

Built the way an operator builds one: each node started with ``--cluster-enabled yes`` on a
free port in its own temporary directory, then ``redis-cli --cluster create ...
--cluster-replicas 1 --cluster-yes``, then waited on until every node says
``cluster_state:ok``. Nodes run with AOF and ``appendfsync always`` so that a primary killed
with SIGKILL loses no write it acknowledged (what reached its replica is another matter: see
ADR 0026). Teardown kills every node and removes the directories.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis
from redis.crc import key_slot

from conveyor.common.devstack.servers import free_port

#: Seconds a node may be unreachable before the others mark it failed (and its replica takes over).
NODE_TIMEOUT_MS = 1000


@dataclass
class Node:
    port: int
    directory: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2, socket_connect_timeout=1)

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


@dataclass
class RedisClusterServer:
    """Six nodes; ``url`` is the ``redis+cluster://`` URL Conveyor's services take."""

    nodes: list[Node] = field(default_factory=list)
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="conveyor-cluster-")))
    _initial_primaries: list[int] = field(default_factory=list)

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(n.address for n in self.nodes)

    def _spawn(self, node: Node) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server not found: run deploy/local/install-system-deps.sh")
        node.process = subprocess.Popen(
            [
                binary,
                "--bind", "127.0.0.1",
                "--port", str(node.port),
                "--cluster-enabled", "yes",
                "--cluster-config-file", str(node.directory / "nodes.conf"),
                "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
                # A queue lives on one slot; the other shards' queues keep working while one fails over.
                "--cluster-require-full-coverage", "no",
                "--save", "",
                "--appendonly", "yes",
                "--appendfsync", "always",
                "--maxmemory-policy", "noeviction",
                "--dir", str(node.directory),
                "--logfile", str(node.directory / "redis.log"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip

    def start(self, timeout: float = 60.0) -> None:
        for i in range(6):
            directory = self.root / f"node{i}"
            directory.mkdir()
            node = Node(_cluster_port(), directory)
            self.nodes.append(node)
            self._spawn(node)
        deadline = time.monotonic() + timeout
        for node in self.nodes:
            self._wait(lambda n=node: _pings(n), deadline, f"node {node.address} answering PING")
        subprocess.run(
            [
                "redis-cli",
                "--cluster",
                "create",
                *(n.address for n in self.nodes),
                "--cluster-replicas",
                "1",
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=timeout,
        )
        self._wait(self.healthy, deadline, "cluster_state:ok on every node")

    def healthy(self) -> bool:
        """Every live node says cluster_state:ok and sees three primaries covering all slots."""
        for node in self.nodes:
            if not node.alive:
                continue
            try:
                with node.client() as c:
                    info = c.execute_command("CLUSTER", "INFO")
            except redis.RedisError:
                return False
            text = info.decode() if isinstance(info, bytes) else str(info)
            if "cluster_state:ok" not in text or "cluster_slots_ok:16384" not in text:
                return False
        return len(self.primaries()) == 3

    @staticmethod
    def _wait(ready: object, deadline: float, what: str) -> None:
        assert callable(ready)
        while not ready():
            if time.monotonic() > deadline:
                raise TimeoutError(f"Redis Cluster: timed out waiting for {what}")
            time.sleep(0.05)

    def _shards(self) -> list[dict[str, object]]:
        for node in self.nodes:
            if not node.alive:
                continue
            with contextlib.suppress(redis.RedisError), node.client() as c:
                return list(c.execute_command("CLUSTER", "SHARDS"))
        raise RuntimeError("no live node")

    def slot_ranges(self) -> dict[int, list[tuple[int, int]]]:
        """Port of each live primary -> the slot ranges it serves."""
        out: dict[int, list[tuple[int, int]]] = {}
        for node in self.nodes:
            if not node.alive:
                continue
            try:
                with node.client() as c:
                    slots = c.execute_command("CLUSTER", "SLOTS")
            except redis.RedisError:
                continue
            for start, end, primary, *_ in slots:
                port = int(primary[1])
                if any(n.port == port and n.alive for n in self.nodes):
                    out.setdefault(port, []).append((int(start), int(end)))
            if out:
                return out
        return out

    def primaries(self) -> list[int]:
        """Ports of the live primaries, per CLUSTER SLOTS of a live node."""
        return sorted(self.slot_ranges())

    def primary_of(self, key: str) -> int:
        """Port of the primary serving ``key``'s slot."""
        slot = key_slot(key.encode())
        for port, ranges in self.slot_ranges().items():
            if any(start <= slot <= end for start, end in ranges):
                return port
        raise LookupError(f"no live primary serves slot {slot}")

    def node(self, port: int) -> Node:
        return next(n for n in self.nodes if n.port == port)

    def kill(self, port: int) -> None:
        """SIGKILL one node (no AOF rewrite, no goodbye to the others)."""
        node = self.node(port)
        assert node.process is not None
        node.process.send_signal(signal.SIGKILL)
        node.process.wait(10)

    def wait_failover(self, killed: int, timeout: float = 30.0) -> int:
        """Wait until the slots of the killed primary are served by its promoted replica; return its port."""
        deadline = time.monotonic() + timeout

        def promoted() -> bool:
            ports = self.primaries()
            return killed not in ports and len(ports) == 3 and self.healthy()

        self._wait(promoted, deadline, f"a replica of {killed} promoted")
        return next(p for p in self.primaries() if p != killed and not self._was_primary(p))

    def _was_primary(self, port: int) -> bool:
        return port in self._initial_primaries

    def remember_primaries(self) -> None:
        self._initial_primaries = self.primaries()

    def stop(self) -> None:
        for node in self.nodes:
            if node.alive:
                assert node.process is not None
                node.process.send_signal(signal.SIGKILL)
                node.process.wait(10)
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> RedisClusterServer:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        self.remember_primaries()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free and valid too."""
    while True:
        port = free_port()
        if port + 10000 > 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port


def _pings(node: Node) -> bool:
    try:
        with node.client() as c:
            return bool(c.ping())
    except redis.RedisError:
        return False
