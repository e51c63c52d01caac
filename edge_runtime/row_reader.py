"""Rows of a table inside an artifact file, read with pread: what was read is all that stays in memory.

The embedding table is also the LM head's weight, so onnxruntime reads all of it at load and the page cache
then holds it in large folios; a memory map of it would map a whole folio (up to 2 MiB, measured) into this
process for every token row it touches: 4,600 random tokens left 200 MB of weights.bin resident. Plain
reads of the few bytes of each row keep resident memory independent of the page cache, at the cost of one
system call per row (microseconds, against milliseconds per token).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


class RowReader:
    """[rows, *row_shape] of `dtype` at byte `offset` of `path`; indexing by a token id array reads those rows."""

    def __init__(self, path: Path, dtype: np.dtype, offset: int, shape: tuple[int, ...]) -> None:
        self.dtype = np.dtype(dtype)
        self.shape = tuple(shape)
        self.row_shape = self.shape[1:]
        self.row_bytes = int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize
        self.path = Path(path)
        self.offset = offset
        self._fd = os.open(path, os.O_RDONLY)

    def __del__(self) -> None:
        fd = getattr(self, "_fd", None)
        if fd is not None:
            os.close(fd)

    def __getitem__(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        out = np.empty((len(ids), self.row_bytes), dtype=np.uint8)
        for i, row in enumerate(ids.tolist()):
            out[i] = np.frombuffer(os.pread(self._fd, self.row_bytes, self.offset + row * self.row_bytes),
                                   dtype=np.uint8)
        return out.view(self.dtype).reshape(len(ids), *self.row_shape)
