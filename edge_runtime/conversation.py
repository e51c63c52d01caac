"""A multi-turn chat over one model: the transcript, rendered by the model's chat template at every turn.

The transcript holds OpenAI messages: the user's, the assistant's replies as the model wrote them (content, the
thought as `reasoning_content`, `tool_calls`), and the `tool` results the caller adds for those calls. A reply
that called tools waits for their results (`pending_tool_calls`); `reply()` with no text then lets the model go on
with them, in the same turn, as Gemma 4's template renders it.

When the transcript and room for a reply (up to a quarter of the context) no longer fit the context, the
oldest exchanges (a user message and everything up to the next one) are dropped, the system prompt kept, as
Ollama does; `dropped_turns` counts them. A message that cannot fit even alone is refused before anything is
dropped, so that the conversation goes on as it was.

The KV cache is not copied or pinned here: each turn's prompt is the whole transcript, and the model keeps
the longest prefix of it already in its cache (`Engine.reuse`), so a turn runs only the tokens added since the
last reply. Two conversations taking turns on one model still answer correctly; they just re-run their
transcripts, as llama.cpp's server does with one slot.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from edge_runtime.chat_reply import ChatPrompt, ChatReply, constrained_prompt, rendered_prompt
from edge_runtime.errors import ContextLengthError, RequestError
from edge_runtime.generation_stats import GenerationStats
from edge_runtime.tool_declarations import check_tool_choice, check_tools

if TYPE_CHECKING:
    from edge_runtime.model import Model


class Conversation:
    def __init__(self, model: Model, system: str | None = None, *, tools: Sequence[Mapping] | None = None,
                 tool_choice: str | Mapping = "auto", chat_template_kwargs: Mapping[str, Any] | None = None) -> None:
        self.model = model
        self.system = system
        self.tools = list(tools) if tools else None
        self.tool_choice = tool_choice
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        check_tool_choice(tool_choice, check_tools(self.tools))  # a bad tool or choice is refused now
        self.turns: list[dict[str, Any]] = []
        self.dropped_turns = 0
        self.stats = GenerationStats()
        """Counts of the last turn kept (`cached_tokens` of its prompt came from the cache, `processed_tokens`
        ran); zeros before the first and after `reset`, whatever else the model ran since."""

    @property
    def messages(self) -> list[dict[str, Any]]:
        """The transcript as OpenAI-style messages, the system prompt first when there is one."""
        return [*self._system_message(), *self.turns]

    def _system_message(self) -> list[dict[str, str]]:
        return [{"role": "system", "content": self.system}] if self.system else []

    @property
    def pending_tool_calls(self) -> list[dict[str, Any]]:
        """The last reply's tool calls that have no result yet."""
        last_assistant = next((i for i in range(len(self.turns) - 1, -1, -1)
                               if self.turns[i]["role"] == "assistant"), None)
        if last_assistant is None:
            return []
        answered = {m.get("tool_call_id") for m in self.turns[last_assistant + 1:] if m["role"] == "tool"}
        return [call for call in self.turns[last_assistant].get("tool_calls") or [] if call["id"] not in answered]

    def add_tool_result(self, tool_call_id: str, content: str) -> None:
        """The result of one of the last reply's calls, as text (JSON text for structured results)."""
        pending = {call["id"]: call for call in self.pending_tool_calls}
        if tool_call_id not in pending:
            waiting = ", ".join(repr(i) for i in pending) or "none"
            raise RequestError(f"tool_call_id {tool_call_id!r} answers no pending tool call (pending: {waiting})",
                               "tool_call_id")
        self.turns.append({"role": "tool", "tool_call_id": tool_call_id,
                           "name": pending[tool_call_id]["function"]["name"], "content": content})

    def reset(self, system: str | None = None) -> None:
        """Forget the turns (the system prompt stays unless a new one is given)."""
        self.turns.clear()
        self.stats = GenerationStats()
        if system is not None:
            self.system = system

    def _prompt(self, added: list[dict[str, Any]], max_new_tokens: int) -> ChatPrompt:
        """The transcript plus `added`, oldest exchanges dropped until a reply has room."""
        model = self.model

        def prompt_of(turns: list[dict[str, Any]]) -> ChatPrompt:
            return rendered_prompt(model, [*self._system_message(), *turns, *added], tools=self.tools,
                                   chat_template_kwargs=self.chat_template_kwargs)

        prompt = prompt_of(self.turns)
        if len(prompt.ids) > model.context_length:
            alone = len(prompt_of([]).ids) if self.turns else len(prompt.ids)
            if alone > model.context_length:
                raise self._too_long(alone)
        room = min(max_new_tokens, model.context_length // 4)
        while len(prompt.ids) + room > model.context_length and self.turns:
            self._drop_oldest_exchange()
            prompt = prompt_of(self.turns)
        return constrained_prompt(model, prompt, tools=self.tools, tool_choice=self.tool_choice,
                                  thinking=bool(self.chat_template_kwargs.get("enable_thinking")))

    def _drop_oldest_exchange(self) -> None:
        """The first user message and everything up to the next one: a call and its results go together."""
        following_user = next((i for i in range(1, len(self.turns)) if self.turns[i]["role"] == "user"),
                              len(self.turns))
        del self.turns[:following_user]
        self.dropped_turns += 1

    def reply(self, text: str | None = None, max_new_tokens: int = 512, stop: Sequence[str] = (),
              **sampling: Any) -> ChatReply:
        """The model's reply to `text` (None: go on after the tool results just added), to iterate for OpenAI
        deltas; the reply joins the transcript once it is complete, and `.message` is then the assistant message."""
        if text is None:
            if pending := self.pending_tool_calls:
                raise RequestError(f"tool calls {', '.join(repr(c['id']) for c in pending)} have no result yet; "
                                   "add each with add_tool_result", "tool_call_id")
            if not self.turns or self.turns[-1]["role"] != "tool":
                raise RequestError("reply() without text continues after tool results; add them first with "
                                   "add_tool_result, or give the user's message", "text")
            added: list[dict[str, Any]] = []
        else:
            added = [{"role": "user", "content": text}]
        return ChatReply(self.model, self._prompt(added, max_new_tokens), max_new_tokens, stop,
                         on_complete=lambda reply: self._join(added, reply), **sampling)

    def _join(self, added: list[dict[str, Any]], reply: ChatReply) -> None:
        """The turn joins the transcript, without any call that broke off (max_new_tokens cut its arguments): its
        unfinished arguments could neither be answered nor rendered again (the template takes only JSON objects),
        so kept, the next reply would fail on the transcript itself."""
        message = dict(reply.message)
        if message.get("tool_calls"):
            finished = [call for call in message["tool_calls"] if _finished(call)]
            if finished:
                message["tool_calls"] = finished
            else:
                del message["tool_calls"]
        if message.get("content") is None and not message.get("tool_calls"):
            message["content"] = ""  # an empty reply is still a turn, and templates need its text
        self.turns += [*added, message]
        self.stats = self.model.stats

    def stream(self, text: str, max_new_tokens: int = 512, stop: Sequence[str] = (),
               **sampling: Any) -> Iterator[str]:
        """The text of the reply to `text`, streamed; the turn joins the transcript once the reply is complete."""
        return self.reply(text, max_new_tokens, stop, **sampling).content()

    def _too_long(self, tokens: int) -> ContextLengthError:
        return ContextLengthError(f"the message takes {tokens} tokens (with the system prompt and the chat "
                                  f"template's markers) but the context holds {self.model.context_length}; it was not "
                                  "added to the conversation: shorten it, or load the model with a longer context")

    def say(self, text: str, max_new_tokens: int = 512, stop: Sequence[str] = (),
            **sampling: Any) -> str:
        """The reply to `text`."""
        return "".join(self.stream(text, max_new_tokens, stop, **sampling))


def _finished(call: Mapping[str, Any]) -> bool:
    """Whether a call's arguments are a whole JSON object (a call cut off keeps an unfinished one: reply_parser)."""
    try:
        return isinstance(json.loads(call["function"]["arguments"]), dict)
    except json.JSONDecodeError:
        return False
