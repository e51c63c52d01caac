"""Count how often a model, sampled without constraints, writes Gemma 4's chat format correctly.

Why: the bundled model is trained to call tools and to answer in JSON in Gemma 4's format; how often free sampling
gets that right is what it learned, and the baseline that constrained decoding (which guarantees it) is measured
against. Two requests, each sampled `--samples` times with seeds 0, 1, ... through the runtime (the checkpoint is
exported to a temporary artifact and run by `edge_runtime.load`):

  * tools: `get_weather` declared (tools/tiny_chat_data.py), the user asks `--tool-prompt`. A reply counts when it
    holds a well-formed `<|tool_call>call:get_weather{...}<tool_call|>` whose arguments fit the declared schema
    (required keys, no others, types, enum values); also counted: replies that are only calls (after an optional
    thought) and stop at `<|tool_response>`, and calls whose city is the one asked for.
  * JSON: the user asks `--json-prompt`; a reply counts when all of it is one JSON object.

Prompts are rendered by the checkpoint's chat template through transformers; replies are decoded with the special
tokens kept. Sampling is plain temperature sampling (top-k and top-p off) unless told otherwise.

    python tools/chat_format_check.py edge_runtime/bundled/gemma4-tiny --samples 100 --temperature 1.0
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
from pathlib import Path

from transformers import AutoTokenizer

import edge_runtime
import tiny_chat_data
from edge_runtime.export import export_checkpoint

STRING_QUOTE = '<|"|>'
CALL = re.compile(r"<\|tool_call>call:([A-Za-z_][\w.-]*)(\{.*?)<tool_call\|>", re.DOTALL)
THOUGHT = re.compile(r"<\|channel>thought\n.*?<channel\|>", re.DOTALL)


class Unparsable(ValueError):
    pass


def parse_arguments(text: str) -> dict:
    """A call's `{key:value,...}` in Gemma 4's syntax: bare keys, strings in <|"|>, numbers, true/false/null,
    [arrays] and {objects}. Raises Unparsable for anything else."""
    value, end = _value(text, 0)
    if end != len(text) or not isinstance(value, dict):
        raise Unparsable(f"not one object: {text!r}")
    return value


def _value(text: str, i: int) -> tuple[object, int]:
    if text.startswith(STRING_QUOTE, i):
        end = text.find(STRING_QUOTE, i + len(STRING_QUOTE))
        if end < 0:
            raise Unparsable("unterminated string")
        return text[i + len(STRING_QUOTE):end], end + len(STRING_QUOTE)
    if text.startswith("{", i):
        obj, i = {}, i + 1
        while not text.startswith("}", i):
            if obj:
                if not text.startswith(",", i):
                    raise Unparsable(f"expected ',' at {i}")
                i += 1
            key = re.compile(r"[A-Za-z_][\w-]*").match(text, i)
            if key is None or not text.startswith(":", key.end()):
                raise Unparsable(f"expected key: at {i}")
            obj[key.group()], i = _value(text, key.end() + 1)
        return obj, i + 1
    if text.startswith("[", i):
        items, i = [], i + 1
        while not text.startswith("]", i):
            if items:
                if not text.startswith(",", i):
                    raise Unparsable(f"expected ',' at {i}")
                i += 1
            item, i = _value(text, i)
            items.append(item)
        return items, i + 1
    for word, value in (("true", True), ("false", False), ("null", None)):
        if text.startswith(word, i):
            return value, i + len(word)
    number = re.compile(r"-?(0|[1-9]\d*)(\.\d+)?([eE][-+]?\d+)?").match(text, i)
    if number is None:
        raise Unparsable(f"unexpected {text[i:i + 10]!r} at {i}")
    return json.loads(number.group()), number.end()


def fits(value: object, schema: dict) -> bool:
    """Whether `value` fits a JSON-schema subset: type, enum, nullable, properties/required, items."""
    if value is None:
        return bool(schema.get("nullable"))
    kind = schema.get("type")
    if kind == "string":
        return isinstance(value, str) and ("enum" not in schema or value in schema["enum"])
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "boolean":
        return isinstance(value, bool)
    if kind == "array":
        return isinstance(value, list) and all(fits(item, schema.get("items", {})) for item in value)
    if kind == "object":
        properties = schema.get("properties", {})
        return (isinstance(value, dict) and set(schema.get("required", [])) <= value.keys() <= properties.keys()
                and all(fits(v, properties[k]) for k, v in value.items()))
    return False


def sample(model: edge_runtime.Model, prompt_ids: list[int], args: argparse.Namespace, seed: int) -> tuple[str, str]:
    """(reply with special tokens, how it ended: 'tool_response', 'end_of_turn' or 'length')."""
    tool_response = model.tokenizer.token_id("<|tool_response>")
    ids, ended = [], "length"
    tokens = model.generate_tokens(prompt_ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                                   top_p=args.top_p, min_p=0.0, repetition_penalty=1.0, seed=seed,
                                   stop_token_ids=model.reply_stop_ids)
    try:
        for token in tokens:
            if token == tool_response:
                ended = "tool_response"
                break
            ids.append(token)
        else:
            ended = "end_of_turn" if model.stats.finish_reason == "stop" else "length"
    finally:
        tokens.close()
    return model.tokenizer._tok.decode(ids, skip_special_tokens=False), ended


def check_tool_reply(reply: str, ended: str, tool: dict, city: str) -> dict[str, bool]:
    name, schema = tool["function"]["name"], tool["function"]["parameters"]
    calls = []
    for match in CALL.finditer(reply):
        try:
            calls.append((match.group(1), parse_arguments(match.group(2))))
        except Unparsable:
            calls.append((match.group(1), None))
    good = [args for called, args in calls if called == name and args is not None and fits(args, schema)]
    only_calls = CALL.sub("", THOUGHT.sub("", reply, count=1)).strip() == "" and bool(calls)
    return {"well_formed_call": bool(good), "only_calls_then_tool_response": only_calls and ended == "tool_response"
            and len(good) == len(calls), "asked_city": any(args.get("city") == city for args in good)}


def is_json_object(reply: str) -> bool:
    try:
        return isinstance(json.loads(reply), dict)
    except json.JSONDecodeError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="Hugging Face checkpoint directory with a chat template")
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0, help="0: off")
    parser.add_argument("--top-p", type=float, default=1.0, help="1: off")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--tool-prompt", default="What is the weather in Oslo?")
    parser.add_argument("--city", default="Oslo", help="the city the tool prompt asks about")
    parser.add_argument("--json-prompt", default="Reply in JSON. What is the weather in Oslo?")
    parser.add_argument("--show", type=int, default=5, help="replies of each kind to print")
    args = parser.parse_args()

    hf = AutoTokenizer.from_pretrained(args.checkpoint)
    tool = tiny_chat_data.TOOLS["get_weather"]
    prompts = {
        "tools": hf.apply_chat_template([{"role": "user", "content": args.tool_prompt}], tools=[tool],
                                        tokenize=False, add_generation_prompt=True),
        "json": hf.apply_chat_template([{"role": "user", "content": args.json_prompt}], tokenize=False,
                                       add_generation_prompt=True),
    }
    results: dict = {"sampling": {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
                                  "seeds": f"0..{args.samples - 1}", "max_new_tokens": args.max_new_tokens}}
    with tempfile.TemporaryDirectory() as tmp:
        model = edge_runtime.load(export_checkpoint(args.checkpoint, Path(tmp) / "artifact"))
        for kind, prompt in prompts.items():
            prompt_ids = model.tokenizer.encode(prompt, add_bos=False)
            counts: dict[str, int] = {}
            print(f"--- {kind}: {prompt!r}")
            for seed in range(args.samples):
                reply, ended = sample(model, prompt_ids, args, seed)
                checks = (check_tool_reply(reply, ended, tool, args.city) if kind == "tools"
                          else {"json_object": is_json_object(reply)})
                checks[f"ended_{ended}"] = True
                for key, passed in checks.items():
                    counts[key] = counts.get(key, 0) + passed
                if seed < args.show:
                    print(f"[{seed}] {ended}: {reply!r}")
            results[kind] = {"prompt": prompt, "samples": args.samples, "counts": dict(sorted(counts.items()))}
            print(json.dumps(results[kind]["counts"]))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
