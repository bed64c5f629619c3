"""Dashboard process: `python -m conveyor.dashboard`. Wiring only."""

from __future__ import annotations

import asyncio
import sys

import uvicorn

from conveyor.common import crypto, logs
from conveyor.common.client import ConveyorClient
from conveyor.common.server import EXIT_BAD_SETTING
from conveyor.common.tls import TLSConfigError
from conveyor.dashboard.app import create_app
from conveyor.dashboard.settings import DashboardSettings


async def run(settings: DashboardSettings) -> None:
    logs.configure(service="dashboard", level=settings.log_level, fmt=settings.log_format)
    log = logs.get_logger("conveyor.dashboard")
    # With the login on, every call presents the signed-in person's token (auth.CALL_TOKEN), not CONVEYOR_TOKEN.
    client = ConveyorClient(
        settings.producer_addr,
        settings.results_addr,
        coalesce=False,
        token="" if settings.login else settings.token,
        per_call_token=settings.login is not None,
    )
    app = create_app(client, read_only=settings.read_only, chart_js=settings.assets, login=settings.login)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        lifespan="on",
        # Open live-progress streams never end by themselves: give them 5 s on SIGTERM, then close them.
        timeout_graceful_shutdown=5,
    )
    log.info(
        "dashboard listening",
        url=f"http://{settings.host}:{settings.port}/",
        producer=settings.producer_addr,
        results=settings.results_addr,
        read_only=settings.read_only,
        login=settings.login is not None,
        charts=settings.assets is not None,
    )
    await uvicorn.Server(config).serve()


def main() -> None:
    try:
        settings = DashboardSettings.from_env()
        # The keyring (ADR 0025): a bad one stops the start with one line saying what is wrong (exit 78).
        crypto.configure_from_env()
    except (ValueError, crypto.KeyringError) as exc:
        # A configuration mistake: one line saying what to fix, no traceback.
        sys.stderr.write(f"error: {exc}\n")
        raise SystemExit(EXIT_BAD_SETTING) from None
    try:
        asyncio.run(run(settings))
    except TLSConfigError as exc:
        # CONVEYOR_TLS_* names a file that cannot be used: one line, the services' exit code (EX_CONFIG).
        sys.stderr.write(f"error: {exc}\n")
        raise SystemExit(EXIT_BAD_SETTING) from None


if __name__ == "__main__":
    main()
