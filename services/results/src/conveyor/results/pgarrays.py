"""One-dimensional PostgreSQL arrays in binary format, packed with ``struct`` instead of psycopg's list dumper.

psycopg dumps a Python list into a binary array element by element in Python
(``ListBinaryDumper._dump_list``); for the projector's ~30 arrays per batch that was the
largest single cost of a write. These helpers pack a whole array in one ``struct.pack``
(fixed-size elements) or one ``b"".join`` (text, bytea), and return a ``bytes`` subclass
whose registered dumper passes it through unchanged with the array's oid.

Only what the projector sends: int2, int4, int8, float8, text and bytea arrays, one
dimension, lower bound 1, NULL elements allowed.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from itertools import chain, repeat

import psycopg
from psycopg import pq
from psycopg.adapt import Dumper

_NULL = b"\xff\xff\xff\xff"  # element length -1
_LEN = struct.Struct(">i").pack


class PackedArray(bytes):
    """A binary-format array, ready to send; subclasses name the array type."""

    __slots__ = ()
    oid = 0


class Int2Array(PackedArray):
    __slots__ = ()
    oid = 1005


class Int4Array(PackedArray):
    __slots__ = ()
    oid = 1007


class Int8Array(PackedArray):
    __slots__ = ()
    oid = 1016


class Float8Array(PackedArray):
    __slots__ = ()
    oid = 1022


class TextArray(PackedArray):
    __slots__ = ()
    oid = 1009


class ByteaArray(PackedArray):
    __slots__ = ()
    oid = 1001


def _fixed(cls: type[PackedArray], elem_oid: int, code: str, size: int, values: Sequence[float | None]) -> PackedArray:
    n = len(values)
    if n == 0:
        return cls(struct.pack(">iii", 0, 0, elem_oid))
    if None not in values:
        flat = chain((1, 0, elem_oid, n, 1), chain.from_iterable(zip(repeat(size, n), values, strict=False)))
        return cls(struct.pack(">iiiii" + ("i" + code) * n, *flat))
    fmt = [">iiiii"]
    args: list[float] = [1, 1, elem_oid, n, 1]
    for value in values:
        if value is None:
            fmt.append("i")
            args.append(-1)
        else:
            fmt.append("i" + code)
            args += (size, value)
    return cls(struct.pack("".join(fmt), *args))


def int2_array(values: Sequence[int | None]) -> Int2Array:
    return _fixed(Int2Array, 21, "h", 2, values)  # type: ignore[return-value]


def int4_array(values: Sequence[int | None]) -> Int4Array:
    return _fixed(Int4Array, 23, "i", 4, values)  # type: ignore[return-value]


def int8_array(values: Sequence[int | None]) -> Int8Array:
    return _fixed(Int8Array, 20, "q", 8, values)  # type: ignore[return-value]


def float8_array(values: Sequence[float | None]) -> Float8Array:
    return _fixed(Float8Array, 701, "d", 8, values)  # type: ignore[return-value]


def _varlen(cls: type[PackedArray], elem_oid: int, values: Sequence[bytes | None]) -> PackedArray:
    n = len(values)
    if n == 0:
        return cls(struct.pack(">iii", 0, 0, elem_oid))
    parts = [b""]
    hasnull = 0
    for value in values:
        if value is None:
            hasnull = 1
            parts.append(_NULL)
        else:
            parts.append(_LEN(len(value)))
            parts.append(value)
    parts[0] = struct.pack(">iiiii", 1, hasnull, elem_oid, n, 1)
    return cls(b"".join(parts))


def text_array(values: Sequence[str | None]) -> TextArray:
    # "replace": a lone surrogate must not raise here; PostgreSQL refuses what is not text (NUL) itself.
    encoded = [None if v is None else v.encode("utf-8", "replace") for v in values]
    return _varlen(TextArray, 25, encoded)  # type: ignore[return-value]


def bytea_array(values: Sequence[bytes | None]) -> ByteaArray:
    return _varlen(ByteaArray, 17, values)  # type: ignore[return-value]


def _dumper(array_cls: type[PackedArray]) -> type[Dumper]:
    class PackedArrayDumper(Dumper):
        format = pq.Format.BINARY
        oid = array_cls.oid

        def dump(self, obj: object) -> bytes:
            assert isinstance(obj, bytes)
            return obj

    PackedArrayDumper.__name__ = f"{array_cls.__name__}Dumper"
    return PackedArrayDumper


ARRAY_TYPES: tuple[type[PackedArray], ...] = (Int2Array, Int4Array, Int8Array, Float8Array, TextArray, ByteaArray)


def register(adapters: psycopg.adapt.AdaptersMap) -> None:
    """Teach ``adapters`` (psycopg.adapters, a connection's or a cursor's) to send packed arrays."""
    for cls in ARRAY_TYPES:
        adapters.register_dumper(cls, _dumper(cls))


# Connections copy the global map when they open: registering at import covers every pool
# opened after conveyor.results.store is imported (store imports this module).
register(psycopg.adapters)
