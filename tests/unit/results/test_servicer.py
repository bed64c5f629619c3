"""ResultsService request validation and page tokens, awaited directly (no server, no database)."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from typing import Any

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from conveyor.common.errors import InvalidArgument
from conveyor.results.queries import JobFilter, from_us, to_us
from conveyor.results.servicer import ResultsServicer, decode_page_token, encode_page_token
from conveyor.v1 import job_pb2, results_service_pb2


class NoQueries:
    """Every call is a failure: validation must refuse the request before any query."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"queried {name} for an invalid request")


servicer = ResultsServicer(NoQueries(), NoQueries())  # type: ignore[arg-type]


def test_microsecond_conversions_are_exact() -> None:
    for us in [0, 1, 1_764_000_000_123_456, -5]:
        assert to_us(from_us(us)) == us
    assert from_us(1_000_000) == datetime(1970, 1, 1, 0, 0, 1, tzinfo=UTC)


def test_page_token_round_trips_and_is_bound_to_its_filters() -> None:
    filters = JobFilter(queue="q", state=job_pb2.JOB_STATE_SUCCEEDED, created_after=from_us(5))
    created = from_us(1_764_000_000_123_456)
    token = encode_page_token(created, "q/01JDQ4ZG0000000000000000AA", filters)
    assert "=" not in token and "/" not in token and "+" not in token
    assert decode_page_token(token, filters) == (created, "q/01JDQ4ZG0000000000000000AA")
    for other in [JobFilter(queue="q"), JobFilter(queue="q", state=job_pb2.JOB_STATE_SUCCEEDED), JobFilter()]:
        with pytest.raises(InvalidArgument) as err:
            decode_page_token(token, other)
        assert list(err.value.violations) == ["page_token"]


@pytest.mark.parametrize(
    "token",
    [
        "x",
        "%%%",
        base64.urlsafe_b64encode(b"[]").decode(),
        base64.urlsafe_b64encode(json.dumps({"c": "1", "j": "a", "f": "b"}).encode()).decode(),
        base64.urlsafe_b64encode(json.dumps({"c": 10**30, "j": "a", "f": "b"}).encode()).decode(),
        base64.urlsafe_b64encode(b"\xff\xfe").decode(),
    ],
)
def test_garbage_page_tokens_are_invalid_arguments(token: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        decode_page_token(token, JobFilter())
    assert list(err.value.violations) == ["page_token"]


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"page_size": 1001}, "page_size"),
        ({"page_size": -3}, "page_size"),
        ({"queue": "a/b"}, "queue"),
        ({"state": 42}, "state"),
        ({"created_after": Timestamp(seconds=10**12)}, "created_after"),
        ({"page_token": "nonsense"}, "page_token"),
    ],
)
async def test_list_jobs_validation(request_fields: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        await servicer.ListJobs(results_service_pb2.ListJobsRequest(**request_fields), None)  # type: ignore[arg-type]
    assert field in err.value.violations


@pytest.mark.parametrize("job_id", ["", "default", "/01JDQ4ZG0000000000000000AA", "default/01jdq4zg0000000000000000aa"])
async def test_get_job_validation(job_id: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        await servicer.GetJob(results_service_pb2.ResultsServiceGetJobRequest(job_id=job_id), None)  # type: ignore[arg-type]
    assert list(err.value.violations) == ["job_id"]


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"job_id": "x"}, "job_id"),
        ({"job_id": "q/01JDQ4ZG0000000000000000AA", "after_event_id": "abc"}, "after_event_id"),
        ({"job_id": "q/01JDQ4ZG0000000000000000AA", "after_event_id": "1-2-3"}, "after_event_id"),
        ({"job_id": "q/01JDQ4ZG0000000000000000AA", "page_size": 1001}, "page_size"),
    ],
)
async def test_list_job_events_validation(request_fields: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        await servicer.ListJobEvents(results_service_pb2.ListJobEventsRequest(**request_fields), None)  # type: ignore[arg-type]
    assert list(err.value.violations) == [field]
