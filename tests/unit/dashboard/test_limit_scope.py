"""The queue page's limit forms: which scope (queue, each key, one key) a form names, and the per-key table."""

from __future__ import annotations

import pytest
from google.protobuf import duration_pb2

from conveyor.common.errors import InvalidArgument
from conveyor.dashboard.views import key_limits_view, limit_scope
from conveyor.v1 import limits_pb2


def test_a_form_names_the_queue_each_key_or_one_key() -> None:
    assert limit_scope({}) == (None, False)
    assert limit_scope({"scope": "queue", "key": "ignored"}) == (None, False)
    assert limit_scope({"scope": "each_key", "key": ""}) == (None, True)
    assert limit_scope({"scope": "key", "key": " acme "}) == ("acme", False)


@pytest.mark.parametrize(("body", "field"), [({"scope": "key", "key": " "}, "key"), ({"scope": "every"}, "scope")])
def test_a_bad_scope_names_the_field(body: dict[str, str], field: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        limit_scope(body)
    assert list(err.value.violations) == [field]


def test_the_per_key_table_lists_the_default_then_each_key() -> None:
    second = duration_pb2.Duration(seconds=1)
    limits = limits_pb2.QueueLimits(
        queue="q",
        rate_per_key=limits_pb2.RateLimit(limit=10, period=second),
        keys=[
            limits_pb2.KeyLimits(key="acme", concurrency=2),
            limits_pb2.KeyLimits(
                key="globex", rate=limits_pb2.RateLimit(limit=5, period=duration_pb2.Duration(seconds=60))
            ),
        ],
    )
    assert key_limits_view(limits) == [
        {"key": "", "rate": "10 per 1 s", "concurrency": 0},
        {"key": "acme", "rate": "", "concurrency": 2},
        {"key": "globex", "rate": "5 per 1 min", "concurrency": 0},
    ]
    assert key_limits_view(limits_pb2.QueueLimits(queue="q")) == []
