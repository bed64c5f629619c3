"""logs.enabled_for: the hot path's guard agrees with the level configure() set."""

from __future__ import annotations

import logging

import pytest

from conveyor.common import logs


def test_enabled_for_follows_the_configured_level(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logs, "_level", logs._LEVELS["warning"])
    assert not logs.enabled_for(logging.DEBUG) and not logs.enabled_for(logging.INFO)
    assert logs.enabled_for(logging.WARNING) and logs.enabled_for(logging.ERROR)
    monkeypatch.setattr(logs, "_level", logs._LEVELS["debug"])
    assert logs.enabled_for(logging.DEBUG)
