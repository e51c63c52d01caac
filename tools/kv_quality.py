"""Held-out perplexity and top-1 agreement with fp16 of the bundled trained model, for every KV cache format.

The bundled checkpoint is exported once (fp32 weights and PLE, so only the cache differs); the held-out text
is scored in windows of the model's whole context (512 tokens) through the cache: every token reads the recent
ones before it exactly and older ones from their codes, as in generation, however the window is chunked. Prints a markdown table: perplexity, its change against fp16, top-1 agreement with fp16, and the
format's stored bytes per token relative to fp16 at the bundled model's head sizes.

    python tools/kv_quality.py [--recent 0 32] [--sliding same|fp32] [--formats fp16 tq3.5 ...] [--json F]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import edge_runtime
from edge_runtime.bundled import BUNDLED_CHECKPOINT
from edge_runtime.export import export_checkpoint
from edge_runtime.kv_formats import KV_FORMATS, kv_format
from edge_runtime.perplexity import evaluate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--formats", nargs="+", default=list(KV_FORMATS), choices=list(KV_FORMATS))
    parser.add_argument("--recent", nargs="+", type=int, default=[0], help="kv_recent values to try")
    parser.add_argument("--sliding", default="same", help="KV format of the sliding layers: same (the format "
                        "measured, the default) or a format name (the runtime's default is fp16)")
    parser.add_argument("--json", type=Path, help="also write the rows to this file")
    args = parser.parse_args()
    text = (BUNDLED_CHECKPOINT / "heldout.txt").read_text()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        artifact = export_checkpoint(BUNDLED_CHECKPOINT, Path(tmp) / "fp32", weights="fp32", ple="fp32")
        base = evaluate(edge_runtime.load(artifact, kv="fp16", kv_sliding="fp16"), text, with_argmax=True)
        spec = edge_runtime.load(artifact).spec
        dims = sorted({spec.head_dims[i] for i in spec.cache_layers()})
        print(f"held-out text: {base.tokens} tokens in windows of {base.context}; "
              f"head sizes {dims}; sliding layers: {args.sliding}\n\n"
              "| KV format | recent | perplexity | vs fp16 | top-1 agreement | bytes vs fp16 |\n"
              "| --------- | -----: | ---------: | ------: | --------------: | ------------: |")
        for name in args.formats:
            for recent in args.recent:
                sliding = name if args.sliding == "same" else args.sliding
                model = edge_runtime.load(artifact, kv=name, kv_recent=recent, kv_sliding=sliding)
                result = evaluate(model, text, with_argmax=True)
                size = sum(kv_format(name).bytes_per_token(d) for d in dims) / sum(4 * d for d in dims)
                row = {"kv": name, "recent": recent, "perplexity": result.perplexity,
                       "change": result.perplexity / base.perplexity - 1,
                       "top1_agreement": float((result.argmax == base.argmax).mean()), "bytes_vs_fp16": size,
                       "tokens": result.tokens}
                rows.append(row)
                print(f"| {name} | {recent} | {row['perplexity']:.3f} | {row['change']:+.2%} "
                      f"| {row['top1_agreement']:.4f} | {size:.3f} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
