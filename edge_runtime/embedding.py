"""Token embedding lookup: the rows of the tied embedding table, read from the artifact and decoded by its format.

The table is also the LM head's weight; in every format but int8 the rows read here are the very bytes the
head kernel streams (WeightFormat.write_embedding), so the artifact holds one copy. Only the rows of the tokens
being processed are touched, so lookup adds a few KB of resident memory per token, not the table.
Rows come back multiplied by sqrt(hidden), as Gemma's scaled word embedding does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edge_runtime.artifact import EMBED_SCALES, Manifest, TensorRef
from edge_runtime.errors import ArtifactError
from edge_runtime.families.family import HEAD
from edge_runtime.model_spec import embed_scale
from edge_runtime.row_reader import RowReader


class EmbeddingTable:
    def __init__(self, artifact: Path, manifest: Manifest) -> None:
        self.format = manifest.weight_formats.get(HEAD)
        self.hidden = manifest.spec.hidden_size
        self.scale = np.float32(embed_scale(self.hidden))
        records = -(-manifest.spec.vocab_size // self.format.rows_per_record)
        try:
            codes, scales = self.format.row_layout(self.hidden)

            def rows(ref: TensorRef, layout: tuple[tuple[int, ...], np.dtype]) -> RowReader:
                # the stored shape may be flat (int8-block's scales, as MatMulNBits reads them): records are as
                # the format lays them out
                if np.dtype(ref.dtype) != layout[1]:
                    raise ArtifactError(f"{artifact}: the embedding's {ref.dtype} tensor at offset {ref.offset} is "
                                        f"not {self.format.label}'s {layout[1]}; the manifest is damaged, re-export")
                return RowReader(Path(artifact) / ref.file, layout[1], ref.offset, (records, *layout[0]))

            self.codes = rows(manifest.tensors[HEAD], codes)
            self.row_scales = None if scales is None else rows(manifest.tensors[EMBED_SCALES], scales)
        except (KeyError, AttributeError) as exc:
            raise ArtifactError(f"{artifact}: the manifest lacks the embedding tensors for its weight format "
                                f"({exc}); re-export") from None

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """float32 [T, hidden] scaled embeddings of these (already range-checked) token ids."""
        per = self.format.rows_per_record
        records = ids // per
        codes, scales = self.codes[records], None if self.row_scales is None else self.row_scales[records]
        if per > 1:
            codes, scales = self.format.select_rows(codes, scales, ids % per)
        values = self.format.decode_rows(codes, scales, self.hidden)
        return np.ascontiguousarray(values, dtype=np.float32) * self.scale
