"""The Per-Layer Embedding store: a memory-mapped [vocab, layers * width] table read one row per token.

The PLE table is half of E2B's parameters but a token touches only its own row (35 x 256 values), so it
stays on flash and out of every ONNX graph: the OS pages in the rows of the tokens being processed and can
drop them again under memory pressure. Rows are returned already multiplied by sqrt(width), the scale
transformers' `Gemma4TextScaledWordEmbedding` applies, and laid out [layers, tokens, width] so that layer
i receives a contiguous slice.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edge_runtime.artifact import TensorRef
from edge_runtime.errors import ArtifactError, EdgeRuntimeError


class PleStore:
    """Read-only view of `ple.bin`; only rows that are asked for are ever read from disk."""

    def __init__(self, artifact: Path, ref: TensorRef, num_layers: int, width: int, scale: float) -> None:
        path = Path(artifact) / ref.file
        vocab, packed = ref.shape
        if packed != num_layers * width:
            raise ArtifactError(f"{path}: row width {packed} is not {num_layers} layers x {width}")
        self.table = np.memmap(path, dtype=np.dtype(ref.dtype), mode="r", offset=ref.offset, shape=(vocab, packed))
        self.num_layers = num_layers
        self.width = width
        self.scale = np.float32(scale)

    @property
    def vocab_size(self) -> int:
        return self.table.shape[0]

    def rows(self, token_ids: np.ndarray) -> np.ndarray:
        """[layers, tokens, width] float32 for these tokens (fancy indexing reads just their rows)."""
        ids = np.asarray(token_ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise EdgeRuntimeError(f"token id out of range for the PLE table (vocab {self.vocab_size})")
        raw = self.table[ids].astype(np.float32) * self.scale
        return np.ascontiguousarray(raw.reshape(len(ids), self.num_layers, self.width).transpose(1, 0, 2))
