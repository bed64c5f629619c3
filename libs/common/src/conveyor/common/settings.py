"""Configuration from environment variables, read once at start-up.

Every setting has a default that works with `make up`. A bad value fails fast
with a message naming the variable.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field

from conveyor.common.auth import TokenFileError, presented_token
from conveyor.common.supervise import Supervisor
from conveyor.common.tls import ClientTLS, ServerTLS, TLSConfigError
from conveyor.common.validate import queue_problem

DEFAULT_REDIS_URL = "redis://127.0.0.1:56379/0"
DEFAULT_DATABASE_URL = "postgresql://conveyor@127.0.0.1:55432/conveyor"


class SettingsError(ValueError):
    """A configuration variable holds a value Conveyor cannot use."""


class _Env:
    def __init__(self, env: Mapping[str, str] | None) -> None:
        self._env = os.environ if env is None else env

    def text(self, name: str, default: str, *aliases: str) -> str:
        for key in (name, *aliases):
            value = self._env.get(key)
            if value:
                return value
        return default

    def integer(self, name: str, default: int, minimum: int = 0) -> int:
        raw = self._env.get(name)
        if not raw:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise SettingsError(f"{name}={raw!r}: expected an integer") from None
        if value < minimum:
            raise SettingsError(f"{name}={raw!r}: must be at least {minimum}")
        return value

    def number(self, name: str, default: float, minimum: float = 0.0) -> float:
        raw = self._env.get(name)
        if not raw:
            return default
        try:
            value = float(raw)
        except ValueError:
            raise SettingsError(f"{name}={raw!r}: expected a number") from None
        if value < minimum:
            raise SettingsError(f"{name}={raw!r}: must be at least {minimum}")
        return value

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        value = self._env.get(name) or default
        if value not in choices:
            raise SettingsError(f"{name}={value!r}: expected one of {', '.join(choices)}")
        return value

    def pairs(self, name: str, minimum: float) -> tuple[tuple[str, float], ...]:
        """``key=number,key=number`` (e.g. ``emails=60,reports=600``)."""
        out = []
        for part in self.items(name, ()):
            key, sep, raw = part.partition("=")
            try:
                value = float(raw)
            except ValueError:
                value = float("nan")
            if not sep or not key.strip() or not value >= minimum:
                raise SettingsError(f"{name}: {part!r} should be name=seconds with seconds >= {minimum}")
            if (problem := queue_problem(key.strip())) is not None:
                raise SettingsError(f"{name}: queue {key.strip()!r} {problem}")
            out.append((key.strip(), value))
        return tuple(out)

    def flag(self, name: str, default: bool) -> bool:
        """``1``/``true``/``yes``/``on`` or ``0``/``false``/``no``/``off``."""
        raw = (self._env.get(name) or "").strip().lower()
        if not raw:
            return default
        if raw in ("1", "true", "yes", "on"):
            return True
        if raw in ("0", "false", "no", "off"):
            return False
        raise SettingsError(f"{name}={raw!r}: expected 1 or 0")

    def queues(self, name: str, default: tuple[str, ...]) -> tuple[str, ...]:
        """A comma-separated list of queue names, each checked by the rule every API applies."""
        found = self.items(name, default)
        for queue in found:
            if (problem := queue_problem(queue)) is not None:
                raise SettingsError(f"{name}: queue {queue!r} {problem}")
        return found

    def tls(self) -> dict[str, object]:
        """The server and client TLS settings, their files checked (SettingsError naming the variable)."""
        try:
            return {"server_tls": ServerTLS.from_env(self._env), "client_tls": ClientTLS.from_env(self._env)}
        except TLSConfigError as exc:
            raise SettingsError(str(exc)) from None

    def token(self) -> str:
        """CONVEYOR_TOKEN, or the content of the file CONVEYOR_TOKEN_FILE names."""
        try:
            return presented_token(self._env)
        except TokenFileError as exc:
            raise SettingsError(str(exc)) from None

    def items(self, name: str, default: tuple[str, ...]) -> tuple[str, ...]:
        raw = self._env.get(name)
        if not raw:
            return default
        return tuple(part.strip() for part in raw.split(",") if part.strip())


@dataclass(frozen=True)
class CommonSettings:
    """What every service reads."""

    redis_url: str = DEFAULT_REDIS_URL
    grpc_addr: str = "127.0.0.1:50051"
    log_level: str = "info"
    #: "json", "console", or "auto" (JSON unless stdout is a terminal).
    log_format: str = "auto"
    #: How long finished jobs' live records and events stay in Redis, in seconds.
    retention_s: float = 300.0
    #: Seconds a stopping server lets in-flight RPCs finish.
    shutdown_grace_s: float = 10.0
    #: A background loop failing this long turns the process's health NOT_SERVING.
    unhealthy_after_s: float = 10.0
    #: A background loop failing this long ends the process (exit 75) for its supervisor to restart; 0 never.
    exit_after_s: float = 300.0
    #: Where /metrics is served (CONVEYOR_METRICS_ADDR; "off": nowhere). Default: the gRPC host, port + 1000.
    metrics_addr: str = ""
    #: CONVEYOR_AUTH_TOKENS_FILE: the token file every call is checked against ("": no authentication).
    auth_tokens_file: str = ""
    #: CONVEYOR_TOKEN (or the file CONVEYOR_TOKEN_FILE names): the bearer token this process
    #: presents when it calls another service.
    token: str = ""
    #: CONVEYOR_TLS_CERT_FILE / _KEY_FILE / CONVEYOR_TLS_CLIENT_CA_FILE: TLS (and mTLS) of the gRPC
    #: server; None: plaintext (ADR 0024).
    server_tls: ServerTLS | None = None
    #: CONVEYOR_TLS, CONVEYOR_TLS_CA_FILE, CONVEYOR_TLS_CLIENT_CERT_FILE / _KEY_FILE, CONVEYOR_TLS_SERVER_NAME:
    #: how this process dials other services.
    client_tls: ClientTLS = field(default_factory=ClientTLS)
    #: CONVEYOR_HEALTH_ADDR: where grpc.health.v1 alone is also served, in plaintext, for probes
    #: that cannot do TLS ("": nowhere).
    health_addr: str = ""

    def supervisor(self) -> Supervisor:
        """The supervisor of this process's background loops."""
        return Supervisor(unhealthy_after_s=self.unhealthy_after_s, exit_after_s=self.exit_after_s)

    @classmethod
    def _common(cls, env: _Env, default_addr: str) -> dict[str, object]:
        grpc_addr = env.text("CONVEYOR_GRPC_ADDR", default_addr)
        return {
            "redis_url": env.text("REDIS_URL", DEFAULT_REDIS_URL, "CONVEYOR_REDIS_URL"),
            "grpc_addr": grpc_addr,
            "log_level": env.choice("CONVEYOR_LOG_LEVEL", "info", ("debug", "info", "warning", "error")),
            "log_format": env.choice("CONVEYOR_LOG_FORMAT", "auto", ("auto", "json", "console")),
            "retention_s": env.number("CONVEYOR_RETENTION_SECONDS", 300.0, minimum=1.0),
            "shutdown_grace_s": env.number("CONVEYOR_SHUTDOWN_GRACE_SECONDS", 10.0),
            "unhealthy_after_s": env.number("CONVEYOR_UNHEALTHY_AFTER_SECONDS", 10.0, minimum=0.1),
            "exit_after_s": env.number("CONVEYOR_EXIT_AFTER_SECONDS", 300.0),
            "metrics_addr": env.text("CONVEYOR_METRICS_ADDR", metrics_addr_beside(grpc_addr)),
            "auth_tokens_file": env.text("CONVEYOR_AUTH_TOKENS_FILE", ""),
            "token": env.token(),
            **env.tls(),
            "health_addr": env.text("CONVEYOR_HEALTH_ADDR", ""),
        }


def metrics_addr_beside(grpc_addr: str) -> str:
    """The default metrics address: the gRPC host with the port + 1000 (50051 -> 51051); "off"
    when there is no such port (port 0, as in tests, or past 65535)."""
    host, _, port = grpc_addr.rpartition(":")
    if not port.isdigit() or int(port) == 0 or int(port) + 1000 > 65535:
        return "off"
    return f"{host}:{int(port) + 1000}"


def metrics_addr_for_member(addr: str, index: int) -> str:
    """The metrics address of member ``index`` of a process group: the port + 100 x index."""
    host, _, port = addr.rpartition(":")
    if addr in ("", "off") or not port.isdigit() or int(port) == 0:
        return addr  # nowhere, or a port the system picks for each member anyway
    if int(port) + 100 * index > 65535:
        return "off"
    return f"{host}:{int(port) + 100 * index}"


@dataclass(frozen=True)
class ProducerSettings(CommonSettings):
    """The producer's settings."""

    #: Where ResultsService listens; Watch and GetJob fall back to it for old jobs.
    results_addr: str = "127.0.0.1:50052"
    max_payload_bytes: int = 1 << 20
    max_batch: int = 1000
    #: Events one Watch/WatchQueue stream may have waiting on the server (CONVEYOR_WATCH_BUFFER).
    watch_buffer: int = 10_000
    #: A queue idle this long leaves the queue registry (CONVEYOR_QUEUE_IDLE_SECONDS; ADR 0015).
    queue_idle_s: float = 3600.0
    #: How often the producer looks for idle queues (CONVEYOR_QUEUE_SWEEP_SECONDS).
    queue_sweep_s: float = 60.0
    #: Most queues whose state /metrics reads from Redis per scrape (CONVEYOR_METRICS_MAX_QUEUES).
    metrics_max_queues: int = 200
    #: Most Watch and WatchQueue streams open at once on this process (CONVEYOR_MAX_WATCHES).
    max_watches: int = 10_000
    #: gRPC max receive/send message length (CONVEYOR_MAX_MESSAGE_BYTES); 0 = derived, see message_limit.
    max_message_bytes: int = 0
    #: Redis connections for Enqueue, GetJob and CancelJob (CONVEYOR_REDIS_POOL_SIZE).
    redis_pool_size: int = 64
    #: Redis connections for Watch/WatchQueue replays and checks (CONVEYOR_WATCH_REDIS_POOL_SIZE).
    watch_redis_pool_size: int = 32
    #: Redis connections for AdminService and ScheduleService (CONVEYOR_ADMIN_REDIS_POOL_SIZE).
    admin_redis_pool_size: int = 16
    #: Producer processes sharing the gRPC port (CONVEYOR_PRODUCER_PROCESSES; process_group.py).
    processes: int = 1
    #: This process's index in such a group (CONVEYOR_PROCESS_INDEX, set by the group); -1: alone.
    process_index: int = -1

    @property
    def message_limit(self) -> int:
        """The gRPC message limit: CONVEYOR_MAX_MESSAGE_BYTES, or one derived from the payload limit.

        Derived: a full EnqueueBatch (max_batch jobs, each with a payload at the limit counted
        twice, since a ``payload`` Struct can encode larger than its JSON, plus 16 KiB for
        the other fields) and 1 MiB of slack, at most gRPC's ceiling of 2 GiB - 1. The same
        limit bounds what is sent (a job with its payload and result).
        """
        if self.max_message_bytes:
            return self.max_message_bytes
        return message_limit_for(self.max_payload_bytes, self.max_batch)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ProducerSettings:
        e = _Env(env)
        common = cls._common(e, "127.0.0.1:50051")
        index = e.integer("CONVEYOR_PROCESS_INDEX", -1, minimum=-1)
        if index > 0:
            # Members of a group share the gRPC port but not the metrics port: member i serves
            # /metrics on that port + 100 x i (50051's 51051, 51151, 51251...).
            common["metrics_addr"] = metrics_addr_for_member(str(common["metrics_addr"]), index)
        return cls(
            **common,  # type: ignore[arg-type]
            processes=e.integer("CONVEYOR_PRODUCER_PROCESSES", 1, minimum=1),
            process_index=index,
            results_addr=e.text("CONVEYOR_RESULTS_ADDR", "127.0.0.1:50052"),
            max_payload_bytes=e.integer("CONVEYOR_MAX_PAYLOAD_BYTES", 1 << 20, minimum=1),
            max_batch=e.integer("CONVEYOR_MAX_BATCH", 1000, minimum=1),
            watch_buffer=e.integer("CONVEYOR_WATCH_BUFFER", 10_000, minimum=1),
            # Longer than the 30 s a producer trusts its cached registration of a queue.
            queue_idle_s=e.number("CONVEYOR_QUEUE_IDLE_SECONDS", 3600.0, minimum=60.0),
            queue_sweep_s=e.number("CONVEYOR_QUEUE_SWEEP_SECONDS", 60.0, minimum=1.0),
            metrics_max_queues=e.integer("CONVEYOR_METRICS_MAX_QUEUES", 200, minimum=0),
            max_watches=e.integer("CONVEYOR_MAX_WATCHES", 10_000, minimum=1),
            max_message_bytes=_message_bytes(e),
            redis_pool_size=e.integer("CONVEYOR_REDIS_POOL_SIZE", 64, minimum=1),
            watch_redis_pool_size=e.integer("CONVEYOR_WATCH_REDIS_POOL_SIZE", 32, minimum=1),
            admin_redis_pool_size=e.integer("CONVEYOR_ADMIN_REDIS_POOL_SIZE", 16, minimum=1),
        )


#: gRPC's largest message length (a signed 32-bit length).
GRPC_MAX_MESSAGE_BYTES = (1 << 31) - 1


def message_limit_for(max_payload_bytes: int, max_batch: int) -> int:
    """The gRPC message limit derived from the payload limit (see ProducerSettings.message_limit)."""
    return min(GRPC_MAX_MESSAGE_BYTES, (2 * max_payload_bytes + (16 << 10)) * max_batch + (1 << 20))


def _message_bytes(e: _Env) -> int:
    value = e.integer("CONVEYOR_MAX_MESSAGE_BYTES", 0, minimum=0)
    if value and not 4096 <= value <= GRPC_MAX_MESSAGE_BYTES:
        raise SettingsError(
            f"CONVEYOR_MAX_MESSAGE_BYTES={value}: must be 0 (derived from the payload limit) "
            f"or 4096 to {GRPC_MAX_MESSAGE_BYTES}"
        )
    return value


def _default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass(frozen=True)
class WorkerSettings(CommonSettings):
    """The worker's settings."""

    queues: tuple[str, ...] = ("default",)
    #: Jobs one worker process runs at once.
    concurrency: int = 50
    #: "module:attribute" of Handlers objects, comma-separated.
    handlers: tuple[str, ...] = ("conveyor.worker.demo:handlers",)
    worker_id: str = field(default_factory=_default_worker_id)
    #: Longest wait for new work before checking again, in seconds.
    poll_interval_s: float = 5.0
    #: A claimed job whose worker has not heartbeated for this long is taken over by another.
    visibility_timeout_s: float = 30.0
    #: Per-queue visibility timeouts overriding ``visibility_timeout_s`` (queue -> seconds).
    visibility_timeouts: tuple[tuple[str, float], ...] = ()
    #: Deliveries without an outcome (crashed or stalled workers) before a job is dead-lettered.
    max_deliveries: int = 5
    #: A worker that stops heartbeating (it died) leaves ListWorkers this long after its last beat.
    worker_ttl_s: float = 10.0
    #: Run the scheduler loop that fires schedule ticks (repeatable jobs); any number may run.
    scheduler: bool = True

    def visibility_for(self, queue: str) -> float:
        """The visibility timeout of ``queue``, in seconds."""
        return dict(self.visibility_timeouts).get(queue, self.visibility_timeout_s)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> WorkerSettings:
        e = _Env(env)
        return cls(
            **cls._common(e, "127.0.0.1:50061"),  # type: ignore[arg-type]
            queues=e.queues("CONVEYOR_QUEUES", ("default",)),
            concurrency=e.integer("CONVEYOR_CONCURRENCY", 50, minimum=1),
            handlers=e.items("CONVEYOR_HANDLERS", ("conveyor.worker.demo:handlers",)),
            worker_id=e.text("CONVEYOR_WORKER_ID", _default_worker_id()),
            poll_interval_s=e.number("CONVEYOR_POLL_INTERVAL_SECONDS", 5.0, minimum=0.05),
            visibility_timeout_s=e.number("CONVEYOR_VISIBILITY_TIMEOUT_SECONDS", 30.0, minimum=0.5),
            visibility_timeouts=e.pairs("CONVEYOR_VISIBILITY_TIMEOUTS", minimum=0.5),
            max_deliveries=e.integer("CONVEYOR_MAX_DELIVERIES", 5, minimum=1),
            worker_ttl_s=e.number("CONVEYOR_WORKER_TTL_SECONDS", 10.0, minimum=0.5),
            scheduler=e.flag("CONVEYOR_SCHEDULER", True),
        )


@dataclass(frozen=True)
class ResultsSettings(CommonSettings):
    """The results service's settings."""

    database_url: str = DEFAULT_DATABASE_URL
    #: Most events projected in one PostgreSQL transaction.
    batch_size: int = 1000
    pool_size: int = 4
    #: Longest wait of a statement for a lock (lock_timeout); 0 waits forever.
    db_lock_timeout_s: float = 5.0
    #: Finished jobs and their events are kept in PostgreSQL this many days, then pruned; 0 keeps them forever.
    pg_retention_days: float = 30.0
    #: How often the prune loop runs, and most rows it deletes per statement.
    prune_interval_s: float = 600.0
    prune_batch: int = 1000
    #: How long the projector keeps back a job a batch leaves unfinished, so that a job finishing
    #: within it is written once, as its final row (ADR 0020); 0 writes every batch at once.
    projection_defer_ms: int = 10_000
    #: Most jobs kept back at once (about 1 KB of memory each); beyond it new ones are written at once.
    projection_defer_max: int = 20_000
    #: Events a results process read but never committed (it died) are taken over by another
    #: results process after they sat this long; shorter than the time a live one takes to commit
    #: a batch (projection_defer_ms included) would make two projectors write the same events.
    claim_idle_s: float = 60.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ResultsSettings:
        e = _Env(env)
        return cls(
            **cls._common(e, "127.0.0.1:50052"),  # type: ignore[arg-type]
            database_url=e.text("DATABASE_URL", DEFAULT_DATABASE_URL, "CONVEYOR_DATABASE_URL"),
            batch_size=e.integer("CONVEYOR_RESULTS_BATCH", 1000, minimum=1),
            pool_size=e.integer("CONVEYOR_DB_POOL_SIZE", 4, minimum=1),
            db_lock_timeout_s=e.number("CONVEYOR_DB_LOCK_TIMEOUT_SECONDS", 5.0),
            pg_retention_days=e.number("CONVEYOR_PG_RETENTION_DAYS", 30.0),
            prune_interval_s=e.number("CONVEYOR_PG_PRUNE_INTERVAL_SECONDS", 600.0, minimum=0.1),
            prune_batch=e.integer("CONVEYOR_PG_PRUNE_BATCH", 1000, minimum=1),
            projection_defer_ms=e.integer("CONVEYOR_PROJECTION_DEFER_MS", 10_000, minimum=0),
            projection_defer_max=e.integer("CONVEYOR_PROJECTION_DEFER_MAX", 20_000, minimum=0),
            claim_idle_s=e.number("CONVEYOR_RESULTS_CLAIM_IDLE_SECONDS", 60.0, minimum=1.0),
        )
