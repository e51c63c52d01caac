"""Held-out perplexity and top-1 agreement with fp32 of the bundled trained model, for every weight x PLE format.

Exports the bundled checkpoint once per combination into a temporary directory, scores the bundled held-out
text (edge_runtime.perplexity: windows of the model's 512-token context through the KV cache), and prints a
markdown table: perplexity, its change against fp32 weights + fp32 PLE, and the fraction of positions whose
top-1 token equals fp32's.

    python tools/quality_table.py [--json quality.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import edge_runtime
from edge_runtime.bundled import BUNDLED_CHECKPOINT
from edge_runtime.export import export_checkpoint
from edge_runtime.perplexity import evaluate

WEIGHTS = [("fp32", 32), ("fp16", 32), ("int8", 32), ("int4", 32), ("int4", 64), ("int4", 128)]
PLE = ["fp32", "fp16", "int8", "int4", "tq4", "tq3", "tq2"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the rows to this file")
    args = parser.parse_args()
    text = (BUNDLED_CHECKPOINT / "heldout.txt").read_text()
    rows, base = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for weights, block in WEIGHTS:
            for ple in PLE:
                path = export_checkpoint(BUNDLED_CHECKPOINT, Path(tmp) / f"{weights}-{block}-{ple}", weights=weights,
                                         block_size=block, ple=ple)
                result = evaluate(edge_runtime.load(path), text, with_argmax=True)
                if base is None:
                    base = result
                    print(f"held-out text: {result.tokens} tokens scored\n\n"
                          "| weights | PLE | perplexity | vs fp32 | top-1 agreement |\n"
                          "| ------- | --- | ---------: | ------: | --------------: |")
                row = {"weights": f"int4 b{block}" if weights == "int4" else weights, "ple": ple,
                       "perplexity": result.perplexity, "change": result.perplexity / base.perplexity - 1,
                       "top1_agreement": float((result.argmax == base.argmax).mean()), "tokens": result.tokens}
                rows.append(row)
                print(f"| {row['weights']} | {ple} | {row['perplexity']:.3f} | {row['change']:+.2%} "
                      f"| {row['top1_agreement']:.4f} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
