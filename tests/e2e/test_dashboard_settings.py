"""The dashboard's settings from the environment (no servers needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from conveyor.dashboard.settings import DashboardSettings, find_chart_js


def test_defaults_reach_make_up() -> None:
    s = DashboardSettings.from_env({})
    assert (s.host, s.port) == ("127.0.0.1", 8080)
    assert (s.producer_addr, s.results_addr) == ("127.0.0.1:50051", "127.0.0.1:50052")
    assert s.read_only is False


def test_read_only_and_addresses_come_from_the_environment() -> None:
    s = DashboardSettings.from_env(
        {
            "CONVEYOR_DASHBOARD_ADDR": "0.0.0.0:9000",
            "CONVEYOR_DASHBOARD_READ_ONLY": "1",
            "CONVEYOR_PRODUCER_ADDR": "producer:1",
            "CONVEYOR_RESULTS_ADDR": "results:2",
        }
    )
    assert (s.host, s.port, s.read_only, s.producer_addr, s.results_addr) == (
        "0.0.0.0", 9000, True, "producer:1", "results:2"
    )  # fmt: skip


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("CONVEYOR_DASHBOARD_ADDR", "8080"),
        ("CONVEYOR_DASHBOARD_ADDR", "host:http"),
        ("CONVEYOR_DASHBOARD_ADDR", "host:70000"),
        ("CONVEYOR_DASHBOARD_READ_ONLY", "maybe"),
    ],
)
def test_a_bad_setting_names_the_variable(name: str, value: str) -> None:
    with pytest.raises(ValueError, match=name):
        DashboardSettings.from_env({name: value})


def test_chart_js_is_found_in_the_projects_node_modules() -> None:
    found = find_chart_js(Path(__file__).resolve().parent)
    assert found is not None and found.name == "chart.umd.min.js" and found.stat().st_size > 100_000
