"""The dashboard's sign-in: each person's token kept in a signed cookie, and a CSRF token per session.

With CONVEYOR_DASHBOARD_LOGIN=1 the dashboard asks each person for their own Conveyor token, checks
it with AdminService.WhoAmI, and keeps it, with the name and role WhoAmI gave and a random CSRF
token, in one cookie (HttpOnly, SameSite=Strict, Secure over HTTPS). The cookie is
``base64url(JSON) "." base64url(HMAC-SHA256(secret, base64url(JSON)))``: the dashboard holds no
session store, so any number of dashboards with the same secret serve the same people. A cookie
whose signature does not match, that does not parse, or whose ``exp`` has passed is no session.

Every POST then carries the session's CSRF token (the ``X-CSRF-Token`` header from the page's
``<meta name="csrf-token">``, or a ``csrf`` form field), compared in constant time. The login form,
which comes before any session, uses a double-submit token: a random value in a short-lived
cookie and the same value in the form.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from conveyor.common.settings import SettingsError

SESSION_COOKIE = "conveyor_session"
LOGIN_COOKIE = "conveyor_login"
CSRF_HEADER = "x-csrf-token"
#: The login form's double-submit token lives this long (seconds).
LOGIN_FORM_S = 3600
MIN_SECRET_BYTES = 32
DEFAULT_SESSION_HOURS = 12.0


@dataclass(frozen=True)
class Session:
    """A signed-in person: the token the dashboard presents for them, and what WhoAmI said of it."""

    token: str
    name: str
    #: producer, reader or admin.
    role: str
    queues: tuple[str, ...]
    #: The per-session CSRF token every POST must carry.
    csrf: str
    #: Unix time (s) after which the cookie is no session.
    expires: int

    @property
    def admin(self) -> bool:
        return self.role == "admin"


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class SessionSigner:
    """Issues and reads signed session cookies.

    Args:
        secret: At least 32 bytes (CONVEYOR_DASHBOARD_SECRET); every dashboard serving the same
            people needs the same one. Changing it signs everybody out.
        lifetime_s: How long a session lasts after sign-in (CONVEYOR_DASHBOARD_SESSION_HOURS).
    """

    def __init__(self, secret: bytes, lifetime_s: int) -> None:
        if len(secret) < MIN_SECRET_BYTES:
            raise ValueError(f"the session secret must be at least {MIN_SECRET_BYTES} bytes")
        # A key of its own for the cookies, should the same secret ever serve another purpose.
        self._key = hmac.new(secret, b"conveyor-dashboard-session-v1", hashlib.sha256).digest()
        self.lifetime_s = lifetime_s

    def _mac(self, body: str) -> str:
        return _b64(hmac.new(self._key, body.encode(), hashlib.sha256).digest())

    def issue(
        self, token: str, name: str, role: str, queues: tuple[str, ...] = (), now: float | None = None
    ) -> tuple[str, Session]:
        """A new session (with a fresh CSRF token) and its cookie value."""
        expires = int(now if now is not None else time.time()) + self.lifetime_s
        session = Session(token, name, role, tuple(queues), secrets.token_urlsafe(32), expires)
        doc = {"t": token, "n": name, "r": role, "q": list(queues), "c": session.csrf, "e": expires}
        body = _b64(json.dumps(doc, separators=(",", ":")).encode())
        return f"{body}.{self._mac(body)}", session

    def read(self, value: str | None, now: float | None = None) -> Session | None:
        """The session a cookie value holds, or None (missing, tampered with, malformed or expired)."""
        if not value or value.count(".") != 1:
            return None
        body, mac = value.split(".")
        if not hmac.compare_digest(mac.encode(), self._mac(body).encode()):
            return None
        try:
            doc = json.loads(_unb64(body))
            session = Session(
                token=str(doc["t"]),
                name=str(doc["n"]),
                role=str(doc["r"]),
                queues=tuple(str(q) for q in doc["q"]),
                csrf=str(doc["c"]),
                expires=int(doc["e"]),
            )
        except (ValueError, KeyError, TypeError, binascii.Error):
            return None
        if session.expires <= (now if now is not None else time.time()):
            return None
        return session


def csrf_ok(expected: str, presented: str | None) -> bool:
    """Whether ``presented`` is the CSRF token ``expected`` (constant time; an empty one never is)."""
    return bool(expected) and bool(presented) and hmac.compare_digest(expected.encode(), (presented or "").encode())


def safe_next(target: str | None) -> str:
    """Where to go after signing in: a path on this dashboard, never another site ("//evil", "http://")."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


@dataclass(frozen=True)
class LoginSettings:
    """CONVEYOR_DASHBOARD_LOGIN and what it needs."""

    secret: bytes
    session_hours: float = DEFAULT_SESSION_HOURS

    def signer(self) -> SessionSigner:
        return SessionSigner(self.secret, max(60, int(self.session_hours * 3600)))

    @classmethod
    def from_env(cls, e: Mapping[str, str]) -> LoginSettings | None:
        """None without CONVEYOR_DASHBOARD_LOGIN; SettingsError when the login is on but badly set."""
        flag = e.get("CONVEYOR_DASHBOARD_LOGIN", "0").strip().lower()
        if flag not in ("", "0", "1", "true", "false", "yes", "no"):
            raise SettingsError(f"CONVEYOR_DASHBOARD_LOGIN must be 0 or 1, got {flag!r}")
        if flag not in ("1", "true", "yes"):
            return None
        secret = e.get("CONVEYOR_DASHBOARD_SECRET", "")
        path = e.get("CONVEYOR_DASHBOARD_SECRET_FILE", "")
        if secret and path:
            raise SettingsError("set CONVEYOR_DASHBOARD_SECRET or CONVEYOR_DASHBOARD_SECRET_FILE, not both")
        if path:
            try:
                secret = Path(path).read_text().strip()
            except OSError as exc:
                raise SettingsError(f"CONVEYOR_DASHBOARD_SECRET_FILE: cannot read {path} ({exc.strerror})") from None
        if not secret:
            raise SettingsError(
                "CONVEYOR_DASHBOARD_LOGIN=1 needs CONVEYOR_DASHBOARD_SECRET or CONVEYOR_DASHBOARD_SECRET_FILE "
                '(make one with: python3 -c "import secrets; print(secrets.token_urlsafe(32))")'
            )
        if len(secret.encode()) < MIN_SECRET_BYTES:
            raise SettingsError(
                f"the dashboard secret must be at least {MIN_SECRET_BYTES} characters, got {len(secret.encode())}"
            )
        raw_hours = e.get("CONVEYOR_DASHBOARD_SESSION_HOURS", "")
        try:
            hours = float(raw_hours) if raw_hours.strip() else DEFAULT_SESSION_HOURS
        except ValueError:
            hours = -1.0
        if not 0 < hours <= 24 * 90:
            raise SettingsError(
                f"CONVEYOR_DASHBOARD_SESSION_HOURS must be a number of hours (0-2160], got {raw_hours!r}"
            )
        return cls(secret=secret.encode(), session_hours=hours)
