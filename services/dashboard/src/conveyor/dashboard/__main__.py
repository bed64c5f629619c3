"""Dashboard process: `python -m conveyor.dashboard`. Wiring only."""

from __future__ import annotations

import asyncio
import sys

import uvicorn

from conveyor.common import crypto, logs
from conveyor.common.client import ConveyorClient
from conveyor.dashboard.app import create_app
from conveyor.dashboard.settings import DashboardSettings


async def run() -> None:
    settings = DashboardSettings.from_env()
    # The keyring (ADR 0025): a bad one stops the start with one line saying what is wrong (exit 78).
    crypto.configure_from_env()
    logs.configure(service="dashboard", level=settings.log_level, fmt=settings.log_format)
    log = logs.get_logger("conveyor.dashboard")
    client = ConveyorClient(settings.producer_addr, settings.results_addr, coalesce=False, token=settings.token)
    app = create_app(client, read_only=settings.read_only, chart_js=settings.assets)
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
        charts=settings.assets is not None,
    )
    await uvicorn.Server(config).serve()


def main() -> None:
    try:
        asyncio.run(run())
    except crypto.KeyringError as exc:
        sys.stderr.write(f"error: {exc}\n")
        raise SystemExit(78) from None


if __name__ == "__main__":
    main()
