"""The jobs page's query parameters as one ListJobsRequest (dashboard filters.list_jobs_request)."""

from __future__ import annotations

import pytest
from google.protobuf import json_format

from conveyor.common.errors import InvalidArgument
from conveyor.dashboard.filters import list_jobs_request
from conveyor.v1 import job_pb2, results_service_pb2

R = results_service_pb2


def test_every_filter_goes_into_the_request() -> None:
    request = list_jobs_request(
        [
            ("queue", "emails"),
            ("state", "FAILED"),
            ("type", "send"),
            ("created_after", "2026-12-05T13:00"),
            ("created_before", "2026-12-05T14:00:00+01:00"),
            ("where", "customer.id=42"),
            ("where", "?customer.vip"),
            ("where", " "),
            ("label", "team=billing"),
            ("label", "env=prod"),
            ("label", ""),
        ],
        page_size=50,
        page_token="tok",
    )
    assert (request.queue, request.state, request.type) == ("emails", job_pb2.JOB_STATE_FAILED, "send")
    assert request.created_after.ToJsonString() == "2026-12-05T13:00:00Z"
    assert request.created_before.ToJsonString() == "2026-12-05T13:00:00Z"
    assert [(w.path, w.op) for w in request.where] == [
        ("customer.id", R.FIELD_OPERATOR_EQ),
        ("customer.vip", R.FIELD_OPERATOR_EXISTS),
    ]
    assert json_format.MessageToDict(request.where[0].value) == 42
    assert dict(request.labels) == {"team": "billing", "env": "prod"}
    assert (request.page_size, request.page_token) == (50, "tok")


def test_a_mapping_and_no_filters() -> None:
    assert list_jobs_request({"queue": "q", "state": ""}) == R.ListJobsRequest(queue="q")
    assert list_jobs_request({}) == R.ListJobsRequest()


@pytest.mark.parametrize(
    ("pairs", "field"),
    [
        ([("state", "NOPE")], "state"),
        ([("created_after", "yesterday")], "created_after"),
        ([("where", "nonsense")], "where"),
        ([("label", "team")], "label"),
    ],
)
def test_what_cannot_be_read_is_invalid_argument_by_parameter(pairs: list[tuple[str, str]], field: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        list_jobs_request(pairs)
    assert list(err.value.violations) == [field]
