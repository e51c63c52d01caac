"""Attention over blocks of keys and values that stay in their stored format.

A layer's keys and values come in blocks: the cached codes, the exact ring of recent tokens, and the step's own
new tokens. Each block says which query token sees which of its rows by position: row n (at `positions[n]`,
-1 for an empty slot) is seen by token t when `lower[t] <= positions[n] <= upper[t]`, which covers causality,
sliding windows and the split between coded and exact recent tokens alike. One softmax spans all blocks, and no
block is ever decoded to a float copy of the cache.

Two paths compute it:
- the compiled kernel (edge_runtime/kernels/attention.c, loaded by edge_runtime.attention_kernel), for steps of a
  few tokens (decode): each block is walked once, its codes widened a few rows at a time in cache, long blocks
  split across threads;
- numpy, for prefill chunks, where a block's scores for hundreds of query rows make a real matrix product: each
  key codec's `inner_products` (TurboQuant rotates the query once and reads centroids; QJL projects it once and
  reads sign bits) and each value codec's `weighted_sum` (accumulated in the rotated domain, rotated back once),
  a tile at a time into BLAS. It is also the reference the kernel is tested against, and the path of any
  machine the kernel is not built for.

Query tokens go through numpy in groups small enough that one group's scores over the whole context stay within
`SCORE_BYTES`: a 256-token prefill chunk at 32k context would otherwise hold 256 MB of scores.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from itertools import pairwise, repeat
from typing import NamedTuple

import numpy as np

from edge_runtime import attention_kernel
from edge_runtime.quant.codec import VectorCodec
from edge_runtime.quant.float_codecs import Float16Codec, Float32Codec, Int8Codec
from edge_runtime.worker_threads import Workers, thread_count

SCORE_BYTES = 32 << 20
# Shortest share of a block worth a thread in numpy (prefill). E2B int4, tq3.5, 2k context, 2 threads: 142 ms a
# step unsplit, 125 ms with the 2k-token full layers split, 142 again with the 512-slot sliding rings split as well.
MIN_PART = 768
# Least K+V values in a share of a block worth a thread for the compiled kernel. A split layer pays the handoff
# (in a step, ~45 us of Python before this thread's share starts, the helper's ~40 us after it: worker_threads)
# and the merge: E2B int4 b128 at 2k, 2 threads, the 7 full layers' attention in one process, per step, with
# 2^19 / 2^20 / 2^21: fp16 4.47 / 4.50 / 5.23 ms (2^20 splits the 2k store), tq3.5 5.48 / 5.52 / 7.19; at 1k fp16
# 4.21 / 3.78 / 3.75 (its 1k store in two shares was slower) and tq3.5 4.66 / 5.54 / 5.49; below 2^19 the 576-slot
# sliding rings split too and every step got slower (2^17: fp16 5.92, tq3.5 7.22 ms at 2k).
KERNEL_MIN_SHARE_VALUES = 1 << 20
# A value of packed codes (TurboQuant, QJL) counts as this many: looked up before its multiply-adds it took longer
# (one core, 2k rows of 512: tq3.5 0.33 ns a value against fp16's 0.20, tools/attention_bench.py), and a call
# rotates the query and the sums besides; so tq3.5 splits its 1k store and fp16 does not. With keys scored in
# integers (edge_runtime.quant.integer_scores) tq3.5 costs 0.18 ns a value there, fp16 0.17; but in a step (E2B
# int4 b128 at 1k, the 7 full layers' attention, one model with each weight in one process, six alternated rounds)
# splitting the 1k store (weight 2: 2.8-3.3 ms a step) and not (weight 1: 2.2-3.6) measured alike, so it stays.
PACKED_VALUE_WEIGHT = 2
# Steps of at most this many tokens go through the compiled kernel; longer ones are matrix products for BLAS.
KERNEL_TOKENS = 4
MASKED = np.finfo(np.float32).min
FLOAT_CODECS = (Float32Codec, Float16Codec, Int8Codec)


class Block(NamedTuple):
    key_codec: VectorCodec
    key_codes: dict[str, np.ndarray]
    value_codec: VectorCodec
    value_codes: dict[str, np.ndarray]
    positions: np.ndarray  # [n] int64: the position stored in each row, -1 for none
    lower: np.ndarray  # [T] int64: the first position query token t sees
    upper: np.ndarray  # [T] int64: the last position query token t sees

    @property
    def size(self) -> int:
        return len(self.positions)

    def rows(self, queries: slice) -> Block:
        """The block as seen by a subset of the query tokens."""
        return self._replace(lower=self.lower[queries], upper=self.upper[queries])

    def mask(self) -> np.ndarray:
        """Additive mask [T, n]: 0 where token t sees row n, the float32 minimum elsewhere."""
        p = self.positions[None, :]
        seen = (p >= self.lower[:, None]) & (p <= self.upper[:, None])
        return np.where(seen, np.float32(0), MASKED).astype(np.float32)


def _slice(block: Block, lo: int, hi: int) -> Block:
    return block._replace(key_codes={k: a[lo:hi] for k, a in block.key_codes.items()},
                          value_codes={k: a[lo:hi] for k, a in block.value_codes.items()},
                          positions=block.positions[lo:hi])


def _cuts(n: int, parts: int, least: int, quantum: int = 1) -> list[int]:
    """Where a block of n rows is cut into `parts` shares of at least ~`least` rows (one share if it is too short),
    each cut a multiple of `quantum` so that a growing block keeps its cuts for many steps (DecodeAttention builds its
    calls once per cut)."""
    if parts < 2 or n < parts * least:
        return [0, n]
    return [0, *(round(n * k / parts / quantum) * quantum for k in range(1, parts)), n]


def _shares(block: Block, parts: int, least: int = MIN_PART, quantum: int = 1) -> list[Block]:
    """A long block cut into `parts` contiguous ones, so that worker threads can each read a share of the codes."""
    cuts = _cuts(block.size, parts, least, quantum)
    return [block] if len(cuts) == 2 else [_slice(block, lo, hi) for lo, hi in pairwise(cuts)]


def attend(query: np.ndarray, blocks: list[list[Block]], pool: Workers | None = None,
           kernel: bool | None = None) -> np.ndarray:
    """query [T, kv_heads, groups, head_dim] (Gemma 4: scaling 1.0) over per-head blocks -> [T, heads * head_dim].

    With a `pool` of threads, long blocks are split across them: the kernel and numpy both release the
    GIL, and one thread alone cannot keep up with the cache's bytes. `kernel` forces a path (tests); by default
    the kernel takes steps of up to KERNEL_TOKENS tokens where it is built for the machine.
    """
    if kernel is None:
        kernel = query.shape[0] <= KERNEL_TOKENS and attention_kernel.load() is not None
    workers = thread_count(pool)
    if kernel:
        return _attend_kernel(query, blocks, pool, workers)
    tokens, kv_heads, groups, head_dim = query.shape
    out = np.empty((tokens, kv_heads, groups, head_dim), dtype=np.float32)
    for h in range(kv_heads):
        shares = [_shares(b, workers) for b in blocks[h] if b.size]
        # Handing short blocks to threads costs more than it saves (E2B int4 at 131 tokens: 124 vs 104 ms a step).
        mapper = pool.map if pool and any(len(s) > 1 for s in shares) else map
        out[:, h] = _attend_numpy(query[:, h], shares, mapper)
    return out.reshape(tokens, -1)


class _Call(NamedTuple):
    """One kernel call: a head's coded block (or none) and exact blocks, with the coded block's parts."""

    head: int
    coded: Block | None
    exact: list[Block]
    key_parts: list
    value_parts: list


def _kernel_least(block: Block) -> int:
    """The fewest rows of `block` in a kernel call's share of it (KERNEL_MIN_SHARE_VALUES keys and values, packed
    codes weighing PACKED_VALUE_WEIGHT)."""
    floats = isinstance(block.key_codec, FLOAT_CODECS) and isinstance(block.value_codec, FLOAT_CODECS)
    return -(-KERNEL_MIN_SHARE_VALUES // (2 * block.key_codec.dim * (1 if floats else PACKED_VALUE_WEIGHT)))


def _kernel_quantum(least: int) -> int:
    """The kernel's shares are cut at multiples of this many rows: an eighth of the least share, so that a growing
    store moves its cuts every `least / 4` steps or so (E2B full layers: 256 rows) and the shares differ by at most
    that."""
    return max(1, least // 8)


def _exact(block: Block) -> bool:
    """Whether the kernel reads the block as plain float32 rows (any number of them share one call)."""
    return isinstance(block.key_codec, Float32Codec) and isinstance(block.value_codec, Float32Codec)


def _kernel_calls(head: int, blocks: list[Block], workers: int) -> list[_Call]:
    """A head's blocks as kernel calls: each call takes at most one coded block and any exact float32 ones, share k
    of every block going to call k (a second coded block, to a call of its own)."""
    calls: list[tuple[Block | None, list[Block]]] = []
    for block in blocks:
        if not block.size:
            continue
        least = _kernel_least(block)
        for k, share in enumerate(_shares(block, workers, least, _kernel_quantum(least))):
            exact = _exact(share)
            if k == len(calls) or not (exact or calls[k][0] is None):
                k = len(calls)
                calls.append((None, []))
            coded, exacts = calls[k]
            calls[k] = (coded, [*exacts, share]) if exact else (share, exacts)
    return [_Call(head, coded, exacts, *((coded.key_codec.parts(coded.key_codes),
                                          coded.value_codec.parts(coded.value_codes)) if coded else ([], [])))
            for coded, exacts in calls]


def _attend_kernel(query: np.ndarray, blocks: list[list[Block]], pool: Workers | None,
                   workers: int) -> np.ndarray:
    """Every KV head's calls at once, spread over the pool's threads (this one among them; structures built afresh
    for each call, which DecodeAttention avoids). A head that is one call is finished in the kernel; a head split
    across calls has its partial softmaxes merged."""
    kernel = attention_kernel.load()
    tokens, kv_heads, groups, head_dim = query.shape
    rows = tokens * groups
    calls = [call for h in range(kv_heads) for call in _kernel_calls(h, blocks[h], workers)]
    if not kernel.fits(rows, _widths(head_dim, calls)):
        return attend(query, blocks, pool, kernel=False)
    calls_of = Counter(call.head for call in calls)
    q = np.ascontiguousarray(query.transpose(1, 0, 2, 3)).reshape(kv_heads, rows, head_dim)

    def run(call: _Call):
        return attention_kernel.attend_head_parts(kernel, q[call.head], call.key_parts, call.value_parts,
                                                  *_rows_seen(call), groups, finish=calls_of[call.head] == 1)

    # whole heads go to the pool only once a block is worth a thread (a split block always is)
    worth = any(block.size >= _kernel_least(block) for head in blocks for block in head)
    results = pool.map(run, calls) if pool and len(calls) > 1 and worth else [run(call) for call in calls]
    out = np.zeros((kv_heads, rows, head_dim), np.float32)
    for h in calls_of:
        mine = [result for call, result in zip(calls, results) if call.head == h]
        if len(mine) == 1:
            out[h] = mine[0]
        else:
            attention_kernel.Merge(kernel, mine, out[h])()
    return out.reshape(kv_heads, tokens, groups, head_dim).transpose(1, 0, 2, 3).reshape(tokens, -1)


_NOTHING_CODED = (np.zeros(0, np.int64), None, None)


def _widths(head_dim: int, calls: list[_Call]) -> list[int]:
    """The vector widths the kernel must hold for these calls (Kernel.fits)."""
    return [head_dim, *(p.width for call in calls for p in (*call.key_parts, *call.value_parts))]


def _rows_seen(call: _Call) -> tuple[tuple, list[tuple]]:
    """A call's blocks as the kernel takes them: (positions, lower, upper) of the coded rows, and each exact block's
    (keys, values, positions, lower, upper)."""
    where = _NOTHING_CODED if call.coded is None else (call.coded.positions, call.coded.lower, call.coded.upper)
    return where, [(b.key_codes["values"], b.value_codes["values"], b.positions, b.lower, b.upper) for b in call.exact]


class DecodeAttention:
    """One layer's attention for one-token steps, its kernel calls built once (HeadCall) and run again while they
    hold: over a cache layer's blocks whose arrays stay in place until the cache replaces them (KVCache.layout), the
    step's own keys, values and bounds in buffers the step overwrites, and its query and output in buffers of their
    own. Only the store's block (the first of each head) grows from one step to the next; its growing end is in each
    head's last call, whose size is set before each run.

    It runs what `attend` would run, identically: the calls `_kernel_calls` makes of each head (one while the store
    is short; past `workers` least shares, KERNEL_MIN_SHARE_VALUES, one per share), the first on the calling thread
    and the others handed to the pool, and a split head's partial softmaxes merged. The cuts move in steps of
    `_kernel_quantum` rows, and the calls are built again when they do. A prepared call handed to the pool costs its
    wake-up; the general path built every call again at each step (150-250 us a split layer, and every layer of a
    model with several KV heads). `build` returns None where the kernel cannot serve (not built for this machine,
    sizes past its limits); `limit` is the store size from which the general path must (a head with a second coded
    block, which `_kernel_calls` gives a call of its own).
    """

    def __init__(self, kernel: attention_kernel.Kernel, blocks_of: Callable[[], list[list[Block]]],
                 blocks: list[list[Block]], query: np.ndarray, out: np.ndarray, pool: Workers | None,
                 scratch: np.ndarray) -> None:
        self.kernel, self.blocks_of, self.query, self.out = kernel, blocks_of, query, out
        self.pool, self.workers, self.scratch = pool, thread_count(pool), scratch
        self.least = _kernel_least(blocks[0][0])
        self.quantum = _kernel_quantum(self.least)
        self.coded = not _exact(blocks[0][0])
        self.cuts: list[int] | None = None
        self.heads: list[list[attention_kernel.HeadCall]] = []  # each head's calls, the growing share last
        self.calls: list[attention_kernel.HeadCall] = []  # all of them, in the order attend runs them
        self.jobs: list[Callable[[], None]] = []  # the calls as the pool runs them
        self.merges: list[attention_kernel.Merge] = []  # the split heads' joins
        splits = all(_exact(b) for head in blocks for b in head[1:])
        self.limit = float("inf") if splits or self.workers < 2 else self.workers * self.least

    @classmethod
    def build(cls, blocks_of: Callable[[], list[list[Block]]], query: np.ndarray, out: np.ndarray,
              pool: Workers | None, scratch: np.ndarray) -> DecodeAttention | None:
        """query and out [kv_heads, groups, head_dim] float32 buffers; `blocks_of` gives the layer's blocks per KV
        head, the growing one first, as they are now; `scratch` the calling thread's working memory for the kernel
        (a pool's threads use their own)."""
        kernel = attention_kernel.load()
        if kernel is None or KERNEL_TOKENS < 1:
            return None
        blocks = blocks_of()
        attention = cls(kernel, blocks_of, blocks, query, out, pool, scratch)
        return attention if attention._prepare(blocks[0][0].size, blocks) else None

    def _prepare(self, stored: int, blocks: list[list[Block]]) -> bool:
        """Build the calls for a store `stored` rows long, from the layer's `blocks` as they are now; False where
        `_kernel_calls` cuts it otherwise than one call per share (a second coded block) or the kernel does not fit
        the sizes."""
        _, groups, head_dim = self.query.shape
        cuts = _cuts(stored, self.workers, self.least, self.quantum)
        heads, merges = [], []
        for h, head in enumerate(blocks):
            head_calls = _kernel_calls(h, [_slice(head[0], 0, stored), *head[1:]], self.workers)
            if len(head_calls) != len(cuts) - 1 or not self.kernel.fits(groups, _widths(head_dim, head_calls)):
                return False
            split = len(head_calls) > 1
            outs = [np.empty(groups * (2 + head_dim), np.float32) for _ in head_calls] if split else [self.out[h]]
            heads.append([attention_kernel.HeadCall(self.kernel, self.query[h], call.key_parts, call.value_parts,
                                                    *_rows_seen(call), groups, not split, o, self.scratch)
                          for call, o in zip(head_calls, outs)])
            if split:
                merges.append(attention_kernel.Merge(self.kernel, outs, self.out[h]))
        self.cuts, self.heads, self.merges = cuts[:-1], heads, merges
        self.calls = [call for head_calls in heads for call in head_calls]
        # the first call runs on this thread, with the scratch it was built with; any other, wherever it lands, on
        # its thread's own
        self.jobs = [self.calls[0], *(call.on_this_thread for call in self.calls[1:])]
        return True

    def __call__(self, stored: int) -> None:
        """Attend with the first block of each head `stored` rows long (below `limit`)."""
        if _cuts(stored, self.workers, self.least, self.quantum)[:-1] != self.cuts:
            self._prepare(stored, self.blocks_of())
        grows = stored - self.cuts[-1]
        for head_calls in self.heads:
            if self.coded:
                head_calls[-1].call.coded_n = grows
            else:
                head_calls[-1].exact[0].n = grows
        if self.pool is None or len(self.calls) == 1 or stored < self.least:  # a split store is >= 2 least
            for call in self.calls:
                call()
        else:
            self.pool.run(self.jobs)
        for merge in self.merges:
            merge()


def _own_rows(block: Block) -> bool:
    """Whether each query token sees exactly one row of `block`, its own: the step's exact block in a lossy format
    with no exact recent tokens (a token reads itself exactly and its step's other tokens through their codes,
    kv_cache.Visibility). Its scores are then one dot product a token, not a masked square."""
    return (_exact(block) and block.size == len(block.lower) and np.array_equal(block.lower, block.positions)
            and np.array_equal(block.upper, block.positions))


def _scores(block: Block, own: bool, q: np.ndarray, rows: slice, groups: int) -> np.ndarray:
    """[groups, tokens, n] masked scores of a block for query rows q (groups x tokens of them); [groups, tokens, 1]
    for a block of the tokens' own rows (`own`, _own_rows)."""
    if own:
        keys = block.key_codes["values"][rows]
        return np.einsum("gtd,td->gt", q.reshape(groups, -1, keys.shape[-1]), keys)[..., None]
    scores = block.key_codec.inner_products(q, block.key_codes)
    return scores.reshape(groups, -1, block.size) + block.rows(rows).mask()


def _weighted_sum(block: Block, own: bool, weights: np.ndarray, n: int, rows: slice) -> np.ndarray:
    if own:
        values = block.value_codes["values"][rows]
        return (weights * values[None]).reshape(n, -1)
    return block.value_codec.weighted_sum(weights.reshape(n, -1), block.value_codes)


def _attend_numpy(query: np.ndarray, shares: list[list[Block]], mapper) -> np.ndarray:
    """One KV head through the codecs' tiled products: [T, groups, d] -> [T, groups, d]."""
    live = [share for block_shares in shares for share in block_shares]
    own = [_own_rows(block) for block in live]
    query = query.transpose(1, 0, 2)
    groups, tokens, head_dim = query.shape
    out = np.empty((tokens, groups, head_dim), dtype=np.float32)
    keys = sum(b.size for b in live)
    step = max(1, SCORE_BYTES // (4 * groups * keys))
    for t in range(0, tokens, step):
        rows = slice(t, min(t + step, tokens))
        q = query[:, rows].reshape(-1, head_dim)
        block_scores = list(mapper(_scores, live, own, repeat(q), repeat(rows), repeat(groups)))
        top = np.max([s.max(axis=-1, keepdims=True) for s in block_scores], axis=0)
        weights = [np.exp(s - top, out=s) for s in block_scores]
        denominator = sum(w.sum(axis=-1, keepdims=True) for w in weights)
        total = sum(mapper(_weighted_sum, live, own, weights, repeat(len(q)), repeat(rows)))
        out[rows] = (total.reshape(groups, -1, head_dim) / denominator).transpose(1, 0, 2)
    return out
