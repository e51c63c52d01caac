"""Decode steps of one artifact with several KV cache formats, side by side in one process.

    python tools/kv_step_compare.py -m ARTIFACT --depth 8192 --kv fp16 tq3.5 [--rounds 6] [--steps 10]

Each format gets its own model, its cache filled to the same depth by Model.fill_cache, as `bench --fill` does (one
prefilled chunk repeated: seconds instead of a prefill's minutes at 32k); then the formats take turns, `--steps`
decode steps each, for `--rounds` rounds. Per round it prints each format's median step and its attention's time per
step (every layer's decode attention, DecodeAttention, timed around its call), and at the end each format's median
over the rounds and in how many rounds it was the fastest. On a shared machine one process's run and the next differ
by more than formats do (this 2-core VM: the same E2B weights 58-88 ms a step between processes); rounds within one
process see the same slow spells.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import edge_runtime  # before numpy: it keeps OpenBLAS to one thread (edge_runtime/__init__.py), as the CLI does

# isort: split
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_profile import cpu_name, decode_steps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-m", "--model", type=Path, required=True)
    parser.add_argument("-d", "--depth", type=int, required=True)
    parser.add_argument("--kv", nargs="+", required=True, help="KV formats to compare")
    parser.add_argument("-t", "--threads", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()

    from edge_runtime import attention, attention_kernel

    spent: dict[str, float] = defaultdict(float)
    turn = [""]
    call = attention.DecodeAttention.__call__

    def timed(self, stored: int) -> None:
        start = time.perf_counter()
        call(self, stored)
        spent[turn[0]] += time.perf_counter() - start

    attention.DecodeAttention.__call__ = timed
    models = {}
    for kv in args.kv:
        model = edge_runtime.load(args.model, threads=args.threads, kv=kv,
                                  context_length=args.depth + (args.rounds + 1) * args.steps + 16)
        model.fill_cache(args.depth, np.random.default_rng(0))
        decode_steps(model, 2)
        models[kv] = model
    kernel = attention_kernel.load()
    print(f"{cpu_name()}; {args.model} depth {args.depth}; attention kernel "
          f"{kernel.name if kernel else 'none (numpy)'}")
    steps, attends, wins = defaultdict(list), defaultdict(list), defaultdict(int)
    for r in range(args.rounds):
        for kv, model in models.items():
            turn[0] = kv
            spent[kv] = 0.0
            steps[kv].append(statistics.median(decode_steps(model, args.steps)) * 1e3)
            attends[kv].append(spent[kv] / args.steps * 1e3)
            print(f"round {r} {kv:10s} step {steps[kv][-1]:8.2f} ms  attention {attends[kv][-1]:7.2f} ms/step",
                  flush=True)
        wins[min(models, key=lambda k: attends[k][-1])] += 1
    for kv in models:
        print(f"{kv:10s} median step {statistics.median(steps[kv]):.2f} ms, attention "
              f"{statistics.median(attends[kv]):.2f} ms/step (range {min(attends[kv]):.2f}-{max(attends[kv]):.2f}), "
              f"fastest attention in {wins[kv]} of {args.rounds} rounds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
