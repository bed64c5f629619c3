"""The dev stack's restart delays: 1 s doubling to 30 s, back to 1 s after a process stayed up."""

from __future__ import annotations

import time

from conveyor.common.devstack.__main__ import RESTART_FIRST, RESTART_MAX, RESTART_RESET, Restarts


def test_delays_double_up_to_the_cap() -> None:
    restarts = Restarts()
    delays = []
    for _ in range(8):
        restarts.started_now()
        delays.append(restarts.schedule())
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    assert delays[0] == RESTART_FIRST and max(delays) == RESTART_MAX
    assert restarts.count == 8 and restarts.waiting


def test_a_process_that_stayed_up_restarts_after_the_first_delay_again() -> None:
    restarts = Restarts()
    for _ in range(4):
        restarts.started_now()
        restarts.schedule()
    restarts.started_now()
    restarts.started = time.monotonic() - RESTART_RESET  # it has been up RESTART_RESET seconds
    assert restarts.schedule() == RESTART_FIRST


def test_started_now_clears_the_pending_restart() -> None:
    restarts = Restarts()
    restarts.schedule()
    restarts.started_now()
    assert not restarts.waiting and not restarts.ready
