"""The side of the ARM64 check that runs the runtime: on the emulated aarch64 root, and on the host for the goldens.

    python runner.py logits ARTIFACTS OUT [CASE ...]   # per case: prefill and decode logits, 32 greedy tokens;
                                                       # runtime.json: the attention kernel build that ran
    python runner.py goldens ARTIFACTS OUT [CASE ...]  # the same, and runs with inputs perturbed by 1 ulp
    python runner.py quality ARTIFACTS OUT TOKENS      # held-out perplexity and top-1 agreement with fp32
    python runner.py kernels ARTIFACTS PROBES OUT      # CPU features, node types that ran, MatMulNBits signatures

It needs only what a kiosk installs (edge_runtime, onnxruntime, numpy), so the same file runs in both places and
the goldens come from the same code as the results they are compared with.
"""

from __future__ import annotations

import ctypes
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cases import CASES, GREEDY_TOKENS, NODE_CASES, NOISE_RUNS, PROMPT, QUALITY_CASES, Case, case

import edge_runtime
from edge_runtime import attention_kernel, engine
from edge_runtime.bundled import BUNDLED_CHECKPOINT
from edge_runtime.perplexity import evaluate

_base_options = engine._session_options


def _profiled(profile_prefix: str):
    """engine's session options with onnxruntime's profiler on, for the sessions opened next.

    A tool-side hook: the runtime has no option for it, and the check must not change what it measures."""

    def options(threads: int):
        o = _base_options(threads)
        o.enable_profiling = True
        o.profile_file_prefix = profile_prefix
        return o

    return options


def load(artifacts: Path, case: Case, profile_prefix: str | None = None) -> edge_runtime.Model:
    if profile_prefix:
        engine._session_options = _profiled(profile_prefix)
    try:
        return edge_runtime.load(artifacts / case.artifact, kv=case.kv, kv_recent=case.kv_recent,
                                 kv_sliding=case.kv_sliding, threads=1,
                                 adapter=None if case.adapter is None else artifacts / case.adapter)
    finally:
        engine._session_options = _base_options


def greedy(model: edge_runtime.Model, ids: list[int], n: int) -> list[int]:
    """n greedy tokens, EOS included (a plain loop, so that every run yields exactly n tokens to compare)."""
    model.reset()
    logits, out = model.feed(ids)[-1], []
    for _ in range(n):
        out.append(int(np.argmax(logits)))
        logits = model.feed(out[-1:])[-1]
    return out


def perturb_inputs(model: edge_runtime.Model, seed: int) -> None:
    """Make every embedding row the model reads differ by up to one float32 ulp, with a fixed seed.

    Two CPUs' float arithmetic differs by such roundings (summation order, fused multiply-adds); what that does to
    a format's logits, measured on x86 alone, is the yardstick for comparing two CPUs (compare.py)."""
    rows, rng = model.engine.embed.rows, np.random.default_rng(seed)

    def noisy(ids: np.ndarray) -> np.ndarray:
        x = rows(ids)
        return (x * (1 + np.float32(2.0 ** -23) * rng.uniform(-1, 1, x.shape).astype(np.float32))).astype(x.dtype)

    model.engine.embed.rows = noisy


def run_logits(artifacts: Path, out: Path, names: list[str], noise_runs: int = 0) -> None:
    """Each case's logits; with `noise_runs`, also that many runs with inputs perturbed by perturb_inputs."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "features.json").write_text(json.dumps(cpu_features()))
    # The attention build these logits' decode steps ran (None: numpy, the fallback when no build fits or the build
    # is stale), recorded by the process that computed them.
    kernel = attention_kernel.load()
    (out / "runtime.json").write_text(json.dumps({"attention_kernel": kernel and kernel.name}))
    for name in names:
        for run in range(1 + (noise_runs if case(name).rounds_at_run_time else 0)):
            model = load(artifacts, case(name))
            if run:
                perturb_inputs(model, seed=run)
            ids = model.encode(PROMPT)
            prefill, decode = model.logits(ids, "prefill"), model.logits(ids, "decode")
            np.savez(out / f"{name}{f'@noise{run}' if run else ''}.npz", prefill=prefill,
                     decode=decode, greedy=np.asarray(greedy(model, ids, GREEDY_TOKENS)))
        print(f"logits {name}", flush=True)


def run_quality(artifacts: Path, out: Path, tokens: int) -> None:
    """Perplexity of the first `tokens` held-out tokens per artifact, and each one's top-1 agreement with fp32.

    Only the runs whose arithmetic this CPU changes (cases.QUALITY_CASES): fp16 where it computes in half
    precision, MatMulNBits' int8-block (cases.CPU_DEPENDENT_WEIGHTS) everywhere; not int4 or int8, whose MatMulInt4
    and MatMulInt8 are x86's arithmetic on every CPU. The host (no features) runs them all."""
    features = cpu_features()
    skipped = set() if not features or features.get("fp16") else {"fp16"}
    names = [name for name in QUALITY_CASES if name not in skipped]
    text = (BUNDLED_CHECKPOINT / "heldout.txt").read_text(encoding="utf-8")
    rows, base = {}, None
    for name in names:
        model = load(artifacts, CASES[name])
        result = evaluate(model, model.encode(text)[:tokens + 1], with_argmax=True)
        base = base if base is not None else result
        rows[name] = {"perplexity": result.perplexity, "tokens": result.tokens,
                      "top1_agreement": float((result.argmax == base.argmax).mean())}
        print(f"quality {name} {result.perplexity:.3f}", flush=True)
    out.write_text(json.dumps(rows, indent=1))


def cpu_features() -> dict[str, bool]:
    """What the kernel (here: qemu) tells programs about an ARM CPU. onnxruntime reads the same auxiliary vector
    when its cpuinfo library cannot read /sys, which the check does not mount (guest_root's docstring)."""
    import platform

    if platform.machine() != "aarch64":
        return {}
    getauxval = ctypes.CDLL(None).getauxval
    getauxval.restype = ctypes.c_ulong
    hwcap, hwcap2 = getauxval(16), getauxval(26)  # AT_HWCAP, AT_HWCAP2; bits from linux/arch/arm64 hwcap.h
    return {"asimd": bool(hwcap >> 1 & 1), "fp16": bool(hwcap >> 10 & 1), "dotprod": bool(hwcap >> 20 & 1), "sve": bool(hwcap >> 22 & 1),
            "i8mm": bool(hwcap2 >> 13 & 1), "bf16": bool(hwcap2 >> 14 & 1), "sme": bool(hwcap2 >> 23 & 1)}


def node_types(artifacts: Path, case: Case, tmp: Path) -> dict[str, int]:
    """The onnxruntime kernels (node op types, after graph optimization) that ran in one decode step, from
    onnxruntime's profiler."""
    model = load(artifacts, case, profile_prefix=str(tmp / "profile"))
    model.logits(model.encode(PROMPT)[:3], "decode")
    counts: Counter[str] = Counter()
    for session in model.engine.segments:
        for event in json.loads(Path(session.end_profiling()).read_text()):
            if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
                counts[f"{event['args']['op_name']}@{event['args'].get('provider', '?')}"] += 1
    return dict(counts)


def run_kernels(artifacts: Path, probes: Path, out: Path) -> None:
    import onnxruntime as ort

    tmp = out.parent / "profiles"
    tmp.mkdir(parents=True, exist_ok=True)
    result = {"machine": __import__("platform").machine(), "onnxruntime": ort.__version__,
              "features": cpu_features(), "nodes": {}, "probes": {}}
    for name in NODE_CASES:
        result["nodes"][name] = node_types(artifacts, CASES[name], tmp)
    a = np.load(probes / "activations.npy")
    for model in sorted(probes.glob("*.onnx")):
        options = _base_options(engine.default_threads())  # the engine's own sessions' options
        session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
        k = session.get_inputs()[0].shape[-1]
        result["probes"][model.stem] = session.run(None, {"A": a[:, :k]})[0].tolist()
    out.write_text(json.dumps(result))
    print("kernels", flush=True)


def main(argv: list[str]) -> None:
    command, artifacts = argv[0], Path(argv[1])
    if command in ("logits", "goldens"):  # goldens: the x86 side, with NOISE_RUNS perturbed runs per case
        run_logits(artifacts, Path(argv[2]), argv[3:] or list(CASES), NOISE_RUNS if command == "goldens" else 0)
    elif command == "quality":
        run_quality(artifacts, Path(argv[2]), int(argv[3]))
    elif command == "kernels":
        run_kernels(artifacts, Path(argv[2]), Path(argv[3]))
    else:
        raise SystemExit(f"unknown command {command!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
