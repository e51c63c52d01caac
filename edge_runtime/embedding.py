"""Token embedding lookup: the rows of the tied embedding table, read from the artifact and dequantized.

The table is also the LM head's weight; in every format but int8 the rows read here are the very bytes the
head kernel streams (see export/exporter.py), so the artifact holds one copy. Only the rows of the tokens
being processed are touched, so lookup adds a few KB of resident memory per token, not the table.
Rows come back multiplied by sqrt(hidden), as Gemma's scaled word embedding does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edge_runtime.artifact import Manifest
from edge_runtime.errors import ArtifactError
from edge_runtime.model_spec import embed_scale
from edge_runtime.quant.integer import dequantize_int4_blocks, dequantize_int8_rows
from edge_runtime.row_reader import RowReader


class EmbeddingTable:
    def __init__(self, artifact: Path, manifest: Manifest) -> None:
        self.format = manifest.formats["weights"]
        self.hidden = manifest.spec.hidden_size
        self.scale = np.float32(embed_scale(self.hidden))
        try:
            codes, scales = manifest.tensors["embed_tokens"], manifest.tensors.get("embed_scales")
            self.codes = RowReader(Path(artifact) / codes.file, np.dtype(codes.dtype), codes.offset, codes.shape)
            self.row_scales = None
            if self.format in ("int8", "int4"):
                # int8: one scale per row; int4: one per block, stored flat as MatMulNBits reads them
                shape = (codes.shape[0], *codes.shape[1:2]) if self.format == "int4" else (codes.shape[0],)
                self.row_scales = RowReader(Path(artifact) / scales.file, np.dtype(scales.dtype), scales.offset, shape)
        except (KeyError, AttributeError) as exc:
            raise ArtifactError(f"{artifact}: the manifest lacks the embedding tensors for {self.format} weights "
                                f"({exc}); re-export") from None

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """float32 [T, hidden] scaled embeddings of these (already range-checked) token ids."""
        if self.format == "int8":
            values = dequantize_int8_rows(self.codes[ids], self.row_scales[ids])
        elif self.format == "int4":
            values = dequantize_int4_blocks(self.codes[ids], self.row_scales[ids], self.hidden)
        else:
            values = self.codes[ids].astype(np.float32)
        return np.ascontiguousarray(values, dtype=np.float32) * self.scale
