"""Generation under a constraint, end to end on a tiny random Gemma 4 model sampled at temperature 1.0: JSON replies
parse and validate, tool calls name a declared tool with arguments valid under its schema, tool_choice "none" never
calls, and generation without a constraint draws exactly the tokens it drew before."""

from __future__ import annotations

import json
import sys

import jsonschema
import numpy as np
import pytest
from tokenizers import Tokenizer as HFTokenizer

import edge_runtime
from edge_runtime.errors import EdgeRuntimeError, RequestError
from edge_runtime.reply_parser import parse_reply
from edge_runtime.sampling import Sampler, SamplingParams
from gemma_calls import NotACall, read_calls

SEEDS = range(8)
WEATHER = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 12},
    "days": {"type": "integer", "minimum": 1, "maximum": 14},
    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    "hourly": {"type": "boolean"},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 3},
    "where": {"type": "object", "properties": {"lat": {"type": "number"}, "lon": {"type": "number"}},
              "required": ["lat", "lon"]},
    "note": {"type": ["string", "null"], "maxLength": 8}},
    "required": ["city", "unit"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "now"}}]
SCHEMAS = {"get_weather": WEATHER, "now": {"type": "object", "additionalProperties": False}}
REPORT = {"type": "object", "properties": {
    "ok": {"type": "boolean"}, "count": {"type": "integer", "minimum": 0, "maximum": 99},
    "label": {"type": "string", "maxLength": 6}, "kind": {"enum": ["a", "b", None]},
    "items": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "maxItems": 4}},
    "required": ["ok", "count", "label", "kind", "items"], "additionalProperties": False}


@pytest.fixture(scope="module")
def model(gemma4_artifact):
    return edge_runtime.load(gemma4_artifact)


@pytest.fixture(scope="module")
def with_markers(gemma4_artifact):
    """Decodes ids keeping the markers as text, as the reply parser reads a reply."""
    tokenizer = HFTokenizer.from_file(str(gemma4_artifact / "tokenizer.json"))
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=False)


def calls(reply: str) -> list[tuple[str, dict]]:
    """The calls of a reply that is nothing but calls, each with arguments valid under its tool's schema."""
    found = read_calls(reply)
    for name, arguments in found:
        jsonschema.validate(arguments, SCHEMAS[name])
    return found


def test_the_checker_reads_calls_and_refuses_anything_else():
    reply = '<|channel>thought\nok<channel|><|tool_call>call:f{a:<|"|>x, y<|"|>,b:[1,{c:null}],d:-2.5e3}<tool_call|>'
    assert read_calls(reply) == [("f", {"a": "x, y", "b": [1, {"c": None}], "d": -2500.0})]
    for bad in ["text", "<|tool_call>call:f{a:1,}<tool_call|>", "<|tool_call>call:f{a:1}x<tool_call|>",
                "<|tool_call>call:f{a:1,a:2}<tool_call|>", '<|tool_call>call:f{a:<|"|>x}<tool_call|>',
                "<|tool_call>call:f{a:1}<tool_call|> and text", "<|tool_call>call:f{a: 1}<tool_call|>"]:
        with pytest.raises(NotACall):
            read_calls(bad)


def generate(model, seed: int, constraint, max_new_tokens: int = 400, **sampling) -> list[int]:
    prompt = model.encode("What is the weather in Paris?")
    sampling = {"temperature": 1.0, **sampling}
    return list(model.generate_tokens(prompt, max_new_tokens, seed=seed, constraint=constraint, **sampling))


def test_json_object_replies_parse_as_objects(model, with_markers):
    """An object without a schema is unbounded and a random model may never close it: what the grammar guarantees
    is an object whenever the reply ends, so every reply that ended parses, and most end."""
    ended = 0
    for seed in SEEDS:
        reply = with_markers(generate(model, seed, model.constraint_for(response_format={"type": "json_object"})))
        if model.stats.finish_reason == "stop":
            assert isinstance(json.loads(reply), dict), reply
            ended += 1
        else:
            assert reply.startswith("{") and model.stats.generated_tokens == 400
    assert ended >= len(SEEDS) // 2


def test_json_schema_replies_validate(model, with_markers):
    response_format = {"type": "json_schema", "json_schema": {"name": "report", "schema": REPORT, "strict": True}}
    for seed in SEEDS:
        reply = with_markers(generate(model, seed, model.constraint_for(response_format=response_format)))
        assert model.stats.finish_reason == "stop", reply
        jsonschema.validate(json.loads(reply), REPORT)


def test_unconstrained_replies_are_not_json(model, with_markers):
    """What the constrained tests above prove is the constraint's doing: the same model, unconstrained, writes no
    JSON and no well-formed call (its random weights may sample a call marker, but never a call the parser reads)."""
    for seed in SEEDS:
        reply = with_markers(generate(model, seed, None, max_new_tokens=100))
        with pytest.raises(json.JSONDecodeError):
            json.loads(reply)
        assert "tool_calls" not in parse_reply(reply)


def preferring(model, monkeypatch, token: int, times: int) -> None:
    """The model's sampler draws `token` whenever it is allowed, the first `times` times (a model that wants to
    call tools), else samples as usual: whether it may is the constraint's to say."""
    real = model.sampler

    def sampler(*args, **kwargs):
        inner, drawn = real(*args, **kwargs), []

        def draw(logits, history):
            if len(drawn) < times and logits[token] > -np.inf:
                drawn.append(token)
                return token
            return inner(logits, history)

        return draw

    monkeypatch.setattr(model, "sampler", sampler)


@pytest.mark.parametrize("parallel", [True, False])
def test_required_tool_calls_name_declared_tools_with_valid_arguments(model, with_markers, monkeypatch, parallel):
    for seed in SEEDS:
        constraint = model.constraint_for(tools=TOOLS, tool_choice="required", parallel_tool_calls=parallel)
        reply = with_markers(generate(model, seed, constraint))
        assert model.stats.finish_reason == "stop", reply
        assert len(calls(reply)) >= 1
    preferring(model, monkeypatch, model.tokenizer.token_id("<|tool_call>"), 3)
    for seed in SEEDS:
        constraint = model.constraint_for(tools=TOOLS, tool_choice="required", parallel_tool_calls=parallel)
        reply = with_markers(generate(model, seed, constraint))
        assert len(calls(reply)) >= 3 if parallel else len(calls(reply)) == 1


def test_a_named_function_is_called_exactly_once(model, with_markers):
    for seed in SEEDS:
        constraint = model.constraint_for(tools=TOOLS, tool_choice={"type": "function",
                                                                    "function": {"name": "get_weather"}})
        reply = with_markers(generate(model, seed, constraint))
        assert [name for name, _ in calls(reply)] == ["get_weather"], reply
        assert model.stats.constrained_tokens == model.stats.generated_tokens  # ended by the grammar, no stop drawn


@pytest.mark.parametrize("parallel", [True, False])
def test_auto_holds_a_call_to_the_grammar_once_the_model_opens_one(model, with_markers, monkeypatch, parallel):
    preferring(model, monkeypatch, model.tokenizer.token_id("<|tool_call>"), 3)
    for seed in SEEDS:
        constraint = model.constraint_for(tools=TOOLS, tool_choice="auto", parallel_tool_calls=parallel)
        reply = with_markers(generate(model, seed, constraint))
        assert model.stats.finish_reason == "stop", reply
        assert len(calls(reply)) >= 3 if parallel else len(calls(reply)) == 1
        # the first draw is free text's: no mask before it, one before every draw after it, the last one a stop
        # token's unless the grammar ended the reply (one call only: nothing but a stop may follow it)
        assert model.stats.constrained_tokens == model.stats.generated_tokens - 1 + parallel


def test_auto_text_costs_no_mask_work(model):
    free = 0
    for seed in SEEDS:
        out = generate(model, seed, model.constraint_for(tools=TOOLS), max_new_tokens=30)
        if model.tokenizer.token_id("<|tool_call>") not in out:
            assert (model.stats.constrained_tokens, model.stats.mask_seconds) == (0, 0.0)
            free += 1
    assert free


def boosting(model, monkeypatch, token: int) -> None:
    """Every forward pass makes `token` by far the likeliest next token."""
    real = model.engine.forward

    def forward(*args, **kwargs):
        logits = real(*args, **kwargs)
        logits[..., token] = 100.0
        return logits

    monkeypatch.setattr(model.engine, "forward", forward)


def test_tool_choice_none_never_opens_a_call(model, monkeypatch):
    tool_call = model.tokenizer.token_id("<|tool_call>")
    boosting(model, monkeypatch, tool_call)
    assert generate(model, 0, None, max_new_tokens=5)[0] == tool_call  # the model wants to call
    for seed in SEEDS:
        constraint = model.constraint_for(tools=TOOLS, tool_choice="none")
        out = generate(model, seed, constraint, max_new_tokens=60)
        assert tool_call not in out
        assert model.stats.constrained_tokens >= len(out)


def test_the_mask_comes_before_penalty_and_greedy_choice(model, with_markers):
    response_format = {"type": "json_schema", "json_schema": {"name": "report", "schema": REPORT}}
    reply = with_markers(generate(model, 0, model.constraint_for(response_format=response_format), temperature=0.0,
                                  repetition_penalty=1.5, top_k=1))
    jsonschema.validate(json.loads(reply), REPORT)


def test_stats_report_the_masks_cost(model):
    response_format = {"type": "json_schema", "json_schema": {"name": "report", "schema": REPORT}}
    generate(model, 1, model.constraint_for(response_format=response_format))
    stats = model.stats
    assert stats.finish_reason == "stop"
    assert stats.constrained_tokens == stats.generated_tokens  # every draw; after the last "}" only a stop could be
    assert 0 < stats.mask_seconds < stats.prefill_seconds + stats.decode_seconds + 1
    assert stats.to_dict()["mask_seconds"] == stats.mask_seconds
    assert stats.to_dict()["constrained_tokens"] == stats.constrained_tokens
    generate(model, 1, None, max_new_tokens=5)
    assert (model.stats.mask_seconds, model.stats.constrained_tokens) == (0.0, 0)


def test_stream_ids_passes_the_constraint_on(model, with_markers):
    prompt = model.encode("Weather?")
    response_format = {"type": "json_schema", "json_schema": {"name": "report", "schema": REPORT}}
    text = "".join(model.stream_ids(prompt, 400, temperature=1.0, seed=3,
                                    constraint=model.constraint_for(response_format=response_format)))
    jsonschema.validate(json.loads(text), REPORT)


def test_a_constraint_serves_one_generation(model):
    constraint = model.constraint_for(response_format={"type": "json_object"})
    generate(model, 0, constraint, max_new_tokens=3)
    with pytest.raises(EdgeRuntimeError, match="a constraint serves one generation; build another with "
                                               "Model.constraint_for"):
        generate(model, 0, constraint, max_new_tokens=3)


def test_unconstrained_generation_draws_what_it_drew_before(gemma4_artifact):
    """The loop with constraint=None against the loop as it was, written out here: each token drawn by the same
    seeded sampler from the logits of everything so far, run one token at a time."""
    model = edge_runtime.load(gemma4_artifact, prefill_chunk=1)
    prompt = model.encode("What is the weather in Paris?")
    for seed in (0, 1):
        got = list(model.generate_tokens(prompt, 40, temperature=1.0, seed=seed, cache_prompt=False))
        sampler, ids, expected = Sampler(SamplingParams(), seed), list(prompt), []
        while len(expected) < 40:
            token = sampler(model.logits(ids, mode="decode")[-1], ids)
            if token in model.eos_token_ids:
                break
            expected.append(token)
            ids.append(token)
        assert got == expected


def test_without_llguidance_a_constrained_request_says_what_to_install(model, monkeypatch):
    monkeypatch.setitem(sys.modules, "llguidance", None)
    with pytest.raises(RequestError) as caught:
        model.constraint_for(response_format={"type": "json_object"})
    assert (caught.value.param, str(caught.value)) == (
        "response_format", ("response_format: constrained decoding needs the grammar engine llguidance, which is not "
                           "installed: pip install 'edge-runtime[grammar]'"))
    with pytest.raises(RequestError) as caught:
        model.constraint_for(tools=TOOLS)
    assert caught.value.param == "tools"
    assert model.constraint_for(tools=TOOLS, tool_choice="none") is not None  # banning a token needs no engine
