"""Single-node MatMulNBits models whose outputs tell which arithmetic a CPU's 4-bit and 8-bit kernels use.

MLAS picks the kernel for MatMulNBits (accuracy level 4) by CPU feature, inside onnxruntime, where no log shows
it: x86 and ARM cores with dot-product instructions quantize the activations to int8 per block of `block_size`
values (symmetric, scale max|a|/127; for 8-bit weights ARM's dotprod kernel adds 128 to those codes for its
unsigned dot product and subtracts the offset's block sums afterwards in fp32, the same values to ~1e-5 of the
largest output where the signed kernels give ~1e-6); an ARM core without them has no int8 kernel
for 4-bit or 8-bit weights and keeps the activations in fp32 (for 8-bit, by widening the whole weight to fp32 at
every run); where KleidiAI takes the node (4-bit only: dotprod cores, K a multiple of the block, no zero points),
activations are quantized per row, asymmetrically (KleidiAI's qai8dx packing). Each choice leaves its own rounding
in the output, so the probe runs a node on an activation with an outlier and asks which arithmetic, computed here
in float64, the output matches.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

# (bits, K, N, block): K a multiple of the block (KleidiAI may take a 4-bit node) and not (192 % 128: a partial
# last block, as every block-128 node of the bundled model has).
SHAPES = tuple((bits, *shape) for bits in (4, 8) for shape in ((256, 64, 32), (256, 64, 128), (192, 64, 128)))
ROWS = 3


def probe_name(bits: int, k: int, n: int, block: int) -> str:
    return f"nbits{bits}_k{k}_n{n}_b{block}"


def write_probes(out: Path) -> None:
    """The probe models, their weights (codes, scales, bits) and one activation matrix, into `out` (host side:
    onnx)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from edge_runtime.quant.integer import quantize_int4_blocks, quantize_int8_blocks

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for bits, k, n, block in SHAPES:
        quantize = quantize_int4_blocks if bits == 4 else quantize_int8_blocks
        codes, scale = quantize(rng.standard_normal((n, k)).astype(np.float32), block)
        node = helper.make_node("MatMulNBits", ["A", "B", "S"], ["Y"], domain="com.microsoft", K=k, N=n, bits=bits,
                                block_size=block, accuracy_level=4)
        graph = helper.make_graph([node], "probe", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [ROWS, k])],
                                  [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [ROWS, n])],
                                  [numpy_helper.from_array(codes, "B"),
                                   numpy_helper.from_array(scale.reshape(-1).astype(np.float32), "S")])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                        helper.make_opsetid("com.microsoft", 1)])
        name = probe_name(bits, k, n, block)
        onnx.save(model, out / f"{name}.onnx")
        np.savez(out / f"{name}.npz", codes=codes, scale=scale, bits=bits)
    a = rng.standard_normal((ROWS, max(s[1] for s in SHAPES))).astype(np.float32)
    a *= np.linspace(0.2, 3.0, a.shape[1], dtype=np.float32)
    a[:, 7] = 9.0  # an outlier: per-row and per-block quantization round the rest of the row differently
    a[1] += 0.7  # a row not centred on zero, where asymmetric quantization differs most from symmetric
    np.save(out / "activations.npy", a)


def weight_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """MatMulNBits' stored codes [N, blocks, bytes] as signed values [N, blocks, block] (default zero points: 8 and
    128), decoded here independently of the exporter."""
    if bits == 4:
        n, blocks, half = codes.shape
        return np.stack([codes & 15, codes >> 4], -1).reshape(n, blocks, 2 * half).astype(np.float64) - 8
    return codes.astype(np.float64) - 128


def candidates(codes: np.ndarray, scale: np.ndarray, a: np.ndarray, bits: int) -> dict[str, np.ndarray]:
    """The node's output under each known arithmetic, in float64, for activations `a` [M, K]."""
    q = weight_codes(codes, bits)
    n, blocks, block = q.shape
    k = a.shape[1]
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


def classify(output: np.ndarray, codes: np.ndarray, scale: np.ndarray, a: np.ndarray,
             bits: int) -> tuple[str, dict[str, float]]:
    """The arithmetic whose output is nearest (max error relative to the largest output), and every distance."""
    distances = {name: float(np.abs(output - ref).max() / np.abs(ref).max())
                 for name, ref in candidates(codes, scale, a, bits).items()}
    return min(distances, key=distances.get), distances
