#!/usr/bin/env python3
"""Binary COPY into a temporary table against packed unnest() arrays, for the projector's jobs upsert (ADR 0030).

    .venv/bin/python bench/results_copy_cost.py [--dump /tmp/events.pkl] [--rounds 3]

The rows are the real ones: a backlog of 20,000 jobs (bench/results_fold_cost.py's, --dump reuses
it) folded by the projector's Batch, 1,000 entries per read. Each round writes them into a fresh
private PostgreSQL database, one transaction per batch, both ways, in alternating order:
- "arrays": store.UPSERT_JOBS with store.job_columns (what the projector does);
- "copy": COPY ... FROM STDIN (FORMAT BINARY) into a temporary table (ON COMMIT DELETE ROWS,
  created once per connection), then the same upsert reading that table instead of unnest().
Prints this process's CPU (process_time) and PostgreSQL's (postmaster and backends, /proc) per
job for each, the best of --rounds. Only the jobs upsert differs; the history insert is left out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import psycopg

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from results_fold_cost import QUEUE, READ, STREAM, backlog  # noqa: E402
from run import CLK, PG_SETTINGS, tree_ticks  # noqa: E402

from conveyor.common.devstack.servers import PostgresServer  # noqa: E402
from conveyor.results import store  # noqa: E402
from conveyor.results.projector import Batch, Carry  # noqa: E402

_FROM = store.UPSERT_JOBS[store.UPSERT_JOBS.index("FROM unnest(") : store.UPSERT_JOBS.index("ON CONFLICT")]
UPSERT_FROM_TEMP = store.UPSERT_JOBS.replace(_FROM, "FROM batch_jobs AS b\n")
CREATE_TEMP = "CREATE TEMP TABLE IF NOT EXISTS batch_jobs ({}) ON COMMIT DELETE ROWS".format(
    ", ".join(f"{c} {t}" for c, t in store._JOB_COLUMNS)
)
COPY = "COPY batch_jobs FROM STDIN (FORMAT BINARY)"
TYPES = [t for _, t in store._JOB_COLUMNS]


def batches(entries: list[Any]) -> list[list[store.JobRow]]:
    carry: Carry = {}
    out = []
    for lo in range(0, len(entries) + READ, READ):
        batch = Batch(carry)
        chunk = entries[lo : lo + READ]
        if chunk:
            batch.add(QUEUE, STREAM, chunk)
            batch.settle(time.monotonic(), 10.0, 20_000)
        else:
            batch.settle(time.monotonic(), 0.0, 0)
        rows = batch.finish()
        if rows:
            out.append(sorted(rows, key=lambda r: r.job_id))
    return out


def write(url: str, how: str, parts: list[list[store.JobRow]], postmaster: int) -> tuple[float, float]:
    with psycopg.connect(url) as conn:
        conn.execute("TRUNCATE jobs")
        conn.commit()
        if how == "copy":
            conn.execute(CREATE_TEMP)
            conn.commit()
        cpu0, pg0 = time.process_time(), tree_ticks(postmaster)
        with conn.cursor() as cur:
            for rows in parts:
                if how == "arrays":
                    cur.execute(store.UPSERT_JOBS, store.job_columns(rows))
                else:
                    with cur.copy(COPY) as copy:
                        copy.set_types(TYPES)
                        for r in rows:
                            copy.write_row(
                                (r.job_id, r.queue, r.type, r.state, r.priority, r.payload, r.result, r.error,
                                 r.progress_percent, r.progress_message, r.attempts, r.max_attempts, r.retry,
                                 r.timeout_ms, r.labels, r.idempotency_key, r.worker, r.created_us, r.run_at_us,
                                 r.started_us, r.finished_us, r.updated_us, r.last_ms, r.last_seq, r.queued_ms,
                                 r.queued_seq)
                            )  # fmt: skip
                    cur.execute(UPSERT_FROM_TEMP)
                conn.commit()
        cpu1, pg1 = time.process_time(), tree_ticks(postmaster)
        n = sum(len(p) for p in parts)
        got = conn.execute("SELECT count(*) FROM jobs WHERE state = 5").fetchone()
        assert got is not None and got[0] == n, (got, n)
    return (cpu1 - cpu0) * 1e6 / n, (pg1 - pg0) / CLK * 1e6 / n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dump", type=Path)
    a = ap.parse_args()
    parts = batches(backlog(a.n, a.dump))
    import asyncio

    with PostgresServer(settings=PG_SETTINGS) as pg:
        pool_url = pg.url

        async def migrate() -> None:
            pool = await store.open_pool(pool_url, 1)
            await store.Store(pool).migrate()
            await pool.close()

        asyncio.run(migrate())
        postmaster = int((pg.data_dir / "postmaster.pid").read_text().split()[0])
        best: dict[str, list[float]] = {}
        for r in range(a.rounds):
            for how in ("arrays", "copy") if r % 2 == 0 else ("copy", "arrays"):
                client, server = write(pg.url, how, parts, postmaster)
                print(json.dumps({"round": r, "how": how, "client_us_per_job": round(client, 2),
                                  "postgres_us_per_job": round(server, 2)}), flush=True)  # fmt: skip
                old = best.get(how, [1e9, 1e9])
                best[how] = [min(old[0], client), min(old[1], server)]
        for how, (client, server) in best.items():
            print(f"# {how}: client {client:.1f} us/job, postgres {server:.1f} us/job (best of {a.rounds})")


if __name__ == "__main__":
    main()
