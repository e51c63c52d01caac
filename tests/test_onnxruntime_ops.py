"""edge-runtime's own onnxruntime operators (edge_runtime/kernels/onnxruntime_ops.c) against numpy, for every build this
machine can run: LoraSlot(x, y, a, b) = y + (x @ a.T) @ b with half-precision a and b, summed in float32."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from edge_runtime import onnxruntime_ops
from edge_runtime.attention_kernel import builds_for_this_machine
from edge_runtime.errors import EdgeRuntimeError

BUILDS = [name for name in builds_for_this_machine() if name != "x86_64"]  # no baseline x86 build: no F16C


def _session(path: str, leading: int, y_computed: bool) -> ort.InferenceSession:
    """One LoraSlot node over inputs of any shape with `leading` dimensions before in / out; with `y_computed`, y
    comes from a node (Relu), whose buffer the output may take, else straight from a graph input."""
    dims = [f"d{i}" for i in range(leading)]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [*dims, "in"]),
              helper.make_tensor_value_info("y", TensorProto.FLOAT, [*dims, "out"]),
              helper.make_tensor_value_info("a", TensorProto.FLOAT16, ["r", "in"]),
              helper.make_tensor_value_info("b", TensorProto.FLOAT16, ["r", "out"])]
    nodes = [helper.make_node("Relu", ["y"], ["y1"])] if y_computed else []
    nodes.append(helper.make_node(onnxruntime_ops.LORA_SLOT, ["x", "y1" if y_computed else "y", "a", "b"], ["z"],
                                  domain=onnxruntime_ops.DOMAIN))
    graph = helper.make_graph(nodes, "slot", inputs, [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                    helper.make_opsetid(onnxruntime_ops.DOMAIN, onnxruntime_ops.OPSET)],
                              ir_version=10)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.register_custom_ops_library(path)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


@pytest.fixture(params=BUILDS)
def build(request) -> str:
    path = onnxruntime_ops.build_path(request.param)
    assert path.is_file(), f"{path.name} is missing: python tools/build_kernels.py"
    return str(path)


def test_this_machine_has_a_build():
    assert BUILDS, "no build of the operators for this machine"
    assert onnxruntime_ops.library() == onnxruntime_ops.build_path(BUILDS[0])


@pytest.mark.parametrize("y_computed", [False, True], ids=["y-input", "y-in-place"])
@pytest.mark.parametrize("shape", [
    (1, 1536, 2048, 16),   # a decode step's q_proj: one row, split into column tasks below the threshold
    (1, 1536, 6144, 16),   # gate / up: columns split between threads
    (1, 6144, 1536, 8),    # down_proj: a's rows split between threads
    (1, 8192, 40, 6),      # ... the last task taking the rank's rest
    (1, 17, 33, 5),        # every tail: in, out and rank no multiple of a vector or of 4
    (7, 64, 72, 3),        # several rows (prefill): rows split between threads, an odd last one
    (2, 48, 40, 0),        # no adapter
], ids=lambda s: "x".join(map(str, s)))
def test_lora_slot_equals_numpy(build, shape, y_computed):
    rows, k, n, r = shape
    rng = np.random.default_rng(k + n + r)
    x = rng.standard_normal((rows, k)).astype(np.float32)
    y = rng.standard_normal((rows, n)).astype(np.float32)
    a = (rng.standard_normal((r, k)) / np.sqrt(k)).astype(np.float16)
    b = (rng.standard_normal((r, n)) * 0.1).astype(np.float16)
    got = _session(build, 1, y_computed).run(None, {"x": x, "y": y, "a": a, "b": b})[0]
    base = np.maximum(y, 0) if y_computed else y
    expected = base + (x @ a.astype(np.float32).T) @ b.astype(np.float32)
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= 1e-6 * max(1.0, np.abs(expected).max()), np.abs(got - expected).max()


def test_lora_slot_takes_leading_dimensions(build):
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((2, 5, 32)).astype(np.float32), rng.standard_normal((2, 5, 24)).astype(np.float32)
    a, b = rng.standard_normal((4, 32)).astype(np.float16), rng.standard_normal((4, 24)).astype(np.float16)
    got = _session(build, 2, False).run(None, {"x": x, "y": y, "a": a, "b": b})[0]
    expected = y + (x @ a.astype(np.float32).T) @ b.astype(np.float32)
    assert np.abs(got - expected).max() <= 1e-5, np.abs(got - expected).max()


@pytest.mark.parametrize("a_shape,b_shape", [((4, 31), (4, 24)), ((4, 32), (3, 24)), ((4, 32), (4, 25))],
                         ids=["a-width", "b-rank", "b-width"])
def test_lora_slot_refuses_shapes_that_disagree(build, a_shape, b_shape):
    x, y = np.zeros((1, 32), np.float32), np.zeros((1, 24), np.float32)
    with pytest.raises(Exception, match=r"LoraSlot: want x \[\.\.\., in\], y \[\.\.\., out\], a \[r, in\] and "
                                        r"b \[r, out\]"):
        _session(build, 1, False).run(None, {"x": x, "y": y, "a": np.zeros(a_shape, np.float16),
                                             "b": np.zeros(b_shape, np.float16)})


def test_a_build_from_other_source_is_not_used(monkeypatch, tmp_path):
    """A stale object (built from another onnxruntime_ops.c) is never registered; an artifact needing one is
    refused in one line."""
    source = tmp_path / "onnxruntime_ops.c"
    source.write_text("/* another source */\n")
    monkeypatch.setattr(onnxruntime_ops, "SOURCE", source)
    onnxruntime_ops.library.cache_clear()
    try:
        assert onnxruntime_ops.library() is None
        with pytest.raises(EdgeRuntimeError, match=r"^/art: its LoRA slots are float16, computed by edge-runtime's "
                                                   r"onnxruntime operators, which have no build for this CPU"):
            onnxruntime_ops.register(ort.SessionOptions(), Path("/art"))
    finally:
        onnxruntime_ops.library.cache_clear()
