"""The `conveyor` command group: global options, then one command per task."""

from __future__ import annotations

import click

from conveyor.common import auth
from conveyor.common.cli import admin, jobs, schedules, tokens
from conveyor.common.cli.context import Settings


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option(
    "--producer",
    envvar="CONVEYOR_PRODUCER_ADDR",
    default="127.0.0.1:50051",
    show_default=True,
    help="ProducerService address (env CONVEYOR_PRODUCER_ADDR).",
)
@click.option(
    "--results",
    envvar="CONVEYOR_RESULTS_ADDR",
    default="127.0.0.1:50052",
    show_default=True,
    help="ResultsService address, for history (env CONVEYOR_RESULTS_ADDR).",
)
@click.option(
    "--token",
    envvar="CONVEYOR_TOKEN",
    default="",
    show_default=False,
    help="Bearer token, when the servers check tokens (env CONVEYOR_TOKEN, or a file named by CONVEYOR_TOKEN_FILE).",
)
@click.option("--json", "json_", is_flag=True, help="Print JSON for scripts (also accepted after the command).")
@click.option("--timeout", type=float, default=10.0, show_default=True, help="Seconds each call may take.")
@click.version_option(package_name="conveyor-common", prog_name="conveyor")
@click.pass_context
def cli(ctx: click.Context, producer: str, results: str, token: str, json_: bool, timeout: float) -> None:
    """Enqueue, watch and manage Conveyor jobs from a terminal.

    Exit codes: 0 done (watch: the job succeeded), 1 the service said no or could not be
    reached, 2 bad usage, 3 the job failed, 4 dead-lettered, 5 cancelled, 130 Ctrl-C.
    """
    if not token:
        try:
            token = auth.presented_token()
        except auth.TokenFileError as exc:
            raise click.UsageError(str(exc)) from None
    ctx.obj = Settings(producer=producer, results=results, json=json_, timeout=timeout, token=token)


for command in (
    jobs.enqueue,
    jobs.watch,
    jobs.get,
    jobs.events,
    jobs.list_jobs,
    jobs.cancel,
    admin.stats,
    admin.queues,
    admin.workers,
    admin.pause,
    admin.resume,
    admin.limits,
    admin.dlq,
    schedules.schedules,
    tokens.token,
    tokens.whoami,
):
    cli.add_command(command)


def main() -> None:
    """The console script."""
    cli(prog_name="conveyor")
