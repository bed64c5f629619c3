"""The gRPC server bootstrap every service uses: aio server, health, reflection, signals."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from conveyor.common import metrics, reflection_docs
from conveyor.common.auth import Authorizer, TokenFileError
from conveyor.common.crypto import KeyringError
from conveyor.common.errors import ConveyorError
from conveyor.common.interceptors import ServerInterceptor
from conveyor.common.settings import SettingsError
from conveyor.common.supervise import EXIT_LOOPS_FAILING, LoopsFailing, Supervisor
from conveyor.common.tls import ServerTLS, TLSConfigError

log = structlog.get_logger("conveyor.server")

MAX_MESSAGE_BYTES = 64 << 20
SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.keepalive_permit_without_calls", 1),
    # gRPC sets SO_REUSEPORT by default, so a second process on the same port binds silently and
    # the kernel splits connections between them (a health check may reach either one).
    ("grpc.so_reuseport", 0),
]
#: Exit status of a service whose listen address is taken (Linux's EADDRINUSE).
EXIT_ADDRESS_IN_USE = errno.EADDRINUSE
#: A configuration variable (or the token file) holds a value the service cannot use (sysexits' EX_CONFIG).
EXIT_BAD_SETTING = 78


class AddressInUse(OSError):
    """The listen address is taken by another process: the service cannot start."""

    def __init__(self, addr: str) -> None:
        super().__init__(
            errno.EADDRINUSE,
            f"cannot listen on {addr}: the address is already in use by another process "
            "(another instance of this service?); stop it or choose another CONVEYOR_GRPC_ADDR",
        )
        self.addr = addr


def address_in_use(addr: str) -> bool:
    """Whether binding ``addr`` ("host:port") fails with EADDRINUSE right now."""
    host, _, port = addr.rpartition(":")
    host = host.strip("[]") or "0.0.0.0"
    try:
        infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (OSError, ValueError):
        return False
    for family, kind, proto, _, sockaddr in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC does: TIME_WAIT is no conflict
            try:
                probe.bind(sockaddr)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return True
    return False


def bind(server: grpc.aio.Server, addr: str, credentials: grpc.ServerCredentials | None = None) -> int:
    """Listen on ``addr`` without sharing the port (with TLS when ``credentials``); returns the bound port.

    Raises:
        AddressInUse: Another process listens on ``addr``.
        OSError: ``addr`` cannot be listened on for another reason (bad host, no permission).
    """
    try:
        port = server.add_insecure_port(addr) if credentials is None else server.add_secure_port(addr, credentials)
    except RuntimeError:  # grpcio >= 1.5x raises; older versions return 0
        port = 0
    if port == 0:
        if address_in_use(addr):
            raise AddressInUse(addr)
        raise OSError(f"cannot listen on {addr} (set GRPC_VERBOSITY=debug for gRPC's reason)")
    return port


def server_options(max_message_bytes: int = MAX_MESSAGE_BYTES, share_port: bool = False) -> list[tuple[str, int]]:
    """SERVER_OPTIONS with the receive and send message limits set to ``max_message_bytes``;
    ``share_port`` turns SO_REUSEPORT on, for the members of a process group (process_group.py)."""
    limits = {"grpc.max_receive_message_length", "grpc.max_send_message_length"}
    options = [(k, max_message_bytes if k in limits else v) for k, v in SERVER_OPTIONS]
    return [(k, 1 if k == "grpc.so_reuseport" and share_port else v) for k, v in options]


@dataclass(frozen=True)
class Service:
    """One gRPC service to host: its generated ``add_*_to_server`` function and servicer."""

    add_to_server: Callable[[Any, grpc.aio.Server], None]
    servicer: Any
    #: Full name, e.g. "conveyor.v1.ProducerService" (from the generated descriptor).
    name: str


@dataclass
class RunningServer:
    """A started server; ``port`` is the bound port (useful with port 0)."""

    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    names: list[str] = field(default_factory=list)
    interceptor: ServerInterceptor = field(default_factory=ServerInterceptor)
    #: The plaintext server of grpc.health.v1 alone (CONVEYOR_HEALTH_ADDR), when there is one.
    health_server: grpc.aio.Server | None = None
    health_port: int = 0

    async def set_serving(self, serving: bool) -> None:
        """Report ``serving`` for the whole server and each of its services (unless shutting down)."""
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", *self.names):
            await self.health.set(name, status)

    async def stop(self, grace: float | None = 1.0) -> None:
        """Report NOT_SERVING, end open streams with UNAVAILABLE, then stop, letting unary RPCs finish within ``grace``.

        Server streams (Watch) never finish by themselves within a grace period: they end at
        once with UNAVAILABLE ("server shutting down ... after_event_id"), so that clients
        resume on another replica right away rather than when the grace expires.
        """
        await self.health.enter_graceful_shutdown()
        self.interceptor.shutdown()
        await self.server.stop(grace)
        await self.stop_health()

    async def stop_health(self) -> None:
        if self.health_server is not None:
            await self.health_server.stop(None)


async def start(
    addr: str,
    services: Sequence[Service],
    *,
    unavailable: tuple[type[BaseException], ...] = (),
    classify: Sequence[Callable[[BaseException], ConveyorError | None]] = (),
    max_message_bytes: int = MAX_MESSAGE_BYTES,
    auth: Authorizer | None = None,
    share_port: bool = False,
    tls: ServerTLS | None = None,
    health_addr: str = "",
) -> RunningServer:
    """Start a server on ``addr`` ("host:port", port 0 picks a free one) hosting ``services``.

    Every server also hosts grpc.health.v1 (SERVING for "" and each service) and
    server reflection, so grpcurl and Kubernetes probes work out of the box.

    Args:
        tls: Serve TLS (mTLS when it names a client CA) with certificates reloaded when their
            files change; None: plaintext.
        health_addr: Also serve grpc.health.v1 alone, in plaintext, there (probes that cannot do
            TLS); "": nowhere.

    Raises:
        TLSConfigError: The certificate files cannot be used.
    """
    credentials = tls.credentials() if tls is not None else None
    interceptor = ServerInterceptor(unavailable, classify, auth)
    server = grpc.aio.server(interceptors=[interceptor], options=server_options(max_message_bytes, share_port))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [s.name for s in services]
    for s in services:
        s.add_to_server(s.servicer, server)
    reflection_docs.enable(
        [*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server
    )
    port = bind(server, addr, credentials)
    health_server: grpc.aio.Server | None = None
    health_port = 0
    if health_addr:
        # The same servicer: both ports tell the same status. Health only (reflection describes
        # just health, so `grpcurl -plaintext ADDR grpc.health.v1.Health/Check` works); no interceptor.
        health_server = grpc.aio.server(options=server_options(1 << 20, share_port))
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, health_server)
        reflection_docs.enable(
            [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], health_server
        )
        health_port = bind(health_server, health_addr)
    await server.start()
    if health_server is not None:
        await health_server.start()
    for name in ["", *names]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return RunningServer(
        server=server,
        port=port,
        health=health_servicer,
        names=names,
        interceptor=interceptor,
        health_server=health_server,
        health_port=health_port,
    )


#: Allocations between two young collections (CPython's default: 700); see tune_gc.
GC_THRESHOLD0 = 20_000


def tune_gc() -> None:
    """Spare a service most of the cyclic collector's passes (ADR 0030); reference counting frees its garbage.

    A service's per-job objects (a read's reply, a batch's rows and history, a claim's jobs and
    their tasks) live long enough to be scanned by every young collection meanwhile and promoted
    to the oldest generation; each time enough pile up there, a full collection rescans the whole
    heap (modules, protobuf descriptors, gRPC). In the results service catching up on 20,000
    jobs that was 0.14 s of CPU, 7 µs per job. Frozen, what start-up made is never scanned again;
    a young collection every 20,000 allocations instead of 700 leaves 3 passes where there were
    200 (cyclic garbage, rare here, waits a little longer: memory stays bounded).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD0, *gc.get_threshold()[1:])


async def serve(
    addr: str,
    services: Sequence[Service],
    *,
    grace: float = 10.0,
    unavailable: tuple[type[BaseException], ...] = (),
    background: Sequence[Callable[[asyncio.Event], Coroutine[Any, Any, None]]] = (),
    on_shutdown: Sequence[Callable[[], Awaitable[Any]]] = (),
    supervisor: Supervisor | None = None,
    classify: Sequence[Callable[[BaseException], ConveyorError | None]] = (),
    max_message_bytes: int = MAX_MESSAGE_BYTES,
    metrics_addr: str = "",
    auth: Authorizer | None = None,
    share_port: bool = False,
    tls: ServerTLS | None = None,
    health_addr: str = "",
) -> None:
    """Run a server until SIGTERM or SIGINT, then shut down gracefully.

    Args:
        addr: Listen address.
        services: The services to host.
        grace: Seconds in-flight unary RPCs (and background tasks) get to finish; server
            streams end at once with UNAVAILABLE (see RunningServer.stop).
        unavailable: Exception types that mean a backing store is down.
        background: Coroutines run beside the server; each gets the stop event and
            must return soon after it is set.
        on_shutdown: Awaited in order after the server stopped (close clients).
        supervisor: Supervises the background loops: its health is this server's
            grpc.health.v1 status, and LoopsFailing from it ends the process (run_process).
        classify: What else an exception means for a caller (see ServerInterceptor).
        max_message_bytes: gRPC max receive and send message length.
        metrics_addr: Where to serve Prometheus metrics ("" or "off": nowhere).
        auth: Checks every call's bearer token (None: no authentication).
        share_port: Listen with SO_REUSEPORT, beside the other members of a process group (the
            health port too).
        tls: TLS of the server (see start); None: plaintext.
        health_addr: Where grpc.health.v1 alone is also served in plaintext (see start).
    """
    tune_gc()  # start-up is over: what it made stays for the process's life
    try:
        stop_metrics = metrics.serve(metrics_addr)
    except OSError as exc:
        # Metrics are for watching the service, not part of its work: say so loudly and go on.
        log.error("metrics_unavailable", addr=metrics_addr, error=str(exc), hint="set CONVEYOR_METRICS_ADDR")
        stop_metrics = None
    if stop_metrics is not None:
        log.info("metrics_serving", addr=metrics_addr)
    running = await start(
        addr,
        services,
        unavailable=unavailable,
        classify=classify,
        max_message_bytes=max_message_bytes,
        auth=auth,
        share_port=share_port,
        tls=tls,
        health_addr=health_addr,
    )
    log.info(
        "server_started",
        addr=addr,
        port=running.port,
        services=running.names,
        tls="mtls" if tls is not None and tls.mutual else "tls" if tls is not None else "off",
    )
    if running.health_server is not None:
        log.info("health_serving", addr=health_addr, port=running.health_port, tls="off")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    tasks = [asyncio.create_task(job(stop)) for job in background]
    if supervisor is not None:
        supervisor.on_health(running.set_serving)
        tasks.append(asyncio.create_task(supervisor.watch(stop)))
    waiter = asyncio.create_task(stop.wait())
    try:
        # A background task that dies takes the process down rather than leaving it half-alive.
        done, _ = await asyncio.wait([waiter, *tasks], return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if task is not waiter and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
    finally:
        stop.set()
        log.info("server_stopping", grace_s=grace)
        await running.health.enter_graceful_shutdown()
        running.interceptor.shutdown()  # open streams end now with UNAVAILABLE; unary calls get the grace
        results = await asyncio.gather(
            running.server.stop(grace), running.stop_health(), *tasks, return_exceptions=True
        )
        for result in results:
            if isinstance(result, Exception):
                log.error("shutdown_task_failed", exc_info=result)
        for close in on_shutdown:
            await close()
        waiter.cancel()
        if stop_metrics is not None:
            stop_metrics()
        log.info("server_stopped")


def run_process(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run a service's async ``main`` on uvloop when it is installed (ADR 0005), else asyncio's loop."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - optional speed-up
        _run(main)
        return
    uvloop.install()
    _run(main)


def _run(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    with exit_codes():
        asyncio.run(main())


@contextlib.contextmanager
def exit_codes() -> Iterator[None]:
    """Turn why a service cannot run into its exit code and one line, never a traceback: 98 for a
    taken address, 75 for loops failing too long, 78 for a setting to fix (a variable, the token
    file, a certificate, the keyring)."""
    try:
        yield
    except AddressInUse as exc:
        log.error("address_in_use", addr=exc.addr, error=exc.strerror)
        sys.stderr.write(f"error: {exc.strerror}\n")
        raise SystemExit(EXIT_ADDRESS_IN_USE) from None
    except LoopsFailing:
        # Logged by the supervisor; a non-zero exit makes the orchestrator restart us.
        raise SystemExit(EXIT_LOOPS_FAILING) from None
    except (SettingsError, TokenFileError, TLSConfigError, KeyringError) as exc:
        sys.stderr.write(f"error: {exc}\n")
        raise SystemExit(EXIT_BAD_SETTING) from None
