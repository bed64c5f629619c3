"""The text form of ListJobs conditions (CLI --where, the dashboard's payload filter)."""

from __future__ import annotations

from typing import Any

import pytest
from google.protobuf import json_format

from conveyor.common.search import parse_label, parse_labels, parse_where
from conveyor.v1 import results_service_pb2

R = results_service_pb2


@pytest.mark.parametrize(
    ("expr", "path", "op", "value"),
    [
        ("customer.id=42", "customer.id", R.FIELD_OPERATOR_EQ, 42),
        ("customer.tier!=gold", "customer.tier", R.FIELD_OPERATOR_NE, "gold"),
        ("amount<10", "amount", R.FIELD_OPERATOR_LT, 10),
        ("amount<=10.5", "amount", R.FIELD_OPERATOR_LE, 10.5),
        ("amount>-1", "amount", R.FIELD_OPERATOR_GT, -1),
        ("created>=2026-12-05", "created", R.FIELD_OPERATOR_GE, "2026-12-05"),
        ("tags@>urgent", "tags", R.FIELD_OPERATOR_CONTAINS, "urgent"),
        ('customer@>{"tier": "gold"}', "customer", R.FIELD_OPERATOR_CONTAINS, {"tier": "gold"}),
        ('code="42"', "code", R.FIELD_OPERATOR_EQ, "42"),
        ("flag=true", "flag", R.FIELD_OPERATOR_EQ, True),
        ("note=null", "note", R.FIELD_OPERATOR_EQ, None),
        ("ids=[1, 2]", "ids", R.FIELD_OPERATOR_EQ, [1, 2]),
        (" name = Ada Lovelace ", "name", R.FIELD_OPERATOR_EQ, "Ada Lovelace"),
        ("n=NaN", "n", R.FIELD_OPERATOR_EQ, "NaN"),
        ("empty=", "empty", R.FIELD_OPERATOR_EQ, ""),
        ("url=a=b", "url", R.FIELD_OPERATOR_EQ, "a=b"),
    ],
)
def test_parse_where(expr: str, path: str, op: int, value: Any) -> None:
    found = parse_where(expr)
    assert (found.path, found.op) == (path, op)
    assert found.HasField("value")
    assert json_format.MessageToDict(found.value) == value


def test_parse_where_exists() -> None:
    found = parse_where("?customer.vip")
    assert (found.path, found.op, found.HasField("value")) == ("customer.vip", R.FIELD_OPERATOR_EXISTS, False)


@pytest.mark.parametrize("expr", ["", "   ", "?", "=5", "!=x", "plain", "@>x"])
def test_parse_where_refuses_what_is_not_a_condition(expr: str) -> None:
    with pytest.raises(ValueError, match=r"PATH|expected"):
        parse_where(expr)


def test_parse_labels() -> None:
    assert parse_label("team=billing") == ("team", "billing")
    assert parse_label("k=a=b") == ("k", "a=b")
    assert parse_labels(["a=1", "b=", "a=2"]) == {"a": "2", "b": ""}
    for bad in ["team", "=x", ""]:
        with pytest.raises(ValueError, match="KEY=VALUE"):
            parse_label(bad)
