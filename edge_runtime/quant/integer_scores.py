"""Keys scored in integers: an int8 query against int8 centroids, the way llama.cpp scores quantized keys.

Decode attention over TurboQuant keys was bound by arithmetic, not bytes: every stored value met 8 float
multiply-adds (8 query rows a KV head) after a table lookup, so tq3.5 at 8k context cost more than fp16, whose
conversion is cheaper than a lookup, though it read a quarter of the bytes. Scored as integers, 4 products take
one instruction where the CPU has a dot product (x86's AVX-512 VNNI vpdpbusd: 64 a vector; Armv8.2's sdot: 16),
and the codes decode to bytes, not floats.

The sums are exact integers, the same on every build of the attention kernel and in numpy (a float32 matrix
product of small integers is exact while its sums stay below 2**24: 127 * 127 * 1024 < 2**24, the kernel's widest
part), so the kernel still equals its numpy reference to float32 precision:
- the centroids are an int8 grid: `levels * step`, levels in [-127, 127] (the codebook rounded to the nearest of
  255 points; at 4 bits the grid moves a Lloyd-Max centroid by at most 0.4% of the largest);
- each rotated query row is scaled by a power of two, 2**-e with e the least for which its largest magnitude
  stays within 127, and rounded to the nearest integer (ties to even): no rounding in the scaling, so numpy,
  rotating the query by the kernel's butterflies in the kernel's order (turboquant.hadamard_rotate), gets the
  kernel's integers. A power of two keeps 7 to 8 bits of the largest value where a free scale would keep 8.

A score is then float(ints @ levels) * (2**e * step) * norm, multiplied in that order by both.
"""

from __future__ import annotations

import numpy as np

LEVEL = 127  # largest magnitude of an int8 centroid and of a query integer
# numpy rotates up to this many query rows (a decode step's, at most the attention kernel's MAX_ROWS) by the kernel's
# butterflies, for the kernel's integers; more (a prefill chunk's) by BLAS's dense product, 6-8x faster here than
# butterflies in numpy at 1024 rows (1.8 against 12.4 ms, d 512), whose rounding may move an integer by one at a tie:
# an estimate as good, not the kernel's bits.
BUTTERFLY_ROWS = 64
# Rows whose largest magnitude is below this quantize to zeros (the power of two would leave float32's range).
TINY = np.float32(2.0**-64)


def int8_grid(codebook: np.ndarray) -> tuple[np.ndarray, np.float32]:
    """(levels int8, step float32) with levels * step the codebook's nearest grid points."""
    codebook = np.asarray(codebook, np.float32)
    step = np.float32(np.abs(codebook).max()) / np.float32(LEVEL)
    levels = np.clip(np.rint(codebook / step), -LEVEL, LEVEL).astype(np.int8)
    return levels, step


def quantize_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x [rows, width] float32 -> (integers as float32 [rows, width], scale float32 [rows]): x ~ integers * scale,
    each row's scale a power of two (see the module's docstring; the kernel's quantize_query mirrors it)."""
    x = np.asarray(x, np.float32)
    top = np.abs(x).max(axis=1) if x.shape[1] else np.zeros(len(x), np.float32)
    fraction, exponent = np.frexp(np.where(top >= TINY, top, np.float32(1)))
    exponent = exponent - 7 + (fraction > np.float32(LEVEL / 128))
    scale = np.ldexp(np.float32(1), exponent).astype(np.float32)
    integers = np.rint(x * np.ldexp(np.float32(1), -exponent).astype(np.float32)[:, None])
    integers[top < TINY] = 0
    return integers, np.where(top >= TINY, scale, np.float32(0)).astype(np.float32)
