"""Bearer tokens with roles, against real producer and results processes with a token file.

Each service runs as `python -m conveyor.<service>` with CONVEYOR_AUTH_TOKENS_FILE; calls go
through real gRPC channels with and without `authorization` metadata, through the Python
client and through the `conveyor` command.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from conveyor.common import auth
from conveyor.common.auth import Role
from conveyor.common.client import ConveyorClient
from conveyor.common.devstack.servers import PostgresServer, RedisServer
from conveyor.v1 import (
    admin_service_pb2,
    admin_service_pb2_grpc,
    producer_service_pb2,
    producer_service_pb2_grpc,
    results_service_pb2,
    results_service_pb2_grpc,
)
from tests.support.databases import fresh_database
from tests.support.processes import ServiceProcess
from tests.support.wait import wait_until

pytestmark = pytest.mark.e2e

CONVEYOR = str(Path(sys.executable).with_name("conveyor"))


@dataclass
class Stack:
    producer: str
    results: str
    tokens: dict[str, str]
    token_file: Path
    producer_process: ServiceProcess


@pytest.fixture(scope="module")
def stack(pg_server: PostgresServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tokens = {name: auth.new_token() for name in ("admin", "producer", "reader", "billing", "service")}
    token_file = tmp_path_factory.mktemp("auth") / "tokens.toml"
    token_file.write_text(
        auth.entry_for(tokens["admin"], "ops", Role.ADMIN)
        + auth.entry_for(tokens["producer"], "shop", Role.PRODUCER)
        + auth.entry_for(tokens["reader"], "viewer", Role.READER)
        + auth.entry_for(tokens["billing"], "billing", Role.PRODUCER, ["invoices"])
        # What the producer itself presents to the results service.
        + auth.entry_for(tokens["service"], "producer-service", Role.READER)
    )
    database_url = fresh_database(pg_server, "auth")
    with RedisServer() as redis_server:
        common = {"REDIS_URL": redis_server.url, "CONVEYOR_AUTH_TOKENS_FILE": str(token_file)}
        processes: list[ServiceProcess] = []
        try:
            results = ServiceProcess("results", {**common, "DATABASE_URL": database_url}).start()
            processes.append(results)
            producer_env = {**common, "CONVEYOR_RESULTS_ADDR": results.addr, "CONVEYOR_TOKEN": tokens["service"]}
            producer = ServiceProcess("producer", producer_env).start()
            processes.append(producer)
            yield Stack(producer.addr, results.addr, tokens, token_file, producer)
        finally:
            for p in reversed(processes):
                p.kill()


def _md(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def _call(addr: str, method: str, request: object, token: str | None) -> grpc.RpcError | object:
    """The response, or the RpcError the call ended with."""
    with grpc.insecure_channel(addr) as channel:
        stubs = {
            "producer": producer_service_pb2_grpc.ProducerServiceStub(channel),
            "admin": admin_service_pb2_grpc.AdminServiceStub(channel),
            "results": results_service_pb2_grpc.ResultsServiceStub(channel),
        }
        service, name = method.split(".")
        try:
            return getattr(stubs[service], name)(request, metadata=_md(token) if token else None, timeout=10)
        except grpc.RpcError as exc:
            return exc


def _code(outcome: object) -> grpc.StatusCode:
    return outcome.code() if isinstance(outcome, grpc.RpcError) else grpc.StatusCode.OK  # type: ignore[attr-defined]


def _enqueue(queue: str = "orders") -> producer_service_pb2.EnqueueRequest:
    return producer_service_pb2.EnqueueRequest(queue=queue, type="demo.echo", payload_json=b'{"n": 1}')


def test_calls_without_a_token_or_with_an_unknown_one_are_unauthenticated_and_change_nothing(stack: Stack) -> None:
    for token in (None, auth.new_token()):
        outcome = _call(stack.producer, "producer.Enqueue", _enqueue("nobody"), token)
        assert _code(outcome) == grpc.StatusCode.UNAUTHENTICATED
        assert isinstance(outcome, grpc.RpcError)
        assert "Traceback" not in (outcome.details() or "")  # type: ignore[attr-defined]
    listed = _call(stack.producer, "admin.ListQueues", admin_service_pb2.ListQueuesRequest(), stack.tokens["admin"])
    assert "nobody" not in [q.name for q in listed.queues]  # type: ignore[attr-defined]
    outcome = _call(stack.results, "results.ListJobs", results_service_pb2.ListJobsRequest(), None)
    assert _code(outcome) == grpc.StatusCode.UNAUTHENTICATED
    assert "authorization: Bearer <token>" in outcome.details()  # type: ignore[attr-defined]


def test_health_and_reflection_stay_open(stack: Stack) -> None:
    for addr in (stack.producer, stack.results):
        with grpc.insecure_channel(addr) as channel:
            answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
    grpcurl = Path(sys.executable).with_name("grpcurl")
    listed = subprocess.run(
        [str(grpcurl), "-plaintext", stack.producer, "list"], capture_output=True, text=True, timeout=30
    )
    assert listed.returncode == 0, listed.stderr
    assert "conveyor.v1.ProducerService" in listed.stdout


def test_each_role_calls_what_it_may_and_is_told_what_it_lacks(stack: Stack) -> None:
    t = stack.tokens
    created = _call(stack.producer, "producer.Enqueue", _enqueue(), t["producer"])
    assert _code(created) == grpc.StatusCode.OK
    job_id = created.job_id  # type: ignore[attr-defined]
    get = producer_service_pb2.GetJobRequest(job_id=job_id)
    assert _code(_call(stack.producer, "producer.GetJob", get, t["reader"])) == grpc.StatusCode.OK
    stats = _call(
        stack.producer, "admin.GetQueueStats", admin_service_pb2.GetQueueStatsRequest(queue="orders"), t["reader"]
    )
    # The producer reached the results service with its own token (CONVEYOR_TOKEN).
    assert stats.finished_unavailable == ""  # type: ignore[attr-defined]

    denied = _call(stack.producer, "producer.Enqueue", _enqueue(), t["reader"])
    assert _code(denied) == grpc.StatusCode.PERMISSION_DENIED
    assert denied.details() == "token 'viewer' has role reader; Enqueue needs admin or producer"  # type: ignore[attr-defined]

    cancel = producer_service_pb2.CancelJobRequest(job_id=job_id)
    denied = _call(stack.producer, "producer.CancelJob", cancel, t["producer"])
    assert _code(denied) == grpc.StatusCode.PERMISSION_DENIED
    status = rpc_status.from_call(denied)  # type: ignore[arg-type]
    assert status is not None
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    assert (info.reason, info.metadata["role"], info.metadata["needs"]) == ("ROLE", "producer", "admin")
    # Refused means unchanged: the job is still there to be cancelled by an admin.
    assert _code(_call(stack.producer, "producer.CancelJob", cancel, t["admin"])) == grpc.StatusCode.OK

    pause = admin_service_pb2.PauseQueueRequest(queue="orders")
    assert _code(_call(stack.producer, "admin.PauseQueue", pause, t["reader"])) == grpc.StatusCode.PERMISSION_DENIED
    assert _code(_call(stack.producer, "admin.PauseQueue", pause, t["admin"])) == grpc.StatusCode.OK

    list_jobs = results_service_pb2.ListJobsRequest(queue="orders")
    assert _code(_call(stack.results, "results.ListJobs", list_jobs, t["reader"])) == grpc.StatusCode.OK
    assert (
        _code(_call(stack.results, "results.ListJobs", list_jobs, t["producer"])) == grpc.StatusCode.PERMISSION_DENIED
    )


def test_a_queue_limited_token_reaches_only_its_queues(stack: Stack) -> None:
    billing = stack.tokens["billing"]
    assert _code(_call(stack.producer, "producer.Enqueue", _enqueue("invoices"), billing)) == grpc.StatusCode.OK
    denied = _call(stack.producer, "producer.Enqueue", _enqueue("orders"), billing)
    assert _code(denied) == grpc.StatusCode.PERMISSION_DENIED
    assert "limited to queues ['invoices']; not allowed: ['orders']" in denied.details()  # type: ignore[attr-defined]
    batch = producer_service_pb2.EnqueueBatchRequest(jobs=[_enqueue("invoices"), _enqueue("orders")])
    assert _code(_call(stack.producer, "producer.EnqueueBatch", batch, billing)) == grpc.StatusCode.PERMISSION_DENIED


def test_tokens_are_added_and_revoked_without_a_restart(stack: Stack) -> None:
    newcomer = auth.new_token()
    original = stack.token_file.read_text()
    request = admin_service_pb2.ListQueuesRequest()
    assert _code(_call(stack.producer, "admin.ListQueues", request, newcomer)) == grpc.StatusCode.UNAUTHENTICATED
    try:
        stack.token_file.write_text(original + auth.entry_for(newcomer, "late", Role.READER))
        wait_until(
            lambda: _code(_call(stack.producer, "admin.ListQueues", request, newcomer)) == grpc.StatusCode.OK,
            "the new token to be accepted",
        )
    finally:
        stack.token_file.write_text(original)
    wait_until(
        lambda: _code(_call(stack.producer, "admin.ListQueues", request, newcomer)) == grpc.StatusCode.UNAUTHENTICATED,
        "the removed token to be refused",
    )
    # Who was refused is in the log (refused calls log at info; allowed ones at debug).
    refused = _call(stack.producer, "producer.Enqueue", _enqueue(), stack.tokens["reader"])
    assert _code(refused) == grpc.StatusCode.PERMISSION_DENIED
    wait_until(lambda: '"caller": "viewer"' in stack.producer_process.log_text(), "the refused caller in the log")


def test_the_client_and_the_cli_pass_the_token(stack: Stack) -> None:
    env = {
        **os.environ,
        "CONVEYOR_PRODUCER_ADDR": stack.producer,
        "CONVEYOR_RESULTS_ADDR": stack.results,
        "NO_COLOR": "1",
    }
    env.pop("CONVEYOR_TOKEN", None)
    args = [CONVEYOR, "enqueue", "demo.echo", "--queue", "orders", "--payload", "{}"]
    refused = subprocess.run(args, env=env, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1
    assert refused.stderr.startswith("error: UNAUTHENTICATED") and "Traceback" not in refused.stderr
    done = subprocess.run(
        args, env={**env, "CONVEYOR_TOKEN": stack.tokens["producer"]}, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    job_id = done.stdout.strip()
    shown = subprocess.run(
        [CONVEYOR, "--token", stack.tokens["reader"], "get", job_id, "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert shown.returncode == 0, shown.stderr
    assert job_id in shown.stdout


def test_a_wrong_token_file_stops_the_start_with_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "tokens.toml"
    bad.write_text("[[tokens]]\nname = 'x'\nrole = 'root'\n")
    with RedisServer() as redis_server:
        process = ServiceProcess("producer", {"REDIS_URL": redis_server.url, "CONVEYOR_AUTH_TOKENS_FILE": str(bad)})
        process.start(wait=False)
        assert process.wait(30) == 78
    assert "`role` must be one of producer, reader, admin" in process.log_text()
    assert "Traceback" not in process.log_text()


def test_the_token_new_command_prints_a_token_and_the_entry_that_admits_it() -> None:
    done = subprocess.run(
        [CONVEYOR, "token", "new", "--name", "ci", "--role", "producer", "--queue", "q"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    token = done.stdout.strip()
    assert token.startswith(auth.TOKEN_PREFIX) and token not in done.stderr
    (parsed,) = auth.parse_tokens(done.stderr)
    assert parsed == auth.Token("ci", Role.PRODUCER, auth.digest_of(token), frozenset({"q"}))


def test_watch_presents_the_token_through_the_client_and_the_cli(stack: Stack) -> None:
    """Streams carry the token too: the client's watch and `conveyor watch` are not refused."""

    async def first_event() -> tuple[str, str]:
        async with ConveyorClient(stack.producer, token=stack.tokens["producer"]) as client:
            job = await client.enqueue("orders", "demo.echo", {"n": 1})
            async for event in client.watch(job.job_id):
                return job.job_id, event.job_id
        return "", ""

    job_id, seen = asyncio.run(first_event())
    assert job_id and seen == job_id
    # No worker runs here, so the job stays queued: the CLI prints its QUEUED event and keeps watching.
    env = {**os.environ, "CONVEYOR_TOKEN": stack.tokens["reader"], "NO_COLOR": "1"}
    cli = subprocess.Popen(
        [CONVEYOR, "--producer", stack.producer, "--results", stack.results, "--json", "watch", job_id],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert cli.stdout is not None
        line = cli.stdout.readline()  # blocks until the first event, or EOF if the CLI was refused
    finally:
        cli.kill()
        _, errors = cli.communicate()
    assert job_id in line, errors


def test_whoami_names_the_caller_for_every_valid_token(stack: Stack) -> None:
    expected = {
        "admin": ("ops", admin_service_pb2.ROLE_ADMIN, []),
        "producer": ("shop", admin_service_pb2.ROLE_PRODUCER, []),
        "reader": ("viewer", admin_service_pb2.ROLE_READER, []),
        # A queue-limited token may ask too: WhoAmI names no queue and reads none.
        "billing": ("billing", admin_service_pb2.ROLE_PRODUCER, ["invoices"]),
    }
    for key, (name, role, queues) in expected.items():
        me = _call(stack.producer, "admin.WhoAmI", admin_service_pb2.WhoAmIRequest(), stack.tokens[key])
        assert isinstance(me, admin_service_pb2.WhoAmIResponse), me
        assert (me.name, me.role, list(me.queues), me.authentication) == (name, role, queues, True)
    for token in (None, auth.new_token()):
        outcome = _call(stack.producer, "admin.WhoAmI", admin_service_pb2.WhoAmIRequest(), token)
        assert _code(outcome) == grpc.StatusCode.UNAUTHENTICATED
    env = {**os.environ, "CONVEYOR_PRODUCER_ADDR": stack.producer, "CONVEYOR_TOKEN": stack.tokens["billing"]}
    shown = subprocess.run([CONVEYOR, "whoami"], env=env, capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.strip() == "billing: role producer, invoices"
    env["CONVEYOR_TOKEN"] = auth.new_token()
    refused = subprocess.run([CONVEYOR, "whoami"], env=env, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1
    assert "UNAUTHENTICATED" in refused.stderr and "Traceback" not in refused.stderr


def test_schedule_pause_and_resume_are_admin_only(stack: Stack) -> None:
    env = {**os.environ, "CONVEYOR_PRODUCER_ADDR": stack.producer, "CONVEYOR_TOKEN": stack.tokens["reader"]}
    refused = subprocess.run(
        [CONVEYOR, "schedules", "pause", "nightly"], env=env, capture_output=True, text=True, timeout=60
    )
    assert refused.returncode == 1
    assert "PERMISSION_DENIED" in refused.stderr and "PauseSchedule needs admin" in refused.stderr
    env["CONVEYOR_TOKEN"] = stack.tokens["admin"]
    create = [CONVEYOR, "schedules", "create", "nightly", "demo.echo", "--queue", "orders", "--cron", "0 3 * * *"]
    assert subprocess.run(create, env=env, capture_output=True, text=True, timeout=60).returncode == 0
    paused = subprocess.run(
        [CONVEYOR, "schedules", "pause", "nightly"], env=env, capture_output=True, text=True, timeout=60
    )
    assert paused.returncode == 0, paused.stderr
    assert paused.stdout.strip() == "nightly: paused"
    listed = subprocess.run([CONVEYOR, "schedules", "list"], env=env, capture_output=True, text=True, timeout=60)
    assert "paused" in listed.stdout
    resumed = subprocess.run(
        [CONVEYOR, "schedules", "resume", "nightly"], env=env, capture_output=True, text=True, timeout=60
    )
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.startswith("nightly: resumed, next fire ")
