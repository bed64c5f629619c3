"""Parsing what people type: durations, payloads, labels, times, job states."""

from __future__ import annotations

import json
import re
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import click

from conveyor.v1 import job_pb2

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


class Duration(click.ParamType[timedelta, Any]):
    """``250ms``, ``30s``, ``5m``, ``2h``, ``1d`` or plain seconds."""

    name = "duration"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> timedelta:
        if isinstance(value, timedelta):
            return value
        match = _DURATION.match(str(value))
        if not match:
            self.fail(f"{value!r} is not a duration (say 250ms, 30s, 5m, 2h or 1d)", param, ctx)
        return timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2)])


class Instant(click.ParamType[datetime, Any]):
    """An ISO 8601 time; without a zone it is UTC."""

    name = "time"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> datetime:
        if isinstance(value, datetime):
            return value
        try:
            parsed = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
        except ValueError:
            self.fail(f"{value!r} is not an ISO 8601 time (say 2026-12-05T14:00:00Z)", param, ctx)
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


class State(click.ParamType[int, Any]):
    """A job state by name: ``queued``, ``active``, ``failed``, ... (any case)."""

    name = "state"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        name = "JOB_STATE_" + str(value).upper().removeprefix("JOB_STATE_")
        try:
            return int(job_pb2.JobState.Value(name))
        except ValueError:
            choices = ", ".join(state_name(s) for s in job_pb2.JobState.values() if s)
            self.fail(f"{value!r} is not a job state ({choices})", param, ctx)


DURATION = Duration()
INSTANT = Instant()
STATE = State()


def state_name(state: int) -> str:
    """``JOB_STATE_DEAD_LETTERED`` -> ``dead_lettered``."""
    return job_pb2.JobState.Name(state).removeprefix("JOB_STATE_").lower()  # type: ignore[arg-type]


def read_payload(spec: str | None) -> dict[str, Any]:
    """The payload from ``--payload``: inline JSON, ``@file`` or ``-`` for standard input."""
    if spec is None:
        return {}
    if spec == "-":
        text, origin = sys.stdin.read(), "standard input"
    elif spec.startswith("@"):
        path = Path(spec[1:])
        try:
            text, origin = path.read_text(), str(path)
        except OSError as exc:
            raise click.BadParameter(f"cannot read {path}: {exc.strerror}", param_hint="--payload") from None
    else:
        text, origin = spec, "--payload"
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(
            f"{origin} is not JSON: {exc.msg} at line {exc.lineno}", param_hint="--payload"
        ) from None
    if not isinstance(value, dict):
        raise click.BadParameter(f"{origin} must be a JSON object", param_hint="--payload")
    return value


def read_labels(pairs: tuple[str, ...]) -> dict[str, str]:
    """``--label team=billing --label env=prod``."""
    labels: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint="--label")
        labels[key] = value
    return labels
