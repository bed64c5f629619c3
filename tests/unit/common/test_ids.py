import itertools
import time

import pytest

from conveyor.common import ids
from conveyor.common.ids import (
    make_job_id,
    new_ulid,
    new_ulids,
    parse_job_id,
    parse_stream_id,
    stream_id_key,
    ulid_time_ms,
)


def test_ulids_are_unique_sorted_and_carry_the_time() -> None:
    ids = [new_ulid() for _ in range(5000)]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)
    assert all(len(u) == 26 for u in ids)
    assert abs(ulid_time_ms(ids[-1]) - time.time() * 1000) < 5000


def test_a_batch_of_ulids_counts_up_from_one_random_start_and_goes_on_in_order() -> None:
    batch = new_ulids(1000)
    after = new_ulid()
    assert len(set(batch)) == 1000 and batch == sorted(batch) and batch[-1] < after
    assert new_ulids(0) == []
    # Each is the 128-bit value (48-bit ms, 80-bit counter) of the one before, plus one.
    values = [_value(u) for u in batch]
    same_ms = [(a, b) for a, b in itertools.pairwise(values) if a >> 80 == b >> 80]
    assert same_ms and all(b == a + 1 for a, b in same_ms)
    assert abs(ulid_time_ms(batch[0]) - time.time() * 1000) < 5000


def test_a_batch_that_would_overflow_the_counter_takes_the_next_millisecond() -> None:
    gen = ids._UlidGenerator()
    now_ms = time.time_ns() // 1_000_000
    gen._last_ms, gen._last_rand = now_ms + 10, (1 << 80) - 3  # the clock sits in that millisecond
    batch = gen.many(5)
    assert [_value(u) >> 80 for u in batch] == [now_ms + 11] * 5
    assert batch == sorted(batch) and _value(batch[-1]) - _value(batch[0]) == 4


@pytest.mark.parametrize("below", [1, 2, 7, 99])
def test_a_batch_counting_across_its_last_four_characters_is_still_consecutive(below: int) -> None:
    # The common batch shares its first 22 characters; one that carries into them must not.
    gen = ids._UlidGenerator()
    now_ms = time.time_ns() // 1_000_000
    start = (12345 << 20) | ((1 << 20) - below)
    gen._last_ms, gen._last_rand = now_ms + 10, start - 1
    batch = gen.many(100)
    values = [_value(u) for u in batch]
    assert values == list(range(values[0], values[0] + 100))
    assert values[0] & ((1 << 80) - 1) == start and len(set(batch)) == 100


def _value(ulid: str) -> int:
    crockford = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
    return int("".join("0123456789abcdefghijklmnopqrstuv"[crockford.index(c)] for c in ulid), 32)


def test_job_id_round_trips_through_parse() -> None:
    ulid = new_ulid()
    assert parse_job_id(make_job_id("emails.v2", ulid)) == ("emails.v2", ulid)


def test_parse_job_id_rejects_garbage() -> None:
    for bad in [
        "",
        "nope",
        "/01ARZ3NDEKTSV4RRFFQ69G5FAV",
        "q/short",
        "bad queue/01ARZ3NDEKTSV4RRFFQ69G5FAV",
        "./01ARZ3NDEKTSV4RRFFQ69G5FAV",
        "../01ARZ3NDEKTSV4RRFFQ69G5FAV",
        "q/01ARZ3NDEKTSV4RRFFQ69G5FAU!",
    ]:
        assert parse_job_id(bad) is None, bad


def test_stream_ids_compare_numerically() -> None:
    assert stream_id_key("9-0") < stream_id_key("10-0")
    assert stream_id_key(b"10-2") > stream_id_key("10-1")
    assert parse_stream_id("1732540000000-3") == (1732540000000, 3)
    assert parse_stream_id("12") is None
    assert parse_stream_id("a-b") is None
    assert parse_stream_id("99999999999999999999-0") is None


def test_ulid_encoding_matches_the_crockford_definition() -> None:
    ulid = new_ulid()
    value = 0
    for ch in ulid:
        value = value * 32 + "0123456789ABCDEFGHJKMNPQRSTVWXYZ".index(ch)
    assert value < 1 << 128
    assert value >> 80 == ulid_time_ms(ulid)


@pytest.mark.parametrize(
    "bad",
    ["", "01ARZ3NDE", "01ARZ3NDEIKTSV4RRFFQ69G5FAV", "01arz3ndekTSV4RRFFQ69G5FAV", "01ARZ3NDE\u0663KTSV4RRFFQ69G5FAV"],
)
def test_ulid_time_ms_refuses_what_is_not_a_ulid(bad: str) -> None:
    with pytest.raises(ValueError):
        ulid_time_ms(bad)


def test_ulid_time_ms_reads_the_first_ten_characters_in_crockford_base_32() -> None:
    assert ulid_time_ms("01ARZ3NDEKTSV4RRFFQ69G5FAV") == 1469922850259  # the ULID spec's example id
    assert ulid_time_ms("7ZZZZZZZZZ" + "0" * 16) == 2**48 - 1
