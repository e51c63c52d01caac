"""Measure the candidate weight kernels (onnxruntime's and edge-runtime's own MatMulInt4 and MatMulInt8) at E2B's
matrix shapes, batch 1 (a decode step) or more rows (prefill), to choose export formats.

For each kernel: median milliseconds per product, the weight bytes it streams per call over that time (GB/s), and
its error relative to fp32 weights (max |y - y_fp32| / max |y_fp32|). Run on the target device: the ranking depends
on the CPU's integer dot-product instructions (on x86 without VNNI, int16 saturation in the u8 x s8 kernel shows up
as a large error).

    python tools/kernel_bench.py [--threads 2] [--repeats 30] [--rows 1]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from edge_runtime import onnxruntime_ops
from edge_runtime.weight_formats import Int4, Int8

SHAPES = {"mlp up (1536->6144)": (1536, 6144), "mlp down (6144->1536)": (6144, 1536),
          "lm head (1536->262144)": (1536, 262144)}


def _session(node: helper.NodeProto, inits: list, k: int, threads: int) -> ort.InferenceSession:
    graph = helper.make_graph([node], "k", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, ir_version=10, opset_imports=[
        helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1),
        helper.make_opsetid(onnxruntime_ops.DOMAIN, onnxruntime_ops.OPSET)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    if node.domain == onnxruntime_ops.DOMAIN:
        onnxruntime_ops.register(options, Path(__file__), "edge-runtime's candidates are",
                                 "run on x86-64-v3 or aarch64")
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _per_channel(w: np.ndarray, qmax: int) -> tuple[np.ndarray, np.ndarray]:
    scale = np.abs(w).max(1) / qmax
    return np.round(w / scale[:, None]).astype(np.int8), scale.astype(np.float32)


def candidates(w: np.ndarray) -> dict[str, tuple[helper.NodeProto, list, int]]:
    """name -> (node, initializers, weight bytes)"""
    n, k = w.shape
    out = {}
    for name, qmax, unsigned in (("DQMatMul s8 per-channel", 127, False), ("DQMatMul s8 7-bit per-channel", 63, False),
                                 ("DQMatMul u8 per-channel", 127, True)):
        q, scale = _per_channel(w, qmax)
        inits = [numpy_helper.from_array(scale, "s")]
        inputs = ["x", "B", "s"]
        if unsigned:
            inits.append(numpy_helper.from_array(np.full(n, 128, np.uint8), "z"))
            inputs.append("z")
            q = (q.astype(np.int16) + 128).astype(np.uint8)
        inits.append(numpy_helper.from_array(np.ascontiguousarray(q.T), "B"))
        out[name] = (helper.make_node("DynamicQuantizeMatMul", inputs, ["y"], domain="com.microsoft"), inits, q.nbytes)
    for bits, block in ((8, 32), (8, 128), (4, 32), (4, 64), (4, 128)):
        if k % block:
            continue
        blocks = w.reshape(n, k // block, block)
        offset = 1 << (bits - 1)
        scale = np.abs(blocks).max(2) / (offset - 1)
        q = (np.clip(np.round(blocks / scale[..., None]), -offset, offset - 1) + offset).astype(np.uint8)
        packed = q[..., 0::2] | (q[..., 1::2] << 4) if bits == 4 else q
        inits = [numpy_helper.from_array(packed, "B"), numpy_helper.from_array(scale.astype(np.float32).ravel(), "s")]
        node = helper.make_node("MatMulNBits", ["x", "B", "s"], ["y"], domain="com.microsoft", K=k, N=n, bits=bits,
                                block_size=block, accuracy_level=4)
        out[f"MatMulNBits {bits}-bit block {block}"] = (node, inits, packed.nbytes + scale.size * 4)
    for fmt in (Int4(32), Int4(64), Int4(128), Int8()):
        parts = fmt.encode(w)
        inits = [numpy_helper.from_array(parts["codes"], "codes"), numpy_helper.from_array(parts["scale"], "s")]
        node = helper.make_node(fmt.operator, ["x", "codes", "s"], ["y"], domain=onnxruntime_ops.DOMAIN)
        name = f"MatMulInt4 block {fmt.block_size}" if fmt.block_size else "MatMulInt8 per-channel"
        out[name] = (node, inits, sum(p.nbytes for p in parts.values()))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--rows", type=int, default=1, help="rows of x: 1 is a decode step, more a prefill")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(f"onnxruntime {ort.__version__}, {args.threads} threads, {args.rows} rows, median of {args.repeats}")
    for label, (k, n) in SHAPES.items():
        w = rng.standard_normal((n, k), dtype=np.float32)
        x = rng.standard_normal((args.rows, k), dtype=np.float32)
        ref = x @ w.T
        print(f"\n{label}")
        for name, (node, inits, nbytes) in candidates(w).items():
            session = _session(node, inits, k, args.threads)
            y = session.run(None, {"x": x})[0]
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                session.run(None, {"x": x})
                times.append(time.perf_counter() - start)
            ms = float(np.median(times)) * 1e3
            err = float(np.abs(y - ref).max() / np.abs(ref).max())
            print(f"  {name:32s} {ms:8.3f} ms  {nbytes / ms / 1e6:6.1f} GB/s  rel err {err:.4f}")


if __name__ == "__main__":
    main()
