"""Throwaway private Redis and PostgreSQL servers run from the system binaries.

Owns starting, stopping, crashing and restarting `redis-server` and `postgres` as
foreground children, for the test suite and for `make up`. Standard library only.
Install the binaries with `deploy/local/install-system-deps.sh`.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import weakref
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Self

PG_USER = "conveyor"
PG_DATABASE = "conveyor"
SYSTEM_PG_USER = "postgres"
_POLL = 0.02


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _port_in_use(port: int) -> bool:
    # Checked before spawning: another server on the port would answer our readiness probe.
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _is_root() -> bool:
    return os.geteuid() == 0


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _wait_until(ready: Callable[[], bool], proc: subprocess.Popen[bytes], what: str, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}; last log lines of {log}:\n{_tail(log)}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not ready after {timeout:.0f}s; last log lines of {log}:\n{_tail(log)}")
        time.sleep(_POLL)


class _Leftovers:
    """What must not outlive us: the running child and the temp dirs we created."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self.dirs: list[Path] = []

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        for path in self.dirs:
            shutil.rmtree(path, ignore_errors=True)
        self.dirs.clear()


class _Server:
    """A foreground child in its own process group, so kill() takes its helpers down too."""

    name = "server"

    def __init__(self, port: int | None, data_dir: Path | None) -> None:
        self.port = port if port is not None else free_port()
        self._left = _Leftovers()
        # A server dropped without close() (or a test run cut short) still leaves nothing behind.
        self._finalizer = weakref.finalize(self, self._left.cleanup)
        if data_dir is None:
            data_dir = self._mkdtemp(f"conveyor-{self.name}-")
        self.data_dir = data_dir.resolve()
        self._log: IO[bytes] | None = None

    def _mkdtemp(self, prefix: str) -> Path:
        # /tmp, not $TMPDIR: its parents must be traversable by the postgres user when root.
        path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp" if _is_root() else None))
        self._left.dirs.append(path)
        return path

    @property
    def log_path(self) -> Path:
        raise NotImplementedError

    @property
    def running(self) -> bool:
        proc = self._left.proc
        return proc is not None and proc.poll() is None

    def _spawn(self, args: list[str], *, as_user: str | None = None, cwd: Path | None = None) -> None:
        if self.running:
            raise RuntimeError(f"{self.name} already running on port {self.port}")
        if _port_in_use(self.port):
            raise RuntimeError(f"{self.name}: port {self.port} is already in use")
        self._log = self.log_path.open("ab")
        self._left.proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            process_group=0,  # Ctrl-C in a terminal reaches only our parent, which stops us in order
            user=as_user,
            group=as_user,
            extra_groups=[] if as_user else None,
        )

    def _ready(self) -> bool:
        raise NotImplementedError

    def _wait_ready(self, timeout: float) -> None:
        assert self._left.proc is not None
        try:
            _wait_until(self._ready, self._left.proc, self.name, self.log_path, timeout)
        except BaseException:
            self.kill()
            raise

    def _signal_and_wait(self, sig: signal.Signals, timeout: float) -> None:
        proc = self._left.proc
        if proc is None:
            return
        if proc.poll() is None:
            # Polite signals go to the leader only (postgres' helpers treat SIGINT differently);
            # SIGKILL goes to the whole group so no orphaned backend keeps shared memory attached.
            with contextlib.suppress(ProcessLookupError):
                if sig == signal.SIGKILL:
                    os.killpg(proc.pid, sig)
                else:
                    proc.send_signal(sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        elif sig == signal.SIGKILL:
            # The leader died by itself (crash, kill -9): its helpers (postgres' backends) may
            # linger holding the port or shared memory; the group id is still the leader's pid.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, sig)
        self._left.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def kill(self) -> None:
        """SIGKILL the server and its helper processes (a crash, for fault tests)."""
        self._signal_and_wait(signal.SIGKILL, 10.0)

    def start(self, timeout: float = 30.0) -> None:
        raise NotImplementedError

    def stop(self, timeout: float = 30.0) -> None:
        raise NotImplementedError

    def restart(self, timeout: float = 30.0) -> None:
        """Stop (if running) and start again on the same port and data directory."""
        self.stop()
        self.start(timeout)

    def close(self) -> None:
        """Stop the server and delete the temporary directories it created."""
        self.stop()
        self._finalizer()

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class RedisServer(_Server):
    """A private `redis-server` on 127.0.0.1, with AOF so restarts and kills keep data."""

    name = "redis"

    def __init__(self, port: int | None = None, data_dir: Path | None = None, appendonly: bool = True) -> None:
        super().__init__(port, data_dir)
        self.appendonly = appendonly

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "redis.log"

    def start(self, timeout: float = 30.0) -> None:
        """Spawn redis-server and wait until it answers PING (after loading its AOF)."""
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server not found: run deploy/local/install-system-deps.sh")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # Invariant 1 (DESIGN.md) is tested against these flags: AOF, everysec, noeviction.
        self._spawn(
            [
                binary,
                "--bind", "127.0.0.1",
                "--port", str(self.port),
                "--save", "",
                "--appendonly", "yes" if self.appendonly else "no",
                "--appendfsync", "everysec",
                "--maxmemory-policy", "noeviction",
                "--dir", str(self.data_dir),
                "--logfile", str(self.log_path),
            ]
        )  # fmt: skip
        self._wait_ready(timeout)

    def _ready(self) -> bool:
        # Raw RESP keeps this module dependency-free; -LOADING means the AOF is still replaying.
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM: Redis flushes the AOF and exits."""
        self._signal_and_wait(signal.SIGTERM, timeout)


def postgres_bin_dir(version: str | None = None) -> Path:
    """The PostgreSQL bin directory: `version`'s if given and installed, else the newest installed."""
    found = sorted(
        (p for p in Path("/usr/lib/postgresql").glob("*/bin") if (p / "initdb").exists()),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    if version is not None:
        for p in found:
            if p.parent.name == version:
                return p
    if found:
        return found[-1]
    initdb = shutil.which("initdb")  # non-Debian layouts put it on PATH
    if initdb is not None:
        return Path(initdb).parent
    raise RuntimeError("PostgreSQL not found: run deploy/local/install-system-deps.sh")


def postgres_can_reach(directory: Path) -> bool:
    """Whether the user PostgreSQL runs as can traverse into `directory` (which must exist).

    Always true when not root. As root the server runs as the `postgres` system user,
    which cannot enter e.g. anything under /root (mode 700).
    """
    if not _is_root():
        return True
    return subprocess.run(["test", "-x", str(directory)], user=SYSTEM_PG_USER, check=False).returncode == 0


class PostgresServer(_Server):
    """A private PostgreSQL cluster on 127.0.0.1 with a trusted superuser `conveyor` and database `conveyor`.

    As root, initdb and postgres refuse to run, so both run as the `postgres` system user and
    the data directory is chowned to it. An existing initialised `data_dir` is reused as is.
    """

    name = "postgres"

    def __init__(
        self,
        port: int | None = None,
        data_dir: Path | None = None,
        settings: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(port, data_dir)
        self.settings = {"listen_addresses": "127.0.0.1", "fsync": "on", **(settings or {})}
        self._as_user = SYSTEM_PG_USER if _is_root() else None
        self._isready: list[str] = []
        if data_dir is None:
            self._give_to_server_user(self.data_dir)  # mkdtemp made it root-only
            self.data_dir = self.data_dir / "data"
        self.socket_dir = self._mkdtemp("conveyor-pgsock-")  # short: unix socket paths max out at 107 bytes
        self._give_to_server_user(self.socket_dir)

    @property
    def url(self) -> str:
        return f"postgresql://{PG_USER}@127.0.0.1:{self.port}/{PG_DATABASE}"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "postgres.log"

    def _give_to_server_user(self, path: Path) -> None:
        if self._as_user is not None:
            try:
                user = pwd.getpwnam(self._as_user)
            except KeyError:
                raise RuntimeError(
                    f"no {self._as_user!r} system user to run PostgreSQL as root: "
                    "run deploy/local/install-system-deps.sh"
                ) from None
            os.chown(path, user.pw_uid, user.pw_gid)
        path.chmod(0o700)  # postgres refuses group/world-accessible data directories

    def _prepare_data_dir(self) -> Path:
        """Create (or find) the data directory; initdb if it is empty. Returns the bin dir."""
        version_file = self.data_dir / "PG_VERSION"
        if version_file.exists():
            return postgres_bin_dir(version_file.read_text().strip())
        bin_dir = postgres_bin_dir()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if not postgres_can_reach(self.data_dir.parent):
            raise RuntimeError(
                f"the {SYSTEM_PG_USER} user cannot reach {self.data_dir.parent}: use a data dir under /tmp"
            )
        self._give_to_server_user(self.data_dir)
        initdb = [
            str(bin_dir / "initdb"),
            "-D", str(self.data_dir),
            "-U", PG_USER,
            "-A", "trust",
            "-E", "UTF8",
            "--locale=C.UTF-8",
            "--no-sync",
            "--no-instructions",
        ]  # fmt: skip
        done = subprocess.run(
            initdb,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            cwd=self.socket_dir,
            user=self._as_user,
            group=self._as_user,
            extra_groups=[] if self._as_user else None,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed ({done.returncode}):\n{done.stderr.decode(errors='replace')}")
        return bin_dir

    def start(self, timeout: float = 30.0) -> None:
        """initdb if needed, spawn postgres, wait until it accepts connections, create the database."""
        bin_dir = self._prepare_data_dir()
        args = [str(bin_dir / "postgres"), "-D", str(self.data_dir), "-p", str(self.port), "-k", str(self.socket_dir)]
        for key, value in self.settings.items():
            args += ["-c", f"{key}={value}"]
        self._spawn(args, as_user=self._as_user, cwd=self.socket_dir)
        self._isready = [str(bin_dir / "pg_isready"), "-q", "-t", "1", *self._client_args(), "-d", "postgres"]
        self._wait_ready(timeout)
        self._ensure_database(bin_dir)

    def _ready(self) -> bool:
        return subprocess.run(self._isready, check=False).returncode == 0

    def _client_args(self) -> list[str]:
        # -U always: the default role would be the OS user ("root"), which does not exist.
        return ["-h", "127.0.0.1", "-p", str(self.port), "-U", PG_USER]

    def _ensure_database(self, bin_dir: Path) -> None:
        base = self._client_args()
        exists = subprocess.run(
            [str(bin_dir / "psql"), "-X", "-tA", *base, "-d", "postgres", "-c",
             f"SELECT 1 FROM pg_database WHERE datname = '{PG_DATABASE}'"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        if exists != "1":
            subprocess.run([str(bin_dir / "createdb"), *base, PG_DATABASE], check=True)

    def stop(self, timeout: float = 30.0) -> None:
        """SIGINT: PostgreSQL's fast shutdown (rolls back open transactions, checkpoints, exits)."""
        self._signal_and_wait(signal.SIGINT, timeout)
