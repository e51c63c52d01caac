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

from concurrent.futures import ThreadPoolExecutor
from itertools import pairwise, repeat
from typing import NamedTuple

import numpy as np

from edge_runtime.quant.codec import VectorCodec

SCORE_BYTES = 32 << 20
# Shortest share of a block worth a thread. E2B int4, tq3.5, 2k context, 2 threads: 142 ms a step unsplit,
# 125 ms with the 2k-token full layers split, 142 again with the 512-slot sliding rings split as well.
MIN_PART = 768


class Block(NamedTuple):
    key_codec: VectorCodec
    key_codes: dict[str, np.ndarray]
    value_codec: VectorCodec
    value_codes: dict[str, np.ndarray]
    mask: np.ndarray  # additive, [T query tokens, n keys]


def _parts(block: Block, parts: int) -> list[Block]:
    """A long block cut into `parts` contiguous ones, so that worker threads can each read a share of the codes."""
    n = block.mask.shape[1]
    if parts < 2 or n < parts * MIN_PART:
        return [block]
    cuts = [round(n * k / parts) for k in range(parts + 1)]
    return [Block(block.key_codec, {name: a[lo:hi] for name, a in block.key_codes.items()},
                  block.value_codec, {name: a[lo:hi] for name, a in block.value_codes.items()}, block.mask[:, lo:hi])
            for lo, hi in pairwise(cuts)]


def _scores(block: Block, q: np.ndarray, rows: slice, groups: int) -> np.ndarray:
    """[groups, tokens, n] masked scores of a block for query rows q (groups x tokens of them)."""
    scores = block.key_codec.inner_products(q, block.key_codes)
    return scores.reshape(groups, -1, block.mask.shape[1]) + block.mask[rows]


def _weighted_sum(block: Block, weights: np.ndarray, rows: int) -> np.ndarray:
    return block.value_codec.weighted_sum(weights.reshape(rows, -1), block.value_codes)


def attend(query: np.ndarray, blocks: list[list[Block]], pool: ThreadPoolExecutor | None = None,
           workers: int = 1) -> np.ndarray:
    """query [kv_heads, groups, T, head_dim] (Gemma 4: scaling 1.0) over per-head blocks -> [T, heads * head_dim].

    With a `pool` of `workers` threads, long blocks are split across them: numpy releases the GIL while it widens codes
    and multiplies, and one thread alone cannot keep up with the cache's bytes (E2B int4 at 8k context: see
    README).
    """
    kv_heads, groups, tokens, head_dim = query.shape
    workers = workers if pool else 1
    out = np.empty((tokens, kv_heads, groups, head_dim), dtype=np.float32)
    for h in range(kv_heads):
        whole = [b for b in blocks[h] if b.mask.shape[1]]
        live = [part for b in whole for part in _parts(b, workers)]
        # Handing short blocks to threads costs more than it saves (E2B int4 at 131 tokens: 124 vs 104 ms a step).
        run = pool.map if pool and len(live) > len(whole) else map
        keys = sum(b.mask.shape[1] for b in live)
        step = max(1, SCORE_BYTES // (4 * groups * keys))
        for t in range(0, tokens, step):
            rows = slice(t, min(t + step, tokens))
            q = query[h, :, rows].reshape(-1, head_dim)
            block_scores = list(run(_scores, live, repeat(q), repeat(rows), repeat(groups)))
            top = np.max([s.max(axis=-1, keepdims=True) for s in block_scores], axis=0)
            weights = [np.exp(s - top, out=s) for s in block_scores]
            denominator = sum(w.sum(axis=-1, keepdims=True) for w in weights)
            total = sum(run(_weighted_sum, live, weights, repeat(len(q))))
            out[rows, h] = (total.reshape(groups, -1, head_dim) / denominator).transpose(1, 0, 2)
    return out.reshape(tokens, -1)
