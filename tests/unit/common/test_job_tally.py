"""metrics.JobTally counts per job in dicts and flushes per loop turn: the exported values must be
exactly those of prometheus_client's own inc() and observe() (ADR 0029)."""

from __future__ import annotations

import asyncio

from prometheus_client import REGISTRY

from conveyor.common import metrics

# Every bucket bound exactly, just above and below it, zero, and past the last bound (+Inf).
AMOUNTS = [0.0, 0.0005, 0.001, 0.0011, 0.005, 0.02, 0.1, 0.7, 1.0, 2.5, 9.99, 60.0, 3600.0, 5000.0]


def _histogram(name: str, labels: dict[str, str]) -> dict[str, float]:
    out = {}
    for metric in REGISTRY.collect():
        for s in metric.samples:
            if (
                s.name.startswith(name)
                and not s.name.endswith("_created")
                and all(s.labels.get(k) == v for k, v in labels.items())
            ):
                out[f"{s.name}{s.labels.get('le', '')}"] = s.value
    return out


def test_a_flushed_tally_equals_observing_each_job() -> None:
    tally = metrics.JobTally()
    for amount in AMOUNTS:
        tally.ended("tally-q", "tally-tallied", 5, amount)
        tally.started("tally-q", "tally-tallied", amount)
        metrics.job_ended("tally-q", "tally-observed", 5, amount)
    tally.flush()  # no event loop: started() already flushed at once; the rest now
    tallied = _histogram("conveyor_job_duration_seconds", {"queue": "tally-q", "type": "tally-tallied"})
    observed = _histogram("conveyor_job_duration_seconds", {"queue": "tally-q", "type": "tally-observed"})
    assert tallied and tallied == observed
    assert tallied["conveyor_job_duration_seconds_count"] == len(AMOUNTS)
    counted = {"queue": "tally-q", "type": "tally-tallied"}
    assert REGISTRY.get_sample_value("conveyor_jobs_total", {**counted, "event": "started"}) == len(AMOUNTS)
    assert REGISTRY.get_sample_value("conveyor_jobs_total", {**counted, "event": "succeeded"}) == len(AMOUNTS)
    waits = _histogram("conveyor_job_wait_seconds", {"queue": "tally-q"})
    assert waits["conveyor_job_wait_seconds_count"] == len(AMOUNTS)
    assert waits["conveyor_job_wait_seconds_sum"] == sum(AMOUNTS)


def test_on_a_loop_the_flush_runs_before_anything_scheduled_after_the_tally() -> None:
    tally = metrics.JobTally()
    labels = {"queue": "tally-loop", "type": "t", "event": "succeeded"}
    seen: list[float | None] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for _ in range(3):
            tally.ended("tally-loop", "t", 5, 0.01)
        assert REGISTRY.get_sample_value("conveyor_jobs_total", labels) in (None, 0.0)  # not yet: one flush per turn
        loop.call_soon(lambda: seen.append(REGISTRY.get_sample_value("conveyor_jobs_total", labels)))
        await asyncio.sleep(0)
        await asyncio.sleep(0)

    asyncio.run(main())
    assert seen == [3.0]
