"""Packed binary arrays (conveyor.results.pgarrays) read back by PostgreSQL exactly as psycopg's own lists."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pytest
from psycopg_pool import AsyncConnectionPool

from conveyor.results import pgarrays

CASES: list[tuple[Callable[[Sequence[Any]], pgarrays.PackedArray], str, list[Any]]] = [
    (pgarrays.int2_array, "int2", [1, -(2**15), 2**15 - 1]),
    (pgarrays.int2_array, "int2", [None, 5, None]),
    (pgarrays.int4_array, "int4", [0, -(2**31), 2**31 - 1]),
    (pgarrays.int8_array, "int8", [0, -(2**63), 2**63 - 1, None]),
    (pgarrays.int8_array, "int8", []),
    (pgarrays.float8_array, "float8", [0.5, -1e300, None, 50.0]),
    (pgarrays.text_array, "text", ["a", "", None, "é✓ 漢字", "x" * 5000]),
    (pgarrays.text_array, "text", [None]),
    (pgarrays.text_array, "text", []),
    (pgarrays.bytea_array, "bytea", [b"\x00\xff", b"", None]),
]

PG_NAMES = {"int2": "smallint", "int4": "integer", "int8": "bigint", "float8": "double precision"}


@pytest.mark.parametrize(("pack", "pg_type", "values"), CASES)
async def test_packed_arrays_arrive_as_the_values_they_pack(
    pool: AsyncConnectionPool[Any],
    pack: Callable[[Sequence[Any]], pgarrays.PackedArray],
    pg_type: str,
    values: list[Any],
) -> None:
    async with pool.connection() as conn:
        cur = await conn.execute(f"SELECT %b::{pg_type}[], pg_typeof(%b)::text".encode(), (pack(values), pack(values)))
        row = await cur.fetchone()
    assert row is not None
    assert row[0] == values
    assert row[1] == PG_NAMES.get(pg_type, pg_type) + "[]"  # the oid the dumper sends


async def test_a_lone_surrogate_is_replaced_rather_than_raising() -> None:
    assert pgarrays.text_array(["a\udc80"]).endswith(b"a?")
