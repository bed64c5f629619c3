"""The jobs page's filter: its query parameters as one ListJobsRequest.

:func:`list_jobs_request` is the only place that reads the filter from a page's query string,
so that whatever lists jobs (the page, or an action on everything the filter matches) asks
ResultsService for exactly the same jobs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime

from conveyor.common.errors import InvalidArgument
from conveyor.common.search import parse_label, parse_where
from conveyor.dashboard.views import JOB_STATES
from conveyor.v1 import job_pb2, results_service_pb2

#: Query parameters that hold the filter (``where`` and ``label`` may repeat); anything else is not a filter.
FILTER_PARAMS = ("queue", "state", "type", "created_after", "created_before", "where", "label")


def filter_pairs(items: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """The (parameter, value) pairs of a query string that make the filter, in order (``where``, ``label`` repeat)."""
    return [(k, v) for k, v in items if k in FILTER_PARAMS and v.strip()]


def list_jobs_request(
    params: Mapping[str, str] | Sequence[tuple[str, str]], page_size: int = 0, page_token: str = ""
) -> results_service_pb2.ListJobsRequest:
    """The ListJobsRequest for a jobs page's query parameters (a mapping, or pairs when keys repeat).

    ``queue``, ``state`` (a JobState name without its prefix), ``type``, ``created_after`` and
    ``created_before`` (ISO 8601, UTC when no offset is given), every ``where`` (a payload condition
    such as ``customer.id=42``, conveyor.common.search) and every ``label`` (``KEY=VALUE``). Empty
    values are ignored; values are passed on as they are, for ResultsService to validate.

    Raises:
        InvalidArgument: A state, time, condition or label that cannot be read, by parameter name.
    """
    pairs = list(params.items()) if isinstance(params, Mapping) else list(params)
    request = results_service_pb2.ListJobsRequest(page_size=page_size, page_token=page_token)
    problems: dict[str, str] = {}
    for key, raw in pairs:
        value = raw.strip()
        if not value:
            continue
        if key in ("queue", "type"):
            setattr(request, key, value)
        elif key == "state":
            if value not in JOB_STATES:
                problems["state"] = f"must be one of {', '.join(JOB_STATES)}"
            else:
                request.state = job_pb2.JobState.Value(f"JOB_STATE_{value}")
        elif key in ("created_after", "created_before"):
            try:
                moment = datetime.fromisoformat(value)
            except ValueError:
                problems[key] = f"must be a date and time like 2026-12-05T13:00, got {value!r}"
                continue
            getattr(request, key).FromDatetime(moment if moment.tzinfo else moment.replace(tzinfo=UTC))
        elif key == "where":
            try:
                request.where.append(parse_where(value))
            except ValueError as exc:
                problems["where"] = str(exc)
        elif key == "label":
            try:
                label_key, label_value = parse_label(value)
            except ValueError as exc:
                problems["label"] = str(exc)
                continue
            request.labels[label_key] = label_value
    if problems:
        raise InvalidArgument(problems)
    return request
