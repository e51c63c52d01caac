"""A Gemma 4 reply, as the model writes it, turned into an OpenAI assistant message: text, thoughts, tool calls.

The model writes its whole reply in one stream of text (special tokens decoded as text, the stop token left out):
thoughts inside `<|channel>thought\\n ... <channel|>`, tool calls as `<|tool_call>call:NAME{ARGS}<tool_call|>` with
ARGS in Gemma's value syntax (edge_runtime.gemma_values), and `<|tool_response>` once it waits for the results.
OpenAI clients expect `content`, `reasoning_content` and `tool_calls` apart, and while streaming they expect each
of them as deltas. One state machine (`ReplyStream`) does both, so that a streamed reply and the same reply
parsed whole can never disagree: `parse_reply` is that machine fed the whole text at once.

Decisions, each for a reason:
- content is the text outside thoughts and calls, concatenated and trimmed, as the template's strip_thinking
  reads an assistant message back; None when the reply has tool calls and no text (as OpenAI), "" otherwise.
  reasoning_content is each thought trimmed, joined by newlines; present whenever a thought channel was opened.
- arguments are json.dumps(arguments, ensure_ascii=False, separators=(",", ":")): compact, as OpenAI's own
  tool calls are. Streamed, call i's fragments are `{"key":value` for its first member, `,"key":value` for each
  next one as it completes, and `}` (or `{}`) when the object closes.
- A call becomes a tool call the moment `call:NAME{` is complete, because that is when a stream announces it.
  Text after `<|tool_call>` that never makes such a header goes back to the text it interrupted (markers
  removed): it was not a call. A call whose arguments then break off (cut by max_tokens, or a syntax error) keeps
  the fragments already sent, without the closing brace: its arguments are an unfinished JSON object, which no
  client can mistake for complete arguments and run a tool with (OpenAI's own calls cut by max_tokens look the
  same), rather than a shortened object that parses and runs the tool with arguments the model did not finish.
  What could not be read, up to `<tool_call|>`, is dropped from the message and reported in `problems` with the
  reason and offset, for the server's log; it is never put in content, where a client would show it as prose.
- Markers never reach content or reasoning. `<|tool_response>`, `<turn|>` and a leaked `<|turn>` of another role
  end the reply (what follows is the model playing the next turn); a leaked `<|turn>model\\n`, a `<channel|>` or
  `<tool_call|>` without an opener, and the template's other special tokens are dropped; a second
  `<|channel>thought\\n` starts another thought; `<|tool_call>` inside a thought ends the thought; a stray `<|"|>`
  in text becomes `"`, its meaning. A thought still open at the end of the reply is the reasoning.
"""

from __future__ import annotations

import itertools
import json
import secrets
from collections.abc import Callable
from typing import Any

from edge_runtime.gemma_values import GemmaValueError, ValueReader

THOUGHT_OPEN, THOUGHT_CLOSE = "<|channel>", "<channel|>"
CALL_OPEN, CALL_CLOSE = "<|tool_call>", "<tool_call|>"
TOOL_RESPONSE = "<|tool_response>"
TURN_OPEN, TURN_CLOSE = "<|turn>", "<turn|>"
STRING_DELIMITER = '<|"|>'
# Every special token the template writes: none of them is text a client should see.
MARKERS = frozenset({THOUGHT_OPEN, THOUGHT_CLOSE, CALL_OPEN, CALL_CLOSE, TOOL_RESPONSE, "<tool_response|>",
                     TURN_OPEN, TURN_CLOSE, STRING_DELIMITER, "<|think|>", "<|tool>", "<tool|>", "<|image|>",
                     "<|audio|>", "<|video|>"})
_LONGEST_MARKER = max(len(marker) for marker in MARKERS)
_PREFIXES = frozenset(marker[:k] for marker in MARKERS for k in range(1, len(marker)))
THOUGHT_NAME = "thought\n"  # the channel the template opens for thinking; its name is not part of the thought
MODEL_ROLE = "model\n"
CALL_PREFIX = "call:"
MAX_NAME = 256  # a longer "name" is not one: give the held text back instead of waiting for a "{"
MAX_CALL_GAP = 64  # whitespace held between a call's "}" and its "<tool_call|>" before deciding it is text
_NAME_STOPS = frozenset('{}[]<>,:"')
_SHOWN = 60  # characters of a broken call's dropped text quoted in its problem line

# What the text is in: which part of the message it belongs to, or which decision it waits for.
TEXT, THOUGHT, CHANNEL_NAME, TURN_ROLE, CALL_HEADER, CALL_ARGS, CALL_END, BROKEN_CALL, END = range(9)


def new_call_id() -> str:
    """OpenAI's shape of tool call id: unique per call so that tool messages can answer it."""
    return "call_" + secrets.token_hex(12)


class _Trimmed:
    """Text released as it arrives but trimmed at both ends: leading whitespace is dropped, trailing whitespace
    is held until more text follows it. `segment_break` ends a piece of the text (a thought): its trailing
    whitespace is dropped, and the next piece starts after a newline."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self._started = False
        self._held = ""

    def add(self, text: str) -> str:
        """What of `text` can be released now."""
        if not self._started:
            text = text.lstrip()
            if not text:
                return ""
            self._started = True
            if self.parts:
                text = "\n" + text
        body = text.rstrip()
        if not body:
            self._held += text
            return ""
        out, self._held = self._held + body, text[len(body):]
        self.parts.append(out)
        return out

    def segment_break(self) -> None:
        self._started, self._held = False, ""


class _Call:
    __slots__ = ("fragments", "id", "index", "name", "reader")

    def __init__(self, index: int, call_id: str, name: str) -> None:
        self.index, self.id, self.name = index, call_id, name
        self.fragments: list[str] = []
        self.reader: ValueReader | None = None


class ReplyStream:
    """Reads a reply piece by piece (one decoded token each) and returns OpenAI chat.completion.chunk deltas.

    `push` costs O(piece) amortised: nothing is read twice except the few characters held back while they may
    still be the start of a marker or a call header.
    """

    def __init__(self, *, call_id: Callable[[], str] | None = None, in_thought: bool = False) -> None:
        """`call_id` makes tool call ids (default: "call_" and 24 random hex digits). `in_thought`: the prompt
        ended inside a thought channel (the template opens one after tool responses when thinking is on), so the
        reply starts as reasoning."""
        self._call_id = call_id or new_call_id
        self._content = _Trimmed()
        self._reasoning = _Trimmed()
        self._has_reasoning = in_thought
        self._mode = THOUGHT if in_thought else TEXT
        self._resume = TEXT  # where the text goes back to if a marker's lookahead does not match
        self._calls: list[_Call] = []
        self._dropped = ""  # the start of a broken call's unread text, for its problem line
        self._dropped_count = 0
        self._held = ""
        self._final = False
        # Deltas queued as (field, call index or -1, text) until push or finish returns them.
        self._events: list[tuple[str, int, str]] = []
        self.problems: list[str] = []  # calls that broke off, for the server's log (see the module docstring)

    @property
    def has_tool_calls(self) -> bool:
        """Whether the reply called tools (OpenAI's finish_reason "tool_calls", unless max_tokens cut it)."""
        return bool(self._calls)

    @property
    def message(self) -> dict[str, Any]:
        """The assistant message so far; once `finish` has been called, parse_reply's result for the whole text."""
        content = "".join(self._content.parts)
        message: dict[str, Any] = {"role": "assistant", "content": content or (None if self._calls else "")}
        if self._has_reasoning:
            message["reasoning_content"] = "".join(self._reasoning.parts)
        if self._calls:
            message["tool_calls"] = [{"id": call.id, "type": "function",
                                      "function": {"name": call.name, "arguments": "".join(call.fragments)}}
                                     for call in self._calls]
        return message

    def push(self, piece: str) -> list[dict[str, Any]]:
        """The deltas that `piece` completes: {"content": str}, {"reasoning_content": str}, a tool call's header
        {"tool_calls": [{"index", "id", "type": "function", "function": {"name", "arguments": ""}}]}, or a
        fragment of its arguments {"tool_calls": [{"index", "function": {"arguments": str}}]}."""
        if self._final:
            raise RuntimeError("ReplyStream.push after finish")
        self._run(self._held + piece)
        return self._take_deltas()

    def finish(self) -> list[dict[str, Any]]:
        """The deltas of what was held back, now that the reply has ended; held text that did not become a marker
        is text after all, and a call still open is cut off."""
        if self._final:
            return []
        self._final = True
        self._run(self._held)
        if self._mode == CALL_ARGS:
            self._cut_off(0)
        self._end_broken_call("the end of the reply")
        return self._take_deltas()

    def _take_deltas(self) -> list[dict[str, Any]]:
        """The queued deltas, neighbours of one kind joined: one content delta per piece, not one per marker."""
        deltas: list[dict[str, Any]] = []
        events, self._events = self._events, []
        for (field, index), group in itertools.groupby(events, key=lambda event: event[:2]):
            text = "".join(event[2] for event in group)
            if field == "tool_calls":
                deltas.append({"tool_calls": [{"index": index, "function": {"arguments": text}}]})
            elif field == "header":  # one per call, so never joined
                call = self._calls[index]
                deltas.append({"tool_calls": [{"index": index, "id": call.id, "type": "function",
                                               "function": {"name": call.name, "arguments": ""}}]})
            else:
                deltas.append({field: text})
        return deltas

    def _run(self, text: str) -> None:
        """Advance through `text` until it is used up or the rest must wait for more; hold that rest."""
        handlers = (self._text, self._text, self._channel_name, self._turn_role, self._call_header,
                    self._call_args, self._call_end, self._broken_call)
        pos = 0
        while pos < len(text) and self._mode != END:
            mode = self._mode
            new = handlers[mode](text, pos)
            if new == pos and self._mode == mode:
                break
            pos = new
        self._held = text[pos:] if self._mode != END else ""

    # Deltas -------------------------------------------------------------------------------------------------

    def _emit_text(self, text: str) -> None:
        field, trimmed = ("reasoning_content", self._reasoning) if self._mode == THOUGHT else ("content", self._content)
        out = trimmed.add(text)
        if out:
            self._events.append((field, -1, out))

    def _emit_fragment(self, call: _Call, fragment: str) -> None:
        call.fragments.append(fragment)
        self._events.append(("tool_calls", call.index, fragment))

    # Handlers: each takes the text and where to read from, and returns where reading goes on (the same place,
    # with the mode unchanged, when it must wait for more text). ------------------------------------------------

    def _text(self, text: str, pos: int) -> int:
        i = text.find("<", pos)
        if i < 0:
            self._emit_text(text[pos:])
            return len(text)
        if i > pos:
            self._emit_text(text[pos:i])
        end = text.find(">", i + 1, i + _LONGEST_MARKER)
        marker = text[i:end + 1] if end >= 0 else ""
        if marker not in MARKERS:
            if not self._final and end < 0 and len(text) - i < _LONGEST_MARKER and text[i:] in _PREFIXES:
                return i
            self._emit_text("<")
            return i + 1
        after = i + len(marker)
        if marker == THOUGHT_OPEN:
            self._reasoning.segment_break()
            self._has_reasoning = True
            self._mode = CHANNEL_NAME
        elif marker == THOUGHT_CLOSE:
            if self._mode == THOUGHT:
                self._reasoning.segment_break()
                self._mode = TEXT
        elif marker == CALL_OPEN:
            self._resume, self._mode = self._mode, CALL_HEADER
        elif marker in (TOOL_RESPONSE, TURN_CLOSE):
            self._mode = END
        elif marker == TURN_OPEN:
            self._resume, self._mode = self._mode, TURN_ROLE
        elif marker == STRING_DELIMITER:
            self._emit_text('"')
        return after

    def _lookahead(self, text: str, pos: int, expected: str) -> bool | None:
        """Whether text[pos:] starts with `expected`; None while it is too short to tell."""
        if text.startswith(expected, pos):
            return True
        if not self._final and len(text) - pos < len(expected) and expected.startswith(text[pos:]):
            return None
        return False

    def _channel_name(self, text: str, pos: int) -> int:
        match = self._lookahead(text, pos, THOUGHT_NAME)
        if match is None:
            return pos
        self._mode = THOUGHT
        return pos + len(THOUGHT_NAME) if match else pos

    def _turn_role(self, text: str, pos: int) -> int:
        match = self._lookahead(text, pos, MODEL_ROLE)
        if match is None:
            return pos
        self._mode = self._resume if match else END
        return pos + len(MODEL_ROLE) if match else pos

    def _cut_off(self, unread: int) -> None:
        """The reply ended inside the last call's arguments, `unread` characters after what its reader consumed."""
        call = self._calls[-1]
        assert call.reader is not None
        self.problems.append(f"tool call {call.index} ({call.name}): the reply ended inside its arguments, at "
                             f"offset {call.reader.offset + unread}")
        self._mode = END

    def _call_header(self, text: str, pos: int) -> int:
        """`call:NAME{` after `<|tool_call>` (whitespace allowed around it). Nothing is consumed until it is
        complete: text that turns out not to be a header is read again as the text it interrupted."""
        i = self._skip_space(text, pos)
        match = self._lookahead(text, i, CALL_PREFIX)
        if match is None:
            return pos
        if match:
            start = end = i + len(CALL_PREFIX)
            while end < len(text) and end - start <= MAX_NAME and not text[end].isspace() \
                    and text[end] not in _NAME_STOPS:
                end += 1
            brace = self._skip_space(text, end)
            if brace == len(text) and end - start <= MAX_NAME and not self._final:
                return pos
            if 0 < end - start <= MAX_NAME and brace < len(text) and text[brace] == "{":
                self._start_call(text[start:end])
                return brace
        self._mode = self._resume
        return pos

    @staticmethod
    def _skip_space(text: str, pos: int) -> int:
        """Past the whitespace at text[pos:], or MAX_CALL_GAP characters of it: more is not a call's spacing."""
        i = pos
        while i < len(text) and text[i].isspace() and i - pos < MAX_CALL_GAP:
            i += 1
        return i

    def _start_call(self, name: str) -> None:
        call = _Call(len(self._calls), self._call_id(), name)
        call.reader = ValueReader(on_member=lambda key, value: self._member(call, key, value))
        self._calls.append(call)
        if self._resume == THOUGHT:
            self._reasoning.segment_break()
        self._events.append(("header", call.index, ""))
        self._mode = CALL_ARGS

    def _member(self, call: _Call, key: str, value: Any) -> None:
        """A member of the call's arguments is complete: send it while the model writes the next one."""
        member = f"{_json(key)}:{_json(value)}"
        self._emit_fragment(call, ("," if call.fragments else "{") + member)

    def _call_args(self, text: str, pos: int) -> int:
        call = self._calls[-1]
        reader = call.reader
        assert reader is not None
        if self._final:
            self._cut_off(len(text) - pos)
            return len(text)
        before = reader.offset
        try:
            consumed = reader.feed(text[pos:])
        except GemmaValueError as error:
            self.problems.append(f"tool call {call.index} ({call.name}): {error}")
            self._mode = BROKEN_CALL
            return pos + reader.stopped_at - before
        if reader.done:
            if not call.fragments:
                self._emit_fragment(call, "{")
            self._emit_fragment(call, "}")
            call.reader = None
            self._mode = CALL_END
        return pos + consumed

    def _call_end(self, text: str, pos: int) -> int:
        """After a call's closing brace: its `<tool_call|>`, or another `call:` in the same block, or text."""
        i = self._skip_space(text, pos)
        close = self._lookahead(text, i, CALL_CLOSE)
        if close:
            self._mode = TEXT
            return i + len(CALL_CLOSE)
        another = self._lookahead(text, i, CALL_PREFIX)
        if another:
            self._resume, self._mode = TEXT, CALL_HEADER
            return i
        if close is None or another is None:
            return pos
        self._mode = TEXT
        return pos

    def _broken_call(self, text: str, pos: int) -> int:
        """The rest of a call that could not be read, up to `<tool_call|>`, is dropped (and reported); a marker
        that ends the block or the reply is still obeyed."""
        i = text.find("<", pos)
        if i < 0:
            self._drop(text[pos:])
            return len(text)
        self._drop(text[pos:i])
        end = text.find(">", i + 1, i + _LONGEST_MARKER)
        marker = text[i:end + 1] if end >= 0 else ""
        if marker in (CALL_CLOSE, CALL_OPEN, TOOL_RESPONSE, TURN_CLOSE):
            self._end_broken_call(marker)
            if marker == CALL_CLOSE:
                self._mode = TEXT
            elif marker == CALL_OPEN:
                self._resume, self._mode = TEXT, CALL_HEADER
            else:
                self._mode = END
            return i + len(marker)
        if not self._final and end < 0 and len(text) - i < _LONGEST_MARKER and text[i:] in _PREFIXES:
            return i
        self._drop("<")
        return i + 1

    def _drop(self, text: str) -> None:
        self._dropped += text[:_SHOWN + 1 - len(self._dropped)]
        self._dropped_count += len(text)

    def _end_broken_call(self, until: str) -> None:
        if self._mode != BROKEN_CALL:
            return
        if self._dropped_count:
            shown = self._dropped if self._dropped_count <= _SHOWN else f"{self._dropped[:_SHOWN]}..."
            count = f"{self._dropped_count} character" + ("s" if self._dropped_count > 1 else "")
            self.problems[-1] += f"; dropped {count} {shown!r} before {until}"
        self._dropped, self._dropped_count = "", 0


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def parse_reply(text: str, *, call_id: Callable[[], str] | None = None, in_thought: bool = False) -> dict[str, Any]:
    """The OpenAI assistant message for a whole reply: {"role": "assistant", "content": str | None,
    "reasoning_content": str (when a thought channel was opened), "tool_calls": [...] (when there are calls)}."""
    stream = ReplyStream(call_id=call_id, in_thought=in_thought)
    stream.push(text)
    stream.finish()
    return stream.message
