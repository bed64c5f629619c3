"""Bearer tokens with roles, checked on every RPC by the server interceptor.

A caller sends ``authorization: Bearer <token>``. The token file (CONVEYOR_AUTH_TOKENS_FILE)
holds only SHA-256 digests of tokens, each with a name, a role and optionally the queues it is
limited to::

    [[tokens]]
    name = "billing-service"
    role = "producer"                      # producer | reader | admin
    sha256 = "5e8f..."                     # conveyor token new --name ... prints this entry
    queues = ["invoices", "receipts"]      # optional: only these queues

Roles: ``producer`` enqueues and watches (and reads its jobs back with ProducerService.GetJob);
``reader`` gets, lists, watches and reads stats; ``admin`` may call everything. Health and
reflection stay open (probes and grpcurl need them). A method missing from ``ACCESS`` is
admin-only: a new RPC is closed until someone decides who may call it.

The file is re-read when it changes (checked at most once a second, on a call), so tokens are
added and revoked without a restart; a file that stops parsing keeps the tokens last read.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import os
import secrets
import threading
import time
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import grpc
import structlog
from google.protobuf.message import Message

from conveyor.common.errors import PermissionDenied, Unauthenticated
from conveyor.common.ids import parse_job_id
from conveyor.common.tls import ClientTLS

log = structlog.get_logger("conveyor.auth")

TOKEN_PREFIX = "cvy_"
#: How often (seconds) a call may stat the token file to see whether it changed.
RELOAD_CHECK_S = 1.0


class Role(Enum):
    PRODUCER = "producer"
    READER = "reader"
    ADMIN = "admin"


_P, _R = Role.PRODUCER, Role.READER

#: Which roles (besides admin, who may call everything) may call each method.
ACCESS: dict[str, frozenset[Role]] = {
    f"/conveyor.v1.{service}/{method}": frozenset(roles)
    for service, methods in {
        "ProducerService": {
            "Enqueue": {_P},
            "EnqueueBatch": {_P},
            "Watch": {_P, _R},
            "WatchQueue": {_P, _R},
            "GetJob": {_P, _R},
            "CancelJob": set(),
        },
        "ResultsService": {
            "GetJob": {_R},
            "ListJobs": {_R},
            "ListJobEvents": {_R},
            "GetFinishedStats": {_R},
            "GetJobSeries": {_R},
            "ListSetAside": {_R},
            "ReplaySetAside": set(),
            "DiscardSetAside": set(),
            "DeleteJobs": set(),
            "ReEncryptJobs": set(),
        },
        "AdminService": {
            "GetLimits": {_R},
            "ListDeadLetters": {_R},
            "GetQueueStats": {_R},
            "ListQueues": {_R},
            "ListWorkers": {_R},
            "ReEncrypt": set(),
            "WhoAmI": {_P, _R},
            "PauseQueue": set(),
            "ResumeQueue": set(),
            "SetRateLimit": set(),
            "ClearRateLimit": set(),
            "SetConcurrencyLimit": set(),
            "ClearConcurrencyLimit": set(),
            "BackOff": set(),
            "ClearBackOff": set(),
            "SetDefaultPriority": set(),
            "RetryDeadLetters": set(),
            "PurgeDeadLetters": set(),
        },
        "ScheduleService": {
            "GetSchedule": {_R},
            "ListSchedules": {_R},
            "CreateSchedule": set(),
            "UpdateSchedule": set(),
            "DeleteSchedule": set(),
            "PauseSchedule": set(),
            "ResumeSchedule": set(),
        },
    }.items()
    for method, roles in methods.items()
}

#: Methods any valid token may call whatever queues it is limited to: they name no queue and
#: read nothing of any queue (WhoAmI answers about the token itself).
QUEUE_FREE = frozenset({"/conveyor.v1.AdminService/WhoAmI"})

#: The token of the call being served (set by the server interceptor once it is identified; None
#: when the service checks no tokens). Each RPC runs in its own task, so this is per call.
CALLER: contextvars.ContextVar[Token | None] = contextvars.ContextVar("conveyor_caller", default=None)

#: Services every caller may use without a token.
OPEN_SERVICES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)

#: Request fields that name the queue(s) a call touches.
_QUEUE_FIELDS = frozenset({"queue", "queues"})
_JOB_ID_FIELDS = frozenset({"job_id", "job_ids"})


class TokenFileError(ValueError):
    """The token file cannot be read or does not describe tokens."""


@dataclass(frozen=True)
class Token:
    name: str
    role: Role
    digest: bytes
    #: Empty: every queue.
    queues: frozenset[str] = frozenset()


def presented_token(env: Mapping[str, str] | None = None) -> str:
    """The token this process presents: ``CONVEYOR_TOKEN``, or the file ``CONVEYOR_TOKEN_FILE`` names.

    The file form is for mounted secrets (a Kubernetes Secret volume, a compose secret), which
    keep the token out of the environment and out of ``ps``. TokenFileError when both are set
    (which one was meant?) or when the file cannot be read or is empty.
    """
    e = os.environ if env is None else env
    value, path = e.get("CONVEYOR_TOKEN", ""), e.get("CONVEYOR_TOKEN_FILE", "")
    if value and path:
        raise TokenFileError("CONVEYOR_TOKEN and CONVEYOR_TOKEN_FILE are both set: keep one")
    if not path:
        return value.strip()
    try:
        token = Path(path).read_text().strip()
    except OSError as exc:
        raise TokenFileError(f"CONVEYOR_TOKEN_FILE={path}: cannot read it ({exc.strerror})") from None
    if not token:
        raise TokenFileError(f"CONVEYOR_TOKEN_FILE={path}: the file is empty")
    return token


def digest_of(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def new_token() -> str:
    """A fresh random token (256 bits)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def entry_for(token: str, name: str, role: Role, queues: Sequence[str] = ()) -> str:
    """The token file entry (TOML) that admits ``token``: its digest, never the token itself."""
    lines = ["[[tokens]]", f'name = "{name}"', f'role = "{role.value}"', f'sha256 = "{digest_of(token).hex()}"']
    if queues:
        lines.append("queues = [" + ", ".join(f'"{q}"' for q in queues) + "]")
    return "\n".join(lines) + "\n"


def parse_tokens(text: str, source: str = "token file") -> list[Token]:
    """The tokens a token file describes; TokenFileError naming the entry that is wrong."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise TokenFileError(f"{source}: not valid TOML ({exc})") from None
    entries = doc.get("tokens", [])
    if not isinstance(entries, list):
        raise TokenFileError(f"{source}: `tokens` must be an array of tables ([[tokens]])")
    tokens: list[Token] = []
    names: set[str] = set()
    for i, entry in enumerate(entries):
        where = f"{source}: tokens[{i}]"
        if not isinstance(entry, dict):
            raise TokenFileError(f"{where}: must be a table")
        unknown = set(entry) - {"name", "role", "sha256", "queues"}
        if unknown:
            raise TokenFileError(f"{where}: unknown key(s) {sorted(unknown)}")
        name = entry.get("name")
        if not isinstance(name, str) or not name:
            raise TokenFileError(f"{where}: `name` must be a non-empty string")
        if name in names:
            raise TokenFileError(f"{where}: name {name!r} is used twice")
        names.add(name)
        try:
            role = Role(entry.get("role"))
        except ValueError:
            raise TokenFileError(f"{where} ({name}): `role` must be one of producer, reader, admin") from None
        hexdigest = entry.get("sha256")
        try:
            digest = bytes.fromhex(hexdigest) if isinstance(hexdigest, str) else b""
        except ValueError:
            digest = b""
        if len(digest) != 32:
            raise TokenFileError(f"{where} ({name}): `sha256` must be 64 hex digits (the token's SHA-256)")
        queues = entry.get("queues", [])
        if not isinstance(queues, list) or not all(isinstance(q, str) and q for q in queues):
            raise TokenFileError(f"{where} ({name}): `queues` must be a list of queue names")
        tokens.append(Token(name=name, role=role, digest=digest, queues=frozenset(queues)))
    return tokens


class TokenFile:
    """The tokens of a file, re-read when the file changes."""

    def __init__(self, path: str | os.PathLike[str], *, check_every_s: float = RELOAD_CHECK_S) -> None:
        self._path = Path(path)
        self._check_every_s = check_every_s
        self._lock = threading.Lock()
        self._stamp = self._stat()
        # Refuse to start on an unreadable or wrong file: better than a server nobody can call.
        self._tokens = parse_tokens(self._read(), str(self._path))
        self._next_check = time.monotonic() + check_every_s

    @property
    def path(self) -> Path:
        return self._path

    def tokens(self) -> list[Token]:
        now = time.monotonic()
        if now >= self._next_check:
            with self._lock:
                if now >= self._next_check:
                    self._next_check = now + self._check_every_s
                    self._reload_if_changed()
        return self._tokens

    def _stat(self) -> tuple[int, int, int]:
        try:
            st = self._path.stat()
        except OSError as exc:
            raise TokenFileError(f"{self._path}: cannot read the token file ({exc.strerror})") from None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _read(self) -> str:
        try:
            return self._path.read_text()
        except OSError as exc:
            raise TokenFileError(f"{self._path}: cannot read the token file ({exc.strerror})") from None

    def _reload_if_changed(self) -> None:
        try:
            stamp = self._stat()
            if stamp == self._stamp:
                return
            tokens = parse_tokens(self._read(), str(self._path))
        except TokenFileError as exc:
            # Keep serving with the tokens last read: a bad edit must not lock every caller out.
            log.error("token_file_not_reloaded", error=str(exc), kept=len(self._tokens))
            return
        self._stamp = stamp
        self._tokens = tokens
        log.info("token_file_reloaded", path=str(self._path), tokens=len(tokens))


class Authorizer:
    """Decides whether a call may proceed: who the caller is, and whether its role and queues allow it."""

    def __init__(self, tokens: TokenFile) -> None:
        self._tokens = tokens

    @classmethod
    def from_path(cls, path: str) -> Authorizer | None:
        """An authorizer over the token file at ``path``, or None when ``path`` is empty (auth off)."""
        return cls(TokenFile(path)) if path else None

    def check(self, method: str, request: Any, metadata: Iterable[tuple[str, Any]] | None) -> Token | None:
        """The caller's token, or Unauthenticated / PermissionDenied. None for the open services."""
        if method.startswith(OPEN_SERVICES):
            return None
        token = self.identify(metadata)
        self.authorize(token, method, request)
        return token

    def authorize(self, token: Token, method: str, request: Any) -> None:
        """PermissionDenied unless ``token``'s role and queues allow calling ``method`` with ``request``."""
        allowed = ACCESS.get(method, frozenset())
        if token.role is not Role.ADMIN and token.role not in allowed:
            needs = " or ".join(sorted(r.value for r in (*allowed, Role.ADMIN)))
            raise PermissionDenied(
                f"token {token.name!r} has role {token.role.value}; {method.rsplit('/', 1)[-1]} needs {needs}",
                reason="ROLE",
                metadata={"token": token.name, "role": token.role.value, "needs": needs},
            )
        if token.queues and method not in QUEUE_FREE:
            named = queues_named(request)
            if not named:
                raise PermissionDenied(
                    f"token {token.name!r} is limited to queues {sorted(token.queues)}; this call names no "
                    "queue (it would cover every queue): name one",
                    reason="QUEUE",
                    metadata={"token": token.name, "queues": ",".join(sorted(token.queues))},
                )
            outside = sorted(named - token.queues)
            if outside:
                raise PermissionDenied(
                    f"token {token.name!r} is limited to queues {sorted(token.queues)}; not allowed: {outside}",
                    reason="QUEUE",
                    metadata={"token": token.name, "queues": ",".join(sorted(token.queues))},
                )

    def identify(self, metadata: Iterable[tuple[str, Any]] | None) -> Token:
        """The token the caller presents, or Unauthenticated."""
        header = None
        for key, value in metadata or ():
            if key == "authorization":
                header = value.decode() if isinstance(value, bytes) else str(value)
                break
        if header is None:
            raise Unauthenticated("missing credentials: send the metadata `authorization: Bearer <token>`")
        scheme, _, presented = header.strip().partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            raise Unauthenticated("malformed authorization metadata: expected `Bearer <token>`")
        digest = digest_of(presented.strip())
        found: Token | None = None
        # Every entry is compared, in constant time, whatever matches: no timing says how close a guess was.
        for token in self._tokens.tokens():
            if hmac.compare_digest(token.digest, digest) and found is None:
                found = token
        if found is None:
            raise Unauthenticated("unknown or revoked token")
        return found


def queues_named(request: Any) -> set[str]:
    """The queues a request names: its queue fields and the queues inside its job ids, at any depth."""
    found: set[str] = set()
    if isinstance(request, Message):
        _collect(request, found, depth=0)
    return found


def _collect(message: Message, found: set[str], depth: int) -> None:
    for field, value in message.ListFields():
        name = field.name
        values = list(value) if field.is_repeated else [value]
        if name in _QUEUE_FIELDS and field.type == field.TYPE_STRING:
            found.update(v for v in values if v)
        elif name in _JOB_ID_FIELDS and field.type == field.TYPE_STRING:
            for job_id in values:
                parsed = parse_job_id(job_id)
                # An id that does not parse names no queue we could allow; keep it so the check fails.
                found.add(parsed[0] if parsed else job_id)
        elif field.type == field.TYPE_MESSAGE and depth < 3:
            if field.message_type is None or field.message_type.GetOptions().map_entry:
                continue  # maps (labels) name no queue
            for item in values:
                _collect(item, found, depth + 1)


#: A token that replaces the channel's own for the calls made in this context (a channel dialled
#: with ``per_call=True``): the dashboard serves each signed-in person with that person's token
#: over one shared channel. None: the channel's token; "": no token.
CALL_TOKEN: contextvars.ContextVar[str | None] = contextvars.ContextVar("conveyor_call_token", default=None)


class _Bearer:
    """Adds ``authorization: Bearer <token>`` to a call's metadata."""

    def __init__(self, token: str) -> None:
        self._value = f"Bearer {token}" if token else ""

    def _with_token(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        override = CALL_TOKEN.get()
        value = self._value if override is None else (f"Bearer {override}" if override else "")
        if not value:
            return details
        metadata = grpc.aio.Metadata(*tuple(details.metadata or ()))
        metadata.add("authorization", value)
        return grpc.aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )


# One class per kind of call: a grpc.aio channel files each interceptor under the first kind it
# implements only (an if/elif chain), so one class of all four would leave streams without the token.
class _BearerUnaryUnary(_Bearer, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await continuation(self._with_token(client_call_details), request)


class _BearerUnaryStream(_Bearer, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await continuation(self._with_token(client_call_details), request)


class _BearerStreamUnary(_Bearer, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Any, client_call_details: Any, request_iterator: Any) -> Any:
        return await continuation(self._with_token(client_call_details), request_iterator)


class _BearerStreamStream(_Bearer, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation: Any, client_call_details: Any, request_iterator: Any) -> Any:
        return await continuation(self._with_token(client_call_details), request_iterator)


def bearer_interceptors(token: str) -> list[grpc.aio.ClientInterceptor]:
    """Interceptors that present ``token`` on every kind of call of a channel."""
    kinds = (_BearerUnaryUnary, _BearerUnaryStream, _BearerStreamUnary, _BearerStreamStream)
    return [kind(token) for kind in kinds]


def dial(
    addr: str,
    token: str = "",
    options: Sequence[tuple[str, Any]] | None = None,
    tls: ClientTLS | None = None,
    *,
    per_call: bool = False,
) -> grpc.aio.Channel:
    """A channel to ``addr`` that presents ``token`` on every call ("": no token).

    Args:
        addr: "host:port".
        token: Bearer token, sent through the interceptors (over the TLS channel when TLS is on).
        options: gRPC channel options.
        tls: How to dial (ADR 0024); None: as the environment says (CONVEYOR_TLS, CONVEYOR_TLS_CA_FILE,
            CONVEYOR_TLS_CLIENT_CERT_FILE / _KEY_FILE, CONVEYOR_TLS_SERVER_NAME), plaintext when it
            says nothing. A TLS channel whose certificate files change dials again for its next calls.
        per_call: A call made while :data:`CALL_TOKEN` is set presents that token instead.

    Raises:
        TLSConfigError: A TLS file is missing, unreadable or not what it should be.
    """
    interceptors = bearer_interceptors(token) if token or per_call else None
    if tls is None:
        tls = ClientTLS.from_env()
    return tls.dial(addr, options=options, interceptors=interceptors)
