"""The dashboard's settings, from the environment."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from conveyor.common.auth import presented_token
from conveyor.dashboard.login import LoginSettings

CHART_JS = Path("chart.js") / "dist" / "chart.umd.min.js"


def find_chart_js(start: Path) -> Path | None:
    """The Chart.js bundle that `npm ci` put in the nearest node_modules above ``start``."""
    for folder in (start, *start.parents):
        candidate = folder / "node_modules" / CHART_JS
        if candidate.is_file():
            return candidate
    return None


@dataclass(frozen=True)
class DashboardSettings:
    host: str
    port: int
    producer_addr: str
    results_addr: str
    read_only: bool
    assets: Path | None
    log_level: str
    log_format: str
    #: The token the dashboard presents to the gRPC APIs (CONVEYOR_TOKEN or CONVEYOR_TOKEN_FILE),
    #: when they check tokens.
    token: str = ""
    #: Each person signs in with their own token (CONVEYOR_DASHBOARD_LOGIN=1); None: the one token above.
    login: LoginSettings | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> DashboardSettings:
        e = os.environ if env is None else env
        addr = e.get("CONVEYOR_DASHBOARD_ADDR", "127.0.0.1:8080")
        host, sep, port = addr.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"CONVEYOR_DASHBOARD_ADDR must be host:port, got {addr!r}")
        flag = e.get("CONVEYOR_DASHBOARD_READ_ONLY", "0").strip().lower()
        if flag not in ("", "0", "1", "true", "false", "yes", "no"):
            raise ValueError(f"CONVEYOR_DASHBOARD_READ_ONLY must be 0 or 1, got {flag!r}")
        assets = e.get("CONVEYOR_DASHBOARD_CHART_JS")
        return cls(
            host=host.strip("[]"),
            port=int(port),
            producer_addr=e.get("CONVEYOR_PRODUCER_ADDR", "127.0.0.1:50051"),
            results_addr=e.get("CONVEYOR_RESULTS_ADDR", "127.0.0.1:50052"),
            read_only=flag in ("1", "true", "yes"),
            assets=Path(assets) if assets else find_chart_js(Path(__file__).resolve().parent),
            log_level=e.get("CONVEYOR_LOG_LEVEL", "info"),
            log_format=e.get("CONVEYOR_LOG_FORMAT", "auto"),
            token=presented_token(e),
            login=LoginSettings.from_env(e),
        )
