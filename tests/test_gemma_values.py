"""Gemma 4's value syntax: every kind of value read, the exact error for each way text can fail to be one, and
format_value equal to the chat template's own format_argument, rendered by jinja2 from the shipped template."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import jinja2
import pytest

import edge_runtime
from edge_runtime.chat_template import ChatTemplate
from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.gemma_values import MAX_DEPTH, GemmaValueError, ValueReader, format_value, parse_value

TEMPLATE_PATH = Path(edge_runtime.__file__).parent / "chat_templates" / "gemma4.jinja"
Q = '<|"|>'


def same(a: Any, b: Any) -> bool:
    """Equal including int/float and list/tuple distinctions that == glosses over."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True) and a == b


@pytest.mark.parametrize(("text", "value"), [
    ("null", None), ("true", True), ("false", False),
    ("0", 0), ("-3", -3), ("42", 42), ("12345678901234567890123", 12345678901234567890123),
    ("2.5", 2.5), ("-0.5", -0.5), ("1e-3", 0.001), ("6.02E23", 6.02e23), ("1e+16", 1e16), ("-2.5e-7", -2.5e-7),
    ("-0.0", -0.0), ("1.0", 1.0),
    (f"{Q}{Q}", ""), (f"{Q}plain{Q}", "plain"),
    (f'{Q}He said "hi", {{ok}}: [yes]\nnext line{Q}', 'He said "hi", {ok}: [yes]\nnext line'),
    (f"{Q}ünïcode ✓ 日本語 🙂{Q}", "ünïcode ✓ 日本語 🙂"),
    (f"{Q}a<b> <|channel> <tool_call|> <|\"| {Q}", 'a<b> <|channel> <tool_call|> <|"| '),
    ("[]", []), ("{}", {}), ("[[]]", [[]]), ("{a:{}}", {"a": {}}),
    (f"[1,{Q}two{Q},[3,[4]],{{x:null}},true]", [1, "two", [3, [4]], {"x": None}, True]),
    (f"{{city:{Q}Paris{Q},days:3,units:{{temp:{Q}C{Q}}}}}", {"city": "Paris", "days": 3, "units": {"temp": "C"}}),
    (f"{{{Q}city{Q}:{Q}Paris{Q},{Q}odd key: {{x}}{Q}:1}}", {"city": "Paris", "odd key: {x}": 1}),
    (f"{{Zeta:1,alpha:2,Beta:{Q}b{Q}}}", {"Zeta": 1, "alpha": 2, "Beta": "b"}),
    (" \n{ a : 1 ,\n b : [ 1 , 2 ] , c: { } }\t", {"a": 1, "b": [1, 2], "c": {}}),
    ("{first name:1,$ref:2,a.b-c_d:3,ключ:4}", {"first name": 1, "$ref": 2, "a.b-c_d": 3, "ключ": 4}),
])
def test_every_kind_of_value_is_read(text, value):
    assert same(parse_value(text), value)


@pytest.mark.parametrize(("text", "message"), [
    ("", "expected a value, found the end of the text at offset 0"),
    ("   ", "expected a value, found the end of the text at offset 3"),
    ("{a:1", "expected ',' or '}', found the end of the text at offset 4"),
    ("[1,2", "expected ',' or ']', found the end of the text at offset 4"),
    ("{a:1]", "expected ',' or '}', found ']' at offset 4"),
    ("{a 1}", "expected ':' after the key 'a 1', found '}' at offset 4"),
    ("{a", "expected ':' after the key 'a', found the end of the text at offset 2"),
    (f"{{{Q}a{Q} 1}}", "expected ':' after the key 'a', found '1' at offset 13"),
    ("{a:}", "expected a value, found '}' at offset 3"),
    ("{:1}", "expected a key or '}', found ':' at offset 1"),
    ("{a:1,}", "expected a key, found '}' at offset 5"),
    ("[1,]", "expected a value, found ']' at offset 3"),
    ("[,]", "expected a value or ']', found ',' at offset 1"),
    ("{a:1,a:2}", "duplicate key 'a' at offset 5"),
    (f"{{a:1,{Q}a{Q}:2}}", "duplicate key 'a' at offset 5"),
    ("{a:tru}", "'tru' is not a value (true, false and null are the only words) at offset 3"),
    ("{a:True}", "'True' is not a value (true, false and null are the only words) at offset 3"),
    ("{a:1.}", "'1.' is not a number at offset 3"),
    ("[1.2.3]", "'1.2.3' is not a number at offset 1"),
    ("[-]", "'-' is not a number at offset 1"),
    ("[+1]", "expected a value or ']', found '+' at offset 1"),
    ("[.5]", "expected a value or ']', found '.' at offset 1"),
    ("{a:1e999}", "the number '1e999' is out of range at offset 3"),
    (f"{Q}abc", "the string starting at offset 0 has no closing <|\"|> at offset 8"),
    (f"{{a:{Q}abc<|\"|}}", "the string starting at offset 3 has no closing <|\"|> at offset 16"),
    ('{a:"x"}', "expected a value, found '\"' at offset 3"),
    ("{a:<x}", "expected a value, found '<' at offset 3"),
    ("{a:<|\"|", "expected a value, found '<' at offset 3"),
    ("1 2", "unexpected text after the value, found '2' at offset 2"),
    ("{}}", "unexpected text after the value, found '}' at offset 2"),
    ("[" * (MAX_DEPTH + 1), f"values nested deeper than {MAX_DEPTH} levels at offset {MAX_DEPTH}"),
])
def test_text_that_is_not_a_value_says_what_and_where(text, message):
    with pytest.raises(GemmaValueError) as info:
        parse_value(text)
    assert str(info.value) == message
    assert isinstance(info.value, EdgeRuntimeError)


def test_reader_waits_on_a_partial_delimiter_and_reports_members_as_they_complete():
    members = []
    reader = ValueReader(on_member=lambda key, value: members.append((key, value)))
    assert reader.feed("{a:[1,") == 6
    assert reader.feed("2],b:<|") == 5  # "<|" may start a string: left for the caller to present again
    assert members == [("a", [1, 2])]
    assert reader.feed('<|"|>x<|"') == 6
    assert reader.feed('<|"|>}rest') == 6  # the value ends at "}"; "rest" is not part of it
    assert reader.done and reader.value == {"a": [1, 2], "b": "x"}
    assert members == [("a", [1, 2]), ("b", "x")]
    assert reader.offset == 23


def test_reader_takes_the_text_in_any_pieces():
    text = f"{{s:{Q}He said \"hi\" {{ok}}{Q},n:[-1.5e-3,{{k:null}}],<|\"|>q k<|\"|>:true}}"
    for size in range(1, len(text) + 1):
        reader, pending = ValueReader(), ""
        for start in range(0, len(text), size):
            pending += text[start:start + size]
            pending = pending[reader.feed(pending):]
        assert reader.done and not pending
        assert reader.value == parse_value(text)


@pytest.fixture(scope="module")
def template_macros() -> Any:
    """The shipped template's macros, called directly (format_argument for values at any level and both key forms)."""
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    return env.from_string(TEMPLATE_PATH.read_text(encoding="utf-8")).make_module({"bos_token": ""})


def random_value(rng: random.Random, depth: int = 0) -> Any:
    """Values of every kind, strings holding the characters Gemma's syntax gives meaning to."""
    kind = rng.randrange(8 if depth < 3 else 5)
    if kind == 0:
        return rng.choice([None, True, False])
    if kind == 1:
        return rng.choice([0, -1, 7, -123456, 10 ** 20, rng.randrange(-10 ** 6, 10 ** 6)])
    if kind == 2:
        return rng.choice([0.5, -2.25, 1e-7, 6.02e23, 1e16, -0.0, 3.0, rng.uniform(-1e6, 1e6)])
    if kind in (3, 4):
        alphabet = 'ab Z:,{}[]"\'\n\t<|>\\é日🙂'
        return "".join(rng.choice(alphabet) for _ in range(rng.randrange(12)))
    if kind == 5:
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    keys = ["a", "B", "b", "city", "Zeta", "first name", "ключ", "x_1", "$ref", "a.b"]
    return {rng.choice(keys): random_value(rng, depth + 1) for _ in range(rng.randrange(5))}


VALUES = [
    {"city": "Paris", "days": 3},
    {"B": 1, "a": 2, "b": 3, "A": 4, "Zeta": [], "alpha": {}},  # dictsort: case-insensitive, ties in dict order
    {"s": 'He said "hi", {ok}: [yes],\nnext', "u": "ünïcode ✓ 日本語", "e": "", "n": None, "t": True, "f": False},
    {"ints": [0, -3, 10 ** 20], "floats": [2.5, -0.5, 1e-3, 6.02e23, 1e16, 1.0, -0.0]},
    {"nested": {"deeper": {"list": [[], {}, [1, [2, {"k": "v"}]]]}}},
    ["a", 1, None, {"x": (1, 2)}],
    "just a string", 12, -4.5, True, None, [], {},
]


def test_format_value_is_the_templates_format_argument(template_macros):
    rng = random.Random(17)
    values = VALUES + [random_value(rng) for _ in range(300)]
    for value in values:
        written = format_value(value)
        assert written == str(template_macros.format_argument(value, escape_keys=False))
        assert same(parse_value(written), json.loads(json.dumps(value)))
        # The template's other form, keys delimited like strings, reads back the same.
        escaped = str(template_macros.format_argument(value))
        assert same(parse_value(escaped), json.loads(json.dumps(value)))


def test_format_value_is_what_the_template_writes_in_a_tool_call():
    """Through the whole template, as the runtime renders a conversation: an assistant message's tool calls."""
    template = ChatTemplate(TEMPLATE_PATH.read_text(encoding="utf-8"), origin=str(TEMPLATE_PATH))
    rng = random.Random(4)
    for arguments in [v for v in VALUES if isinstance(v, dict)] + [
            {"k": random_value(rng), "other": random_value(rng)} for _ in range(100)]:
        call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": arguments}}
        rendered = template.render([{"role": "user", "content": "go"},
                                    {"role": "assistant", "content": "", "tool_calls": [call]}],
                                   add_generation_prompt=False)
        written = rendered.split("<|tool_call>call:f", 1)[1].rsplit("<tool_call|>", 1)[0]
        assert written == format_value(arguments)


BARE = ("cannot be written bare in Gemma's format (it is empty, has whitespace at an end, or holds one of "
        ": , { } [ ] <)")


@pytest.mark.parametrize(("value", "message"), [
    ({"a": f"x{Q}y"}, "value['a']: the string holds <|\"|>, which Gemma's format cannot escape"),
    ({1: "x"}, "value: key 1 is a int; Gemma's keys are strings"),
    ({"a:b": 1}, f"value: key 'a:b' {BARE}"),
    ({"x": [{" a": 1}]}, f"value['x'][0]: key ' a' {BARE}"),
    ({"": 1}, f"value: key '' {BARE}"),
    ([float("nan")], "value[0]: nan is not a finite number"),
    ({"a": float("inf")}, "value['a']: inf is not a finite number"),
    ({"a": {1, 2}}, "value['a']: a set is not a JSON value"),
])
def test_values_the_format_cannot_carry_are_refused(value, message):
    with pytest.raises(GemmaValueError) as info:
        format_value(value)
    assert str(info.value) == message
    assert info.value.offset is None
