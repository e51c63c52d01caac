"""Gemma 4's canonical template with tools, thinking and tool results: rendered exactly as transformers'
apply_chat_template renders it, and every malformed tool message refused with the field it is in."""

from __future__ import annotations

import copy
import json

import pytest

from edge_runtime.bundled import BUNDLED_CHECKPOINT
from edge_runtime.chat_template import GEMMA4_ORIGIN, GEMMA4_TEMPLATE, ChatTemplate
from edge_runtime.errors import RequestError

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "The weather now in a city.",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "description": "City name"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            "days": {"type": "integer", "description": "Forecast days"},
        }, "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "set_volume", "description": "Set the speaker volume.",
        "parameters": {"type": "object", "properties": {
            "level": {"type": "number"}, "muted": {"type": "boolean"},
            "zones": {"type": "array", "items": {"type": "string"}},
            "schedule": {"type": "object", "properties": {"start": {"type": "string"}, "end": {"type": "string"}},
                         "required": ["start"]},
        }, "required": ["level"]}}},
    {"type": "function", "function": {"name": "ping", "description": "Check the link."}},
]
CALL_ARGS = {"city": "Paris", "unit": "celsius", "days": 3}
VOLUME_ARGS = {"level": -2.5e-3, "muted": False, "zones": ["hall", "café"], "schedule": {"start": "9:00", "end": None}}
CONVERSATIONS = {
    "tools only": [{"role": "user", "content": "Weather in Paris?"}],
    "system, tools": [{"role": "system", "content": " Be brief. "}, {"role": "user", "content": "Weather in Paris?"}],
    "developer role": [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    "call and result": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": CALL_ARGS}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21, "sky": "clear"}'},
    ],
    "call, result, answer, next question": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "Let me look.", "reasoning_content": "Use the tool.", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": CALL_ARGS}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21 C, clear"},
        {"role": "assistant", "content": "It is 21 C and clear."},
        {"role": "user", "content": "And louder please."},
    ],
    "parallel calls, results by id out of order": [
        {"role": "user", "content": "Paris weather and volume 3"},
        {"role": "assistant", "content": "", "reasoning_content": "Two tools.", "tool_calls": [
            {"id": "a", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
            {"id": "b", "type": "function", "function": {"name": "set_volume", "arguments": VOLUME_ARGS}},
            {"id": "c", "type": "function", "function": {"name": "ping", "arguments": {}}}]},
        {"role": "tool", "tool_call_id": "b", "content": "ok"},
        {"role": "tool", "tool_call_id": "a", "content": [{"type": "text", "text": "sunny"}]},
        {"role": "tool", "tool_call_id": "c", "content": "pong"},
    ],
}


@pytest.fixture(scope="module")
def gemma4() -> ChatTemplate:
    return ChatTemplate(GEMMA4_TEMPLATE, origin=GEMMA4_ORIGIN)


@pytest.fixture(scope="module")
def hf():
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(BUNDLED_CHECKPOINT / "tokenizer.json"),
                                        bos_token="<bos>", eos_token="<eos>")
    tokenizer.chat_template = GEMMA4_TEMPLATE
    return tokenizer


def _openai_form(messages: list[dict]) -> list[dict]:
    """The same messages as an OpenAI client sends them: call arguments as JSON text."""
    messages = copy.deepcopy(messages)
    for message in messages:
        for call in message.get("tool_calls") or []:
            call["function"]["arguments"] = json.dumps(call["function"]["arguments"])
    return messages


@pytest.mark.parametrize("name", list(CONVERSATIONS))
@pytest.mark.parametrize("thinking", [False, True])
@pytest.mark.parametrize("with_tools", [False, True])
def test_tools_thinking_and_results_render_as_transformers_does(gemma4, hf, name, thinking, with_tools):
    messages = CONVERSATIONS[name]
    tools = TOOLS if with_tools else None
    kwargs = {"enable_thinking": True} if thinking else {}
    expected = hf.apply_chat_template(copy.deepcopy(messages), tools=copy.deepcopy(tools), tokenize=False,
                                      add_generation_prompt=True, **kwargs)
    assert gemma4.render(messages, tools=tools, **kwargs) == expected
    assert gemma4.render(_openai_form(messages), tools=tools, **kwargs) == expected


def test_the_rendering_is_gemma_4s_format(gemma4):
    """One rendering written out, so that a change of template or of the renderer shows as a readable diff."""
    text = gemma4.render(CONVERSATIONS["call and result"], tools=TOOLS[:1], enable_thinking=True)
    assert text == (
        "<bos><|turn>system\n<|think|>\n<|tool>declaration:get_weather{description:<|\"|>The weather now in a "
        "city.<|\"|>,parameters:{properties:{city:{description:<|\"|>City name<|\"|>,type:<|\"|>STRING<|\"|>},"
        "days:{description:<|\"|>Forecast days<|\"|>,type:<|\"|>INTEGER<|\"|>},unit:{enum:[<|\"|>celsius<|\"|>,"
        "<|\"|>fahrenheit<|\"|>],type:<|\"|>STRING<|\"|>}},required:[<|\"|>city<|\"|>],type:<|\"|>OBJECT<|\"|>}}"
        "<tool|><turn|>\n<|turn>user\nWeather in Paris?<turn|>\n"
        "<|turn>model\n<|tool_call>call:get_weather{city:<|\"|>Paris<|\"|>,days:3,unit:<|\"|>celsius<|\"|>}"
        "<tool_call|><|tool_response>response:get_weather{value:<|\"|>{\"temperature\": 21, \"sky\": \"clear\"}"
        "<|\"|>}<tool_response|><|channel>thought\n")


def test_reply_markers(gemma4):
    assert gemma4.structured_replies
    assert gemma4.reply_end_markers() == ["<turn|>", "<|tool_response>"]
    gemma3 = ChatTemplate("{% for m in messages %}<start_of_turn>{{ m['content'] }}<end_of_turn>{% endfor %}")
    assert not gemma3.structured_replies
    assert gemma3.reply_end_markers() == ["<end_of_turn>"]


CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}
USER = {"role": "user", "content": "Weather?"}


@pytest.mark.parametrize(("messages", "tools", "param", "message"), [
    ([USER, {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}], None, "messages[1].tool_call_id",
     ("messages[1]: a tool result with no tool call before it; a 'tool' message must follow the assistant message "
     "whose tool_calls it answers")),
    ([USER, {"role": "assistant", "content": None, "tool_calls": [CALL]},
      {"role": "tool", "tool_call_id": "call_9", "content": "sunny"}], None, "messages[2].tool_call_id",
     ("messages[2]: tool_call_id 'call_9' answers none of the preceding assistant message's tool calls (ids "
     "'call_1'); set tool_call_id to the id of the call it answers")),
    ([USER, {"role": "assistant", "content": None, "tool_calls": [CALL]},
      {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}, {"role": "user", "content": "And?"},
      {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}], None, "messages[4].tool_call_id",
     ("messages[4]: a tool result with no tool call before it; a 'tool' message must follow the assistant message "
     "whose tool_calls it answers")),
    ([USER, {"role": "assistant", "content": None, "tool_calls": [CALL]}], TOOLS[1:2],
     "messages[1].tool_calls[0].function.name",
     ("messages[1].tool_calls[0].function.name: 'get_weather' is not one of the declared tools (set_volume); "
     "declare it in tools")),
    ([USER, {"role": "assistant", "content": None, "tool_calls": [
        {**CALL, "function": {"name": "get_weather", "arguments": "{city: Oslo}"}}]}], None,
     "messages[1].tool_calls[0].function.arguments",
     ("messages[1].tool_calls[0].function.arguments: not valid JSON (Expecting property name enclosed in double "
     "quotes at character 1); give the arguments as a JSON object or its text")),
    ([USER, {"role": "assistant", "content": None, "tool_calls": [
        {**CALL, "function": {"name": "get_weather", "arguments": "[1]"}}]}], None,
     "messages[1].tool_calls[0].function.arguments",
     "messages[1].tool_calls[0].function.arguments: must be a JSON object (or its text), got list"),
    ([USER, {"role": "assistant", "content": None, "tool_calls": [{"id": "x"}]}], None,
     "messages[1].tool_calls[0].function",
     "messages[1].tool_calls[0]: needs a 'function' object with 'name' and 'arguments'"),
    ([USER, {"role": "assistant", "content": None, "tool_calls": {"id": "x"}}], None, "messages[1].tool_calls",
     ("messages[1].tool_calls: must be a list of {'id', 'type': 'function', 'function': {'name', 'arguments'}} "
     "objects, got dict")),
    ([{"role": "robot", "content": "beep"}], None, "messages[0].role",
     "messages[0]: role 'robot' is not supported; use system, developer, user, assistant, tool"),
])
def test_bad_tool_messages_name_the_field(gemma4, messages, tools, param, message):
    with pytest.raises(RequestError) as info:
        gemma4.render(messages, tools=tools)
    assert (info.value.param, str(info.value)) == (param, message)


def test_a_result_without_an_id_is_matched_by_name(gemma4, hf):
    messages = [USER, {"role": "assistant", "content": None, "tool_calls": [CALL]},
                {"role": "tool", "name": "get_weather", "content": "sunny"}]
    assert gemma4.render(messages) == hf.apply_chat_template(copy.deepcopy(messages), tokenize=False,
                                                              add_generation_prompt=True)


def test_template_kwargs_cannot_replace_the_renderers_variables(gemma4):
    with pytest.raises(RequestError) as info:
        gemma4.render([USER], bos_token="")
    assert (info.value.param, str(info.value)) == (
        "chat_template_kwargs.bos_token",
        "chat_template_kwargs.bos_token: set by the runtime itself; pass it as its own argument instead")
