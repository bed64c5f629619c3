"""TLS for every gRPC server and client of Conveyor (ADR 0024).

Servers: ``CONVEYOR_TLS_CERT_FILE`` and ``CONVEYOR_TLS_KEY_FILE`` turn TLS on;
``CONVEYOR_TLS_CLIENT_CA_FILE`` adds mTLS (every client must then present a certificate that
CA signed). The files are read again when they change, with no restart: each new connection
asks for the current certificate (grpc.dynamic_ssl_server_credentials), and a change of the
files' mtime, size or inode makes it the new one once the pair loads cleanly.

Clients: ``CONVEYOR_TLS_CA_FILE`` (the CA that signs the servers' certificates),
``CONVEYOR_TLS=1`` (TLS with the system's CA certificates), ``CONVEYOR_TLS_CLIENT_CERT_FILE`` and
``CONVEYOR_TLS_CLIENT_KEY_FILE`` (mTLS), ``CONVEYOR_TLS_SERVER_NAME`` (the name the server's
certificate must carry, when the address does not). A channel whose CA or client certificate
files change dials again for its next calls (:class:`ReloadingChannel`).

Without any of these, servers and clients speak plaintext, as before.
"""

from __future__ import annotations

import os
import ssl
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self, cast

import grpc
import structlog

log = structlog.get_logger("conveyor.tls")

#: How often (seconds) a client channel may stat its certificate files to see whether they changed.
CLIENT_RELOAD_CHECK_S = 1.0

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")


class TLSConfigError(ValueError):
    """A TLS setting names a file that is missing, unreadable, or not what it should be."""


def _read(path: str, what: str, variable: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise TLSConfigError(f"{variable}={path}: cannot read the {what} ({exc.strerror})") from None
    if b"-----BEGIN " not in data:
        raise TLSConfigError(f"{variable}={path}: the {what} is not PEM (no -----BEGIN line)")
    return data


def _stamp(paths: Sequence[str]) -> tuple[tuple[int, int, int], ...]:
    """What tells a changed file: mtime, size, inode (an atomic rename changes the inode)."""
    out = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            out.append((-1, -1, -1))
        else:
            out.append((st.st_mtime_ns, st.st_size, st.st_ino))
    return tuple(out)


def _check_pair(cert_file: str, key_file: str, cert_var: str, key_var: str) -> tuple[bytes, bytes]:
    """The PEM certificate chain and key, after checking that they load and belong together."""
    cert = _read(cert_file, "certificate", cert_var)
    key = _read(key_file, "private key", key_var)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_cert_chain(cert_file, key_file)
    except ssl.SSLError as exc:
        raise TLSConfigError(
            f"{cert_var}={cert_file} and {key_var}={key_file}: not a certificate and its private key "
            f"({exc.reason or exc})"
        ) from None
    except OSError as exc:
        raise TLSConfigError(f"{cert_var}={cert_file}: cannot read ({exc.strerror})") from None
    return cert, key


def _check_ca(ca_file: str, variable: str) -> bytes:
    data = _read(ca_file, "CA certificate", variable)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_verify_locations(cadata=data.decode("ascii", errors="replace"))
    except (ssl.SSLError, ValueError) as exc:
        raise TLSConfigError(f"{variable}={ca_file}: not a PEM CA certificate ({exc})") from None
    return data


def _flag(env: Mapping[str, str], name: str) -> bool:
    raw = (env.get(name) or "").strip().lower()
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise TLSConfigError(f"{name}={raw!r}: expected 1 or 0")


# Servers --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerTLS:
    """A server's certificate and key files, and the CA its clients' certificates need (mTLS)."""

    cert_file: str
    key_file: str
    #: "": clients present no certificate. Set: every client must present one this CA signed.
    client_ca_file: str = ""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ServerTLS | None:
        """The server TLS the environment asks for, checked; None for plaintext."""
        env = os.environ if env is None else env
        cert = env.get("CONVEYOR_TLS_CERT_FILE", "")
        key = env.get("CONVEYOR_TLS_KEY_FILE", "")
        client_ca = env.get("CONVEYOR_TLS_CLIENT_CA_FILE", "")
        if not cert and not key:
            if client_ca:
                raise TLSConfigError(
                    "CONVEYOR_TLS_CLIENT_CA_FILE is set but CONVEYOR_TLS_CERT_FILE and CONVEYOR_TLS_KEY_FILE are "
                    "not: client certificates need TLS; set the server's certificate and key too"
                )
            return None
        if not cert or not key:
            missing = "CONVEYOR_TLS_KEY_FILE" if cert else "CONVEYOR_TLS_CERT_FILE"
            raise TLSConfigError(
                f"{missing} is not set: TLS needs both CONVEYOR_TLS_CERT_FILE and CONVEYOR_TLS_KEY_FILE"
            )
        tls = cls(cert, key, client_ca)
        tls.load()
        return tls

    @property
    def mutual(self) -> bool:
        return bool(self.client_ca_file)

    def _paths(self) -> list[str]:
        return [p for p in (self.cert_file, self.key_file, self.client_ca_file) if p]

    def load(self) -> grpc.ServerCertificateConfiguration:
        """The current files as a gRPC certificate configuration; TLSConfigError if they are wrong."""
        cert, key = _check_pair(self.cert_file, self.key_file, "CONVEYOR_TLS_CERT_FILE", "CONVEYOR_TLS_KEY_FILE")
        roots = _check_ca(self.client_ca_file, "CONVEYOR_TLS_CLIENT_CA_FILE") if self.client_ca_file else None
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=roots)

    def credentials(self) -> grpc.ServerCredentials:
        """Credentials that pick up new files on the next connection after they change."""
        # The stubs say the fetcher returns a configuration; gRPC documents None as "unchanged".
        fetcher = cast(Callable[[], grpc.ServerCertificateConfiguration], _ServerReloader(self))
        return grpc.dynamic_ssl_server_credentials(self.load(), fetcher, require_client_authentication=self.mutual)


class _ServerReloader:
    """gRPC's certificate-configuration fetcher: a new configuration when the files changed, else None.

    gRPC calls it before each new connection's handshake, from its own threads.
    """

    def __init__(self, tls: ServerTLS) -> None:
        self._tls = tls
        self._lock = threading.Lock()
        self._stamp = _stamp(tls._paths())
        self._failed: tuple[tuple[int, int, int], ...] | None = None

    def __call__(self) -> grpc.ServerCertificateConfiguration | None:
        stamp = _stamp(self._tls._paths())
        if stamp == self._stamp:
            return None
        with self._lock:
            if stamp == self._stamp:
                return None
            try:
                config = self._tls.load()
            except TLSConfigError as exc:
                # Half-replaced files (a new certificate, the old key): keep serving the old pair and
                # try again on the next connection. Logged once per state of the files.
                if stamp != self._failed:
                    self._failed = stamp
                    log.error("tls_certificate_not_reloaded", error=str(exc), hint="the previous certificate stays")
                return None
            self._stamp = stamp
            self._failed = None
            log.info("tls_certificate_reloaded", cert_file=self._tls.cert_file)
            return config


# Clients --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClientTLS:
    """How a client dials: plaintext, or TLS with a CA, a client certificate and a server name."""

    enabled: bool = False
    #: The CA certificate(s) that sign the servers' certificates; "": the system's CA certificates.
    ca_file: str = ""
    #: The client certificate and key presented to servers that require one (mTLS).
    cert_file: str = ""
    key_file: str = ""
    #: The name the server's certificate must carry, when the dialled address does not (an IP, a proxy).
    server_name: str = ""

    @classmethod
    def create(
        cls,
        *,
        tls: bool = False,
        ca_file: str = "",
        cert_file: str = "",
        key_file: str = "",
        server_name: str = "",
        cert_var: str = "CONVEYOR_TLS_CLIENT_CERT_FILE",
        key_var: str = "CONVEYOR_TLS_CLIENT_KEY_FILE",
        ca_var: str = "CONVEYOR_TLS_CA_FILE",
    ) -> ClientTLS:
        """A checked ClientTLS; TLS is on when ``tls`` or any file or name is given."""
        if bool(cert_file) != bool(key_file):
            given, missing = (cert_var, key_var) if cert_file else (key_var, cert_var)
            raise TLSConfigError(f"{given} is set but {missing} is not: a client certificate needs its key")
        enabled = tls or bool(ca_file or cert_file or server_name)
        client = cls(enabled, ca_file, cert_file, key_file, server_name)
        if enabled:
            client.load(ca_var=ca_var, cert_var=cert_var, key_var=key_var)
        return client

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ClientTLS:
        """The client TLS the environment asks for (plaintext when it asks for none), checked."""
        env = os.environ if env is None else env
        return cls.create(
            tls=_flag(env, "CONVEYOR_TLS"),
            ca_file=env.get("CONVEYOR_TLS_CA_FILE", ""),
            cert_file=env.get("CONVEYOR_TLS_CLIENT_CERT_FILE", ""),
            key_file=env.get("CONVEYOR_TLS_CLIENT_KEY_FILE", ""),
            server_name=env.get("CONVEYOR_TLS_SERVER_NAME", ""),
        )

    def _paths(self) -> list[str]:
        return [p for p in (self.ca_file, self.cert_file, self.key_file) if p]

    def load(
        self,
        *,
        ca_var: str = "CONVEYOR_TLS_CA_FILE",
        cert_var: str = "CONVEYOR_TLS_CLIENT_CERT_FILE",
        key_var: str = "CONVEYOR_TLS_CLIENT_KEY_FILE",
    ) -> grpc.ChannelCredentials:
        """Channel credentials from the current files; TLSConfigError if they are wrong."""
        roots = _check_ca(self.ca_file, ca_var) if self.ca_file else system_roots()
        cert = key = None
        if self.cert_file:
            cert, key = _check_pair(self.cert_file, self.key_file, cert_var, key_var)
        return grpc.ssl_channel_credentials(root_certificates=roots, private_key=key, certificate_chain=cert)

    def options(self) -> list[tuple[str, Any]]:
        """Channel options: the server name to check the certificate against, when overridden."""
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []

    def dial(
        self,
        addr: str,
        options: Sequence[tuple[str, Any]] | None = None,
        interceptors: Sequence[grpc.aio.ClientInterceptor] | None = None,
    ) -> grpc.aio.Channel:
        """A channel to ``addr``: plaintext, TLS, or TLS that dials again when its files change."""
        if not self.enabled:
            return grpc.aio.insecure_channel(addr, options=options, interceptors=interceptors)
        if not self._paths():
            return grpc.aio.secure_channel(
                addr, self.load(), options=[*(options or ()), *self.options()], interceptors=interceptors
            )
        return ReloadingChannel(addr, self, options, interceptors)


def system_roots() -> bytes | None:
    """The system's CA certificates (PEM), or None to let gRPC use the roots it ships."""
    paths = ssl.get_default_verify_paths()
    for candidate in (os.environ.get(paths.openssl_cafile_env or "SSL_CERT_FILE"), paths.cafile, paths.openssl_cafile):
        if candidate and os.path.isfile(candidate):
            try:
                return Path(candidate).read_bytes()
            except OSError:
                continue
    return None


class _Reloading:
    """A multi-callable that sends each call through the channel's current generation."""

    def __init__(self, owner: ReloadingChannel, kind: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._owner = owner
        self._kind = kind
        self._args = args
        self._kwargs = kwargs
        self._generation = -1
        self._inner: Any = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        channel, generation = self._owner._current()
        if generation != self._generation:
            self._inner = getattr(channel, self._kind)(*self._args, **self._kwargs)
            self._generation = generation
        return self._inner(*args, **kwargs)


class _UnaryUnary(_Reloading, grpc.aio.UnaryUnaryMultiCallable):  # type: ignore[type-arg]
    pass


class _UnaryStream(_Reloading, grpc.aio.UnaryStreamMultiCallable):  # type: ignore[type-arg]
    pass


class _StreamUnary(_Reloading, grpc.aio.StreamUnaryMultiCallable):  # type: ignore[type-arg]
    pass


class _StreamStream(_Reloading, grpc.aio.StreamStreamMultiCallable):  # type: ignore[type-arg]
    pass


class ReloadingChannel(grpc.aio.Channel):
    """A TLS channel that dials again, for its next calls, when its CA or client certificate files change.

    Calls already running (a Watch stream) stay on the channel they started on; the channels
    replaced are closed with this one. Files that change into something unusable (a certificate
    written before its key) keep the current channel until they load cleanly.
    """

    def __init__(
        self,
        addr: str,
        tls: ClientTLS,
        options: Sequence[tuple[str, Any]] | None = None,
        interceptors: Sequence[grpc.aio.ClientInterceptor] | None = None,
        *,
        check_every_s: float = CLIENT_RELOAD_CHECK_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._addr = addr
        self._tls = tls
        self._options = [*(options or ()), *tls.options()]
        self._interceptors = list(interceptors) if interceptors else None
        self._check_every_s = check_every_s
        self._clock = clock
        self._stamp = _stamp(tls._paths())
        self._failed: tuple[tuple[int, int, int], ...] | None = None
        self._channel = self._dial(tls.load())
        self._retired: list[grpc.aio.Channel] = []
        self._generation = 0
        self._next_check = clock() + check_every_s

    def _dial(self, credentials: grpc.ChannelCredentials) -> grpc.aio.Channel:
        return grpc.aio.secure_channel(self._addr, credentials, options=self._options, interceptors=self._interceptors)

    @property
    def generation(self) -> int:
        """How many times this channel dialled again."""
        return self._generation

    def _current(self) -> tuple[grpc.aio.Channel, int]:
        now = self._clock()
        if now >= self._next_check:
            self._next_check = now + self._check_every_s
            self._reload_if_changed()
        return self._channel, self._generation

    def _reload_if_changed(self) -> None:
        stamp = _stamp(self._tls._paths())
        if stamp == self._stamp:
            return
        try:
            credentials = self._tls.load()
        except TLSConfigError as exc:
            if stamp != self._failed:
                self._failed = stamp
                log.error("tls_client_files_not_reloaded", addr=self._addr, error=str(exc))
            return
        self._stamp = stamp
        self._failed = None
        self._retired.append(self._channel)
        self._channel = self._dial(credentials)
        self._generation += 1
        log.info("tls_client_redialled", addr=self._addr)

    def unary_unary(
        self,
        method: str,
        request_serializer: Any = None,
        response_deserializer: Any = None,
        _registered_method: bool | None = False,
    ) -> Any:
        return _UnaryUnary(self, "unary_unary", (method, request_serializer, response_deserializer), {})

    def unary_stream(
        self,
        method: str,
        request_serializer: Any = None,
        response_deserializer: Any = None,
        _registered_method: bool | None = False,
    ) -> Any:
        return _UnaryStream(self, "unary_stream", (method, request_serializer, response_deserializer), {})

    def stream_unary(
        self,
        method: str,
        request_serializer: Any = None,
        response_deserializer: Any = None,
        _registered_method: bool | None = False,
    ) -> Any:
        return _StreamUnary(self, "stream_unary", (method, request_serializer, response_deserializer), {})

    def stream_stream(
        self,
        method: str,
        request_serializer: Any = None,
        response_deserializer: Any = None,
        _registered_method: bool | None = False,
    ) -> Any:
        return _StreamStream(self, "stream_stream", (method, request_serializer, response_deserializer), {})

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        return self._current()[0].get_state(try_to_connect)

    async def wait_for_state_change(self, last_observed_state: grpc.ChannelConnectivity) -> None:
        await self._channel.wait_for_state_change(last_observed_state)

    async def channel_ready(self) -> None:
        await self._current()[0].channel_ready()

    async def close(self, grace: float | None = None) -> None:
        for channel in [*self._retired, self._channel]:
            await channel.close(grace)
        self._retired.clear()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc_val: BaseException | None, exc_tb: TracebackType | None
    ) -> bool | None:
        await self.close()
        return None
