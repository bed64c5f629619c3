"""The producer's idle-queue settings: defaults, and an idle time never shorter than the registration cache."""

from __future__ import annotations

import pytest

from conveyor.common.queue_registry import REGISTRATION_TTL_S
from conveyor.common.settings import ProducerSettings, SettingsError


def test_defaults() -> None:
    settings = ProducerSettings.from_env({})
    assert (settings.queue_idle_s, settings.queue_sweep_s) == (3600.0, 60.0)
    assert settings.queue_idle_s > REGISTRATION_TTL_S


def test_values_from_the_environment() -> None:
    settings = ProducerSettings.from_env({"CONVEYOR_QUEUE_IDLE_SECONDS": "600", "CONVEYOR_QUEUE_SWEEP_SECONDS": "5"})
    assert (settings.queue_idle_s, settings.queue_sweep_s) == (600.0, 5.0)


@pytest.mark.parametrize(
    ("name", "value"), [("CONVEYOR_QUEUE_IDLE_SECONDS", "30"), ("CONVEYOR_QUEUE_SWEEP_SECONDS", "0")]
)
def test_too_small_values_are_refused(name: str, value: str) -> None:
    with pytest.raises(SettingsError, match=name):
        ProducerSettings.from_env({name: value})
