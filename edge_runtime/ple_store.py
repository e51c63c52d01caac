"""The Per-Layer Embedding store: a memory-mapped [vocab, layers * width] table read one row per token.

The PLE table is half of E2B's parameters but a token touches only its own row (35 x 256 values), so it
stays on flash and out of every ONNX graph: the OS pages in the rows of the tokens being processed and can
drop them again under memory pressure. Rows are returned already multiplied by sqrt(width), the scale
transformers' `Gemma4TextScaledWordEmbedding` applies, and laid out [layers, tokens, width] so that layer
i receives a contiguous slice.

Formats: fp32; bf16, stored as the upper 16 bits of fp32 (lossless for bf16 checkpoints, which is how Gemma
ships, at the size of fp16); fp16 (lossless for bf16 values in its normal range). The encoding lives here,
next to the decoding, so export and runtime cannot disagree about it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edge_runtime.artifact import TensorRef
from edge_runtime.errors import ArtifactError, EdgeRuntimeError

_STORAGE = {"fp32": np.dtype("<f4"), "bf16": np.dtype("<u2"), "fp16": np.dtype("<f2")}
PLE_FORMATS = tuple(_STORAGE)


def storage_dtype(fmt: str) -> np.dtype:
    return _STORAGE[fmt]


def encode_rows(rows: np.ndarray, fmt: str) -> np.ndarray:
    """float32 rows -> stored representation; bf16 rounds to nearest even (exact for bf16 inputs).

    Values beyond fp16's range become inf here; export checks for that and names the fix.
    """
    if fmt == "bf16":
        bits = np.ascontiguousarray(rows, dtype=np.float32).view(np.uint32)
        return ((bits + (((bits >> 16) & 1) + 0x7FFF)) >> 16).astype(np.uint16)
    with np.errstate(over="ignore"):
        return rows.astype(_STORAGE[fmt])


def decode_rows(raw: np.ndarray, fmt: str) -> np.ndarray:
    if fmt == "bf16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.astype(np.float32)


class PleStore:
    """Read-only view of `ple.bin`; only rows that are asked for are ever read from disk."""

    def __init__(self, artifact: Path, ref: TensorRef, fmt: str, num_layers: int, width: int, scale: float) -> None:
        path = Path(artifact) / ref.file
        vocab, packed = ref.shape
        if packed != num_layers * width:
            raise ArtifactError(f"{path}: row width {packed} is not {num_layers} layers x {width}")
        if fmt not in _STORAGE:
            raise ArtifactError(f"{path}: PLE format {fmt!r} is not supported by this runtime ({sorted(_STORAGE)})")
        if ref.dtype != _STORAGE[fmt].name:
            raise ArtifactError(f"{path}: the manifest stores PLE format {fmt} as {ref.dtype}, not "
                                f"{_STORAGE[fmt].name}; the manifest is inconsistent, re-export")
        self.format = fmt
        self.table = np.memmap(path, dtype=_STORAGE[fmt], mode="r", offset=ref.offset, shape=(vocab, packed))
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
        raw = decode_rows(self.table[ids], self.format) * self.scale
        return np.ascontiguousarray(raw.reshape(len(ids), self.num_layers, self.width).transpose(1, 0, 2))
