"""What LoRA slots cost a decode step: one artifact exported with `--lora-slots`, run with no adapter and with one,
against the same model exported without slots, alternating in one process so that a shared machine's drift falls
on all three alike.

    python tools/lora_slot_cost.py SLOTTED.art PLAIN.art ADAPTER_DIR --rounds 6 --steps 16

Each round runs `steps` decode steps (one token each, from a fresh cache) in each configuration and keeps every
step's time; the report gives each configuration's median and fastest step and the medians' ratio to no slots.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

import edge_runtime


def _steps(model, steps: int, rng: np.random.Generator) -> list[float]:
    model.reset()
    times = []
    for token in rng.integers(3, model.spec.input_vocab_size, steps):
        start = time.perf_counter()
        model.feed(np.asarray([token]))
        times.append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("slotted", type=Path)
    parser.add_argument("plain", type=Path)
    parser.add_argument("adapter", type=Path)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=16)
    args = parser.parse_args(argv)
    slotted, plain = edge_runtime.load(args.slotted), edge_runtime.load(args.plain)
    slotted.read_adapter(args.adapter)
    rng = np.random.default_rng(0)
    times: dict[str, list[float]] = {"no slots": [], "slots, no adapter": [], "slots, adapter": []}
    _steps(plain, 2, rng), _steps(slotted, 2, rng)  # first runs' set-up
    for _ in range(args.rounds):
        times["no slots"] += _steps(plain, args.steps, rng)
        slotted.set_adapter(None)
        times["slots, no adapter"] += _steps(slotted, args.steps, rng)
        slotted.set_adapter(args.adapter)
        times["slots, adapter"] += _steps(slotted, args.steps, rng)
    base = statistics.median(times["no slots"])
    report = {name: {"median_ms": statistics.median(t) * 1e3, "min_ms": min(t) * 1e3,
                     "median_vs_no_slots": statistics.median(t) / base, "steps": len(t)} for name, t in times.items()}
    report["adapter_bytes_per_token"] = sum(a.nbytes for feeds in slotted.engine.slot_feeds for a in feeds.values())
    report["model_bytes_per_token"] = plain.manifest.bytes_per_token
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
