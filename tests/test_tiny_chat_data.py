"""The bundled model's chat training data (tools/tiny_chat_data.py) and the format check's reader of tool calls
(tools/chat_format_check.py): every call the data renders reads back as its arguments and fits its tool's schema,
and the conversations are the same for the same seed."""

from __future__ import annotations

import random

import pytest

import chat_format_check
import tiny_chat_data
from edge_runtime.bundled import BUNDLED_CHECKPOINT
from tiny_chat_data import TOOLS


@pytest.fixture(scope="module")
def render():
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(BUNDLED_CHECKPOINT))
    return lambda messages, **options: hf.apply_chat_template(messages, tokenize=False, **options)


@pytest.mark.parametrize("name", sorted(TOOLS))
def test_rendered_calls_read_back_as_their_arguments(name, render):
    rng = random.Random(name)
    for _ in range(20):
        call = tiny_chat_data.CALLS[name](rng)
        text = render([{"role": "user", "content": call.question},
                       {"role": "assistant", "tool_calls": [{"id": "a", "type": "function", "function": {
                           "name": call.name, "arguments": call.arguments}}]}], tools=[TOOLS[name]])
        (match,) = chat_format_check.CALL.finditer(text)
        assert match.group(1) == name
        arguments = chat_format_check.parse_arguments(match.group(2))
        assert arguments == call.arguments
        assert chat_format_check.fits(arguments, TOOLS[name]["function"]["parameters"])


@pytest.mark.parametrize("text", ['{city:<|"|>Oslo}', "{city:Oslo}", '{"city":1}', "{a:1,}", "{a:01}", "{a:[1,]}",
                                  "{a:1}}", "[1]", "{a:tru}"])
def test_malformed_arguments_are_refused(text):
    with pytest.raises(chat_format_check.Unparsable):
        chat_format_check.parse_arguments(text)


def test_schema_fit():
    weather = TOOLS["get_weather"]["function"]["parameters"]
    reminder = TOOLS["set_reminder"]["function"]["parameters"]
    tickets = TOOLS["get_ticket_prices"]["function"]["parameters"]
    assert chat_format_check.fits({"city": "Oslo", "unit": "celsius"}, weather)
    for bad in ({}, {"city": "Oslo", "unit": "kelvin"}, {"city": "Oslo", "country": "NO"}, {"city": 3},
                {"city": None}):
        assert not chat_format_check.fits(bad, weather), bad
    assert chat_format_check.fits({"text": "x", "minutes": 1.5, "repeat": False, "sound": None}, reminder)
    assert not chat_format_check.fits({"text": "x", "minutes": True, "repeat": False, "sound": None}, reminder)
    assert chat_format_check.fits({"visitors": [{"category": "adult", "count": 2}]}, tickets)
    assert not chat_format_check.fits({"visitors": [{"category": "adult", "count": 2.5}]}, tickets)
    assert not chat_format_check.fits({"visitors": [{"category": "adult"}]}, tickets)


def test_conversations_depend_only_on_the_seed(render):
    topics = {"assert": "The assert statement is a convenient way to insert debugging assertions into a program."}

    def count(text: str) -> int:
        return len(text) // 4

    first = tiny_chat_data.render_conversations(0, topics, render, count, 20_000, 400)
    assert first == tiny_chat_data.render_conversations(0, topics, render, count, 20_000, 400)
    assert first != tiny_chat_data.render_conversations(1, topics, render, count, 20_000, 400)
    assert all(text.startswith("<bos>") and count(text) <= 400 for text in first)
    assert 20_000 <= sum(map(count, first)) < 20_400
    for marker in ("<|tool_call>", "<|channel>thought", "<|tool_response>response:", "<|think|>", "<|tool>", "{\""):
        assert any(marker in text for text in first), marker
    assert any(text.count("<|turn>user") > 1 for text in first)
    for text in first:  # thoughts only under thinking, and only in conversations of one exchange
        assert "<|channel>" not in text or ("<|think|>" in text and text.count("<|turn>user") == 1), text
