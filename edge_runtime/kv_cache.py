"""The KV cache: numpy buffers the layer graphs read in place, plus the masks that say which slots count.

Only layers that compute keys and values own a buffer (15 of E2B's 35); KV-shared layers read their
source's. Sliding layers keep a ring of `window` slots (slot = position % window), full layers a buffer
that grows in steps (slot = position). Keys are stored transposed, [kv_heads, head_dim, slots], so the
score MatMul reads them as they are. A step never copies the cache: the graphs read it, the runtime writes
only the new tokens' slots afterwards. Unused and out-of-window slots are removed by the additive masks.
"""

from __future__ import annotations

import numpy as np

from edge_runtime.model_spec import SLIDING, ModelSpec

MASKED = np.finfo(np.float32).min


class KVCache:
    def __init__(self, spec: ModelSpec, growth: int = 256) -> None:
        self.spec = spec
        self.growth = growth
        self.keys: dict[int, np.ndarray] = {}
        self.values: dict[int, np.ndarray] = {}
        self.slot_positions: dict[str, np.ndarray] = {}
        self.length = 0
        self.reset()

    def reset(self) -> None:
        """Forget all tokens; buffers are reallocated at their initial size."""
        self.length = 0
        for layer_type in set(self.spec.layer_types):
            self.slot_positions[layer_type] = np.full(self._initial_slots(layer_type), -1, dtype=np.int64)
        for i in self.spec.cache_layers():
            slots = len(self.slot_positions[self.spec.layer_types[i]])
            kvh, hd = self.spec.num_key_value_heads, self.spec.head_dims[i]
            self.keys[i] = np.zeros((kvh, hd, slots), dtype=np.float32)
            self.values[i] = np.zeros((kvh, slots, hd), dtype=np.float32)

    def _initial_slots(self, layer_type: str) -> int:
        return self.spec.sliding_window if layer_type == SLIDING else self.growth

    def reserve(self, new_tokens: int) -> None:
        """Make room in full-attention buffers for positions up to length + new_tokens."""
        needed = self.length + new_tokens
        for layer_type, slots in self.slot_positions.items():
            if layer_type == SLIDING or needed <= len(slots):
                continue
            size = -(-needed // self.growth) * self.growth
            grown = np.full(size, -1, dtype=np.int64)
            grown[: len(slots)] = slots
            self.slot_positions[layer_type] = grown
            for i in self.keys:
                if self.spec.layer_types[i] == layer_type:
                    k, v = self.keys[i], self.values[i]
                    self.keys[i] = np.zeros((*k.shape[:2], size), dtype=np.float32)
                    self.keys[i][:, :, : k.shape[2]] = k
                    self.values[i] = np.zeros((v.shape[0], size, v.shape[2]), dtype=np.float32)
                    self.values[i][:, : v.shape[1]] = v

    def masks(self, layer_type: str, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Additive masks [T, slots] over the cache and [T, T] over the new tokens (causal, windowed)."""
        window = self.spec.window(layer_type)
        slots = self.slot_positions[layer_type]
        distance = positions[:, None] - slots[None, :]
        visible = (slots[None, :] >= 0) & (distance >= 0)
        new_distance = positions[:, None] - positions[None, :]
        new_visible = new_distance >= 0
        if window is not None:
            visible &= distance < window
            new_visible &= new_distance < window
        return (np.where(visible, 0.0, MASKED).astype(np.float32),
                np.where(new_visible, 0.0, MASKED).astype(np.float32))

    def commit(self, new_kv: dict[int, tuple[np.ndarray, np.ndarray]], positions: np.ndarray) -> None:
        """Store the step's new keys/values; a ring keeps only the last `window` of them."""
        for layer_type, slots in self.slot_positions.items():
            keep = positions[-len(slots):] if layer_type == SLIDING else positions
            index = keep % len(slots) if layer_type == SLIDING else keep
            for i, (key_t, value) in new_kv.items():
                if self.spec.layer_types[i] == layer_type:
                    self.keys[i][:, :, index] = key_t[:, :, -len(keep):]
                    self.values[i][:, index] = value[:, -len(keep):]
            slots[index] = keep
        self.length = int(positions[-1]) + 1
