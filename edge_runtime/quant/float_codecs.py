"""Float and int8 vector codecs in the VectorCodec protocol, so the KV cache treats every format alike.

fp16 and int8 codes are widened to float32 a tile at a time inside inner_products / weighted_sum (BLAS has
no fp16 or int8 matmul here), so no float copy of the whole cache is ever made. int8 is symmetric per
vector with a float32 scale; the scale multiplies the tile's scores (or weights), not the codes.
"""

from __future__ import annotations

import numpy as np

from edge_runtime.quant.code_parts import F16, F32, I8, CodePart, as_bytes
from edge_runtime.quant.codec import tiles
from edge_runtime.quant.integer import quantize_int8_rows


class Float32Codec:
    """Exact: the vectors themselves."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.bytes_per_vector = 4 * dim

    def empty(self, n: int) -> dict[str, np.ndarray]:
        return {"values": np.zeros((n, self.dim), np.float32)}

    def encode(self, x: np.ndarray) -> dict[str, np.ndarray]:
        return {"values": np.asarray(x, dtype=np.float32).reshape(-1, self.dim)}

    def decode(self, codes: dict[str, np.ndarray]) -> np.ndarray:
        return np.asarray(codes["values"], dtype=np.float32)

    def inner_products(self, q: np.ndarray, codes: dict[str, np.ndarray]) -> np.ndarray:
        return np.asarray(q, dtype=np.float32) @ codes["values"].T

    def weighted_sum(self, p: np.ndarray, codes: dict[str, np.ndarray]) -> np.ndarray:
        return np.asarray(p, dtype=np.float32) @ codes["values"]

    def parts(self, codes: dict[str, np.ndarray]) -> list[CodePart]:
        return [CodePart(F32, self.dim, as_bytes(codes["values"]))]


class Float16Codec:
    """Half precision; values beyond fp16's range become inf (keys and values of Gemma's normed heads stay far
    inside it)."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.bytes_per_vector = 2 * dim

    def empty(self, n: int) -> dict[str, np.ndarray]:
        return {"values": np.zeros((n, self.dim), np.float16)}

    def encode(self, x: np.ndarray) -> dict[str, np.ndarray]:
        return {"values": np.asarray(x, dtype=np.float32).reshape(-1, self.dim).astype(np.float16)}

    def decode(self, codes: dict[str, np.ndarray]) -> np.ndarray:
        return codes["values"].astype(np.float32)

    def inner_products(self, q: np.ndarray, codes: dict[str, np.ndarray]) -> np.ndarray:
        q = np.asarray(q, dtype=np.float32)
        values = codes["values"]
        out = np.empty((len(q), len(values)), np.float32)
        for t in tiles(len(values)):
            out[:, t] = q @ values[t].astype(np.float32).T
        return out

    def weighted_sum(self, p: np.ndarray, codes: dict[str, np.ndarray]) -> np.ndarray:
        p = np.asarray(p, dtype=np.float32)
        out = np.zeros((len(p), self.dim), np.float32)
        for t in tiles(p.shape[1]):
            out += p[:, t] @ codes["values"][t].astype(np.float32)
        return out

    def parts(self, codes: dict[str, np.ndarray]) -> list[CodePart]:
        return [CodePart(F16, self.dim, as_bytes(codes["values"]))]


class Int8Codec:
    """Symmetric int8 per vector: code = round(x / s), s = max|x| / 127, one float32 scale per vector."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.bytes_per_vector = dim + 4

    def empty(self, n: int) -> dict[str, np.ndarray]:
        return {"codes": np.zeros((n, self.dim), np.int8), "scale": np.zeros(n, np.float32)}

    def encode(self, x: np.ndarray) -> dict[str, np.ndarray]:
        codes, scale = quantize_int8_rows(np.asarray(x, dtype=np.float32).reshape(-1, self.dim))
        return {"codes": codes, "scale": scale}

    def decode(self, codes: dict[str, np.ndarray]) -> np.ndarray:
        return codes["codes"].astype(np.float32) * codes["scale"][:, None]

    def inner_products(self, q: np.ndarray, codes: dict[str, np.ndarray]) -> np.ndarray:
        q = np.asarray(q, dtype=np.float32)
        c, scale = codes["codes"], codes["scale"]
        out = np.empty((len(q), len(c)), np.float32)
        for t in tiles(len(c)):
            out[:, t] = (q @ c[t].astype(np.float32).T) * scale[t]
        return out

    def weighted_sum(self, p: np.ndarray, codes: dict[str, np.ndarray]) -> np.ndarray:
        p = np.asarray(p, dtype=np.float32)
        c, scale = codes["codes"], codes["scale"]
        out = np.zeros((len(p), self.dim), np.float32)
        for t in tiles(len(c)):
            out += (p[:, t] * scale[t]) @ c[t].astype(np.float32)
        return out

    def parts(self, codes: dict[str, np.ndarray]) -> list[CodePart]:
        return [CodePart(I8, self.dim, as_bytes(codes["codes"]), scale=codes["scale"])]
