"""edge-runtime's MatMulInt4 and MatMulInt8 operators (edge_runtime/kernels/onnxruntime_ops.c, weight_formats.Int4
and Int8) against their arithmetic written in numpy, for every build this machine can run: x quantized to int8 per
row and block (int8's block: the whole row), integer dot products with the codes, each block's sum scaled in
float32. Decode (one row) and prefill (several) take different loops, and rows, blocks and tiles each have their
remainders."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edge_runtime import onnxruntime_ops
from edge_runtime.attention_kernel import builds_for_this_machine
from edge_runtime.quant.integer import (
    INT4_ZERO,
    WEIGHT_TILE,
    dequantize_int4_blocks,
    dequantize_int8_rows,
    quantize_int4_blocks,
    quantize_int8_rows,
)
from edge_runtime.weight_formats import Int4, Int8, Tiled

BUILDS = builds_for_this_machine(onnxruntime_ops.BUILDS)
FORMATS = {"int4-b32": Int4(32), "int4-b64": Int4(64), "int4-b128": Int4(128), "int8": Int8()}


def integer_weight(w: np.ndarray, fmt: Tiled) -> tuple[np.ndarray, np.ndarray, int]:
    """The weight as the format stores it, before the tile layout: (integer codes [n, padded k], float32 scales
    [n, blocks], block), and the dequantized weight [n, k]."""
    n, k = w.shape
    if isinstance(fmt, Int8):
        codes, scale = quantize_int8_rows(w)
        padded = np.pad(codes, ((0, 0), (0, -k % 16))).astype(np.int64)
        return padded, scale[:, None], padded.shape[1]
    packed, scale = quantize_int4_blocks(w, fmt.block_size, np.dtype(np.float16))
    codes = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(n, -1).astype(np.int64) - INT4_ZERO
    return codes, scale.astype(np.float32), fmt.block_size


def dequantized(w: np.ndarray, fmt: Tiled) -> np.ndarray:
    if isinstance(fmt, Int8):
        return dequantize_int8_rows(*quantize_int8_rows(w))
    return dequantize_int4_blocks(*quantize_int4_blocks(w, fmt.block_size, np.dtype(np.float16)), w.shape[1])


def reference(x: np.ndarray, w: np.ndarray, fmt: Tiled) -> np.ndarray:
    """The operator's result in numpy: x in int8 per block of the weight's (scale max|x| / 127, round half to
    even), sums of integers scaled per block in float32."""
    codes, w_scale, block = integer_weight(w, fmt)
    rows, k = x.shape
    padded = np.zeros((rows, codes.shape[1]), np.float32)
    padded[:, :k] = x
    blocks = padded.reshape(rows, -1, block)
    amax = np.abs(blocks).max(axis=2)
    inverse = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    q = np.rint(blocks * inverse[..., None]).astype(np.int64)
    sums = np.einsum("rbi,nbi->rnb", q, codes.reshape(codes.shape[0], -1, block))
    x_scale = (amax / np.float32(127)).astype(np.float32)
    scale = w_scale[None, :, :] * x_scale[:, None, :]
    return (sums.astype(np.float32) * scale).sum(axis=2, dtype=np.float32)


def _session(build: str, fmt: Tiled, w: np.ndarray) -> ort.InferenceSession:
    parts = fmt.encode(w)
    codes = parts["codes"]
    nodes = [helper.make_node(fmt.operator, ["x", "codes", "scales"], ["y"], domain=onnxruntime_ops.DOMAIN)]
    graph = helper.make_graph(
        nodes, "integer_matmul", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", "k"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", codes.shape[0] * WEIGHT_TILE])],
        [numpy_helper.from_array(codes, "codes"), numpy_helper.from_array(parts["scale"], "scales")])
    return _open(build, graph)


def _open(build: str, graph) -> ort.InferenceSession:
    """A session of `graph` on 2 threads with `build` of edge-runtime's operators registered."""
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                    helper.make_opsetid(onnxruntime_ops.DOMAIN, 1)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.register_custom_ops_library(str(onnxruntime_ops.build_path(build)))
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("build", BUILDS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("rows,n,k", [(1, 48, 256), (1, 40, 200), (1, 2048, 1536), (7, 48, 256), (9, 40, 200),
                                      (130, 64, 384), (1, 32, 6144)])
def test_integer_matmul_equals_its_numpy_arithmetic(build, fmt, rows, n, k):
    rng = np.random.default_rng(rows * 1000 + n + k + len(fmt))
    w = rng.standard_normal((n, k)).astype(np.float32) * 0.05
    x = rng.standard_normal((rows, k)).astype(np.float32)
    x[0, :32] = 0  # a block of zeros (int4: scale 0, nothing added)
    x[-1] = 0  # a row of zeros (int8: its one block)
    fmt = FORMATS[fmt]
    got = _session(build, fmt, w).run(None, {"x": x})[0]
    want = reference(x, w, fmt)
    assert got.shape == (rows, -(-n // WEIGHT_TILE) * WEIGHT_TILE)
    assert not got[:, n:].any()  # the tiles' padding rows
    assert not got[-1].any()
    np.testing.assert_allclose(got[:, :n], want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    # and within activation quantization of the dequantized weight's product
    exact = x @ dequantized(w, fmt).T
    assert np.abs(got[:, :n] - exact).max() <= 0.02 * np.abs(exact).max()


def test_int8_takes_both_ends_of_its_codes_and_of_x() -> None:
    """int8's sums reach their extremes (codes -127 and 127 against x's -127 and 127 over a whole row of 6144): the
    x86 paths without VNNI take |x| times the code with x's sign (code + 128 would saturate vpmaddubsw), VNNI adds
    128 x the codes and takes it off, and every build must give the same bits."""
    w = np.where(np.arange(6144) % 3 == 0, 1.0, -1.0).astype(np.float32)[None, :].repeat(16, 0)
    w[1::2] *= -1
    x = np.where(np.arange(6144) % 3 == 0, 2.5, -2.5).astype(np.float32)[None, :]
    results = [_session(build, Int8(), w).run(None, {"x": x})[0] for build in BUILDS]
    assert results[0][0, 0] == pytest.approx(6144 * 2.5) and results[0][0, 1] == pytest.approx(-6144 * 2.5)
    assert all(np.array_equal(r, results[0]) for r in results)


@pytest.mark.parametrize("build", BUILDS)
@pytest.mark.parametrize("fmt", ["int4-b32", "int8"])
def test_every_build_gives_the_same_bits(build, fmt):
    """The integer sums are exact and the float32 steps the same on every CPU, so every build (and an Arm core,
    tools/arm64/check) computes the very same numbers."""
    rng = np.random.default_rng(5)
    w = rng.standard_normal((64, 512)).astype(np.float32)
    x = rng.standard_normal((3, 512)).astype(np.float32)
    first = _session(BUILDS[-1], FORMATS[fmt], w).run(None, {"x": x})[0]
    assert np.array_equal(_session(build, FORMATS[fmt], w).run(None, {"x": x})[0], first)


@pytest.mark.parametrize("build", BUILDS)
@pytest.mark.parametrize("fmt,message", [
    ("int4-b32", r"MatMulInt4: want x \[..., k\], codes \[n / 16, k / 8, 64\] and scales \[n / 16, blocks, 16\]"),
    ("int8", r"MatMulInt8: want x \[..., k\], codes \[n / 16, k / 4, 64\] and scales \[n / 16, blocks, 16\]")])
def test_integer_matmul_refuses_codes_and_scales_that_disagree(build, fmt, message):
    session = _session(build, FORMATS[fmt], np.ones((16, 64), np.float32))
    with pytest.raises(Exception, match=message):
        session.run(None, {"x": np.ones((1, 96), np.float32)})


def _fused_slots_session(build: str, fmt: Tiled, w: np.ndarray, columns: list[int], fused: bool):
    """The product of `w` with int8 LoRA slots starting at `columns`: their a, b and scale inputs of the product's own
    node (fused), or LoraSlotInt8 nodes on the parts of its output after a Split (as other formats' slots run)."""
    parts = fmt.encode(w)
    n = parts["codes"].shape[0] * WEIGHT_TILE
    k = w.shape[1]
    bounds = [*columns, n]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", k])]
    names = []
    for j in range(len(columns)):
        names.append((f"a{j}", f"b{j}", f"s{j}"))
        inputs += [helper.make_tensor_value_info(f"a{j}", TensorProto.INT8, [f"r{j}", k]),
                   helper.make_tensor_value_info(f"b{j}", TensorProto.INT8, [f"r{j}", f"width{j}"]),
                   helper.make_tensor_value_info(f"s{j}", TensorProto.FLOAT, [f"r{j}"])]
    inits = [numpy_helper.from_array(parts["codes"], "codes"), numpy_helper.from_array(parts["scale"], "scales")]
    if fused:
        inits.append(numpy_helper.from_array(np.array(columns, np.int64), "columns"))
        slot_inputs = [name for slot in names for name in slot]
        nodes = [helper.make_node(fmt.operator, ["x", "codes", "scales", "columns", *slot_inputs], ["y"],
                                  domain=onnxruntime_ops.DOMAIN)]
    else:
        inits.append(numpy_helper.from_array(np.diff(bounds).astype(np.int64), "widths"))
        split = [f"part{j}" for j in range(len(columns))]
        nodes = [helper.make_node(fmt.operator, ["x", "codes", "scales"], ["product"], domain=onnxruntime_ops.DOMAIN),
                 helper.make_node("Slice", ["product", "start", "end", "axis"], ["slotted"]),
                 helper.make_node("Split", ["slotted", "widths"], split, axis=-1)]
        inits += [numpy_helper.from_array(np.array([columns[0]], np.int64), "start"),
                  numpy_helper.from_array(np.array([n], np.int64), "end"),
                  numpy_helper.from_array(np.array([-1], np.int64), "axis")]
        nodes += [helper.make_node(onnxruntime_ops.LORA_SLOT_INT8, ["x", part, *names[j]], [f"lora{j}"],
                                   domain=onnxruntime_ops.DOMAIN) for j, part in enumerate(split)]
        inits.append(numpy_helper.from_array(np.array([0], np.int64), "zero"))
        nodes += [helper.make_node("Slice", ["product", "zero", "start", "axis"], ["head"]),
                  helper.make_node("Concat", ["head", *[f"lora{j}" for j in range(len(columns))]], ["y"], axis=-1)]
    return _open(build, helper.make_graph(nodes, "slots", inputs,
                                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits))


@pytest.mark.parametrize("build", BUILDS)
@pytest.mark.parametrize("fmt", ["int4-b32", "int8"])
@pytest.mark.parametrize("rows", [1, 6])
def test_slots_in_the_product_add_what_lora_slot_nodes_after_it_add(build, fmt, rows):
    """A fused q/k/v's slots given to the product's node (export/onnx_graph.slotted_linear) add, to the bit, what
    LoraSlotInt8 nodes after a Split add: q's at rank 4, k's empty (r = 0), v's at rank 3, from columns 16, 80 and
    96 of 128 (the first 16 columns have no slot, as when q_proj is not among the slotted modules)."""
    rng = np.random.default_rng(rows)
    k, columns, ranks = 192, [16, 80, 96], [4, 0, 3]
    w = rng.standard_normal((128, k)).astype(np.float32) * 0.05
    feeds = {"x": rng.standard_normal((rows, k)).astype(np.float32)}
    for j, (start, end, r) in enumerate(zip(columns, [*columns[1:], 128], ranks)):
        feeds |= {f"a{j}": rng.integers(-127, 128, (r, k), dtype=np.int8),
                  f"b{j}": rng.integers(-127, 128, (r, end - start), dtype=np.int8),
                  f"s{j}": rng.uniform(1e-5, 1e-4, r).astype(np.float32)}
    fused = _fused_slots_session(build, FORMATS[fmt], w, columns, fused=True).run(None, feeds)[0]
    nodes = _fused_slots_session(build, FORMATS[fmt], w, columns, fused=False).run(None, feeds)[0]
    assert np.array_equal(fused, nodes)
    plain = _session(build, FORMATS[fmt], w).run(None, {"x": feeds["x"]})[0]
    assert np.array_equal(fused[:, :16], plain[:, :16]) and np.array_equal(fused[:, 80:96], plain[:, 80:96])
    assert not np.allclose(fused[:, 16:80], plain[:, 16:80])


@pytest.mark.parametrize("fmt", ["int4-b32", "int8"])
def test_slots_past_the_output_are_refused(fmt):
    session = _fused_slots_session(BUILDS[0], FORMATS[fmt], np.ones((32, 64), np.float32), [16], fused=True)
    feeds = {"x": np.ones((1, 64), np.float32), "a0": np.ones((2, 64), np.int8), "b0": np.ones((2, 32), np.int8),
             "s0": np.ones(2, np.float32)}
    operator = FORMATS[fmt].operator
    with pytest.raises(Exception, match=f"{operator}: want LoRA slots as columns \\[s\\] \\(s up to 3\\), then each"):
        session.run(None, feeds)
