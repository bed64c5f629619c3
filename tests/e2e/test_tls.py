"""TLS everywhere, end to end: producer, worker and results as real processes.

Every gRPC port speaks TLS and requires client certificates (mTLS) and tokens; the producer dials
the results service with its own client certificate and token; Redis is reached over TLS
(``rediss://`` with an ACL user, a password and a client certificate) and PostgreSQL with
``sslmode=verify-full``. Readiness is read from each service's plaintext health port
(CONVEYOR_HEALTH_ADDR). A job goes through the Python client (enqueue, Watch, result, history)
and through the `conveyor` command with --cacert/--cert/--key.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conveyor.common import auth
from conveyor.common.auth import Role
from conveyor.common.client import ConveyorClient
from conveyor.common.devstack.servers import free_port
from conveyor.common.errors import NotFound, Unauthenticated, Unavailable
from conveyor.common.ids import make_job_id, new_ulid
from conveyor.common.tls import ClientTLS
from conveyor.v1 import event_pb2, job_pb2
from tests.support.processes import ServiceProcess
from tests.support.tls_servers import TlsFiles, TlsRedis, tls_postgres
from tests.support.wait import wait_for, wait_until

pytestmark = pytest.mark.e2e

CONVEYOR = str(Path(sys.executable).with_name("conveyor"))
GRPCURL = str(Path(sys.executable).with_name("grpcurl"))
QUEUE = "tls"


@dataclass
class Stack:
    producer: ServiceProcess
    results: ServiceProcess
    worker: ServiceProcess
    files: TlsFiles
    tokens: dict[str, str]

    def client_tls(self) -> ClientTLS:
        f = self.files
        return ClientTLS.create(ca_file=str(f.ca_file), cert_file=str(f.client_cert), key_file=str(f.client_key))

    def cli(self, *args: str, tls: bool = True, token: str = "") -> subprocess.CompletedProcess[str]:
        f = self.files
        flags = ["--cacert", str(f.ca_file), "--cert", str(f.client_cert), "--key", str(f.client_key)] if tls else []
        env = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
        return subprocess.run(
            [
                CONVEYOR,
                "--producer",
                self.producer.addr,
                "--results",
                self.results.addr,
                "--token",
                token or self.tokens["admin"],
                *flags,
                *args,
            ],
            env={**env, "NO_COLOR": "1", "COLUMNS": "200"},
            capture_output=True,
            text=True,
            timeout=60,
        )


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tokens = {name: auth.new_token() for name in ("admin", "producer", "service")}
    token_file = tmp_path_factory.mktemp("auth") / "tokens.toml"
    token_file.write_text(
        auth.entry_for(tokens["admin"], "ops", Role.ADMIN)
        + auth.entry_for(tokens["producer"], "shop", Role.PRODUCER)
        + auth.entry_for(tokens["service"], "producer-service", Role.READER)
    )
    with tls_postgres() as (pg, pg_files), TlsRedis(TlsFiles.make()) as redis:
        # One CA for the gRPC certificates (the services' and the clients').
        files = TlsFiles.make()
        database_url = f"{pg.url}?sslmode=verify-full&sslrootcert={pg_files.ca_file}"
        serve_tls = {
            "CONVEYOR_TLS_CERT_FILE": str(files.server_cert),
            "CONVEYOR_TLS_KEY_FILE": str(files.server_key),
            "CONVEYOR_TLS_CLIENT_CA_FILE": str(files.ca_file),
        }
        common = {"REDIS_URL": redis.url(), "CONVEYOR_AUTH_TOKENS_FILE": str(token_file), **serve_tls}
        processes: list[ServiceProcess] = []
        try:
            results = ServiceProcess("results", {**common, "DATABASE_URL": database_url}, health_port=True).start()
            processes.append(results)
            producer_env = {
                **common,
                "CONVEYOR_RESULTS_ADDR": results.addr,
                "CONVEYOR_TOKEN": tokens["service"],
                "CONVEYOR_TLS_CA_FILE": str(files.ca_file),
                "CONVEYOR_TLS_CLIENT_CERT_FILE": str(files.client_cert),
                "CONVEYOR_TLS_CLIENT_KEY_FILE": str(files.client_key),
            }
            producer = ServiceProcess("producer", producer_env, health_port=True).start()
            processes.append(producer)
            worker_env = {**common, "CONVEYOR_QUEUES": QUEUE, "CONVEYOR_POLL_INTERVAL_SECONDS": "0.5"}
            worker = ServiceProcess("worker", worker_env, health_port=True).start()
            processes.append(worker)
            yield Stack(producer, results, worker, files, tokens)
        finally:
            for p in reversed(processes):
                p.kill()


async def test_a_job_runs_through_tls_mtls_and_tokens(stack: Stack) -> None:
    async with ConveyorClient(
        stack.producer.addr, stack.results.addr, token=stack.tokens["admin"], tls=stack.client_tls()
    ) as client:
        job_id = (await client.enqueue(QUEUE, "demo.echo", {"secret": "over tls"})).job_id
        events = [event.type async for event in client.watch(job_id)]
        assert events[-1] == event_pb2.EVENT_TYPE_SUCCEEDED, events
        job = await client.get_job(job_id)
        assert job.state == job_pb2.JOB_STATE_SUCCEEDED
        assert job.result.struct_value["secret"] == "over tls"

        # The results service projected it (from Redis over TLS into PostgreSQL over TLS).
        async def projected() -> bool:
            page = await client.list_jobs(queue=QUEUE)
            return any(j.id == job_id and j.state == job_pb2.JOB_STATE_SUCCEEDED for j in page.jobs)

        await wait_for(projected, "the job in the results service", within=30)
        # A job Redis does not know: the producer asks the results service, over its own mTLS channel
        # with its own token. NOT_FOUND (not UNAVAILABLE) says that call went through.
        with pytest.raises(NotFound):
            await client.get_job(_unknown_id())


async def test_the_token_is_still_required_over_mtls(stack: Stack) -> None:
    async with ConveyorClient(stack.producer.addr, token="", tls=stack.client_tls(), retries=0) as client:
        with pytest.raises(Unauthenticated):
            await client.get_job(_unknown_id())


async def test_clients_without_tls_or_without_a_certificate_are_refused(stack: Stack) -> None:
    async with ConveyorClient(stack.producer.addr, token=stack.tokens["admin"], tls=ClientTLS(), retries=0) as client:
        with pytest.raises(Unavailable):
            await client.get_job(_unknown_id())
    no_cert = ClientTLS.create(ca_file=str(stack.files.ca_file))
    async with ConveyorClient(stack.producer.addr, token=stack.tokens["admin"], tls=no_cert, retries=0) as client:
        with pytest.raises(Unavailable):
            await client.get_job(_unknown_id())


def test_each_service_answers_probes_on_its_plaintext_health_port(stack: Stack) -> None:
    for process in (stack.producer, stack.results, stack.worker):
        with grpc.insecure_channel(process.health_addr) as channel:
            check = health_pb2_grpc.HealthStub(channel).Check  # type: ignore[attr-defined]
            assert check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
        assert '"tls": "mtls"' in process.log_text(), process.log_tail()


def test_the_cli_with_cacert_cert_and_key(stack: Stack) -> None:
    done = stack.cli("enqueue", "demo.echo", "--queue", QUEUE, "--payload", '{"n": 1}', "--watch")
    assert done.returncode == 0, done.stderr
    got = stack.cli("jobs", "--queue", QUEUE, "--json")
    assert got.returncode == 0, got.stderr
    # Without the client certificate the server refuses the connection: one line, exit 1.
    refused = stack.cli("get", _unknown_id(), tls=False)
    assert refused.returncode == 1 and refused.stderr.startswith("error: UNAVAILABLE"), refused.stderr
    # A bad file is a usage error naming the flag.
    bad = stack.cli("--cacert", "/nonexistent/ca.pem", "get", _unknown_id(), tls=False)
    assert bad.returncode == 2 and "--cacert=/nonexistent/ca.pem: cannot read the CA certificate" in bad.stderr


def test_grpcurl_with_cacert_cert_and_key(stack: Stack) -> None:
    f = stack.files
    done = subprocess.run(
        [
            GRPCURL,
            "-cacert", str(f.ca_file),
            "-cert", str(f.client_cert),
            "-key", str(f.client_key),
            "-H", f"authorization: Bearer {stack.tokens['producer']}",
            "-d", json.dumps({"queue": QUEUE, "type": "demo.echo", "payload": {"via": "grpcurl"}}),
            stack.producer.addr,
            "conveyor.v1.ProducerService/Enqueue",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["jobId"].startswith(QUEUE)


def _unknown_id() -> str:
    return make_job_id(QUEUE, new_ulid())


def test_the_dashboard_reads_the_apis_over_mtls(stack: Stack) -> None:
    f = stack.files
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")},
        "CONVEYOR_DASHBOARD_ADDR": f"127.0.0.1:{port}",
        "CONVEYOR_PRODUCER_ADDR": stack.producer.addr,
        "CONVEYOR_RESULTS_ADDR": stack.results.addr,
        "CONVEYOR_TOKEN": stack.tokens["admin"],
        "CONVEYOR_TLS_CA_FILE": str(f.ca_file),
        "CONVEYOR_TLS_CLIENT_CERT_FILE": str(f.client_cert),
        "CONVEYOR_TLS_CLIENT_KEY_FILE": str(f.client_key),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "conveyor.dashboard"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:

        def page() -> str:
            assert proc.poll() is None, f"the dashboard exited with {proc.returncode}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/jobs?queue={QUEUE}", timeout=10) as response:
                    return str(response.read().decode())
            except (urllib.error.URLError, ConnectionError):
                return ""

        body = wait_until(page, "the dashboard's jobs page", within=30)
        assert f"{QUEUE}/" in body  # job ids of the queue, read from the results service over mTLS
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    # A CA file that cannot be read: one line, exit 78, as the services.
    done = subprocess.run(
        [sys.executable, "-m", "conveyor.dashboard"],
        env={**env, "CONVEYOR_TLS_CA_FILE": "/nonexistent/ca.pem"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 78, done.stderr
    assert done.stderr.strip() == (
        "error: CONVEYOR_TLS_CA_FILE=/nonexistent/ca.pem: cannot read the CA certificate (No such file or directory)"
    )
