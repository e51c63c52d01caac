"""Gemma 4 replies read into OpenAI assistant messages, whole and streamed: every case has its exact message, and
streaming it in any pieces gives the same message through deltas that never show a marker."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import edge_runtime
from edge_runtime.chat_template import ChatTemplate
from edge_runtime.reply_parser import MARKERS, ReplyStream, new_call_id, parse_reply

Q = '<|"|>'
TEMPLATE_PATH = Path(edge_runtime.__file__).parent / "chat_templates" / "gemma4.jinja"


def ids() -> Callable[[], str]:
    counter = itertools.count()
    return lambda: f"call_{next(counter)}"


def msg(content: str | None, reasoning: str | None = None, calls: tuple[tuple[str, str], ...] = ()) -> dict:
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if reasoning is not None:
        message["reasoning_content"] = reasoning
    if calls:
        message["tool_calls"] = [{"id": f"call_{i}", "type": "function",
                                  "function": {"name": name, "arguments": arguments}}
                                 for i, (name, arguments) in enumerate(calls)]
    return message


ALL_KINDS = {"s": 'He said "hi", {ok}: [yes],\nnext line', "u": "ünïcode ✓ 日本語 🙂", "empty": "", "i": -3,
             "f": 2.5, "e": 1e-3, "E": 6.02e23, "t": True, "fl": False, "n": None,
             "arr": [1, "two", [], {}], "obj": {"inner": {"deep": [None, -0.5e2]}}, "eo": {}, "ea": []}
ALL_KINDS_TEXT = (f'{{s:{Q}He said "hi", {{ok}}: [yes],\nnext line{Q},u:{Q}ünïcode ✓ 日本語 🙂{Q},empty:{Q}{Q},'
                  f"i:-3,f:2.5,e:1e-3,E:6.02E23,t:true,fl:false,n:null,arr:[1,{Q}two{Q},[],{{}}],"
                  "obj:{inner:{deep:[null,-0.5e2]}},eo:{},ea:[]}")
WEATHER = f"<|tool_call>call:get_weather{{city:{Q}Paris{Q},days:3}}<tool_call|>"
WEATHER_ARGS = '{"city":"Paris","days":3}'

# (text, message, problems): the reply as the model writes it, the message it is, what the stream reports.
CASES: dict[str, tuple[str, dict, list[str]]] = {
    "plain": ("Hello there.", msg("Hello there."), []),
    "plain trimmed": ("  \n Hello there. \n\n", msg("Hello there."), []),
    "empty": ("", msg(""), []),
    "thinking": ("<|channel>thought\nThe user wants X...<channel|>The answer is 4.",
                 msg("The answer is 4.", "The user wants X..."), []),
    "thinking as the template writes it": ("<|channel>thought\nStep 1.\n\nStep 2.\n<channel|>\n4\n",
                                           msg("4", "Step 1.\n\nStep 2."), []),
    "thinking only": ("<|channel>thought\nDone.<channel|>", msg("", "Done."), []),
    "thought left open": ("<|channel>thought\nStill thinking ", msg("", "Still thinking"), []),
    "empty thought": ("<|channel>thought\n<channel|>Hi", msg("Hi", ""), []),
    "channel without a name": ("<|channel>pondering<channel|>ok", msg("ok", "pondering"), []),
    "one call": (WEATHER, msg(None, calls=(("get_weather", WEATHER_ARGS),)), []),
    "content before a call, waiting for the response": (
        f"Let me check. {WEATHER}<|tool_response>response:get_weather{{temp:20}}<tool_response|>",
        msg("Let me check.", calls=(("get_weather", WEATHER_ARGS),)), []),
    "content after a call": (f"{WEATHER}Done.", msg("Done.", calls=(("get_weather", WEATHER_ARGS),)), []),
    "parallel calls": (
        "<|tool_call>call:a{x:1}<tool_call|>\n <|tool_call>call:b{y:[1,2]}<tool_call|>\n",
        msg(None, calls=(("a", '{"x":1}'), ("b", '{"y":[1,2]}'))), []),
    "two calls in one block": ("<|tool_call>call:a{}call:b{k:null}<tool_call|>",
                               msg(None, calls=(("a", "{}"), ("b", '{"k":null}'))), []),
    "thinking and calls": (
        f"<|channel>thought\nNeed the weather.\n<channel|>{WEATHER}<|tool_response>",
        msg(None, "Need the weather.", (("get_weather", WEATHER_ARGS),)), []),
    "every kind of value": (f"<|tool_call>call:f{ALL_KINDS_TEXT}<tool_call|>",
                            msg(None, calls=(("f", json.dumps(ALL_KINDS, ensure_ascii=False,
                                                              separators=(",", ":"))),)), []),
    "markers inside a string argument": (
        f"<|tool_call>call:run{{code:{Q}if a<b: print(\"<|channel>\") <tool_call|>{Q}}}<tool_call|>",
        msg(None, calls=(("run", '{"code":"if a<b: print(\\"<|channel>\\") <tool_call|>"}'),)), []),
    "escaped keys": (f"<|tool_call>call:f{{{Q}city{Q}:{Q}Oslo{Q},{Q}odd key: {{x}}{Q}:1}}<tool_call|>",
                     msg(None, calls=(("f", '{"city":"Oslo","odd key: {x}":1}'),)), []),
    "whitespace inside a call": ("<|tool_call> call:f { a : 1 ,\n b : [ 1 , 2 ] } <tool_call|>",
                                 msg(None, calls=(("f", '{"a":1,"b":[1,2]}'),)), []),
    "call without its closer": ("<|tool_call>call:f{a:1}<|tool_response>", msg(None, calls=(("f", '{"a":1}'),)),
                                []),
    "text after a call's brace": ("<|tool_call>call:f{a:1} then<tool_call|>", msg("then", calls=(("f", '{"a":1}'),)),
                                  []),
    "call inside a thought": ("<|channel>thought\nI should call.<|tool_call>call:f{}<tool_call|>",
                              msg(None, "I should call.", (("f", "{}"),)), []),
    "second opener inside a thought": ("<|channel>thought\nA<|channel>thought\nB<channel|>C", msg("C", "A\nB"), []),
    "two thoughts": ("<|channel>thought\nA\n<channel|>x <|channel>thought\nB<channel|> y", msg("x  y", "A\nB"), []),
    "closer without an opener": ("Hello<channel|> world", msg("Hello world"), []),
    "leaked end of turn": ("Hi.<turn|>\n<|turn>user\nmore", msg("Hi."), []),
    "leaked model turn": ("<|turn>model\nHi.", msg("Hi."), []),
    "leaked turn of another role": ("Answer<|turn>user\nNext question", msg("Answer"), []),
    "other special tokens": ("A<|think|>B<tool_response|>C<|image|>D<tool_call|>E<|tool><tool|>F", msg("ABCDEF"), []),
    "string delimiter in text": (f"Say {Q}hi{Q}.", msg('Say "hi".'), []),
    "text that only looks like markers": ("a < b, <b>bold</b>, <|x|>, <<|turn|>, <|chan",
                                          msg("a < b, <b>bold</b>, <|x|>, <<|turn|>, <|chan"), []),
    "marker right after a lone <": ("a<<|channel>thought\nx<channel|>y", msg("a<y", "x"), []),
    "header that is not one": ("<|tool_call>not a call<tool_call|> Done", msg("not a call Done"), []),
    "header cut off": ("Checking.<|tool_call>call:get_wea", msg("Checking.call:get_wea"), []),
    "call cut off in a string": (
        f"Checking.<|tool_call>call:get_weather{{city:{Q}Par", msg("Checking.", calls=(("get_weather", ""),)),
        ["tool call 0 (get_weather): the reply ended inside its arguments, at offset 14"]),
    "call cut off after a member": (
        f"<|tool_call>call:f{{a:1,b:{Q}x", msg(None, calls=(("f", '{"a":1'),)),
        ["tool call 0 (f): the reply ended inside its arguments, at offset 13"]),
    "call cut off at its brace": ("<|tool_call>call:f{", msg(None, calls=(("f", ""),)),
                                  ["tool call 0 (f): the reply ended inside its arguments, at offset 1"]),
    "malformed call": (
        "A<|tool_call>call:f{a:1,b:@@}<tool_call|>B", msg("AB", calls=(("f", '{"a":1'),)),
        ["tool call 0 (f): expected a value, found '@' at offset 7; dropped 3 characters '@@}' before <tool_call|>"]),
    "duplicate key": ("<|tool_call>call:f{a:1,a:2}<tool_call|>", msg(None, calls=(("f", '{"a":1'),)),
                      ["tool call 0 (f): duplicate key 'a' at offset 5; dropped 3 characters ':2}' before <tool_call|>"]),
    "broken call, then another": (
        "<|tool_call>call:f{a:}<|tool_call>call:g{b:2}<tool_call|>", msg(None, calls=(("f", ""), ("g", '{"b":2}'))),
        ["tool call 0 (f): expected a value, found '}' at offset 3; dropped 1 character '}' before <|tool_call>"]),
    "broken call at the end": (
        "<|tool_call>call:f{a:1 b}", msg(None, calls=(("f", '{"a":1'),)),
        ["tool call 0 (f): expected ',' or '}', found 'b' at offset 5; dropped 2 characters 'b}' before the end of the reply"]),
}


def stream(text: str, pieces: list[str], in_thought: bool = False) -> tuple[list[dict], ReplyStream]:
    s = ReplyStream(call_id=ids(), in_thought=in_thought)
    deltas = [delta for piece in pieces for delta in s.push(piece)]
    return deltas + s.finish(), s


def assemble(deltas: list[dict]) -> tuple[str, str, list[dict]]:
    """content, reasoning and tool calls put together from deltas, checking that each call's header comes first,
    with the next index, and its argument fragments after it."""
    content, reasoning, calls = [], [], []
    for delta in deltas:
        assert len(delta) == 1, delta
        if "content" in delta:
            content.append(delta["content"])
        elif "reasoning_content" in delta:
            reasoning.append(delta["reasoning_content"])
        else:
            (call,) = delta["tool_calls"]
            if "id" in call:
                assert call["index"] == len(calls)
                assert call["type"] == "function" and call["function"]["arguments"] == ""
                calls.append({"id": call["id"], "type": "function", "function": dict(call["function"])})
            else:
                assert set(call) == {"index", "function"} and set(call["function"]) == {"arguments"}
                assert call["index"] < len(calls), "argument fragment before its call's header"
                calls[call["index"]]["function"]["arguments"] += call["function"]["arguments"]
    for part in content + reasoning:
        assert part and not any(marker in part for marker in MARKERS), part
    return "".join(content), "".join(reasoning), calls


def check_stream(text: str, pieces: list[str], expected: dict, problems: list[str], in_thought: bool = False) -> None:
    """(a) the deltas add up to the whole reply's message, field by field: since that message has no marker in it,
    a marker's start released early and later completed would show here; (b) no delta holds a marker; (c) headers
    come before fragments (checked by assemble)."""
    deltas, s = stream(text, pieces, in_thought)
    content, reasoning, calls = assemble(deltas)
    assert content == (expected["content"] or "")
    assert reasoning == expected.get("reasoning_content", "")
    assert calls == expected.get("tool_calls", [])
    assert s.message == expected
    assert s.problems == problems
    assert s.has_tool_calls == ("tool_calls" in expected)


@pytest.mark.parametrize("name", CASES)
def test_whole_reply(name):
    text, expected, problems = CASES[name]
    assert parse_reply(text, call_id=ids()) == expected
    _, s = stream(text, [text])
    assert s.problems == problems


@pytest.mark.parametrize("name", CASES)
def test_streamed_in_two_pieces_at_every_boundary(name):
    text, expected, problems = CASES[name]
    for cut in range(len(text) + 1):
        check_stream(text, [text[:cut], text[cut:]], expected, problems)


@pytest.mark.parametrize("name", CASES)
def test_streamed_character_by_character(name):
    text, expected, problems = CASES[name]
    check_stream(text, list(text), expected, problems)


def test_a_long_dropped_tail_is_shown_shortened():
    text = "<|tool_call>call:f{a:@" + "x" * 100 + "}<tool_call|>ok"
    expected = msg("ok", calls=(("f", ""),))
    problem = f"tool call 0 (f): expected a value, found '@' at offset 3; dropped 102 characters '@{'x' * 59}...' before "
    check_stream(text, list(text), expected, [problem + "<tool_call|>"])


def test_prompt_that_opened_a_thought():
    """After tool responses with thinking on, the template's generation prompt opens the thought itself."""
    text = "Got 20C.\n<channel|>It is 20C in Paris."
    expected = msg("It is 20C in Paris.", "Got 20C.")
    assert parse_reply(text, call_id=ids(), in_thought=True) == expected
    check_stream(text, list(text), expected, [], in_thought=True)
    assert parse_reply("Still thinking", in_thought=True) == msg("", "Still thinking")
    assert parse_reply("Got 20C.\n<channel|>It is 20C in Paris.") == msg("Got 20C.\nIt is 20C in Paris.")


def test_deltas_of_a_call_as_it_streams():
    """The header as soon as `call:NAME{` is complete, then each top-level member once it is."""
    s = ReplyStream(call_id=ids())
    assert s.push("Sure.<|tool_") == [{"content": "Sure."}]
    assert s.push("call>call:get_weat") == []
    assert s.push("her{") == [{"tool_calls": [{"index": 0, "id": "call_0", "type": "function",
                                               "function": {"name": "get_weather", "arguments": ""}}]}]
    assert s.push(f"city:{Q}Pa") == []
    assert s.push(f"ris{Q},days:") == [{"tool_calls": [{"index": 0, "function": {"arguments": '{"city":"Paris"'}}]}]
    assert s.push("3") == []
    assert s.push("}") == [{"tool_calls": [{"index": 0, "function": {"arguments": ',"days":3}'}}]}]
    assert s.push("<tool_call|><|tool_response>ignored") == []
    assert s.finish() == []
    assert s.has_tool_calls and s.problems == []
    assert s.message == msg("Sure.", calls=(("get_weather", WEATHER_ARGS),))


def test_trailing_whitespace_is_held_until_text_follows_it():
    s = ReplyStream()
    assert s.push("  One \n") == [{"content": "One"}]
    assert s.push(" two  ") == [{"content": " \n two"}]
    assert s.push("\n") == []
    assert s.finish() == []
    assert s.message["content"] == "One \n two"


def test_a_partial_marker_is_released_once_it_cannot_be_one():
    s = ReplyStream()
    assert s.push("a <|tool") == [{"content": "a"}]
    assert s.push("box> b") == [{"content": " <|toolbox> b"}]
    assert s.push(" <|chan") == []
    assert s.finish() == [{"content": " <|chan"}]


def test_round_trip_through_the_template():
    """An assistant message rendered by the shipped template and read back as the model's reply is the same
    message: Gemma's own format in both directions."""
    template = ChatTemplate(TEMPLATE_PATH.read_text(encoding="utf-8"), origin=str(TEMPLATE_PATH))
    argument_sets = [{"city": "Paris", "days": 3}, {}, ALL_KINDS,
                     {"Query": "a:b, {c} [d] \"e\"\n<f>", "limit": 10 ** 12, "ratio": -1.5e-9}]
    for content in ("", "Checking both."):
        for reasoning in (None, "The user wants two things.\nFirst the weather."):
            message: dict[str, Any] = {"role": "assistant", "content": content, "tool_calls": [
                {"id": f"call_{i}", "type": "function", "function": {"name": f"tool_{i}", "arguments": arguments}}
                for i, arguments in enumerate(argument_sets)]}
            if reasoning:
                message["reasoning_content"] = reasoning
            rendered = template.render([{"role": "user", "content": "go"}, message], add_generation_prompt=False)
            reply = rendered.split("<|turn>model\n", 1)[1]
            parsed = parse_reply(reply, call_id=ids())
            assert parsed["content"] == (content or None)
            assert parsed.get("reasoning_content") == reasoning
            assert [call["function"]["name"] for call in parsed["tool_calls"]] == [f"tool_{i}" for i in range(4)]
            assert [json.loads(call["function"]["arguments"]) for call in parsed["tool_calls"]] == argument_sets
            check_stream(reply, list(reply), parsed, [])


def test_default_ids_are_openai_shaped_and_unique():
    call_ids = [new_call_id() for _ in range(100)]
    assert len(set(call_ids)) == 100
    assert all(len(i) == 29 and i.startswith("call_") and int(i[5:], 16) >= 0 for i in call_ids)
    first = parse_reply(WEATHER)["tool_calls"][0]["id"]
    assert first.startswith("call_") and first != parse_reply(WEATHER)["tool_calls"][0]["id"]


def test_push_after_finish_is_a_bug():
    s = ReplyStream()
    s.finish()
    assert s.finish() == []
    with pytest.raises(RuntimeError, match="ReplyStream.push after finish"):
        s.push("x")
