"""Several producer processes on one port (CONVEYOR_PRODUCER_PROCESSES, issue #13 item 5).

The group's members share the gRPC port through SO_REUSEPORT: new connections are spread over
them, a member that dies is restarted, SIGTERM stops them all, and a member that cannot start
for its configuration stops the group with its exit code.
"""

from __future__ import annotations

import os
import signal
import socket
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conveyor.common.devstack.servers import free_port
from conveyor.v1 import producer_service_pb2, producer_service_pb2_grpc
from tests.support.processes import ServiceProcess
from tests.support.wait import wait_until

pytestmark = pytest.mark.e2e


def _metrics_base_port() -> int:
    """A port p with p + 100 free too (member 1 serves /metrics on p + 100)."""
    for _ in range(50):
        port = free_port()
        if port + 100 > 65535:
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + 100))
            except OSError:
                continue
        return port
    raise AssertionError("no pair of free ports")


def _members(producer: ServiceProcess) -> dict[int, int]:
    """Index -> pid of the newest start of each member, from the group's log."""
    return {int(record["index"]): int(record["pid"]) for record in producer.records("member_started")}


def _enqueues(port: int) -> int:
    """Successful Enqueue calls the member whose /metrics is on ``port`` served."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return int(
        sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == "conveyor_rpc_requests_total"
            and sample.labels.get("method", "").endswith("/Enqueue")
            and sample.labels.get("code") == "OK"
        )
    )


def _enqueue_on_new_connections(addr: str, calls: int) -> None:
    """One Enqueue per fresh connection, so that the kernel picks a member for each."""
    for i in range(calls):
        # A distinct channel argument keeps gRPC from reusing one subchannel for all of them.
        with grpc.insecure_channel(addr, options=[("conveyor.test.connection", i)]) as channel:
            stub = producer_service_pb2_grpc.ProducerServiceStub(channel)
            request = producer_service_pb2.EnqueueRequest(queue="group", type="demo.noop")
            stub.Enqueue(request, timeout=10, wait_for_ready=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_two_members_share_the_port_restart_when_killed_and_stop_together(redis_url: str) -> None:
    metrics_port = _metrics_base_port()
    producer = ServiceProcess(
        "producer",
        {
            "REDIS_URL": redis_url,
            "CONVEYOR_PRODUCER_PROCESSES": "2",
            "CONVEYOR_METRICS_ADDR": f"127.0.0.1:{metrics_port}",
            "CONVEYOR_SHUTDOWN_GRACE_SECONDS": "2",
        },
        name="producer-group",
    )
    producer.start()
    try:
        members = wait_until(lambda: len(_members(producer)) == 2 and _members(producer), "two members", within=30)
        # Both members serve: new connections are spread over them by the kernel.
        wait_until(lambda: _metrics_up(metrics_port) and _metrics_up(metrics_port + 100), "both metrics ports")
        _enqueue_on_new_connections(producer.addr, 40)
        served = [_enqueues(metrics_port), _enqueues(metrics_port + 100)]
        assert sum(served) == 40 and min(served) > 0, served

        # A member SIGKILLed is restarted by the group; the port keeps answering meanwhile.
        os.kill(members[1], signal.SIGKILL)
        _enqueue_on_new_connections(producer.addr, 5)
        restarted = wait_until(
            lambda: _members(producer)[1] != members[1] and _members(producer), "member 1 restarted", within=30
        )
        wait_until(lambda: _metrics_up(metrics_port + 100), "the restarted member's metrics")
        assert _alive(restarted[0]) and _alive(restarted[1])

        # SIGTERM to the group stops every member, and the group exits 0.
        producer.signal(signal.SIGTERM)
        assert producer.wait(30) == 0
        assert not _alive(restarted[0]) and not _alive(restarted[1])
    finally:
        producer.kill()


def _metrics_up(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2):
            return True
    except OSError:
        return False


def test_a_member_that_cannot_start_stops_the_group_with_its_exit_code(redis_url: str) -> None:
    producer = ServiceProcess(
        "producer",
        {
            "REDIS_URL": redis_url,
            "CONVEYOR_PRODUCER_PROCESSES": "2",
            "CONVEYOR_AUTH_TOKENS_FILE": "/nonexistent/tokens.toml",
        },
        name="producer-group-bad",
    )
    producer.start(wait=False)
    try:
        assert producer.wait(30) == 78
        assert "member_cannot_start" in producer.log_text()
    finally:
        producer.kill()
