"""The text form of ListJobs' payload conditions and labels, shared by the CLI and the dashboard.

    customer.id=42        eq      (the value is JSON when it parses as JSON, else a string:
    customer.tier!=gold   ne       42 and true are a number and a bool, gold and "42" are strings)
    amount<10  amount<=10  amount>10  amount>=10    lt le gt ge (numbers, or strings, compared like with like)
    ?customer.vip         exists  (whatever the value, null included)
    tags@>urgent          contains (a list holding the value, or a field equal to it; @>{"a":1} for objects)

Only the split into path, operator and value happens here; ResultsService validates the
result and names the offending field (``where[i].path``, ``where[i].value``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any

from google.protobuf import struct_pb2

from conveyor.v1 import results_service_pb2

R = results_service_pb2

#: One line each, for --help and the dashboard's form.
WHERE_SYNTAX = (
    "PATH=VALUE, PATH!=VALUE, PATH<VALUE, PATH<=VALUE, PATH>VALUE, PATH>=VALUE, PATH@>VALUE (contains) "
    "or ?PATH (exists); PATH is object keys joined by dots (customer.id); VALUE is JSON when it parses "
    '(42, true, null, "42", [1,2]), else a string (gold)'
)

_OPERATORS = {
    "=": R.FIELD_OPERATOR_EQ,
    "!=": R.FIELD_OPERATOR_NE,
    "<": R.FIELD_OPERATOR_LT,
    "<=": R.FIELD_OPERATOR_LE,
    ">": R.FIELD_OPERATOR_GT,
    ">=": R.FIELD_OPERATOR_GE,
    "@>": R.FIELD_OPERATOR_CONTAINS,
}
# The path is everything before the first operator character; two-character operators first.
_EXPR_RE = re.compile(r"^(?P<path>[^=!<>@]+?)\s*(?P<op>!=|<=|>=|@>|=|<|>)\s*(?P<value>.*)$", re.DOTALL)


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON")


def parse_value(text: str) -> struct_pb2.Value:
    """``text`` as JSON when it parses as JSON (NaN and Infinity do not), else as a string."""
    try:
        parsed = json.loads(text, parse_constant=_not_json)
    except ValueError:
        parsed = text
    holder = struct_pb2.Struct()
    holder.update({"v": parsed})
    return holder.fields["v"]


def parse_where(expr: str) -> results_service_pb2.FieldFilter:
    """One condition from its text form (see the module's docstring).

    Raises:
        ValueError: ``expr`` has no path or no operator; the message says what is expected.
    """
    text = expr.strip()
    if text.startswith("?"):
        path = text[1:].strip()
        if not path:
            raise ValueError(f"{expr!r} has no field after '?': expected ?PATH, like ?customer.id")
        return R.FieldFilter(path=path, op=R.FIELD_OPERATOR_EXISTS)
    match = _EXPR_RE.match(text)
    if match is None:
        raise ValueError(f"{expr!r} is not a condition: expected {WHERE_SYNTAX}")
    found = R.FieldFilter(path=match["path"].strip(), op=_OPERATORS[match["op"]])
    found.value.CopyFrom(parse_value(match["value"].strip()))
    return found


def parse_label(pair: str) -> tuple[str, str]:
    """``team=billing`` as (key, value).

    Raises:
        ValueError: No ``=`` or no key.
    """
    key, sep, value = pair.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"{pair!r} is not KEY=VALUE")
    return key.strip(), value.strip()


def parse_labels(pairs: Iterable[str]) -> dict[str, str]:
    """Several ``KEY=VALUE`` pairs (a later key replaces an earlier one)."""
    return dict(parse_label(p) for p in pairs)
