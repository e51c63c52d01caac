"""KV cache bytes per token and at long contexts for every KV format, at the real Gemma 4 E2B/E4B shapes.

Counts everything a format stores (codes, norms, scales) in every cache layer: full-attention layers grow
with the context, sliding layers stop at their 512-token window, KV-shared layers store nothing.

    python tools/kv_sizes.py [--model e2b|e4b] [--recent 0]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from edge_runtime.families import spec_from_hf_config
from edge_runtime.kv_formats import KV_FORMATS

CONFIGS = Path(__file__).resolve().parent / "configs"
CONTEXTS = (2048, 8192, 32768, 131072)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["e2b", "e4b"], default="e2b")
    parser.add_argument("--recent", type=int, default=0, help="exact recent tokens per cache layer")
    args = parser.parse_args()
    spec = spec_from_hf_config(json.loads((CONFIGS / f"gemma-4-{args.model}.config.json").read_text()))
    full = [i for i in spec.cache_layers() if spec.window(spec.layer_types[i]) is None]
    per_token = {name: sum(f.bytes_per_token(spec.head_dims[i]) * spec.num_key_value_heads for i in full)
                 for name, f in KV_FORMATS.items()}
    print(f"Gemma 4 {args.model.upper()}: {len(full)} full-attention cache layers grow per token, "
          f"{len(spec.cache_layers()) - len(full)} sliding layers hold {spec.sliding_window} tokens; "
          f"recent ring {args.recent} tokens\n")
    print("| KV format | what | bytes/token (full layers) | vs fp16 | "
          + " | ".join(f"cache @ {c // 1024}k" for c in CONTEXTS) + " |\n|---|---|---:|---:|" + "---:|" * len(CONTEXTS))
    for name, f in KV_FORMATS.items():
        sizes = " | ".join(f"{f.cache_bytes(spec, c, args.recent) / 2**20:.1f} MiB" for c in CONTEXTS)
        print(f"| {name} | {f.summary} | {per_token[name]} | {per_token[name] / per_token['fp16']:.3f} | {sizes} |")


if __name__ == "__main__":
    main()
