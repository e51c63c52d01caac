"""Results in the exact shapes of OpenAI's chat.completion and text_completion APIs, plain and streamed.

Apps and the kiosk server speak these shapes already; building them once here keeps the SDK and the server
identical. A streamed result is a generator of chunk dicts that holds the model's lock until it ends.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

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


def _usage(model: Model) -> dict[str, int]:
    s = model.stats
    return {"prompt_tokens": s.prompt_tokens, "completion_tokens": s.generated_tokens,
            "total_tokens": s.prompt_tokens + s.generated_tokens}


def _max_tokens(model: Model, prompt_ids: list[int], max_tokens: int | None, default: int | None) -> int:
    if max_tokens is None:
        return default if default is not None else max(model.context_length - len(prompt_ids), 0)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise EdgeRuntimeError(f"max_tokens={max_tokens!r}: must be a positive integer")
    return max_tokens


def chat_completion(model: Model, messages: Sequence[Mapping], *, max_tokens: int | None = None, stream: bool = False,
                    stop: str | Sequence[str] | None = None, include_usage: bool = False,
                    **sampling: Any) -> dict[str, Any] | Iterator[dict[str, Any]]:
    """A chat.completion dict, or (stream=True) a generator of chat.completion.chunk dicts.

    Input errors (template, messages, options, a prompt that does not fit) raise before anything is generated.
    """
    ids = model.chat_prompt_ids(messages)
    model.check_fits(len(ids))
    limit = _max_tokens(model, ids, max_tokens, None)
    stops = _checked_stops(stop)
    model.sampler(**sampling)  # option errors now, not halfway into a stream
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model.name}

    def pieces() -> Iterator[str]:
        return model.stream_ids(ids, limit, stops, stop_token_ids=model.end_of_turn_ids, **sampling)

    if not stream:
        with model.lock:
            text = "".join(pieces())
            return {**head, "object": "chat.completion", "choices": [{
                "index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                "finish_reason": model.stats.finish_reason}], "usage": _usage(model)}

    def chunk(delta: dict[str, str], finish_reason: str | None) -> dict[str, Any]:
        body = {**head, "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}
        return {**body, "usage": None} if include_usage else body

    def chunks() -> Iterator[dict[str, Any]]:
        with model.lock:
            yield chunk({"role": "assistant", "content": ""}, None)
            for piece in pieces():
                yield chunk({"content": piece}, None)
            yield chunk({}, model.stats.finish_reason)
            if include_usage:
                yield {**head, "object": "chat.completion.chunk", "choices": [], "usage": _usage(model)}

    return chunks()


def completion(model: Model, prompt: str, *, max_tokens: int | None = None, stream: bool = False,
               stop: str | Sequence[str] | None = None, include_usage: bool = False,
               **sampling: Any) -> dict[str, Any] | Iterator[dict[str, Any]]:
    """A text_completion dict continuing `prompt` (BOS added), or (stream=True) a generator of its chunks."""
    if not isinstance(prompt, str):
        raise EdgeRuntimeError(f"prompt must be a string, not {type(prompt).__name__}")
    ids = model.encode(prompt)
    model.check_fits(len(ids))
    limit = _max_tokens(model, ids, max_tokens, COMPLETION_DEFAULT_MAX_TOKENS)
    stops = _checked_stops(stop)
    model.sampler(**sampling)
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": model.name}

    def choice(text: str, finish_reason: str | None) -> dict[str, Any]:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}

    if not stream:
        with model.lock:
            text = "".join(model.stream_ids(ids, limit, stops, **sampling))
            return {**head, "choices": [choice(text, model.stats.finish_reason)], "usage": _usage(model)}

    def chunks() -> Iterator[dict[str, Any]]:
        with model.lock:
            for piece in model.stream_ids(ids, limit, stops, **sampling):
                yield {**head, "choices": [choice(piece, None)]}
            yield {**head, "choices": [choice("", model.stats.finish_reason)]}
            if include_usage:
                yield {**head, "choices": [], "usage": _usage(model)}

    return chunks()
