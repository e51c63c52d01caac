"""How close the cost model's estimate (edge_runtime/cost_model.py) comes to what `edge-runtime bench` measures here.

For each artifact, runs `edge-runtime bench -m ART -p P -n N -r R --json` (prefill and decode at depth 0) and, for
each --depth D, `edge-runtime bench -m ART -p 0 -n N -r 1 -d D --json`, one at a time in a subprocess, each only
once the machine is quiet (1-minute load average below --max-load; it waits and re-checks otherwise, since a
busy machine gives meaningless figures). Then prints, for every test, the measured tokens/s, the estimate for the
profile (by default x86_64-dev, this machine's facts) and their ratio, and the estimate with the run's own probed
bandwidth instead of the profile's. "implied" is the efficiency that would have made the estimate exact: what to
put in cost_model.py when kernels change (decode: DECODE_EFFICIENCY at depth 0; prefill: PREFILL_EFFICIENCY). A
deep test implies ATTENTION_VALUES_PER_CYCLE (float KV) or PACKED_VALUES_PER_CYCLE (packed codes) from the step's
growth over the weights' estimated time, which carries the weights' error with it: the constants themselves come
from the kernel's own time (tools/attention_bench.py).

A decode test of N tokens after depth D reads the cache at D+1 ... D+N tokens: its estimate is N over the summed
estimated step times at those contexts, as the bench divides N by the time of the N steps.

    python tools/cost_model_check.py /work/big/e2b-int4-b128.art /work/big/e2b-int8.art --depth 2048 --json > run.json
    python tools/cost_model_check.py --results run.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import onnxruntime

from edge_runtime import cost_model
from edge_runtime.artifact import read_manifest
from edge_runtime.cost_model import estimate
from edge_runtime.integrity import check_artifact
from edge_runtime.kv_formats import AttentionReads, kv_format
from edge_runtime.model import DEFAULT_PREFILL_CHUNK
from edge_runtime.model_spec import ModelSpec
from edge_runtime.planner import linear_macs, read_per_token_by_format
from edge_runtime.profiles import Profile, load_profile


def lscpu() -> tuple[str, list[str]]:
    """This CPU's model name and its SIMD flags (the ones that choose onnxruntime's int8 kernels)."""
    text = Path("/proc/cpuinfo").read_text()
    name = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")),
                platform.processor() or platform.machine())
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines()
                  if line.startswith(("flags", "Features"))), [])
    simd = [f for f in flags if f.startswith(("avx", "sse4", "fma", "f16c", "asimd", "sve", "i8mm", "amx"))]
    return name, simd


def wait_until_quiet(max_load: float, poll: float) -> float:
    """Block until the 1-minute load average is below `max_load`; return it."""
    while (load := os.getloadavg()[0]) >= max_load:
        print(f"load {load:.2f} >= {max_load}: waiting {poll:.0f} s", file=sys.stderr, flush=True)
        time.sleep(poll)
    return load


def bench(artifact: Path, args: list[str], max_load: float, poll: float) -> dict:
    command = [sys.executable, "-m", "edge_runtime", "bench", "-m", str(artifact), *args, "--json"]
    load = wait_until_quiet(max_load, poll)
    print(f"load {load:.2f}: {' '.join(command[1:])}", file=sys.stderr, flush=True)
    run = subprocess.run(command, capture_output=True, text=True)
    if run.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{run.stderr}")
    result = {**json.loads(run.stdout), "load_before": load, "load_after": os.getloadavg()[0]}
    for test in result["tests"]:
        print(f"  {test['test']}: {test['tokens_per_second']:.2f} t/s (probe {result['bandwidth_gb_s']:.1f} GB/s, "
              f"load after {result['load_after']:.2f})", file=sys.stderr, flush=True)
    return result


def compare(result: dict, profile_name: str) -> list[dict]:
    """One row per test: measured, estimated (profile bandwidth, then the run's), ratio, implied efficiency."""
    manifest = read_manifest(Path(result["model"]))
    spec, formats = manifest.spec, result["formats"]
    profile = load_profile(profile_name)
    probed = replace(profile, sustained_gb_s=result["bandwidth_gb_s"])
    kw = dict(weights=formats["weights"], block_size=int(formats.get("block_size") or 0), ple=formats["ple"],
              kv=formats["kv"], kv_recent=formats["kv_recent"], kv_sliding=formats["kv_sliding"])
    rows = []
    for test in result["tests"]:
        depth = test["depth"]
        row = {"artifact": Path(result["model"]).name, "weights": formats["weights"], "test": test["test"],
               "measured": test["tokens_per_second"], "probe_gb_s": result["bandwidth_gb_s"],
               "load_before": result["load_before"], "load_after": result["load_after"]}
        for label, p in (("estimate", profile), ("estimate_at_probe", probed)):
            if test["n_gen"]:
                contexts = range(depth + 1, depth + test["n_gen"] + 1)
                e = estimate(spec, p, contexts=contexts, **kw)
                row[label] = len(contexts) / sum(1 / d.tokens_per_second for d in e.decode)
            else:
                e = estimate(spec, p, contexts=(depth + test["n_prompt"],), prompt_tokens=test["n_prompt"], **kw)
                row[label] = e.prefill_tokens_per_second
        row["ratio"] = row["estimate"] / row["measured"]
        row["implied"] = implied(spec, profile, kw, depth, test)
        rows.append(row)
    return rows


def implied(spec: ModelSpec, profile: Profile, kw: dict, depth: int, test: dict) -> dict:
    """The constant that makes this test's estimate exact, the others as cost_model.py has them, at the bandwidth
    the estimate uses (the profile's). For a recipe mixing formats the implied efficiency is their blend."""
    rate, measured = cost_model.bandwidth(profile)[0] * 1e9, test["tokens_per_second"]
    if not test["n_gen"]:
        every, last = linear_macs(spec)
        n = test["n_prompt"]
        macs = n * every + -(-n // DEFAULT_PREFILL_CHUNK) * last
        peak = profile.threads * profile.int8_macs_per_cycle * profile.clock_ghz * 1e9
        return {"PREFILL_EFFICIENCY": macs * measured / n / peak}
    fmt, sliding = kv_format(kw["kv"]), kv_format(kw["kv_sliding"])
    reads = [fmt.attention_reads(spec, c, kw["kv_recent"], sliding)
             for c in range(depth + 1, depth + test["n_gen"] + 1)]
    kv_bytes, kv_values, kv_packed = (sum(column) / len(reads) for column in zip(*reads))
    by_format = read_per_token_by_format(spec, kw["weights"], kw["block_size"], kw["ple"])
    model_bytes = sum(by_format.values())
    step = 1 / measured
    if not depth:  # the cache is a few tokens: the step is the weights' read
        weights_time = step - max(kv_bytes / rate, cost_model.attention_arithmetic(
            AttentionReads(kv_bytes, kv_values, kv_packed), profile))
        return {"DECODE_EFFICIENCY": model_bytes / rate / weights_time if weights_time > 0 else None}
    read_time = sum(n / (cost_model.DECODE_EFFICIENCY[name] * rate) for name, n in by_format.items())
    cycles = (step - read_time) * profile.threads * profile.clock_ghz * 1e9  # the attention's, if arithmetic-bound
    if not kv_packed:
        return {"ATTENTION_VALUES_PER_CYCLE": kv_values / cycles if cycles > 0 else None}
    packed_cycles = cycles - (kv_values - kv_packed) / cost_model.ATTENTION_VALUES_PER_CYCLE
    return {"PACKED_VALUES_PER_CYCLE": kv_packed / packed_cycles if packed_cycles > 0 else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifacts", nargs="*", type=Path)
    parser.add_argument("--kv", default="fp16", help="KV cache format of every run (bench's --kv)")
    parser.add_argument("--results", type=Path, help="compare the bench results of an earlier --json output again "
                        "(after cost_model.py changed) instead of running the bench")
    parser.add_argument("--profile", default="x86_64-dev", help="the profile describing this machine")
    parser.add_argument("-p", "--n-prompt", default="128")
    parser.add_argument("-n", "--n-gen", default="32")
    parser.add_argument("-r", "--repetitions", default="3")
    parser.add_argument("--depth", default="2048", help="comma-separated depths of the extra decode runs; 0 for none")
    parser.add_argument("--max-load", type=float, default=1.0)
    parser.add_argument("--poll", type=float, default=30.0, help="seconds between load checks while busy")
    parser.add_argument("--json", action="store_true", help="print the rows and the raw bench results as JSON")
    args = parser.parse_args()

    results = json.loads(args.results.read_text())["bench"] if args.results else []
    for artifact in args.artifacts:
        check_artifact(artifact, read_manifest(artifact))  # hashed once here, not inside the timed runs
        kv = ["--kv", args.kv]
        results.append(bench(artifact, ["-p", args.n_prompt, "-n", args.n_gen, "-r", args.repetitions, *kv],
                             args.max_load, args.poll))
        for depth in (int(d) for d in args.depth.split(",") if int(d)):
            results.append(bench(artifact, ["-p", "0", "-n", args.n_gen, "-r", "1", "-d", str(depth), *kv],
                                 args.max_load, args.poll))
    rows = [row for result in results for row in compare(result, args.profile)]
    name, simd = lscpu()
    if args.json:
        print(json.dumps({"cpu": name, "simd_flags": simd, "onnxruntime": onnxruntime.__version__,
                          "profile": args.profile, "rows": rows, "bench": results}, indent=1))
        return
    print(f"CPU: {name}; SIMD flags: {' '.join(simd)}; onnxruntime {onnxruntime.__version__}; profile {args.profile}")
    header = ["artifact", "test", "measured t/s", "estimate t/s", "estimate/measured", "at probe bw", "probe GB/s",
              "load", "implied"]
    table = [header] + [[r["artifact"], r["test"], f"{r['measured']:.2f}", f"{r['estimate']:.2f}",
                         f"{r['ratio']:.2f}", f"{r['estimate_at_probe']:.2f}", f"{r['probe_gb_s']:.1f}",
                         f"{r['load_before']:.2f}-{r['load_after']:.2f}",
                         ", ".join(f"{k} {v:.3g}" for k, v in r["implied"].items() if v is not None)]
                        for r in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    for r in table:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


if __name__ == "__main__":
    main()
