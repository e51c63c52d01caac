"""The ARM64 check's verdicts: which x86 run each aarch64 run is held to, how closely, and the table.

Every aarch64 run is compared with an x86 run of the same arithmetic, computed on this host at check time (x86's
own int8-block results, MLAS's, depend on the host's ISA, so checked-in numbers would go stale with the machine):
- fp32 weights and KV cache, and every PLE format: the same float arithmetic everywhere, held to 1e-4 (the parity
  bound against transformers) and identical greedy tokens.
- Kernels that round values computed at run time (the activations of int8, int4 and int8-block, KV codes): integer
  products are exact on every CPU, but fp32 rounding upstream differs by ulps between CPUs and can flip a code. How
  far that moves a format's logits is measured on x86 with inputs perturbed by one ulp (runner.perturb_inputs); see
  allowed(). int4 and int8 are edge-runtime's own MatMulInt4 and MatMulInt8, the same arithmetic on every CPU (int8
  activations per block, exact integer sums, each block's sum scaled in float32 in a fixed order): every CPU is held
  to x86 as is.
- MatMulNBits' 8-bit kernel (int8-block: cases.CPU_DEPENDENT_WEIGHTS) has two arithmetics (probes.py tells which
  ran): int8 activations per block (x86; ARM with dot-product instructions), fp32 activations (ARM without them:
  the Pi 4, compared with x86 running the artifact at accuracy level 0).
- fp16 on cores with FP16 arithmetic, which run the fp16 graph in half precision where x86 computes in fp32.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cases
import numpy as np
from probes import classify, write_probes

__all__ = ["Report", "Row", "attention_kernel_note", "fp32_activation_variant", "reference_for", "write_probes"]

EXACT_TOLERANCE = 1e-4
# A CPU's rounding differs from x86's by float32 ulps; a format whose kernels quantize activations can turn such a
# difference into a flipped code and a visibly different logit. The x86 runs with inputs perturbed by one ulp
# (runner.perturb_inputs) show how far this moves each format's logits on this prompt; an aarch64 run doing the same
# arithmetic may differ from x86 by at most NOISE_FACTOR times the largest such move (and by EXACT_TOLERANCE).
NOISE_FACTOR = 3
# fp16 arithmetic (ARM cores with FP16 vector instructions run the fp16 graph's Gemm in half precision, MLAS
# HGEMM; x86 has no fp16 kernel and computes in fp32): dot products of length K accumulate rounding of about
# sqrt(K) half-precision units; allowed: twice that, of the largest logit.
FP16_UNIT = 2.0 ** -11


@dataclass(frozen=True)
class Reference:
    """The x86 run an aarch64 case is compared with, how the allowed difference is set (kind), and its label."""

    case: str
    label: str
    kind: str  # exact | noise | fp16


def reference_for(case: str, features: dict[str, bool]) -> Reference:
    """The x86 counterpart of a case's arithmetic on a CPU with these features: where the per-CPU choice is made."""
    spec = cases.CASES[case]
    if spec.weights == "fp16" and features.get("fp16"):
        return Reference(case, "x86 (ARM computes in fp16)", "fp16")
    if spec.weights in cases.CPU_DEPENDENT_WEIGHTS and not features.get("dotprod"):
        return Reference(f"{spec.artifact}{cases.FP32_ACTIVATION_SUFFIX}", "x86, fp32 activations", "noise")
    return Reference(case, "x86", "noise" if spec.rounds_at_run_time else "exact")


def allowed(reference: Reference, path: str, x86: dict[str, dict[str, np.ndarray]], k_max: int) -> tuple[float, bool]:
    """The largest |dlogit| allowed on `path` against `reference`, and whether greedy tokens must be identical.

    `x86` holds the host's runs by name (`CASE`, `CASE@noiseN`, `ARTIFACT+fp32-activations`)."""
    golden = x86[reference.case]
    if reference.kind == "exact":
        return EXACT_TOLERANCE, True
    if reference.kind == "fp16":
        return 2 * np.sqrt(k_max) * FP16_UNIT * float(np.abs(golden[path]).max()), True
    noisy = [run for name, run in x86.items() if name.startswith(f"{reference.case}@noise")]
    if not noisy:
        raise ValueError(f"no perturbed x86 runs of {reference.case}")
    # Prefill and decode meet the same rounding steps (a flipped code), in different places: pooled, the runs
    # give a steadier yardstick than either path alone.
    moved = max(float(np.abs(run[p] - golden[p]).max()) for run in noisy for p in ("prefill", "decode"))
    stable = all((run["greedy"] == golden["greedy"]).all() for run in noisy)
    return max(NOISE_FACTOR * moved, EXACT_TOLERANCE), stable


@dataclass
class Row:
    cpu: str
    case: str
    path: str  # prefill | decode
    reference: str
    max_dlogit: float
    tolerance: float
    greedy_same: int
    greedy_required: bool
    kernels: str = ""
    members_ok: bool = True  # a row standing for several cases (Report.grouped): whether all of them are ok

    @property
    def ok(self) -> bool:
        same = self.greedy_same == cases.GREEDY_TOKENS or not self.greedy_required
        return bool(self.max_dlogit <= self.tolerance) and same and self.members_ok


def compare_case(cpu: str, case: str, result: dict[str, np.ndarray], reference: Reference,
                 x86: dict[str, dict[str, np.ndarray]], k_max: int, features: dict[str, bool] | None = None) -> list[Row]:
    golden = x86[reference.case]
    same = int((result["greedy"] == golden["greedy"]).sum())
    rows = []
    for path in ("prefill", "decode"):
        tolerance, required = allowed(reference, path, x86, k_max)
        rows.append(Row(cpu, case, path, reference.label, float(np.abs(result[path] - golden[path]).max()),
                        tolerance, same, required, kernel_summary(case, features) if features else ""))
    return rows


def fp32_activation_variant(artifact: Path, out: Path) -> Path:
    """A copy of an int8-block artifact whose MatMulNBits nodes compute in fp32 (accuracy level 0), the manifest's
    hashes updated: what a CPU without dot-product instructions computes, run on x86 (host side: needs onnx)."""
    import onnx

    from edge_runtime.artifact import MANIFEST, file_entry

    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(artifact, out)
    manifest = json.loads((out / MANIFEST).read_text())
    for graph in out.glob("*.onnx"):
        model = onnx.load(str(graph), load_external_data=False)
        for node in model.graph.node:
            for attribute in node.attribute:
                if node.op_type == "MatMulNBits" and attribute.name == "accuracy_level":
                    attribute.i = 0
        onnx.save(model, str(graph))
        manifest["files"][graph.name] = file_entry(graph)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return out


def _load(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    cpus: dict[str, dict] = field(default_factory=dict)
    notes: list[tuple[str, bool]] = field(default_factory=list)  # (line, ok)

    @classmethod
    def collect(cls, work: Path, cpus: list[str], names: list[str], results: list[dict]) -> Report:
        report = cls()
        x86 = {p.stem: _load(p) for p in (work / "x86" / "logits").glob("*.npz")}
        k_max = _widest_matmul(work / "artifacts" / "fp32")
        host_kernels = _json(work / "x86" / "kernels.json")
        for cpu, result in zip(cpus, results):
            features = _json(work / cpu / "logits" / "features.json") or {}
            kernels = _json(work / cpu / "kernels.json")
            probes = probe_signatures(work / "probes", kernels) if kernels else {}
            report.cpus[cpu] = {"qemu": cases.CPUS[cpu][0], "stands_for": cases.CPUS[cpu][1], "features": features,
                                "probes": probes, "nodes": (kernels or {}).get("nodes", {}),
                                "quality": _json(work / cpu / "quality.json"), **result}
            for name in names:
                reference = reference_for(name, features)
                got = _load(work / cpu / "logits" / f"{name}.npz")
                report.rows += compare_case(cpu, name, got, reference, x86, k_max, features)
            loaded = (_json(work / cpu / "logits" / "runtime.json") or {}).get("attention_kernel")
            report.cpus[cpu]["attention_kernel"] = loaded
            report.notes.append(attention_kernel_note(cpu, loaded))
            for label, code, line in result.get("tests", []):
                report.notes.append((f"{cpu}: {label}: {line}", code == 0))
            if "serve" in result:
                report.notes.append((f"{cpu}: serve: {result['serve']}", result["serve"].startswith("ok")))
            if "huge_pages" in result:
                status, ok = result["huge_pages"]
                report.notes.append((f"{cpu}: the CLI's relaunch for huge pages: {status}", ok))
        host = (_json(work / "x86" / "logits" / "runtime.json") or {}).get("attention_kernel")
        report.notes.append((f"x86 goldens (this host): attention kernel {host or 'none (numpy)'}", True))
        if host_kernels:
            report.cpus["x86"] = {"probes": probe_signatures(work / "probes", host_kernels),
                                  "nodes": host_kernels["nodes"], "quality": _json(work / "x86" / "quality.json")}
        return report

    def add_devices(self, detections: list, cli_detect: list[str]) -> None:
        for device, expected, found, exact in detections:
            self.notes.append((f"profiles detect, fake {device}: {found}{' (exact)' if exact else ''}",
                               found == expected and exact))
        # Not a verdict: the root's /proc/cpuinfo is the host's, which is why detection is checked on fake roots.
        line = f"edge-runtime profiles detect in the emulated root itself, whose /proc is the host's: {' '.join(cli_detect)}"
        self.notes.append((line, True))

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.rows) and all(ok for _, ok in self.notes)

    def grouped(self) -> list[Row]:
        """Rows with the PLE cases and the KV cases each folded into one row per CPU and path: the member nearest
        its allowance (largest difference over allowed), the fewest equal tokens; ok when every member is."""
        groups: dict[tuple[str, str, str], list[Row]] = {}
        for r in self.rows:
            group = "PLE int8, int4, tq4, tq3, tq2" if r.case.startswith("ple-") else (
                f"KV: all {len(cases.KV_FORMATS)} formats, no exact tokens" if r.case.startswith("kv-") else r.case)
            groups.setdefault((r.cpu, group, r.path), []).append(r)
        out = []
        for (_, group, _), members in groups.items():
            nearest = max(members, key=lambda r: r.max_dlogit / r.tolerance)
            out.append(Row(**{**asdict(nearest), "case": group,
                              "greedy_same": min(r.greedy_same for r in members),
                              "members_ok": all(r.ok for r in members)}))
        return out

    def format(self, group: bool = True) -> str:
        lines = ["| CPU model | format | path | compared with | max abs dlogit | allowed | greedy same /32 | kernel | ok |",
                 "|---|---|---|---|---:|---:|---:|---|---|"]
        for r in self.grouped() if group else self.rows:
            lines.append(f"| {r.cpu} | {r.case} | {r.path} | {r.reference} | {r.max_dlogit:.2e} | {r.tolerance:.2g} | "
                         f"{r.greedy_same}{'' if r.greedy_required else ' (not required)'} | {r.kernels} | "
                         f"{'yes' if r.ok else '**NO**'} |")
        quality = {cpu: info["quality"] for cpu, info in self.cpus.items() if info.get("quality")}
        if quality:
            lines += ["", "| CPU model | artifact | perplexity | vs fp32 | top-1 agreement with fp32 |",
                      "|---|---|---:|---:|---:|"]
            for cpu, rows in quality.items():
                base = rows["fp32"]["perplexity"]
                for name, q in rows.items():
                    lines.append(f"| {cpu} | {name} | {q['perplexity']:.3f} | {q['perplexity'] / base - 1:+.2%} | "
                                 f"{q['top1_agreement']:.4f} |")
        x86_nodes = self.cpus.get("x86", {}).get("nodes", {})
        for cpu, info in self.cpus.items():
            if info.get("probes") and cpu != "x86":
                lines.append("")
                features = [name for name, on in (info.get("features") or {}).items() if on]
                lines.append(f"{cpu} ({', '.join(features)}): 8-bit MatMulNBits probes: " + "; ".join(
                    f"{k} -> {v[0]}" for k, v in info["probes"].items()))
                for fmt, nodes in info["nodes"].items():
                    ours, theirs = {n.split("@")[0] for n in nodes}, {n.split("@")[0] for n in x86_nodes.get(fmt, [])}
                    if ours != theirs:
                        extra = f"; x86 ran {', '.join(sorted(theirs - ours))} instead" if theirs - ours else ""
                        lines.append(f"{cpu}: {fmt} ran {', '.join(sorted(ours - theirs)) or 'no extra'} node(s) that "
                                     f"x86 did not{extra}")
        lines += [""] + [f"{'ok' if ok else 'FAILED'}: {line}" for line, ok in self.notes]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"rows": [asdict(r) | {"ok": r.ok} for r in self.rows], "cpus": self.cpus,
                "notes": [{"line": line, "ok": ok} for line, ok in self.notes], "ok": self.ok}


def attention_kernel_note(cpu: str, loaded: str | None) -> tuple[str, bool]:
    """Which attention build ran the guest's decode steps: the CPU's own (cases.ATTENTION_KERNELS), or a failure.
    numpy's fallback computes the same attention (the kernel tests hold them to 2e-6), so the logits alone would let
    a build missing from the wheel, or stale, pass unseen."""
    expected = cases.ATTENTION_KERNELS[cpu]
    if loaded == expected:
        return f"{cpu}: attention kernel {loaded} loaded (edge_runtime.attention_kernel.load().name)", True
    if loaded is None:
        return (f"{cpu}: no attention kernel loaded, numpy ran attention: attention-{expected}.so is "
                "missing from the installed package or was built from another attention.c (python "
                "tools/build_kernels.py --check)"), False
    return f"{cpu}: attention kernel {loaded} loaded, expected {expected}", False


def _widest_matmul(artifact: Path) -> int:
    """The longest dot product of the model's matmuls (hidden size, or the widest MLP)."""
    config = json.loads((artifact / "manifest.json").read_text())["model"]["config"]
    return max(config["hidden_size"], config["intermediate_size"] * (2 if config.get("use_double_wide_mlp") else 1))


def _json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def probe_signatures(probes: Path, kernels: dict) -> dict[str, tuple[str, dict[str, float]]]:
    a = np.load(probes / "activations.npy")
    out = {}
    for key, output in kernels["probes"].items():
        weights = _load(probes / f"{key}.npz")
        k = int(key.split("_")[1][1:])
        out[key] = classify(np.asarray(output, np.float64), weights["codes"], weights["scale"], a[:, :k])
    return out


def kernel_summary(case: str, features: dict[str, bool]) -> str:
    """The kernel a case's matmuls ran on this CPU: for onnxruntime's nodes, MLAS's dispatch by CPU feature
    (onnxruntime's mlas/lib/platform.cpp, qnbitgemm_kernel_neon.cpp), confirmed for int8-block by the probes'
    arithmetic; for int4 and int8, the build of edge-runtime's operators the CPU loads (edge_runtime.onnxruntime_ops.
    BUILDS: aarch64-dotprod with dotprod, aarch64 without). The onnxruntime profiler's node list shows every format's node
    types."""
    weights = cases.CASES[case].weights
    if weights == "int8-block":
        if not features.get("dotprod"):
            return "MatMulNBits 8-bit: weights widened to fp32 every run, SGEMM (fp32 activations)"
        return f"MatMulNBits 8-bit: MLAS, int8 per block, {'i8mm' if features.get('i8mm') else 'udot'}"
    if weights in ("int4", "int8"):
        instruction = "sdot" if features.get("dotprod") else "smull"
        operator = "MatMulInt4" if weights == "int4" else "MatMulInt8"
        return f"{operator}: edge-runtime's own, int8 activations per block, {instruction}"
    if weights == "fp16" and features.get("fp16"):
        return "Cast + Gemm: MLAS half-precision GEMM (fp16)"
    return "Gemm: MLAS SGEMM (NEON)"
