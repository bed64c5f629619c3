"""What every command shares: the addresses, --json, running a coroutine, and errors as one line."""

from __future__ import annotations

import asyncio
import functools
import sys
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, ParamSpec, TypeVar

import click

from conveyor.common.client import ConveyorClient
from conveyor.common.errors import ConveyorError, InvalidArgument
from conveyor.common.tls import ClientTLS

P = ParamSpec("P")
T = TypeVar("T")

#: Exit codes, as the README lists them.
OK = 0
ERROR = 1  # the service said no, or could not be reached (one line on standard error)
USAGE = 2  # click's own: a bad option or argument
JOB_FAILED = 3
JOB_DEAD_LETTERED = 4
JOB_CANCELLED = 5
INTERRUPTED = 130  # Ctrl-C: watching stopped, the job did not


@dataclass
class Settings:
    producer: str
    results: str
    json: bool
    timeout: float
    token: str = ""
    #: How to dial: --tls, --cacert, --cert, --key, --servername (or their CONVEYOR_TLS* variables).
    tls: ClientTLS = field(default_factory=ClientTLS)

    def client(self) -> ConveyorClient:
        # One job at a time from a terminal: no coalescing, and a short retry budget so that a
        # stack that is down is reported within seconds.
        return ConveyorClient(
            self.producer,
            self.results,
            timeout=self.timeout,
            retries=2,
            coalesce=False,
            token=self.token,
            tls=self.tls,
        )


def json_option(fn: Callable[P, T]) -> Callable[P, T]:
    """``--json`` on a command as well as before it (``conveyor get ID --json``)."""

    def remember(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
        if value:
            settings = ctx.find_object(Settings)
            if settings is not None:
                settings.json = True

    return click.option(
        "--json", "json_", is_flag=True, expose_value=False, callback=remember, help="Print JSON for scripts."
    )(fn)


def command(fn: Callable[..., Coroutine[Any, Any, int]]) -> Callable[..., None]:
    """Run an async command body with the Settings, exit with its code, errors as one line."""

    @json_option
    @click.pass_obj
    @functools.wraps(fn)
    def run(settings: Settings, *args: Any, **kwargs: Any) -> None:
        try:
            code: int = asyncio.run(fn(settings, *args, **kwargs))
        except ConveyorError as exc:
            click.echo(f"error: {describe(exc)}", err=True)
            raise SystemExit(ERROR) from None
        except KeyboardInterrupt:
            raise SystemExit(INTERRUPTED) from None
        raise SystemExit(code)

    return run


def describe(exc: ConveyorError) -> str:
    """``NOT_FOUND: job default/01... not found``; an invalid field is named as the server named it."""
    code = exc.code.name
    if isinstance(exc, InvalidArgument):
        return f"{code}: " + "; ".join(f"{field}: {why}" for field, why in exc.violations.items())
    return f"{code}: {exc.message}"


def confirm_many(settings: Settings, what: str, count: int, yes: bool) -> None:
    """Ask before changing more than one job; without a terminal, insist on --yes."""
    if count <= 1 or yes:
        return
    if not sys.stdin.isatty():
        raise click.UsageError(f"{what} would change {count} jobs: add --yes to do it without asking")
    if not click.confirm(f"{what}: {count} jobs. Go on?", default=False, err=True):
        raise SystemExit(ERROR)
