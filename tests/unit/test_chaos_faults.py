"""bench/chaos.py's fault selection and drawing: --faults parsing, the shuffled deck, the ranges."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from bench.chaos import FAULTS, FaultDeck, parse_faults, parse_range


def test_all_is_every_fault_in_order() -> None:
    assert parse_faults("all") == list(FAULTS)


def test_a_list_names_exactly_those_faults() -> None:
    assert parse_faults("redis_full, pg_lock,redis_full") == ["redis_full", "pg_lock"]


def test_a_leading_minus_drops_one_fault() -> None:
    chosen = parse_faults("all,-pg_restart,-worker_kill")
    assert "pg_restart" not in chosen and "worker_kill" not in chosen
    assert len(chosen) == len(FAULTS) - 2


def test_none_selects_nothing() -> None:
    assert parse_faults("none") == []


def test_an_unknown_fault_is_refused_naming_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown fault 'redis_ful'.*redis_full"):
        parse_faults("redis_ful")


def test_each_round_of_the_deck_draws_every_fault_once() -> None:
    names = parse_faults("all,-worker_kill")
    deck = FaultDeck(names, random.Random(7))
    rounds = [[deck.draw() for _ in names] for _ in range(5)]
    for drawn in rounds:
        assert sorted(drawn) == sorted(names)
    assert len({tuple(r) for r in rounds}) > 1, "every round drew the same order: not shuffled"


def test_the_seed_decides_the_order() -> None:
    names = list(FAULTS)

    def order(seed: int) -> list[str]:
        deck = FaultDeck(names, random.Random(seed))
        return [deck.draw() for _ in range(3 * len(names))]

    assert order(1) == order(1)
    assert order(1) != order(2)
    assert Counter(order(3)) == Counter({n: 3 for n in names})


def test_an_empty_deck_has_nothing_to_draw() -> None:
    with pytest.raises(ValueError, match="no fault"):
        FaultDeck([], random.Random(1)).draw()


@pytest.mark.parametrize(("text", "expected"), [("2-6", (2.0, 6.0)), ("3", (3.0, 3.0)), ("0.5-1", (0.5, 1.0))])
def test_ranges(text: str, expected: tuple[float, float]) -> None:
    assert parse_range(text, "--fault-hold") == expected


@pytest.mark.parametrize("text", ["6-2", "0-1", "x", "1-y"])
def test_bad_ranges_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="--fault-hold"):
        parse_range(text, "--fault-hold")
