"""What LoRA slots cost a decode step: one artifact exported with `--lora-slots`, run with no adapter and with each
adapter given, against the same model exported without slots.

    python tools/lora_slot_cost.py SLOTTED.art PLAIN.art ADAPTER_DIR [ADAPTER_DIR ...] --processes 6

Where a model's weights land decides its speed by several percent, differently at each load (on this project's
2-core VM the same artifact loaded twice into one process ran its graphs 1-4% apart, and two artifacts 10% apart
either way from one process to the next), while the slots cost a few. So one process's figures say little: each of
`--processes` fresh processes loads the plain model twice (the second load is the control, which costs nothing by
construction and so shows the spread a load alone brings) and the slotted one, in an order that turns with the
process, then runs `--rounds` rounds of `--steps` decode steps (one token each, from a fresh cache) in every
configuration in turn. The report gives, per configuration, each process's median step against its plain model's,
and the median of those ratios over the processes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import edge_runtime  # before numpy: it keeps OpenBLAS to one thread (edge_runtime/__init__.py), as the CLI does

# isort: split
import numpy as np

NO_SLOTS, CONTROL, EMPTY = "no slots", "no slots, loaded again (control)", "slots, no adapter"


def _steps(model, steps: int, rng: np.random.Generator) -> list[float]:
    model.reset()
    times = []
    for token in rng.integers(3, model.spec.input_vocab_size, steps):
        start = time.perf_counter()
        model.feed(np.asarray([token]))
        times.append(time.perf_counter() - start)
    return times


def _one_process(args: argparse.Namespace) -> dict:
    """One process's medians (ms) per configuration, and the bytes each adapter feeds the slots per token."""
    paths = [args.plain, args.plain, args.slotted]
    order = [(k + args.turn) % 3 for k in range(3)]
    loaded = {k: edge_runtime.load(paths[k]) for k in order}
    plain, control, slotted = loaded[0], loaded[1], loaded[2]
    for adapter in args.adapters:
        slotted.read_adapter(adapter)
    rng = np.random.default_rng(args.turn)
    runs: list[tuple[str, object, Path | None]] = [(NO_SLOTS, plain, None), (CONTROL, control, None),
                                                    (EMPTY, slotted, None),
                                                    *((f"slots, adapter {a}", slotted, a) for a in args.adapters)]
    times: dict[str, list[float]] = {name: [] for name, _, _ in runs}
    fed_bytes = {}
    for _, model, _ in runs[:3]:
        _steps(model, 2, rng)  # first runs' set-up
    for _ in range(args.rounds):
        for name, model, adapter in runs:
            if model is slotted:
                slotted.set_adapter(adapter)
            times[name] += _steps(model, args.steps, rng)
            if adapter is not None:
                fed_bytes[name] = sum(a.nbytes for feeds in slotted.engine.slot_feeds for a in feeds.values())
    return {"median_ms": {name: statistics.median(t) * 1e3 for name, t in times.items()},
            "adapter_bytes_per_token": fed_bytes, "model_bytes_per_token": plain.manifest.bytes_per_token}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("slotted", type=Path)
    parser.add_argument("plain", type=Path)
    parser.add_argument("adapters", type=Path, nargs="+")
    parser.add_argument("--processes", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--turn", type=int, default=None, help=argparse.SUPPRESS)  # a child process's place
    args = parser.parse_args(argv)
    if args.turn is not None:
        print(json.dumps(_one_process(args)))
        return 0
    common = [str(args.slotted), str(args.plain), *map(str, args.adapters), "--rounds", str(args.rounds),
              "--steps", str(args.steps)]
    children = []
    for turn in range(args.processes):
        out = subprocess.run([sys.executable, __file__, *common, "--turn", str(turn)], check=True,
                             capture_output=True, text=True).stdout
        children.append(json.loads(out.splitlines()[-1]))
        print(f"process {turn + 1}/{args.processes}: " + ", ".join(
            f"{name} {ms:.2f} ms" for name, ms in children[-1]["median_ms"].items()), file=sys.stderr)
    report: dict = {}
    for name in children[0]["median_ms"]:
        ratios = [c["median_ms"][name] / c["median_ms"][NO_SLOTS] for c in children]
        report[name] = {"median_ms": statistics.median(c["median_ms"][name] for c in children),
                        "vs_no_slots_median": statistics.median(ratios),
                        "vs_no_slots_per_process": [round(r, 4) for r in ratios],
                        **({"adapter_bytes_per_token": children[0]["adapter_bytes_per_token"][name]}
                           if name in children[0]["adapter_bytes_per_token"] else {})}
    report["model_bytes_per_token"] = children[0]["model_bytes_per_token"]
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
