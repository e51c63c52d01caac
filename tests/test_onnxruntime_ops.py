"""edge-runtime's own onnxruntime operators (edge_runtime/kernels/onnxruntime_ops.c) against numpy, for every build this
machine can run: LoraSlot(x, y, a, b) = y + (x @ a.T) @ b with half-precision a and b, and LoraSlotInt8(x, y, a, b,
scale) = y + ((x @ a.T) * scale) @ b with int8 a and b, summed in float32."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from edge_runtime import onnxruntime_ops
from edge_runtime.attention_kernel import builds_for_this_machine
from edge_runtime.errors import EdgeRuntimeError

BUILDS = builds_for_this_machine(onnxruntime_ops.BUILDS)


def _session(path: str, leading: int, y_computed: bool, kind: str = "half") -> ort.InferenceSession:
    """One LoraSlot (or LoraSlotInt8) node over inputs of any shape with `leading` dimensions before in / out; with
    `y_computed`, y comes from a node (Relu) and the output goes on to nodes (Neg twice), so that onnxruntime gives
    the output y's own buffer; else y is a graph input and the output the graph's, each a buffer of its own."""
    dims = [f"d{i}" for i in range(leading)]
    element = TensorProto.FLOAT16 if kind == "half" else TensorProto.INT8
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [*dims, "in"]),
              helper.make_tensor_value_info("y", TensorProto.FLOAT, [*dims, "out"]),
              helper.make_tensor_value_info("a", element, ["r", "in"]),
              helper.make_tensor_value_info("b", element, ["r", "out"])]
    names = ["x", "y1" if y_computed else "y", "a", "b"]
    if kind == "int8":
        inputs.append(helper.make_tensor_value_info("scale", TensorProto.FLOAT, ["r"]))
        names.append("scale")
    nodes = [helper.make_node("Relu", ["y"], ["y1"])] if y_computed else []
    op = onnxruntime_ops.LORA_SLOT if kind == "half" else onnxruntime_ops.LORA_SLOT_INT8
    nodes.append(helper.make_node(op, names, ["z"], domain=onnxruntime_ops.DOMAIN))
    if y_computed:
        nodes += [helper.make_node("Neg", ["z"], ["minus"]), helper.make_node("Neg", ["minus"], ["out"])]
    result = "out" if y_computed else "z"
    graph = helper.make_graph(nodes, "slot", inputs, [helper.make_tensor_value_info(result, TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                    helper.make_opsetid(onnxruntime_ops.DOMAIN, onnxruntime_ops.OPSET)],
                              ir_version=10)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.register_custom_ops_library(path)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _operands(kind: str, r: int, k: int, n: int, rng: np.random.Generator) -> tuple[dict, np.ndarray, np.ndarray]:
    """The slot's inputs of `kind`, and A and B as the float32 values the kernel sums (int8: scale folded into A)."""
    if kind == "half":
        a = (rng.standard_normal((r, k)) / np.sqrt(k)).astype(np.float16)
        b = (rng.standard_normal((r, n)) * 0.1).astype(np.float16)
        return {"a": a, "b": b}, a.astype(np.float32), b.astype(np.float32)
    a, b = rng.integers(-127, 128, (r, k)).astype(np.int8), rng.integers(-127, 128, (r, n)).astype(np.int8)
    scale = (rng.uniform(0.5, 1.5, r) / (127 * 127 * np.sqrt(k))).astype(np.float32)
    return {"a": a, "b": b, "scale": scale}, a.astype(np.float32) * scale[:, None], b.astype(np.float32)


@pytest.fixture(params=BUILDS)
def build(request) -> str:
    path = onnxruntime_ops.build_path(request.param)
    assert path.is_file(), f"{path.name} is missing: python tools/build_kernels.py"
    return str(path)


def test_this_machine_has_a_build():
    assert BUILDS, "no build of the operators for this machine"
    assert onnxruntime_ops.library() == onnxruntime_ops.build_path(BUILDS[0])


@pytest.mark.parametrize("kind", ["half", "int8"])
@pytest.mark.parametrize("y_computed", [False, True], ids=["y-apart", "y-in-place"])
@pytest.mark.parametrize("shape", [
    (1, 1536, 2048, 16),   # a decode step's q_proj: one row, split into column tasks below the threshold
    (1, 1536, 6144, 16),   # gate / up: columns split between threads
    (1, 6144, 1536, 8),    # down_proj: a's rows split between threads
    (1, 8192, 40, 6),      # ... the last task taking the rank's rest
    (1, 17, 33, 5),        # every tail: in, out and rank no multiple of a vector or of 4
    (7, 64, 72, 3),        # several rows (prefill): rows split between threads, an odd last one
    (2, 48, 40, 0),        # no adapter
], ids=lambda s: "x".join(map(str, s)))
def test_lora_slot_equals_numpy(build, shape, y_computed, kind):
    rows, k, n, r = shape
    rng = np.random.default_rng(k + n + r)
    x = rng.standard_normal((rows, k)).astype(np.float32)
    y = rng.standard_normal((rows, n)).astype(np.float32)
    feeds, a, b = _operands(kind, r, k, n, rng)
    got = _session(build, 1, y_computed, kind).run(None, {"x": x, "y": y, **feeds})[0]
    base = np.maximum(y, 0) if y_computed else y
    expected = base + (x @ a.T) @ b
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= 1e-6 * max(1.0, np.abs(expected).max()), np.abs(got - expected).max()


@pytest.mark.parametrize("kind", ["half", "int8"])
def test_lora_slot_takes_leading_dimensions(build, kind):
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((2, 5, 32)).astype(np.float32), rng.standard_normal((2, 5, 24)).astype(np.float32)
    feeds, a, b = _operands(kind, 4, 32, 24, rng)
    got = _session(build, 2, False, kind).run(None, {"x": x, "y": y, **feeds})[0]
    expected = y + (x @ a.T) @ b
    assert np.abs(got - expected).max() <= 1e-5, np.abs(got - expected).max()


@pytest.mark.parametrize("a_shape,b_shape", [((4, 31), (4, 24)), ((4, 32), (3, 24)), ((4, 32), (4, 25))],
                         ids=["a-width", "b-rank", "b-width"])
def test_lora_slot_refuses_shapes_that_disagree(build, a_shape, b_shape):
    x, y = np.zeros((1, 32), np.float32), np.zeros((1, 24), np.float32)
    with pytest.raises(Exception, match=r"LoraSlot: want x \[\.\.\., in\], y \[\.\.\., out\], a \[r, in\] and "
                                        r"b \[r, out\]"):
        _session(build, 1, False).run(None, {"x": x, "y": y, "a": np.zeros(a_shape, np.float16),
                                             "b": np.zeros(b_shape, np.float16)})
    with pytest.raises(Exception, match=r"LoraSlotInt8: want x \[\.\.\., in\], y \[\.\.\., out\], a \[r, in\], "
                                        r"b \[r, out\] and scale \[r\]"):
        _session(build, 1, False, "int8").run(None, {"x": x, "y": y, "a": np.zeros((4, 32), np.int8),
                                                     "b": np.zeros((4, 24), np.int8),
                                                     "scale": np.zeros(3, np.float32)})


def test_a_build_from_other_source_is_not_used(monkeypatch, tmp_path):
    """A stale object (built from another onnxruntime_ops.c) is never registered; an artifact needing one is
    refused in one line."""
    source = tmp_path / "onnxruntime_ops.c"
    source.write_text("/* another source */\n")
    monkeypatch.setattr(onnxruntime_ops, "SOURCE", source)
    onnxruntime_ops.library.cache_clear()
    try:
        assert onnxruntime_ops.library() is None
        with pytest.raises(EdgeRuntimeError) as refusal:
            onnxruntime_ops.register(ort.SessionOptions(), Path("/art"), "LoRA slots are",
                                     "re-export with --lora-slot-precision fp32")
        assert str(refusal.value) == ("/art: its LoRA slots are computed by edge-runtime's onnxruntime operators, "
                                      "which have no build for this CPU (they need x86-64-v3 or aarch64); re-export "
                                      "with --lora-slot-precision fp32")
    finally:
        onnxruntime_ops.library.cache_clear()


def test_an_artifact_needs_the_library_for_int4_and_int8_weights_and_for_narrow_slots():
    """What the engine registers the library for, and the way out it names where no build runs."""
    from types import SimpleNamespace

    from edge_runtime.engine import own_operators
    from edge_runtime.lora_slots import LoraSlots
    from edge_runtime.weight_formats import Float16, Int4, Int8, Int8Block

    def manifest(formats, dtype):
        slots = None if dtype is None else LoraSlots(16, ("q_proj",), {}, dtype)
        return SimpleNamespace(weight_formats=dict(enumerate(formats)), lora_slots=slots)

    assert own_operators(manifest([Int8Block(32)], None)) is None
    assert own_operators(manifest([Float16()], "float32")) is None
    way_out = "(onnxruntime's own kernels)"
    assert own_operators(manifest([Int4(32)], None)) == ("int4 weights are",
                                                         f"re-export with --weights int8-block {way_out}")
    assert own_operators(manifest([Int8(), Int4(32), Int8()], None)) == (
        "int4 and int8 weights are", f"re-export with --weights int8-block {way_out}")
    assert own_operators(manifest([Int8Block(32)], "int8")) == ("LoRA slots are",
                                                               f"re-export with --lora-slot-precision fp32 {way_out}")
    assert own_operators(manifest([Int4(32)], "float16")) == (
        "int4 weights and LoRA slots are", f"re-export with --weights int8-block --lora-slot-precision fp32 {way_out}")
