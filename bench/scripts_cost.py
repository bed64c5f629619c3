"""Redis time per job of the hot-path scripts (enqueue, claim, complete), with and without flow control.

    .venv/bin/python bench/scripts_cost.py [--n 20000] [--reps 5]

Runs the real scripts against a private Redis (AOF off, so the figure is Redis's own work)
with no services around them: N jobs are enqueued in batches of 100, claimed 50 at a time
and completed as SUCCEEDED in batches of 50. Redis's `commandstats` give the time spent in
each script per job. "plain" jobs have no rate key and priority 5; "controls" jobs cycle
through priorities 1-9 and 100 rate keys, with a rate limit and a concurrency cap set on
the queue and on every key, none of them binding (the e2e `controls` figure of run.py).

This is the controls' cost where it lands (Redis is one thread, and the claim path is all
Lua), measured without the noise of five processes sharing two cores: use it to see what a
change to the scripts is worth, and run.py's paired e2e figures for what it is worth end to end.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import redis
import redis.asyncio as aioredis

from conveyor.common.devstack.servers import RedisServer
from conveyor.common.ids import new_ulid
from conveyor.common.keys import QueueKeys, queue_keys
from conveyor.common.scripts import NewJob, Outcome, Scripts
from conveyor.v1 import event_pb2, job_pb2

KEYS_PER_RUN = 100
PAYLOAD = b'{"data": "' + b"x" * 88 + b'"}'


@contextmanager
def private_redis() -> Iterator[RedisServer]:
    with RedisServer(appendonly=False) as server:
        yield server


def job_bytes(priority: int, rate_key: str) -> bytes:
    job = job_pb2.Job(type="demo.noop", priority=priority, rate_key=rate_key)
    return job.SerializeToString() + b"\x2a" + bytes([len(PAYLOAD)]) + PAYLOAD


def queued_event(priority: int) -> bytes:
    ev = event_pb2.JobEvent(type=event_pb2.EVENT_TYPE_QUEUED)
    ev.job.type = "demo.noop"
    ev.job.priority = priority
    return ev.SerializeToString()


def stats(r: redis.Redis) -> dict[str, tuple[int, int]]:
    info: dict[str, dict[str, int]] = r.info("commandstats")  # type: ignore[assignment]
    return {name.removeprefix("cmdstat_"): (int(v["calls"]), int(v["usec"])) for name, v in info.items()}


#: What each mode turns on: a priority mix, rate keys on the jobs, limits set on every scope.
MODES = {
    "plain": (False, False, False),
    "prio": (True, False, False),
    "keyed": (True, True, False),
    "controls": (True, True, True),
}


async def run_once(url: str, queue: str, n: int, mode: str) -> dict[str, float]:
    prio_mix, keyed, limits = MODES[mode]
    sync = redis.Redis.from_url(url)
    client = aioredis.Redis.from_url(url)
    scripts = Scripts(client)
    keys: QueueKeys = queue_keys(queue)
    if limits:
        for field, value in (("rate", "1000000:1000"), ("key_rate", "100000:1000"), ("conc", "100000"),
                             ("key_conc", "10000")):  # fmt: skip
            await scripts.set_limit(keys, field, value)
    jobs: list[NewJob] = []
    for i in range(n):
        prio = i % 9 + 1 if prio_mix else 5
        key = f"tenant-{i % KEYS_PER_RUN}" if keyed else ""
        jobs.append(NewJob(ulid=new_ulid(), priority=prio, job=job_bytes(prio, key), queued_event=queued_event(prio),
                           rate_key=key))  # fmt: skip
    success = event_pb2.JobEvent(type=event_pb2.EVENT_TYPE_SUCCEEDED).SerializeToString()
    keys_of = {j.ulid: j.rate_key for j in jobs}
    usec: dict[str, float] = {}

    def phase(name: str, before: dict[str, tuple[int, int]]) -> None:
        after = stats(sync)
        calls = after["evalsha"][0] - before.get("evalsha", (0, 0))[0]
        inner = sum(c for cmd, (c, _) in after.items() if cmd not in ("evalsha", "info"))
        inner -= sum(c for cmd, (c, _) in before.items() if cmd not in ("evalsha", "info"))
        usec[name] = (after["evalsha"][1] - before.get("evalsha", (0, 0))[1]) / n
        usec[name + "_calls"] = calls
        usec[name + "_cmds"] = inner / n

    sync.config_resetstat()
    before = stats(sync)
    for i in range(0, n, 100):
        await scripts.enqueue(keys, jobs[i : i + 100])
    phase("enqueue", before)
    consumer = "bench-worker"
    held: list[tuple[int, str, str, int]] = []
    before = stats(sync)
    while len(held) < n:
        res = await scripts.claim(keys, consumer, 50)
        if not res.claimed:
            raise SystemExit(f"claim returned nothing with {n - len(held)} jobs left")
        held += [(c.band, c.entry_id, c.ulid, c.attempt) for c in res.claimed]
    phase("claim", before)
    before = stats(sync)
    for i in range(0, n, 50):
        outcomes = [
            Outcome(b, e, u, a, job_pb2.JOB_STATE_SUCCEEDED, success, rate_key=keys_of[u])
            for b, e, u, a in held[i : i + 50]
        ]
        await scripts.complete(keys, consumer, 60_000, outcomes)
    phase("complete", before)
    await client.aclose()
    sync.close()
    return usec


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    rows: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
    with private_redis() as server:
        for rep in range(a.reps):
            for mode in MODES:
                rows[mode].append(asyncio.run(run_once(server.url, f"cost{rep}{mode}", a.n, mode)))
    print(f"Redis time per job in µs (median of {a.reps}, n={a.n}), [Redis commands per job inside the script]")
    print(f"{'script':10}" + "".join(f"{mode:>18}" for mode in MODES))

    def cell(mode: str, name: str) -> str:
        us = statistics.median(r[name] for r in rows[mode])
        if name == "all":
            return f"{us:18.2f}"
        cmds = statistics.median(r[name + "_cmds"] for r in rows[mode])
        return f"{us:10.2f} [{cmds:5.2f}]"

    for rep_rows in rows.values():
        for r in rep_rows:
            r["all"] = r["enqueue"] + r["claim"] + r["complete"]
    for name in ("enqueue", "claim", "complete", "all"):
        print(f"{name:10}" + "".join(cell(mode, name) for mode in MODES))
    plain = statistics.median(r["all"] for r in rows["plain"])
    ctl = statistics.median(r["all"] for r in rows["controls"])
    print(f"controls cost {ctl - plain:+.2f} µs of Redis time per job ({(ctl - plain) / plain:+.0%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
