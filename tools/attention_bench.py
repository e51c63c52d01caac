"""Time decode attention alone: one step's query (8 rows of one KV head, E2B's grouping) over N stored rows.

    python tools/attention_bench.py [--kv fp32 fp16 tq3.5 tq4] [--rows 2048 8192 32768] [--dim 256 512]
                                    [--workers 1 2] [--repeats 30] [--object OLD.so ...]

For each case, the median and the fastest milliseconds of a call through the runtime's own path
(`attention.attend`: the compiled kernel, long blocks split across --workers threads), and nanoseconds per stored
value read (keys and values: 2 x rows x dim). Random keys and values, every row visible; `fp32` is an exact block
(as the sliding rings are). With --object (a built attention-*.so kept from another source, say main's), each
object runs in turn with the one this machine loads, A B A B, so that a drift in the machine's speed moves them
alike; those objects are loaded without the source check the runtime makes. Figures depend on the CPU: the first
line names it and its SIMD flags.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from cost_model_check import lscpu
from edge_runtime import attention, attention_kernel
from edge_runtime.kv_formats import kv_format
from edge_runtime.worker_threads import Workers


def block(kv: str, rows: int, dim: int, rng: np.random.Generator) -> attention.Block:
    keys, values = rng.standard_normal((2, rows, dim)).astype(np.float32)
    fmt = kv_format(kv)
    key_codec, value_codec = fmt.keys.build(dim, keys[:64]), fmt.values.build(dim, values[:64])
    return attention.Block(key_codec, key_codec.encode(keys), value_codec, value_codec.encode(values),
                           np.arange(rows, dtype=np.int64), np.array([0]), np.array([rows]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kv", nargs="+", default=["fp32", "fp16", "tq3.5", "tq4"])
    parser.add_argument("--rows", nargs="+", type=int, default=[2048, 8192, 32768])
    parser.add_argument("--dim", nargs="+", type=int, default=[256, 512])
    parser.add_argument("--workers", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--object", nargs="*", type=Path, default=[], help="built kernels to time alongside")
    args = parser.parse_args()
    loaded = attention_kernel.load()
    if loaded is None:
        print("error: no attention kernel is built for this machine (python tools/build_kernels.py)", file=sys.stderr)
        return 1
    kernels = [loaded, *(attention_kernel.Kernel(ctypes.CDLL(str(p.resolve())), str(p)) for p in args.object)]
    name, simd = lscpu()
    print(f"CPU: {name}; SIMD flags: {' '.join(simd)}; kernels: {', '.join(k.name for k in kernels)}")
    rng = np.random.default_rng(0)
    pools = {w: Workers(w) if w > 1 else None for w in args.workers}
    for rows in args.rows:
        for dim in args.dim:
            query = rng.standard_normal((1, 1, 8, dim)).astype(np.float32)
            for kv in args.kv:
                blocks = [[block(kv, rows, dim, rng)]]
                for workers in args.workers:
                    times: list[list[float]] = [[] for _ in kernels]
                    for repeat in range(args.repeats + 1):  # the first round warms the caches and is dropped
                        for k, kernel in enumerate(kernels):
                            attention_kernel.load = lambda kernel=kernel: kernel  # the path attend() takes
                            start = time.perf_counter()
                            attention.attend(query, blocks, pools[workers])
                            if repeat:
                                times[k].append(time.perf_counter() - start)
                    for kernel, t in zip(kernels, times):
                        median, fastest = statistics.median(t), min(t)
                        print(f"{kv:6s} rows {rows:6d} dim {dim:4d} workers {workers} {kernel.name}: "
                              f"{median * 1e3:8.3f} ms {median * 1e9 / (2 * rows * dim):.3f} ns/value "
                              f"(fastest {fastest * 1e3:.3f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
