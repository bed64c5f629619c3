#!/usr/bin/env python3
"""In-process CPU per job of the projector's Python work on a real backlog (issue 13 item 2; ADR 0030).

    .venv/bin/python bench/results_fold_cost.py [--n 20000] [--rounds 7] [--dump /tmp/events.pkl]

Fills a private stack's event stream as bench/results_cost.py does (producer and worker, no results
service), reads it back with XRANGE (--dump keeps it, and reuses it when the file exists), then times,
with process_time, what the projector does with each read of 1,000 entries short of the I/O: fold
(Batch.add, settle with the ADR 0020 carry), the rows and history rows (Batch.finish), the
parameters of the write (store.job_columns, store.history_columns, sorted as Store.write sorts) and
the finished jobs for projected.lua (Batch.finished). Prints the best of --rounds, in us per job.
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from conveyor.results import store  # noqa: E402
from conveyor.results.projector import Batch, Carry  # noqa: E402

QUEUE = "bench"
STREAM = "{bench}:events"
READ = 1000


def backlog(n: int, dump: Path | None) -> list[Any]:
    if dump is not None and dump.exists():
        return pickle.loads(dump.read_bytes())
    from results_cost import KEYS, Backlog

    with tempfile.TemporaryDirectory(prefix="fold-cost-") as tmp, Backlog(Path(tmp), python=sys.executable) as st:
        st.fill(n)
        assert st.r is not None
        entries = [(i, list(f)) for i, f in st.r.execute_command(b"XRANGE", KEYS.events, "-", "+")]
    if dump is not None:
        dump.write_bytes(pickle.dumps(entries))
    return entries


def one_round(entries: list[Any]) -> tuple[dict[str, float], int]:
    carry: Carry = {}
    spent = {"fold": 0.0, "finish": 0.0, "pack": 0.0}
    jobs = 0
    for lo in range(0, len(entries) + READ, READ):
        t0 = time.process_time()
        batch = Batch(carry)
        chunk = entries[lo : lo + READ]
        if chunk:
            batch.add(QUEUE, STREAM, chunk)
            batch.settle(time.monotonic(), 10.0, 20_000)
        else:
            batch.settle(time.monotonic(), 0.0, 0)  # the end: whatever is still held is written
        t1 = time.process_time()
        rows = batch.finish()
        batch.finished()
        t2 = time.process_time()
        if rows:
            store.job_columns(sorted(rows, key=lambda r: r.job_id))
        if batch.events:
            store.history_columns(sorted(batch.events))
        t3 = time.process_time()
        spent["fold"] += t1 - t0
        spent["finish"] += t2 - t1
        spent["pack"] += t3 - t2
        jobs += len(rows)
    return spent, jobs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--dump", type=Path, help="keep the backlog's entries here (reused when it exists)")
    a = ap.parse_args()
    entries = backlog(a.n, a.dump)
    best: dict[str, float] = {}
    for _ in range(a.rounds):
        spent, jobs = one_round(entries)
        for k, v in spent.items():
            best[k] = min(best.get(k, 1e9), v * 1e6 / jobs)
        total = sum(spent.values()) * 1e6 / jobs
        best["total"] = min(best.get("total", 1e9), total)
    print(
        json.dumps({"jobs": jobs, "entries": len(entries), **{f"{k}_us_per_job": round(v, 2) for k, v in best.items()}})
    )


if __name__ == "__main__":
    main()
