"""WhoAmI on a producer that checks no tokens, and the dashboard's sign-in refusing to pretend against it."""

from __future__ import annotations

from conveyor.common.client import ConveyorClient
from conveyor.dashboard.app import create_app
from conveyor.dashboard.login import LOGIN_COOKIE, LoginSettings
from conveyor.v1 import admin_service_pb2
from tests.integration.conftest import Producer
from tests.unit.dashboard.test_login import SECRET, call


async def test_without_tokens_whoami_says_so_and_the_caller_may_do_everything(producer: Producer) -> None:
    me = await producer.admin.WhoAmI(admin_service_pb2.WhoAmIRequest())
    assert me == admin_service_pb2.WhoAmIResponse(role=admin_service_pb2.ROLE_ADMIN, authentication=False)


async def test_the_dashboard_refuses_a_sign_in_that_would_protect_nothing(producer: Producer) -> None:
    async with ConveyorClient(producer.addr, producer.addr, coalesce=False, token="", per_call_token=True) as client:
        app = create_app(client, login=LoginSettings(secret=SECRET))
        status, headers, _ = await call(app, "GET", "/login")
        nonce = headers["set-cookie"].split(";")[0].split("=", 1)[1]
        status, headers, body = await call(
            app,
            "POST",
            "/login",
            headers={"content-type": "application/x-www-form-urlencoded"},
            cookies={LOGIN_COOKIE: nonce},
            body=f"csrf={nonce}&token=anything&next=/".encode(),
        )
    assert status == 409
    assert b"The services check no tokens" in body
    assert "conveyor_session" not in headers.get("set-cookie", "")
