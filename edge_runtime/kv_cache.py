"""The KV cache: each cache layer's keys and values in the chosen KV format, and the position held in each slot.

Only layers that compute keys and values own a store (15 of E2B's 35); KV-shared layers read their
source's. Sliding layers keep a ring of `window` slots (slot = position % window), full layers a store
that grows in steps (slot = position). Each step encodes only the new tokens into their slots; attention
then reads the stores in place as blocks (edge_runtime.attention), so a decode step writes O(1) bytes.

Rings (sliding windows and the recent ring) carry ROLLBACK_TOKENS slots beyond what attention reads, so the
cache can be cut back to an earlier length (`truncate`) by that many tokens without losing a token still in view:
what lets a chat turn reuse the cache when the re-rendered transcript differs from the generated tokens at the end.

Sliding layers may use their own format (`sliding_format`; kv_formats.default_sliding_format: fp16 unless the
full layers are fp32): their rings stop at the window, so compressing them further saves little memory (E2B:
12 rings of 512 tokens, 6 MB in fp16), but each is read whole at every step.

The `recent` most recent tokens are also kept exactly (float32, a ring of `recent` + ROLLBACK_TOKENS slots):
attention reads them from there and reads only older tokens from the codes, which protects the tokens that
attention weighs most at negligible cost.

What a token sees does not depend on how the tokens were fed: a token at position p reads itself and the `recent`
positions before it exactly and everything older through its codes, whether those tokens came in its own prefill
chunk or in earlier steps (`Visibility.new_coded`: the step's own older rows as the store will hold them,
decoded). So a prompt run at once and the same prompt run after a cached prefix give the same logits (but for the
rounding of sums onnxruntime does at another batch size), and a second call that reuses the first one's cache, keeping
what it stored for the token it runs again (`truncate(..., keep_next=True)`), reads the numbers the first one read.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edge_runtime.attention import Block
from edge_runtime.kv_formats import ROLLBACK_TOKENS, KVFormat, ring_slots
from edge_runtime.memory import zeros_in_own_mapping
from edge_runtime.model_spec import SLIDING, ModelSpec
from edge_runtime.quant.codec import VectorCodec
from edge_runtime.quant.float_codecs import Float32Codec

GROWTH = 256  # full-attention stores grow by this many slots at a time (and the planner counts in these steps)


class CodeStore:
    """Vectors in one codec, addressed by slot; storage is the codec's own arrays (leading axis = slot), each in a
    mapping of its own (memory.zeros_in_own_mapping), so a store replaced by a grown one or dropped by a reset
    gives its memory back at once."""

    def __init__(self, codec: VectorCodec, slots: int) -> None:
        self.codec = codec
        self.data = self._allocate(slots)

    def _allocate(self, slots: int) -> dict[str, np.ndarray]:
        return {name: zeros_in_own_mapping((slots, *array.shape[1:]), array.dtype)
                for name, array in self.codec.empty(0).items()}

    def write(self, slots: np.ndarray, vectors: np.ndarray) -> None:
        for name, codes in self.codec.encode(vectors).items():
            self.data[name][slots] = codes

    def view(self, slots: int) -> dict[str, np.ndarray]:
        return {name: array[:slots] for name, array in self.data.items()}

    def grow(self, slots: int) -> None:
        grown = self._allocate(slots)
        for name, array in self.data.items():
            grown[name][: len(array)] = array
        self.data = grown


@dataclass
class LayerStore:
    """One cache layer: per KV head, its keys and values in the KV format and its exact recent ring."""

    keys: list[CodeStore]
    values: list[CodeStore]
    recent_keys: list[CodeStore]
    recent_values: list[CodeStore]


@dataclass(frozen=True)
class Visibility:
    """For the step's query tokens, the positions each sees per kind of block, as (lower, upper) bounds [T]:
    the coded slots (older than the exact recent ones), the exact recent ring, the step's own tokens exactly (itself
    and its recent ones), and (`new_coded`, in a lossy format) the step's own older tokens as their codes decode."""

    coded: tuple[np.ndarray, np.ndarray]
    recent: tuple[np.ndarray, np.ndarray]
    new: tuple[np.ndarray, np.ndarray]
    new_coded: tuple[np.ndarray, np.ndarray] | None = None


class KVCache:
    def __init__(self, spec: ModelSpec, kv_format: KVFormat, recent: int = 0, sliding_format: KVFormat | None = None,
                 growth: int = GROWTH) -> None:
        self.spec = spec
        self.format = kv_format
        self.sliding_format = sliding_format or kv_format
        self.recent = recent
        self.recent_of = {t: kv_format.ring(self._format(t), recent) for t in set(spec.layer_types)}
        self.growth = growth
        self.stores: dict[int, LayerStore] = {}
        self.slot_positions: dict[str, np.ndarray] = {}
        self.recent_slots = ring_slots(recent)
        # The recent ring's slots per layer type: none where the format is exact (recent_of is 0 there).
        self.ring_of = {t: self.recent_slots if r else 0 for t, r in self.recent_of.items()}
        self.recent_positions = np.full(self.recent_slots, -1, dtype=np.int64)
        self.length = 0
        # A position `truncate` cut whose stored keys and values the next step keeps (`truncate(..., keep_next=True)`).
        self.kept: int | None = None
        # Counts the times any store's arrays or slot positions were replaced (reset, growth, a new store): what
        # holds their addresses (edge_runtime.decode_step) rebuilds when it changes.
        self.layout = 0
        self.reset()

    def reset(self) -> None:
        """Forget all tokens; codecs are rebuilt (and outlier channels re-picked) on the next write."""
        self.length = 0
        self.kept = None
        self.layout += 1
        self.stores.clear()
        self.recent_positions[:] = -1
        for layer_type in set(self.spec.layer_types):
            self.slot_positions[layer_type] = np.full(self._initial_slots(layer_type), -1, dtype=np.int64)

    def _initial_slots(self, layer_type: str) -> int:
        return ring_slots(self.spec.sliding_window) if layer_type == SLIDING else self.growth

    def can_truncate(self, length: int) -> bool:
        """Whether `truncate(length)` keeps every token a later step may attend to (rings hold only so much)."""
        return 0 <= length <= self.length and (self.length - length <= ROLLBACK_TOKENS or length == 0)

    def truncate(self, length: int, keep_next: bool = False) -> None:
        """Forget the tokens at positions >= length, as if only the first `length` had been processed.

        `keep_next`: the next step runs the token at position `length` again, the one that was there (its logits
        are wanted, and a step must run a token to give them); its commit keeps the keys and values stored for it
        rather than the ones it computed again. Those were computed in another batch, where onnxruntime's sums round
        otherwise, and a coarse format's codes may round otherwise with them: every later token then reads what the
        first run's later tokens read, and a seeded reply repeats itself on a second call with the same prompt.
        """
        if not self.can_truncate(length) or (keep_next and length >= self.length):
            raise ValueError(f"cannot cut the cache from {self.length} back to {length} tokens")
        if length == 0:
            self.reset()
            return
        for slots in (*self.slot_positions.values(), self.recent_positions):
            slots[slots >= length] = -1
        self.length = length
        self.kept = length if keep_next else None

    def reserve(self, new_tokens: int) -> None:
        """Make room in full-attention stores for positions up to length + new_tokens."""
        needed = self.length + new_tokens
        for layer_type, slots in self.slot_positions.items():
            if layer_type == SLIDING or needed <= len(slots):
                continue
            size = -(-needed // self.growth) * self.growth
            self.layout += 1
            grown = np.full(size, -1, dtype=np.int64)
            grown[: len(slots)] = slots
            self.slot_positions[layer_type] = grown
            for i, store in self.stores.items():
                if self.spec.layer_types[i] == layer_type:
                    for code_store in (*store.keys, *store.values):
                        code_store.grow(size)

    def _format(self, layer_type: str) -> KVFormat:
        return self.sliding_format if layer_type == SLIDING else self.format

    def used_slots(self, layer_type: str) -> int:
        """Slots written so far: positions fill slots in order, and a ring's only once it has wrapped."""
        return min(self.length, len(self.slot_positions[layer_type]))

    def visibility(self, layer_type: str, positions: np.ndarray) -> Visibility:
        """What these new positions see: causal, windowed on sliding layers, the `recent` positions before each
        read exactly and older ones through their codes (the step's own included, in a lossy format)."""
        window = self.spec.window(layer_type)
        first = np.maximum(positions - window + 1, 0) if window is not None else np.zeros_like(positions)
        if self._format(layer_type).exact:
            return Visibility(coded=(first, positions - 1), recent=(first, positions), new=(first, positions))
        first_exact = np.maximum(first, positions - self.recent_of[layer_type])
        return Visibility(coded=(first, first_exact - 1), recent=(first_exact, positions), new=(first_exact, positions),
                          new_coded=(first, first_exact - 1))

    def round_trip(self, layer: int, keys: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The step's own keys and values [kv_heads, T, head_dim] as layer `layer`'s store will hold them, decoded
        back to float32: what a token reads of its step's own rows past the exact ones (Visibility.new_coded). The
        first write makes the store (and picks its codecs) here, before attention."""
        store = self._store(layer, keys, values)
        return tuple(np.stack([s.codec.decode(s.codec.encode(np.ascontiguousarray(x[h]))).reshape(x[h].shape)
                               for h, s in enumerate(stores)]) for x, stores in ((keys, store.keys),
                                                                                 (values, store.values)))

    def _store(self, layer: int, keys: np.ndarray, values: np.ndarray) -> LayerStore:
        if layer not in self.stores:
            self.stores[layer] = self._new_store(layer, keys, values)
            self.layout += 1
        return self.stores[layer]

    def blocks(self, layer: int, seen: Visibility) -> list[list[Block]]:
        """Per KV head, the cached blocks layer `layer`'s store offers attention (none before the first write)."""
        store = self.stores.get(layer)
        if store is None:
            return [[] for _ in range(self.spec.num_key_value_heads)]
        layer_type = self.spec.layer_types[layer]
        used = self.used_slots(layer_type)
        coded = self.slot_positions[layer_type][:used]
        ring = self.recent_positions[:self.ring_of[layer_type]]
        return [
            [Block(k.codec, k.view(used), v.codec, v.view(used), coded, *seen.coded),
             *([Block(rk.codec, rk.data, rv.codec, rv.data, ring, *seen.recent)] if len(ring) else [])]
            for k, v, rk, rv in zip(store.keys, store.values, store.recent_keys, store.recent_values)
        ]

    def bytes_read(self, layer: int) -> int:
        """Bytes attention reads from layer `layer`'s store in a step now: used slots' codes and the recent ring."""
        store = self.stores.get(layer)
        if store is None:
            return 0
        used = self.used_slots(self.spec.layer_types[layer])
        coded = sum(s.codec.bytes_per_vector for s in (*store.keys, *store.values)) * used
        ring = self.ring_of[self.spec.layer_types[layer]]
        return coded + sum(s.codec.bytes_per_vector for s in (*store.recent_keys, *store.recent_values)) * ring

    def nbytes(self) -> int:
        """Bytes the cache holds allocated, all layers, codes, norms and recent rings included."""
        return sum(array.nbytes for store in self.stores.values()
                   for s in (*store.keys, *store.values, *store.recent_keys, *store.recent_values)
                   for array in s.data.values())

    def _new_store(self, layer: int, keys: np.ndarray, values: np.ndarray) -> LayerStore:
        layer_type = self.spec.layer_types[layer]
        slots = len(self.slot_positions[layer_type])
        fmt = self._format(layer_type)
        dim = keys.shape[-1]
        exact = Float32Codec(dim)
        ring = self.ring_of[layer_type]
        return LayerStore(
            keys=[CodeStore(fmt.keys.build(dim, k), slots) for k in keys],
            values=[CodeStore(fmt.values.build(dim, v), slots) for v in values],
            recent_keys=[CodeStore(exact, ring) for _ in keys],
            recent_values=[CodeStore(exact, ring) for _ in values],
        )

    def commit(self, new_kv: dict[int, tuple[np.ndarray, np.ndarray]], positions: np.ndarray) -> None:
        """Store the step's new keys/values [kv_heads, T, head_dim]; a ring keeps only the last `window`. A kept
        position (`truncate(..., keep_next=True)`) keeps what is stored for it."""
        skip = 1 if self.kept is not None and positions[0] == self.kept else 0
        self.kept = None
        for layer_type, slots in self.slot_positions.items():
            keep = positions[-len(slots):] if layer_type == SLIDING else positions
            index = keep % len(slots) if layer_type == SLIDING else keep
            written = min(len(keep), len(positions) - skip)
            for i, (keys, values) in new_kv.items():
                if self.spec.layer_types[i] != layer_type:
                    continue
                store = self._store(i, keys, values)
                for h in range(len(keys)):
                    if written:
                        store.keys[h].write(index[-written:], keys[h, -written:])
                        store.values[h].write(index[-written:], values[h, -written:])
            slots[index] = keep
        if self.recent:
            keep = positions[-self.recent_slots:]
            index = keep % self.recent_slots
            written = min(len(keep), len(positions) - skip)
            for i, (keys, values) in new_kv.items():
                if not self.recent_of[self.spec.layer_types[i]] or not written:
                    continue
                for h in range(len(keys)):
                    self.stores[i].recent_keys[h].write(index[-written:], keys[h, -written:])
                    self.stores[i].recent_values[h].write(index[-written:], values[h, -written:])
            self.recent_positions[index] = keep
        self.length = int(positions[-1]) + 1
