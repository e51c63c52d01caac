"""A streaming safetensors reader for bf16 / f16 / f32 checkpoints that needs neither torch nor mmap.

numpy has no bfloat16 and the `safetensors` numpy API refuses it; mmap would make every byte of a 9 GB
checkpoint count toward the exporter's resident memory. So the header is parsed here and tensors (or row
ranges of them) are read with plain file reads and widened to float32 one piece at a time. Every offset is
checked against the file size when the header is read, so a truncated download fails before export starts.
It needs numpy alone, so the runtime reads checkpoints' headers with it too (the planner: a table's dtype).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_runtime.errors import CheckpointError

INDEX_FILE = "model.safetensors.index.json"  # a sharded checkpoint's map of tensor -> file
SINGLE_FILE = "model.safetensors"  # an unsharded checkpoint's one file
DTYPES = {"BF16": np.dtype("<u2"), "F16": np.dtype("<f2"), "F32": np.dtype("<f4")}
MAX_HEADER_BYTES = 100 << 20


@dataclass(frozen=True)
class TensorEntry:
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def row_bytes(self) -> int:
        rows = self.shape[0] if self.shape else 1
        return (self.end - self.begin) // max(rows, 1)


class SafetensorsFile:
    """One .safetensors file: header parsed eagerly, tensor data read on demand."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{self.path}: truncated safetensors file ({size} bytes, no header)")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > min(MAX_HEADER_BYTES, size - 8):
                raise CheckpointError(
                    f"{self.path}: truncated or corrupt safetensors file (header claims {header_len} bytes, "
                    f"file has {size}); re-download it"
                )
            try:
                header = json.loads(f.read(header_len))
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise CheckpointError(f"{self.path}: safetensors header is not valid JSON ({exc})") from exc
        self.data_start = 8 + header_len
        self.entries: dict[str, TensorEntry] = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            entry = TensorEntry(info["dtype"], tuple(info["shape"]), self.data_start + begin, self.data_start + end)
            if entry.end > size:
                raise CheckpointError(
                    f"{self.path}: truncated: tensor {name} ends at byte {entry.end} but the file has {size} bytes; "
                    "re-download the checkpoint"
                )
            self.entries[name] = entry

    def read(self, name: str, rows: slice | None = None) -> np.ndarray:
        """The tensor (or rows [start, stop) of its first axis) as float32."""
        entry = self.entries[name]
        if entry.dtype not in DTYPES:
            raise CheckpointError(
                f"{self.path}: tensor {name} has dtype {entry.dtype}; only {sorted(DTYPES)} are supported"
            )
        raw_dtype = DTYPES[entry.dtype]
        shape = entry.shape
        begin, end = entry.begin, entry.end
        if rows is not None:
            start, stop = rows.start or 0, min(rows.stop, shape[0])
            begin, end = entry.begin + start * entry.row_bytes, entry.begin + stop * entry.row_bytes
            shape = (stop - start, *shape[1:])
        count = int(np.prod(shape, dtype=np.int64))
        if count * raw_dtype.itemsize != end - begin:
            raise CheckpointError(
                f"{self.path}: tensor {name} has {end - begin} bytes but shape {list(entry.shape)} of "
                f"{entry.dtype} needs {count * raw_dtype.itemsize}"
            )
        raw = np.empty(count, dtype=raw_dtype)
        with open(self.path, "rb") as f:
            f.seek(begin)
            if f.readinto(memoryview(raw).cast("B")) != end - begin:
                raise CheckpointError(f"{self.path}: truncated while reading tensor {name}")
        if entry.dtype == "BF16":
            return (raw.astype(np.uint32) << 16).view(np.float32).reshape(shape)
        return raw.astype(np.float32, copy=False).reshape(shape)
