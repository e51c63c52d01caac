"""Single-node 8-bit MatMulNBits models whose outputs tell which arithmetic a CPU's kernel for int8-block uses.

MLAS picks the kernel for MatMulNBits (accuracy level 4) by CPU feature, inside onnxruntime, where no log shows
it: x86 and ARM cores with dot-product instructions quantize the activations to int8 per block of `block_size`
values (symmetric, scale max|a|/127; ARM's dotprod kernel adds 128 to those codes for its unsigned dot product and
subtracts the offset's block sums afterwards in fp32, the same values to ~1e-5 of the largest output where the
signed kernels give ~1e-6); an ARM core without them has no int8 kernel for 8-bit weights and keeps the activations
in fp32, by widening the whole weight to fp32 at every run. Each choice leaves its own rounding in the output, so
the probe runs a node and asks which arithmetic, computed here in float64, the output matches. int4 and int8 need no
probe: edge-runtime's own MatMulInt4 and MatMulInt8 compute them with the same arithmetic on every CPU
(tests/test_integer_matmul.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

BITS = 8
# (K, N, block): blocks of 32 and 128, K a multiple of the block and not (192 % 128: a partial last block, as every
# block-128 node of the bundled model has).
SHAPES = ((256, 64, 32), (256, 64, 128), (192, 64, 128))
ROWS = 3


def probe_name(k: int, n: int, block: int) -> str:
    return f"nbits{BITS}_k{k}_n{n}_b{block}"


def write_probes(out: Path) -> None:
    """The probe models, their weights (codes, scales) and one activation matrix, into `out` (host side: onnx)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from edge_runtime.quant.integer import quantize_int8_blocks

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for k, n, block in SHAPES:
        codes, scale = quantize_int8_blocks(rng.standard_normal((n, k)).astype(np.float32), block)
        node = helper.make_node("MatMulNBits", ["A", "B", "S"], ["Y"], domain="com.microsoft", K=k, N=n, bits=BITS,
                                block_size=block, accuracy_level=4)
        graph = helper.make_graph([node], "probe", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [ROWS, k])],
                                  [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [ROWS, n])],
                                  [numpy_helper.from_array(codes, "B"),
                                   numpy_helper.from_array(scale.reshape(-1).astype(np.float32), "S")])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                        helper.make_opsetid("com.microsoft", 1)])
        name = probe_name(k, n, block)
        onnx.save(model, out / f"{name}.onnx")
        np.savez(out / f"{name}.npz", codes=codes, scale=scale)
    a = rng.standard_normal((ROWS, max(s[0] for s in SHAPES))).astype(np.float32)
    a *= np.linspace(0.2, 3.0, a.shape[1], dtype=np.float32)
    np.save(out / "activations.npy", a)


def weight_codes(codes: np.ndarray) -> np.ndarray:
    """MatMulNBits' stored 8-bit codes [N, blocks, block] as signed values (default zero point 128), decoded here
    independently of the exporter."""
    return codes.astype(np.float64) - 128


def candidates(codes: np.ndarray, scale: np.ndarray, a: np.ndarray) -> dict[str, np.ndarray]:
    """The node's output under each known arithmetic, in float64, for activations `a` [M, K]."""
    q = weight_codes(codes)
    n, blocks, block = q.shape
    k = a.shape[1]
    s = scale.reshape(n, blocks).astype(np.float64)
    w = (q * s[..., None]).reshape(n, -1)[:, :k]
    padded = np.zeros((len(a), blocks * block), np.float32)
    padded[:, :k] = a
    ab = padded.reshape(len(a), blocks, block)
    step = (np.abs(ab).max(-1) / np.float32(127)).astype(np.float32)
    inverse = np.where(step > 0, 1 / np.where(step > 0, step, 1), 0).astype(np.float32)
    qa = np.clip(np.rint(ab * inverse[..., None]), -127, 127).astype(np.float64)
    return {"fp32 activations": a.astype(np.float64) @ w.T,
            "int8 per block": np.einsum("mbk,nbk,mb,nb->mn", qa, q, step.astype(np.float64), s)}


def classify(output: np.ndarray, codes: np.ndarray, scale: np.ndarray, a: np.ndarray) -> tuple[str, dict[str, float]]:
    """The arithmetic whose output is nearest (max error relative to the largest output), and every distance."""
    distances = {name: float(np.abs(output - ref).max() / np.abs(ref).max())
                 for name, ref in candidates(codes, scale, a).items()}
    return min(distances, key=distances.get), distances
