"""Chat prompts rendered by the checkpoint's own Jinja chat template, the way transformers renders them.

A checkpoint's template is the only authority on its turn format, so it is run as shipped rather than
re-implemented: the same sandboxed Jinja environment as transformers' `apply_chat_template` (trim_blocks,
lstrip_blocks, loop controls, `raise_exception`, a non-escaping `tojson`, `strftime_now`, and the
`{% generation %}` tag that training templates mark replies with) and the same variables (`messages`,
`add_generation_prompt`, `bos_token`, `eos_token`, `tools`, `documents`, and the caller's template kwargs such
as `enable_thinking`). Templates are untrusted code from the checkpoint, hence the immutable sandbox.

Messages are OpenAI's: system/developer, user, assistant (with `tool_calls` and `reasoning_content`) and `tool`
results. They are checked here, so that a malformed request is told which field is wrong instead of getting a
Jinja error from deep inside a template, and tool calls whose arguments are JSON text (as OpenAI clients send them)
are given to the template as objects, which is what Gemma 4's template requires.

An artifact exported from a checkpoint without a template falls back to Gemma 4's canonical template
(chat_templates/gemma4.jinja), which is what the Gemma 4 E2B/E4B checkpoints ship.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from importlib.resources import files
from pathlib import Path
from typing import Any, ClassVar

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.parser import Parser
from jinja2.sandbox import ImmutableSandboxedEnvironment

from edge_runtime.artifact import Manifest
from edge_runtime.errors import ArtifactError, EdgeRuntimeError, RequestError
from edge_runtime.text_input import check_text

ROLES = ("system", "developer", "user", "assistant", "tool")

GEMMA4_TEMPLATE = (files("edge_runtime") / "chat_templates" / "gemma4.jinja").read_text(encoding="utf-8")
GEMMA4_ORIGIN = "built-in Gemma 4 template"

# Names the renderer sets itself, which template kwargs may not replace.
RESERVED_VARIABLES = ("messages", "tools", "documents", "add_generation_prompt", "bos_token", "eos_token")

# End-of-turn markers of the template families we know: Gemma 4's, then Gemma 2/3's.
END_OF_TURN_MARKERS = ("<turn|>", "<end_of_turn>")
# Gemma 4 writes this after its tool calls: the caller's results come next, so the reply ends there.
TOOL_RESPONSE_MARKER = "<|tool_response>"
# Markers of Gemma 4's structured replies (thought channel, tool calls): a template that writes them gets replies
# decoded with special tokens kept and parsed into content, reasoning and calls.
STRUCTURE_MARKERS = ("<|channel>", "<|tool_call>")
# Gemma 4's template ends the prompt with this after tool results when thinking: the reply starts inside a thought.
THOUGHT_OPENER = "<|channel>thought\n"


class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}`: transformers uses it to find the assistant's tokens for
    training masks; rendering a prompt only needs the body, so the tag renders its body unchanged."""

    tags: ClassVar[set[str]] = {"generation"}

    def parse(self, parser: Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body).set_lineno(lineno)


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    """transformers' `tojson`: Jinja's own escapes HTML characters, which would change the prompt."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _token_string(value: Any, default: str) -> str:
    """A special token as tokenizer_config.json writes it: a string, an AddedToken dict, or null (none)."""
    if isinstance(value, Mapping):
        value = value.get("content")
    if value is None:
        return ""
    return value if isinstance(value, str) else default


def _text_content(content: Any, where: str) -> str:
    """The message's text: a string as is, OpenAI content parts joined by newlines (as vLLM and llama.cpp's
    server join them for text-only templates)."""
    if isinstance(content, str):
        return check_text(content, f"{where}.content")
    if not isinstance(content, (list, tuple)):
        raise RequestError(f"{where}.content: must be a string or a list of {{'type': 'text', 'text': ...}} "
                           f"parts, got {type(content).__name__}", f"{where}.content")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind != "text":
            shown = repr(kind) if kind is not None else type(part).__name__
            raise RequestError(f"{where}.content[{j}]: part type {shown} is not supported; "
                               "only text parts are (this runtime is text-only)", f"{where}.content[{j}]")
        if not isinstance(part.get("text"), str):
            raise RequestError(f"{where}.content[{j}]: a text part needs a string 'text'", f"{where}.content[{j}].text")
        texts.append(check_text(part["text"], f"{where}.content[{j}].text"))
    return "\n".join(texts)


def _message_text(message: Mapping, where: str, *, optional: bool) -> str | None:
    """The message's content as text; None where an assistant message with tool calls has none."""
    if message.get("content") is None and optional:
        return None
    if "content" not in message:
        raise RequestError(f"{where}: has no 'content'", f"{where}.content")
    return _text_content(message["content"], where)


def _call_arguments(arguments: Any, where: str) -> dict[str, Any]:
    """A call's arguments as the object templates format: OpenAI sends JSON text, Gemma's own messages an object."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as exc:
            raise RequestError(f"{where}: not valid JSON ({exc.msg} at character {exc.pos}); give the arguments as "
                               "a JSON object or its text", where) from None
    if not isinstance(arguments, Mapping):
        raise RequestError(f"{where}: must be a JSON object (or its text), got {type(arguments).__name__}", where)
    return dict(arguments)


def _tool_calls(calls: Any, where: str, declared: set[str] | None) -> list[dict[str, Any]]:
    if not isinstance(calls, (list, tuple)):
        raise RequestError(f"{where}: must be a list of {{'id', 'type': 'function', 'function': {{'name', "
                           f"'arguments'}}}} objects, got {type(calls).__name__}", where)
    checked = []
    for j, call in enumerate(calls):
        at = f"{where}[{j}]"
        function = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(function, Mapping):
            raise RequestError(f"{at}: needs a 'function' object with 'name' and 'arguments'", f"{at}.function")
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise RequestError(f"{at}.function.name: must be a non-empty string", f"{at}.function.name")
        if declared is not None and name not in declared:
            raise RequestError(f"{at}.function.name: {name!r} is not one of the declared tools "
                               f"({', '.join(sorted(declared)) or 'none'}); declare it in tools", f"{at}.function.name")
        call_id = call.get("id")
        if call_id is not None and not isinstance(call_id, str):
            raise RequestError(f"{at}.id: must be a string", f"{at}.id")
        arguments = _call_arguments(function.get("arguments", {}), f"{at}.function.arguments")
        checked.append({**call, "type": call.get("type", "function"),
                        "function": {**function, "arguments": arguments}})
    return checked


def _answered_call(message: Mapping, where: str, calls: list[dict[str, Any]], answered: set[int]) -> None:
    """A tool result must answer a call of the assistant message it follows: by `tool_call_id`, or by `name` for
    callers that do not keep ids. Matched here because a template would render an unmatched result under a wrong
    or "unknown" name, which the model then misreads."""
    call_id, name = message.get("tool_call_id"), message.get("name")
    if call_id is not None:
        if not isinstance(call_id, str):
            raise RequestError(f"{where}.tool_call_id: must be a string", f"{where}.tool_call_id")
        matches = [j for j, call in enumerate(calls) if call.get("id") == call_id]
        what, param = f"tool_call_id {call_id!r}", f"{where}.tool_call_id"
    else:
        matches = [j for j, call in enumerate(calls) if call["function"]["name"] == name and j not in answered]
        what, param = f"name {name!r}" if name is not None else "no tool_call_id", f"{where}.tool_call_id"
    if not calls:
        raise RequestError(f"{where}: a tool result with no tool call before it; a 'tool' message must follow the "
                           "assistant message whose tool_calls it answers", param)
    if not matches:
        ids = ", ".join(repr(call.get("id")) for call in calls)
        raise RequestError(f"{where}: {what} answers none of the preceding assistant message's tool calls "
                           f"(ids {ids}); set tool_call_id to the id of the call it answers", param)
    answered.add(matches[0])


def validate_messages(messages: Any, tools: Sequence[Mapping] | None = None) -> list[dict[str, Any]]:
    """Check OpenAI-style messages and return copies as templates expect them: content as plain text, tool call
    arguments as objects, every tool result matched to the call it answers.

    With `tools` given, a call naming a tool that is not declared is refused (the model would learn from its own
    transcript to call it).
    """
    if not isinstance(messages, (list, tuple)):
        raise RequestError("messages must be a list of {'role': ..., 'content': ...} objects, "
                           f"got {type(messages).__name__}", "messages")
    if not messages:
        raise RequestError("messages is empty: give at least one message", "messages")
    declared = None if not tools else {tool["function"]["name"] for tool in tools}
    checked = []
    calls: list[dict[str, Any]] = []
    answered: set[int] = set()
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, Mapping):
            raise RequestError(f"{where}: must be an object with 'role' and 'content', "
                               f"got {type(message).__name__}", where)
        if "role" not in message:
            raise RequestError(f"{where}: has no 'role'", f"{where}.role")
        role = message["role"]
        if role not in ROLES:
            raise RequestError(f"{where}: role {role!r} is not supported; use {', '.join(ROLES)}", f"{where}.role")
        copy = dict(message)
        if role == "assistant" and message.get("tool_calls"):
            copy["tool_calls"] = calls = _tool_calls(message["tool_calls"], f"{where}.tool_calls", declared)
            answered = set()
            copy["content"] = _message_text(message, where, optional=True)
        elif role == "tool":
            _answered_call(message, where, calls, answered)
            copy["content"] = _message_text(message, where, optional=False)
        else:
            copy.pop("tool_calls", None)
            calls = []
            copy["content"] = _message_text(message, where, optional=False)
        reasoning = message.get("reasoning_content")
        if reasoning is not None:
            copy["reasoning_content"] = check_text(reasoning, f"{where}.reasoning_content") \
                if isinstance(reasoning, str) else _text_content(reasoning, f"{where}.reasoning_content")
        checked.append(copy)
    return checked


class ChatTemplate:
    """A compiled chat template and the special-token strings it is rendered with."""

    def __init__(self, source: str, *, bos_token: str = "<bos>", eos_token: str = "<eos>",
                 origin: str = "fallback") -> None:
        """Compile `source`; `origin` names it in error messages (the template file's path, or the fallback)."""
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.origin = origin
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            message = _one_line(exc.message or exc).rstrip(".")
            raise EdgeRuntimeError(f"chat template {origin}, line {exc.lineno}: {message}; "
                                   "fix the template or re-export") from exc

    @classmethod
    def for_artifact(cls, path: Path, manifest: Manifest) -> ChatTemplate:
        """The artifact's own template if it has one, else Gemma 4's; bos/eos strings from its
        tokenizer_config.json where present (only `manifest.tokenizer` is read)."""
        path = Path(path)
        names = manifest.tokenizer
        bos, eos = "<bos>", "<eos>"
        if config_name := names.get("tokenizer_config"):
            config_path = path / config_name
            try:
                config = json.loads(config_path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise ArtifactError(f"{config_path}: not valid JSON ({exc}); re-export the checkpoint") from exc
            bos = _token_string(config.get("bos_token", bos), bos)
            eos = _token_string(config.get("eos_token", eos), eos)
        if template_name := names.get("chat_template"):
            template_path = path / template_name
            return cls(template_path.read_text(encoding="utf-8"), bos_token=bos, eos_token=eos,
                       origin=str(template_path))
        return cls(GEMMA4_TEMPLATE, bos_token=bos, eos_token=eos, origin=GEMMA4_ORIGIN)

    def render(self, messages: Sequence[Mapping], add_generation_prompt: bool = True,
               tools: Sequence[Mapping] | None = None, **template_kwargs: Any) -> str:
        """The prompt text for `messages` (OpenAI-style), ending with the model's turn opener when
        `add_generation_prompt`; `tools` are OpenAI function declarations (checked by the caller), and
        `template_kwargs` reach the template as variables (`enable_thinking=True`), as in transformers.

        The text starts with the BOS *string* where the template writes it (Gemma's do), so tokenize it with
        special tokens parsed and without adding another BOS: a doubled BOS degrades Gemma's output.
        """
        for name in template_kwargs:
            if name in RESERVED_VARIABLES:
                raise RequestError(f"chat_template_kwargs.{name}: set by the runtime itself; pass it as its own "
                                   "argument instead", f"chat_template_kwargs.{name}")
        checked = validate_messages(messages, tools)
        try:
            return self._template.render(messages=checked, add_generation_prompt=add_generation_prompt,
                                         bos_token=self.bos_token, eos_token=self.eos_token,
                                         tools=list(tools) if tools else None, documents=None, **template_kwargs)
        except jinja2.TemplateError as exc:
            raise EdgeRuntimeError(f"chat template {self.origin}: {_one_line(exc.message or exc)}") from exc
        except (ArithmeticError, LookupError, TypeError, ValueError) as exc:  # a template bug, not ours
            raise EdgeRuntimeError(f"chat template {self.origin}: {type(exc).__name__}: {_one_line(exc)}") from exc

    def end_of_turn(self) -> str | None:
        """The marker that closes a turn ("<turn|>" for Gemma 4, "<end_of_turn>" for Gemma 2/3), or None.

        Found by looking for the known markers in the template source: every Gemma template writes its
        marker literally, and a template of another family has none the runtime could rely on anyway.
        """
        return next((marker for marker in END_OF_TURN_MARKERS if marker in self.source), None)

    def reply_end_markers(self) -> list[str]:
        """The markers that end a reply: the end of turn, and Gemma 4's `<|tool_response>` after tool calls."""
        ends = [self.end_of_turn()] if self.end_of_turn() else []
        return ends + ([TOOL_RESPONSE_MARKER] if TOOL_RESPONSE_MARKER in self.source else [])

    @property
    def structured_replies(self) -> bool:
        """Whether replies carry Gemma 4's thought channel and tool-call markers (see STRUCTURE_MARKERS)."""
        return any(marker in self.source for marker in STRUCTURE_MARKERS)
