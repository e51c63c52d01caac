"""The checkpoint's tensors with LoRA adapters merged in, one tensor at a time as export reads it.

Each linear is read (float32), updated by each adapter in the order given (W + s B A, DoRA's rescaling), and handed
to quantization, so int8 and int4 encode the merged weights and no more than one tensor is in memory at once. A
tensor an adapter retrains in full (modules_to_save: a norm, the embedding) is read from the adapter instead, the
embedding and the PLE table in row blocks as the base's are. edge_runtime/lora_adapter.py reads the adapters.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from edge_runtime.export.checkpoint import ROW_BLOCK_BYTES, Checkpoint
from edge_runtime.lora_adapter import Adapter


class MergedWeights:
    """`tensor(name)` and `row_chunks(name)` as Checkpoint gives them, with `adapters` applied in order."""

    def __init__(self, checkpoint: Checkpoint, adapters: list[Adapter]) -> None:
        self.checkpoint, self.adapters = checkpoint, adapters

    def tensor(self, name: str) -> np.ndarray:
        weight = self.checkpoint.tensor(name)
        for adapter in self.adapters:
            replacement = adapter.replacement(name)
            if replacement is not None:
                weight = replacement
            update = adapter.update(name)
            if update is not None:
                weight = update.apply(weight)
        return weight

    def row_chunks(self, name: str) -> Iterator[np.ndarray]:
        """Row blocks of a table (the embedding, the PLE table): the last adapter's copy of it, else the base's."""
        source = next((a for a in reversed(self.adapters) if name in a.replaced), None)
        if source is None:
            yield from self.checkpoint.row_chunks(name)
            return
        rows, width = self.checkpoint.expected[name][0], int(np.prod(self.checkpoint.expected[name][1:]))
        step = max(1, ROW_BLOCK_BYTES // (4 * width))
        for start in range(0, rows, step):
            yield source.replacement(name, slice(start, start + step))
