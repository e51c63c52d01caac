"""Stop strings over streamed pieces: never emitted, found across piece boundaries, nothing held back needlessly."""

from __future__ import annotations

import pytest

from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.stop_sequences import MAX_STOPS, StopSequences


def run(stops: list[str], pieces: list[str]) -> tuple[list[str], bool]:
    """The emitted pieces (the final flush included unless stopped) and whether a stop string was seen."""
    s = StopSequences(stops)
    out = [s.push(piece) for piece in pieces]
    if not s.stopped:
        out.append(s.flush())
    return out, s.stopped


def test_no_stops_passes_everything_through():
    assert run([], ["a", "b<", ""]) == (["a", "b<", "", ""], False)


def test_stop_split_across_pieces():
    out, stopped = run(["END"], ["Hello E", "N", "D and more", "later"])
    assert out == ["Hello ", "", "", ""]
    assert stopped


def test_text_after_the_stop_in_the_same_piece_is_dropped():
    assert run(["\n\n"], ["one\n", "\ntwo"]) == (["one", ""], True)
    assert run(["###"], ["abc###def"]) == (["abc"], True)


def test_a_partial_match_that_fails_is_released():
    s = StopSequences(["END"])
    assert s.push("the EN") == "the "
    assert s.push("Dless") == ""
    assert s.stopped
    s = StopSequences(["END"])
    assert s.push("EN") == ""
    assert s.push("EMY") == "ENEMY"  # the held "EN" could not start "END" after all
    assert s.push("E") == ""
    assert s.flush() == "E"
    assert not s.stopped


def test_overlapping_stops_cut_at_the_earliest():
    assert run(["ab", "b"], ["xa", "b"]) == (["x", ""], True)  # "ab" starts before "b"
    assert run(["ab", "b"], ["xb"]) == (["x"], True)
    assert run(["abc", "bd"], ["ab", "d"]) == (["", "a"], True)
    assert run(["aab"], ["a", "a", "a", "b"]) == (["", "", "a", ""], True)  # prefix held while it still can match


def test_only_the_longest_possible_prefix_is_held():
    s = StopSequences(["<end>", "STOP"])
    assert s.push("a <e") == "a "
    assert s.push("n") == ""
    assert s.push("x ST") == "<enx "
    assert s.flush() == "ST"


def test_unicode_stops():
    assert run(["世界"], ["你好世", "界!"]) == (["你好", ""], True)
    assert run(["🙂"], ["ok 🙂 more"]) == (["ok "], True)
    assert run(["é"], ["caf", "e\u0301", "é"]) == (["caf", "e\u0301", ""], True)  # code points, not graphemes


def test_after_stopping_nothing_more_is_emitted():
    s = StopSequences(["x"])
    assert s.push("ax") == "a"
    assert s.push("more") == ""
    assert s.flush() == ""
    assert s.stopped


def test_a_single_string_is_one_stop():
    assert run("ab", ["a", "b"]) == (["", ""], True)  # type: ignore[arg-type]


@pytest.mark.parametrize("stops,message", [
    (["a", ""], "stop[1]: stop strings must not be empty"),
    ([3], "stop[0]: must be a string, got int"),
    (["s"] * (MAX_STOPS + 1), f"{MAX_STOPS + 1} stop strings given; at most {MAX_STOPS} are supported"),
])
def test_bad_stops(stops, message):
    with pytest.raises(EdgeRuntimeError) as info:
        StopSequences(stops)
    assert str(info.value) == message
