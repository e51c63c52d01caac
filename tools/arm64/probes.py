"""Single-node MatMulNBits models whose outputs tell which arithmetic a CPU's 4-bit kernel uses.

MLAS picks the kernel for MatMulNBits (accuracy level 4) by CPU feature, inside onnxruntime, where no log shows
it: x86 and ARM cores with dot-product instructions quantize the activations to int8 per block of `block_size`
values (symmetric, scale max|a|/127); an ARM core without them has no int8 kernel for 4-bit weights and keeps the
activations in fp32; where KleidiAI takes the node (dotprod cores, K a multiple of the block, no zero points),
activations are quantized per row, asymmetrically (KleidiAI's qai8dx packing). Each choice leaves its own rounding
in the output, so the probe runs a node on an activation with an outlier and asks which arithmetic, computed here
in float64, the output matches.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

# (K, N, block): K a multiple of the block (KleidiAI may take it) and not (MLAS keeps it: 192 % 128).
SHAPES = ((256, 64, 32), (256, 64, 128), (192, 64, 128))
ROWS = 3


def write_probes(out: Path) -> None:
    """The probe models, their weights (codes, scales) and one activation matrix, into `out` (host side: onnx)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from edge_runtime.quant.integer import quantize_int4_blocks

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for k, n, block in SHAPES:
        codes, scale = quantize_int4_blocks(rng.standard_normal((n, k)).astype(np.float32), block)
        node = helper.make_node("MatMulNBits", ["A", "B", "S"], ["Y"], domain="com.microsoft", K=k, N=n, bits=4,
                                block_size=block, accuracy_level=4)
        graph = helper.make_graph([node], "probe", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [ROWS, k])],
                                  [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [ROWS, n])],
                                  [numpy_helper.from_array(codes, "B"),
                                   numpy_helper.from_array(scale.reshape(-1).astype(np.float32), "S")])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                        helper.make_opsetid("com.microsoft", 1)])
        onnx.save(model, out / f"nbits_k{k}_n{n}_b{block}.onnx")
        np.savez(out / f"nbits_k{k}_n{n}_b{block}.npz", codes=codes, scale=scale)
    a = rng.standard_normal((ROWS, max(s[0] for s in SHAPES))).astype(np.float32)
    a *= np.linspace(0.2, 3.0, a.shape[1], dtype=np.float32)
    a[:, 7] = 9.0  # an outlier: per-row and per-block quantization round the rest of the row differently
    a[1] += 0.7  # a row not centred on zero, where asymmetric quantization differs most from symmetric
    np.save(out / "activations.npy", a)


def candidates(codes: np.ndarray, scale: np.ndarray, a: np.ndarray) -> dict[str, np.ndarray]:
    """The node's output under each known arithmetic, in float64, for activations `a` [M, K]."""
    n, blocks, half = codes.shape
    block = half * 2
    k = a.shape[1]
    q = np.stack([codes & 15, codes >> 4], -1).reshape(n, blocks, block).astype(np.float64) - 8
    s = scale.reshape(n, blocks).astype(np.float64)
    w = (q * s[..., None]).reshape(n, -1)[:, :k]
    x = a.astype(np.float64)
    padded = np.zeros((len(a), blocks * block), np.float32)
    padded[:, :k] = a
    ab = padded.reshape(len(a), blocks, block)
    step = (np.abs(ab).max(-1) / np.float32(127)).astype(np.float32)
    inverse = np.where(step > 0, 1 / np.where(step > 0, step, 1), 0).astype(np.float32)
    qa = np.clip(np.rint(ab * inverse[..., None]), -127, 127).astype(np.float64)
    lo = np.minimum(0, a.min(-1, keepdims=True)).astype(np.float32)
    hi = np.maximum(0, a.max(-1, keepdims=True)).astype(np.float32)
    row_scale = np.float32(255) / (hi - lo)
    zero = np.rint(np.clip(np.where(lo * row_scale + hi * row_scale - 1 > 0, -128 - lo * row_scale,
                                    127 - hi * row_scale), -128, 127))
    row = (np.clip(np.rint(a * row_scale) + zero, -128, 127) - zero) / row_scale
    return {"fp32 activations": x @ w.T,
            "int8 per block": np.einsum("mbk,nbk,mb,nb->mn", qa, q, step.astype(np.float64), s),
            "int8 per row, asymmetric": row.astype(np.float64) @ w.T}


def classify(output: np.ndarray, codes: np.ndarray, scale: np.ndarray, a: np.ndarray) -> tuple[str, dict[str, float]]:
    """The arithmetic whose output is nearest (max error relative to the largest output), and every distance."""
    distances = {name: float(np.abs(output - ref).max() / np.abs(ref).max())
                 for name, ref in candidates(codes, scale, a).items()}
    return min(distances, key=distances.get), distances
