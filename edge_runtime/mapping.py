"""Read-only memory maps of artifact tables read a few rows at a time (the PLE store).

Token rows are scattered across the file, so the kernel's readahead, which assumes sequential reads, would
page in neighbours of every row read; MADV_RANDOM turns it off. Measured on E2B's int8 PLE store with a cold
page cache: 100 random rows left 1.3 MB of the mapping resident. It cannot help when the file is already
cached in large folios (right after export): a fault then maps a whole folio, and the same 100 rows left
178 MB resident; those pages are clean and the kernel reclaims them under pressure.
"""

from __future__ import annotations

import mmap
from pathlib import Path

import numpy as np


def map_rows(path: Path, dtype: np.dtype, offset: int, shape: tuple[int, ...]) -> np.ndarray:
    """A read-only array over `shape` elements of `dtype` at byte `offset` of `path`, advised for random reads."""
    dtype = np.dtype(dtype)
    count = int(np.prod(shape, dtype=np.int64))
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), offset - start + count * dtype.itemsize, access=mmap.ACCESS_READ,
                           offset=start)
    if hasattr(mapped, "madvise") and hasattr(mmap, "MADV_RANDOM"):
        mapped.madvise(mmap.MADV_RANDOM)
    return np.frombuffer(mapped, dtype=dtype, count=count, offset=offset - start).reshape(shape)
