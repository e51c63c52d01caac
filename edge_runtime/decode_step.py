"""The one-token decode step, over buffers allocated once: what Engine.forward runs for a step of one token.

On a small model a decode step is all fixed cost: the bundled model's took 1.07-1.24 ms, of which the graphs'
arithmetic and the attention kernel were a small part; the rest was onnxruntime's per-run conversion of inputs and
outputs, and Python building attention's blocks and kernel structures anew for every layer. Here every value the
graphs exchange has a buffer of its own for one token (a graph's outputs each get a new one, so no run reads and
writes the same memory), bound to the sessions once with onnxruntime's IOBinding; the step copies in the token's
embedding and PLE rows and its RoPE tables, writes what its position sees into fixed bounds arrays, and each
layer's attention runs kernel calls whose structures already point at the cache and at these buffers
(attention.DecodeAttention), rebuilt when the cache moves its arrays (KVCache.layout). What it computes is what
Engine's general loop computes, operation for operation: the logits and the cache are the same to the bit.

A layer the kernel cannot take (a machine without it, or past `DecodeAttention.limit` a head with a second coded
block) attends through `attend` over blocks built from the same buffers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import onnxruntime as ort

from edge_runtime import attention_kernel
from edge_runtime.attention import Block, DecodeAttention, attend
from edge_runtime.families.contract import PLE_ROWS, ROWS, TOKEN_EMBEDDINGS
from edge_runtime.kv_cache import Visibility
from edge_runtime.quant.float_codecs import Float32Codec
from edge_runtime.rope import cos_sin

if TYPE_CHECKING:
    from edge_runtime.engine import Engine

_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}
_ONE_TOKEN = ("T", "R")  # the graphs' symbolic axes: tokens, and rows kept (all of them, one, in a decode step)


def _buffer(arg: ort.NodeArg) -> np.ndarray | None:
    """A zeroed buffer for one token of this graph output, or None where its shape needs more than the token count."""
    shape = [1 if dim in _ONE_TOKEN else dim for dim in arg.shape]
    if arg.type not in _DTYPES or not all(isinstance(dim, int) for dim in shape):
        return None
    return np.zeros(shape, _DTYPES[arg.type])


class _Layer(NamedTuple):
    """A graph's attention as the step runs it."""

    kv_layer: int
    layer_type: str  # its own and its cache layer's (a KV-shared layer reads a source of its type)
    scaling: np.float32 | None
    query: np.ndarray  # the graph's query output [1, kv_heads, groups, head_dim]
    scaled: np.ndarray  # the query attention reads: `query` itself, or a buffer for it times `scaling`
    out: np.ndarray  # the attention's result [1, heads * head_dim], an input of the next graph


class DecodeStep:
    """Engine.forward's step for one token after at least one cached (every cache layer's store exists then)."""

    def __init__(self, engine: Engine, values: dict[str, np.ndarray], buffers: list[np.ndarray],
                 graphs: list[tuple[ort.InferenceSession, ort.IOBinding, _Layer]],
                 last: tuple[ort.InferenceSession, list[str], dict[str, np.ndarray]],
                 new_kv: dict[int, tuple[np.ndarray, np.ndarray]]) -> None:
        self.owner = engine  # the engine this step is part of (it builds the step with itself)
        self.values = values  # each value's buffer as the step starts: the token's rows and RoPE tables
        self.buffers = buffers  # every buffer bound to a session: the bindings hold bare addresses
        self.graphs = graphs
        self.last = last
        self.new_kv = new_kv
        kernel = attention_kernel.load()
        self.scratch = np.empty(0 if kernel is None else kernel.scratch_floats, np.float32)
        self.positions = np.zeros(1, np.int64)
        types = set(engine.inv_freq)
        # Per layer type: what the step's position sees, (lower, upper) for the coded, recent and new blocks.
        self.bounds = {t: np.zeros((3, 2, 1), np.int64) for t in types}
        self.seen = {t: Visibility(*((b[k, 0], b[k, 1]) for k in range(3))) for t, b in self.bounds.items()}
        codec = {kv_layer: Float32Codec(keys.shape[-1]) for kv_layer, (keys, _) in new_kv.items()}
        self.new_blocks = {kv_layer: [Block(codec[kv_layer], {"values": k}, codec[kv_layer], {"values": v},
                                            self.positions, *self.seen[engine.spec.layer_types[kv_layer]].new)
                                      for k, v in zip(keys, vals)] for kv_layer, (keys, vals) in new_kv.items()}
        self.layout: int | None = None
        self.kernels: list[DecodeAttention | None] = []

    @classmethod
    def build(cls, engine: Engine) -> DecodeStep | None:
        """The step's buffers and bindings for this engine's graphs, or None where a graph's shapes are not known
        for one token from its own description (the general loop serves then)."""
        token = np.zeros(1, np.int64)  # any token: the buffers take the shapes and types of one token's values
        values = {TOKEN_EMBEDDINGS: np.zeros_like(engine.embed.rows(token)),
                  PLE_ROWS: np.zeros_like(engine.ple.rows(token)), ROWS: token.copy()}
        for t, f in engine.inv_freq.items():
            for name, table in zip(engine.rope_names[t], cos_sin(f, token)):
                values[name] = np.zeros_like(table)
        start = dict(values)
        buffers, graphs, new_kv = list(values.values()), [], {}
        for step, slot_feeds in zip(engine.steps[:-1], engine.slot_feeds[:-1]):
            session, feeds, fetch, kept, _, attention = step
            if attention is None:
                return None
            binding = session.io_binding()
            for name, value, layer in feeds:
                binding.bind_cpu_input(name, values[value] if layer is None else values[value][layer])
            for name, array in slot_feeds.items():
                binding.bind_cpu_input(name, array)
            outputs = {arg.name: arg for arg in session.get_outputs()}
            outs = [_buffer(outputs[name]) for name in fetch]
            if any(b is None for b in outs):
                return None
            for name, buffer in zip(fetch, outs):
                binding.bind_output(name, "cpu", 0, buffer.dtype, list(buffer.shape), buffer.ctypes.data)
            values.update(zip(kept, outs))
            query = outs[attention.first]
            if attention.writes:
                new_kv[attention.layer] = tuple(outs[attention.first + k].transpose(1, 0, 2) for k in (1, 2))
            scaled = query if attention.scaling is None else np.empty_like(query)
            values[attention.result] = out = np.zeros((1, query[0].size), np.float32)
            buffers += [*outs, scaled, out]
            graphs.append((session, binding, _Layer(attention.kv_layer, attention.layer_type, attention.scaling,
                                                    query, scaled, out)))
        session, feeds, fetch, _, _, attention = engine.steps[-1]
        if attention is not None:
            return None
        inputs = {name: values[value] if layer is None else values[value][layer] for name, value, layer in feeds}
        last = (session, fetch, {**inputs, **engine.slot_feeds[-1]})
        return cls(engine, start, buffers, graphs, last, new_kv)

    def _kernels(self) -> list[DecodeAttention | None]:
        """Each layer's kernel calls for the cache's current arrays."""
        engine, cache = self.owner, self.owner.cache
        kernels = []
        for _, _, layer in self.graphs:
            def blocks_of(layer: _Layer = layer) -> list[list[Block]]:
                cached = cache.blocks(layer.kv_layer, self.seen[layer.layer_type])
                return [[*head, new] for head, new in zip(cached, self.new_blocks[layer.kv_layer])]
            kernels.append(DecodeAttention.build(blocks_of, layer.scaled[0], layer.out.reshape(layer.scaled[0].shape),
                                                 engine.attention_pool, self.scratch))
        return kernels

    def drop_stale(self) -> None:
        """Let go of kernel calls built on arrays the cache has since replaced (a reset, a grown store): they hold
        those arrays, which would otherwise stay allocated beside their replacements until the next decode step
        (a new 32k prompt after a reset: two caches' worth at the peak)."""
        if self.layout != self.owner.cache.layout:
            self.kernels, self.layout = [], None

    def run(self, ids: np.ndarray) -> np.ndarray:
        """Logits [1, vocab] after the token ids[0] (range-checked), its keys and values committed to the cache."""
        engine, cache, values = self.owner, self.owner.cache, self.values
        positions = self.positions
        positions[0] = cache.length
        cache.reserve(1)
        if cache.layout != self.layout:
            self.kernels = self._kernels()
            self.layout = cache.layout
        np.copyto(values[TOKEN_EMBEDDINGS], engine.embed.rows(ids))
        np.copyto(values[PLE_ROWS], engine.ple.rows(ids))
        for t, f in engine.inv_freq.items():
            cos_name, sin_name = engine.rope_names[t]
            values[cos_name][...], values[sin_name][...] = cos_sin(f, positions)
            seen = cache.visibility(t, positions)
            self.bounds[t][...] = (seen.coded, seen.recent, seen.new)
        for (session, binding, layer), kernel in zip(self.graphs, self.kernels):
            session.run_with_iobinding(binding)
            if layer.scaling is not None:
                np.multiply(layer.query, layer.scaling, out=layer.scaled)
            stored = cache.used_slots(layer.layer_type)
            if kernel is not None and stored < kernel.limit:
                kernel(stored)
            else:
                cached = cache.blocks(layer.kv_layer, self.seen[layer.layer_type])
                blocks = [[*head, new] for head, new in zip(cached, self.new_blocks[layer.kv_layer])]
                layer.out[...] = attend(layer.scaled, blocks, engine.attention_pool)
        cache.commit(self.new_kv, positions)
        engine.tokens.append(int(ids[0]))
        session, fetch, inputs = self.last
        return session.run(fetch, inputs)[0]
