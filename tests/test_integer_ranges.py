"""The integer-range regex matches exactly the integers between its bounds, written as JSON writes them."""

from __future__ import annotations

import random
import re

import pytest

from edge_runtime.integer_ranges import integer_range_regex

BOUNDS = [(None, None), (0, None), (1, 14), (0, 0), (-5, -5), (None, -3), (-1000, None), (5, None), (123, 987),
          (-999, 999), (10, 99), (100, 1000), (-12, 0), (0, 9), (7, 7), (99, 101), (-101, -99)]
random.seed(17)
BOUNDS += [tuple(sorted(random.sample(range(-1500, 1500), 2))) for _ in range(40)]
BOUNDS += [(random.randrange(-1500, 1500), None) for _ in range(10)] + [(None, random.randrange(-1500, 1500))
                                                                        for _ in range(10)]


@pytest.mark.parametrize("low, high", BOUNDS)
def test_exactly_the_integers_in_range(low, high):
    regex = re.compile(integer_range_regex(low, high))
    for n in range(-1700, 1700):
        assert bool(regex.fullmatch(str(n))) == ((low is None or n >= low) and (high is None or n <= high)), n
    for text in ["-0", "01", "007", "", "-", "+1", "1.0", "1e3", " 1"]:
        assert not regex.fullmatch(text), text


def test_large_and_unbounded_ranges():
    regex = re.compile(integer_range_regex(10**12, None))
    assert regex.fullmatch(str(10**12)) and regex.fullmatch(str(10**30)) and not regex.fullmatch(str(10**12 - 1))
    regex = re.compile(integer_range_regex(None, -(10**12)))
    assert regex.fullmatch(str(-(10**12))) and not regex.fullmatch(str(-(10**12) + 1))


def test_an_empty_range_is_an_error():
    with pytest.raises(ValueError, match=r"empty range \[3, 2\]"):
        integer_range_regex(3, 2)
