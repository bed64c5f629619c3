"""Payload encryption at rest (ADR 0025), on a real stack of processes.

Jobs of an encrypted queue run through the real producer, worker and results service; then
every key of Redis (streams read raw with XRANGE, hashes, sorted sets, strings) and every row
of every PostgreSQL table (raw SELECT, bytea included) is searched for the payload's marker:
it must be nowhere, while the handler, GetJob (producer and results), Watch and the CLI see
the plaintext, and no process logs it. A queue left in clear is the control: its marker is
found by the same search, so the search does look where the data is.

Then rotation: a new active key before the old one, old and new jobs both readable,
`conveyor reencrypt` seals every stored row and event with the new key, and the old key can go.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
import redis

from conveyor.common import crypto
from conveyor.common.devstack.servers import PostgresServer, RedisServer, free_port
from conveyor.results.store import unpack_events
from conveyor.v1 import event_pb2, job_pb2, producer_service_pb2, producer_service_pb2_grpc
from tests.support.databases import fresh_database
from tests.support.processes import ServiceProcess
from tests.support.wait import wait_until

pytestmark = pytest.mark.e2e

CONVEYOR = str(Path(sys.executable).with_name("conveyor"))
SECRET, PLAIN = "secret", "plain"
MARKER = "TOP-SECRET-MARKER-7f3a"
CONTROL = "CLEAR-CONTROL-MARKER-51c9"


@dataclass
class Stack:
    redis_url: str
    database_url: str
    keyring_file: Path
    tmp: Path
    processes: dict[str, ServiceProcess] = field(default_factory=dict)
    logs: list[str] = field(default_factory=list)
    #: A job delayed by an hour: parked in Redis for the whole module.
    delayed: str = ""

    def env(self, keyring: bool = True) -> dict[str, str]:
        env = {
            "REDIS_URL": self.redis_url,
            "CONVEYOR_LOG_LEVEL": "debug",  # the most a process ever logs
            "CONVEYOR_ENCRYPTED_QUEUES": SECRET,
        }
        if keyring:
            env["CONVEYOR_KEYRING_FILE"] = str(self.keyring_file)
        else:
            env["CONVEYOR_ENCRYPTED_QUEUES"] = ""
        return env

    def start(
        self, name: str, service: str, keyring: bool = True, results: str = "results", **extra: str
    ) -> ServiceProcess:
        self.stop(name)
        env = {**self.env(keyring), **extra}
        if service == "results":
            env["DATABASE_URL"] = self.database_url
        elif service == "producer":
            env["CONVEYOR_RESULTS_ADDR"] = self.processes[results].addr
        elif service == "worker":
            env.update(CONVEYOR_QUEUES=f"{SECRET},{PLAIN}", CONVEYOR_WORKER_ID=name)
        process = ServiceProcess(service, env, name=name).start()
        self.processes[name] = process
        return process

    def stop(self, name: str) -> None:
        old = self.processes.pop(name, None)
        if old is not None:
            old.stop()
            self.logs.append(old.log_text())

    def start_all(self) -> None:
        self.start("results", "results")
        self.start("producer", "producer")
        self.start("worker", "worker")

    def cli(
        self,
        *args: str,
        results: str = "results",
        producer: str = "producer",
        keyring: bool = True,
        stdin: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        env = {
            **os.environ,
            "CONVEYOR_PRODUCER_ADDR": self.processes[producer].addr,
            "CONVEYOR_RESULTS_ADDR": self.processes[results].addr,
            "NO_COLOR": "1",
            "COLUMNS": "200",
        }
        env.pop("CONVEYOR_KEYRING", None)
        env.pop("CONVEYOR_KEYRING_FILE", None)
        if keyring:
            env["CONVEYOR_KEYRING_FILE"] = str(self.keyring_file)
        return subprocess.run([CONVEYOR, *args], env=env, input=stdin, capture_output=True, text=True, timeout=60)

    def json(self, *args: str, **kw: Any) -> Any:
        done = self.cli(*args, "--json", **kw)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    def enqueue(self, queue: str, type_: str, payload: dict[str, Any], *extra: str) -> str:
        """Through the CLI when there are CLI options, else one Enqueue call (a CLI process per job is slow)."""
        if not extra:
            with grpc.insecure_channel(self.processes["producer"].addr) as channel:
                stub = producer_service_pb2_grpc.ProducerServiceStub(channel)
                request = producer_service_pb2.EnqueueRequest(
                    queue=queue, type=type_, payload_json=json.dumps(payload).encode()
                )
                return str(stub.Enqueue(request, timeout=10).job_id)
        done = self.cli("enqueue", type_, "--queue", queue, "--payload", json.dumps(payload), *extra)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    def all_logs(self) -> str:
        return "\n".join([*self.logs, *(p.log_text() for p in self.processes.values())])


@pytest.fixture(scope="module")
def stack(pg_server: PostgresServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    database_url = fresh_database(pg_server, "crypt")
    tmp = tmp_path_factory.mktemp("crypt")
    keyring_file = tmp / "keyring"
    keyring_file.write_text(crypto.new_key_entry("old") + "\n")
    with RedisServer() as redis_server:
        s = Stack(redis_server.url, database_url, keyring_file, tmp)
        try:
            s.start_all()
            yield s
        finally:
            for process in s.processes.values():
                process.kill()


def redis_dump(url: str) -> list[tuple[bytes, bytes]]:
    """Every key of Redis with everything it holds, read raw (streams with XRANGE)."""
    client = redis.Redis.from_url(url)
    out: list[tuple[bytes, bytes]] = []
    for key in client.scan_iter(count=1000):
        kind = client.type(key)
        if kind == b"stream":
            values = [
                b"%s %s" % (entry_id, b" ".join(k + b"=" + v for k, v in f.items()))
                for entry_id, f in client.xrange(key)
            ]
        elif kind == b"hash":
            values = [k + b"=" + v for k, v in client.hgetall(key).items()]
        elif kind == b"zset":
            values = [m for m, _ in client.zrange(key, 0, -1, withscores=True)]
        elif kind == b"string":
            values = [client.get(key) or b""]
        elif kind == b"list":
            values = client.lrange(key, 0, -1)
        elif kind == b"set":
            values = list(client.smembers(key))
        else:
            values = [kind]
        out.extend((key, v) for v in values)
    client.close()
    return out


def pg_dump(url: str) -> list[tuple[str, bytes]]:
    """Every value of every row of every table in the public schema (bytea as raw bytes)."""
    out: list[tuple[str, bytes]] = []
    with psycopg.connect(url) as conn:
        tables = [r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")]
        for table in tables:
            for row in conn.execute(f'SELECT * FROM "{table}"'):
                for value in row:
                    if isinstance(value, bytes | bytearray | memoryview):
                        raw = bytes(value)
                    elif isinstance(value, str):
                        raw = value.encode()
                    else:
                        raw = json.dumps(value, default=str).encode()
                    out.append((table, raw))
    return out


def _projected(stack: Stack, job_ids: list[str]) -> bool:
    """All of ``job_ids`` SUCCEEDED as PostgreSQL has it (read directly: a CLI process per poll is slow)."""
    with psycopg.connect(stack.database_url) as conn:
        rows = conn.execute("SELECT count(*) FROM jobs WHERE job_id = ANY(%s) AND state = 5", (job_ids,)).fetchone()
    return rows is not None and rows[0] == len(job_ids)


def test_no_plaintext_at_rest_while_readers_with_the_key_see_it(stack: Stack) -> None:
    payload = {"card": MARKER, "amount": 42}
    # A schedule's job template is a payload at rest too (sealed for the schedule id).
    made = stack.cli(
        "schedules", "create", "nightly", "demo.echo", "-q", SECRET, "-p", json.dumps({"card": MARKER, "sched": 1}),
        "--every", "1s",
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    secret_ids = [stack.enqueue(SECRET, "demo.echo", {**payload, "n": i}) for i in range(4)]
    slow = stack.enqueue(SECRET, "demo.sleep", {"seconds": 0.2, "steps": 2, "note": MARKER})
    delayed = stack.delayed = stack.enqueue(SECRET, "demo.echo", payload, "--delay", "1h")  # parked in Redis
    clear = stack.enqueue(PLAIN, "demo.echo", {"card": CONTROL})
    # A dead letter keeps its job (payload sealed) in the dead-letter stream.
    dead = stack.enqueue(SECRET, "demo.fail", {"message": "declined", "permanent": True, "card": MARKER})
    done_ids = [*secret_ids, slow, clear]
    fired = wait_until(
        lambda: stack.json("schedules", "get", "nightly").get("lastJobId"), "the schedule to fire", within=30
    )
    done_ids.append(fired)
    wait_until(lambda: _projected(stack, done_ids), "the jobs to succeed and reach PostgreSQL", within=30)
    letters = wait_until(lambda: stack.json("dlq", "list", SECRET), "the dead letter", within=30)
    assert MARKER in json.dumps(letters) and dead in json.dumps(letters), letters
    assert stack.json("get", fired)["result"] == {"card": MARKER, "sched": 1}
    template = stack.json("schedules", "get", "nightly")["spec"]["template"]
    shown = template["payload"] if "payload" in template else json.loads(base64.b64decode(template["payloadJson"]))
    assert shown["card"] == MARKER

    # The handler got the plaintext: demo.echo returned it. GetJob (producer, then results) opens it.
    got = stack.json("get", secret_ids[0])
    assert got["payload"]["card"] == MARKER and got["result"]["card"] == MARKER
    history = stack.json("events", secret_ids[0])
    assert MARKER in json.dumps(history)
    listed = stack.json("jobs", "--queue", SECRET)
    assert sum(MARKER in json.dumps(j) for j in listed["jobs"]) >= len(secret_ids)
    watched = stack.cli("watch", secret_ids[1], "--json")
    assert watched.returncode == 0 and MARKER in watched.stdout, watched.stderr
    assert stack.json("get", delayed)["payload"]["card"] == MARKER
    # A reader without the key (the CLI here; the services hold it) is shown the sealed value.
    without = stack.cli("get", secret_ids[0], "--json", keyring=False)
    assert without.returncode == 0 and MARKER in without.stdout  # the producer opened it for the caller

    # At rest: Redis and PostgreSQL hold only ciphertext for the encrypted queue.
    in_redis = redis_dump(stack.redis_url)
    assert not [k for k, v in in_redis if MARKER.encode() in v], "plaintext payload/result in Redis"
    assert any(CONTROL.encode() in v for _, v in in_redis), "the search of Redis did not see the clear queue"
    assert any(b"$conveyor-sealed:v1:old:" in v for _, v in in_redis)
    in_pg = pg_dump(stack.database_url)
    assert not [t for t, v in in_pg if MARKER.encode() in v], "plaintext payload/result in PostgreSQL"
    assert any(CONTROL.encode() in v for _, v in in_pg), "the search of PostgreSQL did not see the clear queue"
    with psycopg.connect(stack.database_url) as conn:
        kinds = conn.execute(
            "SELECT jsonb_typeof(payload), jsonb_typeof(result), payload #>> '{}' FROM jobs WHERE job_id = %s",
            (secret_ids[0],),
        ).fetchone()
    assert kinds is not None and kinds[:2] == ("string", "string")
    assert kinds[2].startswith("$conveyor-sealed:v1:old:")

    assert stack.cli("schedules", "delete", "nightly").returncode == 0

    # Payload search refuses the encrypted queue, and says why.
    refused = stack.cli("jobs", "--queue", SECRET, "--where", f"card={MARKER}")
    assert refused.returncode == 1
    assert "FAILED_PRECONDITION" in refused.stderr and "encrypted at rest" in refused.stderr
    assert stack.cli("jobs", "--queue", PLAIN, "--where", f"card={CONTROL}", "--json").returncode == 0

    # No process logged a payload or a result (debug level).
    logs = stack.all_logs()
    assert secret_ids[0] in logs or "job" in logs
    assert MARKER not in logs


def test_services_without_the_key_answer_sealed_and_the_cli_and_dashboard_with_it_open_it(stack: Stack) -> None:
    job_id = stack.enqueue(SECRET, "demo.echo", {"card": MARKER, "keyless": True})
    wait_until(lambda: _projected(stack, [job_id]), "the job to reach PostgreSQL", within=30)
    stack.start("keyless-results", "results", keyring=False)
    stack.start("keyless-producer", "producer", keyring=False, results="keyless-results")
    keyless = {"results": "keyless-results", "producer": "keyless-producer"}
    dashboard: subprocess.Popen[bytes] | None = None
    try:
        sealed = stack.json("events", job_id, keyring=False, **keyless)
        assert MARKER not in json.dumps(sealed)
        final = sealed[-1]
        assert final["job"]["payload"]["$sealed"].startswith("$conveyor-sealed:v1:")
        assert final["result"].startswith("$conveyor-sealed:v1:")
        assert MARKER not in stack.cli("get", job_id, "--json", keyring=False, **keyless).stdout
        opened = stack.json("events", job_id, **keyless)  # the CLI holds the keyring
        assert opened[-1]["job"]["payload"]["card"] == MARKER
        assert opened[-1]["result"]["card"] == MARKER
        assert stack.json("get", job_id, **keyless)["payload"]["card"] == MARKER

        # The dashboard, holding the key, opens what the keyless services answer sealed.
        port = free_port()
        log = stack.tmp / "dashboard.log"
        with log.open("wb") as out:
            dashboard = subprocess.Popen(
                [sys.executable, "-m", "conveyor.dashboard"],
                env={
                    **os.environ,
                    **stack.env(),
                    "CONVEYOR_PRODUCER_ADDR": stack.processes["keyless-producer"].addr,
                    "CONVEYOR_RESULTS_ADDR": stack.processes["keyless-results"].addr,
                    "CONVEYOR_DASHBOARD_ADDR": f"127.0.0.1:{port}",
                    "CONVEYOR_LOG_FORMAT": "json",
                },
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        base = f"http://127.0.0.1:{port}"
        wait_until(lambda: _http(f"{base}/healthz") is not None, "the dashboard to answer", within=30)
        api = _http(f"{base}/api/payload/{job_id}")
        assert api is not None and json.loads(api)["payload"]["card"] == MARKER
        page = _http(f"{base}/jobs/{job_id}")
        assert page is not None and MARKER in page
    finally:
        if dashboard is not None:
            dashboard.terminate()
            dashboard.wait(15)
            stack.logs.append((stack.tmp / "dashboard.log").read_text(errors="replace"))
        stack.stop("keyless-producer")
        stack.stop("keyless-results")


def _http(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.read().decode()
    except OSError:
        return None


def _key_ids_at_rest(stack: Stack, queue: str) -> set[str]:
    found: set[str] = set()
    with psycopg.connect(stack.database_url) as conn:
        for payload, result in conn.execute(
            "SELECT payload #>> '{}', result #>> '{}' FROM jobs WHERE queue = %s AND state = 5", (queue,)
        ):
            found |= {crypto.key_id_of(payload), crypto.key_id_of(result)}
        for (packed,) in conn.execute("SELECT events FROM job_events WHERE job_id LIKE %s", (f"{queue}/%",)):
            for _, _, data in unpack_events(bytes(packed)):
                event = event_pb2.JobEvent.FromString(data)
                if event.result_json:
                    found.add(crypto.key_id_of(event.result_json))
                if event.job.payload_json:
                    found.add(crypto.key_id_of(event.job.payload_json))
    return found


def test_rotation_old_and_new_jobs_readable_reencrypt_then_drop_the_old_key(stack: Stack) -> None:
    old_job = stack.enqueue(SECRET, "demo.echo", {"card": MARKER, "era": "old"})
    wait_until(lambda: _projected(stack, [old_job]), "the old-key job in PostgreSQL", within=30)
    old_entry = stack.keyring_file.read_text().strip()
    stack.keyring_file.write_text(f"{crypto.new_key_entry('new')}\n{old_entry}\n")
    stack.start_all()  # restarted with the new active key first, the old one after it
    new_job = stack.enqueue(SECRET, "demo.echo", {"card": MARKER, "era": "new"})
    wait_until(lambda: _projected(stack, [new_job]), "the new-key job in PostgreSQL", within=30)
    assert _key_ids_at_rest(stack, SECRET) == {"old", "new"}
    for job_id, era in ((old_job, "old"), (new_job, "new")):
        job = stack.json("get", job_id)
        assert job["payload"] == {"card": MARKER, "era": era} and job["result"]["era"] == era

    done = stack.cli("reencrypt", SECRET, "--batch", "3", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["key_id"] == "new" and report["jobs_reencrypted"] >= 1 and report["unreadable"] == []
    assert _key_ids_at_rest(stack, SECRET) == {"new"}
    # Redis: the parked job was sealed again in place; what streams hold under "old" is counted.
    assert report["redis"]["key_id"] == "new" and report["redis"]["parked_reencrypted"] >= 1
    parked = redis.Redis.from_url(stack.redis_url).hgetall(f"conveyor:{{{SECRET}}}:parked")
    assert parked and {crypto.key_id_of(job_pb2.Job.FromString(v).payload_json) for v in parked.values()} == {"new"}
    assert {(r["place"], r["key_id"]) for r in report["redis"]["remaining"]} >= {("events", "old")}
    again = stack.json("reencrypt", SECRET)
    assert again["jobs_reencrypted"] == 0 and again["events_reencrypted"] == 0  # nothing left to do

    # The old key can go: the results service and the CLI keep reading every job from PostgreSQL,
    # the producer the parked job.
    stack.keyring_file.write_text(stack.keyring_file.read_text().splitlines()[0] + "\n")
    stack.start("results", "results")
    stack.start("producer", "producer")
    assert stack.json("get", stack.delayed)["payload"]["card"] == MARKER
    for job_id, era in ((old_job, "old"), (new_job, "new")):
        history = stack.json("events", job_id)
        final = history[-1]
        assert final["job"]["payload"] == {"card": MARKER, "era": era}
        assert final["result"]["era"] == era
    assert MARKER not in stack.all_logs()
