"""Attention over blocks of keys and values that stay in their stored format.

A layer's keys and values come in blocks: the cached codes, the exact ring of recent tokens, and the
step's own new tokens. One softmax spans all blocks: each block's scores come from its key codec's
`inner_products` (TurboQuant rotates the query once and reads centroids; QJL projects it once and reads
sign bits), and its share of the output from its value codec's `weighted_sum` (accumulated in the rotated
domain, rotated back once), so no block is ever decoded to a float copy of the cache.

Query tokens are processed in groups small enough that one group's scores over the whole context stay
within `SCORE_BYTES`: a 256-token prefill chunk at 32k context would otherwise hold 256 MB of scores.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from edge_runtime.quant.codec import VectorCodec

SCORE_BYTES = 32 << 20


class Block(NamedTuple):
    key_codec: VectorCodec
    key_codes: dict[str, np.ndarray]
    value_codec: VectorCodec
    value_codes: dict[str, np.ndarray]
    mask: np.ndarray  # additive, [T query tokens, n keys]


def attend(query: np.ndarray, blocks: list[list[Block]]) -> np.ndarray:
    """query [kv_heads, groups, T, head_dim] (Gemma 4: scaling 1.0) over per-head blocks -> [T, heads * head_dim]."""
    kv_heads, groups, tokens, head_dim = query.shape
    out = np.empty((tokens, kv_heads, groups, head_dim), dtype=np.float32)
    for h in range(kv_heads):
        live = [b for b in blocks[h] if b.mask.shape[1]]
        keys = sum(b.mask.shape[1] for b in live)
        step = max(1, SCORE_BYTES // (4 * groups * keys))
        for t in range(0, tokens, step):
            rows = slice(t, min(t + step, tokens))
            q = query[h, :, rows].reshape(-1, head_dim)
            scores = [(b.key_codec.inner_products(q, b.key_codes).reshape(groups, -1, b.mask.shape[1])
                       + b.mask[rows]) for b in live]
            top = np.max([s.max(axis=-1, keepdims=True) for s in scores], axis=0)
            denominator = 0.0
            total = 0.0
            for b, s in zip(live, scores):
                weights = np.exp(s - top, out=s)
                denominator = denominator + weights.sum(axis=-1, keepdims=True)
                total = total + b.value_codec.weighted_sum(weights.reshape(q.shape[0], -1), b.value_codes)
            out[rows, h] = (total.reshape(groups, -1, head_dim) / denominator).transpose(1, 0, 2)
    return out.reshape(tokens, -1)
