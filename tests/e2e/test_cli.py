"""`conveyor`, the command line, run as a real process against a real stack.

Each test runs the installed console script (what `make venv` puts in .venv/bin) with the
stack's addresses in the environment, and checks what it prints and its exit code. The live
progress bar is checked in a real terminal: tmux runs the command and its screen is read back.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from conveyor.common.devstack.servers import PostgresServer, RedisServer
from tests.support.databases import fresh_database
from tests.support.processes import ServiceProcess
from tests.support.wait import wait_until

pytestmark = pytest.mark.e2e

CONVEYOR = str(Path(sys.executable).with_name("conveyor"))
QUEUE = "cli"


@dataclass
class Cli:
    env: dict[str, str]

    def run(self, *args: str, stdin: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [CONVEYOR, *args], env=self.env, input=stdin, capture_output=True, text=True, timeout=timeout
        )

    def json(self, *args: str) -> object:
        done = self.run(*args, "--json")
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    def enqueue(self, type_: str, payload: dict[str, object], *extra: str) -> str:
        done = self.run("enqueue", type_, "--queue", QUEUE, "--payload", json.dumps(payload), *extra)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    def state(self, job_id: str) -> str:
        found = self.json("get", job_id)
        assert isinstance(found, dict)
        return str(found["state"])


@pytest.fixture(scope="module")
def cli(pg_server: PostgresServer) -> Iterator[Cli]:
    database_url = fresh_database(pg_server, "cli")
    with RedisServer() as redis_server:
        common = {"REDIS_URL": redis_server.url}
        processes: list[ServiceProcess] = []
        try:
            results = ServiceProcess("results", {**common, "DATABASE_URL": database_url}).start()
            processes.append(results)
            producer = ServiceProcess("producer", {**common, "CONVEYOR_RESULTS_ADDR": results.addr}).start()
            processes.append(producer)
            worker_env = {**common, "CONVEYOR_QUEUES": QUEUE, "CONVEYOR_WORKER_ID": "cli-worker"}
            processes.append(ServiceProcess("worker", worker_env).start())
            env = {
                **os.environ,
                "CONVEYOR_PRODUCER_ADDR": producer.addr,
                "CONVEYOR_RESULTS_ADDR": results.addr,
                "NO_COLOR": "1",
                "COLUMNS": "200",
            }
            yield Cli(env)
        finally:
            for p in reversed(processes):
                p.kill()


def test_enqueue_prints_the_id_and_watch_exits_with_the_outcome(cli: Cli) -> None:
    job_id = cli.enqueue("demo.sleep", {"seconds": 0.4, "steps": 4})
    assert job_id.startswith(f"{QUEUE}/")
    done = cli.run("watch", job_id)
    assert done.returncode == 0, done.stderr
    assert "succeeded" in done.stdout
    assert '"slept":0.4' in done.stdout

    failed = cli.enqueue("demo.fail", {"message": "boom", "permanent": True})
    done = cli.run("watch", failed)
    assert done.returncode == 3, (done.stdout, done.stderr)
    assert "boom" in done.stdout


def test_enqueue_watch_streams_events_as_json_lines(cli: Cli) -> None:
    done = cli.run("enqueue", "demo.sleep", "-q", QUEUE, "-p", '{"seconds": 0.3, "steps": 3}', "--watch", "--json")
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert lines[0]["created"] is True
    types = [line["type"] for line in lines[1:]]
    assert types[0] == "EVENT_TYPE_QUEUED"
    assert types.count("EVENT_TYPE_PROGRESS") == 3
    assert types[-1] == "EVENT_TYPE_SUCCEEDED"


def test_payload_from_a_file_and_from_stdin_and_the_enqueue_options(cli: Cli, tmp_path: Path) -> None:
    path = tmp_path / "payload.json"
    path.write_text('{"from": "file"}')
    from_file = cli.enqueue("demo.echo", {}, "--payload", f"@{path}")
    assert cli.run("watch", from_file).returncode == 0
    assert cli.json("get", from_file)["payload"] == {"from": "file"}  # type: ignore[index]

    done = cli.run(
        "enqueue", "demo.echo", "-q", QUEUE, "--payload", "-", "--priority", "7", "--label", "team=billing",
        "--rate-key", "acme", "--max-attempts", "2", "--timeout", "30s", "--delay", "1h",
        "--idempotency-key", "cli-test-key", stdin='{"from": "stdin"}',
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    job_id = done.stdout.strip()
    job = cli.json("get", job_id)
    assert isinstance(job, dict)
    assert job["state"] == "JOB_STATE_DELAYED"
    assert job["priority"] == 7
    assert job["labels"] == {"team": "billing"}
    assert job["rateKey"] == "acme"
    assert job["retry"]["maxAttempts"] == 2
    assert job["timeout"] == "30s"
    assert job["payload"] == {"from": "stdin"}
    again = cli.run("enqueue", "demo.echo", "-q", QUEUE, "--idempotency-key", "cli-test-key")
    assert again.stdout.startswith(job_id) and "already enqueued" in again.stdout

    assert cli.run("cancel", job_id).returncode == 0
    assert cli.state(job_id) == "JOB_STATE_CANCELLED"
    assert cli.run("watch", job_id).returncode == 5


def test_errors_are_one_line_with_the_code_and_the_field(cli: Cli) -> None:
    done = cli.run("get", "not-a-job-id")
    assert done.returncode == 1
    assert done.stderr.strip() == "error: INVALID_ARGUMENT: job_id: must be a job id like '<queue>/<ULID>'"
    done = cli.run("get", f"{QUEUE}/01M932XNVJF2VB1EVZEY231A12")
    assert done.returncode == 1
    assert done.stderr.startswith("error: NOT_FOUND: ") and len(done.stderr.strip().splitlines()) == 1
    done = cli.run("enqueue", "demo.echo", "-q", "bad queue!")
    assert done.returncode == 1 and done.stderr.startswith("error: INVALID_ARGUMENT: queue: ")
    for path_like in (".", ".."):  # job ids would look like paths: "../01M..."
        done = cli.run("enqueue", "demo.echo", "-q", path_like)
        assert done.returncode == 1 and done.stderr.startswith("error: INVALID_ARGUMENT: queue: "), done.stderr
        assert "'..'" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    done = cli.run("enqueue", "demo.echo", "--payload", "{nope")
    assert done.returncode == 2 and "not JSON" in done.stderr and "Traceback" not in done.stderr
    done = cli.run("--producer", "127.0.0.1:1", "--timeout", "1", "queues")
    assert done.returncode == 1 and done.stderr.startswith("error: UNAVAILABLE: ")
    assert "Traceback" not in done.stderr


def test_history_lists_and_stats(cli: Cli) -> None:
    job_id = cli.enqueue("demo.sleep", {"seconds": 0.2, "steps": 2})
    assert cli.run("watch", job_id).returncode == 0

    def recorded() -> bool:
        found = cli.json("events", job_id)
        return isinstance(found, list) and found[-1]["type"] == "EVENT_TYPE_SUCCEEDED"

    wait_until(recorded, "the job's history in PostgreSQL")
    table = cli.run("events", job_id)
    assert table.returncode == 0
    for word in ("queued", "active", "progress", "succeeded", "cli-worker"):
        assert word in table.stdout
    page = cli.json("jobs", "--queue", QUEUE, "--state", "succeeded", "--limit", "100")
    assert isinstance(page, dict)
    assert job_id in [j["id"] for j in page["jobs"]]
    assert all(j["state"] == "JOB_STATE_SUCCEEDED" for j in page["jobs"])
    assert cli.run("jobs", "--state", "nonsense").returncode == 2

    stats = cli.json("stats", QUEUE)
    assert isinstance(stats, dict) and stats["stats"]["queue"] == QUEUE
    queues = cli.json("queues")
    assert isinstance(queues, list) and QUEUE in [q["queue"] for q in queues]
    workers = cli.json("workers", "--queue", QUEUE)
    assert isinstance(workers, list) and [w["workerId"] for w in workers] == ["cli-worker"]
    assert "cli-worker" in cli.run("workers").stdout


def test_jobs_where_on_payload_fields_and_labels(cli: Cli) -> None:
    # Only this test's jobs carry it. Not bare hex: "where" reads "8e870111" as a number (an
    # infinite one, refused) and "12345678" as one too, which no string payload value equals.
    run = f"run-{uuid.uuid4().hex[:8]}"
    gold = cli.enqueue(
        "demo.echo", {"run": run, "customer": {"id": 42, "tier": "gold"}, "total": 120}, "--label", "team=billing"
    )
    silver = cli.enqueue(
        "demo.echo", {"run": run, "customer": {"id": 7, "tier": "silver"}, "total": 30}, "--label", "team=ops"
    )
    for job_id in (gold, silver):
        assert cli.run("watch", job_id).returncode == 0

    def ids(*args: str) -> set[str]:
        page = cli.json("jobs", "--queue", QUEUE, "--where", f"run={run}", *args)
        assert isinstance(page, dict)
        return {j["id"] for j in page.get("jobs", [])}

    # The payload reaches PostgreSQL with the outcome: wait until both are recorded.
    wait_until(lambda: ids() == {gold, silver}, "both jobs recorded with their payloads", within=60)
    assert ids("--where", "customer.id=42") == {gold}
    assert ids("-w", "customer.tier!=gold") == {silver}
    assert ids("--where", "total>=100") == {gold}
    assert ids("--where", "total<100", "--where", "customer.tier=silver") == {silver}
    assert ids("--where", "?customer.tier") == {gold, silver}
    assert ids("--where", "?customer.vip") == set()
    assert ids("--where", 'customer@>{"tier": "gold"}') == {gold}
    assert ids("--where", 'customer.id="42"') == set()  # a string, not the number 42
    assert ids("--label", "team=ops") == {silver}
    assert ids("--label", "team=ops", "--where", "customer.id=42") == set()
    table = cli.run("jobs", "--queue", QUEUE, "--where", f"run={run}", "--where", "customer.id=42")
    assert table.returncode == 0 and gold in table.stdout and silver not in table.stdout

    # Errors: one line, the gRPC code and the field (the CLI's own flag, or the request's field).
    for args, start in [
        (("--where", "nonsense"), "error: INVALID_ARGUMENT: --where: 'nonsense' is not a condition"),
        (("--where", "a..b=1"), "error: INVALID_ARGUMENT: where[0].path: "),
        (("--where", "run=x", "--where", "total<true"), "error: INVALID_ARGUMENT: where[1].value: "),
        (("--label", "team"), "error: INVALID_ARGUMENT: --label: 'team' is not KEY=VALUE"),
    ]:
        done = cli.run("jobs", *args)
        assert done.returncode == 1, done.stderr
        assert done.stderr.startswith(start), done.stderr
        assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr


def test_pause_resume_and_limits(cli: Cli) -> None:
    assert cli.run("pause", QUEUE).stdout.strip() == f"{QUEUE}: paused"
    job_id = cli.enqueue("demo.echo", {"n": 1})
    stats = cli.json("stats", QUEUE)
    assert isinstance(stats, dict) and stats["stats"]["paused"] is True
    assert cli.state(job_id) == "JOB_STATE_QUEUED"
    assert cli.run("resume", QUEUE).returncode == 0
    assert cli.run("watch", job_id).returncode == 0

    limits = cli.json("limits", "set-rate", QUEUE, "50", "1s")
    assert isinstance(limits, dict) and limits["rate"] == {"limit": 50, "period": "1s"}
    limits = cli.json("limits", "set-concurrency", QUEUE, "3", "--key", "acme")
    assert isinstance(limits, dict) and limits["keys"] == [{"key": "acme", "concurrency": 3}]
    assert "50/1s" in cli.run("limits", "show", QUEUE).stdout
    assert cli.run("limits", "clear-rate", QUEUE).stdout.strip() == "cleared"
    assert cli.run("limits", "clear-concurrency", QUEUE, "--key", "acme").stdout.strip() == "cleared"
    assert cli.run("limits", "clear-rate", QUEUE).stdout.strip() == "there was none"


def test_backoff_and_clear_backoff(cli: Cli) -> None:
    done = cli.run("limits", "backoff", QUEUE, "10m")
    assert done.returncode == 0 and done.stdout.startswith(f"{QUEUE}: backed off until "), done.stderr
    limits = cli.json("limits", "show", QUEUE)
    assert isinstance(limits, dict) and "backedOffUntil" in limits
    assert "backed off until" in cli.run("limits", "show", QUEUE).stdout
    job_id = cli.enqueue("demo.echo", {"n": 1})
    assert cli.state(job_id) == "JOB_STATE_QUEUED"
    assert cli.run("limits", "clear-backoff", QUEUE).stdout.strip() == "cleared"
    # Ten minutes of back-off left: the job finishing within watch's 60 s is the clear's doing.
    assert cli.run("watch", job_id).returncode == 0
    assert cli.run("limits", "clear-backoff", QUEUE).stdout.strip() == "there was none"
    limits = cli.json("limits", "clear-backoff", QUEUE)
    assert isinstance(limits, dict) and "backedOffUntil" not in limits
    assert cli.run("limits", "backoff", QUEUE, "10m", "--key", "acme").returncode == 0
    assert cli.run("limits", "clear-backoff", QUEUE, "--key", "acme").stdout.strip() == "cleared"
    done = cli.run("limits", "clear-backoff", QUEUE, "--key", "has space")
    assert done.returncode == 1 and done.stderr.startswith("error: INVALID_ARGUMENT: key: "), done.stderr


def test_dead_letters_ask_before_changing_many(cli: Cli) -> None:
    dead = [cli.enqueue("demo.fail", {"permanent": True}) for _ in range(3)]
    for job_id in dead:
        assert cli.run("watch", job_id).returncode == 3
    listed = cli.json("dlq", "list", QUEUE)
    assert isinstance(listed, dict)
    assert set(dead) <= {d["job"]["id"] for d in listed["deadLetters"]}
    assert dead[0] in cli.run("dlq", "list", QUEUE).stdout

    # More than one job without a terminal and without --yes: refused, nothing changed.
    refused = cli.run("dlq", "retry", QUEUE, "--all")
    assert refused.returncode == 2 and "--yes" in refused.stderr
    assert all(cli.state(j) == "JOB_STATE_FAILED" for j in dead)

    one = cli.run("dlq", "retry", QUEUE, dead[0])
    assert one.returncode == 0 and dead[0] in one.stdout
    assert cli.run("watch", dead[0]).returncode == 3  # it fails again, as a new attempt
    purged = cli.json("dlq", "purge", QUEUE, "--all", "--yes")
    assert isinstance(purged, dict) and purged["purged"] >= 3
    assert cli.json("dlq", "list", QUEUE) == {}


def test_schedules(cli: Cli) -> None:
    created = cli.run("schedules", "create", "cli-nightly", "demo.echo", "-q", QUEUE, "--cron", "0 3 * * *",
                      "--tz", "Europe/Berlin", "--payload", '{"report": "nightly"}')  # fmt: skip
    assert created.returncode == 0 and "created" in created.stdout, created.stderr
    found = cli.json("schedules", "get", "cli-nightly")
    assert isinstance(found, dict) and found["spec"]["cron"] == "0 3 * * *"
    assert "cli-nightly" in cli.run("schedules", "list").stdout
    ran = cli.run("schedules", "run-now", "cli-nightly")
    assert ran.returncode == 0
    assert cli.run("watch", ran.stdout.strip()).returncode == 0
    assert cli.run("schedules", "create", "x", "demo.echo").returncode == 2  # neither --cron nor --every
    assert cli.run("schedules", "delete", "cli-nightly").returncode == 0
    assert cli.run("schedules", "get", "cli-nightly").stderr.startswith("error: NOT_FOUND")


def test_the_live_progress_bar_in_a_terminal_and_ctrl_c_stops_watching_not_the_job(cli: Cli) -> None:
    job_id = cli.enqueue("demo.sleep", {"seconds": 6, "steps": 6})
    session = f"cli-{uuid.uuid4().hex[:6]}"
    env_args = [arg for k in ("CONVEYOR_PRODUCER_ADDR", "CONVEYOR_RESULTS_ADDR") for arg in ("-e", f"{k}={cli.env[k]}")]
    command = f"{CONVEYOR} watch {job_id}; echo EXIT=$?; sleep 600"
    subprocess.run(
        ["tmux", "new-session", "-d", "-s", session, "-x", "160", "-y", "10", *env_args, command], check=True
    )
    try:

        def screen() -> str:
            return subprocess.run(["tmux", "capture-pane", "-p", "-t", session], capture_output=True, text=True).stdout

        def mid_bar() -> bool:
            text = screen()
            return "running" in text and "step" in text and any(f"{p}%" in text for p in (17, 33, 50, 67))

        wait_until(mid_bar, "the bar to show the handler's progress live", within=20)
        assert "━" in screen()
        subprocess.run(["tmux", "send-keys", "-t", session, "C-c"], check=True)
        wait_until(lambda: "EXIT=130" in screen(), "Ctrl-C to stop watching with 130", within=10)
        assert "Traceback" not in screen()
        wait_until(lambda: cli.state(job_id) == "JOB_STATE_SUCCEEDED", "the job to finish anyway", within=20)
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], check=False)
