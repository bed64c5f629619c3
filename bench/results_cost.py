#!/usr/bin/env python3
"""The results service's CPU per job while it catches up (issue 13 item 2; ADR 0030).

    .venv/bin/python bench/results_cost.py [--n 20000] [--reps 3] [--python PATH] [--b-python PATH]
                                           [--b-env KEY=VALUE,...] [--profile DIR]

What it measures: the "catching up" case only. A private Redis and PostgreSQL (bench/run.py's
settings), a producer and one worker and NO results service: N jobs are enqueued (batches of 100,
run.py's 100-byte payload) and run by the worker (demo.noop), so the queue's event stream holds
every job's QUEUED, ACTIVE and SUCCEEDED events as the real producer and worker write them (the
final one with the stored job embedded). Producer and worker are then stopped. One results service
(``python -m conveyor.results``, under --python) is started and, once SERVING (imports and
migrations done), given the queue; the figure is its process CPU (utime+stime from /proc) and
PostgreSQL's (postmaster and backends) from then until it has acked every event (it acks only
after PostgreSQL committed), divided by N. Every job's row is then checked final in PostgreSQL.

With --b-python, each repetition runs both sides on the same events, in alternating order: between
runs the results group is dropped (the next run reads the stream from its start) and the tables are
emptied; each side has a database of its own (their migrations may differ). The end prints the
medians per side and the median of the per-repetition B / A ratios (> 1: B cost more). --b-env
gives side B's results service more environment (a setting to weigh; B runs --python unless
--b-python says otherwise).

This is not the live case (jobs arriving while the service keeps up): bench/run.py's e2e measures that.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg
import redis

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from driver import JOB_TYPE, PAYLOAD  # noqa: E402
from run import CLK, KEYS, PG_SETTINGS, QUEUE, ROOT, BenchError, Stack, parse_env, tree_ticks, wait_until  # noqa: E402

from conveyor.common.devstack.servers import PostgresServer, RedisServer, free_port  # noqa: E402
from conveyor.common.keys import QUEUES, RESULTS_GROUP  # noqa: E402
from conveyor.v1 import producer_service_pb2 as p  # noqa: E402
from conveyor.v1 import producer_service_pb2_grpc  # noqa: E402

SUCCEEDED = 5


class Backlog(Stack):
    """Redis, PostgreSQL, a producer and a worker: fills the event stream, then stops both services."""

    def start(self) -> None:
        import grpc

        self.redis_server = RedisServer(appendonly=True)
        self.redis_server.start()
        self.pg_server = PostgresServer(settings=PG_SETTINGS)
        self.pg_server.start(timeout=60)
        self.env = dict(
            os.environ,
            REDIS_URL=self.redis_server.url,
            DATABASE_URL=self.pg_server.url,
            CONVEYOR_LOG_LEVEL="warning",
            CONVEYOR_LOG_FORMAT="json",
            PYTHONUNBUFFERED="1",
            # The events stay in the stream between the runs of one repetition.
            CONVEYOR_RETENTION_SECONDS="3600",
        )
        unused = f"127.0.0.1:{free_port()}"
        self._spawn("producer", self.env, f"127.0.0.1:{free_port()}", CONVEYOR_RESULTS_ADDR=unused)
        self._spawn(
            "worker", self.env, f"127.0.0.1:{free_port()}", CONVEYOR_QUEUES=QUEUE,
            CONVEYOR_CONCURRENCY="50", CONVEYOR_WORKER_ID="bench-worker-1",
        )  # fmt: skip
        for s in self.services.values():
            self._wait_healthy(s, 60.0)
        self.r = redis.Redis.from_url(self.redis_server.url, socket_timeout=30, socket_connect_timeout=5)
        self._grpc = grpc

    def fill(self, n: int) -> None:
        with self._grpc.insecure_channel(self.producer_addr) as channel:
            stub = producer_service_pb2_grpc.ProducerServiceStub(channel)
            for lo in range(0, n, 100):
                jobs = [
                    p.EnqueueRequest(queue=QUEUE, type=JOB_TYPE, payload_json=PAYLOAD) for _ in range(min(100, n - lo))
                ]
                stub.EnqueueBatch(p.EnqueueBatchRequest(jobs=jobs), timeout=30)
        self.wait_handled(n, timeout=600)
        for name in ("worker", "producer"):
            s = self.services.pop(name)
            os.killpg(s.proc.pid, signal.SIGTERM)
            s.proc.wait(30)
        assert self.r is not None
        have = int(self.r.xlen(KEYS.events))
        if have < 3 * n:
            raise BenchError(f"expected at least {3 * n} events in {KEYS.events}, found {have}")

    def database(self, name: str) -> str:
        assert self.pg_server is not None
        with psycopg.connect(self.pg_server.url, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}".encode())
        return self.pg_server.url.rsplit("/", 1)[0] + "/" + name

    def project(
        self, python: str, url: str, n: int, profile: Path | None, extra_env: dict[str, str] | None = None
    ) -> dict[str, Any]:
        """One results service under ``python`` catching up on the whole stream into ``url``."""
        assert self.r is not None
        # Fresh start: no group (the service creates it at id 0), empty tables, the queue unknown
        # until the service is SERVING so that its start-up is not counted.
        self.r.srem(QUEUES, QUEUE)
        self.r.execute_command("XGROUP", "DESTROY", KEYS.events, RESULTS_GROUP)
        with psycopg.connect(url, autocommit=True) as conn:
            exists = conn.execute("SELECT to_regclass('jobs') IS NOT NULL").fetchone()
            if exists and exists[0]:
                conn.execute("TRUNCATE jobs, job_events, projection_set_aside")
                conn.execute("VACUUM ANALYZE")  # the catalogue as after a migration, not after a run
        env = dict(self.env, DATABASE_URL=url, **(extra_env or {}))
        self.python = python
        self._spawn("results", env, f"127.0.0.1:{free_port()}")
        s = self.services["results"]
        spy = None
        try:
            self._wait_healthy(s, 60.0)
            time.sleep(0.3)  # let start-up's last tasks settle (first read finds no stream)
            if profile is not None:
                spy_bin = str(Path(sys.executable).parent / "py-spy")
                spy = subprocess.Popen(
                    [spy_bin, "record", "-r", "200", "-f", "raw", "-o", str(profile), "-p", str(s.proc.pid)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                )  # fmt: skip
                time.sleep(0.5)
            pg_pid = self.postmaster_pid()
            t0, r0, pg0 = time.monotonic(), tree_ticks(s.proc.pid), tree_ticks(pg_pid)
            self.r.sadd(QUEUES, QUEUE)

            def caught_up() -> bool:
                self.check_alive()
                return self.results_caught_up()

            wait_until(caught_up, "the results service to ack every event", 600, 0.02)
            t1, r1, pg1 = time.monotonic(), tree_ticks(s.proc.pid), tree_ticks(pg_pid)
        finally:
            if spy is not None:
                spy.send_signal(signal.SIGINT)
                spy.wait(30)
            os.killpg(s.proc.pid, signal.SIGTERM)
            s.proc.wait(30)
            del self.services["results"]
        with psycopg.connect(url) as conn:
            row = conn.execute(
                "SELECT count(*) FILTER (WHERE state = %s), count(*) FROM jobs WHERE queue = %s", (SUCCEEDED, QUEUE)
            ).fetchone()
            hist = conn.execute("SELECT count(*) FROM job_events").fetchone()
        assert row is not None and hist is not None
        if row[0] != n or row[1] != n:
            raise BenchError(f"{row[0]} of {row[1]} rows SUCCEEDED, expected {n}")
        return {
            "results_us_per_job": round((r1 - r0) / CLK * 1e6 / n, 2),
            "postgres_us_per_job": round((pg1 - pg0) / CLK * 1e6 / n, 2),
            "seconds": round(t1 - t0, 2),
            "history_rows": int(hist[0]),
        }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--python", default=sys.executable, help="interpreter of the results service (side A)")
    ap.add_argument("--b-python", help="interpreter of side B (e.g. /work/wt-base/.venv/bin/python): paired")
    ap.add_argument("--b-env", default="", help="KEY=VALUE,... added to side B's results service (e.g. a setting)")
    ap.add_argument("--profile", type=Path, help="directory for py-spy raw profiles of each run")
    a = ap.parse_args()
    b_python = a.b_python or (a.python if a.b_env else None)
    sides = {"a": a.python} if not b_python else {"a": a.python, "b": b_python}
    envs = {"a": {}, "b": parse_env(a.b_env)}
    rows: list[dict[str, Any]] = []
    for rep in range(a.reps):
        with (
            tempfile.TemporaryDirectory(prefix="results-cost-") as tmp,
            Backlog(Path(tmp), python=sys.executable) as st,
        ):
            st.fill(a.n)
            urls = {side: st.database(f"side_{side}") for side in sides}
            order = list(sides) if rep % 2 == 0 else list(reversed(sides))
            for side in order:
                prof = a.profile / f"results-{side}-{rep:02d}.txt" if a.profile else None
                if prof is not None:
                    prof.parent.mkdir(parents=True, exist_ok=True)
                got = st.project(sides[side], urls[side], a.n, prof, envs[side])
                row = {"rep": rep, "side": side, "python": sides[side], "n": a.n, **got}
                rows.append(row)
                print(json.dumps(row), flush=True)
    for side in sides:
        mine = [r for r in rows if r["side"] == side]
        print(
            f"# side {side} ({sides[side]}): results {statistics.median(r['results_us_per_job'] for r in mine):.1f}"
            f" us/job, postgres {statistics.median(r['postgres_us_per_job'] for r in mine):.1f} us/job"
            f" (medians of {len(mine)}, catching up on {a.n} jobs)",
            flush=True,
        )
    if len(sides) == 2:
        for what in ("results_us_per_job", "postgres_us_per_job"):
            ratios = []
            for rep in range(a.reps):
                got = {r["side"]: r[what] for r in rows if r["rep"] == rep}
                if got.get("a"):
                    ratios.append(got["b"] / got["a"])
            print(f"# B / A {what}: {statistics.median(ratios):.2f} (median of {len(ratios)} pairs)", flush=True)


if __name__ == "__main__":
    os.chdir(ROOT)
    main()
