#!/usr/bin/env python3
"""Write cost of migration 0005's GIN indexes (ADR 0019), with a richer payload than run.py's one-key one.

    .venv/bin/python bench/gin_cost.py [--n 20000] [--rounds 2] [--labels '{"team":"billing","env":"prod"}']

A private PostgreSQL (fsync on) with three databases migrated by Store.migrate: "partial" (0005
as shipped), "full" (the same indexes without their WHERE) and "none" (0005's indexes dropped).
Each round writes N jobs in the projector's three steps, 500 per transaction: QUEUED (insert,
with the labels, no payload), ACTIVE (update), SUCCEEDED (update with a ten-field nested payload).
Prints seconds and WAL megabytes per step. WAL bytes are deterministic; seconds are as noisy as
the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import psycopg

from conveyor.common.devstack.servers import PostgresServer
from conveyor.results.store import Store, open_pool

BATCH = 500
ARMS = ("none", "full", "partial")


def payload(i: int) -> str:
    return json.dumps(
        {
            "customer": {"id": i % 5000, "tier": ["gold", "silver", "bronze"][i % 3], "country": "FR"},
            "order": {"id": f"o-{i}", "total": i % 997, "currency": "EUR", "items": [{"sku": f"s{i % 50}", "qty": 1}]},
            "tags": ["a", f"t{i % 20}"],
            "source": "api",
        }
    )


async def migrate(url: str) -> None:
    pool = await open_pool(url, 2)
    await Store(pool).migrate()
    await pool.close()


def wal_mb_since(conn: psycopg.Connection[tuple[object, ...]], lsn: str) -> float:
    row = conn.execute("SELECT (pg_current_wal_lsn() - %s::pg_lsn) / 1e6", (lsn,)).fetchone()
    assert row is not None
    return float(row[0])  # type: ignore[arg-type]


def write(url: str, n: int, labels: str, tag: int) -> dict[str, float]:

    out: dict[str, float] = {}
    with psycopg.connect(url) as conn:
        conn.execute("TRUNCATE jobs")
        conn.commit()
        for step in ("queued", "active", "succeeded"):
            row = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
            assert row is not None
            conn.commit()
            start = time.perf_counter()
            for lo in range(0, n, BATCH):
                ids = [f"default/{tag:02d}{i:024d}" for i in range(lo, min(n, lo + BATCH))]
                if step == "queued":
                    conn.execute(
                        "INSERT INTO jobs (job_id, queue, type, state, labels, created_at, updated_at,"
                        " last_event_ms, last_event_seq)"
                        " SELECT id, 'default', 'demo', 1, %s::jsonb, now(), now(), 1, 0 FROM unnest(%s::text[]) id",
                        (labels, ids),
                    )
                elif step == "active":
                    conn.execute(
                        "UPDATE jobs SET state = 3, started_at = now(), last_event_ms = 2 WHERE job_id = ANY(%s)",
                        (ids,),
                    )
                else:
                    conn.execute(
                        "UPDATE jobs j SET state = 5, finished_at = now(), payload = p.payload::jsonb,"
                        " last_event_ms = 3"
                        " FROM unnest(%s::text[], %s::text[]) AS p(id, payload) WHERE j.job_id = p.id",
                        (ids, [payload(lo + k) for k in range(len(ids))]),
                    )
                conn.commit()
            out[f"{step}_s"] = round(time.perf_counter() - start, 2)
            out[f"{step}_wal_mb"] = round(wal_mb_since(conn, str(row[0])), 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--labels", default='{"team":"billing","env":"prod"}', help="every job's labels, JSON ('{}': none)")
    a = ap.parse_args()
    with PostgresServer() as pg:
        base = pg.url.rsplit("/", 1)[0]
        urls = {arm: f"{base}/gin_{arm}" for arm in ARMS}
        with psycopg.connect(pg.url, autocommit=True) as conn:
            for arm in ARMS:
                conn.execute(f"CREATE DATABASE gin_{arm}".encode())
        for url in urls.values():
            asyncio.run(migrate(url))
        with psycopg.connect(urls["none"], autocommit=True) as conn:
            conn.execute("DROP INDEX jobs_payload_idx; DROP INDEX jobs_labels_idx")
        with psycopg.connect(urls["full"], autocommit=True) as conn:
            conn.execute("DROP INDEX jobs_payload_idx; DROP INDEX jobs_labels_idx")
            conn.execute("CREATE INDEX jobs_payload_idx ON jobs USING gin (payload jsonb_path_ops)")
            conn.execute("CREATE INDEX jobs_labels_idx ON jobs USING gin (labels jsonb_path_ops)")
        for r in range(a.rounds):
            for arm in ARMS if r % 2 == 0 else tuple(reversed(ARMS)):
                got = write(urls[arm], a.n, a.labels, r)
                wal = sum(v for k, v in got.items() if k.endswith("_wal_mb"))
                secs = sum(v for k, v in got.items() if k.endswith("_s"))
                print(json.dumps({"arm": arm, "round": r, "labels": a.labels, "n": a.n, **got,
                                  "wal_mb": round(wal, 2), "s": round(secs, 2)}), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
