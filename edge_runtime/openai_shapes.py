"""Results in the exact shapes of OpenAI's chat.completion and text_completion APIs, plain and streamed.

Apps and the kiosk server speak these shapes already; building them once here keeps the SDK and the server
identical. A request is prepared first (`prepare_chat`, `prepare_completion`): every input error (template,
messages, tools, tool_choice, response_format, options, a prompt that does not fit) raises then, before anything
is generated, so a server can answer 400 instead of breaking off a stream. Generating holds the model's lock until
the result is complete.

A chat reply is OpenAI's assistant message: `content`, `reasoning_content` for a thought channel (as llama.cpp's
server names it) and `tool_calls`, with finish_reason "tool_calls" when the model called tools; streamed, the same
as deltas (edge_runtime.chat_reply).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from edge_runtime.chat_reply import ChatPrompt, ChatReply, chat_prompt
from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.stop_sequences import StopSequences

if TYPE_CHECKING:
    from edge_runtime.model import Model

# OpenAI's default for the legacy completions endpoint; chat replies default to the rest of the context.
COMPLETION_DEFAULT_MAX_TOKENS = 16


def _checked_stops(stop: str | Sequence[str] | None) -> str | Sequence[str]:
    """OpenAI's `stop` (null, one string, or a list), checked now rather than once a stream has begun."""
    stops = () if stop is None else stop
    StopSequences(stops)
    return stops


def _max_tokens(model: Model, prompt_ids: list[int], max_tokens: int | None, default: int | None) -> int:
    if max_tokens is None:
        return default if default is not None else max(model.context_length - len(prompt_ids), 0)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise EdgeRuntimeError(f"max_tokens={max_tokens!r}: must be a positive integer")
    return max_tokens


@dataclass
class PreparedRequest:
    """A checked request, ready to generate as one result or as a stream of chunks."""

    model: Model
    chat: bool
    prompt: ChatPrompt  # for a completion, just its ids
    max_tokens: int
    stop: str | Sequence[str]
    sampling: dict[str, Any]
    cache_prompt: bool = True
    head: dict[str, Any] = field(init=False)

    def __post_init__(self) -> None:
        prefix, kind = ("chatcmpl", "chat.completion") if self.chat else ("cmpl", "text_completion")
        self.head = {"id": f"{prefix}-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()),
                     "model": self.model.name}

    def _pieces(self, should_stop: Callable[[], bool] | None) -> Iterator[str]:
        return self.model.stream_ids(self.prompt.ids, self.max_tokens, self.stop, cache_prompt=self.cache_prompt,
                                     should_stop=should_stop, **self.sampling)

    def _reply(self, should_stop: Callable[[], bool] | None) -> ChatReply:
        return ChatReply(self.model, self.prompt, self.max_tokens, self.stop, cache_prompt=self.cache_prompt,
                         should_stop=should_stop, **self.sampling)

    def _usage(self) -> dict[str, int]:
        s = self.model.stats
        return {"prompt_tokens": s.prompt_tokens, "completion_tokens": s.generated_tokens,
                "total_tokens": s.prompt_tokens + s.generated_tokens}

    def result(self, should_stop: Callable[[], bool] | None = None) -> dict[str, Any]:
        """The whole result. `should_stop` is asked between prefill chunks and tokens, so that a server can drop
        the work of a client that left."""
        with self.model.lock:
            if not self.chat:
                text = "".join(self._pieces(should_stop))
                choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": self.model.stats.finish_reason}
            else:
                reply = self._reply(should_stop)
                for _ in reply:
                    pass
                choice = {"index": 0, "message": reply.message, "logprobs": None,
                          "finish_reason": reply.finish_reason}
            return {**self.head, "choices": [choice], "usage": self._usage()}

    def chunks(self, include_usage: bool = False,
               should_stop: Callable[[], bool] | None = None) -> Iterator[dict[str, Any]]:
        """The result as OpenAI's stream chunks; closing the generator, or `should_stop`, stops the generation."""
        head = {**self.head, "object": "chat.completion.chunk"} if self.chat else self.head
        usage = {"usage": None} if include_usage and self.chat else {}

        def chunk(finish_reason: str | None, delta: dict[str, Any] | None = None, text: str = "") -> dict[str, Any]:
            choice = ({"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason} if self.chat
                      else {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason})
            return {**head, "choices": [choice], **usage}

        with self.model.lock:
            if self.chat:
                yield chunk(None, {"role": "assistant", "content": ""})
                reply = self._reply(should_stop)
                for delta in reply:
                    yield chunk(None, delta)
                yield chunk(reply.finish_reason, {})
            else:
                for piece in self._pieces(should_stop):
                    yield chunk(None, text=piece)
                yield chunk(self.model.stats.finish_reason)
            if include_usage:
                yield {**head, "choices": [], "usage": self._usage()}


def _prepared(model: Model, chat: bool, prompt: ChatPrompt, max_tokens: int | None, default_max_tokens: int | None,
              stop: str | Sequence[str] | None, cache_prompt: bool, sampling: dict[str, Any]) -> PreparedRequest:
    """Every option checked against the model now, so that nothing fails once generation (or a stream) began."""
    model.check_fits(len(prompt.ids))
    limit = _max_tokens(model, prompt.ids, max_tokens, default_max_tokens)
    stops = _checked_stops(stop)
    model.sampler(**sampling)
    return PreparedRequest(model, chat, prompt, limit, stops, sampling, cache_prompt)


def prepare_chat(model: Model, messages: Sequence[Mapping], *, max_tokens: int | None = None,
                 stop: str | Sequence[str] | None = None, cache_prompt: bool = True,
                 tools: Sequence[Mapping] | None = None, tool_choice: str | Mapping | None = None,
                 parallel_tool_calls: bool | None = None, response_format: Mapping | None = None,
                 chat_template_kwargs: Mapping[str, Any] | None = None, **sampling: Any) -> PreparedRequest:
    """A chat request checked against the model: the reply defaults to the rest of the context; tools and
    response_format become the constraint that guarantees their syntax (edge_runtime.chat_reply.chat_prompt)."""
    prompt = chat_prompt(model, messages, tools=tools, tool_choice=tool_choice,
                         parallel_tool_calls=parallel_tool_calls, response_format=response_format,
                         chat_template_kwargs=chat_template_kwargs)
    return _prepared(model, True, prompt, max_tokens, None, stop, cache_prompt, sampling)


def prepare_completion(model: Model, prompt: str, *, max_tokens: int | None = None,
                       stop: str | Sequence[str] | None = None, cache_prompt: bool = True,
                       **sampling: Any) -> PreparedRequest:
    """A plain completion request continuing `prompt` (BOS added), checked against the model."""
    if not isinstance(prompt, str):
        raise EdgeRuntimeError(f"prompt must be a string, not {type(prompt).__name__}")
    return _prepared(model, False, ChatPrompt(model.encode(prompt)), max_tokens, COMPLETION_DEFAULT_MAX_TOKENS, stop,
                     cache_prompt, sampling)


def chat_completion(model: Model, messages: Sequence[Mapping], *, max_tokens: int | None = None, stream: bool = False,
                    stop: str | Sequence[str] | None = None, include_usage: bool = False,
                    **options: Any) -> dict[str, Any] | Iterator[dict[str, Any]]:
    """A chat.completion dict, or (stream=True) a generator of chat.completion.chunk dicts; `options` are
    prepare_chat's (tools, tool_choice, parallel_tool_calls, response_format, chat_template_kwargs, sampling)."""
    request = prepare_chat(model, messages, max_tokens=max_tokens, stop=stop, **options)
    return request.chunks(include_usage) if stream else request.result()


def completion(model: Model, prompt: str, *, max_tokens: int | None = None, stream: bool = False,
               stop: str | Sequence[str] | None = None, include_usage: bool = False,
               **sampling: Any) -> dict[str, Any] | Iterator[dict[str, Any]]:
    """A text_completion dict continuing `prompt` (BOS added), or (stream=True) a generator of its chunks."""
    request = prepare_completion(model, prompt, max_tokens=max_tokens, stop=stop, **sampling)
    return request.chunks(include_usage) if stream else request.result()
