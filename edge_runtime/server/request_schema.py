"""The JSON bodies of /v1/chat/completions and /v1/completions, checked field by field.

OpenAI clients send many optional fields; each one this runtime honours is type-checked here so that a wrong
type gets a 400 naming the field, each one it cannot honour (n > 1, logprobs, penalties, the deprecated
functions/function_call) is refused by name rather than silently ignored, and everything else (user, metadata,
...) is accepted and ignored. Value ranges (temperature, top_p, ...) are left to the sampler's own checks, which
say what is allowed; the contents of tools, tool_choice and response_format to the SDK's (edge_runtime
.tool_declarations, .constrained_decoding), which name the field too.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from edge_runtime.errors import InvalidTextError
from edge_runtime.text_input import check_text


class BadRequest(Exception):
    """A request the server answers with an OpenAI error object; `param` names the offending field."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400):
        super().__init__(message)
        self.message, self.param, self.code, self.status = message, param, code, status


@dataclass(frozen=True)
class Limits:
    """What one request may ask of a kiosk: bounded so that no client can hold the device for long."""

    max_body_bytes: int = 1 << 20
    max_messages: int = 256
    max_tokens: int | None = None


@dataclass
class GenerationRequest:
    """A checked request: the prompt (messages or text) and the keyword options for openai_shapes."""

    chat: bool
    prompt: Any
    stream: bool
    include_usage: bool
    options: dict[str, Any] = field(default_factory=dict)
    adapter: str | None = None  # the name of a LoRA adapter the server offers (serve --adapter NAME=DIR)


# Passed to the model as given; cache_prompt is llama.cpp's field for reusing the cached prefix.
_OPTIONS = {"temperature": float, "top_p": float, "top_k": int, "min_p": float, "repetition_penalty": float,
            "seed": int, "cache_prompt": bool}
_UNSUPPORTED_IF_SET = ("functions", "function_call", "logit_bias", "suffix")
# Chat-only fields passed to prepare_chat as given (their contents are checked there), with the JSON type each
# must have: tools a list, tool_choice a string or an object, ...
_CHAT_OPTIONS: dict[str, tuple[type, ...]] = {"tools": (list,), "tool_choice": (str, Mapping),
                                              "parallel_tool_calls": (bool,), "response_format": (Mapping,),
                                              "chat_template_kwargs": (Mapping,)}


def _type_name(kind: type) -> str:
    return {float: "a number", int: "an integer", bool: "true or false", str: "a string"}[kind]


def _typed(body: Mapping[str, Any], name: str, kind: type) -> Any:
    value = body.get(name)
    if value is None:
        return None
    numeric = (int, float) if kind is float else kind
    if not isinstance(value, numeric) or (isinstance(value, bool) and kind is not bool):
        raise BadRequest(f"{name} must be {_type_name(kind)}, got {type(value).__name__} {value!r:.40}", name)
    return value


def _stop(body: Mapping[str, Any]) -> str | list[str] | None:
    stop = body.get("stop")
    if stop is None or isinstance(stop, str):
        return stop
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return stop
    raise BadRequest("stop must be a string or a list of strings", "stop")


def _refuse_unsupported(body: Mapping[str, Any]) -> None:
    for name in _UNSUPPORTED_IF_SET:
        if body.get(name):
            raise BadRequest(f"{name} is not supported by this server; send the request without it", name)
    if body.get("n") not in (None, 1):
        raise BadRequest("n must be 1: this server generates one choice per request", "n")
    for name in ("logprobs", "top_logprobs", "echo"):
        if body.get(name):
            raise BadRequest(f"{name} is not supported by this server", name)
    if body.get("best_of") not in (None, 1):
        raise BadRequest("best_of must be 1: this server generates one choice per request", "best_of")
    for name in ("frequency_penalty", "presence_penalty"):
        if body.get(name) not in (None, 0, 0.0):
            raise BadRequest(f"{name} is not supported; use repetition_penalty (e.g. 1.1) instead", name)


def _chat_options(body: Mapping[str, Any], chat: bool) -> dict[str, Any]:
    options = {}
    for name, kinds in _CHAT_OPTIONS.items():
        value = body.get(name)
        if value is None:
            continue
        if not chat:
            raise BadRequest(f"{name} is only taken by /v1/chat/completions", name)
        if not isinstance(value, kinds) or (bool not in kinds and isinstance(value, bool)):
            wanted = " or ".join({list: "a list", str: "a string", Mapping: "an object", bool: "true or false"}[k]
                                 for k in kinds)
            raise BadRequest(f"{name} must be {wanted}, got {type(value).__name__}", name)
        options[name] = value
    return options


def _max_tokens(body: Mapping[str, Any], limits: Limits) -> int | None:
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    value = _typed(body, name, int)
    if value is not None and value < 1:
        raise BadRequest(f"{name} must be at least 1, got {value}", name)
    if value is not None and limits.max_tokens is not None and value > limits.max_tokens:
        raise BadRequest(f"{name}={value} is more than this server allows ({limits.max_tokens})", name)
    return value if value is not None else limits.max_tokens


def _stream_options(body: Mapping[str, Any], stream: bool) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, Mapping):
        raise BadRequest("stream_options must be an object such as {\"include_usage\": true}", "stream_options")
    if not stream:
        raise BadRequest("stream_options is only allowed when stream is true", "stream_options")
    include = options.get("include_usage", False)
    if not isinstance(include, bool):
        raise BadRequest("stream_options.include_usage must be true or false", "stream_options.include_usage")
    return include


def _check_strings(value: Any, path: str) -> None:
    """Every string in the body must be Unicode: JSON's \\ud800 escapes decode to lone surrogates, which the
    tokenizer cannot take (edge_runtime.text_input says why they are refused rather than replaced)."""
    if isinstance(value, str):
        try:
            check_text(value, path)
        except InvalidTextError as exc:
            raise BadRequest(str(exc), path) from None
    elif isinstance(value, Mapping):
        for key, item in value.items():
            _check_strings(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_strings(item, f"{path}[{i}]")


def parse(body: Any, *, chat: bool, limits: Limits) -> GenerationRequest:
    """Check a decoded JSON body; raise BadRequest naming the first thing that is wrong."""
    if not isinstance(body, Mapping):
        raise BadRequest(f"the request body must be a JSON object, got {type(body).__name__}")
    _check_strings(body, "")
    _typed(body, "model", str)
    _refuse_unsupported(body)
    if chat:
        if "messages" not in body:
            raise BadRequest("messages is required: a list of {\"role\": ..., \"content\": ...}", "messages")
        prompt = body["messages"]
        if isinstance(prompt, list) and len(prompt) > limits.max_messages:
            raise BadRequest(f"{len(prompt)} messages is more than this server allows ({limits.max_messages})",
                             "messages")
    else:
        if "prompt" not in body:
            raise BadRequest("prompt is required: a string", "prompt")
        prompt = body["prompt"]
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise BadRequest("prompt must be a string (or a list holding one string)", "prompt")
    stream = _typed(body, "stream", bool) or False
    options: dict[str, Any] = {"max_tokens": _max_tokens(body, limits), "stop": _stop(body),
                               **_chat_options(body, chat)}
    for name, kind in _OPTIONS.items():
        if (value := _typed(body, name, kind)) is not None:
            options[name] = value
    return GenerationRequest(chat, prompt, stream, _stream_options(body, stream), options, _typed(body, "adapter", str))
