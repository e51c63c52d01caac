"""Tool calls, thinking and JSON replies through the SDK: create_chat_completion (plain and streamed), Conversation
(calls and results kept in the transcript and its KV reuse), on the bundled model, which speaks Gemma 4's format."""

from __future__ import annotations

import json

import jsonschema
import pytest

import edge_runtime
from edge_runtime.errors import RequestError

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather now in a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 24}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city"]}}}
VOLUME = {"type": "function", "function": {
    "name": "set_volume", "description": "Set the speaker volume.",
    "parameters": {"type": "object", "properties": {"level": {"type": "integer", "minimum": 0, "maximum": 10}},
                   "required": ["level"]}}}
TOOLS = [WEATHER, VOLUME]
SCHEMAS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Oslo?"}]


@pytest.fixture(scope="module")
def model(bundled):
    return edge_runtime.load(bundled[0], kv="fp32")


def _valid_calls(message: dict) -> list[tuple[str, dict]]:
    calls = []
    for call in message["tool_calls"]:
        assert call["type"] == "function" and call["id"].startswith("call_")
        name, arguments = call["function"]["name"], json.loads(call["function"]["arguments"])
        jsonschema.validate(arguments, SCHEMAS[name])
        calls.append((name, arguments))
    return calls


def _joined(chunks: list[dict]) -> dict:
    """A streamed reply put back together the way OpenAI's clients do."""
    message: dict = {"content": None}
    calls: dict[int, dict] = {}
    for chunk in chunks:
        delta = chunk["choices"][0]["delta"] if chunk["choices"] else {}
        for key in ("content", "reasoning_content"):
            if delta.get(key):
                message[key] = (message.get(key) or "") + delta[key]
        for part in delta.get("tool_calls") or []:
            call = calls.setdefault(part["index"], {"function": {"arguments": ""}})
            for key in ("id", "type"):
                if key in part:
                    call[key] = part[key]
            function = part.get("function") or {}
            if "name" in function:
                call["function"]["name"] = function["name"]
            call["function"]["arguments"] += function.get("arguments") or ""
    if calls:
        message["tool_calls"] = [calls[i] for i in sorted(calls)]
    return message


@pytest.mark.parametrize("seed", range(4))
def test_a_required_call_names_a_declared_tool_with_valid_arguments(model, seed):
    result = model.create_chat_completion(ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
                                          temperature=1.0, seed=seed, max_tokens=80)
    choice = result["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert len(_valid_calls(choice["message"])) == 1


def test_a_named_function_is_the_one_called_and_streaming_gives_the_same_reply(model):
    options = dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "set_volume"}},
                   temperature=1.0, seed=3, max_tokens=40, cache_prompt=False)
    plain = model.create_chat_completion(ASK, **options)
    message = plain["choices"][0]["message"]
    assert [name for name, _ in _valid_calls(message)] == ["set_volume"]
    chunks = list(model.create_chat_completion(ASK, stream=True, **options))
    joined = _joined(chunks)
    assert joined["tool_calls"][0]["function"] == message["tool_calls"][0]["function"]
    assert joined["content"] == message["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_tool_choice_none_never_calls(model):
    for seed in range(3):
        result = model.create_chat_completion(ASK, tools=TOOLS, tool_choice="none", temperature=1.0, seed=seed,
                                              max_tokens=30)
        assert "tool_calls" not in result["choices"][0]["message"]
        assert model.stats.generated_tokens > 0


@pytest.mark.parametrize("seed", range(3))
def test_json_schema_replies_validate(model, seed):
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "temperature": {"type": "number"}},
              "required": ["city", "temperature"], "additionalProperties": False}
    result = model.create_chat_completion(
        [{"role": "user", "content": "The weather in Oslo as JSON."}], temperature=1.0, seed=seed, max_tokens=80,
        response_format={"type": "json_schema", "json_schema": {"name": "weather", "schema": schema}})
    choice = result["choices"][0]
    if choice["finish_reason"] == "stop":
        jsonschema.validate(json.loads(choice["message"]["content"]), schema)
    assert model.stats.mask_seconds > 0


def test_a_conversation_keeps_calls_and_results_and_reuses_its_cache(model):
    conversation = model.conversation("You run a museum kiosk.", tools=TOOLS, tool_choice="required")
    reply = conversation.reply("What is the weather in Oslo?", max_new_tokens=120, temperature=1.0, seed=1)
    for _ in reply:
        pass
    calls = reply.message["tool_calls"]
    assert reply.finish_reason == "tool_calls" and conversation.pending_tool_calls == calls
    with pytest.raises(RequestError) as info:
        conversation.reply(None)
    assert info.value.param == "tool_call_id"
    for call in calls:
        conversation.add_tool_result(call["id"], '{"temperature": 21}')
    with pytest.raises(RequestError) as info:
        conversation.add_tool_result("call_unknown", "x")
    assert str(info.value) == "tool_call_id 'call_unknown' answers no pending tool call (pending: none)"
    conversation.tool_choice = "auto"
    answer = "".join(conversation.reply(None, max_new_tokens=20, temperature=0).content())
    assert [m["role"] for m in conversation.messages] == ["system", "user", "assistant", *["tool"] * len(calls),
                                                         "assistant"]
    assert conversation.messages[-1]["content"] == answer
    assert conversation.stats.cached_tokens > 0  # the transcript up to the results came from the cache
    assert conversation.stats.processed_tokens < conversation.stats.prompt_tokens / 2


def test_a_call_cut_off_by_max_new_tokens_stays_out_of_the_transcript(model):
    """The reply still shows the call (its unfinished arguments, as OpenAI's); the transcript keeps the turn without
    it: it cannot be answered, and kept, the next turn failed on the transcript itself (arguments not valid JSON)."""
    conversation = model.conversation("You run a museum kiosk.", tools=TOOLS, tool_choice="required")
    reply = conversation.reply("What is the weather in Oslo?", max_new_tokens=10, temperature=1.0, seed=1)
    for _ in reply:
        pass
    (call,) = reply.message["tool_calls"]
    assert reply.finish_reason == "length" and not call["function"]["arguments"].endswith("}")
    assert conversation.messages[-1] == {"role": "assistant", "content": ""}
    assert conversation.pending_tool_calls == []
    conversation.tool_choice = "auto"
    answer = conversation.say("And in Paris?", max_new_tokens=8, temperature=0)
    assert [m["role"] for m in conversation.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert conversation.messages[-1]["content"] == answer


def test_the_sdk_refuses_what_it_cannot_honour_with_the_field(model):
    cases = [
        (dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "fly"}}),
         "tool_choice.function.name"),
        (dict(tools=[{"type": "function", "function": {"name": "bad name"}}]), "tools[0].function.name"),
        (dict(response_format={"type": "xml"}), "response_format.type"),
        (dict(chat_template_kwargs=["enable_thinking"]), "chat_template_kwargs"),
    ]
    for options, param in cases:
        with pytest.raises(RequestError) as info:
            model.create_chat_completion(ASK, max_tokens=4, **options)
        assert info.value.param == param, (options, str(info.value))


def test_a_conversation_refuses_bad_tools_at_once_and_compiles_one_grammar_a_reply(model, monkeypatch):
    for options, param in [(dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "fly"}}),
                            "tool_choice.function.name"),
                           (dict(tools=[{"type": "function", "function": {"name": "bad name"}}]),
                            "tools[0].function.name")]:
        with pytest.raises(RequestError) as info:
            model.conversation("You run a museum kiosk.", **options)
        assert info.value.param == param, (options, str(info.value))

    conversation = model.conversation("You run a museum kiosk.", tools=TOOLS, tool_choice="required")
    filler = "The museum opens at nine and closes at five. " * 12
    for _ in range(6):  # more than the context holds: the oldest exchanges are dropped to make room
        conversation.turns += [{"role": "user", "content": filler}, {"role": "assistant", "content": filler}]
    compiled = []
    constraint_for = model.constraint_for
    monkeypatch.setattr(model, "constraint_for", lambda *a, **k: compiled.append(k) or constraint_for(*a, **k))
    reply = conversation.reply("What is the weather in Oslo?", max_new_tokens=60, temperature=1.0, seed=1)
    assert conversation.dropped_turns >= 2 and len(compiled) == 1
    for _ in reply:
        pass
    assert reply.finish_reason in ("tool_calls", "length")
