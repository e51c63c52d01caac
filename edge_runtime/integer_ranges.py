"""A regular expression for the decimal integers between two bounds, as JSON writes them (no leading zeros).

Tool schemas bound integers often ("days": 1 to 14); a grammar that only said "an integer" would let a model
write 40 and the call would fail validation. Regular expressions are what a grammar engine's lexer runs on, so
the bounds become one: numbers of each digit count are split into ranges sharing a prefix, the classic way.
"""

from __future__ import annotations


def integer_range_regex(low: int | None, high: int | None) -> str:
    """A regex (Rust/Python syntax, unanchored) matching exactly the integers in [low, high]; None is unbounded."""
    if low is not None and high is not None and low > high:
        raise ValueError(f"empty range [{low}, {high}]")
    parts = []
    if low is None or low < 0:  # the negative part: "-" and a magnitude in [max(1, -high), -low]
        magnitude_low = 1 if high is None or high >= 0 else -high
        parts.append("-(?:" + _natural_range(magnitude_low, None if low is None else -low) + ")")
    if high is None or high >= 0:
        start = 0 if low is None or low < 0 else low
        positive = _natural_range(max(start, 1), high)  # "" when high is 0
        parts.append("|".join(part for part in ("0" if start == 0 else "", positive) if part))
    return "|".join(f"(?:{part})" for part in parts if part)


def _natural_range(low: int, high: int | None) -> str:
    """Integers in [low, high] with low >= 1 (high None: unbounded); "" when the range is empty."""
    if high is not None and high < low:
        return ""
    alternatives = []
    digits = len(str(low))
    while high is None or digits <= len(str(high)):
        first = max(low, 10 ** (digits - 1))
        last = 10 ** digits - 1 if high is None or digits < len(str(high)) else high
        if high is None and first == 10 ** (digits - 1):  # every longer number too
            alternatives.append(f"[1-9][0-9]{{{digits - 1},}}")
            break
        alternatives.append(_same_length(str(first), str(last)))
        digits += 1
    return "|".join(alternatives)


def _same_length(low: str, high: str) -> str:
    """Numbers of this many digits between `low` and `high` (equal length, low <= high)."""
    if len(low) == 1:
        return low if low == high else f"[{low}-{high}]"
    if low[0] == high[0]:
        return low[0] + _group(_same_length(low[1:], high[1:]))
    rest = len(low) - 1
    if low[1:] == "0" * rest and high[1:] == "9" * rest:
        return f"[{low[0]}-{high[0]}][0-9]{{{rest}}}"
    alternatives = [low[0] + _group(_same_length(low[1:], "9" * rest))]
    if int(high[0]) - int(low[0]) > 1:
        middle = f"[{int(low[0]) + 1}-{int(high[0]) - 1}]" if int(high[0]) - int(low[0]) > 2 else str(int(low[0]) + 1)
        alternatives.append(f"{middle}[0-9]{{{rest}}}")
    alternatives.append(high[0] + _group(_same_length("0" * rest, high[1:])))
    return "|".join(alternatives)


def _group(regex: str) -> str:
    return f"(?:{regex})" if "|" in regex else regex
