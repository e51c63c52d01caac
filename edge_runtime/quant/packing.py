"""Bit-packed b-bit codes (b = 1..4) laid out so that turning a tile of them into floats is one table lookup.

Decoding is the hot loop of attention over a compressed cache (every key and value of the context, every
step), and numpy has no cheap bit arithmetic on wide arrays, so the layouts are chosen for byte tables:

* b = 1, 2, 4: 8/b codes per byte, least significant bits first (QJL's sign order). A [256, 8/b] table of
  values per byte value decodes a tile with one `np.take`.
* b = 3: a 2-bit plane (the low bits, 4 codes per byte) followed by a 1-bit plane (the high bits, 8 per
  byte): 3/8 byte per code, like the rest. A nibble of a high-bit byte covers the same 4 codes as one low-bit
  byte, so `low | nibble << 8` is a 12-bit index into a [4096, 4] table (64 KB, cache resident): one lookup
  on bytes to build the index, one float lookup.

Measured here (2 cores, numpy + OpenBLAS; tools/turboquant_distortion.py: inner_products over 32768 stored
vectors of d = 512 with 8 queries, tiles of 2048, decode + matmul, best of 5): 0.87 / 0.98 / 1.09 / 1.20 ns
per coordinate for 1 / 2 / 3 / 4 bits (fp32 matmul alone: 0.49). For 3 bits, c[lo] + hi * (c[lo + 4] - c[lo])
from three lookups was 1.5-2.3x slower than the 12-bit table in the same loop; unpackbits or uint32 shifts
far slower still.
(This machine is shared; timings vary up to 2x between runs.)
Widths that are not a multiple of 8 are zero-padded to one, so a vector is ceil(dim / 8) * b bytes.
"""

from __future__ import annotations

import numpy as np

BITS = (1, 2, 3, 4)


def padded(dim: int) -> int:
    return -(-dim // 8) * 8


def packed_bytes(dim: int, bits: int) -> int:
    """Bytes per vector of `dim` codes of `bits` bits."""
    return padded(dim) * bits // 8


def _pack_plane(codes: np.ndarray, bits: int) -> np.ndarray:
    per_byte = 8 // bits
    groups = codes.reshape(len(codes), -1, per_byte).astype(np.uint8)
    out = np.zeros(groups.shape[:2], np.uint8)
    for t in range(per_byte):
        out |= groups[..., t] << np.uint8(t * bits)
    return out


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """codes [n, dim] of values < 2**bits -> uint8 [n, packed_bytes(dim, bits)]."""
    codes = np.asarray(codes, dtype=np.uint8)
    dim = codes.shape[1]
    if dim != padded(dim):
        codes = np.pad(codes, ((0, 0), (0, padded(dim) - dim)))
    if bits == 3:
        return np.concatenate([_pack_plane(codes & 3, 2), _pack_plane(codes >> 2, 1)], axis=1)
    return _pack_plane(codes, bits)


class LookupTable:
    """Decodes packed codes of one width straight to their values (e.g. Lloyd-Max centroids, or +-1 signs)."""

    def __init__(self, values: np.ndarray, bits: int, dim: int) -> None:
        values = np.asarray(values, dtype=np.float32)
        if bits not in BITS or len(values) != 2**bits:
            raise ValueError(f"{len(values)} values for {bits}-bit codes: need 2**bits values, bits in {BITS}")
        self.bits, self.dim = bits, dim
        byte = np.arange(256)
        if bits == 3:
            index = np.arange(4096)[:, None]
            t = np.arange(4)
            self.table = values[((index >> (2 * t)) & 3) | (((index >> (8 + t)) & 1) << 2)]
            self.high = np.stack([(byte & 15) << 8, (byte >> 4) << 8], axis=1).astype(np.uint16)
        else:
            t = np.arange(8 // bits)
            self.table = values[(byte[:, None] >> (bits * t)) & (2**bits - 1)]
        self.table = np.ascontiguousarray(self.table, np.float32)  # also what the attention kernel reads

    def __call__(self, packed: np.ndarray) -> np.ndarray:
        """uint8 [n, packed_bytes] -> float32 [n, dim]."""
        n = len(packed)
        if self.bits == 3:
            split = padded(self.dim) // 4
            index = np.take(self.high, packed[:, split:], axis=0)
            index |= packed[:, :split].reshape(n, -1, 2)
            values = np.take(self.table, index, axis=0)
        else:
            values = np.take(self.table, packed, axis=0)
        values = values.reshape(n, -1)
        return values if values.shape[1] == self.dim else values[:, : self.dim]


def unpack(packed: np.ndarray, bits: int, dim: int) -> np.ndarray:
    """Inverse of pack: uint8 [n, packed_bytes] -> codes uint8 [n, dim]."""
    return LookupTable(np.arange(2**bits), bits, dim)(packed).astype(np.uint8)
