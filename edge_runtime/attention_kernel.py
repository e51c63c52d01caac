"""Attention over one block of stored keys and values in compiled code, reading the codes where they lie.

For a few query rows (a decode step: one token times the heads sharing a KV head) the work per stored vector is
small, and numpy pays a call and a temporary per operation: widening codes a tile at a time ran at 1-2.6 ns a
value on one core. This kernel walks the block once, key by key: it widens each key's parts (edge_runtime.quant.
code_parts) into a row of a few hundred floats that stays in L1, scores it against every query row, masks it by
position, keeps a running softmax (maximum, sum) per row, and adds the key's value, widened the same way, into
per-part accumulators. Nothing of the size of the context is ever written. It is compiled by numba (LLVM) from
this one source for x86_64 and aarch64 alike, on first use (cached on disk); `attention.py` keeps the numpy path,
which is the reference the tests hold this kernel to.

Long blocks are cut into ranges that threads run at once (numba releases the GIL): each returns its own (maximum,
sum, accumulators), and `merge` joins them with the usual log-sum-exp rescaling, as flash-decoding does.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from edge_runtime.quant.code_parts import F16, F32, I8, CodePart

# Keys scored before their softmax weights are applied to the values: enough to amortize the rescaling of the
# accumulators when the running maximum grows, few enough that the scores stay in registers and L1.
CHUNK = 32
GROUP = 4  # keys widened and scored together (the kernel's register blocking is written for 4)
_HALF_TO_FLOAT = np.float32(2.0**112)
# LLVM's fast-math flags that let it vectorize and reassociate sums, without "no infinities / no NaNs": masked
# scores are -inf, and with those flags comparisons against them are folded away.
FAST = {"nsz", "arcp", "contract", "reassoc"}  # exponent rebias from binary16 to binary32


@njit(nogil=True, fastmath=FAST, cache=True)
def _widen(row, kind, bits, table, width, out, bits32):
    """One stored row (uint8 bytes) of a part -> out[:width] float32."""
    if kind == F32:
        values = row.view(np.float32)
        for j in range(width):
            out[j] = values[j]
    elif kind == F16:
        # binary16 -> binary32 by its bits: magnitude bits shifted into place and rebiased by a multiply (which
        # also handles subnormals), then the sign; no float16 type needed, and LLVM vectorizes it.
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
        for b in range((width + 3) // 4):
            byte = row[b]
            for t in range(4):
                if 4 * b + t < width:
                    out[4 * b + t] = table[(byte >> (2 * t)) & 3]
    elif bits == 1:
        for b in range((width + 7) // 8):
            byte = row[b]
            for t in range(8):
                if 8 * b + t < width:
                    out[8 * b + t] = table[(byte >> t) & 1]
    else:  # 3 bits: a 2-bit plane of the low bits, then a 1-bit plane of the high bits (packing.py)
        high = ((width + 7) // 8) * 2
        for j in range(width):
            low = (row[j // 4] >> (2 * (j % 4))) & 3
            top = (row[high + j // 8] >> (j % 8)) & 1
            out[j] = table[low | (top << 2)]


@njit(nogil=True, fastmath=FAST, cache=True)
def _widen_group(codes, scales, tables, meta, coefs, part, first, count, tile, factors, bits32):
    """Keys (or values) first..first+count-1 of one part into tile[:count, :width], their factors into factors;
    rows of the group beyond `count` are zeros."""
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
def attend_block(queries, key_codes, key_scales, key_tables, key_meta, key_coefs,
                 value_codes, value_scales, value_tables, value_meta, value_coefs,
                 positions, lower, upper, tokens, m, s, accs):
    """Softmax-weighted values of one block for R = groups x tokens query rows (row r is token r % tokens).

    queries[p] [R, width_p]: the query rows in key part p's domain (R even). *_codes / *_scales: per part, the
    rows and per-vector factors (length 0: none); *_meta [P, 3]: kind, bits, width; *_coefs [P]. Key n is seen
    by token t when lower[t] <= positions[n] <= upper[t]. Outputs, overwritten: m [R] (running maximum), s [R]
    (sum of exp(score - m)), accs[p] [R, width_p] (sum of exp(score - m) * value part p).

    Keys and values go GROUP at a time through a small float tile, against two query rows at once: 4 x 2
    independent sums keep the FMA units busy and fit the 16 vector registers of AVX2 (NEON has 32).
    """
    rows = m.shape[0]
    n = positions.shape[0]
    widest = 0
    for p in range(len(key_codes)):
        widest = max(widest, key_meta[p, 2])
    for p in range(len(value_codes)):
        widest = max(widest, value_meta[p, 2])
    bits32 = np.empty(widest, np.uint32)
    tile = np.empty((GROUP, widest), np.float32)
    factors = np.empty(GROUP, np.float32)
    scores = np.empty((rows, CHUNK), np.float32)
    for r in range(rows):
        m[r] = -np.inf
        s[r] = 0.0
    for p in range(len(value_codes)):
        accs[p][:, :] = 0.0
    for start in range(0, n, CHUNK):
        stop = min(start + CHUNK, n)
        scores[:, :] = 0.0
        for first in range(start, stop, GROUP):
            count = min(GROUP, stop - first)
            column = first - start
            for p in range(len(key_codes)):
                _widen_group(key_codes, key_scales, key_tables, key_meta, key_coefs, p, first, count, tile,
                             factors, bits32)
                _score_group(queries[p], tile, key_meta[p, 2], factors, scores, column)
        for i in range(stop - start):
            position = positions[start + i]
            for r in range(rows):
                t = r % tokens
                if position < lower[t] or position > upper[t]:
                    scores[r, i] = -np.inf
        for r in range(rows):
            top = m[r]
            for i in range(stop - start):
                top = max(top, scores[r, i])
            if top == -np.inf:
                for i in range(CHUNK):
                    scores[r, i] = 0.0
                continue
            if top > m[r]:
                rescale = np.exp(m[r] - top)
                s[r] *= rescale
                for p in range(len(value_codes)):
                    accs[p][r, :] *= rescale
                m[r] = top
            for i in range(stop - start):
                weight = np.exp(scores[r, i] - top)
                scores[r, i] = weight
                s[r] += weight
            for i in range(stop - start, CHUNK):
                scores[r, i] = 0.0
        for first in range(start, stop, GROUP):
            count = min(GROUP, stop - first)
            column = first - start
            for p in range(len(value_codes)):
                _widen_group(value_codes, value_scales, value_tables, value_meta, value_coefs, p, first, count,
                             tile, factors, bits32)
                _accumulate_group(accs[p], tile, value_meta[p, 2], factors, scores, column)


_NONE = np.zeros(0, np.float32)


def _packed(parts: list[CodePart]) -> tuple:
    """A list of parts as the kernel's arguments: tuples of arrays, one per part, and the small tables."""
    codes = tuple(np.ascontiguousarray(p.codes) for p in parts)
    scales = tuple(_NONE if p.scale is None else np.ascontiguousarray(p.scale, dtype=np.float32) for p in parts)
    tables = np.stack([p.table for p in parts])
    meta = np.array([[p.kind, p.bits, p.width] for p in parts], np.int64)
    coefs = np.array([p.coef for p in parts], np.float32)
    return codes, scales, tables, meta, coefs


def attend_parts(q: np.ndarray, key_parts: list[CodePart], value_parts: list[CodePart], positions: np.ndarray,
                 lower: np.ndarray, upper: np.ndarray, tokens: int) -> tuple[np.ndarray, np.ndarray, list]:
    """One block's partial softmax for query rows q [R, dim]: (maximum [R], sum [R], accumulators per value part)."""
    rows = len(q)
    even = rows + rows % 2  # the kernel takes query rows two at a time; a padding row's results are dropped
    if even != rows:
        q = np.concatenate([q, np.zeros((1, q.shape[1]), q.dtype)])
    queries = tuple(np.ascontiguousarray(q if p.transform is None else q @ p.transform, dtype=np.float32)
                    for p in key_parts)
    m, s = np.empty(even, np.float32), np.empty(even, np.float32)
    accs = tuple(np.empty((even, p.width), np.float32) for p in value_parts)
    attend_block(queries, *_packed(key_parts), *_packed(value_parts), np.ascontiguousarray(positions, np.int64),
                 np.ascontiguousarray(lower, np.int64), np.ascontiguousarray(upper, np.int64), tokens, m, s, accs)
    return m[:rows], s[:rows], [acc[:rows] for acc in accs]


def merge(partials: list[tuple[np.ndarray, np.ndarray, list]], value_parts: list[list[CodePart]],
          dim: int) -> np.ndarray:
    """Join blocks' partial softmaxes into the attention output [R, dim] (log-sum-exp rescaling).

    `value_parts[b]` are block b's value parts: their transforms take each accumulator back to the value's
    own domain. A row that sees no key at all gets zeros.
    """
    top = np.max([m for m, _, _ in partials], axis=0)
    top = np.where(np.isfinite(top), top, 0.0).astype(np.float32)
    out = np.zeros((len(top), dim), np.float32)
    total = np.zeros(len(top), np.float32)
    for (m, s, accs), parts in zip(partials, value_parts):
        factor = np.exp(m - top)
        total += factor * s
        for acc, part in zip(accs, parts):
            acc = acc * factor[:, None]
            out += acc if part.transform is None else acc @ part.transform.T
    return out / np.where(total > 0, total, 1.0)[:, None]
