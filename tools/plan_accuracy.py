"""How close the memory planner's predicted peak RSS comes to the one `edge-runtime bench` measures.

For each artifact x context x KV format, runs `edge-runtime bench -p 0 -n 16 -r 1 -d CONTEXT --probe-mb 64` in a
subprocess (one at a time: two would share the cores, and each measures its own peak), and compares its
peak_rss_bytes (read before the bandwidth probe allocates, see bench.py) with `plan_memory(...).peak_bytes` at the
context the bench reached (depth + 1 + 16). The planned PLE pages and KV cache are printed next to the measured ones.

Each run starts from the same page-cache state: the artifact's hashes are checked here first (so the bench's load
does not read the whole artifact, integrity.py), then ple.bin is dropped from the page cache, as after a reboot.
A page cache holding ple.bin in large folios (right after export or a copy) maps whole folios per row: more
resident pages, clean ones the kernel reclaims under pressure, which the planner does not count.

With --checkpoint, also plans the checkpoint in the first artifact's formats and checks every item equals the
artifact's plan (the checkpoint is planned from shapes; the artifact brings its manifest).

    python tools/plan_accuracy.py /work/big/e2b-int4 /work/big/e2b-int8 --checkpoint /work/big/ckpt-e2b
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

from edge_runtime.artifact import read_manifest
from edge_runtime.integrity import check_artifact
from edge_runtime.planner import plan_memory
from edge_runtime.profiles import load_profile

N_GEN = 16
MIB = 1 << 20


def _drop_page_cache(path: Path) -> None:
    """Evict a file's clean, unmapped pages from the page cache (no privileges needed)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def measure(artifact: Path, depth: int, kv: str, profile: str) -> dict:
    """One bench run and the plan of what it ran."""
    manifest = read_manifest(artifact)
    check_artifact(artifact, manifest)
    _drop_page_cache(artifact / manifest.ple_store.file)
    command = [sys.executable, "-m", "edge_runtime", "bench", "-m", str(artifact), "-p", "0", "-n", str(N_GEN),
               "-r", "1", "-d", str(depth), "--probe-mb", "64", "--kv", kv, "--json"]
    run = subprocess.run(command, capture_output=True, text=True)
    if run.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{run.stderr}")
    bench = json.loads(run.stdout)
    plan = plan_memory(artifact, load_profile(profile), bench["context"], kv=kv)
    items = dict(plan.items)
    return {"artifact": str(artifact), "weights": plan.weights, "depth": depth, "context": bench["context"], "kv": kv,
            "predicted_peak_bytes": plan.peak_bytes, "measured_peak_bytes": bench["peak_rss_bytes"],
            "error": plan.peak_bytes / bench["peak_rss_bytes"] - 1,
            "predicted_ple_bytes": items["PLE pages at context"], "measured_ple_bytes": bench["ple_resident_bytes"],
            "predicted_kv_bytes": items["KV cache at context"], "measured_kv_bytes": bench["kv_cache_bytes"],
            "items": plan.items, "command": " ".join(command[2:])}


def checkpoint_matches(checkpoint: Path, artifact: Path, profile: str, context: int) -> dict:
    """Plan the checkpoint as it would be exported in the artifact's formats; both plans must agree item by item."""
    formats = read_manifest(artifact).formats
    base = load_profile(profile)
    as_exported = dataclasses.replace(base, weights=formats["weights"], block_size=int(formats["block_size"]),
                                      ple=formats["ple"])
    planned, exported = plan_memory(checkpoint, as_exported, context), plan_memory(artifact, base, context)
    return {"checkpoint": str(checkpoint), "artifact": str(artifact), "context": context,
            "checkpoint_items": planned.items, "artifact_items": exported.items,
            "equal": planned.items == exported.items}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifacts", nargs="+", type=Path)
    parser.add_argument("--contexts", nargs="+", type=int, default=[2048, 8192], help="bench depths (-d)")
    parser.add_argument("--kv", nargs="+", default=["fp16", "tq3.5"])
    parser.add_argument("--profile", default="x86_64-dev", help="any: the peak does not depend on the profile")
    parser.add_argument("--checkpoint", type=Path, help="also check the checkpoint's plan against the first artifact's")
    parser.add_argument("--json", type=Path, help="also write every figure here")
    args = parser.parse_args(argv)

    rows = []
    print("| artifact | context | kv | predicted | measured | error | PLE planned / measured | KV planned / measured |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for artifact in args.artifacts:
        for depth in args.contexts:
            for kv in args.kv:
                r = measure(artifact, depth, kv, args.profile)
                rows.append(r)
                print(f"| {artifact.name} | {r['context']} | {kv} | {r['predicted_peak_bytes'] / MIB:.0f} MiB | "
                      f"{r['measured_peak_bytes'] / MIB:.0f} MiB | {r['error']:+.1%} | "
                      f"{r['predicted_ple_bytes'] / MIB:.0f} / {r['measured_ple_bytes'] / MIB:.0f} MiB | "
                      f"{r['predicted_kv_bytes'] / MIB:.1f} / {r['measured_kv_bytes'] / MIB:.1f} MiB |", flush=True)
    result: dict = {"runs": rows, "worst_error": max(abs(r["error"]) for r in rows)}
    print(f"\nworst error {result['worst_error']:.1%}")
    if args.checkpoint:
        check = checkpoint_matches(args.checkpoint, args.artifacts[0], args.profile, max(args.contexts))
        result["checkpoint"] = check
        print(f"checkpoint {args.checkpoint} planned as {args.artifacts[0].name} at context {check['context']}: "
              + ("every item equal" if check["equal"] else f"differs: {check['checkpoint_items']} vs "
                 f"{check['artifact_items']}"))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0 if not args.checkpoint or result["checkpoint"]["equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
