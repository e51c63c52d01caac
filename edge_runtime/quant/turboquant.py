"""TurboQuant (Zandieh et al., arXiv 2504.19874) and QJL (arXiv 2406.03482) vector codecs.

TurboQuant stores a vector as its norm and the b-bit Lloyd-Max codes of its randomly rotated unit vector:
after a Haar rotation every coordinate of a unit vector follows the same known law (density proportional to
(1 - x^2)^((d-3)/2), close to N(0, 1/d)), so one scalar codebook per (d, b) is optimal for every
coordinate and the error of a worst-case input equals the average one. The `prod` variant spends b-1 bits
on that and 1 bit per coordinate on QJL signs of the residual, which makes inner products unbiased.

QJL stores sign(S k) for a Gaussian S and |k|; the query is projected, not quantized, and
sqrt(pi/2)/m * |k| * <S q, sign(S k)> is an unbiased estimate of <q, k>.

All codecs implement edge_runtime.quant.codec.VectorCodec: the query is rotated / projected once, then the
codes are decoded a tile at a time with byte-table lookups (edge_runtime.quant.packing) into a BLAS matmul;
weighted sums accumulate in the rotated domain and rotate back once.
"""

from __future__ import annotations

from dataclasses import replace
from functools import cache, lru_cache

import numpy as np

from edge_runtime.quant.code_parts import CodePart, packed_part
from edge_runtime.quant.codec import VectorCodec, tiles, vector_count
from edge_runtime.quant.integer_scores import BUTTERFLY_ROWS, int8_grid, quantize_rows
from edge_runtime.quant.packing import LookupTable, pack, packed_bytes

_NODES, _WEIGHTS = np.polynomial.legendre.leggauss(48)
_PANELS = 8
_QJL_STREAM = 0x514A4C  # keeps the QJL projections independent of rotations drawn from the same seed
_HADAMARD_STREAM = 0x484144  # and a Hadamard rotation's signs independent of both


def _cell_moments(dim: int, edges: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Integrals of x^k (1 - x^2)^((dim-3)/2) over the cells between consecutive `edges`, k = 0, 1, 2.

    Integrated in the angle x = sin(phi), where the density is cos(phi)^(dim-2): smooth even at dim 2, where
    it is singular in x. Composite Gauss-Legendre (8 panels x 48 nodes per cell) is exact to float64 for the
    cells Lloyd-Max produces.
    """
    angles = np.arcsin(np.clip(edges, -1.0, 1.0))
    cuts = angles[:-1, None] + np.diff(angles)[:, None] * np.linspace(0.0, 1.0, _PANELS + 1)
    a, b = cuts[:, :-1, None], cuts[:, 1:, None]
    phi = (a + b) / 2 + (b - a) / 2 * _NODES
    weight = (b - a) / 2 * _WEIGHTS * np.cos(phi) ** (dim - 2)
    x = np.sin(phi)
    return weight.sum(axis=(1, 2)), (weight * x).sum(axis=(1, 2)), (weight * x * x).sum(axis=(1, 2))


def _support(dim: int) -> float:
    """Where the coordinate's mass lives: beyond 14/sqrt(dim) the density is below exp(-98) of its peak."""
    return float(np.sin(min(np.pi / 2, 14.0 / np.sqrt(dim))))


@cache
def _lloyd_max(dim: int, bits: int) -> tuple[np.ndarray, float]:
    if dim < 2 or not 1 <= bits <= 8:
        raise ValueError(f"Lloyd-Max codebook for dim={dim}, bits={bits}: need dim >= 2 and 1 <= bits <= 8")
    levels = 2**bits
    limit = _support(dim)
    centroids = (np.arange(levels) - (levels - 1) / 2) * (4.0 / levels) * min(1.0 / np.sqrt(dim), 0.5)
    for _ in range(100_000):
        edges = np.concatenate([[-limit], (centroids[1:] + centroids[:-1]) / 2, [limit]])
        m0, m1, m2 = _cell_moments(dim, edges)
        new = m1 / m0
        done = np.abs(new - centroids).max() < 1e-13 / np.sqrt(dim)
        centroids = new
        if done:
            break
    distortion = dim * float((m2 - 2 * centroids * m1 + centroids**2 * m0).sum() / m0.sum())
    return centroids, distortion


def lloyd_max_codebook(dim: int, bits: int) -> np.ndarray:
    """Sorted float32 [2**bits] Lloyd-Max centroids for one coordinate of a uniform random unit vector in R^dim."""
    return _lloyd_max(dim, bits)[0].astype(np.float32)


def lloyd_max_distortion(dim: int, bits: int) -> float:
    """Expected |x - Q(x)|^2 of a uniform random unit vector in R^dim under that codebook (all dim coordinates).

    In high dimension it tends to the Gaussian Lloyd-Max values 0.3634, 0.1175, 0.03454, 0.009497 (b = 1..4).
    """
    return _lloyd_max(dim, bits)[1]


@lru_cache(maxsize=16)
def random_rotation(dim: int, seed: int) -> np.ndarray:
    """Haar-distributed orthogonal float32 [dim, dim]: Q of a Gaussian's QR with R's diagonal made positive.

    Without the sign fix Q would depend on LAPACK's sign convention and not be uniform; with it every input,
    e.g. a basis vector, is rotated to a uniform point of the sphere.
    """
    q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((dim, dim)))
    rotation = (q * np.sign(np.diag(r))).astype(np.float32)
    rotation.setflags(write=False)
    return rotation


HADAMARD_ROUNDS = 3


@lru_cache(maxsize=16)
def hadamard_signs(dim: int, seed: int) -> np.ndarray:
    """float32 [HADAMARD_ROUNDS, dim] of random signs / sqrt(dim): the randomized Hadamard rotation
    diag(s0) H diag(s1) H diag(s2) H, H the Sylvester Hadamard matrix (dim a power of two). Orthogonal like a Haar
    rotation, it is applied as fast Walsh-Hadamard transforms (dim log2(dim) additions a round, no matrix to read): a
    decode step's dense 512 x 512 rotation, cold after the layer's weights streamed past, cost the attention kernel
    ~200-400 us a layer. Three rounds: with two, a basis vector (all of H's rows alike under one round) came out with
    up to 1.6x the Lloyd-Max distortion (d 256, 4 bits); with three it stays within 7% of the Haar rotation's for
    basis, Gaussian, per-channel-scaled and sparse vectors, d 128-512 (with one round a basis vector is flat)."""
    if not is_power_of_two(dim):
        raise ValueError(f"a Hadamard rotation needs a power-of-two width, got {dim}")
    signs = np.where(np.random.default_rng([seed, _HADAMARD_STREAM]).random((HADAMARD_ROUNDS, dim)) < 0.5, -1.0, 1.0)
    signs = (signs / np.sqrt(dim)).astype(np.float32)
    signs.setflags(write=False)
    return signs


@lru_cache(maxsize=16)
def hadamard_rotation(dim: int, seed: int) -> np.ndarray:
    """The dense float32 [dim, dim] matrix of `hadamard_signs`' rotation, for numpy's matrix products."""
    h = np.ones((1, 1))
    while len(h) < dim:
        h = np.block([[h, h], [h, -h]])
    rotation = np.eye(dim)
    for signs in hadamard_signs(dim, seed).astype(np.float64):
        rotation = (rotation * signs) @ h
    rotation = rotation.astype(np.float32)
    rotation.setflags(write=False)
    return rotation


def hadamard_rotate(x: np.ndarray, signs: np.ndarray) -> np.ndarray:
    """x [m, dim] @ the rotation of `signs` (hadamard_signs) by fast transforms, in the attention kernel's order of
    float32 operations (per round: a product by the signs, then butterfly stages (a, b) -> (a + b, a - b) at
    distances 1, 2, 4, ...), on the kernel's layout (the rows in the fast axis): the kernel rotates a query this way,
    and integer key scores need the same bits on both sides (integer_scores)."""
    m, dim = x.shape
    t = np.array(np.asarray(x, np.float32).T, order="C")
    spare = np.empty_like(t)
    for round_signs in signs:
        t *= round_signs[:, None]
        h = 1
        while h < dim:
            pairs, out = t.reshape(dim // (2 * h), 2, h, m), spare.reshape(dim // (2 * h), 2, h, m)
            np.add(pairs[:, 0], pairs[:, 1], out=out[:, 0])
            np.subtract(pairs[:, 0], pairs[:, 1], out=out[:, 1])
            t, spare = spare, t
            h *= 2
    return np.ascontiguousarray(t.T)


def is_power_of_two(n: int) -> bool:
    return n >= 2 and n & (n - 1) == 0


@lru_cache(maxsize=16)
def _gaussian(rows: int, cols: int, seed: int) -> np.ndarray:
    s = np.random.default_rng([seed, _QJL_STREAM]).standard_normal((rows, cols)).astype(np.float32)
    s.setflags(write=False)
    return s


def _norms(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(norms float32 [n], x / norm with zero vectors left at zero)."""
    norm = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64)).astype(np.float32)
    return norm, x / np.where(norm > 0, norm, 1)[:, None]


_SIGNS = np.array([-1.0, 1.0], np.float32)


class TurboQuantizer:
    """TurboQuant at `bits` per coordinate.

    mode="mse": codes of the rotated unit vector + float32 norm.
    mode="prod": (bits-1)-bit mse codes + 1-bit QJL of the residual + the residual's norm, so that inner
    products are unbiased. The residual r = Rx/|x| - c is taken in the rotated domain (S R is as Gaussian as
    S, and the query is rotated anyway), sign(S r) with S an independent dim x dim Gaussian, and
    <y, x> ~ <y, x_mse> + sqrt(pi/2)/dim * |x| |r| <S R y, sign(S r)>. With bits == 1 it is QJL of the whole
    vector (|r| = 1). Rotations map x to x @ rotation, so rotated rows are decoded with one matmul back.

    unbiased=True (mse only) stores |x| / <c, u> in place of |x| (u the rotated unit vector, c its centroids),
    so the reconstruction's projection on x is exact and its error is orthogonal to x: <y, x_hat> is then
    unbiased for any y, without QJL's extra variance (the estimator of RaBitQ, Gao & Long 2024). Plain MSE
    codes shrink every inner product by about 1 - D_mse, which at Gemma's sharp attention acts as a
    temperature change.

    rotation="hadamard" (dim a power of two) rotates by `hadamard_rotation` in place of a Haar matrix: what the KV
    cache uses, so that decode attention applies it as two fast transforms; the Haar rotation stays the default
    (and the PLE store's, whose codes an artifact holds). Its mse codes are also scored in integers
    (integer_scores): the codebook is an int8 grid (`levels` * `step`) and inner products quantize the rotated
    query, as the attention kernel does.

    Codes: "norm" (float32 |x|), "codes" (packed mse codes, if bits-1 > 0 or mode is mse), "signs" (packed,
    prod) and "residual" (float32 |x| |r|, prod with bits > 1).
    """

    def __init__(self, dim: int, bits: int, mode: str = "mse", seed: int = 0, unbiased: bool = False,
                 rotation: str = "haar") -> None:
        if mode not in ("mse", "prod"):
            raise ValueError(f"mode={mode!r}: choose 'mse' or 'prod'")
        if rotation not in ("haar", "hadamard"):
            raise ValueError(f"rotation={rotation!r}: choose 'haar' or 'hadamard'")
        if unbiased and mode != "mse":
            raise ValueError("unbiased=True corrects mse codes; prod codes are unbiased already")
        self.unbiased = unbiased
        if not 1 <= bits <= 4:
            raise ValueError(f"bits={bits}: TurboQuant codes here have 1 to 4 bits")
        self.dim, self.bits, self.mode, self.seed = dim, bits, mode, seed
        self.hadamard = hadamard_signs(dim, seed) if rotation == "hadamard" else None
        self.rotation = random_rotation(dim, seed) if self.hadamard is None else hadamard_rotation(dim, seed)
        self.mse_bits = bits if mode == "mse" else bits - 1
        self.bytes_per_vector = 4 + (packed_bytes(dim, self.mse_bits) if self.mse_bits else 0)
        self.levels, self.step = None, np.float32(0)
        if self.mse_bits:
            self.codebook = lloyd_max_codebook(dim, self.mse_bits)
            if self.hadamard is not None:
                self.levels, self.step = int8_grid(self.codebook)
                self.codebook = self.levels.astype(np.float32) * self.step
                self._level_table = LookupTable(self.levels, self.mse_bits, dim)
            self._boundaries = (self.codebook[1:] + self.codebook[:-1]) / 2
            self._centroids = LookupTable(self.codebook, self.mse_bits, dim)
        if mode == "prod":
            # Projection of a rotated vector; `rotation @ sketch.T` projects an unrotated query in one matmul.
            self.sketch = _gaussian(dim, dim, seed)
            self._project = self.rotation @ self.sketch.T
            self._qjl_scale = np.float32(np.sqrt(np.pi / 2) / dim)
            self._signs = LookupTable(_SIGNS, 1, dim)
            self.bytes_per_vector += packed_bytes(dim, 1) + (4 if self.mse_bits else 0)

    def empty(self, n: int) -> dict[str, np.ndarray]:
        out = {"norm": np.zeros(n, np.float32)}
        if self.mse_bits:
            out["codes"] = np.zeros((n, packed_bytes(self.dim, self.mse_bits)), np.uint8)
        if self.mode == "prod":
            out["signs"] = np.zeros((n, packed_bytes(self.dim, 1)), np.uint8)
            if self.mse_bits:
                out["residual"] = np.zeros(n, np.float32)
        return out

    def encode(self, x: np.ndarray) -> dict[str, np.ndarray]:
        norm, unit = _norms(np.asarray(x, dtype=np.float32).reshape(-1, self.dim))
        rotated = unit @ self.rotation
        out = {"norm": norm}
        residual = rotated
        if self.mse_bits:
            codes = np.searchsorted(self._boundaries, rotated).astype(np.uint8)
            out["codes"] = pack(codes, self.mse_bits)
            residual = rotated - self.codebook[codes]
            if self.unbiased:
                projection = np.einsum("ij,ij->i", self.codebook[codes], rotated)
                out["norm"] = norm / np.maximum(projection, np.float32(1e-6))
        if self.mode == "prod":
            out["signs"] = pack(residual @ self.sketch.T >= 0, 1)
            if self.mse_bits:
                out["residual"] = norm * np.sqrt(np.einsum("ij,ij->i", residual, residual))
        return out

    def _residual_scale(self, codes: dict[str, np.ndarray], t: slice) -> np.ndarray:
        """sqrt(pi/2)/dim * |x| |r| per vector of the tile."""
        return self._qjl_scale * (codes["residual"][t] if self.mse_bits else codes["norm"][t])

    def _decode_rotated(self, codes: dict[str, np.ndarray], t: slice) -> np.ndarray:
        """The tile's reconstruction in the rotated domain (norms included), [len(t), dim]."""
        out = np.zeros((t.stop - t.start, self.dim), np.float32)
        if self.mse_bits:
            out += self._centroids(codes["codes"][t]) * codes["norm"][t, None]
        if self.mode == "prod":
            out += (self._signs(codes["signs"][t]) * self._residual_scale(codes, t)[:, None]) @ self.sketch
        return out

    def decode(self, codes: dict[str, np.ndarray]) -> np.ndarray:
        return self._decode_rotated(codes, slice(0, vector_count(codes))) @ self.rotation.T

    def inner_products(self, q: np.ndarray, codes: dict[str, np.ndarray]) -> np.ndarray:
        q = np.asarray(q, dtype=np.float32)
        n = vector_count(codes)
        out = np.empty((len(q), n), np.float32)
        projected = q @ self._project if self.mode == "prod" else None
        if self.levels is not None:
            fast = len(q) <= BUTTERFLY_ROWS
            rotated, scale = quantize_rows(hadamard_rotate(q, self.hadamard) if fast else q @ self.rotation)
            scale *= self.step
        elif self.mse_bits:
            rotated = q @ self.rotation
        for t in tiles(n):
            scores = out[:, t]
            if self.levels is not None:
                np.matmul(rotated, self._level_table(codes["codes"][t]).T, out=scores)
                scores *= scale[:, None]
                scores *= codes["norm"][t]
            elif self.mse_bits:
                np.matmul(rotated, self._centroids(codes["codes"][t]).T, out=scores)
                scores *= codes["norm"][t]
            else:
                scores[:] = 0
            if self.mode == "prod":
                scores += (projected @ self._signs(codes["signs"][t]).T) * self._residual_scale(codes, t)
        return out

    def weighted_sum(self, p: np.ndarray, codes: dict[str, np.ndarray]) -> np.ndarray:
        p = np.asarray(p, dtype=np.float32)
        rotated = np.zeros((len(p), self.dim), np.float32)
        projected = np.zeros((len(p), self.dim), np.float32)
        for t in tiles(vector_count(codes)):
            if self.mse_bits:
                rotated += (p[:, t] * codes["norm"][t]) @ self._centroids(codes["codes"][t])
            if self.mode == "prod":
                projected += (p[:, t] * self._residual_scale(codes, t)) @ self._signs(codes["signs"][t])
        out = rotated @ self.rotation.T
        if self.mode == "prod":
            out += projected @ self._project.T
        return out

    def parts(self, codes: dict[str, np.ndarray]) -> list[CodePart]:
        """The mse codes in the rotated domain; for prod also the residual's sign bits in the projected one."""
        out = []
        if self.mse_bits:
            out.append(packed_part(codes["codes"], self._centroids, self.dim, codes["norm"], transform=self.rotation,
                                   hadamard=self.hadamard, levels=self.levels, step=self.step))
        if self.mode == "prod":
            out.append(packed_part(codes["signs"], self._signs, self.dim,
                                   codes["residual"] if self.mse_bits else codes["norm"], self._qjl_scale,
                                   self._project))
        return out


class QJLQuantizer:
    """QJL keys: sign(S k) packed 8 per byte (least significant bit first) + float32 |k|, S [sketch_dim, dim].

    Queries are projected, not quantized. decode / weighted_sum use the unbiased reconstruction
    sqrt(pi/2)/sketch_dim * |k| * S^T sign(S k).
    """

    def __init__(self, dim: int, sketch_dim: int, seed: int = 0) -> None:
        self.dim, self.sketch_dim, self.seed = dim, sketch_dim, seed
        self.sketch = _gaussian(sketch_dim, dim, seed)
        self.bytes_per_vector = packed_bytes(sketch_dim, 1) + 4
        self._scale = np.float32(np.sqrt(np.pi / 2) / sketch_dim)
        self._signs = LookupTable(_SIGNS, 1, sketch_dim)
        self._sketch_t = np.ascontiguousarray(self.sketch.T)

    def empty(self, n: int) -> dict[str, np.ndarray]:
        return {"signs": np.zeros((n, packed_bytes(self.sketch_dim, 1)), np.uint8), "norm": np.zeros(n, np.float32)}

    def encode(self, x: np.ndarray) -> dict[str, np.ndarray]:
        x = np.asarray(x, dtype=np.float32).reshape(-1, self.dim)
        norm, _ = _norms(x)
        return {"signs": pack(x @ self.sketch.T >= 0, 1), "norm": norm}

    def decode(self, codes: dict[str, np.ndarray]) -> np.ndarray:
        return (self._signs(codes["signs"]) * (self._scale * codes["norm"])[:, None]) @ self.sketch

    def inner_products(self, q: np.ndarray, codes: dict[str, np.ndarray]) -> np.ndarray:
        projected = np.asarray(q, dtype=np.float32) @ self.sketch.T
        n = vector_count(codes)
        out = np.empty((len(projected), n), np.float32)
        for t in tiles(n):
            out[:, t] = (projected @ self._signs(codes["signs"][t]).T) * (self._scale * codes["norm"][t])
        return out

    def weighted_sum(self, p: np.ndarray, codes: dict[str, np.ndarray]) -> np.ndarray:
        p = np.asarray(p, dtype=np.float32)
        projected = np.zeros((len(p), self.sketch_dim), np.float32)
        for t in tiles(vector_count(codes)):
            projected += (p[:, t] * (self._scale * codes["norm"][t])) @ self._signs(codes["signs"][t])
        return projected @ self.sketch

    def parts(self, codes: dict[str, np.ndarray]) -> list[CodePart]:
        return [packed_part(codes["signs"], self._signs, self.sketch_dim, codes["norm"], self._scale, self._sketch_t)]


class ChannelSplit:
    """Non-integer widths: channels_hi (e.g. outlier channels) coded by `hi`, the rest by `lo`.

    The paper's 3.5 bits = half the channels at 4 bits and half at 3; each group is its own vector with its
    own rotation and norm. Codes are the two codecs' dicts with keys prefixed "hi." and "lo.".
    """

    def __init__(self, channels_hi: np.ndarray, hi: VectorCodec, lo: VectorCodec) -> None:
        self.dim = hi.dim + lo.dim
        self.channels_hi = np.asarray(channels_hi, dtype=np.int64)
        inside = (self.channels_hi >= 0) & (self.channels_hi < self.dim)
        if len(self.channels_hi) != hi.dim or len(np.unique(self.channels_hi)) != hi.dim or not inside.all():
            raise ValueError(f"channels_hi must be {hi.dim} distinct channels of {self.dim}")
        self.channels_lo = np.setdiff1d(np.arange(self.dim), self.channels_hi)
        self.hi, self.lo = hi, lo
        self.bytes_per_vector = hi.bytes_per_vector + lo.bytes_per_vector
    @staticmethod
    def _join(hi: dict[str, np.ndarray], lo: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {**{f"hi.{k}": v for k, v in hi.items()}, **{f"lo.{k}": v for k, v in lo.items()}}

    @staticmethod
    def _part(codes: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
        return {k[len(prefix):]: v for k, v in codes.items() if k.startswith(prefix)}

    def empty(self, n: int) -> dict[str, np.ndarray]:
        return self._join(self.hi.empty(n), self.lo.empty(n))

    def encode(self, x: np.ndarray) -> dict[str, np.ndarray]:
        x = np.asarray(x, dtype=np.float32).reshape(-1, self.dim)
        return self._join(self.hi.encode(x[:, self.channels_hi]), self.lo.encode(x[:, self.channels_lo]))

    def _scatter(self, hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
        out = np.empty((len(hi), self.dim), np.float32)
        out[:, self.channels_hi] = hi
        out[:, self.channels_lo] = lo
        return out

    def decode(self, codes: dict[str, np.ndarray]) -> np.ndarray:
        return self._scatter(self.hi.decode(self._part(codes, "hi.")), self.lo.decode(self._part(codes, "lo.")))

    def inner_products(self, q: np.ndarray, codes: dict[str, np.ndarray]) -> np.ndarray:
        q = np.asarray(q, dtype=np.float32)
        return (self.hi.inner_products(q[:, self.channels_hi], self._part(codes, "hi."))
                + self.lo.inner_products(q[:, self.channels_lo], self._part(codes, "lo.")))

    def weighted_sum(self, p: np.ndarray, codes: dict[str, np.ndarray]) -> np.ndarray:
        return self._scatter(self.hi.weighted_sum(p, self._part(codes, "hi.")),
                             self.lo.weighted_sum(p, self._part(codes, "lo.")))

    def parts(self, codes: dict[str, np.ndarray]) -> list[CodePart]:
        return [replace(part, channels=channels if part.channels is None else channels[part.channels])
                for half, channels, prefix in ((self.hi, self.channels_hi, "hi."), (self.lo, self.channels_lo, "lo."))
                for part in half.parts(self._part(codes, prefix))]