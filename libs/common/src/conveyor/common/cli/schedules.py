"""Commands about schedules: list, get, create, delete, run-now, pause, resume."""

from __future__ import annotations

from datetime import datetime, timedelta

import click

from conveyor.common.cli import output
from conveyor.common.cli.context import OK, Settings, command
from conveyor.common.cli.options import DURATION, INSTANT, read_labels, read_payload
from conveyor.common.client import ConveyorClient
from conveyor.v1 import producer_service_pb2, schedule_service_pb2


def _timing(spec: schedule_service_pb2.ScheduleSpec) -> str:
    if spec.cron:
        return f"{spec.cron} ({spec.time_zone or 'UTC'})"
    return f"every {spec.interval.seconds + spec.interval.nanos / 1e9:g}s"


def _rows(found: list[schedule_service_pb2.Schedule]) -> list[tuple[str, ...]]:
    return [
        (
            s.schedule_id,
            _timing(s.spec),
            f"{s.spec.template.queue}/{s.spec.template.type}",
            "paused" if s.paused else output.when(s.next_fire_at),
            output.when(s.last_tick_at),
            s.last_job_id,
        )
        for s in found
    ]


COLUMNS = ["schedule", "when", "job", "next fire", "last tick", "last job"]


@click.group()
def schedules() -> None:
    """Repeatable jobs: list, get, create, delete, run-now, pause, resume."""


@schedules.command(name="list")
@click.option("--limit", type=click.IntRange(1, 1000), default=100, show_default=True)
@click.option("--page", "page_token", default="", help="The page token a previous call printed.")
@command
async def schedules_list(settings: Settings, limit: int, page_token: str) -> int:
    """Every schedule, in id order."""
    async with settings.client() as client:
        page = await client.list_schedules(page_size=limit, page_token=page_token)
    if settings.json:
        output.print_json(page)
        return OK
    output.table(None, COLUMNS, _rows(list(page.schedules)))
    if page.next_page_token:
        output.err.print(f"more: --page {page.next_page_token}")
    return OK


@schedules.command(name="get")
@click.argument("schedule_id")
@command
async def schedules_get(settings: Settings, schedule_id: str) -> int:
    """One schedule: its timing, job template, next and last tick."""
    async with settings.client() as client:
        found = await client.get_schedule(schedule_id)
    if settings.json:
        output.print_json(found)
    else:
        output.table(None, COLUMNS, _rows([found]))
    return OK


@schedules.command(name="create")
@click.argument("schedule_id")
@click.argument("type_", metavar="TYPE")
@click.option("--queue", "-q", default="default", show_default=True)
@click.option("--payload", "-p", metavar="JSON|@FILE|-", help="The job's payload.")
@click.option("--cron", default="", help='A 5-field cron expression, e.g. "0 9 * * MON-FRI".')
@click.option("--tz", "time_zone", default="", help="IANA time zone of --cron (default UTC).")
@click.option("--every", type=DURATION, help="A fixed interval instead of --cron.")
@click.option("--start", "start_at", type=INSTANT, help="No tick before this time.")
@click.option("--end", "end_at", type=INSTANT, help="No tick after this time.")
@click.option("--catch-up", is_flag=True, help="Missed ticks fire one job (ONCE) instead of none (SKIP).")
@click.option("--priority", type=click.IntRange(0, 9), default=0)
@click.option("--rate-key", default="")
@click.option("--label", "labels", multiple=True, metavar="KEY=VALUE")
@command
async def schedules_create(
    settings: Settings,
    schedule_id: str,
    type_: str,
    queue: str,
    payload: str | None,
    cron: str,
    time_zone: str,
    every: timedelta | None,
    start_at: datetime | None,
    end_at: datetime | None,
    catch_up: bool,
    priority: int,
    rate_key: str,
    labels: tuple[str, ...],
) -> int:
    """Create SCHEDULE_ID firing jobs of TYPE (or replace its spec: an upsert)."""
    if bool(cron) == (every is not None):
        raise click.UsageError("give --cron or --every")
    spec = ConveyorClient.schedule_spec(
        queue,
        type_,
        read_payload(payload),
        cron=cron,
        time_zone=time_zone,
        every=every,
        start_at=start_at,
        end_at=end_at,
        catch_up=catch_up,
        priority=priority,
        rate_key=rate_key,
        labels=read_labels(labels),
    )
    async with settings.client() as client:
        found, created = await client.create_schedule(schedule_id, spec)
    if settings.json:
        output.print_json({"schedule": output.as_dict(found), "created": created})
    else:
        output.out.print(
            f"{found.schedule_id}: {'created' if created else 'updated'}, next fire {output.when(found.next_fire_at)}"
        )
    return OK


@schedules.command(name="delete")
@click.argument("schedule_id")
@command
async def schedules_delete(settings: Settings, schedule_id: str) -> int:
    """Stop SCHEDULE_ID for good: no job is made for it after this returns."""
    async with settings.client() as client:
        found = await client.delete_schedule(schedule_id)
    if settings.json:
        output.print_json(found)
    else:
        output.out.print(f"{found.schedule_id}: deleted")
    return OK


@schedules.command(name="run-now")
@click.argument("schedule_id")
@command
async def schedules_run_now(settings: Settings, schedule_id: str) -> int:
    """Enqueue SCHEDULE_ID's job now, once (not a tick: the next fire time stays)."""
    async with settings.client() as client:
        found = await client.get_schedule(schedule_id)
        request = producer_service_pb2.EnqueueRequest()
        request.CopyFrom(found.spec.template)
        response = await client.submit(request)
    if settings.json:
        output.print_json(response)
    else:
        output.out.print(response.job_id)
    return OK


@schedules.command(name="pause")
@click.argument("schedule_id")
@command
async def schedules_pause(settings: Settings, schedule_id: str) -> int:
    """Stop SCHEDULE_ID firing until `schedules resume` (its spec and history stay)."""
    async with settings.client() as client:
        found, changed = await client.pause_schedule(schedule_id)
    if settings.json:
        output.print_json({"schedule": output.as_dict(found), "changed": changed})
    else:
        output.out.print(f"{found.schedule_id}: {'paused' if changed else 'already paused'}")
    return OK


@schedules.command(name="resume")
@click.argument("schedule_id")
@command
async def schedules_resume(settings: Settings, schedule_id: str) -> int:
    """Let SCHEDULE_ID fire again from its next tick after now (ticks while paused are skipped)."""
    async with settings.client() as client:
        found, changed = await client.resume_schedule(schedule_id)
    if settings.json:
        output.print_json({"schedule": output.as_dict(found), "changed": changed})
    else:
        state = "resumed" if changed else "was not paused"
        output.out.print(f"{found.schedule_id}: {state}, next fire {output.when(found.next_fire_at)}")
    return OK
