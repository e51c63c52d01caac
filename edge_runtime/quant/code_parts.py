"""Every stored vector format as a sum of parts that one compiled kernel can read in place.

A codec's stored vector x is reconstructed as x[C_p] += coef_p * scale_p[n] * decode_p(row_n) @ T_p.T, summed over
parts p:
- the part's codes are a [n, bytes] uint8 array (a float32 or float16 store is its bytes, seen as uint8);
- decode_p widens one row: float32 as is, float16 by its bits, int8 as integers, b-bit packed codes to their
  2**b values (Lloyd-Max centroids, or -1/+1 for sign bits), given by the codec's byte table
  (edge_runtime.quant.packing.LookupTable: a byte, or for 3 bits a low byte and a high nibble, straight to its 8/b
  values; the kernel reads the 2**b values back from it and looks 8 codes up at a time with one shuffle);
- scale_p is a per-vector float32 array (a norm, an int8 scale) or None, coef_p a constant;
- C_p are the channels of x the part covers (ChannelSplit's halves), or None for all of them;
- T_p is the part's transform [len(C_p), width] (a rotation, a Gaussian projection) or None for the identity; a
  randomized Hadamard rotation also gives its sign vectors, which the kernel applies as fast transforms instead
  of reading T_p;
- a packed part's `levels` (int8, its values / `step`), where given, make it a key part scored in integers
  (edge_runtime.quant.integer_scores): the query quantized after T_p, the sums exact.
So <q, x> = sum_p coef_p scale_p[n] <q[C_p] @ T_p, decode_p(row_n)>: the query is transformed once per part and
each row is read once, and a weighted sum over rows accumulates sum_n w_n coef_p scale_p[n] decode_p(row_n) per
part in the part's own domain, transformed back once at the end. This is the contract between the codecs
(edge_runtime.quant) and the attention kernel (edge_runtime.attention_kernel).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from edge_runtime.quant.packing import LookupTable

F32, F16, I8, PACKED = 0, 1, 2, 3


@dataclass(frozen=True)
class CodePart:
    kind: int
    width: int  # values per decoded row
    codes: np.ndarray  # [n, bytes] uint8, rows in slot order
    bits: int = 0  # PACKED: 1..4
    lookup: np.ndarray | None = None  # PACKED: the codec's LookupTable.table (float32, C order)
    scale: np.ndarray | None = None  # [n] float32 per-vector factor
    coef: float = 1.0
    transform: np.ndarray | None = None  # [len(channels), width] float32 C order; None: identity
    channels: np.ndarray | None = None  # int64: the vector's channels this part covers; None: all of them
    hadamard: np.ndarray | None = None  # [rounds, width] float32 signs: transform is turboquant.hadamard_rotation's
    levels: np.ndarray | None = None  # PACKED: int8 [2**bits], lookup's values / step: keys scored in integers
    step: float = 0.0

    def rows(self, start: int, stop: int) -> CodePart:
        """The same part over rows [start, stop): how a long block is shared between threads."""
        scale = None if self.scale is None else self.scale[start:stop]
        return replace(self, codes=self.codes[start:stop], scale=scale)


def as_bytes(values: np.ndarray) -> np.ndarray:
    """A [n, dim] float32 / float16 / int8 store as [n, bytes] uint8, without copying."""
    return values.view(np.uint8).reshape(len(values), -1)


def packed_part(codes: np.ndarray, lookup: LookupTable, width: int, scale: np.ndarray | None, coef: float = 1.0,
                transform: np.ndarray | None = None, hadamard: np.ndarray | None = None,
                levels: np.ndarray | None = None, step: float = 0.0) -> CodePart:
    return CodePart(PACKED, width, codes, lookup.bits, lookup.table, scale, float(coef), transform, hadamard=hadamard,
                    levels=levels, step=float(step))
