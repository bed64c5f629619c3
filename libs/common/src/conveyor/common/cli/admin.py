"""Commands about queues and workers: stats, queues, workers, pause, resume, limits, dlq."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import ParamSpec, TypeVar

import click
from google.protobuf.duration_pb2 import Duration

from conveyor.common.cli import output
from conveyor.common.cli.context import OK, Settings, command, confirm_many
from conveyor.common.cli.options import DURATION
from conveyor.v1 import limits_pb2

P = ParamSpec("P")
T = TypeVar("T")


def _secs(d: Duration) -> str:
    total = d.seconds + d.nanos / 1e9
    return f"{total:g}s"


def _rate(rate: limits_pb2.RateLimit) -> str:
    return f"{rate.limit}/{_secs(rate.period)}" if rate.limit else ""


@click.command()
@click.argument("queue")
@command
async def stats(settings: Settings, queue: str) -> int:
    """QUEUE's live counts by state (one instant) and its recently finished jobs."""
    async with settings.client() as client:
        response = await client.get_queue_stats(queue)
    if settings.json:
        output.print_json(response)
        return OK
    s = response.stats
    output.fields(
        f"{s.queue}{' (paused)' if s.paused else ''}",
        [
            ("queued", str(s.queued)),
            ("delayed", str(s.delayed)),
            ("retry scheduled", str(s.retry_scheduled)),
            ("active", str(s.active)),
            ("dead-lettered", str(s.dead_lettered)),
            ("workers", str(s.workers)),
            ("oldest queued", output.when(s.oldest_queued_time)),
            ("next due", output.when(s.next_due_time)),
            ("bands", ", ".join(f"p{b.priority}: {b.queued} queued/{b.active} active" for b in s.bands)),
        ],
    )
    if response.HasField("finished"):
        output.table(
            "finished",
            ["window", "succeeded", "failed", "jobs/s"],
            [(_secs(w.window), w.succeeded, w.failed, f"{w.jobs_per_second:.3g}") for w in response.finished.windows],
        )
    elif response.finished_unavailable:
        output.err.print(f"finished jobs unavailable: {response.finished_unavailable}")
    return OK


@click.command()
@command
async def queues(settings: Settings) -> int:
    """Every known queue with its live counts."""
    async with settings.client() as client:
        found = await client.list_queues()
    if settings.json:
        output.print_json(found)
        return OK
    output.table(
        None,
        ["queue", "paused", "queued", "delayed", "retry", "active", "dead", "workers"],
        [
            (
                q.queue,
                "yes" if q.paused else "",
                q.queued,
                q.delayed,
                q.retry_scheduled,
                q.active,
                q.dead_lettered,
                q.workers,
            )
            for q in found
        ],
    )
    return OK


@click.command()
@click.option("--queue", "-q", default="", help="Only workers serving this queue.")
@command
async def workers(settings: Settings, queue: str) -> int:
    """The live worker processes and the jobs they run."""
    async with settings.client() as client:
        found = await client.list_workers(queue)
    if settings.json:
        output.print_json(found)
        return OK
    output.table(
        None,
        ["worker", "host", "pid", "queues", "in flight", "concurrency", "last heartbeat"],
        [
            (
                w.worker_id,
                w.host,
                w.pid,
                ",".join(w.queues),
                w.in_flight,
                w.concurrency,
                output.when(w.last_heartbeat_time),
            )
            for w in found
        ],
    )
    return OK


@click.command()
@click.argument("queue")
@command
async def pause(settings: Settings, queue: str) -> int:
    """Pause QUEUE: enqueues are kept, running jobs finish, nothing new starts."""
    return await _set_paused(settings, queue, True)


@click.command()
@click.argument("queue")
@command
async def resume(settings: Settings, queue: str) -> int:
    """Resume QUEUE: workers start its jobs again at once."""
    return await _set_paused(settings, queue, False)


async def _set_paused(settings: Settings, queue: str, paused: bool) -> int:
    async with settings.client() as client:
        changed = await (client.pause_queue if paused else client.resume_queue)(queue)
    if settings.json:
        output.print_json({"queue": queue, "paused": paused, "changed": changed})
    elif paused:
        output.out.print(f"{queue}: paused" + ("" if changed else " (it was already)"))
    else:
        output.out.print(f"{queue}: resumed" + ("" if changed else " (it was not paused)"))
    return OK


@click.group()
def limits() -> None:
    """Rate limits, concurrency caps and back-offs (show, set-rate, set-concurrency, clear-rate,
    clear-concurrency, backoff, clear-backoff)."""


def _scope_options(fn: Callable[P, T]) -> Callable[P, T]:
    fn = click.option("--key", default=None, help="Only this rate key.")(fn)
    return click.option("--each-key", is_flag=True, help="Each rate key by default.")(fn)


def _show_limits(settings: Settings, found: limits_pb2.QueueLimits) -> None:
    if settings.json:
        output.print_json(found)
        return
    output.fields(
        found.queue,
        [
            ("rate", _rate(found.rate)),
            ("concurrency", str(found.concurrency or "")),
            ("rate per key", _rate(found.rate_per_key)),
            ("concurrency per key", str(found.concurrency_per_key or "")),
            ("running", str(found.running)),
            ("default priority", str(found.default_priority or "")),
            ("backed off until", output.when(found.backed_off_until)),
        ],
    )
    if found.keys:
        output.table(
            "keys", ["key", "rate", "concurrency"], [(k.key, _rate(k.rate), k.concurrency or "") for k in found.keys]
        )
    if found.blocked_keys:
        output.table(
            "held back",
            ["key", "until", "waiting"],
            [(b.key, output.when(b.until), b.waiting) for b in found.blocked_keys],
        )


@limits.command(name="show")
@click.argument("queue")
@command
async def limits_show(settings: Settings, queue: str) -> int:
    """QUEUE's limits and the keys held back now."""
    async with settings.client() as client:
        _show_limits(settings, await client.get_limits(queue))
    return OK


@limits.command(name="set-rate")
@click.argument("queue")
@click.argument("limit", type=click.IntRange(min=1))
@click.argument("period", type=DURATION)
@_scope_options
@command
async def limits_set_rate(
    settings: Settings, queue: str, limit: int, period: timedelta, key: str | None, each_key: bool
) -> int:
    """At most LIMIT starts per PERIOD (of QUEUE, each key, or one key)."""
    async with settings.client() as client:
        _show_limits(settings, await client.set_rate_limit(queue, limit, period, key=key, each_key=each_key))
    return OK


@limits.command(name="set-concurrency")
@click.argument("queue")
@click.argument("limit", type=click.IntRange(min=1))
@_scope_options
@command
async def limits_set_concurrency(settings: Settings, queue: str, limit: int, key: str | None, each_key: bool) -> int:
    """At most LIMIT jobs running at once (of QUEUE, each key, or one key)."""
    async with settings.client() as client:
        _show_limits(settings, await client.set_concurrency_limit(queue, limit, key=key, each_key=each_key))
    return OK


@limits.command(name="clear-rate")
@click.argument("queue")
@_scope_options
@command
async def limits_clear_rate(settings: Settings, queue: str, key: str | None, each_key: bool) -> int:
    """Remove a rate limit."""
    return await _clear(settings, queue, "rate", key, each_key)


@limits.command(name="clear-concurrency")
@click.argument("queue")
@_scope_options
@command
async def limits_clear_concurrency(settings: Settings, queue: str, key: str | None, each_key: bool) -> int:
    """Remove a concurrency cap."""
    return await _clear(settings, queue, "concurrency", key, each_key)


async def _clear(settings: Settings, queue: str, which: str, key: str | None, each_key: bool) -> int:
    async with settings.client() as client:
        clear = client.clear_rate_limit if which == "rate" else client.clear_concurrency_limit
        changed = await clear(queue, key=key, each_key=each_key)
        if settings.json:
            _show_limits(settings, await client.get_limits(queue))
        else:
            output.out.print("cleared" if changed else "there was none")
    return OK


@limits.command(name="backoff")
@click.argument("queue")
@click.argument("duration", type=DURATION)
@click.option("--key", default="", help="Only this rate key (default: the whole queue).")
@command
async def limits_backoff(settings: Settings, queue: str, duration: timedelta, key: str) -> int:
    """Start nothing of QUEUE (or of one key) for DURATION; running jobs go on."""
    async with settings.client() as client:
        until = await client.back_off(queue, duration, key=key)
        if settings.json:
            _show_limits(settings, await client.get_limits(queue))
        else:
            scope = f"{queue} key {key}" if key else queue
            output.out.print(f"{scope}: backed off until {until.astimezone():%Y-%m-%d %H:%M:%S}")
    return OK


@limits.command(name="clear-backoff")
@click.argument("queue")
@click.option("--key", default="", help="Only this rate key's back-off (default: the whole queue's).")
@command
async def limits_clear_backoff(settings: Settings, queue: str, key: str) -> int:
    """End a back-off of QUEUE (or of one key) now: its waiting jobs start at once."""
    async with settings.client() as client:
        changed = await client.clear_back_off(queue, key=key)
        if settings.json:
            _show_limits(settings, await client.get_limits(queue))
        else:
            output.out.print("cleared" if changed else "there was none")
    return OK


@click.group()
def dlq() -> None:
    """Dead letters: list, retry, purge."""


@dlq.command(name="list")
@click.argument("queue")
@click.option("--limit", type=click.IntRange(1, 1000), default=50, show_default=True)
@click.option("--page", "page_token", default="", help="The page token a previous call printed.")
@command
async def dlq_list(settings: Settings, queue: str, limit: int, page_token: str) -> int:
    """QUEUE's dead letters, oldest first."""
    async with settings.client() as client:
        page = await client.list_dead_letters(queue, limit, page_token)
    if settings.json:
        output.print_json(page)
        return OK
    output.table(
        None,
        ["job", "type", "attempt", "dead since", "why"],
        [
            (d.job.id, d.job.type, d.event.attempt, output.when(d.dead_at), output.event_detail(d.event))
            for d in page.dead_letters
        ],
    )
    if page.next_page_token:
        output.err.print(f"more: --page {page.next_page_token}")
    return OK


async def _dead_count(settings: Settings, queue: str) -> int:
    async with settings.client() as client:
        return int((await client.get_queue_stats(queue)).stats.dead_lettered)


def _dlq_change(verb: str) -> Callable[[Callable[P, T]], Callable[P, T]]:
    def decorate(fn: Callable[P, T]) -> Callable[P, T]:
        fn = click.option("--yes", "-y", is_flag=True, help="Do not ask before changing more than one job.")(fn)
        fn = click.option("--all", "all_", is_flag=True, help=f"{verb} every dead letter of the queue.")(fn)
        fn = click.argument("job_ids", nargs=-1)(fn)
        return click.argument("queue")(fn)

    return decorate


def _which(job_ids: tuple[str, ...], all_: bool) -> None:
    if bool(job_ids) == all_:
        raise click.UsageError("name the jobs (JOB_ID ...) or give --all, not both")


@dlq.command(name="retry")
@_dlq_change("Retry")
@command
async def dlq_retry(settings: Settings, queue: str, job_ids: tuple[str, ...], all_: bool, yes: bool) -> int:
    """Put dead letters of QUEUE back as new attempts of the same jobs."""
    _which(job_ids, all_)
    confirm_many(
        settings, f"retry dead letters of {queue}", await _dead_count(settings, queue) if all_ else len(job_ids), yes
    )
    retried: list[str] = []
    async with settings.client() as client:
        if all_:
            retried = await client.retry_dead_letters(queue, all=True)
        else:
            for job_id in job_ids:
                retried += await client.retry_dead_letters(queue, job_id)
    if settings.json:
        output.print_json({"queue": queue, "jobIds": retried})
    else:
        output.out.print(f"{len(retried)} queued again" + "".join(f"\n  {j}" for j in retried))
    return OK


@dlq.command(name="purge")
@_dlq_change("Purge")
@command
async def dlq_purge(settings: Settings, queue: str, job_ids: tuple[str, ...], all_: bool, yes: bool) -> int:
    """Delete dead letters of QUEUE for good (their history stays in PostgreSQL)."""
    _which(job_ids, all_)
    confirm_many(
        settings, f"purge dead letters of {queue}", await _dead_count(settings, queue) if all_ else len(job_ids), yes
    )
    purged = 0
    async with settings.client() as client:
        if all_:
            purged = await client.purge_dead_letters(queue, all=True)
        else:
            for job_id in job_ids:
                purged += await client.purge_dead_letters(queue, job_id)
    if settings.json:
        output.print_json({"queue": queue, "purged": purged})
    else:
        output.out.print(f"{purged} purged")
    return OK
