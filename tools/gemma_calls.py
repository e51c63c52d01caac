"""Tool calls read out of a Gemma 4 reply, independently of the runtime, to check what constrained decoding made.

A checker must not share code with what it checks: this strict reader (no whitespace, no duplicate keys, the
reply nothing but calls after an optional thought) is what tests/test_constrained_decoding.py and
tools/grammar_bench.py hold replies to. It reads the text with the markers decoded as text.
"""

from __future__ import annotations

import json
import re
from typing import Any

QUOTE = '<|"|>'
CALL = re.compile(r"<\|tool_call>call:([A-Za-z0-9_-]+)(.*?)<tool_call\|>", re.DOTALL)
THOUGHT = re.compile(r"<\|channel>thought\n.*?<channel\|>", re.DOTALL)
SCALAR = re.compile(r"-?[0-9]+(\.[0-9]+)?([eE][+-]?[0-9]+)?|true|false|null")


class NotACall(ValueError):
    """The reply is not calls in Gemma's syntax."""


def read_calls(reply: str) -> list[tuple[str, Any]]:
    """(name, arguments) of each call of a reply made of an optional thought and calls only."""
    body = THOUGHT.sub("", reply, count=1) if reply.startswith("<|channel>") else reply
    found = []
    for match in CALL.finditer(body):
        arguments, end = read_value(match.group(2))
        if end != len(match.group(2)):
            raise NotACall(f"text after the arguments of {match.group(1)}: {match.group(2)[end:]!r}")
        found.append((match.group(1), arguments))
    if rest := CALL.sub("", body):
        raise NotACall(f"text outside calls: {rest[:80]!r}")
    return found


def read_value(text: str, i: int = 0) -> tuple[Any, int]:
    """The Gemma value at text[i] and where it ends."""
    try:
        if text.startswith(QUOTE, i):
            end = text.index(QUOTE, i + len(QUOTE))
            return text[i + len(QUOTE):end], end + len(QUOTE)
        if text[i] in "{[":
            return _container(text, i)
    except (IndexError, ValueError) as exc:
        raise NotACall(f"cut short at {i}: {text[i:i + 40]!r}") from exc
    match = SCALAR.match(text, i)
    if not match:
        raise NotACall(f"not a value at {i}: {text[i:i + 40]!r}")
    return json.loads(match.group()), match.end()


def _container(text: str, i: int) -> tuple[Any, int]:
    closer, container = ("}", {}) if text[i] == "{" else ("]", [])
    i += 1
    if text[i] == closer:
        return container, i + 1
    while True:
        if closer == "}":
            colon = text.index(":", i)
            key = text[i:colon]
            if key in container or not key:
                raise NotACall(f"key {key!r} repeated or empty at {i}")
            container[key], i = read_value(text, colon + 1)
        else:
            value, i = read_value(text, i)
            container.append(value)
        if text[i] == closer:
            return container, i + 1
        if text[i] != ",":
            raise NotACall(f"expected ',' or {closer!r} at {i}: {text[i:i + 40]!r}")
        i += 1
