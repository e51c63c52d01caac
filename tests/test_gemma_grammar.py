"""Reply grammars in Gemma 4's format, walked token by token through the constraint's own mask: what a schema allows
is accepted, everything else refused at the token where it goes wrong, and every unsupported feature refused with
its field and keyword."""

from __future__ import annotations

import numpy as np
import pytest

import edge_runtime
from edge_runtime.constrained_decoding import BannedTokens
from edge_runtime.errors import RequestError
from edge_runtime.gemma_grammar import Markers, reply_grammar
from edge_runtime.tool_declarations import ToolChoice, check_tools

Q = '<|"|>'


@pytest.fixture(scope="module")
def model(gemma4_artifact):
    return edge_runtime.load(gemma4_artifact)


def ids(model, *pieces: str) -> list[int]:
    """Token ids of the pieces, each tokenized alone: a marker written as a piece of its own is its special token,
    one split over pieces ("<|tool", "_call>") is spelled out of ordinary tokens."""
    return [token for piece in pieces for token in model.tokenizer.encode(piece, add_bos=False)]


def text(model, tokens: list[int]) -> str:
    return model.tokenizer._tok.decode(tokens, skip_special_tokens=False)


def walk(model, constraint, tokens: list[int]) -> str:
    """"accepted" when every token is allowed in turn and a stop may follow, "incomplete" when the tokens are allowed
    but the reply cannot end there, else the first token the mask disallows and the text before it, or where the
    constraint said that only a stop may follow."""
    constraint.sampling(lambda logits, history: 0, constraint.stats)
    eos = min(model.eos_token_ids)
    for i, token in enumerate(tokens):
        logits = np.zeros(model.spec.input_vocab_size, dtype=np.float32)
        constraint.mask(logits)
        if logits[token] == -np.inf:
            return f"refused {text(model, [token])!r} after {text(model, tokens[:i])!r}"
        if constraint.advance(token) and i < len(tokens) - 1:
            return f"ended after {text(model, tokens[:i + 1])!r}"
    logits = np.zeros(model.spec.input_vocab_size, dtype=np.float32)
    constraint.mask(logits)
    return "accepted" if logits[eos] == 0 else "incomplete"


def pieces(*parts: str) -> list[str]:
    """Text pieces with each marker a piece of its own (tokenized as its special token)."""
    out: list[str] = []
    for part in parts:
        for i, chunk in enumerate(part.split(Q)):
            if i:
                out.append(Q)
            if chunk:
                out.append(chunk)
    return out


def tool(parameters=None, name="f") -> dict:
    function = {"name": name} if parameters is None else {"name": name, "parameters": parameters}
    return {"type": "function", "function": function}


def call_walk(model, parameters, arguments: str, **fields) -> str:
    fields = {"tool_choice": "required", "parallel_tool_calls": False, **fields}
    constraint = model.constraint_for(tools=[tool(parameters)], **fields)
    return walk(model, constraint, ids(model, "<|tool_call>", *pieces(f"call:f{arguments}"), "<tool_call|>"))


OBJECT = {"type": "object"}
# (schema of an argument "v", values accepted, values refused), each value as Gemma writes it.
FEATURES = [
    ({"type": "string"}, [f"{Q}hi there{Q}", f"{Q}{Q}", f"{Q}line\nbreak, {{and}} [brackets]: ok{Q}"],
     ["hi", '"hi"', f"{Q}a{Q}b", "1", "null"]),
    ({"type": "string", "minLength": 2, "maxLength": 3}, [f"{Q}ab{Q}", f"{Q}abc{Q}", f"{Q}äöü{Q}"],
     [f"{Q}a{Q}", f"{Q}abcd{Q}"]),
    ({"type": "integer"}, ["0", "7", "-12", "123456789"], ["07", "1.5", "-", "1e3", "+1", f"{Q}1{Q}"]),
    ({"type": "integer", "minimum": 1, "maximum": 14}, ["1", "9", "14"], ["0", "15", "-1", "140"]),
    ({"type": "integer", "exclusiveMinimum": -3, "exclusiveMaximum": 100}, ["-2", "0", "99"], ["-3", "100"]),
    ({"type": "number"}, ["0", "-1.5e3", "2.25", "1E-05"], ["1.", ".5", "NaN", "inf", "--1"]),
    ({"type": "boolean"}, ["true", "false"], ["True", "1", "null"]),
    ({"type": "null"}, ["null"], ["None", f"{Q}{Q}"]),
    ({"type": "string", "enum": ["celsius", "fahrenheit"]}, [f"{Q}celsius{Q}", f"{Q}fahrenheit{Q}"],
     [f"{Q}kelvin{Q}", f"{Q}cels{Q}", "celsius"]),
    ({"enum": [1, "a", None, True, [1, {"b": 2}]]}, ["1", f"{Q}a{Q}", "null", "true", "[1,{b:2}]"],
     ["2", "false", "[1]", "1.0"]),
    ({"type": ["integer", "boolean"], "enum": [1, "a", True]}, ["1", "true"], [f"{Q}a{Q}"]),
    ({"const": "fixed"}, [f"{Q}fixed{Q}"], [f"{Q}other{Q}"]),
    ({"enum": ["😀 ok", 'a"b\\c', "tab\there", ""]},
     [f"{Q}😀 ok{Q}", f'{Q}a"b\\c{Q}', f"{Q}tab\there{Q}", f"{Q}{Q}"],
     [f"{Q}😀{Q}", f"{Q}a{Q}"]),
    ({"type": ["integer", "number"]}, ["1", "-3e2", "1.5"], ["1.", "true"]),
    ({"type": ["string", "null"]}, [f"{Q}x{Q}", "null"], ["1", "true"]),
    ({"type": "integer", "nullable": True}, ["3", "null"], ["true"]),
    ({"anyOf": [{"type": "integer"}, {"type": "array", "items": {"type": "string"}}]},
     ["5", "[]", f"[{Q}a{Q},{Q}b{Q}]"], ["[1]", "true"]),
    ({"allOf": [{"type": "boolean"}]}, ["true"], ["1"]),
    ({"type": "array", "items": {"type": "integer"}}, ["[]", "[1]", "[1,-2,3]"], ["[1,]", "[,1]", "[1 2]", "1"]),
    ({"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 3}, ["[1,2]", "[1,2,3]"],
     ["[]", "[1]", "[1,2,3,4]"]),
    ({"type": "array", "minItems": 1}, ["[1]", f"[{Q}x{Q},null,{{k:[]}}]"], ["[]"]),
    ({"type": "array", "maxItems": 0}, ["[]"], ["[1]"]),
    ({"type": "object", "properties": {"q": {"type": "array", "items": {"type": "object", "properties": {
        "r": {"type": "boolean"}}, "required": ["r"]}}}, "required": ["q"]},
     ["{q:[]}", "{q:[{r:true},{r:false}]}"], ["{}", "{q:[{}]}", "{q:[{r:1}]}"]),
    (OBJECT, ["{}", f"{{a:1,b_c:{Q}x{Q},d.e:[true,{{f:null}}]}}", "{Straße:1}"],
     ["{a}", "{a:}", "{:1}", "{a b:1}", f"{{{Q}a{Q}:1}}"]),
    ({"type": "object", "additionalProperties": {"type": "integer"}}, ["{}", "{a:1,b:2}"], [f"{{a:{Q}x{Q}}}"]),
    ({"type": "object", "additionalProperties": False}, ["{}"], ["{a:1}"]),
    ({}, ["1", f"{Q}x{Q}", "[{a:null}]"], ["x"]),
]


@pytest.mark.parametrize("schema, good, bad", FEATURES, ids=[str(f[0])[:60] for f in FEATURES])
def test_each_schema_feature_accepts_its_values_and_refuses_others(model, schema, good, bad):
    parameters = {"type": "object", "properties": {"v": schema}, "required": ["v"]}
    for value in good:
        assert call_walk(model, parameters, f"{{v:{value}}}") == "accepted", value
    for value in bad:
        assert call_walk(model, parameters, f"{{v:{value}}}") != "accepted", value


def test_property_order_and_presence(model):
    """Jinja's dictsort, the order the template writes arguments in, ignores case: a, b, C, d."""
    parameters = {"type": "object", "properties": {"d": {"type": "integer"}, "b": {"type": "integer"},
                                                   "C": {"type": "integer"}, "a": {"type": "integer"}},
                  "required": ["b", "d"]}
    for arguments in ["{b:1,d:1}", "{a:1,b:1,d:1}", "{a:1,b:1,C:1,d:1}", "{b:1,C:1,d:1}"]:
        assert call_walk(model, parameters, arguments) == "accepted", arguments
    for arguments in ["{}", "{b:1}", "{d:1,b:1}", "{a:1,d:1}", "{b:1,d:1,a:1}", "{b:1,,d:1}", "{b:1,d:1,}",
                      "{a:1,a:1,b:1,d:1}", "{C:1,b:1,d:1}", "{b:1,c:1,d:1}", "{b:1,d:1,e:1}"]:
        assert call_walk(model, parameters, arguments) != "accepted", arguments
    optional = {"type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}}}
    for arguments in ["{}", "{x:1}", "{y:1}", "{x:1,y:1}"]:
        assert call_walk(model, optional, arguments) == "accepted", arguments
    for arguments in ["{y:1,x:1}", "{,y:1}"]:
        assert call_walk(model, optional, arguments) != "accepted", arguments


def test_refs_and_recursion(model):
    parameters = {"type": "object", "properties": {"tree": {"$ref": "#/$defs/node"}}, "required": ["tree"],
                  "$defs": {"node": {"type": "object", "properties": {
                      "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}},
                      "name": {"type": "string", "description": "a label"}}, "required": ["name"]}}}
    good = f"{{tree:{{kids:[{{name:{Q}b{Q}}},{{kids:[],name:{Q}c{Q}}}],name:{Q}a{Q}}}}}"
    assert call_walk(model, parameters, good) == "accepted"
    assert call_walk(model, parameters, f"{{tree:{{kids:[{{}}],name:{Q}a{Q}}}}}") != "accepted"
    legacy = {"type": "object", "properties": {"p": {"$ref": "#/definitions/P"}},
              "definitions": {"P": {"type": "integer", "minimum": 0}}}
    assert call_walk(model, legacy, "{p:3}") == "accepted"
    assert call_walk(model, legacy, "{p:-3}") != "accepted"


def test_a_function_without_parameters_takes_none(model):
    assert call_walk(model, None, "{}") == "accepted"
    assert call_walk(model, None, "{a:1}") != "accepted"


def test_markers_inside_strings_are_refused_whether_token_or_spelled(model):
    parameters = {"type": "object", "properties": {"s": {"type": "string"}}, "required": ["s"]}
    constraint = model.constraint_for(tools=[tool(parameters)], tool_choice="required", parallel_tool_calls=False)
    head = ["<|tool_call>", "call:f{s:", Q, "a "]
    assert walk(model, constraint, ids(model, *head, "<|tool_call>")) == \
        "refused '<|tool_call>' after '<|tool_call>call:f{s:<|\"|>a '"
    for marker in ['<|tool_call>', '<|"|>', "<channel|>", "<|turn>", "<tool_call|>"]:
        spelled = ids(model, marker[:2], marker[2:])
        assert text(model, spelled) == marker and model.tokenizer.token_id(marker) not in spelled
        constraint = model.constraint_for(tools=[tool(parameters)], tool_choice="required", parallel_tool_calls=False)
        assert walk(model, constraint, ids(model, *head) + spelled) == \
            f"refused '>' after '<|tool_call>call:f{{s:<|\"|>a {marker[:-1]}'", marker
    constraint = model.constraint_for(tools=[tool(parameters)], tool_choice="required", parallel_tool_calls=False)
    assert walk(model, constraint, ids(model, *head, "<b>|x<|y", Q, "}", "<tool_call|>")) == "accepted"


WEATHER = tool({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}, "get_weather")
NOW = tool(None, "now")
WEATHER_CALL = ["<|tool_call>", "call:get_weather{city:", Q, "Paris", Q, "}", "<tool_call|>"]
NOW_CALL = ["<|tool_call>", "call:now{}", "<tool_call|>"]
ENDED_AFTER_NOW = "ended after '<|tool_call>call:now{}<tool_call|>'"
THOUGHT = ["<|channel>", "thought\nthe user wants weather\n", "<channel|>"]


@pytest.mark.parametrize("fields, reply, expected", [
    (dict(tool_choice="required"), WEATHER_CALL, "accepted"),
    (dict(tool_choice="required"), NOW_CALL + WEATHER_CALL, "accepted"),
    (dict(tool_choice="required", parallel_tool_calls=False), NOW_CALL + WEATHER_CALL, ENDED_AFTER_NOW),
    (dict(tool_choice="required"), ["<|tool_call>", "call:nope{}", "<tool_call|>"],
     "refused 'pe' after '<|tool_call>call:no'"),
    (dict(tool_choice="required"), ["Sure"], "refused 'S' after ''"),
    (dict(tool_choice="required"), [], "incomplete"),
    (dict(tool_choice="required"), THOUGHT + NOW_CALL, "refused '<|channel>' after ''"),
    (dict(tool_choice="required", thinking=True), THOUGHT + NOW_CALL, "accepted"),
    (dict(tool_choice="required", thinking=True), NOW_CALL, "accepted"),
    (dict(tool_choice="required", thought_open=True), THOUGHT[1:] + NOW_CALL, "accepted"),
    (dict(tool_choice="required", thought_open=True), NOW_CALL, "refused '<|tool_call>' after ''"),
    (dict(tool_choice={"type": "function", "function": {"name": "now"}}), NOW_CALL, "accepted"),
    (dict(tool_choice={"type": "function", "function": {"name": "now"}}), WEATHER_CALL,
     "refused 'ge' after '<|tool_call>call:'"),
    (dict(tool_choice={"type": "function", "function": {"name": "now"}}), NOW_CALL + NOW_CALL,
     ENDED_AFTER_NOW),
    # auto: text is free (no mask) until <|tool_call>, then the call grammar holds
    (dict(tool_choice="auto"), ["Let me look <b>that</b> up."], "accepted"),
    (dict(tool_choice="auto"), ["I will call", *WEATHER_CALL], "accepted"),
    (dict(tool_choice="auto"), ["I will call", "<|tool_call>", "call:nope{}"],
     "refused 'pe' after 'I will call<|tool_call>call:no'"),
    (dict(tool_choice="auto"), [*NOW_CALL, "and more text"],
     "refused 'and' after '<|tool_call>call:now{}<tool_call|>'"),
    (dict(tool_choice="auto", parallel_tool_calls=False), [*NOW_CALL, *NOW_CALL], ENDED_AFTER_NOW),
])
def test_tool_choice_shapes(model, fields, reply, expected):
    constraint = model.constraint_for(tools=[WEATHER, NOW], **fields)
    assert walk(model, constraint, ids(model, *reply)) == expected


def test_tool_choice_none_bans_only_the_call_marker(model):
    constraint = model.constraint_for(tools=[WEATHER], tool_choice="none")
    assert walk(model, constraint, ids(model, "Free text <tool_call|> even this")) == "accepted"
    constraint = model.constraint_for(tools=[WEATHER], tool_choice="none")
    assert walk(model, constraint, ids(model, "Sure", *WEATHER_CALL)) == "refused '<|tool_call>' after 'Sure'"


def test_no_tools_bans_the_call_token_and_nothing_else(model, bundled):
    """A reply may not call what the request did not declare; a tokenizer without the marker gets no constraint."""
    tool_call = model.tokenizer.token_id("<|tool_call>")
    for constraint in (model.constraint_for(), model.constraint_for(tools=[], tool_choice="auto",
                                                                    response_format={"type": "text"})):
        assert isinstance(constraint, BannedTokens) and constraint.banned.tolist() == [tool_call]
    older = edge_runtime.load(bundled[0])
    older.tokenizer.token_id = lambda text: None
    assert older.constraint_for() is None


SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
          "additionalProperties": False}


@pytest.mark.parametrize("fields, reply, expected", [
    (dict(response_format={"type": "json_object"}), ['{"a": [1, {"b": null}], "c": "x"}'], "accepted"),
    (dict(response_format={"type": "json_object"}), ["{}"], "accepted"),
    (dict(response_format={"type": "json_object"}), ['{"a": 1'], "incomplete"),
    (dict(response_format={"type": "json_object"}), ["[1]"], "refused '[' after ''"),
    (dict(response_format={"type": "json_object"}), [" {}"], "refused ' ' after ''"),
    (dict(response_format={"type": "json_object"}), ["{" + " " * 25 + "}"], "refused ' ' after '{" + " " * 24 + "'"),
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "r", "schema": SCHEMA}}),
     ['{"ok": true}'], "accepted"),
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "r", "schema": SCHEMA}}),
     ['{"ok": 1}'], "refused '1' after '{\"ok\": '"),
    (dict(response_format={"type": "json_schema", "json_schema": {"schema": SCHEMA}}, thinking=True),
     [*THOUGHT, '{"ok":false}'], "accepted"),
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "any", "schema": {}}}), ['[1, "x"]'],
     "accepted"),
    (dict(response_format={"type": "json_object"}, tools=[NOW]), ['{"a": 1}'], "accepted"),
    (dict(response_format={"type": "json_object"}, tools=[NOW]), NOW_CALL, "accepted"),
    (dict(response_format={"type": "json_object"}, tools=[NOW]), ["Sure"], "refused 'S' after ''"),
    (dict(response_format={"type": "json_object"}, tools=[NOW], tool_choice="none"), NOW_CALL,
     "refused '<|tool_call>' after ''"),
    (dict(response_format={"type": "json_object"}, tools=[NOW], tool_choice="required"), ["{}"],
     "refused '{' after ''"),
])
def test_json_replies(model, fields, reply, expected):
    assert walk(model, model.constraint_for(**fields), ids(model, *reply)) == expected


ARGS = "tools[0].function.parameters"
SUPPORTED = ("supported: type (string, integer, number, boolean, null, array, object, or a list of them), enum, "
             "const, properties, required, additionalProperties, items, minItems, maxItems, minLength, maxLength, "
             "minimum/maximum/exclusiveMinimum/exclusiveMaximum on integers, nullable, anyOf, allOf of one schema, "
             "and $ref to #/$defs or #/definitions")


def arg(schema):
    return {"type": "object", "properties": {"v": schema}}


@pytest.mark.parametrize("parameters, message", [
    (arg({"type": "string", "pattern": "^a"}),
     f"{ARGS} at properties.v: 'pattern' is not supported in tool parameters; {SUPPORTED}"),
    (arg({"type": "string", "format": "date"}),
     f"{ARGS} at properties.v: 'format' is not supported in tool parameters; {SUPPORTED}"),
    (arg({"oneOf": [{"type": "string"}, {"type": "integer"}]}),
     f"{ARGS} at properties.v: 'oneOf' is not supported in tool parameters; {SUPPORTED}"),
    (arg({"type": "array", "uniqueItems": True}),
     f"{ARGS} at properties.v: 'uniqueItems' is not supported in tool parameters; {SUPPORTED}"),
    (arg({"type": "object", "properties": {"w": {"not": {"type": "null"}}}}),
     f"{ARGS} at properties.v.properties.w: 'not' is not supported in tool parameters; {SUPPORTED}"),
    (arg({"type": "array", "items": {"type": "number", "multipleOf": 2}}),
     f"{ARGS} at properties.v.items: 'multipleOf' is not supported in tool parameters; {SUPPORTED}"),
    (arg({"type": "number", "minimum": 0}),
     f"{ARGS} at properties.v: 'minimum' is supported on integers only; use \"type\": \"integer\" or drop the bound"),
    (arg({"type": "integer", "minimum": 5, "maximum": 4}),
     f"{ARGS} at properties.v: no integer lies within its minimum and maximum"),
    (arg({"type": "integer", "minimum": "1"}), f"{ARGS} at properties.v: minimum must be a number"),
    (arg({"type": "string", "maxLength": 2, "minLength": 3}),
     f"{ARGS} at properties.v: maxLength 2 is below minLength 3"),
    (arg({"type": "string", "maxLength": -1}),
     f"{ARGS} at properties.v: maxLength must be a whole number of at least 0"),
    (arg({"type": "array", "maxItems": 1, "minItems": 2}), f"{ARGS} at properties.v: maxItems 1 is below minItems 2"),
    (arg({"type": "array", "items": [{"type": "string"}]}),
     f"{ARGS} at properties.v: items as a list (tuple validation) is not supported; give one schema"),
    (arg({"type": "str"}),
     (f"{ARGS} at properties.v: type 'str' is not a JSON schema type (use string, integer, number, boolean, null, "
     "array, object)")),
    (arg("string"), f"{ARGS} at properties.v: a schema must be an object (or true)"),
    (arg({"anyOf": [{"type": "string"}], "type": "string"}),
     f"{ARGS} at properties.v: 'type' beside 'anyOf' is not supported; move it into the anyOf schema"),
    (arg({"anyOf": []}), f"{ARGS} at properties.v: anyOf must be a non-empty list of schemas"),
    (arg({"allOf": [{"type": "string"}, {"maxLength": 3}]}),
     f"{ARGS} at properties.v: allOf is supported with exactly one schema; merge the schemas into one"),
    (arg({"$ref": "https://example.com/s.json"}),
     (f"{ARGS} at properties.v: $ref 'https://example.com/s.json' is not supported; refer to #/$defs/NAME or "
     "#/definitions/NAME of the same parameters")),
    (arg({"$ref": "#/$defs/missing"}), (f"{ARGS} at properties.v: $ref '#/$defs/missing' names no schema in the "
                                       "parameters' $defs")),
    (arg({"enum": ["a", "b"], "maxLength": 1}),
     f"{ARGS} at properties.v: 'maxLength' beside enum/const is not supported; list only the allowed values"),
    (arg({"enum": []}), f"{ARGS} at properties.v: enum must be a non-empty list of values"),
    (arg({"type": "integer", "enum": ["a"]}), (f"{ARGS} at properties.v: no value of enum/const has the declared type "
                                              "'integer'")),
    (arg({"const": 'say <|"|> this'}),
     f"{ARGS} at properties.v: the value 'say <|\"|> this' contains a Gemma marker such as <|\"|>"),
    (arg({"const": float("nan")}), f"{ARGS} at properties.v: nan is not a JSON number"),
    ({"type": "object", "properties": {"first name": {"type": "string"}}},
     (f"{ARGS}: the key 'first name' cannot be written bare in Gemma's call syntax; use keys without spaces or any "
     "of : , { } [ ] < > | \" \\")),
    ({"type": "object", "properties": {"a": {}}, "required": ["b"]},
     f"{ARGS}: required names 'b', which properties does not declare"),
    ({"type": "object", "required": ["b"]}, f"{ARGS}: required names 'b', which properties does not declare"),
    ({"type": "object", "required": "b", "properties": {"b": {}}}, (f"{ARGS}: required must be a list of property "
                                                                   "names")),
    ({"type": "object", "properties": ["a"]}, f"{ARGS}: properties must be an object mapping names to schemas"),
    ({"anyOf": [{"type": "object"}]},
     (f"{ARGS}: 'anyOf' at the top of a function's parameters is not supported: declare the arguments with "
     "properties")),
    ({"type": "object", "properties": {}, "patternProperties": {"^x": {}}},
     (f"{ARGS}: 'patternProperties' at the top of a function's parameters is not supported: declare the arguments "
     "with properties")),
])
def test_unsupported_tool_schemas_are_refused_with_the_keyword_and_place(model, parameters, message):
    for choice in ("auto", "required"):
        with pytest.raises(RequestError) as caught:
            model.constraint_for(tools=[tool(parameters)], tool_choice=choice)
        assert (caught.value.param, str(caught.value)) == (ARGS, message)


def test_tool_choice_none_builds_no_grammar_so_refuses_no_schema(model):
    unsupported = tool(arg({"type": "string", "format": "date"}))
    assert model.constraint_for(tools=[unsupported], tool_choice="none") is not None


def test_the_failing_tool_is_the_one_named(model):
    good, bad = tool(arg({"type": "string"}), "good"), tool(arg({"type": "string", "pattern": "x"}), "bad")
    with pytest.raises(RequestError) as caught:
        model.constraint_for(tools=[good, bad])
    assert caught.value.param == "tools[1].function.parameters"
    too_big = tool(arg({"type": "string", "minLength": 10**6}), "too_big")  # beyond the engine's lexer limits
    with pytest.raises(RequestError) as caught:
        model.constraint_for(tools=[good, too_big])
    assert (caught.value.param, str(caught.value)) == (
        "tools[1].function.parameters", ("tools[1].function.parameters: the grammar engine cannot compile this schema: "
                                        "fuel exhausted when checking relevance of lexemes (1000000)"))


@pytest.mark.parametrize("response_format, param, message", [
    ("json", "response_format", 'response_format: must be an object such as {"type": "json_object"}'),
    ({"type": "xml"}, "response_format.type",
     "response_format.type: 'xml' is not supported; use \"text\", \"json_object\" or \"json_schema\""),
    ({"type": "json_schema"}, "response_format.json_schema",
     'response_format.json_schema: must be an object {"name": ..., "schema": {...}}'),
    ({"type": "json_schema", "json_schema": {"name": "r"}}, "response_format.json_schema.schema",
     ('response_format.json_schema.schema: must be a JSON schema object (for any JSON object, use {"type": '
     '"json_object"})')),
    ({"type": "json_schema", "json_schema": {"name": "r", "schema": {"type": "string", "format": "bogus"}}},
     "response_format.json_schema.schema",
     ("response_format.json_schema.schema: the grammar engine cannot compile this schema: failed to compile JSON "
     "schema: Unknown format: bogus")),
    ({"type": "json_schema", "json_schema": {"name": "r", "schema": {"$ref": "#/$defs/none"}}},
     "response_format.json_schema.schema",
     ("response_format.json_schema.schema: the grammar engine cannot compile this schema: failed to compile JSON "
     "schema: Pointer '/$defs/none' does not exist")),
])
def test_bad_response_formats(model, response_format, param, message):
    with pytest.raises(RequestError) as caught:
        model.constraint_for(response_format=response_format)
    assert (caught.value.param, str(caught.value)) == (param, message)


def test_a_schema_compile_error_is_blamed_on_its_field_beside_tools(model):
    bad = {"type": "json_schema", "json_schema": {"schema": {"type": "string", "format": "bogus"}}}
    with pytest.raises(RequestError) as caught:
        model.constraint_for(response_format=bad, tools=[WEATHER])
    assert caught.value.param == "response_format.json_schema.schema"


def test_a_tokenizer_without_gemma_markers_cannot_call_tools():
    tools = check_tools([WEATHER])
    with pytest.raises(RequestError) as caught:
        reply_grammar(Markers(lambda text: None), tools, ToolChoice("required"))
    assert (caught.value.param, str(caught.value)) == (
        "tools", ("tools: this model's tokenizer has no <|tool_call> token, which Gemma 4's reply format needs here; "
                 "use a Gemma 4 model"))
    with pytest.raises(RequestError) as caught:
        reply_grammar(Markers(lambda text: None), json_schema={"type": "object"}, thinking=True)
    assert (caught.value.param, str(caught.value)) == (
        "response_format", ("response_format: this model's tokenizer has no <channel|> token, which Gemma 4's reply "
                           "format needs here; use a Gemma 4 model"))
