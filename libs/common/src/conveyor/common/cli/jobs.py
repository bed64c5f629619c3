"""Commands about jobs: enqueue, watch, get, events, jobs, cancel."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import click
from google.protobuf.timestamp_pb2 import Timestamp
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from conveyor.common.cli import output
from conveyor.common.cli.context import (
    JOB_CANCELLED,
    JOB_DEAD_LETTERED,
    JOB_FAILED,
    OK,
    Settings,
    command,
)
from conveyor.common.cli.options import DURATION, INSTANT, STATE, read_labels, read_payload
from conveyor.common.client import ConveyorClient
from conveyor.common.errors import InvalidArgument
from conveyor.common.search import parse_labels, parse_where
from conveyor.v1 import event_pb2, job_pb2

E = event_pb2

#: A final event's exit code: `conveyor watch` says the outcome.
OUTCOME_CODES = {
    E.EVENT_TYPE_SUCCEEDED: OK,
    E.EVENT_TYPE_FAILED: JOB_FAILED,
    E.EVENT_TYPE_DEAD_LETTERED: JOB_DEAD_LETTERED,
    E.EVENT_TYPE_CANCELLED: JOB_CANCELLED,
}


@click.command()
@click.argument("type_", metavar="TYPE")
@click.option("--queue", "-q", default="default", show_default=True, help="Queue to put the job on.")
@click.option("--payload", "-p", metavar="JSON|@FILE|-", help="The payload: inline JSON, @file, or - for stdin.")
@click.option(
    "--priority", type=click.IntRange(0, 9), default=0, help="1 (lowest) to 9 (highest); 0: the queue's default."
)
@click.option("--delay", type=DURATION, help="Start no sooner than this from now (30s, 5m, 2h).")
@click.option("--run-at", type=INSTANT, help="Start no sooner than this time (ISO 8601).")
@click.option("--idempotency-key", help="The same key within its window returns the same job.")
@click.option("--idempotency-window", type=DURATION, help="How long the key is honoured (default 24h).")
@click.option("--rate-key", default="", help="Flow-control key (a tenant, an API) for per-key limits.")
@click.option("--max-attempts", type=click.IntRange(min=0), default=0, help="Attempts in all; 0: the default.")
@click.option("--timeout", "job_timeout", type=DURATION, help="Longest one attempt may run.")
@click.option("--label", "labels", multiple=True, metavar="KEY=VALUE", help="A label; repeat for more.")
@click.option("--watch", "-w", is_flag=True, help="Then follow it live; the exit code says how it ended.")
@command
async def enqueue(
    settings: Settings,
    type_: str,
    queue: str,
    payload: str | None,
    priority: int,
    delay: timedelta | None,
    run_at: datetime | None,
    idempotency_key: str | None,
    idempotency_window: timedelta | None,
    rate_key: str,
    max_attempts: int,
    job_timeout: timedelta | None,
    labels: tuple[str, ...],
    watch: bool,
) -> int:
    """Enqueue a job of TYPE; prints its id."""
    if delay is not None and run_at is not None:
        raise click.UsageError("give --delay or --run-at, not both")
    request = ConveyorClient.request(
        queue,
        type_,
        read_payload(payload),
        idempotency_key=idempotency_key,
        priority=priority,
        timeout=job_timeout,
        max_attempts=max_attempts,
        labels=read_labels(labels),
        rate_key=rate_key,
        delay=delay,
    )
    if run_at is not None:
        request.run_at.FromDatetime(run_at)
    if idempotency_window is not None:
        request.idempotency_window.FromTimedelta(idempotency_window)
    async with settings.client() as client:
        response = await client.submit(request)
        if settings.json and not watch:
            output.print_json(response)
        elif settings.json:
            output.print_json_line(response)
        else:
            created = "" if response.created else " (already enqueued: same idempotency key)"
            output.out.print(f"{response.job_id}{created}")
        if watch:
            return await _follow(settings, client, response.job_id)
    return OK


@click.command()
@click.argument("job_id")
@click.option("--after", "after_event_id", default="", help="Resume after this event id.")
@command
async def watch(settings: Settings, job_id: str, after_event_id: str) -> int:
    """Follow JOB_ID live until it ends (Ctrl-C stops watching, not the job).

    Exit code: 0 succeeded, 3 failed, 4 dead-lettered, 5 cancelled.
    """
    async with settings.client() as client:
        return await _follow(settings, client, job_id, after_event_id)


async def _follow(settings: Settings, client: ConveyorClient, job_id: str, after_event_id: str = "") -> int:
    if settings.json:
        code = OK
        async for event in client.watch(job_id, after_event_id):
            output.print_json_line(event)
            code = OUTCOME_CODES.get(event.type, code)
        return code
    bar = Progress(
        TextColumn("[bold]{task.fields[state]:<15}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(),
        TextColumn("{task.description}"),
        console=output.err if not output.out.is_terminal else output.out,
        transient=False,
    )
    code = OK
    last: event_pb2.JobEvent | None = None
    with bar:
        task = bar.add_task(job_id, total=100, state="waiting")
        async for event in client.watch(job_id, after_event_id):
            last = event
            _show(bar, task, event)
            code = OUTCOME_CODES.get(event.type, code)
    if last is not None:
        _outcome(last)
    return code


def _show(bar: Progress, task: Any, event: event_pb2.JobEvent) -> None:
    name = output.event_name(event.type)
    attempt = f"attempt {event.attempt}" if event.attempt else ""
    if event.type == E.EVENT_TYPE_PROGRESS:
        bar.update(task, completed=event.progress.percent, state=f"running ({attempt})" if attempt else "running",
                   description=event.progress.message)  # fmt: skip
    elif event.type == E.EVENT_TYPE_ACTIVE:
        bar.update(task, completed=0, state="running", description=f"{attempt} on {event.worker}".strip())
    elif event.type == E.EVENT_TYPE_RETRY_SCHEDULED:
        bar.update(task, state="retry scheduled", description=output.event_detail(event))
    elif event.type == E.EVENT_TYPE_SUCCEEDED:
        bar.update(task, completed=100, state=name, description=attempt)
    else:
        bar.update(task, state=name, description=output.event_detail(event) or attempt)


def _outcome(event: event_pb2.JobEvent) -> None:
    """The final line: the result, or the error that ended the job."""
    if event.type not in OUTCOME_CODES:
        return
    detail = output.event_detail(event)
    output.out.print(f"{output.event_name(event.type)}" + (f": {detail}" if detail else ""))


@click.command()
@click.argument("job_id")
@command
async def get(settings: Settings, job_id: str) -> int:
    """Show JOB_ID: state, attempt, payload, result or error."""
    async with settings.client() as client:
        job = await client.get_job(job_id)
    if settings.json:
        output.print_json(job)
        return OK
    output.fields(
        job.id,
        [
            ("queue", job.queue),
            ("type", job.type),
            ("state", output.state(job.state)),
            ("attempt", job.attempt),
            ("priority", job.priority),
            ("rate key", job.rate_key),
            ("labels", ", ".join(f"{k}={v}" for k, v in sorted(job.labels.items()))),
            ("created", output.when(job.created_at)),
            ("run at", output.when(job.run_at)),
            ("started", output.when(job.started_at)),
            ("finished", output.when(job.finished_at)),
            ("worker", job.worker),
            ("progress", f"{job.progress.percent:.0f}% {job.progress.message}" if job.HasField("progress") else ""),
            ("payload", job.payload_json.decode(errors="replace") if job.payload_json else ""),
            ("result", output.as_dict(job)["result"] if job.HasField("result") else ""),
            ("error", f"{job.error.kind}: {job.error.message}" if job.error.message else ""),
        ],
    )
    return OK


@click.command()
@click.argument("job_id")
@command
async def events(settings: Settings, job_id: str) -> int:
    """JOB_ID's history as recorded in PostgreSQL, oldest first."""
    found: list[event_pb2.JobEvent] = []
    after = ""
    async with settings.client() as client:
        while True:
            page = await client.list_job_events(job_id, after_event_id=after, page_size=1000)
            found += page.events
            if not page.has_more or not page.events:
                break
            after = page.events[-1].id
    if settings.json:
        output.print_json(found)
        return OK
    output.table(
        job_id,
        ["time", "event", "attempt", "worker", "detail"],
        [
            (output.when(e.time), output.event_name(e.type), e.attempt or "", e.worker, output.event_detail(e))
            for e in found
        ],
    )
    return OK


@click.command(name="jobs")
@click.option("--queue", "-q", default="", help="Only this queue.")
@click.option("--state", "state_", type=STATE, help="Only jobs in this state (queued, active, failed, ...).")
@click.option("--type", "type_", default="", help="Only jobs of this type.")
@click.option("--since", type=INSTANT, help="Created at or after this time.")
@click.option("--until", type=INSTANT, help="Created before this time.")
@click.option(
    "--where",
    "-w",
    "where",
    multiple=True,
    metavar="COND",
    help="A condition on a payload field; repeat for more (all must hold): "
    "customer.id=42, tier!=gold, amount<10 (<= > >=), tags@>urgent (contains), ?customer.vip (exists). "
    'The value is JSON when it parses as JSON (42, true, null, "42"), else a string. '
    "Payloads reach PostgreSQL with the outcome, so these match finished jobs.",
)
@click.option("--label", "-l", "labels", multiple=True, metavar="KEY=VALUE", help="Only jobs with this label; repeat.")
@click.option("--limit", type=click.IntRange(1, 1000), default=50, show_default=True, help="Jobs per page.")
@click.option("--page", "page_token", default="", help="The page token a previous call printed.")
@command
async def list_jobs(
    settings: Settings,
    queue: str,
    state_: int | None,
    type_: str,
    since: datetime | None,
    until: datetime | None,
    where: tuple[str, ...],
    labels: tuple[str, ...],
    limit: int,
    page_token: str,
) -> int:
    """Jobs recorded in PostgreSQL, newest first, a page at a time.

    \b
    conveyor jobs --where customer.id=42 --label team=billing
    conveyor jobs -q emails --state failed --where 'order.total>=100' --where '?customer.vip'
    """
    filters: dict[str, Any] = {"queue": queue, "type": type_, "page_size": limit, "page_token": page_token}
    try:
        filters["where"] = [parse_where(w) for w in where]
    except ValueError as exc:
        raise InvalidArgument({"--where": str(exc)}) from None
    try:
        filters["labels"] = parse_labels(labels)
    except ValueError as exc:
        raise InvalidArgument({"--label": str(exc)}) from None
    if state_:
        filters["state"] = state_
    for field, value in (("created_after", since), ("created_before", until)):
        if value is not None:
            filters[field] = Timestamp()
            filters[field].FromDatetime(value)
    async with settings.client() as client:
        page = await client.list_jobs(**filters)
    if settings.json:
        output.print_json(page)
        return OK
    output.table(
        None,
        ["job", "type", "state", "attempt", "created", "finished"],
        [
            (j.id, j.type, output.state(j.state), j.attempt, output.when(j.created_at), output.when(j.finished_at))
            for j in page.jobs
        ],
    )
    if page.next_page_token:
        output.err.print(f"more: --page {page.next_page_token}")
    return OK


@click.command()
@click.argument("job_id")
@click.option("--reason", default="", help="Why; recorded with the CANCELLED event.")
@command
async def cancel(settings: Settings, job_id: str, reason: str) -> int:
    """Cancel JOB_ID: a waiting job never runs, a running one is asked to stop."""
    async with settings.client() as client:
        state = await client.cancel_job(job_id, reason)
    if settings.json:
        output.print_json({"jobId": job_id, "state": job_pb2.JobState.Name(state)})
    elif state == job_pb2.JOB_STATE_CANCELLED:
        output.out.print(f"{job_id}: cancelled")
    else:
        output.out.print(f"{job_id}: asked to stop (it is {output.state(state)}; it ends cancelled)")
    return OK
