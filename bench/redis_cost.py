"""What each job costs Redis, phase by phase: commands, µs, Lua time, stream entries, bytes.

    .venv/bin/python bench/redis_cost.py [--n 20000] [--reps 5] [--progress 1]
    .venv/bin/python bench/redis_cost.py --python /work/wt-base/.venv/bin/python   # paired: B = that checkout

Runs the real scripts against a private Redis (AOF off, so the figure is Redis's own work) with
no services around them, in the order a job lives: N jobs enqueued in batches of 100, claimed
50 at a time, `--progress` PROGRESS events each, completed as SUCCEEDED in batches of 50; then
what the results service does with them (XREADGROUP of 1,000 events, XACK of each read's ids;
projected.lua for the finished jobs, retention 0 so the records are due at once) and the
retention (expire_records.lua, trim_events.lua). Per job and phase, from `INFO commandstats`:
- `cmds`: Redis commands (a script call counts once, plus the commands it runs);
- `µs`: Redis time (a script's EVALSHA time includes its inner commands');
- `lua µs`: the script time beyond its inner commands' own: the Lua interpreter's work
  (parsing arguments and records, building events and records, tables);
- `xadd`: stream entries written;
- `bytes`: `used_memory` growth over the phase (the `mem` row: above the empty baseline after
  it, so `waiting` is bytes per waiting job and the last row what the retention left behind).

Each repetition runs in its own process (its interpreter's checkout of Conveyor: a worktree's
venv runs its own code), against a flushed Redis; with `--python` the two interpreters alternate
and the B / A column is the median of the per-repetition ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
from typing import Any

import redis
import redis.asyncio as aioredis

PAYLOAD = b'{"data": "' + b"x" * 88 + b'"}'
PHASES = ("enqueue", "claim", "progress", "complete", "results", "projected", "expire", "trim")
#: Phases the results service runs as plain commands (no script): µs is the commands' own time.
DIRECT = ("results",)


def stats(r: redis.Redis) -> dict[str, tuple[int, int]]:
    info: dict[str, dict[str, int]] = r.info("commandstats")  # type: ignore[assignment]
    return {name.removeprefix("cmdstat_"): (int(v["calls"]), int(v["usec"])) for name, v in info.items()}


def used_memory(r: redis.Redis) -> int:
    return int(r.info("memory")["used_memory"])  # type: ignore[index]


async def run_once(url: str, n: int, progress: int) -> dict[str, dict[str, float]]:
    from conveyor.common.ids import new_ulid
    from conveyor.common.keys import RESULTS_GROUP, queue_keys
    from conveyor.common.scripts import NewJob, Outcome, Scripts
    from conveyor.v1 import event_pb2, job_pb2

    sync = redis.Redis.from_url(url)
    sync.flushall()
    client = aioredis.Redis.from_url(url)
    scripts = Scripts(client)
    keys = queue_keys("cost")
    job = job_pb2.Job(type="demo.noop", priority=5).SerializeToString() + b"\x2a" + bytes([len(PAYLOAD)]) + PAYLOAD
    queued = event_pb2.JobEvent(type=event_pb2.EVENT_TYPE_QUEUED)
    queued.job.type = "demo.noop"
    queued.job.priority = 5
    jobs = [NewJob(ulid=new_ulid(), priority=5, job=job, queued_event=queued.SerializeToString()) for _ in range(n)]
    step = event_pb2.JobEvent(type=event_pb2.EVENT_TYPE_PROGRESS)
    step.progress.percent = 50
    step_bytes = step.SerializeToString()
    success = event_pb2.JobEvent(type=event_pb2.EVENT_TYPE_SUCCEEDED).SerializeToString()
    out: dict[str, dict[str, float]] = {}
    sync.execute_command("MEMORY", "PURGE")
    baseline = used_memory(sync)
    sync.config_resetstat()
    state = {"before": stats(sync), "mem": baseline}

    def phase(name: str) -> None:
        after, mem = stats(sync), used_memory(sync)
        before = state["before"]
        assert isinstance(before, dict)

        def delta(cmd: str, i: int) -> int:
            return after.get(cmd, (0, 0))[i] - before.get(cmd, (0, 0))[i]

        plain = [c for c in after if c not in ("evalsha", "eval", "info", "config")]
        inner_calls = sum(delta(c, 0) for c in plain)
        inner_us = sum(delta(c, 1) for c in plain)
        script_calls, script_us = delta("evalsha", 0), delta("evalsha", 1)
        total_us = inner_us if name in DIRECT else script_us
        out[name] = {
            "cmds": (script_calls + inner_calls) / n,
            "us": total_us / n,
            "lua_us": 0.0 if name in DIRECT else (script_us - inner_us) / n,
            "xadd": delta("xadd", 0) / n,
            "bytes": (mem - int(state["mem"])) / n,  # type: ignore[call-overload]
            "mem": (mem - baseline) / n,
            # Per command (scripts' inner commands included): calls and µs per job.
            "by_cmd": {c: (delta(c, 0) / n, delta(c, 1) / n) for c in (*plain, "evalsha") if delta(c, 0)},
        }
        state["before"] = stats(sync)  # not `after`: the INFO calls above count from here
        state["mem"] = used_memory(sync)

    for i in range(0, n, 100):
        await scripts.enqueue(keys, jobs[i : i + 100])
    phase("enqueue")
    consumer = "bench-worker"
    held: list[tuple[int, str, str, int]] = []
    while len(held) < n:
        res = await scripts.claim(keys, consumer, 50)
        if not res.claimed:
            raise SystemExit(f"claim returned nothing with {n - len(held)} jobs left")
        held += [(c.band, c.entry_id, c.ulid, c.attempt) for c in res.claimed]
    phase("claim")
    for _ in range(progress):
        for _b, _e, ulid, attempt in held:
            await scripts.progress(keys, consumer, ulid, attempt, step_bytes)
    phase("progress")
    for i in range(0, n, 50):
        outcomes = [Outcome(b, e, u, a, job_pb2.JOB_STATE_SUCCEEDED, success) for b, e, u, a in held[i : i + 50]]
        await scripts.complete(keys, consumer, 60_000, outcomes)
    phase("complete")
    last: dict[str, str] = {}
    while True:
        reply = sync.xreadgroup(RESULTS_GROUP, "bench-results", {keys.events: ">"}, count=1000)
        entries = reply[0][1] if reply else []
        if not entries:
            break
        for eid, fields in entries:
            last[fields[b"j"].decode()] = eid.decode()
        sync.xack(keys.events, RESULTS_GROUP, *(eid for eid, _ in entries))
    phase("results")
    finished = list(last.items())
    for i in range(0, len(finished), 1000):
        await scripts.projected(keys, finished[i : i + 1000], 0)
    phase("projected")
    while await scripts.expire_records(keys, 1000):
        pass
    phase("expire")
    await scripts.trim_events(keys, int(sync.time()[0]) * 1000 + 1000)
    phase("trim")
    sync.execute_command("MEMORY", "PURGE")
    out["after"] = {"mem": (used_memory(sync) - baseline) / n}
    await client.aclose()
    sync.close()
    return out


def one_rep(python: str, url: str, n: int, progress: int) -> dict[str, Any]:
    cmd = [python, __file__, "--one", url, "--n", str(n), "--progress", str(progress)]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def table(rows: list[dict[str, Any]], label: str, by_cmd: bool = False) -> list[str]:
    def med(phase: str, field: str) -> float:
        return statistics.median(r[phase][field] for r in rows)

    lines = [f"{label}: per job, median of {len(rows)}"]
    lines.append(f"  {'phase':10}{'cmds':>8}{'µs':>8}{'lua µs':>8}{'xadd':>7}{'bytes':>9}{'mem':>9}")
    for p in PHASES:
        lines.append(
            f"  {p:10}{med(p, 'cmds'):8.2f}{med(p, 'us'):8.2f}{med(p, 'lua_us'):8.2f}{med(p, 'xadd'):7.2f}"
            f"{med(p, 'bytes'):9.1f}{med(p, 'mem'):9.1f}"
        )
    tot = {f: statistics.median(sum(r[p][f] for p in PHASES) for r in rows) for f in ("cmds", "us", "lua_us", "xadd")}
    lines.append(f"  {'total':10}{tot['cmds']:8.2f}{tot['us']:8.2f}{tot['lua_us']:8.2f}{tot['xadd']:7.2f}")
    lines.append(f"  waiting job {med('enqueue', 'mem'):.1f} B; left after the retention {med('after', 'mem'):.2f} B")
    if by_cmd:
        lines.append("  by command, calls/job µs/job (median):")
        for p in PHASES:
            cmds = sorted({c for r in rows for c in r[p]["by_cmd"]})
            cells = []
            for c in cmds:
                calls = statistics.median(r[p]["by_cmd"].get(c, (0, 0))[0] for r in rows)
                us = statistics.median(r[p]["by_cmd"].get(c, (0, 0))[1] for r in rows)
                cells.append(f"{c} {calls:.2f}/{us:.2f}")
            lines.append(f"    {p:10}" + ", ".join(cells))
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--progress", type=int, default=1, help="PROGRESS events per job")
    ap.add_argument("--python", help="B: another checkout's interpreter, run alternately with this one (A)")
    ap.add_argument("--by-command", action="store_true", help="also print calls and µs per job of each command")
    ap.add_argument("--one", metavar="URL", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print(json.dumps(asyncio.run(run_once(a.one, a.n, a.progress))))
        return 0
    from conveyor.common.devstack.servers import RedisServer

    rows_a: list[dict[str, Any]] = []
    rows_b: list[dict[str, Any]] = []
    with RedisServer(appendonly=False) as server:
        for _ in range(a.reps):
            if a.python:
                rows_b.append(one_rep(a.python, server.url, a.n, a.progress))
            rows_a.append(one_rep(sys.executable, server.url, a.n, a.progress))
    print(f"Redis per job (n={a.n}, {a.progress} PROGRESS per job)")
    if a.python:
        print("\n".join(table(rows_b, f"B ({a.python})", a.by_command)))
    print("\n".join(table(rows_a, f"A ({sys.executable})", a.by_command)))
    if a.python:
        print("B / A, median of per-repetition ratios (> 1: B cost more):")
        for field in ("cmds", "us", "lua_us", "xadd"):
            ratios = [
                sum(b[p][field] for p in PHASES) / max(sum(x[p][field] for p in PHASES), 1e-9)
                for b, x in zip(rows_b, rows_a, strict=True)
            ]
            print(f"  total {field:7} {statistics.median(ratios):.2f}")
        for p in ("enqueue", "claim", "complete"):
            ratios = [b[p]["us"] / x[p]["us"] for b, x in zip(rows_b, rows_a, strict=True)]
            print(f"  {p} µs {statistics.median(ratios):.2f}")
        ratios = [b["enqueue"]["mem"] / x["enqueue"]["mem"] for b, x in zip(rows_b, rows_a, strict=True)]
        print(f"  bytes per waiting job {statistics.median(ratios):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
