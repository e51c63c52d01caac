"""Chat prompts rendered by the checkpoint's own Jinja chat template, the way transformers renders them.

A checkpoint's template is the only authority on its turn format, so it is run as shipped rather than
re-implemented: the same sandboxed Jinja environment as transformers' `apply_chat_template` (trim_blocks,
lstrip_blocks, loop controls, `raise_exception`, a non-escaping `tojson`, `strftime_now`, and the
`{% generation %}` tag that training templates mark replies with) and the same variables (`messages`,
`add_generation_prompt`, `bos_token`, `eos_token`, `tools`/`documents` as None). Templates are untrusted
code from the checkpoint, hence the immutable sandbox.

An artifact exported from a checkpoint without a template falls back to Gemma 4's turn format, which is what
the Gemma 4 E2B/E4B checkpoints ship.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.parser import Parser
from jinja2.sandbox import ImmutableSandboxedEnvironment

from edge_runtime.artifact import Manifest
from edge_runtime.errors import ArtifactError, EdgeRuntimeError
from edge_runtime.text_input import check_text

ROLES = ("system", "user", "assistant")

# Gemma 4's turn format (system is a real role there), as in the E2B/E4B checkpoints' own template minus
# tools, images and thinking, which this text-only runtime does not support.
GEMMA4_TEMPLATE = r"""{{- bos_token -}}
{%- for message in messages -%}
    {%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}
    {{- '<|turn>' + role + '\n' + message['content'] | trim + '<turn|>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|turn>model\n' -}}
{%- endif -%}
"""
GEMMA4_ORIGIN = "built-in Gemma 4 template"

# End-of-turn markers of the template families we know: Gemma 4's, then Gemma 2/3's.
END_OF_TURN_MARKERS = ("<turn|>", "<end_of_turn>")


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
        raise EdgeRuntimeError(f"{where}.content: must be a string or a list of {{'type': 'text', 'text': ...}} "
                               f"parts, got {type(content).__name__}")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind != "text":
            shown = repr(kind) if kind is not None else type(part).__name__
            raise EdgeRuntimeError(f"{where}.content[{j}]: part type {shown} is not supported; "
                                   "only text parts are (this runtime is text-only)")
        if not isinstance(part.get("text"), str):
            raise EdgeRuntimeError(f"{where}.content[{j}]: a text part needs a string 'text'")
        texts.append(check_text(part["text"], f"{where}.content[{j}].text"))
    return "\n".join(texts)


def validate_messages(messages: Any) -> list[dict[str, Any]]:
    """Check OpenAI-style messages and return copies whose content is plain text, as templates expect.

    Checked here rather than left to the template so that a malformed request gets a message naming the
    offending item instead of a Jinja error from deep inside the template.
    """
    if not isinstance(messages, (list, tuple)):
        raise EdgeRuntimeError("messages must be a list of {'role': ..., 'content': ...} objects, "
                               f"got {type(messages).__name__}")
    if not messages:
        raise EdgeRuntimeError("messages is empty: give at least one message")
    checked = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, Mapping):
            raise EdgeRuntimeError(f"{where}: must be an object with 'role' and 'content', "
                                   f"got {type(message).__name__}")
        if "role" not in message:
            raise EdgeRuntimeError(f"{where}: has no 'role'")
        if message["role"] not in ROLES:
            raise EdgeRuntimeError(f"{where}: role {message['role']!r} is not supported; "
                                   "use system, user or assistant")
        if "content" not in message:
            raise EdgeRuntimeError(f"{where}: has no 'content'")
        checked.append({**message, "content": _text_content(message["content"], where)})
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

    def render(self, messages: Sequence[Mapping], add_generation_prompt: bool = True) -> str:
        """The prompt text for `messages` (OpenAI-style role/content dicts), ending with the model's turn
        opener when `add_generation_prompt`.

        The text starts with the BOS *string* where the template writes it (Gemma's do), so tokenize it with
        special tokens parsed and without adding another BOS: a doubled BOS degrades Gemma's output.
        """
        checked = validate_messages(messages)
        try:
            return self._template.render(messages=checked, add_generation_prompt=add_generation_prompt,
                                         bos_token=self.bos_token, eos_token=self.eos_token,
                                         tools=None, documents=None)
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
