"""The parts of tools/arm64/check that run on x86: fake device roots, which x86 run each aarch64 case is held to
and how closely, the 8-bit MatMulNBits arithmetic probes, the fp32-activation int8-block variant, the host
checks."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import inspect
import json
import re
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import edge_runtime

ARM64 = Path(__file__).resolve().parents[1] / "tools" / "arm64"
sys.path.insert(0, str(ARM64))

import cases
import compare
import devices
import guest_root
import probes

A72 = {"asimd": True, "fp16": False, "dotprod": False, "i8mm": False}
A76 = {"asimd": True, "fp16": True, "dotprod": True, "i8mm": False}
PHONE = {"asimd": True, "fp16": True, "dotprod": True, "i8mm": True}


def test_fake_devices_are_detected_as_their_profiles(tmp_path: Path) -> None:
    assert devices.detect_all(tmp_path) == [
        ("Raspberry Pi 4 Model B 4 GB", "pi4-4gb", "pi4-4gb", True),
        ("Raspberry Pi 5 8 GB", "pi5-8gb", "pi5-8gb", True),
        ("Galaxy S23 (Snapdragon 8 Gen 2)", "android-8gb", "android-8gb", True),
    ]


@pytest.mark.parametrize(("case", "features", "expected"), [
    ("fp32", A72, ("fp32", "exact")),
    ("kv-fp32", A76, ("kv-fp32", "exact")),
    ("ple-tq2", A72, ("ple-tq2", "exact")),  # PLE codes are decoded, never made, at run time
    ("kv-tq3.5", A76, ("kv-tq3.5", "noise")),  # KV codes are made at run time: a ulp can flip one
    ("fp16", A72, ("fp16", "noise")),  # no FP16 arithmetic: fp32 as on x86, but its fp16 KV cache rounds
    ("fp16", A76, ("fp16", "fp16")),
    ("int8", PHONE, ("int8", "noise")),
    ("int4-b32", A72, ("int4-b32", "noise")),  # MatMulInt4: x86's arithmetic on every CPU, dot product or not
    ("int4-b32", A76, ("int4-b32", "noise")),
    ("int4-b128", PHONE, ("int4-b128", "noise")),
    ("int8-block-b128", A72, ("int8-block-b128+fp32-activations", "noise")),  # no 8-bit kernel: weights widened
    ("int8-block-b128", A76, ("int8-block-b128", "noise")),  # MLAS int8 per block, as x86
    ("int8-block-b128", PHONE, ("int8-block-b128", "noise")),
])
def test_each_case_is_held_to_the_x86_run_of_its_arithmetic(case: str, features: dict, expected: tuple) -> None:
    reference = compare.reference_for(case, features)
    assert (reference.case, reference.kind) == expected


def test_int4_and_int8_rows_name_edge_runtimes_own_kernel_and_its_instruction() -> None:
    own = "edge-runtime's own, int8 activations per block"
    assert compare.kernel_summary("int4-b32", A72) == f"MatMulInt4: {own}, smull"  # the aarch64 build
    assert compare.kernel_summary("int4-b128", PHONE) == f"MatMulInt4: {own}, sdot"  # the aarch64-dotprod build
    assert compare.kernel_summary("int8", A72) == f"MatMulInt8: {own}, smull"
    assert compare.kernel_summary("int8", A76) == f"MatMulInt8: {own}, sdot"


def _run(prefill: float, decode: float, greedy: int = 0) -> dict[str, np.ndarray]:
    tokens = np.arange(cases.GREEDY_TOKENS)
    tokens[: greedy] += 1
    return {"prefill": np.full((2, 4), prefill, np.float32), "decode": np.full((2, 4), decode, np.float32),
            "greedy": tokens}


def test_allowed_difference_follows_the_x86_yardsticks() -> None:
    x86 = {"int8": _run(1.0, 1.0), "int8@noise1": _run(1.0, 1.02), "int8@noise2": _run(1.01, 1.0),
           "int8-block-b128": _run(2.0, 2.0), "int8-block-b128@noise1": _run(2.0, 2.04, greedy=1),
           "int8-block-b128+fp32-activations": _run(2.1, 2.0), "fp32": _run(-8.0, 8.0)}
    assert compare.allowed(compare.reference_for("fp32", A76), "decode", x86, 100) == (1e-4, True)
    tolerance, same = compare.allowed(compare.reference_for("int8", A76), "prefill", x86, 100)
    assert (tolerance, same) == (pytest.approx(3 * 0.02), True)  # pooled over both paths
    tolerance, same = compare.allowed(compare.reference_for("int8-block-b128", A76), "prefill", x86, 100)
    assert (tolerance, same) == (pytest.approx(3 * 0.04), False)  # a perturbed run changed a token
    x86["int8-block-b128+fp32-activations@noise1"] = _run(2.1, 2.00001)  # fp32 activations: no code to flip
    assert compare.allowed(compare.reference_for("int8-block-b128", A72), "decode", x86, 100) == (1e-4, True)
    x86["fp16"] = _run(-12.0, 3.0)
    tolerance, same = compare.allowed(compare.reference_for("fp16", A76), "prefill", x86, 576)
    assert (tolerance, same) == (pytest.approx(2 * 24 * 2**-11 * 12), True)


def test_a_row_fails_beyond_its_tolerance_or_on_other_tokens() -> None:
    x86 = {"int8": _run(1.0, 1.0), "int8@noise1": _run(1.0, 1.01)}
    reference = compare.reference_for("int8", A72)
    rows = compare.compare_case("cortex-a72", "int8", _run(1.02, 1.04), reference, x86, 192)
    assert [(r.path, round(r.max_dlogit, 4), r.ok) for r in rows] == [("prefill", 0.02, True),
                                                                     ("decode", 0.04, False)]
    rows = compare.compare_case("cortex-a72", "int8", _run(1.0, 1.0, greedy=3), reference, x86, 192)
    assert [(r.greedy_same, r.ok) for r in rows] == [(29, False), (29, False)]
    report = compare.Report(rows=rows)
    assert not report.ok and "**NO**" in report.format()


@pytest.mark.parametrize(("accuracy_level", "arithmetic"), [(4, "int8 per block"), (0, "fp32 activations")])
def test_probes_classify_this_hosts_8_bit_kernel(tmp_path: Path, accuracy_level: int, arithmetic: str) -> None:
    """x86's MLAS quantizes 8-bit MatMulNBits' activations per block at accuracy level 4 (AVX2, AVX-512 and VNNI
    alike), and keeps them in fp32 at level 0 (the arithmetic of an ARM core without dot product): the probes tell
    the two apart, and tell every candidate from the others."""
    probes.write_probes(tmp_path)
    a = np.load(tmp_path / "activations.npy")
    models = sorted(tmp_path.glob("*.onnx"))
    assert [m.stem for m in models] == sorted(probes.probe_name(*shape) for shape in probes.SHAPES)
    for path in models:
        weights = np.load(path.with_suffix(".npz"))
        model = onnx.load(str(path))
        (level,) = [attr for attr in model.graph.node[0].attribute if attr.name == "accuracy_level"]
        level.i = accuracy_level
        k = model.graph.input[0].type.tensor_type.shape.dim[1].dim_value
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        output = session.run(None, {"A": a[:, :k]})[0]
        codes, scale = weights["codes"], weights["scale"]
        best, distances = probes.classify(output, codes, scale, a[:, :k])
        assert best == arithmetic and distances[best] < 1e-5 and 1e-3 < min(
            d for name, d in distances.items() if name != best), (path.name, distances)
        for name, reference in probes.candidates(codes, scale, a[:, :k]).items():
            assert probes.classify(reference, codes, scale, a[:, :k])[0] == name


def test_fp32_activation_variant_is_a_valid_artifact_at_accuracy_level_0(tmp_path: Path, monkeypatch) -> None:
    from edge_runtime.bundled import BUNDLED_CHECKPOINT
    from edge_runtime.export import export_checkpoint

    monkeypatch.setenv("EDGE_RUNTIME_CACHE", str(tmp_path / "cache"))
    original = export_checkpoint(BUNDLED_CHECKPOINT, tmp_path / "int8-block", weights="int8-block", block_size=32)
    variant = compare.fp32_activation_variant(original, tmp_path / "variant")
    levels = {a.i for g in variant.glob("*.onnx") for n in onnx.load(str(g), load_external_data=False).graph.node
              if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "accuracy_level"}
    assert levels == {0}
    ids = edge_runtime.load(original).encode(cases.PROMPT)
    quantized, fp32_activations = (edge_runtime.load(p).logits(ids) for p in (original, variant))  # SHA-256s hold
    assert 1e-3 < np.abs(quantized - fp32_activations).max() < 1.0


def test_host_mirror_reads_deb822_and_one_line_sources(tmp_path: Path) -> None:
    (tmp_path / "sources.list.d").mkdir()
    assert guest_root.host_mirror(tmp_path) == guest_root.DEFAULT_MIRROR
    (tmp_path / "sources.list").write_text("deb http://mirror.example/debian bullseye main\n"
                                           "deb [arch=amd64] http://one.example/debian bookworm main\n")
    assert guest_root.host_mirror(tmp_path) == "http://one.example/debian"
    (tmp_path / "sources.list").unlink()
    (tmp_path / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\nURIs: http://security.example/debian-security\nSuites: bookworm-security\n\n"
        "Types: deb\nURIs: http://deb822.example/debian\nSuites: bookworm bookworm-updates\nComponents: main\n")
    assert guest_root.host_mirror(tmp_path) == "http://deb822.example/debian"


def _check_module():
    loader = importlib.machinery.SourceFileLoader("arm64_check", str(ARM64 / "check"))
    spec = importlib.util.spec_from_loader("arm64_check", loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def test_a_machine_that_cannot_run_it_gets_one_line_and_exit_77(monkeypatch, capsys) -> None:
    monkeypatch.setattr(guest_root.os, "geteuid", lambda: 1000)
    with pytest.raises(guest_root.CannotRun, match="^not root: "):
        guest_root.ensure_host()
    check = _check_module()
    monkeypatch.setattr(sys, "argv", ["check", "--smoke"])
    assert check.main() == check.CANNOT_RUN == 77
    err = capsys.readouterr().err
    assert err.splitlines() == [("arm64 check cannot run on this machine: not root: building the aarch64 root "
                                 "(debootstrap, chroot) and binfmt_misc need root")]


def test_every_case_names_an_exported_artifact_and_every_cpu_a_qemu_model(tmp_path: Path) -> None:
    assert all(c.artifact in cases.ARTIFACTS for c in cases.CASES.values())
    assert {*cases.SMOKE_CASES, *cases.QUALITY_CASES, *cases.NODE_CASES} <= set(cases.CASES)
    assert cases.SMOKE_CPU in cases.CPUS
    assert json.loads(json.dumps(cases.CPUS))  # plain data: the guest imports it before anything else
    from edge_runtime.export.onnx_graph import GraphBuilder, WeightsWriter
    from edge_runtime.weight_formats import WEIGHT_FORMATS, weight_format

    nbits = set()  # the formats whose kernel is com.microsoft.MatMulNBits, as export emits them
    with WeightsWriter(tmp_path / "weights.bin") as writer:
        for name in WEIGHT_FORMATS:
            g = GraphBuilder(name, writer)
            g.linear(g.input("x", ["T", 64]), "w", np.ones((16, 64), np.float32), weight_format(name, 32))
            nbits |= {name for node in g.nodes if node.op_type == "MatMulNBits"}
    assert set(cases.CPU_DEPENDENT_WEIGHTS) == nbits == {a.weights for a in cases.ARTIFACTS.values()} & nbits


def test_a_run_restricted_to_some_cases_still_exports_what_its_other_steps_load() -> None:
    check = _check_module()
    assert check.needed_artifacts(["int8-block-b128"], smoke=True) == ["int8-block-b128"]
    assert check.needed_artifacts(["int8-block-b128"], smoke=False) == [
        "fp16", "fp32", "int4-b32", "int8", "int8-block-b128"]  # node lists, perplexity, serve
    assert check.needed_artifacts(list(cases.CASES), smoke=False) == sorted(cases.ARTIFACTS)


def test_folded_rows_show_the_member_nearest_its_allowance_and_fail_with_any_member() -> None:
    x86 = {"kv-fp32": _run(1.0, 1.0), "kv-int8": _run(1.0, 1.0), "kv-int8@noise1": _run(1.0, 1.1)}
    rows = [*compare.compare_case("cortex-a76", "kv-fp32", _run(1.00005, 1.0), compare.reference_for("kv-fp32", A76),
                                  x86, 192),
            *compare.compare_case("cortex-a76", "kv-int8", _run(1.0, 1.2), compare.reference_for("kv-int8", A76),
                                  x86, 192)]
    grouped = compare.Report(rows=rows).grouped()
    assert [(r.case, r.path, round(r.max_dlogit, 5), r.ok) for r in grouped] == [
        ("KV: all 16 formats, no exact tokens", "prefill", 5e-05, True),
        ("KV: all 16 formats, no exact tokens", "decode", 0.2, True)]
    rows[0] = compare.Row(**{**compare.asdict(rows[0]), "greedy_same": 31})
    assert [r.ok for r in compare.Report(rows=rows).grouped()] == [False, True]


def test_a_cpu_fails_unless_its_aarch64_attention_kernel_ran() -> None:
    assert compare.attention_kernel_note("cortex-a72", "aarch64") == (
        "cortex-a72: attention kernel aarch64 loaded (edge_runtime.attention_kernel.load().name)", True)
    assert compare.attention_kernel_note("cortex-a76", "aarch64-dotprod") == (
        "cortex-a76: attention kernel aarch64-dotprod loaded (edge_runtime.attention_kernel.load().name)", True)
    assert compare.attention_kernel_note("cortex-a76", None) == (
        ("cortex-a76: no attention kernel loaded, numpy ran attention: attention-aarch64-dotprod.so is missing from "
         "the installed package or was built from another attention.c (python tools/build_kernels.py --check)"),
        False)
    assert compare.attention_kernel_note("cortex-a76", "aarch64") == (
        "cortex-a76: attention kernel aarch64 loaded, expected aarch64-dotprod", False)
    assert compare.attention_kernel_note("cortex-a72", "x86_64") == (
        "cortex-a72: attention kernel x86_64 loaded, expected aarch64", False)
    report = compare.Report(notes=[compare.attention_kernel_note("cortex-a76", None)])
    assert not report.ok and "FAILED: cortex-a76: no attention kernel loaded" in report.format()


def test_the_smoke_runs_the_kernel_test_of_every_kv_format_without_model_checkpoints() -> None:
    """The smoke's -k selection: every KV format at one shape, tq3.5's kinds at a Hadamard width (integer key
    scores), the integer levels' tests, the threads' partial softmaxes and every test of the onnxruntime operators
    (LoRA slots, int4 and int8 weights), and none of the tests that need tests/conftest.py's checkpoints (the smoke
    exports none for the guest)."""
    import subprocess

    import test_attention_kernel
    import test_integer_matmul
    import test_onnxruntime_ops

    from edge_runtime import attention_kernel
    from edge_runtime.kv_formats import KV_FORMATS

    check = _check_module()
    root = ARM64.parents[1]
    collected = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                                *(str(root / t) for t in check.KERNEL_TESTS), "-k", check.KERNEL_SMOKE_SELECTION],
                               capture_output=True, text=True, cwd=root, timeout=120)
    ids = [line.split("::")[1] for line in collected.stdout.splitlines() if "::" in line]
    functions = {i.split("[")[0] for i in ids}
    operators = {name for module in (test_onnxruntime_ops, test_integer_matmul) for name in dir(module)
                 if name.startswith("test_")}
    assert functions == {"test_the_kernel_equals_numpy_for_every_format",
                         "test_a_block_shared_between_threads_gives_the_same_output",
                         "test_keys_with_integer_levels_score_as_exact_integer_sums_on_every_build",
                         "test_integer_levels_on_a_part_they_cannot_describe_are_refused_before_the_call",
                         *operators}, collected.stdout
    every_format = [re.fullmatch(r"test_the_kernel_equals_numpy_for_every_format\[(.+)-(64-1|256-3)-700-(.+)\]", i)
                    for i in ids if "every_format" in i]
    builds = attention_kernel.builds_for_this_machine(attention_kernel.ATTENTION_BUILDS)
    assert sorted((m[1], m[2], m[3]) for m in every_format) == sorted(
        [(b, "64-1", name) for b in builds for name in KV_FORMATS]
        + [(b, "256-3", name) for b in builds for name in ("tq3.5", "tq3.5-mse", "tq3.5-prod")])
    assert not any("artifacts" in inspect.signature(getattr(module, f)).parameters
                   for module in (test_attention_kernel, test_onnxruntime_ops, test_integer_matmul) for f in functions
                   if hasattr(module, f))
