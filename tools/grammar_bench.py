"""What constrained decoding costs and what it buys, on one artifact.

Cost: decode time per token with no constraint, under a json_schema response_format and under a tools request
(tool_choice "required"), and the part of it spent on the grammar's masks (GenerationStats.mask_seconds per
masked draw); beside it, what tool_choice "auto" would cost per token of free text if the grammar engine masked
free text too (the constraint lets free text through unmasked until `<|tool_call>`: 0 by construction).
Worth: N replies sampled at temperature 1.0 to the same json_schema and tools requests, unconstrained and
constrained, and how many parse (JSON; calls in Gemma's syntax and nothing else, read by tools/gemma_calls.py) and
how many validate (jsonschema against the response schema or each called tool's parameters).

Prompts are rendered with the packaged Gemma 4 chat template (tools declared in the system turn). An artifact whose
tokenizer lacks Gemma 4's markers (the 4096-token tokenizer of the real-shape test artifacts) cannot make calls: its
tools rows say so, unless --tokenizer gives one that has them (a random-weight model is random with any tokenizer,
and the mask's cost depends on the tokenizer's size and shape, which is what a real-size one measures). Figures
only with the CPU they came from, on a quiet machine.

    python tools/grammar_bench.py                                   # the bundled model
    python tools/grammar_bench.py /work/big/v5/e2b-int4-b128 --replies 2 --max-tokens 16 --timing-tokens 8
    python tools/grammar_bench.py /work/big/v5/e2b-int4-b128 --tokenizer tokenizer-262k.json --replies 0
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import edge_runtime  # before numpy: it keeps OpenBLAS to one thread (edge_runtime/__init__.py), as the CLI does

# isort: split
import jsonschema
import llguidance
import numpy as np
from tokenizers import Tokenizer as HFTokenizer

from cost_model_check import lscpu
from edge_runtime.chat_template import GEMMA4_TEMPLATE, ChatTemplate
from edge_runtime.constrained_decoding import GrammarVocabulary
from edge_runtime.errors import EdgeRuntimeError, RequestError
from edge_runtime.gemma_grammar import FREE_TEXT
from edge_runtime.tokenizer import Tokenizer
from gemma_calls import NotACall, read_calls

WEATHER = {"type": "object", "properties": {
    "city": {"type": "string", "description": "City name", "maxLength": 40},
    "days": {"type": "integer", "minimum": 1, "maximum": 14},
    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"], "additionalProperties": False}
SEARCH = {"type": "object", "properties": {"query": {"type": "string", "maxLength": 80}, "limit": {"type": "integer", "minimum": 1,
                                                                                   "maximum": 50}},
          "required": ["query"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather forecast for a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "web_search", "description": "Search the web",
                                           "parameters": SEARCH}}]
TOOL_SCHEMAS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}
REPORT = {"type": "object", "properties": {
    "city": {"type": "string"}, "temperature_c": {"type": "integer", "minimum": -60, "maximum": 60},
    "conditions": {"type": "string", "enum": ["sunny", "cloudy", "rain", "snow"]},
    "warnings": {"type": "array", "items": {"type": "string"}, "maxItems": 3}},
    "required": ["city", "temperature_c", "conditions", "warnings"], "additionalProperties": False}
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "weather_report", "schema": REPORT, "strict": True}}
TOOLS_QUESTION = "What will the weather be in Paris for the next 3 days, in celsius?"
JSON_QUESTION = ("Give today's weather in Paris as a JSON object with city, temperature_c (an integer), conditions "
                 "(sunny, cloudy, rain or snow) and warnings (a list of strings).")


def prompt_ids(model: edge_runtime.Model, question: str, tools: list[dict] | None) -> list[int]:
    """The question as one user turn of Gemma 4's own template (whatever template the artifact ships: the real-shape
    test artifacts carry an older one), tools declared when given."""
    template = ChatTemplate(GEMMA4_TEMPLATE, bos_token="")  # encode adds the BOS id, whatever its spelling
    return model.encode(template.render([{"role": "user", "content": question}], tools=tools))


def use_tokenizer(model: edge_runtime.Model, path: Path) -> None:
    """Run the model with another tokenizer: prompts, replies and the grammar engine all use it."""
    model.tokenizer = Tokenizer(path, model.spec.bos_token_id)
    if model.tokenizer.vocab_size > model.spec.input_vocab_size:
        raise EdgeRuntimeError(f"{path}: {model.tokenizer.vocab_size} tokens, more than the model's "
                               f"{model.spec.input_vocab_size} logits")
    for cached in ("end_of_turn_ids", "reply_stop_ids"):  # cached_property slots, read from the old tokenizer
        model.__dict__.pop(cached, None)
    model.__dict__["grammar_vocabulary"] = GrammarVocabulary(
        path.read_text(encoding="utf-8"), model.spec.input_vocab_size, model.reply_stop_ids)


def requests(model: edge_runtime.Model) -> dict[str, tuple[list[int], dict[str, Any]]]:
    json_prompt = prompt_ids(model, JSON_QUESTION, None)
    return {"none": (json_prompt, {}), "json_schema": (json_prompt, {"response_format": RESPONSE_FORMAT}),
            "tools": (prompt_ids(model, TOOLS_QUESTION, TOOLS), {"tools": TOOLS, "tool_choice": "required",
                                                                "parallel_tool_calls": False})}


def timing(model: edge_runtime.Model, prompt: list[int], fields: dict[str, Any], tokens: int, runs: int) -> dict:
    """Decode and mask time per token over `runs` seeded replies of up to `tokens` tokens."""
    decode = mask = compile_seconds = 0.0
    steps = masked = 0
    for seed in range(runs):
        start = time.perf_counter()
        constraint = model.constraint_for(**fields) if fields else None
        compile_seconds += time.perf_counter() - start
        for _ in model.generate_tokens(prompt, tokens, temperature=1.0, seed=seed, constraint=constraint):
            pass
        stats = model.stats
        decode, steps = decode + stats.decode_seconds, steps + max(stats.generated_tokens - 1, 0)
        mask, masked = mask + stats.mask_seconds, masked + stats.constrained_tokens
    return {"decode_ms_per_token": 1e3 * decode / steps if steps else None,
            "mask_ms_per_token": 1e3 * mask / masked if masked else 0.0,
            "mask_share_of_decode": mask / decode if decode else 0.0,
            "constraint_build_ms": 1e3 * compile_seconds / runs, "decode_steps": steps}


def free_text_mask_ms(model: edge_runtime.Model, prompt: list[int], tokens: int) -> float | None:
    """Per token of free text, what masking it would cost if tool_choice "auto" ran the grammar engine from the
    first token (free text, or <|tool_call> and a call): fill and apply, over an unconstrained reply."""
    tool_call = model.tokenizer.token_id("<|tool_call>")
    if tool_call is None:
        return None
    reply = list(model.generate_tokens(prompt, tokens, temperature=1.0, seed=0))
    if tool_call in reply:
        reply = reply[:reply.index(tool_call)]
    vocabulary = model.grammar_vocabulary
    lark = f"start: FREE (<[{tool_call}]> /(?s:.*)/)?\nFREE: {FREE_TEXT}\n"
    matcher = llguidance.LLMatcher(vocabulary.tokenizer, llguidance.LLMatcher.grammar_from_lark(lark), log_level=0)
    bitmask = np.full((vocabulary.n_vocab + 31) // 32, -1, dtype=np.int32)
    logits = np.zeros(model.spec.input_vocab_size, dtype=np.float32)
    spent = 0.0
    for token in reply:
        start = time.perf_counter()
        matcher.unsafe_compute_mask_ptr(bitmask.ctypes.data, bitmask.nbytes)
        allowed = np.unpackbits(bitmask.view(np.uint8), count=logits.shape[0], bitorder="little").view(bool)
        np.copyto(logits, -np.inf, where=~allowed)
        spent += time.perf_counter() - start
        if not matcher.consume_token(token):
            break
    return 1e3 * spent / len(reply) if reply else None


def parse_and_validate(kind: str, reply: str) -> tuple[bool, bool]:
    if kind == "json_schema":
        try:
            value = json.loads(reply)
        except json.JSONDecodeError:
            return False, False
        return True, jsonschema.Draft202012Validator(REPORT).is_valid(value)
    try:
        calls = read_calls(reply)
    except NotACall:
        return False, False
    if not calls:
        return False, False
    return True, all(name in TOOL_SCHEMAS and jsonschema.Draft202012Validator(TOOL_SCHEMAS[name]).is_valid(args)
                     for name, args in calls)


def validity(model: edge_runtime.Model, decode: HFTokenizer, prompt: list[int], fields: dict[str, Any], kind: str,
             replies: int, max_tokens: int) -> dict[str, dict[str, int]]:
    counts = {}
    for constrained in (False, True):
        parsed = valid = ended = 0
        for seed in range(replies):
            constraint = model.constraint_for(**fields) if constrained else None
            ids = list(model.generate_tokens(prompt, max_tokens, temperature=1.0, seed=seed, constraint=constraint))
            ok_parse, ok_valid = parse_and_validate(kind, decode.decode(ids, skip_special_tokens=False).strip())
            parsed, valid, ended = parsed + ok_parse, valid + ok_valid, ended + (model.stats.finish_reason == "stop")
        counts["constrained" if constrained else "unconstrained"] = {"replies": replies, "ended": ended,
                                                                     "parse": parsed, "validate": valid}
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifact", nargs="?", type=Path, help="artifact directory (default: the bundled model)")
    parser.add_argument("--replies", type=int, default=100, help="replies per request and mode for the validity "
                                                                 "counts (default 100)")
    parser.add_argument("--max-tokens", type=int, default=256, help="tokens per validity reply (default 256)")
    parser.add_argument("--timing-tokens", type=int, default=64, help="tokens per timed reply (default 64)")
    parser.add_argument("--timing-runs", type=int, default=3, help="timed replies per request (default 3)")
    parser.add_argument("--tokenizer", type=Path, help="a tokenizer.json to run the model with instead of the "
                                                       "artifact's (one with Gemma 4's markers)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args(argv)

    name, simd = lscpu()
    try:
        model = edge_runtime.load(args.artifact, threads=args.threads)
        start = time.perf_counter()
        if args.tokenizer:
            use_tokenizer(model, args.tokenizer)
    except EdgeRuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    vocabulary = model.grammar_vocabulary
    result: dict[str, Any] = {
        "cpu": name, "simd_flags": simd, "llguidance": llguidance.__version__, "artifact": str(model.path),
        "vocab": model.spec.input_vocab_size, "tokenizer_vocab": model.tokenizer.vocab_size,
        "grammar_vocabulary_build_s": time.perf_counter() - start, "n_vocab": vocabulary.n_vocab,
        "timing": {}, "validity": {}, "skipped": {}}
    decode = HFTokenizer.from_file(str(args.tokenizer or model.path / model.manifest.tokenizer["tokenizer"]))
    for kind, (prompt, fields) in requests(model).items():
        try:
            result["timing"][kind] = timing(model, prompt, fields, args.timing_tokens, args.timing_runs)
        except RequestError as exc:
            result["skipped"][kind] = str(exc)
            continue
        if kind != "none" and args.replies:
            result["validity"][kind] = validity(model, decode, prompt, fields, kind, args.replies, args.max_tokens)
    result["auto_free_text_mask_ms_per_token"] = free_text_mask_ms(model, requests(model)["tools"][0],
                                                                   args.timing_tokens)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"CPU: {name}; SIMD flags: {' '.join(simd)}; llguidance {result['llguidance']}")
    print(f"artifact {result['artifact']}: logits {result['vocab']} wide, tokenizer {result['tokenizer_vocab']} "
          f"tokens; grammar vocabulary built in {result['grammar_vocabulary_build_s']:.2f} s")
    print(f"\n{'request':<12} {'decode ms/token':>16} {'mask ms/token':>14} {'mask share':>11} {'build ms':>9}")
    for kind, row in result["timing"].items():
        per_token = "-" if row["decode_ms_per_token"] is None else f"{row['decode_ms_per_token']:.3f}"
        print(f"{kind:<12} {per_token:>16} {row['mask_ms_per_token']:>14.3f} {row['mask_share_of_decode']:>10.1%} "
              f"{row['constraint_build_ms']:>9.2f}")
    free = result["auto_free_text_mask_ms_per_token"]
    print("tool_choice auto, free text: 0 ms/token (no mask until <|tool_call>); an engine grammar over free text "
          f"would cost {'-' if free is None else f'{free:.3f}'} ms/token")
    for kind, reason in result["skipped"].items():
        print(f"{kind}: skipped: {reason}")
    if result["validity"]:
        print(f"\n{'request':<12} {'mode':<14} {'replies':>7} {'ended':>6} {'parse':>6} {'validate':>8}")
    for kind, modes in result["validity"].items():
        for mode, row in modes.items():
            print(f"{kind:<12} {mode:<14} {row['replies']:>7} {row['ended']:>6} {row['parse']:>6} "
                  f"{row['validate']:>8}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
