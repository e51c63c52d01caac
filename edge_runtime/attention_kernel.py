"""Attention of a few query rows over one KV head's blocks, compiled, reading the stored codes where they lie.

A decode step's query rows (one token times the heads sharing a KV head) do little work per stored vector, and
numpy pays a call and a temporary per operation: widening codes a tile at a time ran at 1-2.6 ns a value on one
core, and at short contexts the calls themselves cost more than the arithmetic. This kernel walks a head's blocks
once, four keys at a time: it widens their parts (edge_runtime.quant.code_parts) into a small float tile that
stays in L1, scores it against two query rows at once (4 x 2 independent sums: the FMA units stay busy and the
16 vector registers of AVX2 suffice; NEON has 32), masks by position, keeps a running softmax per row (maximum
and sum, rescaling the accumulators when the maximum grows), and adds the values, widened the same way, into
per-part accumulators. Nothing the size of the context is ever written. Exact float32 blocks (the recent ring,
the step's own tokens, an fp32 cache) are read as they are, into one accumulator of their own.

It is compiled by numba (LLVM) from this one source for x86_64 and aarch64, on first use, and cached on disk
(NUMBA_CACHE_DIR, by default in edge-runtime's cache). `attention.py` keeps the numpy path, the reference the
tests hold this kernel to. Long blocks are cut into ranges that threads run at once (numba releases the GIL);
`merge` joins their partial softmaxes with the usual log-sum-exp rescaling, as flash-decoding does.
"""

from __future__ import annotations

import os

import numpy as np

from edge_runtime.user_cache import cache_dir

os.environ.setdefault("NUMBA_CACHE_DIR", str(cache_dir() / "numba"))

from numba import njit

from edge_runtime.quant.code_parts import F16, F32, I8, CodePart

# Calls pad their parts and exact blocks to these counts, so that every KV format is one compiled specialization
# (numba compiles one per tuple length; each takes seconds, a minute on a Pi 4). tq3.5-prod has the most key parts.
KEY_PARTS, VALUE_PARTS, EXACT_BLOCKS = 4, 2, 3
CHUNK = 32  # keys scored before their softmax weights meet the values: amortizes rescaling, stays in L1
GROUP = 4  # keys widened and scored together (the register blocking below is written for 4)
_HALF_TO_FLOAT = np.float32(2.0**112)  # exponent rebias from binary16 to binary32
# LLVM's fast-math flags that let it vectorize and reassociate sums, without "no infinities / no NaNs" (masked
# scores are -inf, and with those flags comparisons against them are folded away) and without approximate exp.
FAST = {"nsz", "arcp", "contract", "reassoc"}


@njit(nogil=True, fastmath=FAST, cache=True)
def _widen(row, kind, bits, table, width, out, bits32):
    """One stored row (uint8 bytes) of a part -> out[:width] float32 (out is bits32 seen as float32)."""
    if kind == F32:
        values = row.view(np.float32)
        for j in range(width):
            out[j] = values[j]
    elif kind == F16:
        # binary16 -> binary32 by its bits: magnitude shifted into place and rebiased by a multiply (which also
        # handles subnormals), then the sign; numba has no float16, and LLVM vectorizes this.
        halves = row.view(np.uint16)
        for j in range(width):
            bits32[j] = np.uint32(halves[j] & 0x7FFF) << np.uint32(13)
        for j in range(width):
            out[j] *= _HALF_TO_FLOAT
        for j in range(width):
            bits32[j] |= np.uint32(halves[j] & 0x8000) << np.uint32(16)
    elif kind == I8:
        codes = row.view(np.int8)
        for j in range(width):
            out[j] = np.float32(codes[j])
    elif bits == 4:
        for b in range(width // 2):
            byte = row[b]
            out[2 * b] = table[byte & 15]
            out[2 * b + 1] = table[byte >> 4]
        if width % 2:
            out[width - 1] = table[row[width // 2] & 15]
    elif bits == 2:
        for j in range(width):
            out[j] = table[(row[j // 4] >> (2 * (j % 4))) & 3]
    elif bits == 1:
        for j in range(width):
            out[j] = table[(row[j // 8] >> (j % 8)) & 1]
    else:  # 3 bits: a 2-bit plane of the low bits, then a 1-bit plane of the high bits (packing.py)
        high = ((width + 7) // 8) * 2
        for j in range(width):
            low = (row[j // 4] >> (2 * (j % 4))) & 3
            top = (row[high + j // 8] >> (j % 8)) & 1
            out[j] = table[low | (top << 2)]


@njit(nogil=True, fastmath=FAST, cache=True)
def _widen_group(codes, scales, tables, meta, coefs, part, first, count, tile, factors, bits32):
    """Rows first..first+count-1 of one part into tile[:GROUP, :width] (zeros past count), factors likewise."""
    kind, nbits, width = meta[part, 0], meta[part, 1], meta[part, 2]
    row = bits32.view(np.float32)
    for g in range(GROUP):
        if g < count:
            _widen(codes[part][first + g], kind, nbits, tables[part], width, row, bits32)
            for j in range(width):
                tile[g, j] = row[j]
            factor = coefs[part]
            if scales[part].shape[0]:
                factor *= scales[part][first + g]
            factors[g] = factor
        else:
            for j in range(width):
                tile[g, j] = 0.0
            factors[g] = 0.0


@njit(nogil=True, fastmath=FAST, cache=True)
def _copy_group(values, first, count, tile, factors):
    """Exact float32 rows first..first+count-1 into tile (zeros past count), factors 1."""
    width = values.shape[1]
    for g in range(GROUP):
        if g < count:
            for j in range(width):
                tile[g, j] = values[first + g, j]
            factors[g] = 1.0
        else:
            for j in range(width):
                tile[g, j] = 0.0
            factors[g] = 0.0


@njit(nogil=True, fastmath=FAST, cache=True)
def _score_group(query, tile, width, factors, scores, column):
    """scores[r, column + g] += factors[g] * <query[r, :width], tile[g, :width]> for the GROUP keys, all rows."""
    for r in range(0, query.shape[0], 2):
        a0 = np.float32(0.0)
        a1 = np.float32(0.0)
        a2 = np.float32(0.0)
        a3 = np.float32(0.0)
        b0 = np.float32(0.0)
        b1 = np.float32(0.0)
        b2 = np.float32(0.0)
        b3 = np.float32(0.0)
        for j in range(width):
            qa = query[r, j]
            qb = query[r + 1, j]
            k0 = tile[0, j]
            k1 = tile[1, j]
            k2 = tile[2, j]
            k3 = tile[3, j]
            a0 += qa * k0
            a1 += qa * k1
            a2 += qa * k2
            a3 += qa * k3
            b0 += qb * k0
            b1 += qb * k1
            b2 += qb * k2
            b3 += qb * k3
        scores[r, column] += factors[0] * a0
        scores[r, column + 1] += factors[1] * a1
        scores[r, column + 2] += factors[2] * a2
        scores[r, column + 3] += factors[3] * a3
        scores[r + 1, column] += factors[0] * b0
        scores[r + 1, column + 1] += factors[1] * b1
        scores[r + 1, column + 2] += factors[2] * b2
        scores[r + 1, column + 3] += factors[3] * b3


@njit(nogil=True, fastmath=FAST, cache=True)
def _accumulate_group(acc, tile, width, factors, weights, column):
    """acc[r, :width] += sum over the GROUP values g of weights[r, column + g] * factors[g] * tile[g, :width]."""
    for r in range(acc.shape[0]):
        w0 = weights[r, column] * factors[0]
        w1 = weights[r, column + 1] * factors[1]
        w2 = weights[r, column + 2] * factors[2]
        w3 = weights[r, column + 3] * factors[3]
        for j in range(width):
            acc[r, j] += w0 * tile[0, j] + w1 * tile[1, j] + w2 * tile[2, j] + w3 * tile[3, j]


@njit(nogil=True, fastmath=FAST, cache=True)
def _softmax_chunk(scores, positions, start, count, lower, upper, groups, m, s, accs, acc_exact):
    """Mask a chunk's scores by position, fold them into the running softmax, leave their weights in scores."""
    rows = m.shape[0]
    for i in range(count):
        position = positions[start + i]
        for r in range(rows):
            t = min(r // groups, lower.shape[0] - 1)  # a padding row (R made even) reads the last token's bounds
            if position < lower[t] or position > upper[t]:
                scores[r, i] = -np.inf
    for r in range(rows):
        top = m[r]
        for i in range(count):
            top = max(top, scores[r, i])
        if top == -np.inf:
            for i in range(CHUNK):
                scores[r, i] = 0.0
            continue
        if top > m[r]:
            rescale = np.exp(m[r] - top)
            s[r] *= rescale
            for p in range(len(accs)):
                accs[p][r, :] *= rescale
            acc_exact[r, :] *= rescale
            m[r] = top
        for i in range(count):
            weight = np.exp(scores[r, i] - top)
            scores[r, i] = weight
            s[r] += weight
        for i in range(count, CHUNK):
            scores[r, i] = 0.0


@njit(nogil=True, fastmath=FAST, cache=True)
def attend_head(queries, key_codes, key_scales, key_tables, key_meta, key_coefs,
                value_codes, value_scales, value_tables, value_meta, value_coefs,
                coded_positions, coded_lower, coded_upper,
                query, exact_keys, exact_values, exact_positions, exact_lower, exact_upper,
                groups, m, s, accs, acc_exact):
    """Softmax-weighted values of a head's blocks for R = tokens x groups query rows (row r is token r // groups).

    The coded block: queries[p] [R, width_p] are the query rows in key part p's domain; *_codes / *_scales per part
    are the rows and per-vector factors (length 0: none); *_meta [P, 3] kind, bits, width; *_coefs [P]. The exact
    blocks (float32): query [R, dim] and per block keys, values [n_b, dim]. Row n of a block is seen by token t
    when lower[t] <= positions[n] <= upper[t]. R is even. Outputs, overwritten: m [R] (running maximum), s [R]
    (sum of exp(score - m)), accs[p] [R, width_p] and acc_exact [R, dim] (sums of exp(score - m) * value).
    """
    rows = m.shape[0]
    widest = acc_exact.shape[1]
    for p in range(len(key_codes)):
        widest = max(widest, key_meta[p, 2])
    for p in range(len(value_codes)):
        widest = max(widest, value_meta[p, 2])
    bits32 = np.empty(widest, np.uint32)
    tile = np.empty((GROUP, widest), np.float32)
    factors = np.empty(GROUP, np.float32)
    scores = np.empty((rows, CHUNK), np.float32)
    m[:] = -np.inf
    s[:] = 0.0
    for p in range(len(value_codes)):
        accs[p][:, :] = 0.0
    acc_exact[:, :] = 0.0
    for start in range(0, coded_positions.shape[0], CHUNK):
        count = min(CHUNK, coded_positions.shape[0] - start)
        scores[:, :] = 0.0
        for column in range(0, count, GROUP):
            for p in range(len(key_codes)):
                if key_meta[p, 2] == 0:
                    continue
                _widen_group(key_codes, key_scales, key_tables, key_meta, key_coefs, p, start + column,
                             min(GROUP, count - column), tile, factors, bits32)
                _score_group(queries[p], tile, key_meta[p, 2], factors, scores, column)
        _softmax_chunk(scores, coded_positions, start, count, coded_lower, coded_upper, groups, m, s, accs,
                       acc_exact)
        for column in range(0, count, GROUP):
            for p in range(len(value_codes)):
                if value_meta[p, 2] == 0:
                    continue
                _widen_group(value_codes, value_scales, value_tables, value_meta, value_coefs, p, start + column,
                             min(GROUP, count - column), tile, factors, bits32)
                _accumulate_group(accs[p], tile, value_meta[p, 2], factors, scores, column)
    dim = acc_exact.shape[1]
    for b in range(len(exact_keys)):
        keys, values, positions = exact_keys[b], exact_values[b], exact_positions[b]
        for start in range(0, positions.shape[0], CHUNK):
            count = min(CHUNK, positions.shape[0] - start)
            scores[:, :] = 0.0
            for column in range(0, count, GROUP):
                _copy_group(keys, start + column, min(GROUP, count - column), tile, factors)
                _score_group(query, tile, dim, factors, scores, column)
            _softmax_chunk(scores, positions, start, count, exact_lower[b], exact_upper[b], groups, m, s, accs,
                           acc_exact)
            for column in range(0, count, GROUP):
                _copy_group(values, start + column, min(GROUP, count - column), tile, factors)
                _accumulate_group(acc_exact, tile, dim, factors, scores, column)


_NONE = np.zeros(0, np.float32)
_NO_CODES = np.zeros((0, 1), np.uint8)


def _packed(parts: list[CodePart], count: int) -> tuple:
    """Parts as the kernel's arguments, padded with empty parts to `count`: tuples of arrays, small tables."""
    pad = count - len(parts)
    codes = tuple(p.codes for p in parts) + (_NO_CODES,) * pad
    scales = tuple(_NONE if p.scale is None else p.scale for p in parts) + (_NONE,) * pad
    tables = np.zeros((count, 16), np.float32)
    meta = np.zeros((count, 3), np.int64)
    coefs = np.zeros(count, np.float32)
    for i, p in enumerate(parts):
        tables[i], meta[i], coefs[i] = p.table, (p.kind, p.bits, p.width), p.coef
    return codes, scales, tables, meta, coefs


class Partial:
    """One call's share of a head's softmax: running maximum, sum, and accumulators (per coded part, exact)."""

    def __init__(self, m: np.ndarray, s: np.ndarray, accs: list[np.ndarray], exact: np.ndarray,
                 parts: list[CodePart]) -> None:
        self.m, self.s, self.accs, self.exact, self.parts = m, s, accs, exact, parts

    def output(self, factor: np.ndarray) -> np.ndarray:
        """factor * (sum of the accumulators taken back to the value's domain)."""
        out = self.exact.copy()
        for acc, part in zip(self.accs, self.parts):
            out += acc if part.transform is None else acc @ part.transform.T
        return out * factor[:, None]


def attend_head_parts(q: np.ndarray, key_parts: list[CodePart], value_parts: list[CodePart],
                      coded: tuple[np.ndarray, np.ndarray, np.ndarray], exact: list[tuple], groups: int) -> Partial:
    """One head's partial softmax for query rows q [R, dim], row r being token r // groups.

    `coded` is (positions, lower, upper) of the rows the parts hold (none when the parts are empty); `exact` a list
    of (keys, values, positions, lower, upper) float32 blocks.
    """
    rows, dim = q.shape
    even = rows + rows % 2  # the kernel takes query rows two at a time; a padding row's results are dropped
    if even != rows:
        q = np.concatenate([q, np.zeros((1, dim), q.dtype)])
    queries = tuple(q if p.transform is None else np.ascontiguousarray(q @ p.transform) for p in key_parts)
    queries += (q,) * (KEY_PARTS - len(queries))
    m, s = np.empty(even, np.float32), np.empty(even, np.float32)
    accs = tuple(np.empty((even, p.width), np.float32) for p in value_parts)
    accs += (np.empty((even, 0), np.float32),) * (VALUE_PARTS - len(accs))
    acc_exact = np.empty((even, dim), np.float32)
    tokens = rows // groups
    empty = (np.zeros((0, dim), np.float32), np.zeros((0, dim), np.float32), np.zeros(0, np.int64),
             np.zeros(tokens, np.int64), np.zeros(tokens, np.int64))
    keys, values, positions, lower, upper = zip(*exact, *[empty] * (EXACT_BLOCKS - len(exact)))
    attend_head(queries, *_packed(key_parts, KEY_PARTS), *_packed(value_parts, VALUE_PARTS), *coded, q, keys, values,
                positions, lower, upper, groups, m, s, accs, acc_exact)
    return Partial(m[:rows], s[:rows], [a[:rows] for a in accs[:len(value_parts)]], acc_exact[:rows], value_parts)


def merge(partials: list[Partial]) -> np.ndarray:
    """Join partial softmaxes into the attention output [R, dim] (log-sum-exp rescaling)."""
    if len(partials) == 1:
        (p,) = partials
        return p.output(1 / np.where(p.s > 0, p.s, 1))
    top = np.max([p.m for p in partials], axis=0)
    top = np.where(np.isfinite(top), top, 0.0).astype(np.float32)
    factors = [np.exp(p.m - top) for p in partials]
    total = sum(f * p.s for f, p in zip(factors, partials))
    total = np.where(total > 0, total, 1.0)
    return sum(p.output(f / total) for f, p in zip(factors, partials))
