"""What commands print: a rich table for people, JSON (one document, or one per line) for scripts."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from rich.console import Console
from rich.table import Table

from conveyor.common.cli.options import state_name
from conveyor.v1 import event_pb2

#: Standard output for results; standard error for errors and hints, so `--json` output pipes clean.
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def as_dict(message: Message) -> dict[str, Any]:
    """The message as the same JSON grpcurl and buf curl print (proto3 JSON names)."""
    return MessageToDict(message, preserving_proto_field_name=False)


def print_json(value: Any) -> None:
    """One JSON document on standard output."""
    if isinstance(value, Message):
        value = as_dict(value)
    elif isinstance(value, list):
        value = [as_dict(v) if isinstance(v, Message) else v for v in value]
    sys.stdout.write(json.dumps(value, indent=2, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def print_json_line(value: Any) -> None:
    """One compact JSON document per line (streams: watch)."""
    if isinstance(value, Message):
        value = as_dict(value)
    sys.stdout.write(json.dumps(value, separators=(",", ":"), ensure_ascii=False) + "\n")
    sys.stdout.flush()


def when(ts: Timestamp) -> str:
    """A timestamp in local time to the second, or "" when unset (--json gives the exact UTC time)."""
    if not ts.seconds and not ts.nanos:
        return ""
    return datetime.fromtimestamp(ts.seconds + ts.nanos / 1e9).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def event_name(event_type: int) -> str:
    return event_pb2.EventType.Name(event_type).removeprefix("EVENT_TYPE_").lower()  # type: ignore[arg-type]


def event_detail(event: event_pb2.JobEvent) -> str:
    """The one line that says what an event carried."""
    if event.HasField("error") and event.error.message:
        kind = f"{event.error.kind}: " if event.error.kind else ""
        return f"{kind}{event.error.message}"
    if event.type == event_pb2.EVENT_TYPE_PROGRESS:
        return f"{event.progress.percent:.0f}% {event.progress.message}".strip()
    if event.result_json:
        return event.result_json.decode(errors="replace")
    if event.HasField("result"):
        return json.dumps(MessageToDict(event.result), separators=(",", ":"), ensure_ascii=False)
    if event.HasField("next_run_at"):
        return f"next run at {when(event.next_run_at)}"
    return ""


def table(title: str | None, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """A table on standard output."""
    t = Table(title=title, title_justify="left", header_style="bold")
    for i, column in enumerate(columns):
        # The first column names the row (a job or queue id): never broken across lines.
        t.add_column(column, overflow="fold", no_wrap=i == 0)
    for row in rows:
        t.add_row(*("" if v is None else str(v) for v in row))
    out.print(t)


def fields(title: str, pairs: Iterable[tuple[str, Any]]) -> None:
    """A two-column table of a record's fields, leaving out the empty ones."""
    t = Table(title=title, title_justify="left", show_header=False)
    t.add_column(style="bold")
    t.add_column(overflow="fold")
    for name, value in pairs:
        if value not in (None, "", 0, {}, []):
            t.add_row(name, str(value))
    out.print(t)


def state(value: int) -> str:
    return state_name(value)
