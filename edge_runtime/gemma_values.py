"""Gemma 4's value syntax: what its chat template writes inside tool calls and tool responses, read and written.

The template (chat_templates/gemma4.jinja, macro `format_argument`) writes JSON-like values of its own: strings
between `<|"|>` delimiters with their text raw (no escapes), object keys bare (`{city:<|"|>Paris<|"|>}`) or, in
its escaped-keys form, delimited like strings, keys in `dictsort` order (case-insensitive), numbers as Python's
`str()` writes them. The model answers in that syntax, so tool-call arguments must be read from it, and anything
the runtime writes for the model (tool responses, constrained output) must match the template byte for byte.

`ValueReader` reads incrementally because a reply arrives one token at a time: each `feed` consumes what it can
decide and leaves at most the start of a `<|"|>` delimiter for the caller to present again with more text, so
reading costs O(text) overall however the text is split.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any

from edge_runtime.errors import EdgeRuntimeError

STRING_DELIMITER = '<|"|>'
# Deeper nesting than any tool argument needs; the limit keeps json.dumps and format_value (recursive) safe
# from a model that opens brackets forever.
MAX_DEPTH = 64
# Characters that end a bare key (and cannot be written in one): the syntax's punctuation, and "<", which
# starts the delimited form.
_KEY_STOPS = frozenset(":,{}[]<")
_NUMBER_CHARS = frozenset("0123456789+-.eE")
_NUMBER = re.compile(r"-?[0-9]+(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_LITERALS = {"true": True, "false": False, "null": None}

# Reader states: what the text must hold next.
_VALUE, _ARRAY_FIRST, _OBJECT_FIRST, _KEY, _COLON, _AFTER = range(6)
_STRING, _QUOTED_KEY, _BARE_KEY, _NUMBER_TOKEN, _LITERAL = range(6, 11)
_EXPECTED = {_VALUE: "a value", _ARRAY_FIRST: "a value or ']'", _OBJECT_FIRST: "a key or '}'", _KEY: "a key",
             _COLON: "':'", _BARE_KEY: "':'", _NUMBER_TOKEN: "',' or a closing bracket",
             _LITERAL: "',' or a closing bracket"}


class GemmaValueError(EdgeRuntimeError):
    """Text that is not a value in Gemma's syntax, or a value that cannot be written in it. `offset` is the
    character offset into the text where reading failed (None for values that cannot be written)."""

    def __init__(self, message: str, offset: int | None = None) -> None:
        super().__init__(message if offset is None else f"{message} at offset {offset}")
        self.offset = offset


def _partial_delimiter(text: str, start: int) -> int:
    """Length of the longest end of text[start:] that is a proper prefix of the string delimiter."""
    for k in range(min(len(STRING_DELIMITER) - 1, len(text) - start), 0, -1):
        if STRING_DELIMITER.startswith(text[len(text) - k:]):
            return k
    return 0


def _found(text: str, i: int) -> str:
    return repr(text[i]) if i < len(text) else "the end of the text"


class _Frame:
    """An open object or array, and for an object the key whose value is being read."""

    __slots__ = ("container", "key")

    def __init__(self, container: dict[str, Any] | list[Any]) -> None:
        self.container = container
        self.key: str | None = None


class ValueReader:
    """Reads one value from text given in pieces.

    `on_member(key, value)` is called as each member of the outermost object is complete, so that a tool call's
    arguments can be streamed member by member while the model is still writing the next one.
    """

    def __init__(self, on_member: Callable[[str, Any], None] | None = None) -> None:
        self.offset = 0  # characters consumed so far: error offsets count from the start of the value's text
        self.done = False
        self.value: Any = None
        self._on_member = on_member
        self._stack: list[_Frame] = []
        self._state = _VALUE
        self._token: list[str] = []
        self._token_start = 0
        self._at = 0
        # Where reading stopped at an error (the character that could not continue): what follows it is not part
        # of the value. The error's own offset may be earlier, at the start of the token it blames.
        self.stopped_at = 0

    def feed(self, text: str, final: bool = False) -> int:
        """Consume `text`; return how many characters were consumed.

        Fewer than all are consumed when the value is complete (the rest is not part of it) or when `text` ends
        with what may be the start of a `<|"|>` delimiter: present that rest again with more text after it.
        `final` says no more text follows, so unfinished values are errors rather than waiting for more.
        Raises GemmaValueError at the first character that cannot continue a value.
        """
        try:
            i = self._read(text, final)
        except GemmaValueError:
            self.stopped_at = self.offset + self._at
            raise
        self.offset += i
        if final and not self.done:
            self.stopped_at = self.offset
            self._fail_at_end()
        return i

    def _read(self, text: str, final: bool) -> int:
        """feed's loop; returns how far it got, and keeps that in `_at` for an error raised on the way."""
        i, n = 0, len(text)
        while i < n and not self.done:
            self._at = i
            state = self._state
            if state in (_STRING, _QUOTED_KEY):
                end = text.find(STRING_DELIMITER, i)
                if end < 0:
                    keep = 0 if final else _partial_delimiter(text, i)
                    self._token.append(text[i:n - keep])
                    i = n - keep
                    break
                self._token.append(text[i:end])
                i = end + len(STRING_DELIMITER)
                if state == _STRING:
                    self._complete("".join(self._token))
                else:
                    self._key_done("".join(self._token))
                continue
            if state in (_BARE_KEY, _NUMBER_TOKEN, _LITERAL):
                j = i
                if state == _BARE_KEY:
                    while j < n and text[j] not in _KEY_STOPS:
                        j += 1
                elif state == _NUMBER_TOKEN:
                    while j < n and text[j] in _NUMBER_CHARS:
                        j += 1
                else:
                    while j < n and text[j].isascii() and text[j].isalpha():
                        j += 1
                self._token.append(text[i:j])
                i = j
                if j == n and not final:
                    break
                self._at = i
                self._token_done(text, i)
                continue
            char = text[i]
            if char.isspace():
                i += 1
                continue
            if char == "<":
                if text.startswith(STRING_DELIMITER, i) and state in (_VALUE, _ARRAY_FIRST, _OBJECT_FIRST, _KEY):
                    self._state = _STRING if state in (_VALUE, _ARRAY_FIRST) else _QUOTED_KEY
                    self._token, self._token_start = [], self.offset + i
                    i += len(STRING_DELIMITER)
                    continue
                if not final and STRING_DELIMITER.startswith(text[i:]):
                    break
            i = self._punctuation(text, i, state)
        return i

    def _punctuation(self, text: str, i: int, state: int) -> int:
        """Act on the character at text[i] outside any token; return where reading goes on."""
        char, where = text[i], self.offset + i
        if state in (_VALUE, _ARRAY_FIRST):
            if char == "]" and state == _ARRAY_FIRST:
                self._close()
            elif char in "{[":
                if len(self._stack) == MAX_DEPTH:
                    raise GemmaValueError(f"values nested deeper than {MAX_DEPTH} levels", where)
                self._stack.append(_Frame({} if char == "{" else []))
                self._state = _OBJECT_FIRST if char == "{" else _ARRAY_FIRST
            elif char == "-" or char in "0123456789":
                self._start_token(_NUMBER_TOKEN, where)
                return i
            elif char.isascii() and char.isalpha():
                self._start_token(_LITERAL, where)
                return i
            else:
                raise GemmaValueError(f"expected {_EXPECTED[state]}, found {char!r}", where)
        elif state in (_OBJECT_FIRST, _KEY):
            if char == "}" and state == _OBJECT_FIRST:
                self._close()
            elif char in _KEY_STOPS:
                raise GemmaValueError(f"expected {_EXPECTED[state]}, found {char!r}", where)
            else:
                self._start_token(_BARE_KEY, where)
                return i
        elif state == _COLON:
            if char != ":":
                raise GemmaValueError(f"expected ':' after the key {self._stack[-1].key!r}, found {char!r}", where)
            self._state = _VALUE
        else:  # _AFTER: a member or an item is complete
            frame = self._stack[-1]
            closer = "}" if isinstance(frame.container, dict) else "]"
            if char == ",":
                self._state = _KEY if closer == "}" else _VALUE
            elif char == closer:
                self._close()
            else:
                raise GemmaValueError(f"expected ',' or {closer!r}, found {char!r}", where)
        return i + 1

    def _start_token(self, state: int, where: int) -> None:
        self._state, self._token, self._token_start = state, [], where

    def _token_done(self, text: str, i: int) -> None:
        """A bare key, number or literal ended at text[i] (not consumed: it is the next punctuation)."""
        token, start = "".join(self._token), self._token_start
        if self._state == _BARE_KEY:
            if i >= len(text):
                raise GemmaValueError(f"expected ':' after the key {token.strip()!r}, found the end of the text",
                                      self.offset + i)
            if text[i] != ":":
                raise GemmaValueError(f"expected ':' after the key {token.strip()!r}, found {text[i]!r}",
                                      self.offset + i)
            self._key_done(token.strip())
        elif self._state == _NUMBER_TOKEN:
            if not _NUMBER.fullmatch(token):
                raise GemmaValueError(f"{token!r} is not a number", start)
            number = int(token) if token.lstrip("-").isdigit() else float(token)
            if isinstance(number, float) and not math.isfinite(number):
                raise GemmaValueError(f"the number {token!r} is out of range", start)
            self._complete(number)
        elif token in _LITERALS:
            self._complete(_LITERALS[token])
        else:
            raise GemmaValueError(f"{token!r} is not a value (true, false and null are the only words)", start)

    def _key_done(self, key: str) -> None:
        frame = self._stack[-1]
        if key in frame.container:
            raise GemmaValueError(f"duplicate key {key!r}", self._token_start)
        frame.key = key
        self._state = _COLON

    def _close(self) -> None:
        self._complete(self._stack.pop().container)

    def _complete(self, value: Any) -> None:
        """A value is complete: it becomes its container's next item or member, or the result."""
        if not self._stack:
            self.value, self.done = value, True
            return
        frame = self._stack[-1]
        self._state = _AFTER
        if isinstance(frame.container, list):
            frame.container.append(value)
            return
        frame.container[frame.key] = value
        if len(self._stack) == 1 and self._on_member is not None:
            self._on_member(frame.key, value)

    def _fail_at_end(self) -> None:
        if self._state in (_STRING, _QUOTED_KEY):
            raise GemmaValueError(f"the string starting at offset {self._token_start} has no closing "
                                  f"{STRING_DELIMITER}", self.offset)
        expected = _EXPECTED.get(self._state)
        if expected is None:  # _AFTER
            expected = "',' or '}'" if isinstance(self._stack[-1].container, dict) else "',' or ']'"
        raise GemmaValueError(f"expected {expected}, found the end of the text", self.offset)


def parse_value(text: str) -> Any:
    """The value `text` holds in Gemma's syntax (whitespace around it allowed), as dict/list/str/int/float/bool/None."""
    reader = ValueReader()
    consumed = reader.feed(text, final=True)
    rest = text[consumed:]
    if rest.strip():
        at = consumed + len(rest) - len(rest.lstrip())
        raise GemmaValueError(f"unexpected text after the value, found {_found(text, at)}", at)
    return reader.value


def _dictsort_key(item: tuple[Any, Any]) -> Any:
    """Jinja's `dictsort` order, which the template writes keys in: case-insensitive, ties kept in dict order."""
    key = item[0]
    return key.lower() if isinstance(key, str) else key


def _bare_key(key: Any, where: str) -> str:
    if not isinstance(key, str):
        raise GemmaValueError(f"{where}: key {key!r} is a {type(key).__name__}; Gemma's keys are strings")
    if not key or key != key.strip() or any(char in _KEY_STOPS for char in key):
        raise GemmaValueError(f"{where}: key {key!r} cannot be written bare in Gemma's format (it is empty, has "
                              "whitespace at an end, or holds one of : , { } [ ] <)")
    return key


def format_value(value: Any, where: str = "value") -> str:
    """`value` written exactly as the template's format_argument(value, escape_keys=False) writes it.

    Values whose written form could not be read back the same raise GemmaValueError naming them (`where` is the
    path shown): a string holding the delimiter, a key that is not a string or not writable bare, a float that is
    not finite, a type JSON does not have.
    """
    if value is None:
        return "null"
    if isinstance(value, str):
        if STRING_DELIMITER in value:
            raise GemmaValueError(f"{where}: the string holds {STRING_DELIMITER}, which Gemma's format cannot escape")
        return STRING_DELIMITER + value + STRING_DELIMITER
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Mapping):
        members = (f"{_bare_key(key, where)}:{format_value(item, f'{where}[{key!r}]')}"
                   for key, item in sorted(value.items(), key=_dictsort_key))
        return "{" + ",".join(members) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_value(item, f"{where}[{i}]") for i, item in enumerate(value)) + "]"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise GemmaValueError(f"{where}: {value} is not a finite number")
        return str(value)
    raise GemmaValueError(f"{where}: a {type(value).__name__} is not a JSON value")
