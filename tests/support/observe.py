"""Reading what the test.observe handler recorded in Redis (works across worker processes)."""

from __future__ import annotations

import redis.asyncio


async def starts(r: redis.asyncio.Redis, group: str) -> list[tuple[float, str, int]]:
    """(wall time, job id, jobs of the group running then) for each start, in order."""
    rows = []
    for raw in await r.lrange(f"obs:{group}:starts", 0, -1):
        t, job_id, level = raw.decode().split()
        rows.append((float(t), job_id, int(level)))
    return rows


async def started(r: redis.asyncio.Redis, group: str, n: int) -> bool:
    return int(await r.llen(f"obs:{group}:starts")) >= n


async def done(r: redis.asyncio.Redis, group: str, n: int) -> bool:
    return int(await r.llen(f"obs:{group}:done")) >= n


def most_in_window(times_ms: list[int], window_ms: int) -> int:
    """The most of ``times_ms`` falling in any window [t, t + window_ms) (ms resolution)."""
    times = sorted(times_ms)
    most, j = 0, 0
    for i, t in enumerate(times):
        while times[j] <= t - window_ms:
            j += 1
        most = max(most, i - j + 1)
    return most
