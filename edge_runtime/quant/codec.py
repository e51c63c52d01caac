"""The vector codec protocol: how the KV cache and the PLE store see every storage format alike.

A codec stores vectors of one width as a dict of arrays with a leading axis per vector, so a cache can
allocate `empty(slots)` once, write `storage[name][slots] = encode(x)[name]` and hand slices of it back.
Attention never asks for floats: keys meet queries only in `inner_products` and values meet attention
weights only in `weighted_sum`, so a codec can transform the query once and read its codes a tile at a
time, and the cache is never decoded as a whole.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import numpy as np

# Vectors decoded per step of inner_products / weighted_sum: 2048 x 512 float32 is 4 MB, big enough for BLAS
# to run at speed and small enough that a tile's floats never outgrow the caches by much.
TILE = 2048


class VectorCodec(Protocol):
    dim: int
    bytes_per_vector: int  # everything stored per vector: codes, norms, scales

    def empty(self, n: int) -> dict[str, np.ndarray]:
        """Zeroed storage for n vectors; every array has leading axis n."""

    def encode(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """x [n, dim] float of any norm -> codes (arrays with leading axis n)."""

    def decode(self, codes: dict[str, np.ndarray]) -> np.ndarray:
        """Codes of n vectors -> [n, dim] float32."""

    def inner_products(self, q: np.ndarray, codes: dict[str, np.ndarray]) -> np.ndarray:
        """q [m, dim] -> [m, n] float32 estimate of q @ x.T."""

    def weighted_sum(self, p: np.ndarray, codes: dict[str, np.ndarray]) -> np.ndarray:
        """p [m, n] -> [m, dim] float32 estimate of p @ x."""


def tiles(n: int, tile: int = TILE) -> Iterator[slice]:
    for start in range(0, n, tile):
        yield slice(start, min(start + tile, n))


def vector_count(codes: dict[str, np.ndarray]) -> int:
    return len(next(iter(codes.values())))
