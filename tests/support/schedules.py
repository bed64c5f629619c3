"""What schedule loops did, read off their processes' logs."""

from __future__ import annotations

from tests.support.processes import ServiceProcess


def ticks_fired(worker: ServiceProcess, schedule_id: str, created_only: bool = True) -> int:
    """Enqueues of ``schedule_id``'s ticks the worker made (``created_only``: those that made a new job)."""
    return sum(
        1
        for record in worker.records("schedule_fired")
        if record.get("schedule_id") == schedule_id and (record.get("created") is True or not created_only)
    )
