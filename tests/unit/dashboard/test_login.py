"""The dashboard sign-in: signed session cookies, CSRF tokens, its settings, and the guard before pages and POSTs.

The guard is driven through the ASGI app itself (no gRPC call is reached: every case here is
refused, redirected or answered before the dashboard would call a service).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from conveyor.common.client import ConveyorClient
from conveyor.common.settings import SettingsError
from conveyor.dashboard.app import create_app
from conveyor.dashboard.login import (
    LOGIN_COOKIE,
    SESSION_COOKIE,
    LoginSettings,
    SessionSigner,
    csrf_ok,
    safe_next,
)
from conveyor.dashboard.settings import DashboardSettings

SECRET = b"s" * 32


def test_a_cookie_reads_back_as_the_session_it_was_issued_for() -> None:
    signer = SessionSigner(SECRET, 3600)
    value, session = signer.issue("cvy_token", "ops", "admin", ("a", "b"), now=1000)
    read = signer.read(value, now=1001)
    assert read == session
    assert (read.token, read.name, read.role, read.queues, read.expires) == (
        "cvy_token",
        "ops",
        "admin",
        ("a", "b"),
        4600,
    )
    assert read.admin and len(read.csrf) >= 40
    # Each session gets its own CSRF token.
    assert signer.issue("cvy_token", "ops", "admin", now=1000)[1].csrf != session.csrf


def test_a_tampered_forged_malformed_or_expired_cookie_is_no_session() -> None:
    signer = SessionSigner(SECRET, 3600)
    value, _ = signer.issue("cvy_reader", "viewer", "reader", now=1000)
    body, mac = value.split(".")
    # The reader makes themself an admin: the signature no longer matches.
    doc = json.loads(__import__("base64").urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    doc["r"] = "admin"
    forged_body = __import__("base64").urlsafe_b64encode(json.dumps(doc).encode()).rstrip(b"=").decode()
    assert signer.read(f"{forged_body}.{mac}", now=1001) is None
    # Signed with another secret.
    other, _ = SessionSigner(b"t" * 32, 3600).issue("cvy_reader", "viewer", "admin", now=1000)
    assert signer.read(other, now=1001) is None
    for bad in ("", "no-dot", "a.b.c", f"{body}.", f".{mac}", f"{body}x.{mac}"):
        assert signer.read(bad, now=1001) is None, bad
    assert signer.read(value, now=4599) is not None
    assert signer.read(value, now=4600) is None  # expired


def test_a_short_secret_is_refused() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        SessionSigner(b"short", 60)


def test_csrf_tokens_compare_exactly_and_an_empty_one_never_matches() -> None:
    assert csrf_ok("abc", "abc")
    assert not csrf_ok("abc", "abd")
    assert not csrf_ok("abc", None)
    assert not csrf_ok("", "")


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("/jobs?state=FAILED", "/jobs?state=FAILED"),
        (None, "/"),
        ("", "/"),
        ("//evil.example/", "/"),
        ("https://evil.example/", "/"),
        ("/\\evil.example", "/"),
    ],
)
def test_after_signing_in_only_paths_of_this_dashboard_are_followed(target: str | None, expected: str) -> None:
    assert safe_next(target) == expected


def test_login_settings_from_the_environment(tmp_path: Path) -> None:
    assert LoginSettings.from_env({}) is None
    assert LoginSettings.from_env({"CONVEYOR_DASHBOARD_LOGIN": "0"}) is None
    on = {"CONVEYOR_DASHBOARD_LOGIN": "1"}
    with pytest.raises(SettingsError, match="needs CONVEYOR_DASHBOARD_SECRET"):
        LoginSettings.from_env(on)
    with pytest.raises(SettingsError, match="at least 32"):
        LoginSettings.from_env({**on, "CONVEYOR_DASHBOARD_SECRET": "short"})
    got = LoginSettings.from_env({**on, "CONVEYOR_DASHBOARD_SECRET": "x" * 32})
    assert got == LoginSettings(secret=b"x" * 32, session_hours=12.0)
    secret_file = tmp_path / "secret"
    secret_file.write_text("y" * 40 + "\n")
    got = LoginSettings.from_env(
        {**on, "CONVEYOR_DASHBOARD_SECRET_FILE": str(secret_file), "CONVEYOR_DASHBOARD_SESSION_HOURS": "2"}
    )
    assert got == LoginSettings(secret=b"y" * 40, session_hours=2.0)
    assert got.signer().lifetime_s == 7200
    with pytest.raises(SettingsError, match="cannot read"):
        LoginSettings.from_env({**on, "CONVEYOR_DASHBOARD_SECRET_FILE": str(tmp_path / "missing")})
    with pytest.raises(SettingsError, match="not both"):
        LoginSettings.from_env({**on, "CONVEYOR_DASHBOARD_SECRET": "x" * 32, "CONVEYOR_DASHBOARD_SECRET_FILE": "f"})
    with pytest.raises(SettingsError, match="SESSION_HOURS"):
        LoginSettings.from_env(
            {**on, "CONVEYOR_DASHBOARD_SECRET": "x" * 32, "CONVEYOR_DASHBOARD_SESSION_HOURS": "soon"}
        )
    with pytest.raises(SettingsError, match="must be 0 or 1"):
        LoginSettings.from_env({"CONVEYOR_DASHBOARD_LOGIN": "maybe"})
    assert DashboardSettings.from_env({**on, "CONVEYOR_DASHBOARD_SECRET": "x" * 32}).login is not None


# ---- the guard, through the ASGI app ----------------------------------------------------------------


async def call(
    app: Any,
    method: str,
    path: str,
    *,
    cookies: dict[str, str] | None = None,
    headers: dict[str, str] | None = None,
    body: bytes = b"",
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP request through the ASGI app: status, headers (last of each name; set-cookie joined), body."""
    raw_headers = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    if cookies:
        raw_headers.append((b"cookie", "; ".join(f"{k}={v}" for k, v in cookies.items()).encode()))
    path_only, _, query = path.partition("?")
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path_only,
        "raw_path": path_only.encode(),
        "query_string": query.encode(),
        "root_path": "",
        "headers": raw_headers,
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
        "state": {},
    }
    sent = [{"type": "http.request", "body": body, "more_body": False}]
    out: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return sent.pop(0) if sent else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        out.append(message)

    await app(scope, receive, send)
    start = next(m for m in out if m["type"] == "http.response.start")
    got: dict[str, str] = {}
    for k, v in start["headers"]:
        name = k.decode()
        got[name] = f"{got[name]}\n{v.decode()}" if name == "set-cookie" and name in got else v.decode()
    return start["status"], got, b"".join(m.get("body", b"") for m in out if m["type"] == "http.response.body")


@pytest.fixture
async def app() -> Any:
    # A client to nowhere: none of these cases may reach a service.
    client = ConveyorClient("127.0.0.1:9", "127.0.0.1:9", coalesce=False, token="", per_call_token=True)
    yield create_app(client, login=LoginSettings(secret=SECRET))
    await client.close()


def session_cookie(role: str) -> tuple[str, str]:
    value, session = SessionSigner(SECRET, 3600).issue("cvy_x", "someone", role)
    return value, session.csrf


async def test_without_a_session_pages_go_to_the_sign_in_page_and_posts_get_401(app: Any) -> None:
    status, headers, _ = await call(app, "GET", "/jobs?state=FAILED")
    assert status == 303
    assert headers["location"] == "/login?next=%2Fjobs%3Fstate%3DFAILED"
    status, _, body = await call(
        app, "POST", "/queues/q/pause", headers={"content-type": "application/json"}, body=b"{}"
    )
    assert status == 401
    assert json.loads(body) == {"code": "UNAUTHENTICATED", "error": "sign in first", "login": "/login"}
    # A forged cookie is no session either.
    status, _, _ = await call(app, "GET", "/", cookies={SESSION_COOKIE: "e30.forged"})
    assert status == 303
    # Open: health, static files and the sign-in page itself.
    assert (await call(app, "GET", "/healthz"))[0] == 200
    assert (await call(app, "GET", "/static/dashboard.js"))[0] == 200


async def test_the_sign_in_page_sets_a_double_submit_cookie_and_refuses_a_post_without_it(app: Any) -> None:
    status, headers, body = await call(app, "GET", "/login?next=/workers")
    assert status == 200
    cookie = headers["set-cookie"]
    assert cookie.startswith(f"{LOGIN_COOKIE}=") and "HttpOnly" in cookie and "SameSite=strict" in cookie
    nonce = cookie.split(";")[0].split("=", 1)[1]
    assert f'name="csrf" value="{nonce}"'.encode() in body
    assert b'name="next" value="/workers"' in body
    # A form posted from elsewhere has no (or another) nonce: refused before the token is even looked at.
    form = b"csrf=other&token=cvy_x&next=/"
    status, _, body = await call(
        app,
        "POST",
        "/login",
        headers={"content-type": "application/x-www-form-urlencoded"},
        cookies={LOGIN_COOKIE: nonce},
        body=form,
    )
    assert status == 403 and b"had expired" in body
    status, _, body = await call(
        app,
        "POST",
        "/login",
        headers={"content-type": "application/x-www-form-urlencoded"},
        cookies={LOGIN_COOKIE: nonce},
        body=f"csrf={nonce}&token=&next=/".encode(),
    )
    assert status == 400 and b"Enter your token" in body


async def test_a_post_needs_the_sessions_csrf_token_and_the_admin_role(app: Any) -> None:
    json_headers = {"content-type": "application/json"}
    value, _ = session_cookie("admin")
    for presented in ({}, {"x-csrf-token": "wrong"}):
        status, _, body = await call(
            app,
            "POST",
            "/queues/q/pause",
            cookies={SESSION_COOKIE: value},
            headers={**json_headers, **presented},
            body=b"{}",
        )
        assert status == 403, presented
        assert json.loads(body)["error"].startswith("missing or wrong CSRF token")
    reader, reader_csrf = session_cookie("reader")
    status, _, body = await call(
        app,
        "POST",
        "/queues/q/pause",
        cookies={SESSION_COOKIE: reader},
        headers={**json_headers, "x-csrf-token": reader_csrf},
        body=b"{}",
    )
    assert status == 403
    assert json.loads(body) == {
        "code": "PERMISSION_DENIED",
        "error": "signed in as someone (reader): only an admin may change anything",
    }


async def test_sign_out_needs_the_csrf_token_and_clears_the_cookie(app: Any) -> None:
    value, csrf = session_cookie("reader")
    form = {"content-type": "application/x-www-form-urlencoded"}
    status, _, _ = await call(app, "POST", "/logout", cookies={SESSION_COOKIE: value}, headers=form, body=b"csrf=nope")
    assert status == 403
    status, headers, _ = await call(
        app, "POST", "/logout", cookies={SESSION_COOKIE: value}, headers=form, body=f"csrf={csrf}".encode()
    )
    assert status == 303 and headers["location"] == "/login"
    assert headers["set-cookie"].startswith(f'{SESSION_COOKIE}=""') and "Max-Age=0" in headers["set-cookie"]
