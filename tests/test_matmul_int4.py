"""edge-runtime's MatMulInt4 operator (edge_runtime/kernels/onnxruntime_ops.c, weight_formats.Int4) against its
arithmetic written in numpy, for every build this machine can run: x quantized to int8 per row and block, integer
dot products with the codes, each block's sum scaled in float32. Decode (one row) and prefill (several) take
different loops, and rows, blocks and tiles each have their remainders."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from edge_runtime import onnxruntime_ops
from edge_runtime.attention_kernel import builds_for_this_machine
from edge_runtime.quant.integer import INT4_TILE, INT4_ZERO, dequantize_int4_blocks, quantize_int4_blocks
from edge_runtime.weight_formats import Int4

BUILDS = builds_for_this_machine(onnxruntime_ops.BUILDS)


def reference(x: np.ndarray, w: np.ndarray, fmt: Int4) -> np.ndarray:
    """MatMulInt4's result in numpy: the weight's codes and float16 scales as Int4 stores them, x in int8 per block
    of the same size (scale max|x| / 127, round half to even), sums of integers scaled per block in float32."""
    block = fmt.block_size
    packed, w_scale = quantize_int4_blocks(w, block, np.dtype(np.float16))
    codes = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(w.shape[0], -1).astype(np.int64) - INT4_ZERO
    rows, k = x.shape
    padded = np.zeros((rows, codes.shape[1]), np.float32)
    padded[:, :k] = x
    blocks = padded.reshape(rows, -1, block)
    amax = np.abs(blocks).max(axis=2)
    inverse = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    q = np.rint(blocks * inverse[..., None]).astype(np.int64)
    sums = np.einsum("rbi,nbi->rnb", q, codes.reshape(codes.shape[0], -1, block))
    x_scale = (amax / np.float32(127)).astype(np.float32)
    scale = w_scale.astype(np.float32)[None, :, :] * x_scale[:, None, :]
    return (sums.astype(np.float32) * scale).sum(axis=2, dtype=np.float32)


def _session(build: str, fmt: Int4, w: np.ndarray) -> ort.InferenceSession:
    parts = fmt.encode(w)
    codes, scales = parts["codes"], parts["scale"]
    nodes = [helper.make_node(onnxruntime_ops.MATMUL_INT4, ["x", "codes", "scales"], ["y"],
                              domain=onnxruntime_ops.DOMAIN)]
    graph = helper.make_graph(
        nodes, "matmul_int4", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", "k"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", codes.shape[0] * INT4_TILE])],
        [helper.make_tensor("codes", TensorProto.UINT8, codes.shape, codes.tobytes(), raw=True),
         helper.make_tensor("scales", TensorProto.FLOAT16, scales.shape, scales.view(np.uint16).tobytes(), raw=True)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                    helper.make_opsetid(onnxruntime_ops.DOMAIN, 1)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.register_custom_ops_library(str(onnxruntime_ops.build_path(build)))
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("build", BUILDS)
@pytest.mark.parametrize("block", [32, 64, 128])
@pytest.mark.parametrize("rows,n,k", [(1, 48, 256), (1, 40, 200), (1, 2048, 1536), (7, 48, 256), (9, 40, 200),
                                      (130, 64, 384)])
def test_matmul_int4_equals_its_numpy_arithmetic(build, block, rows, n, k):
    rng = np.random.default_rng(rows * 1000 + n + k + block)
    w = rng.standard_normal((n, k)).astype(np.float32) * 0.05
    x = rng.standard_normal((rows, k)).astype(np.float32)
    x[0, :block] = 0  # a block of zeros: scale 0, nothing added
    fmt = Int4(block)
    got = _session(build, fmt, w).run(None, {"x": x})[0]
    want = reference(x, w, fmt)
    assert got.shape == (rows, -(-n // INT4_TILE) * INT4_TILE)
    assert not got[:, n:].any()  # the tiles' padding rows
    np.testing.assert_allclose(got[:, :n], want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    # and within activation quantization of the dequantized weight's product
    exact = x @ dequantize_int4_blocks(*quantize_int4_blocks(w, block, np.dtype(np.float16)), k).T
    assert np.abs(got[:, :n] - exact).max() <= 0.02 * np.abs(exact).max()


@pytest.mark.parametrize("build", BUILDS)
def test_every_build_gives_the_same_bits(build):
    """The integer sums are exact and the float32 steps the same on every CPU, so every build (and an Arm core,
    tools/arm64/check) computes the very same numbers."""
    rng = np.random.default_rng(5)
    w = rng.standard_normal((64, 512)).astype(np.float32)
    x = rng.standard_normal((3, 512)).astype(np.float32)
    fmt = Int4(32)
    first = _session(BUILDS[-1], fmt, w).run(None, {"x": x})[0]
    assert np.array_equal(_session(build, fmt, w).run(None, {"x": x})[0], first)


@pytest.mark.parametrize("build", BUILDS)
def test_matmul_int4_refuses_codes_and_scales_that_disagree(build):
    fmt = Int4(32)
    session = _session(build, fmt, np.ones((16, 64), np.float32))
    with pytest.raises(Exception, match="MatMulInt4: want x \\[..., k\\], codes \\[n / 16, k / 8, 64\\]"):
        session.run(None, {"x": np.ones((1, 96), np.float32)})
