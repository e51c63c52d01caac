"""Held-out perplexity and top-1 agreement with fp32 of the bundled trained model, for weight recipes x PLE formats.

Exports the bundled checkpoint once per combination into a temporary directory, scores the bundled held-out
text (edge_runtime.perplexity: windows of the model's 512-token context through the KV cache), and prints a
markdown table: perplexity, its change against fp32 weights + fp32 PLE, the fraction of positions whose top-1
token equals fp32's, and the bytes of weights one decode step reads (the graphs' weights and an embedding row).

    python tools/quality_table.py [--weights int8 int4:128 int4-mixed:32 ...] [--ple fp32 ...] [--json quality.json]

A weight recipe is what `export --weights` takes (edge_runtime/weight_recipe.py), its int4 block after a colon.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import edge_runtime
from edge_runtime.artifact import read_manifest
from edge_runtime.bundled import BUNDLED_CHECKPOINT
from edge_runtime.export import export_checkpoint
from edge_runtime.perplexity import evaluate
from edge_runtime.weight_recipe import weights_label

WEIGHTS = ["fp32", "fp16", "int8", "int4:32", "int4:64", "int4:128", "int4-mixed:32", "int4-mixed:128"]
PLE = ["fp32", "fp16", "int8", "int4", "tq4", "tq3", "tq2"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", nargs="+", default=WEIGHTS, help="weight recipes, RECIPE[:BLOCK] (default: all)")
    parser.add_argument("--ple", nargs="+", default=PLE, help="PLE formats (default: all)")
    parser.add_argument("--json", type=Path, help="also write the rows to this file")
    args = parser.parse_args()
    text = (BUNDLED_CHECKPOINT / "heldout.txt").read_text()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base_path = export_checkpoint(BUNDLED_CHECKPOINT, Path(tmp) / "base", weights="fp32", ple="fp32")
        base = evaluate(edge_runtime.load(base_path), text, with_argmax=True)
        print(f"held-out text: {base.tokens} tokens scored; fp32 weights and PLE: perplexity {base.perplexity:.3f}\n\n"
              "| weights | PLE | perplexity | vs fp32 | top-1 agreement | weights read per token |\n"
              "| ------- | --- | ---------: | ------: | --------------: | ---------------------: |")
        for i, spec in enumerate(args.weights):
            weights, _, block = spec.partition(":")
            for ple in args.ple:
                path = export_checkpoint(BUNDLED_CHECKPOINT, Path(tmp) / f"{i}-{ple}", weights=weights,
                                         block_size=int(block or 32), ple=ple)
                result = evaluate(edge_runtime.load(path), text, with_argmax=True)
                manifest = read_manifest(path)
                read = manifest.read_per_token["weights"] + manifest.read_per_token["embedding_row"]
                row = {"weights": weights_label(manifest.formats["weights"], manifest.weight_recipe.block_size),
                       "recipe": manifest.formats["weights"], "ple": ple, "perplexity": result.perplexity,
                       "change": result.perplexity / base.perplexity - 1,
                       "top1_agreement": float((result.argmax == base.argmax).mean()), "tokens": result.tokens,
                       "weights_bytes": read}
                rows.append(row)
                print(f"| {row['weights']} | {ple} | {row['perplexity']:.3f} | {row['change']:+.2%} "
                      f"| {row['top1_agreement']:.4f} | {read / 2**20:.2f} MiB |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
