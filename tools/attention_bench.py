"""Time decode attention alone: one step's query (8 rows of one KV head, E2B's grouping) over N stored rows.

    python tools/attention_bench.py [--kv fp32 fp16 tq3.5 tq4] [--rows 2048 8192 32768] [--dim 256 512]
                                    [--workers 1 2] [--repeats 30] [--object OLD.so ...] [--profile x86_64-dev]

For each case, the median and the fastest milliseconds of a call through the path a decode step takes
(`attention.DecodeAttention`: the compiled kernel's calls prepared once, long blocks split across --workers
threads; `--general` times `attention.attend` instead, which builds its calls at every call, as a step of several
tokens does), and nanoseconds per stored value read (keys and values: 2 x rows x dim). Random keys and values,
every row visible; `fp32` is an exact block (as the sliding rings are). With --object (a built attention-*.so kept
from another source, say main's), each object runs in turn with the one this machine loads, A B A B, so that a
drift in the machine's speed moves them alike; those objects are loaded without the source check the runtime makes.
Figures depend on the CPU: the first line names it and its SIMD flags.

With more than one worker, the caller and each helper thread are pinned to a core of their own: unpinned, the
scheduler here sometimes kept a helper queued behind the caller on one core for a whole run, and a split call took
the time of its shares one after the other (tq3.5, 8k rows of 512: 2.3 ms against 1.3 pinned). Decode steps, with
onnxruntime's threads in between, did not show it (E2B int4 at 8k, 2 threads, steps alternating pinned and free in
one process: 57.6 and 57.1 ms a step with tq3.5, 53.6 and 53.8 with fp16), so the runtime leaves placement alone.

Each line also gives the values per cycle per thread the call implies at --profile's clock (the profile that
describes this machine): what cost_model.py's ATTENTION_VALUES_PER_CYCLE (float kinds) and PACKED_VALUES_PER_CYCLE
(TurboQuant, QJL) hold, measured on long blocks at the profile's thread count.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from cost_model_check import lscpu
from edge_runtime import attention, attention_kernel
from edge_runtime.kv_formats import kv_format
from edge_runtime.profiles import load_profile
from edge_runtime.worker_threads import Workers


def block(kv: str, rows: int, dim: int, rng: np.random.Generator) -> attention.Block:
    keys, values = rng.standard_normal((2, rows, dim)).astype(np.float32)
    fmt = kv_format(kv)
    key_codec, value_codec = fmt.keys.build(dim, keys[:64]), fmt.values.build(dim, values[:64])
    return attention.Block(key_codec, key_codec.encode(keys), value_codec, value_codec.encode(values),
                           np.arange(rows, dtype=np.int64), np.array([0]), np.array([rows]))


def pin(pool: Workers) -> None:
    """The caller on the first allowed core, helper k on the k-th (see the module docstring)."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < pool.threads:
        raise SystemExit(f"error: {pool.threads} workers need as many cores; this process may use {len(cores)}")
    pool.run([lambda core=core: os.sched_setaffinity(0, {core}) for core in cores[:pool.threads]])


def step_call(kernel: attention_kernel.Kernel, query: np.ndarray, blocks: list[list[attention.Block]],
              pool: Workers | None, general: bool) -> Callable[[], object]:
    """One call of attention over `blocks` as a decode step makes it with `kernel` (or as `attend` does)."""
    if general:
        def attend() -> np.ndarray:
            attention_kernel.load = lambda: kernel  # attend takes the kernel at each call
            return attention.attend(query, blocks, pool)
        return attend
    attention_kernel.load = lambda: kernel  # DecodeAttention takes it once, when built
    heads = np.ascontiguousarray(query[0])
    prepared = attention.DecodeAttention.build(lambda: blocks, heads, np.empty_like(heads), pool, kernel.scratch())
    if prepared is None:
        raise SystemExit(f"error: the kernel cannot take a block of {blocks[0][0].size} rows in one step")
    return lambda: prepared(blocks[0][0].size)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kv", nargs="+", default=["fp32", "fp16", "tq3.5", "tq4"])
    parser.add_argument("--rows", nargs="+", type=int, default=[2048, 8192, 32768])
    parser.add_argument("--dim", nargs="+", type=int, default=[256, 512])
    parser.add_argument("--workers", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--object", nargs="*", type=Path, default=[], help="built kernels to time alongside")
    parser.add_argument("--general", action="store_true", help="time attention.attend, not a decode step's path")
    parser.add_argument("--profile", default="x86_64-dev", help="the profile describing this machine (its clock)")
    args = parser.parse_args()
    clock = load_profile(args.profile).clock_ghz
    loaded = attention_kernel.load()
    if loaded is None:
        print("error: no attention kernel is built for this machine (python tools/build_kernels.py)", file=sys.stderr)
        return 1
    kernels = [loaded, *(attention_kernel.Kernel(ctypes.CDLL(str(p.resolve())), str(p)) for p in args.object)]
    name, simd = lscpu()
    print(f"CPU: {name}; SIMD flags: {' '.join(simd)}; kernels: {', '.join(k.name for k in kernels)}")
    rng = np.random.default_rng(0)
    pools = {w: Workers(w) if w > 1 else None for w in args.workers}
    for pool in pools.values():
        if pool:
            pin(pool)
    for rows in args.rows:
        for dim in args.dim:
            query = rng.standard_normal((1, 1, 8, dim)).astype(np.float32)
            for kv in args.kv:
                blocks = [[block(kv, rows, dim, rng)]]
                for workers in args.workers:
                    calls = [step_call(kernel, query, blocks, pools[workers], args.general) for kernel in kernels]
                    times: list[list[float]] = [[] for _ in kernels]
                    for repeat in range(args.repeats + 1):  # the first round warms the caches and is dropped
                        for k, call in enumerate(calls):
                            start = time.perf_counter()
                            call()
                            if repeat:
                                times[k].append(time.perf_counter() - start)
                    for kernel, t in zip(kernels, times):
                        median, fastest = statistics.median(t), min(t)
                        per_value = median / (2 * rows * dim)
                        print(f"{kv:6s} rows {rows:6d} dim {dim:4d} workers {workers} {kernel.name}: "
                              f"{median * 1e3:8.3f} ms {per_value * 1e9:.3f} ns/value "
                              f"{1 / (per_value * workers * clock * 1e9):.2f} values/cycle/thread "
                              f"(fastest {fastest * 1e3:.3f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
