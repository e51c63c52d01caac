"""OpenAI's tools, tool_choice and parallel_tool_calls: each bad input is one RequestError naming its field."""

from __future__ import annotations

import pytest

from edge_runtime.errors import RequestError
from edge_runtime.tool_declarations import Tool, ToolChoice, check_parallel_tool_calls, check_tool_choice, check_tools

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
NOW = {"type": "function", "function": {"name": "now"}}


def refused(call, *args) -> tuple[str, str]:
    with pytest.raises(RequestError) as caught:
        call(*args)
    return caught.value.param, str(caught.value)


def test_declared_tools():
    tools = check_tools([WEATHER, NOW])
    assert tools == [Tool(0, "get_weather", "Weather in a city", WEATHER["function"]["parameters"]),
                     Tool(1, "now", None, None)]
    assert tools[1].field == "tools[1].function"
    assert check_tools(None) == [] and check_tools([]) == []


@pytest.mark.parametrize("tools, param, message", [
    ({"type": "function"}, "tools",
     'tools: must be a list of {"type": "function", "function": {...}} objects'),
    ("get_weather", "tools", 'tools: must be a list of {"type": "function", "function": {...}} objects'),
    ([WEATHER, "now"], "tools[1]", 'tools[1]: must be an object {"type": "function", "function": {...}}'),
    ([{"type": "code_interpreter"}], "tools[0].type",
     "tools[0].type: 'code_interpreter' is not supported; only \"function\" tools are"),
    ([{"function": NOW["function"]}], "tools[0].type", ("tools[0].type: None is not supported; only \"function\" "
                                                       "tools are")),
    ([{"type": "function"}], "tools[0].function",
     'tools[0].function: must be an object with a "name" (and optionally "description" and "parameters")'),
    ([{"type": "function", "function": {"description": "no name"}}], "tools[0].function.name",
     ("tools[0].function.name: None is not a valid function name; use 1 to 64 letters, digits, underscores or "
     "dashes")),
    ([NOW, {"type": "function", "function": {"name": "get weather"}}], "tools[1].function.name",
     ("tools[1].function.name: 'get weather' is not a valid function name; use 1 to 64 letters, digits, "
     "underscores or dashes")),
    ([{"type": "function", "function": {"name": "x{y}"}}], "tools[0].function.name",
     ("tools[0].function.name: 'x{y}' is not a valid function name; use 1 to 64 letters, digits, underscores or "
     "dashes")),
    ([{"type": "function", "function": {"name": "a" * 65}}], "tools[0].function.name",
     (f"tools[0].function.name: {'a' * 65!r} is not a valid function name; use 1 to 64 letters, digits, "
     "underscores or dashes")),
    ([NOW, WEATHER, NOW], "tools[2].function.name",
     "tools[2].function.name: 'now' is already declared by tools[0]; function names must be unique"),
    ([{"type": "function", "function": {"name": "now", "description": 3}}], "tools[0].function.description",
     "tools[0].function.description: must be a string"),
    ([{"type": "function", "function": {"name": "now", "parameters": "city: str"}}], "tools[0].function.parameters",
     ('tools[0].function.parameters: must be a JSON schema object describing the arguments, e.g. {"type": '
     '"object", "properties": {...}}')),
    ([{"type": "function", "function": {"name": "now", "parameters": {"type": "string"}}}],
     "tools[0].function.parameters",
     ("tools[0].function.parameters: type is 'string', but a function's arguments are named: use \"type\": "
     "\"object\" with \"properties\"")),
])
def test_bad_tools(tools, param, message):
    assert refused(check_tools, tools) == (param, message)


def test_tool_choice():
    tools = check_tools([WEATHER, NOW])
    assert check_tool_choice(None, tools) == ToolChoice("auto")
    assert check_tool_choice(None, []) == ToolChoice("none")
    for mode in ("auto", "none", "required"):
        assert check_tool_choice(mode, tools) == ToolChoice(mode)
    assert check_tool_choice({"type": "function", "function": {"name": "now"}}, tools) == ToolChoice("function", "now")


HELP = 'use "auto", "none", "required" or {"type": "function", "function": {"name": "<a declared function>"}}'


@pytest.mark.parametrize("choice, tools, param, message", [
    ("always", [WEATHER], "tool_choice", f"tool_choice: 'always' is not a tool choice; {HELP}"),
    (["auto"], [WEATHER], "tool_choice", f"tool_choice: ['auto'] is not a tool choice; {HELP}"),
    ("required", [], "tool_choice", 'tool_choice: "required" needs at least one function in tools'),
    ({"type": "tool", "function": {"name": "now"}}, [NOW], "tool_choice.type",
     "tool_choice.type: 'tool' is not supported; only \"function\" is"),
    ({"type": "function"}, [NOW], "tool_choice.function.name",
     ('tool_choice.function.name: missing; name the function to call, as in {"type": "function", "function": '
     '{"name": "get_weather"}}')),
    ({"type": "function", "function": {"name": "get_time"}}, [WEATHER, NOW], "tool_choice.function.name",
     "tool_choice.function.name: 'get_time' is not a function declared in tools (declared: get_weather, now)"),
    ({"type": "function", "function": {"name": "now"}}, [], "tool_choice.function.name",
     "tool_choice.function.name: 'now' is not a function declared in tools (declared: none)"),
])
def test_bad_tool_choice(choice, tools, param, message):
    assert refused(check_tool_choice, choice, check_tools(tools)) == (param, message)


def test_parallel_tool_calls():
    assert check_parallel_tool_calls(None) is True
    assert check_parallel_tool_calls(False) is False
    assert refused(check_parallel_tool_calls, "no") == ("parallel_tool_calls",
                                                        "parallel_tool_calls: 'no' must be true or false")
    assert refused(check_parallel_tool_calls, 0) == ("parallel_tool_calls",
                                                     "parallel_tool_calls: 0 must be true or false")
