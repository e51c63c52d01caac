"""TurboQuant against its theory, and the speed of every KV codec's inner products.

Prints two markdown tables:
1. per d and b: the solver's exact D_mse, the measured mean |x - Q(x)|^2 (+- standard error) for random unit x
   (one rotation; 4000 vectors) and for the worst case x = e1..e8 (many rotations), and the prod variant's
   bias of <x, x> estimates and d * Var of <y, x> estimates (fresh rotation and S per seed) against
   (pi/2 - 1/d) * D_mse(b-1);
2. ns per coordinate of inner_products for d = 512, n = 32768 stored vectors, m = 8 queries (best of 5).

    python tools/turboquant_distortion.py
"""

from __future__ import annotations

import time

import numpy as np

from edge_runtime.quant.float_codecs import Float16Codec, Float32Codec, Int8Codec
from edge_runtime.quant.turboquant import (
    ChannelSplit,
    QJLQuantizer,
    TurboQuantizer,
    lloyd_max_distortion,
)


def unit_vectors(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def stats(samples: list[float]) -> tuple[float, float]:
    a = np.asarray(samples, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1) / np.sqrt(len(a)))


def distortion_table() -> None:
    print("| d | b | solver D_mse | MSE, random x | MSE, x = e1..e8 | prod bias of <x,x> | prod d*Var | theory |")
    print("| -: | -: | -: | -: | -: | -: | -: | -: |")
    for d in (128, 256, 512):
        x = unit_vectors(4000, d, seed=d)
        basis = np.eye(8, d, dtype=np.float32)
        y = unit_vectors(32, d, seed=1)
        for b in (1, 2, 3, 4):
            tq = TurboQuantizer(d, b, "mse", seed=0)
            rand = stats(((tq.decode(tq.encode(x)) - x) ** 2).sum(axis=1))
            e1 = []
            for seed in range(120):
                tq = TurboQuantizer(d, b, "mse", seed=1000 + seed)
                e1.append(((tq.decode(tq.encode(basis)) - basis) ** 2).sum(axis=1).mean())
            bias, variance = [], []
            for seed in range(20):
                xs = unit_vectors(500, d, seed=10_000 + seed)
                prod = TurboQuantizer(d, b, "prod", seed=seed)
                codes = prod.encode(xs)
                bias.append(np.mean(np.einsum("ij,ij->i", prod.decode(codes), xs) - 1))
                variance.append(d * np.mean((prod.inner_products(y, codes) - y @ xs.T) ** 2))
            theory = (np.pi / 2 - 1 / d) * (lloyd_max_distortion(d, b - 1) if b > 1 else 1.0)
            e1m, e1s = stats(e1)
            bm, bs = stats(bias)
            vm, vs = stats(variance)
            print(f"| {d} | {b} | {lloyd_max_distortion(d, b):.5f} | {rand[0]:.5f} ± {rand[1]:.5f} | "
                  f"{e1m:.5f} ± {e1s:.5f} | {bm:+.5f} ± {bs:.5f} | {vm:.4f} ± {vs:.4f} | {theory:.4f} |", flush=True)


def speed_table() -> None:
    d, n, m = 512, 32768, 8
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, d)).astype(np.float32)
    q = rng.standard_normal((m, d)).astype(np.float32)
    half = np.arange(d // 2)
    codecs = {"fp32": Float32Codec(d), "fp16": Float16Codec(d), "int8": Int8Codec(d),
              "qjl (m = 2d)": QJLQuantizer(d, 2 * d)}
    for b in (1, 2, 3, 4):
        codecs[f"tq{b} mse"] = TurboQuantizer(d, b, "mse")
    for b in (2, 3, 4):
        codecs[f"tq{b} prod"] = TurboQuantizer(d, b, "prod")
    codecs["tq3.5 mse (4+3 split)"] = ChannelSplit(half, TurboQuantizer(d // 2, 4), TurboQuantizer(d // 2, 3))
    codecs["tq2.5 mse (3+2 split)"] = ChannelSplit(half, TurboQuantizer(d // 2, 3), TurboQuantizer(d // 2, 2))
    print(f"\ninner_products, d = {d}, n = {n}, m = {m} queries (best of 5)\n")
    print("| codec | bytes/vector | ms | ns/coordinate |\n| --- | -: | -: | -: |")
    for name, codec in codecs.items():
        codes = codec.encode(x)
        best = np.inf
        for _ in range(5):
            start = time.perf_counter()
            codec.inner_products(q, codes)
            best = min(best, time.perf_counter() - start)
        print(f"| {name} | {codec.bytes_per_vector} | {best * 1e3:.1f} | {best / (n * d) * 1e9:.2f} |", flush=True)


if __name__ == "__main__":
    distortion_table()
    speed_table()
