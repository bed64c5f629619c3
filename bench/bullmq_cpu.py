"""What BullMQ's enqueue figures cost in CPU per job, Node and Redis apart.

    .venv/bin/python bench/bullmq_cpu.py [--n 60000] [--reps 3] [--modes bulk,conc,single]

bench/run.py --with-bullmq gives BullMQ's throughput; a ratio of throughputs says little about
a floor unless one knows what each side spends per job. This drives ../shared/peers/ (the same
BullMQ, runner and private Redis as baseline.py: AOF off, no worker) and reads, per repetition,
the CPU of the Node process (its rusage, start-up included: use a large --n) and of redis-server
(/proc, around the run), per job. On two cores a throughput of R jobs/s leaves at most
2,000,000 / R µs of CPU per job for every process together: the figure a target such as 3x
BullMQ's addBulk has to fit in (bench/README.md, "The floor under batch enqueue").
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

PEERS = Path(__file__).resolve().parents[2] / "shared" / "peers"
CLK = os.sysconf("SC_CLK_TCK")
#: The runner's arguments per mode (peer_bullmq.js: bulk N B | conc N C | single N).
MODES = {"bulk": ("100",), "conc": ("64",), "single": ()}


def proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLK


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=60000, help="jobs per run (single: a tenth)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--modes", default="bulk,conc,single")
    ap.add_argument("--json", help="append the figures as one JSON line to this file")
    a = ap.parse_args()
    sys.path.insert(0, str(PEERS))
    import baseline  # the peers' own harness: its Redis and its BullMQ install

    runner = baseline.install_bullmq()
    redis = baseline.Redis()
    env = dict(os.environ, PB_REDIS_PORT=str(redis.port))
    table: dict[str, dict[str, float]] = {}
    try:
        for mode in a.modes.split(","):
            n = a.n // 10 if mode == "single" else a.n
            rows = []
            for _ in range(a.reps):
                redis.cli("FLUSHALL")
                r0 = proc_cpu_s(redis.proc.pid)
                argv = ["node", str(runner), "prod", mode, str(n), *MODES[mode]]
                proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, text=True)
                assert proc.stdout is not None
                out = proc.stdout.read()
                _, status, usage = os.wait4(proc.pid, 0)
                if status != 0:
                    raise SystemExit(f"the BullMQ runner failed ({status})")
                r1 = proc_cpu_s(redis.proc.pid)
                res = json.loads([line for line in out.splitlines() if line.startswith("{")][-1])
                rows.append(
                    {
                        "jobs_per_s": res["jobs_per_s"],
                        "node_us_per_job": (usage.ru_utime + usage.ru_stime) / n * 1e6,
                        "redis_us_per_job": (r1 - r0) / n * 1e6,
                    }
                )
            med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
            med["total_us_per_job"] = med["node_us_per_job"] + med["redis_us_per_job"]
            med["cores_busy"] = med["total_us_per_job"] * med["jobs_per_s"] / 1e6
            table[mode] = med
    finally:
        redis.stop()
    print(f"\nBullMQ, medians of {a.reps}; CPU µs per job (Node includes its start-up)")
    print(f"{'mode':7s} {'jobs/s':>8s} {'node':>6s} {'redis':>6s} {'total':>6s} {'cores busy':>10s}")
    for mode, m in table.items():
        print(
            f"{mode:7s} {m['jobs_per_s']:8,.0f} {m['node_us_per_job']:6.1f} {m['redis_us_per_job']:6.1f}"
            f" {m['total_us_per_job']:6.1f} {m['cores_busy']:10.2f}"
        )
    if a.json:
        with open(a.json, "a") as f:
            f.write(json.dumps({"metric": "bullmq_cpu", "n": a.n, "reps": a.reps, "figures": table}) + "\n")


if __name__ == "__main__":
    main()
