"""The README's commands, run as pasted against the dev stack `make up` starts.

What runs: every ```sh block of README.md, in order, as one reader would paste them into one
terminal at the repository root (shell variables and functions one block defines, such as
`bufc`, `$JOB` or the `PATH` export, are there in the next), each under `set -e -o pipefail`
so that any command that fails fails the test, with the block's text and its output. Every
```python block must parse; those that are whole scripts (with a top-level call such as
`asyncio.run(main())`) run with the project's Python. Handler fragments (a `@handlers.register`
without the rest of a program) are only parsed.

What does not run: a block right after an HTML comment `<!-- not-run: reason -->` (`make up`
itself, streams that never end). Keep that list short: each one is a block no test checks.

The one substitution: the stack runs on free ports, so that the test never depends on the
README's fixed ports being free: 56379, 55432, 50051, 50052, 50061, 50062, their metrics ports
51051, 51052, 51061, 51062, the dashboard's 8080, and 8081 and 50071/51071 for the read-only
dashboard and the handler example's worker that the README starts itself, and 50081/50082 for the TLS section's
producer and its plaintext health port. Each of those numbers,
where it follows a ':' in a block ("127.0.0.1:50051", "localhost:50051/"), is replaced by the
stack's port. The other: `.run/admin.token`, the admin token `make up` keeps in its data
directory, becomes the test stack's (its data directory is a temporary one). Nothing else in
the text changes. The CLI's and the dashboard's built-in defaults
are those same ports, so the blocks also get CONVEYOR_PRODUCER_ADDR and CONVEYOR_RESULTS_ADDR
naming the stack's producer and results (and the handler example's worker, whose default Redis
is make up's, REDIS_URL naming the stack's). Python scripts run in the same terminal too: they
see what the blocks before them exported (CONVEYOR_TOKEN).

The handler example ("Writing a handler") is run by its own test: its `# myapp/jobs.py` block is
written to that file, the worker command after it (a not-run block, since a worker runs until
stopped) is started in the background with that directory on PYTHONPATH (the README's
alternative to putting myapp/ in the repository root), and jobs of both handlers run to the end.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import http.client
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from google.protobuf import json_format

from conveyor.common.client import ConveyorClient
from conveyor.common.devstack.servers import free_port
from conveyor.common.errors import NotFound, Unauthenticated
from conveyor.common.ids import make_job_id, new_ulid
from conveyor.v1 import job_pb2
from tests.support.wait import wait_for, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
NOT_RUN = re.compile(r"^<!--\s*not-run:\s*(.+?)\s*-->$")
FENCE = re.compile(r"^```(\w*)\s*$")
BLOCK_TIMEOUT_S = 180

#: README port -> the CONVEYOR_DEV_* variable whose port replaces it (metrics: that port + 1000).
_GRPC_PORTS = {
    50051: "CONVEYOR_DEV_PRODUCER_PORT",
    50052: "CONVEYOR_DEV_RESULTS_PORT",
}


@dataclass(frozen=True)
class Block:
    """A fenced block of README.md: its language, text, first line number and not-run reason."""

    lang: str
    text: str
    line: int
    not_run: str = ""


def readme_blocks(text: str) -> list[Block]:
    """Every fenced block of ``text`` with the not-run reason of the comment right before it."""
    blocks: list[Block] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        start = i
        i += 1
        body: list[str] = []
        while i < len(lines) and not lines[i].startswith("```"):
            body.append(lines[i])
            i += 1
        i += 1  # the closing fence
        before = start - 1
        while before >= 0 and not lines[before].strip():
            before -= 1
        marker = NOT_RUN.match(lines[before].strip()) if before >= 0 else None
        blocks.append(Block(fence[1], "\n".join(body) + "\n", start + 1, marker[1] if marker else ""))
    return blocks


def is_whole_script(source: str) -> bool:
    """Whether a Python block is a program (a top-level call runs it) rather than a fragment."""
    return any(isinstance(node, ast.Expr) and isinstance(node.value, ast.Call) for node in ast.parse(source).body)


def _ports_free(*ports: int) -> bool:
    for port in ports:
        if port > 65535:
            return False
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


def _port_with(*offsets: int) -> int:
    """A port p such that p + each offset was free a moment ago."""
    while True:
        port = free_port()
        if _ports_free(*(port + o for o in offsets)):
            return port


@dataclass
class Stack:
    proc: subprocess.Popen[str]
    ports: dict[int, int]
    producer: str
    results: str
    redis_url: str = ""
    data_dir: Path = Path(".run")
    lines: list[str] = field(default_factory=list)

    def saw(self, text: str) -> bool:
        return any(text in line for line in self.lines)

    def substitute(self, text: str) -> str:
        """``text`` with each README port that follows a ':', and make up's token file, made the stack's."""

        def swap(match: re.Match[str]) -> str:
            return str(self.ports.get(int(match[0]), match[0]))

        text = text.replace(".run/admin.token", str(self.data_dir / "admin.token"))
        return re.sub(r"(?<=:)\d{4,5}(?!\d)", swap, text)

    @property
    def admin_token(self) -> str:
        return (self.data_dir / "admin.token").read_text().strip()


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    # Under /tmp and world-traversable: as root, PostgreSQL runs as `postgres` and must reach its data.
    data_dir = Path(tempfile.mkdtemp(prefix="conveyor-readme-test-", dir="/tmp"))
    data_dir.chmod(0o755)
    env_ports = {
        "CONVEYOR_DEV_REDIS_PORT": _port_with(0),
        "CONVEYOR_DEV_PG_PORT": _port_with(0),
        "CONVEYOR_DEV_PRODUCER_PORT": _port_with(0, 1000),
        "CONVEYOR_DEV_RESULTS_PORT": _port_with(0, 1000),
        "CONVEYOR_DEV_WORKER_PORT": _port_with(0, 1, 1000, 1001),
        "CONVEYOR_DEV_DASHBOARD_PORT": _port_with(0),
    }
    worker = env_ports["CONVEYOR_DEV_WORKER_PORT"]
    ports = {
        56379: env_ports["CONVEYOR_DEV_REDIS_PORT"],
        55432: env_ports["CONVEYOR_DEV_PG_PORT"],
        50061: worker,
        50062: worker + 1,
        51061: worker + 1000,
        51062: worker + 1001,
        8080: env_ports["CONVEYOR_DEV_DASHBOARD_PORT"],
        8081: _port_with(0),
    }
    handler_worker = _port_with(0, 1000)  # the README's own worker for its handler example
    ports[50081], ports[50082] = _port_with(0), _port_with(0)  # the TLS section's producer and its health port
    ports[50083], ports[50084] = _port_with(0), _port_with(0)  # the encryption section's producer and worker
    ports[50071], ports[51071] = handler_worker, handler_worker + 1000
    for readme_port, name in _GRPC_PORTS.items():
        ports[readme_port] = env_ports[name]
        ports[readme_port + 1000] = env_ports[name] + 1000
    env = {**_clean_env(), **{k: str(v) for k, v in env_ports.items()}, "PYTHONUNBUFFERED": "1", "NO_COLOR": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "conveyor.common.devstack", "--data-dir", str(data_dir), "--workers", "2"],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        process_group=0,
    )
    up = Stack(
        proc,
        ports,
        producer=f"127.0.0.1:{ports[50051]}",
        results=f"127.0.0.1:{ports[50052]}",
        redis_url=f"redis://127.0.0.1:{ports[56379]}/0",
        data_dir=data_dir,
    )

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            up.lines.append(line.rstrip("\n"))

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        wait_until(lambda: up.saw("Conveyor is up") or proc.poll() is not None, "the dev stack to be up", within=120)
        assert proc.poll() is None, "\n".join(up.lines)
        yield up
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        reader.join(5)
        if proc.stdout is not None:
            proc.stdout.close()
        shutil.rmtree(data_dir, ignore_errors=True)


def _clean_env() -> dict[str, str]:
    """This process's environment without Conveyor's own settings: a reader's fresh terminal."""
    drop = ("CONVEYOR_", "REDIS_URL", "DATABASE_URL", "OTEL_")
    return {k: v for k, v in os.environ.items() if not k.startswith(drop)}


# Carries shell variables and functions from one block to the next, as one terminal would.
_SAVE_STATE = r"""
__conveyor_save() {
  { declare -f
    for __v in $(compgen -v); do
      case $__v in
        BASH*|EUID|PPID|UID|SHELLOPTS|FUNCNAME|GROUPS|PIPESTATUS|RANDOM|SECONDS|LINENO|_|__*|\
HIST*|SHLVL|PWD|OLDPWD|DIRSTACK|COLUMNS|LINES|OPTIND|OPTARG|IFS|PS*|EPOCH*|SRANDOM) continue ;;
      esac
      __d=$(declare -p "$__v" 2>/dev/null) || continue
      case ${__d%%=*} in "declare -"*r*) continue ;; esac
      printf '%s\n' "$__d"
    done
  } > "$CONVEYOR_README_STATE"
}
trap __conveyor_save EXIT
"""


def _run(argv: list[str], env: dict[str, str], scratch: Path) -> subprocess.CompletedProcess[str]:
    """Run a block in its own process group; whatever it left running in the background is killed after.

    Output goes to files, not pipes: a background child (the read-only dashboard) keeps no pipe open.
    """
    out, err = scratch / "stdout", scratch / "stderr"
    with out.open("w") as stdout, err.open("w") as stderr:
        proc = subprocess.Popen(
            argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, text=True, process_group=0
        )
        try:
            code = proc.wait(BLOCK_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            code = -1
            stderr.write(f"\n[test: the block was still running after {BLOCK_TIMEOUT_S} s and was killed]\n")
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return subprocess.CompletedProcess(argv, code, out.read_text(), err.read_text())


def _run_sh(
    block: Block, stack: Stack, state: Path, env: dict[str, str], scratch: Path
) -> subprocess.CompletedProcess[str]:
    script = (
        f'[ -f "$CONVEYOR_README_STATE" ] && . "$CONVEYOR_README_STATE"\n{_SAVE_STATE}\n'
        f"set -e -o pipefail\n{stack.substitute(block.text)}"
    )
    return _run(["bash", "-c", script], {**env, "CONVEYOR_README_STATE": str(state)}, scratch)


def _run_python(
    block: Block, stack: Stack, state: Path, env: dict[str, str], scratch: Path
) -> subprocess.CompletedProcess[str]:
    """A script run from the same terminal: it sees what the sh blocks before it exported."""
    script = '[ -f "$CONVEYOR_README_STATE" ] && . "$CONVEYOR_README_STATE"\nexec "$CONVEYOR_PYTHON" -c "$1"'
    argv = ["bash", "-c", script, "readme-python", stack.substitute(block.text)]
    return _run(argv, {**env, "CONVEYOR_README_STATE": str(state), "CONVEYOR_PYTHON": sys.executable}, scratch)


def _failure(block: Block, text: str, done: subprocess.CompletedProcess[str]) -> str:
    return (
        f"README.md line {block.line}: this ```{block.lang} block failed with exit status {done.returncode}\n"
        f"--- the block as run ---\n{text}--- stdout ---\n{done.stdout}--- stderr ---\n{done.stderr}"
    )


def test_the_readme_blocks_are_found_and_markers_give_reasons() -> None:
    blocks = readme_blocks(README.read_text())
    runnable = [b for b in blocks if b.lang in ("sh", "python") and not b.not_run]
    assert len(runnable) >= 20, "the README's examples were not found: did the fences change?"
    skipped = [b for b in blocks if b.not_run]
    assert all(len(b.not_run) > 10 for b in skipped), "every not-run marker says why"
    assert len(skipped) <= 6, f"keep the not-run list short: {[b.line for b in skipped]}"
    for b in blocks:
        if b.lang == "python":
            ast.parse(b.text, filename=f"README.md:{b.line}")  # every snippet at least parses


def test_substitution_changes_only_the_readme_ports_and_token_file() -> None:
    fake = Stack(proc=None, ports={50051: 40001, 8080: 40002}, producer="", results="", data_dir=Path("/tmp/x"))  # type: ignore[arg-type]
    before = 'grpcurl -d \'{"limit":50,"period":"1s"}\' 127.0.0.1:50051 x; curl http://localhost:8080/jobs 50051'
    after = fake.substitute(before)
    assert after == before.replace(":50051", ":40001").replace(":8080", ":40002")
    assert fake.substitute("T=$(cat .run/admin.token) .run/x") == "T=$(cat /tmp/x/admin.token) .run/x"


def test_make_up_checks_tokens(stack: Stack) -> None:
    """The README's promise: `make up` has authentication on, and its admin token opens every call."""

    async def check() -> None:
        async with ConveyorClient(stack.producer, stack.results, token="") as anonymous:
            with pytest.raises(Unauthenticated):
                await anonymous.list_queues()
        async with ConveyorClient(stack.producer, stack.results, token=stack.admin_token) as admin:
            await admin.list_queues()
            # A job Redis does not know is looked up in the results service with the producer's own
            # reader token: NOT_FOUND from there, not UNAUTHENTICATED.
            with pytest.raises(NotFound):
                await admin.get_job(make_job_id("default", new_ulid()))

    asyncio.run(check())
    tokens = (stack.data_dir / "tokens.toml").read_text()
    assert stack.admin_token not in tokens and "make-up-admin" in tokens  # digests only


def test_make_up_dashboard_asks_each_person_to_sign_in(stack: Stack) -> None:
    """`make up`'s dashboard has the sign-in on (a kept secret in the data dir); the admin token opens it."""
    assert stack.saw("# sign in there with the admin token: cat ")
    assert len((stack.data_dir / "dashboard.secret").read_text().strip()) >= 32
    port = stack.ports[8080]

    def request(method: str, path: str, body: str = "", cookie: str = "") -> tuple[int, dict[str, str], str]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            headers = {"Cookie": cookie}
            if body:
                headers["Content-Type"] = "application/x-www-form-urlencoded"
            conn.request(method, path, body=body or None, headers=headers)
            response = conn.getresponse()
            headers = {k.lower(): v for k, v in response.getheaders()}
            headers["set-cookie"] = "\n".join(response.headers.get_all("set-cookie") or [])
            return response.status, headers, response.read().decode()
        finally:
            conn.close()

    assert request("GET", "/")[1]["location"] == "/login?next=%2F"
    nonce = request("GET", "/login")[1]["set-cookie"].split(";")[0].split("=", 1)[1]
    body = urllib.parse.urlencode({"csrf": nonce, "token": stack.admin_token, "next": "/workers"})
    status, headers, _ = request("POST", "/login", body, cookie=f"conveyor_login={nonce}")
    assert (status, headers["location"]) == (303, "/workers")
    session = next(c.split(";")[0] for c in headers["set-cookie"].splitlines() if c.startswith("conveyor_session="))
    status, _, page = request("GET", "/workers", cookie=session)
    assert status == 200 and "make-up-admin · admin" in page


# About 90 s on a 2-core machine: the stack's start, some 60 CLI, buf and grpcurl runs, jobs watched to the end.
@pytest.mark.slow
def test_every_readme_command_works_as_pasted(stack: Stack, tmp_path: Path) -> None:
    env = {**_clean_env(), "CONVEYOR_PRODUCER_ADDR": stack.producer, "CONVEYOR_RESULTS_ADDR": stack.results}
    env["NO_COLOR"] = "1"
    state = tmp_path / "shell-state.sh"
    ran = 0
    for block in readme_blocks(README.read_text()):
        if block.not_run or block.lang not in ("sh", "python"):
            continue
        if block.lang == "python":
            if not is_whole_script(block.text):
                continue  # a handler fragment: parsed by the test above
            done = _run_python(block, stack, state, env, tmp_path)
        else:
            done = _run_sh(block, stack, state, env, tmp_path)
        if done.returncode != 0 or "Traceback" in done.stderr:
            pytest.fail(_failure(block, stack.substitute(block.text), done), pytrace=False)
        ran += 1
    assert ran >= 15
    assert stack.proc.poll() is None, "the dev stack kept running throughout"


def test_the_handler_example_runs_in_a_worker_as_pasted(stack: Stack, tmp_path: Path) -> None:
    blocks = readme_blocks(README.read_text())
    module = next(b for b in blocks if b.lang == "python" and b.text.startswith("# myapp/jobs.py"))
    command = next(b for b in blocks if b.lang == "sh" and "CONVEYOR_HANDLERS=myapp.jobs:handlers" in b.text)
    (tmp_path / "myapp").mkdir()
    (tmp_path / "myapp" / "jobs.py").write_text(module.text)
    env = {**_clean_env(), "PYTHONPATH": str(tmp_path), "REDIS_URL": stack.redis_url, "NO_COLOR": "1"}
    log = (tmp_path / "worker.log").open("w")
    worker = subprocess.Popen(
        ["bash", "-c", stack.substitute(command.text)],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        process_group=0,
    )
    try:
        asyncio.run(_run_the_example_handlers(stack, worker, tmp_path / "worker.log"))
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()
        log.close()
    assert worker.returncode == 0, (tmp_path / "worker.log").read_text()


async def _run_the_example_handlers(stack: Stack, worker: subprocess.Popen[bytes], log: Path) -> None:
    async with ConveyorClient(stack.producer, stack.results, token=stack.admin_token) as client:
        sent = await client.enqueue("emails", "emails.send", {"to": "ada"})
        refused = await client.enqueue("emails", "emails.send", {})  # PermanentError: no retry
        report = await client.enqueue("reports", "reports.build", {})

        async def final(job_id: str) -> job_pb2.Job | None:
            assert worker.poll() is None, f"the README's worker command exited:\n{_read(log)}"
            job = await client.get_job(job_id)
            return job if job.state in FINAL_STATES else None

        done = await wait_for(lambda: final(sent.job_id), "emails.send to finish", within=60)
        assert done is not None and done.state == job_pb2.JOB_STATE_SUCCEEDED, done
        assert json_format.MessageToDict(done.result) == {"sent": True}
        done = await wait_for(lambda: final(refused.job_id), "emails.send without 'to' to finish", within=60)
        assert done is not None and done.state == job_pb2.JOB_STATE_FAILED and done.error.kind == "PermanentError", done
        assert "payload has no 'to'" in done.error.message
        done = await wait_for(lambda: final(report.job_id), "reports.build to finish", within=60)
        assert done is not None and done.state == job_pb2.JOB_STATE_SUCCEEDED, done
        assert done.result.string_value == "s3://bucket/report.pdf"


def _read(path: Path) -> str:
    return path.read_text()


FINAL_STATES = (
    job_pb2.JOB_STATE_SUCCEEDED,
    job_pb2.JOB_STATE_FAILED,
    job_pb2.JOB_STATE_DEAD_LETTERED,
    job_pb2.JOB_STATE_CANCELLED,
)
