"""One assistant reply as it is generated: OpenAI deltas while it streams, the assistant message at the end.

A chat reply is more than text once the template is Gemma 4's: the model may think first
(`<|channel>thought\\n...<channel|>`) and may call tools (`<|tool_call>call:NAME{...}<tool_call|>`), so its tokens
are decoded with special tokens kept and parsed as they arrive (edge_runtime.reply_parser). Everything that
generates a chat reply (the SDK's chat and create_chat_completion, Conversation, the server) goes through here,
so the reply is taken apart the same way everywhere. A template without those markers gives plain content.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from edge_runtime.chat_template import THOUGHT_OPENER
from edge_runtime.errors import RequestError
from edge_runtime.reply_parser import ReplyStream

if TYPE_CHECKING:
    from edge_runtime.constrained_decoding import Constraint
    from edge_runtime.model import Model

log = logging.getLogger("edge_runtime.chat_reply")


@dataclass(frozen=True)
class ChatPrompt:
    """A chat request rendered and checked, ready for one reply: its token ids, the constraint its tools and
    response_format put on the reply, and whether the prompt already opened a thought (Gemma 4's template does,
    after tool results, when thinking), which the reply then starts inside."""

    ids: list[int]
    constraint: Constraint | None = None
    thought_open: bool = False


def chat_prompt(model: Model, messages: Sequence[Mapping], *, tools: Sequence[Mapping] | None = None,
                tool_choice: str | Mapping | None = None, parallel_tool_calls: bool | None = None,
                response_format: Mapping | None = None,
                chat_template_kwargs: Mapping[str, Any] | None = None) -> ChatPrompt:
    """Every field checked (RequestError naming it) and the grammar compiled before anything is generated."""
    prompt = rendered_prompt(model, messages, tools=tools, chat_template_kwargs=chat_template_kwargs)
    return constrained_prompt(model, prompt, tools=tools, tool_choice=tool_choice,
                              parallel_tool_calls=parallel_tool_calls, response_format=response_format,
                              thinking=bool((chat_template_kwargs or {}).get("enable_thinking")))


def rendered_prompt(model: Model, messages: Sequence[Mapping], *, tools: Sequence[Mapping] | None = None,
                    chat_template_kwargs: Mapping[str, Any] | None = None) -> ChatPrompt:
    """The prompt without its constraint: what a conversation renders again each time it drops an old exchange to
    make room, where only the length matters until the last rendering (constrained_prompt then)."""
    if chat_template_kwargs is not None and (not isinstance(chat_template_kwargs, Mapping)
                                             or not all(isinstance(k, str) for k in chat_template_kwargs)):
        raise RequestError("chat_template_kwargs must be an object such as {\"enable_thinking\": true}",
                           "chat_template_kwargs")
    text = model.render_chat(messages, tools, **dict(chat_template_kwargs or {}))
    return ChatPrompt(model.prompt_ids(text), thought_open=text.endswith(THOUGHT_OPENER))


def constrained_prompt(model: Model, prompt: ChatPrompt, *, tools: Sequence[Mapping] | None = None,
                       tool_choice: str | Mapping | None = None, parallel_tool_calls: bool | None = None,
                       response_format: Mapping | None = None, thinking: bool = False) -> ChatPrompt:
    """`prompt` with the constraint its request fields put on the reply (the grammar compiled now)."""
    constraint = model.constraint_for(response_format, tools, tool_choice, parallel_tool_calls, thinking=thinking,
                                      thought_open=prompt.thought_open)
    return replace(prompt, constraint=constraint)


class ChatReply:
    """Iterate for the deltas (`{"content": ...}`, `{"reasoning_content": ...}`, `{"tool_calls": [...]}`); after
    the iteration `message` is the whole assistant message and `finish_reason` says why it ended ("stop",
    "length", or "tool_calls" when the reply called tools)."""

    def __init__(self, model: Model, prompt: ChatPrompt, max_new_tokens: int, stop: str | Sequence[str] = (),
                 *, cache_prompt: bool = True, should_stop: Callable[[], bool] | None = None,
                 on_complete: Callable[[ChatReply], None] | None = None, **sampling: Any) -> None:
        """`on_complete` hears of a reply that ran to its end (a conversation keeps it), not of one abandoned."""
        self.model = model
        self._on_complete = on_complete
        structured = model.chat_template.structured_replies
        self._pieces = model.stream_ids(prompt.ids, max_new_tokens, stop, stop_token_ids=model.reply_stop_ids,
                                        cache_prompt=cache_prompt, should_stop=should_stop,
                                        constraint=prompt.constraint, special_tokens=structured, **sampling)
        self._parser = ReplyStream(in_thought=prompt.thought_open) if structured else None
        self._text: list[str] = []
        self.message: dict[str, Any] = {"role": "assistant", "content": None}
        self.finish_reason = "stop"

    def __iter__(self) -> Iterator[dict[str, Any]]:
        try:
            for piece in self._pieces:
                if self._parser is None:
                    self._text.append(piece)
                    yield {"content": piece}
                else:
                    yield from self._parser.push(piece)
            if self._parser is not None:
                yield from self._parser.finish()
        finally:
            self._pieces.close()
            self._finish()
        if self._on_complete is not None:
            self._on_complete(self)

    def _finish(self) -> None:
        if self._parser is None:
            self.message = {"role": "assistant", "content": "".join(self._text)}
        else:
            self.message = self._parser.message
            for problem in self._parser.problems:  # what could not be read of a call: for the operator, not the client
                log.warning("reply: %s", problem)
        self.finish_reason = self.model.stats.finish_reason
        if self.message.get("tool_calls") and self.finish_reason == "stop":
            self.finish_reason = "tool_calls"

    def content(self) -> Iterator[str]:
        """Only the reply's text as it streams (what a plain chat shows): no thought, no calls."""
        for delta in self:
            if text := delta.get("content"):
                yield text
