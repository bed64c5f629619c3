"""structlog set-up: JSON lines in production, readable lines on a terminal.

Context (job_id, queue, attempt, worker, rpc...) lives in contextvars, so every
line logged while handling a job or an RPC carries it.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
#: The lowest level written, as configured (everything until configure() is called, as structlog does).
_level = logging.NOTSET


def enabled_for(level: int) -> bool:
    """Whether lines at ``level`` are written: a guard for hot paths, where even a filtered-out call
    costs microseconds (the module logger is a lazy proxy resolving the method on each call)."""
    return level >= _level


def console_colors() -> bool:
    """ANSI colours in console lines: never with NO_COLOR, always with FORCE_COLOR, else only on a terminal."""
    if os.environ.get("NO_COLOR"):
        return False
    return bool(os.environ.get("FORCE_COLOR")) or sys.stdout.isatty()


def configure(service: str, level: str = "info", fmt: str = "auto", cache: bool = True) -> None:
    """Configure structlog once per process.

    Args:
        service: Added to every line as ``service``.
        level: Lowest level written.
        fmt: "json", "console", or "auto" (JSON unless stdout is a terminal).
        cache: Cache loggers on first use; tests turn this off so capture_logs sees them.
    """
    global _level
    _level = _LEVELS[level]
    use_json = fmt == "json" or (fmt == "auto" and not sys.stdout.isatty())

    def add_service(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
        event.setdefault("service", service)
        return event

    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        add_service,
    ]
    if use_json:
        processors += [structlog.processors.dict_tracebacks, structlog.processors.JSONRenderer()]
    else:
        # Plain tracebacks: with rich installed (the CLI's) structlog would render each one as a
        # rich panel, which costs about 0.2 s per failed job in a worker logging to a console.
        processors.append(
            structlog.dev.ConsoleRenderer(colors=console_colors(), exception_formatter=structlog.dev.plain_traceback)
        )
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(sys.stdout),
        cache_logger_on_first_use=cache,
    )


def get_logger(name: str) -> Any:
    """A logger for a module."""
    return structlog.get_logger(name)
