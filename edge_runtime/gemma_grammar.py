"""Grammars (llguidance's Lark dialect) for what a Gemma 4 reply may be: calls to the declared tools in Gemma's own
syntax, a JSON reply, or both, each optionally after a thought.

Gemma 4 writes a call as `<|tool_call>call:NAME{key:value,...}<tool_call|>`, keys bare and in the order the chat
template renders them (Jinja's dictsort: case-insensitive), strings between `<|"|>` markers, numbers, true, false,
null, arrays `[...]` and objects `{k:v}` as in JSON. The markers are single special tokens and are matched by id
(`<[ID]>`), which grammar terminals never match: the model cannot spell one out of ordinary bytes. Text inside
strings and thoughts also may not spell one (`<|name>`, `<name|>`, `<|name|>`), so that a reply read back as text
splits where the model meant it to.

A tool's arguments are generated from its JSON schema here, as Gemma values; a JSON reply's schema is handed to
llguidance's own JSON support. A schema keyword the generator does not implement is refused with the keyword and
where it is, never ignored: ignoring `pattern` or `minimum` would let through arguments the caller's schema forbids.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from edge_runtime.errors import RequestError
from edge_runtime.integer_ranges import integer_range_regex
from edge_runtime.tool_declarations import Tool, ToolChoice

# Gemma 4's format markers, each one special token.
TOOL_CALL, TOOL_CALL_END, QUOTE = "<|tool_call>", "<tool_call|>", '<|"|>'
CHANNEL, CHANNEL_END = "<|channel>", "<channel|>"

# Free text that spells no marker: any text, but not <|name>, <name|> or <|name|> written out of ordinary tokens.
FREE_TEXT = r'/(?s:.*)/ & ~/(?s:.*)(<\|[a-z_"]+\|?>|<[a-z_"]+\|>)(?s:.*)/'
# A key Gemma writes bare: anything but whitespace and the characters of its syntax.
KEY_CHARACTER = r'[^\s:,{}\[\]<>|"\\]'
NUMBER = r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?"
# JSON replies: whitespace as the model likes it, but at most 24 characters at a place, so that a model that
# drifts into whitespace cannot spend the whole reply there.
JSON_OPTIONS = {"whitespace_pattern": r"[ \t\n\r]{1,24}"}

ANNOTATIONS = frozenset({"description", "title", "default", "examples", "$schema", "$id", "$comment", "deprecated",
                         "readOnly", "writeOnly", "$defs", "definitions", "contentEncoding", "contentMediaType"})
# Standard JSON schema keywords that constrain values and that the argument generator does not implement.
UNSUPPORTED = frozenset({"pattern", "format", "oneOf", "not", "if", "then", "else", "prefixItems", "additionalItems",
                         "contains", "minContains", "maxContains", "uniqueItems", "unevaluatedItems",
                         "unevaluatedProperties", "patternProperties", "propertyNames", "minProperties",
                         "maxProperties", "dependentRequired", "dependentSchemas", "dependencies", "multipleOf",
                         "$dynamicRef", "$recursiveRef", "$anchor", "$dynamicAnchor"})
SUPPORTED_HELP = ("type (string, integer, number, boolean, null, array, object, or a list of them), enum, const, "
                  "properties, required, additionalProperties, items, minItems, maxItems, minLength, maxLength, "
                  "minimum/maximum/exclusiveMinimum/exclusiveMaximum on integers, nullable, anyOf, allOf of one "
                  "schema, and $ref to #/$defs or #/definitions")
TYPE_KEYWORDS = {"object": ("properties", "required", "additionalProperties"),
                 "array": ("items", "minItems", "maxItems"),
                 "string": ("minLength", "maxLength"),
                 "number": ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")}
TYPES = ("string", "integer", "number", "boolean", "null", "array", "object")
BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")


@dataclass(frozen=True)
class ReplyGrammar:
    """What constrains one reply. `lark` is None when only `banned` tokens are kept out; `trigger` is the token
    (`<|tool_call>`) before which the reply is free text and at which `lark` begins. `parts` are standalone grammars
    of each request field that went into `lark`, compiled one by one to name the field when `lark` fails to."""

    lark: str | None
    trigger: int | None = None
    banned: tuple[int, ...] = ()
    parts: tuple[tuple[str, str], ...] = ()


@dataclass
class Markers:
    """The token ids of Gemma's markers in one tokenizer, looked up as a grammar needs them: a tokenizer without
    them (an older model) cannot make calls or thoughts, and the request that asks for one is refused."""

    token_id: Callable[[str], int | None]
    ids: dict[str, int] = field(default_factory=dict)

    def id(self, marker: str, param: str) -> int:
        if marker not in self.ids:
            found = self.token_id(marker)
            if found is None:
                raise RequestError(f"{param}: this model's tokenizer has no {marker} token, which Gemma 4's reply "
                                   "format needs here; use a Gemma 4 model", param)
            self.ids[marker] = found
        return self.ids[marker]

    def token(self, marker: str, param: str) -> str:
        return f"<[{self.id(marker, param)}]>"


def check_response_format(response_format: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    """The JSON schema a reply must follow under OpenAI's `response_format` ({"type": "object"} for json_object),
    or None for plain text."""
    if response_format is None:
        return None
    if not isinstance(response_format, Mapping):
        raise RequestError('response_format: must be an object such as {"type": "json_object"}', "response_format")
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind != "json_schema":
        raise RequestError(f'response_format.type: {kind!r} is not supported; use "text", "json_object" or '
                           '"json_schema"', "response_format.type")
    spec = response_format.get("json_schema")
    if not isinstance(spec, Mapping):
        raise RequestError('response_format.json_schema: must be an object {"name": ..., "schema": {...}}',
                           "response_format.json_schema")
    schema = spec.get("schema")
    if not isinstance(schema, Mapping):
        raise RequestError('response_format.json_schema.schema: must be a JSON schema object (for any JSON object, '
                           'use {"type": "json_object"})', "response_format.json_schema.schema")
    return schema


def reply_grammar(markers: Markers, tools: Sequence[Tool] = (), choice: ToolChoice = ToolChoice("none"),
                  parallel: bool = True, json_schema: Mapping[str, Any] | None = None, thinking: bool = False,
                  thought_open: bool = False) -> ReplyGrammar | None:
    """The grammar of a reply under these checked request fields, or None when nothing constrains it.

    tool_choice "none", or no tools, bans `<|tool_call>` (no grammar at all unless a JSON reply is asked for, and
    None for a tokenizer without the marker); "auto" leaves the
    reply free until the model samples `<|tool_call>`, so that plain text costs no mask work; "required" makes the
    reply one call or more, a named function exactly one call of it. More than one call only with `parallel`.
    `thinking` allows a thought first; `thought_open` says the prompt has already opened it (Gemma's template does
    after tool responses when thinking), so the reply must first finish it.
    """
    calling = bool(tools) and choice.mode != "none"
    if not calling and json_schema is None:
        # A reply may not call what the request did not offer (OpenAI never answers tool_calls without tools): a
        # small model trained on calls would otherwise make them up. One banned id, no grammar engine.
        tool_call = markers.token_id(TOOL_CALL)
        return ReplyGrammar(None, banned=(tool_call,)) if tool_call is not None else None
    writer = _Writer(markers)
    parts = []
    if json_schema is not None and choice.mode in ("none", "auto"):
        writer.rules["json"] = f"%json {json.dumps(_json_with_options(json_schema))}"
        parts.append(("response_format.json_schema.schema", f"start: json\njson: {writer.rules['json']}"))
    if calling:
        tool_call, tool_call_end = markers.token(TOOL_CALL, "tools"), markers.token(TOOL_CALL_END, "tools")
        declared = [tool for tool in tools if choice.mode != "function" or tool.name == choice.name]
        for tool in declared:
            single = _Writer(markers)
            single.rules["start"] = single.call(tool)
            parts.append((f"{tool.field}.parameters", single.lark()))
        calls = " | ".join(writer.call(tool) for tool in declared)
        writer.rules["call"] = f'{tool_call} "call:" ({calls}) {tool_call_end}'
        writer.rules["calls"] = "call+" if parallel and choice.mode != "function" else "call"
    if calling and choice.mode == "auto" and json_schema is None:
        writer.rules["start"] = "calls"
        return ReplyGrammar(writer.lark(), trigger=markers.id(TOOL_CALL, "tools"), parts=tuple(parts))
    if json_schema is None or choice.mode in ("required", "function"):
        body = "calls"
    else:
        body = "json | calls" if calling else "json"
    writer.rules["start"] = _after_thought(writer, body, thinking, thought_open)
    return ReplyGrammar(writer.lark(), parts=tuple(parts))


def _after_thought(writer: _Writer, body: str, thinking: bool, thought_open: bool) -> str:
    if not (thinking or thought_open):
        return body
    param = "tools" if "calls" in body else "response_format"
    writer.terminals["TEXT"] = FREE_TEXT
    end = writer.markers.token(CHANNEL_END, param)
    if thought_open:
        return f"TEXT {end} ({body})"
    writer.rules["thought"] = f"{writer.markers.token(CHANNEL, param)} \"thought\\n\" TEXT {end}"
    return f"thought? ({body})"


def _json_with_options(schema: Mapping[str, Any]) -> dict[str, Any]:
    """The schema with this runtime's JSON options in place of any the request set (a request's "lenient" would
    have llguidance skip keywords it does not implement)."""
    return {**{k: v for k, v in schema.items() if k != "x-guidance"}, "x-guidance": JSON_OPTIONS}


def sort_keys(keys: Sequence[str]) -> list[str]:
    """Keys in the order Gemma's chat template writes them: Jinja's dictsort, which ignores case."""
    return sorted(keys, key=str.lower)


class _Writer:
    """Builds the Lark text: rules and terminals by name, one rule per distinct (tool, schema) so that a schema used
    in many places, or recursively through $ref, is written once."""

    def __init__(self, markers: Markers) -> None:
        self.markers = markers
        self.rules: dict[str, str] = {}
        self.terminals: dict[str, str] = {}
        self.memo: dict[tuple[int, str], str] = {}

    def lark(self) -> str:
        return "\n".join([f"start: {self.rules['start']}"]
                         + [f"{name}: {body}" for name, body in self.rules.items() if name != "start"]
                         + [f"{name}: {body}" for name, body in self.terminals.items()]) + "\n"

    def call(self, tool: Tool) -> str:
        """`NAME{arguments}` of one tool, as a rule."""
        schema = _Schema(self, tool)
        args = schema.arguments()
        name = f"call_{tool.index}"
        self.rules[name] = f"{json.dumps(tool.name)} {args}"
        return name

    def quote(self) -> str:
        return self.markers.token(QUOTE, "tools")

    def terminal(self, name: str, body: str) -> str:
        self.terminals[name] = body
        return name

    def any_value(self) -> str:
        """Any Gemma value (a schema of {} or true, an array without items, an object without properties)."""
        if "value" not in self.rules:
            q = self.quote()
            self.terminal("TEXT", FREE_TEXT)
            key = self.terminal("KEY", f"/{KEY_CHARACTER}{{1,64}}/")
            self.rules["value"] = (f'{q} TEXT {q} | NUMBER | "true" | "false" | "null" | "[" (value ("," value)*)? "]" '
                                   f'| "{{" ({key} ":" value ("," {key} ":" value)*)? "}}"')
            self.terminal("NUMBER", f"/{NUMBER}/")
        return "value"


class _Schema:
    """One tool's parameters turned into rules, refusing what is not implemented with the keyword and its place."""

    def __init__(self, writer: _Writer, tool: Tool) -> None:
        self.writer, self.tool = writer, tool
        self.param = f"{tool.field}.parameters"
        self.root = tool.parameters or {}
        self.refs: dict[str, str] = {}

    def refuse(self, where: str, what: str) -> RequestError:
        place = f" at {where}" if where else ""
        return RequestError(f"{self.param}{place}: {what}", self.param)

    def arguments(self) -> str:
        """The root: an object, whose properties are the call's arguments (none without parameters)."""
        if self.tool.parameters is None:
            return '"{" "}"'
        for keyword in sorted(set(self.root) - ANNOTATIONS - {"type", *TYPE_KEYWORDS["object"]}):
            if keyword in UNSUPPORTED or keyword in ("anyOf", "allOf", "$ref", "enum", "const", "nullable"):
                raise self.refuse("", f"{keyword!r} at the top of a function's parameters is not supported: "
                                      "declare the arguments with properties")
        return self.object(self.root, "")

    def value(self, schema: Any, where: str) -> str:
        """A rule (or literal) for the Gemma values `schema` allows."""
        if schema is True or schema == {}:
            return self.writer.any_value()
        if not isinstance(schema, Mapping):
            raise self.refuse(where, "a schema must be an object (or true)")
        key = (self.tool.index, json.dumps(schema, sort_keys=True))
        if key in self.writer.memo:
            return self.writer.memo[key]
        name = f"t{self.tool.index}_{len(self.writer.memo)}"
        self.writer.memo[key] = name
        self.writer.rules[name] = self.alternatives(schema, where)
        return name

    def alternatives(self, schema: Mapping[str, Any], where: str) -> str:
        keywords = set(schema) - ANNOTATIONS
        if unsupported := sorted(keywords & UNSUPPORTED):
            raise self.refuse(where, f"{unsupported[0]!r} is not supported in tool parameters; supported: "
                                     f"{SUPPORTED_HELP}")
        for combinator in ("$ref", "anyOf", "allOf"):
            if combinator in keywords:
                if others := sorted(keywords - {combinator}):
                    raise self.refuse(where, f"{others[0]!r} beside {combinator!r} is not supported; move it into "
                                             f"the {combinator} schema")
                return getattr(self, combinator.strip("$").lower())(schema[combinator], where)
        types = self.types(schema, where)
        if "enum" in schema or "const" in schema:
            return self.enum(schema, types, where)
        expressions = [getattr(self, kind)(schema, where) for kind in types]
        if schema.get("nullable") is True and "null" not in types:
            expressions.append('"null"')
        return " | ".join(expressions)

    def types(self, schema: Mapping[str, Any], where: str) -> list[str]:
        declared = schema.get("type")
        if declared is None:  # as JSON schema reads it: any type, each keyword constraining its own
            used = [kind for kind, words in TYPE_KEYWORDS.items() if any(w in schema for w in words)]
            return used or list(TYPES)
        kinds = declared if isinstance(declared, list) else [declared]
        for kind in kinds:
            if kind not in TYPES:
                raise self.refuse(where, f"type {kind!r} is not a JSON schema type (use {', '.join(TYPES)})")
        return list(dict.fromkeys(kinds))

    def ref(self, ref: Any, where: str) -> str:
        if ref in self.refs:
            return self.refs[ref]
        target: Any = self.root
        if ref != "#":
            parts = ref.split("/") if isinstance(ref, str) else []
            if len(parts) != 3 or parts[0] != "#" or parts[1] not in ("$defs", "definitions"):
                raise self.refuse(where, f"$ref {ref!r} is not supported; refer to #/$defs/NAME or "
                                         "#/definitions/NAME of the same parameters")
            target = self.root.get(parts[1], {}).get(parts[2]) if isinstance(self.root.get(parts[1]), Mapping) \
                else None
            if target is None:
                raise self.refuse(where, f"$ref {ref!r} names no schema in the parameters' {parts[1]}")
        name = f"t{self.tool.index}_ref{len(self.refs)}"
        self.refs[ref] = name
        body = self.arguments() if ref == "#" else self.value(target, ref[2:].replace("/", "."))
        self.writer.rules[name] = body
        return name

    def anyof(self, options: Any, where: str) -> str:
        if not isinstance(options, list) or not options:
            raise self.refuse(where, "anyOf must be a non-empty list of schemas")
        return " | ".join(self.value(option, f"{where}.anyOf[{i}]".lstrip(".")) for i, option in enumerate(options))

    def allof(self, options: Any, where: str) -> str:
        if not isinstance(options, list) or len(options) != 1:
            raise self.refuse(where, "allOf is supported with exactly one schema; merge the schemas into one")
        return self.value(options[0], f"{where}.allOf[0]".lstrip("."))

    def enum(self, schema: Mapping[str, Any], types: list[str], where: str) -> str:
        if extra := sorted(set(schema) - ANNOTATIONS - {"enum", "const", "type", "nullable"}):
            raise self.refuse(where, f"{extra[0]!r} beside enum/const is not supported; list only the allowed values")
        values = [schema["const"]] if "const" in schema else schema["enum"]
        if not isinstance(values, list) or not values:
            raise self.refuse(where, "enum must be a non-empty list of values")
        if schema.get("nullable") is True:
            types = [*types, "null"]
        allowed = [value for value in values if _json_type(value) in types
                   or (_json_type(value) == "integer" and "number" in types)]
        if not allowed:
            raise self.refuse(where, f"no value of enum/const has the declared type {schema.get('type')!r}")
        return " | ".join(self.literal(value, where) for value in allowed)

    def literal(self, value: Any, where: str) -> str:
        """Exactly this value, written as Gemma's template writes it."""
        if isinstance(value, str):
            if _spells_marker(value):
                raise self.refuse(where, f"the value {value!r} contains a Gemma marker such as <|\"|>")
            q = self.writer.quote()
            return f"{q} {json.dumps(value)} {q}" if value else f"{q} {q}"
        if value is None or isinstance(value, bool):
            return json.dumps(json.dumps(value))
        if isinstance(value, (int, float)):
            if not math.isfinite(value):
                raise self.refuse(where, f"{value!r} is not a JSON number")
            return json.dumps(json.dumps(value))
        if isinstance(value, list):
            items = ' "," '.join(self.literal(item, where) for item in value)
            return f'"[" {items} "]"' if items else '"[" "]"'
        keys = sort_keys(list(value))
        for key in keys:
            self.check_key(key, where)
        pairs = ' "," '.join(f"{json.dumps(key + ':')} {self.literal(value[key], where)}" for key in keys)
        return f'"{{" {pairs} "}}"' if pairs else '"{" "}"'

    def check_key(self, key: str, where: str) -> None:
        if not re.fullmatch(f"{KEY_CHARACTER}+", key):
            raise self.refuse(where, f"the key {key!r} cannot be written bare in Gemma's call syntax; use keys "
                                     "without spaces or any of : , { } [ ] < > | \" \\")

    def string(self, schema: Mapping[str, Any], where: str) -> str:
        low, high = self.count(schema, "minLength", where), self.count(schema, "maxLength", where)
        q = self.writer.quote()
        if low == 0 and high is None:
            return f"{q} {self.writer.terminal('TEXT', FREE_TEXT)} {q}"
        if high is not None and high < low:
            raise self.refuse(where, f"maxLength {high} is below minLength {low}")
        text = FREE_TEXT.replace(r"/(?s:.*)/ &", f"/(?s:.{{{low},{'' if high is None else high}}})/ &", 1)
        name = f"TEXT_{low}_{'' if high is None else high}"
        return f"{q} {self.writer.terminal(name, text)} {q}"

    def count(self, schema: Mapping[str, Any], keyword: str, where: str) -> Any:
        value = schema.get(keyword)
        if value is None:
            return 0 if keyword.startswith("min") else None
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise self.refuse(where, f"{keyword} must be a whole number of at least 0")
        return value

    def integer(self, schema: Mapping[str, Any], where: str) -> str:
        low, high = schema.get("minimum"), schema.get("maximum")
        for keyword in BOUNDS:
            if keyword in schema and (isinstance(schema[keyword], bool)
                                      or not isinstance(schema[keyword], (int, float))):
                raise self.refuse(where, f"{keyword} must be a number")
        low = None if low is None else math.ceil(low)
        high = None if high is None else math.floor(high)
        if "exclusiveMinimum" in schema:
            bound = math.floor(schema["exclusiveMinimum"]) + 1
            low = bound if low is None else max(low, bound)
        if "exclusiveMaximum" in schema:
            bound = math.ceil(schema["exclusiveMaximum"]) - 1
            high = bound if high is None else min(high, bound)
        if low is not None and high is not None and low > high:
            raise self.refuse(where, "no integer lies within its minimum and maximum")
        name = "INT" if low is None and high is None else f"INT_{low}_{high}".replace("-", "N").replace("None", "")
        return self.writer.terminal(name, f"/{integer_range_regex(low, high)}/")

    def number(self, schema: Mapping[str, Any], where: str) -> str:
        if bounded := [keyword for keyword in BOUNDS if keyword in schema]:
            raise self.refuse(where, f"{bounded[0]!r} is supported on integers only; use \"type\": \"integer\" or "
                                     "drop the bound")
        return self.writer.terminal("NUMBER", f"/{NUMBER}/")

    def boolean(self, schema: Mapping[str, Any], where: str) -> str:
        return '"true" | "false"'

    def null(self, schema: Mapping[str, Any], where: str) -> str:
        return '"null"'

    def array(self, schema: Mapping[str, Any], where: str) -> str:
        items = schema.get("items", True)
        if isinstance(items, list):
            raise self.refuse(where, "items as a list (tuple validation) is not supported; give one schema")
        low, high = self.count(schema, "minItems", where), self.count(schema, "maxItems", where)
        if high is not None and high < low:
            raise self.refuse(where, f"maxItems {high} is below minItems {low}")
        if high == 0:
            return '"[" "]"'
        item = self.value(items, f"{where}.items".lstrip("."))
        more = "*" if high is None else f"{{{max(low - 1, 0)},{high - 1}}}"
        if high is None and low > 1:
            more = f"{{{low - 1},}}"
        sequence = f'{item} ("," {item}){more}'
        return f'"[" {sequence} "]"' if low else f'"[" ({sequence})? "]"'

    def object(self, schema: Mapping[str, Any], where: str) -> str:
        properties = schema.get("properties")
        required = schema.get("required", [])
        if not isinstance(required, list) or not all(isinstance(name, str) for name in required):
            raise self.refuse(where, "required must be a list of property names")
        if properties is None:
            if required:
                raise self.refuse(where, f"required names {required[0]!r}, which properties does not declare")
            extra = schema.get("additionalProperties", True)
            if extra is False:
                return '"{" "}"'
            value = self.value(extra, f"{where}.additionalProperties".lstrip("."))
            key = self.writer.terminal("KEY", f"/{KEY_CHARACTER}{{1,64}}/")
            return f'"{{" ({key} ":" {value} ("," {key} ":" {value})*)? "}}"'
        if not isinstance(properties, Mapping):
            raise self.refuse(where, "properties must be an object mapping names to schemas")
        if missing := [name for name in required if name not in properties]:
            raise self.refuse(where, f"required names {missing[0]!r}, which properties does not declare")
        names = sort_keys(list(properties))
        for name in names:
            self.check_key(name, where)
        pairs = [f"{json.dumps(name + ':')} {self.value(properties[name], f'{where}.properties.{name}'.lstrip('.'))}"
                 for name in names]
        return '"{" ' + self.ordered_subset(pairs, [name in required for name in names], where) + ' "}"'

    def ordered_subset(self, pairs: list[str], required: list[bool], where: str) -> str:
        """Comma-separated pairs in this order, each required one present: a chain of rules, one per position, for
        "the pairs from here on, the first one written without a comma"."""
        if not pairs:
            return ""
        rest = ""  # the pairs after position i, each with its comma
        first = ""  # a non-empty run of the pairs from position i on, the first without a comma (or "")
        for i in range(len(pairs) - 1, -1, -1):
            with_rest = f"{pairs[i]} {rest}".strip()
            first = with_rest if required[i] or not first else f"({with_rest}) | ({first})"
            if first != with_rest:
                name = f"t{self.tool.index}_o{len(self.writer.rules)}"
                self.writer.rules[name] = first
                first = name
            rest = f'"," {pairs[i]} {rest}'.strip() if required[i] else f'("," {pairs[i]})? {rest}'.strip()
        return first if any(required) else f"({first})?"


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
        return "integer"
    return {float: "number", str: "string", list: "array", dict: "object"}.get(type(value), "object")


def _spells_marker(text: str) -> bool:
    return re.search(r'<\|[a-z_"]+\|?>|<[a-z_"]+\|>', text) is not None
