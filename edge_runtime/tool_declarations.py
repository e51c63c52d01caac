"""OpenAI's `tools`, `tool_choice` and `parallel_tool_calls`, checked before a prompt is rendered or a grammar built.

Every fault is a RequestError naming the field as OpenAI's error object does (`tools[1].function.name`), so that a
server answers 400 before anything is generated. Function names are held to OpenAI's own rule (1 to 64 letters,
digits, underscores or dashes): none of those characters is part of Gemma's call syntax, where the name is written
bare in `call:NAME{...}`, so a reply names its function unambiguously.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from edge_runtime.errors import RequestError

FUNCTION_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
TOOL_CHOICE_MODES = ("auto", "none", "required")
_CHOICE_HELP = ('use "auto", "none", "required" or {"type": "function", "function": {"name": "<a declared '
                'function>"}}')


@dataclass(frozen=True)
class Tool:
    """One declared function. `parameters` is its JSON schema (None: the function takes no arguments)."""

    index: int  # its place in the request's `tools`, for naming fields in errors
    name: str
    description: str | None
    parameters: Mapping[str, Any] | None

    @property
    def field(self) -> str:
        return f"tools[{self.index}].function"


@dataclass(frozen=True)
class ToolChoice:
    """`mode` is "auto", "none", "required" or "function" (then `name` is the function every reply must call)."""

    mode: str
    name: str | None = None


def check_tools(tools: Sequence[Any] | None) -> list[Tool]:
    """The declared functions of OpenAI's `tools` (None or [] declares none)."""
    if tools is None:
        return []
    if isinstance(tools, (str, bytes, Mapping)) or not isinstance(tools, Sequence):
        raise RequestError('tools: must be a list of {"type": "function", "function": {...}} objects', "tools")
    checked: list[Tool] = []
    first_index: dict[str, int] = {}
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, Mapping):
            raise RequestError(f'{where}: must be an object {{"type": "function", "function": {{...}}}}', where)
        if tool.get("type") != "function":
            raise RequestError(f'{where}.type: {tool.get("type")!r} is not supported; only "function" tools are',
                               f"{where}.type")
        function = tool.get("function")
        if not isinstance(function, Mapping):
            raise RequestError(f'{where}.function: must be an object with a "name" (and optionally "description" '
                               'and "parameters")', f"{where}.function")
        name = function.get("name")
        if not isinstance(name, str) or not FUNCTION_NAME.fullmatch(name):
            raise RequestError(f"{where}.function.name: {name!r} is not a valid function name; use 1 to 64 letters, "
                               "digits, underscores or dashes", f"{where}.function.name")
        if name in first_index:
            raise RequestError(f"{where}.function.name: {name!r} is already declared by tools[{first_index[name]}]; "
                               "function names must be unique", f"{where}.function.name")
        first_index[name] = i
        description = function.get("description")
        if description is not None and not isinstance(description, str):
            raise RequestError(f"{where}.function.description: must be a string", f"{where}.function.description")
        parameters = function.get("parameters")
        if parameters is not None:
            if not isinstance(parameters, Mapping):
                raise RequestError(f"{where}.function.parameters: must be a JSON schema object describing the "
                                   'arguments, e.g. {"type": "object", "properties": {...}}',
                                   f"{where}.function.parameters")
            if parameters.get("type", "object") != "object":
                raise RequestError(f"{where}.function.parameters: type is {parameters['type']!r}, but a function's "
                                   'arguments are named: use "type": "object" with "properties"',
                                   f"{where}.function.parameters")
        checked.append(Tool(i, name, description, parameters))
    return checked


def check_tool_choice(tool_choice: str | Mapping[str, Any] | None, tools: Sequence[Tool]) -> ToolChoice:
    """OpenAI's `tool_choice` against the declared `tools`; None is OpenAI's default ("auto" with tools, else
    "none")."""
    if tool_choice is None:
        return ToolChoice("auto" if tools else "none")
    if isinstance(tool_choice, str):
        if tool_choice not in TOOL_CHOICE_MODES:
            raise RequestError(f"tool_choice: {tool_choice!r} is not a tool choice; {_CHOICE_HELP}", "tool_choice")
        if tool_choice == "required" and not tools:
            raise RequestError('tool_choice: "required" needs at least one function in tools', "tool_choice")
        return ToolChoice(tool_choice)
    if not isinstance(tool_choice, Mapping):
        raise RequestError(f"tool_choice: {tool_choice!r} is not a tool choice; {_CHOICE_HELP}", "tool_choice")
    if tool_choice.get("type") != "function":
        raise RequestError(f'tool_choice.type: {tool_choice.get("type")!r} is not supported; only "function" is',
                           "tool_choice.type")
    function = tool_choice.get("function")
    name = function.get("name") if isinstance(function, Mapping) else None
    if not isinstance(name, str):
        raise RequestError('tool_choice.function.name: missing; name the function to call, as in {"type": '
                           '"function", "function": {"name": "get_weather"}}', "tool_choice.function.name")
    declared = [tool.name for tool in tools]
    if name not in declared:
        listed = ", ".join(declared) if declared else "none"
        raise RequestError(f"tool_choice.function.name: {name!r} is not a function declared in tools (declared: "
                           f"{listed})", "tool_choice.function.name")
    return ToolChoice("function", name)


def check_parallel_tool_calls(parallel_tool_calls: bool | None) -> bool:
    """OpenAI's `parallel_tool_calls`: whether a reply may make more than one call (default true)."""
    if parallel_tool_calls is None:
        return True
    if not isinstance(parallel_tool_calls, bool):
        raise RequestError(f"parallel_tool_calls: {parallel_tool_calls!r} must be true or false",
                           "parallel_tool_calls")
    return parallel_tool_calls
