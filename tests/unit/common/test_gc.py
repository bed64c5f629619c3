"""Every service's collector settings (ADR 0030): start-up's heap frozen, young passes rarer."""

from __future__ import annotations

import gc

from conveyor.common import server


def test_tune_gc_freezes_the_start_up_heap_and_spaces_young_collections() -> None:
    before = gc.get_threshold()
    try:
        server.tune_gc()
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold() == (server.GC_THRESHOLD0, *before[1:])
        # Collection still works: a cycle made after start-up is freed.
        cycle: list[object] = []
        cycle.append(cycle)
        del cycle
        assert gc.collect() >= 1
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
