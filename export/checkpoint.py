"""A Hugging Face checkpoint directory, seen as the text decoder's named tensors.

Its family (by the config's model_type) says where the text weights sit (Gemma 4: under `model.language_model.`
in the multimodal wrapper, under `model.` in text-only `Gemma4ForCausalLM`) and which it needs; single-file or
sharded. Vision and audio towers are never read: only safetensors headers are parsed until a tensor is asked for.
`validate()` checks every tensor the decoder needs for presence, shape and dtype before export writes a
byte, so a bad checkpoint fails in seconds with the tensor's name rather than minutes into an export.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from edge_runtime.errors import CheckpointError
from edge_runtime.families import family_of_config
from edge_runtime.model_spec import ModelSpec
from edge_runtime.safetensors_reader import DTYPES, INDEX_FILE, SINGLE_FILE, SafetensorsFile

ROW_BLOCK_BYTES = 64 << 20  # float32 bytes of a table read at once


class Checkpoint:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: no such checkpoint directory")
        config_path = self.path / "config.json"
        if not config_path.is_file():
            raise CheckpointError(f"{config_path}: missing; a Hugging Face checkpoint needs its config.json")
        try:
            self.config = json.loads(config_path.read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{config_path}: not valid JSON ({exc})") from exc
        self.family = family_of_config(self.config, str(config_path))
        layout = self.family.checkpoint_layout(self.config, str(config_path))
        self.prefix, self.architecture = layout.prefix, layout.architecture
        self.spec: ModelSpec = self.family.read_config(self.config, str(config_path))
        self.expected = self.family.checkpoint_tensors(self.spec)
        self._files: dict[str, SafetensorsFile] = {}
        self._where: dict[str, str] = {}
        self._index()

    def _index(self) -> None:
        index_path = self.path / INDEX_FILE
        if index_path.is_file():
            try:
                weight_map: dict[str, str] = json.loads(index_path.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise CheckpointError(f"{index_path}: malformed shard index ({exc!r})") from exc
            shards = sorted({f for n, f in weight_map.items() if n.startswith(self.prefix)})
        elif (self.path / SINGLE_FILE).is_file():
            weight_map, shards = {}, [SINGLE_FILE]
        else:
            raise CheckpointError(f"{self.path}: no {SINGLE_FILE} or {INDEX_FILE}; not a safetensors checkpoint")
        for shard in shards:
            if not (self.path / shard).is_file():
                raise CheckpointError(f"{self.path / shard}: shard listed in {INDEX_FILE} is missing")
            self._files[shard] = SafetensorsFile(self.path / shard)
        for shard, file in self._files.items():
            for name in file.entries:
                if name.startswith(self.prefix):
                    self._where[name[len(self.prefix):]] = shard
        for name, shard in weight_map.items():
            local = name[len(self.prefix):]
            if name.startswith(self.prefix) and self._where.get(local) != shard:
                raise CheckpointError(f"{self.path / shard}: {INDEX_FILE} says it holds {name}, but it does not")

    def validate(self) -> None:
        for name, shape in self.expected.items():
            entry = self._entry(name)
            if entry.shape != shape:
                raise CheckpointError(
                    f"{self._files[self._where[name]].path}: tensor {self.prefix}{name} has shape "
                    f"{list(entry.shape)}, but config.json implies {list(shape)}"
                )
            if entry.dtype not in DTYPES:
                raise CheckpointError(
                    f"{self._files[self._where[name]].path}: tensor {self.prefix}{name} has dtype {entry.dtype}; "
                    f"only {sorted(DTYPES)} are supported"
                )

    def _entry(self, name: str):
        if name not in self._where:
            raise CheckpointError(f"{self.path}: tensor {self.prefix}{name} is missing from the checkpoint")
        return self._files[self._where[name]].entries[self.prefix + name]

    def tensor(self, name: str) -> np.ndarray:
        self._entry(name)
        return self._files[self._where[name]].read(self.prefix + name)

    def row_chunks(self, name: str, max_bytes: int = ROW_BLOCK_BYTES) -> Iterator[np.ndarray]:
        """float32 row blocks of a large tensor, so a 2.4 B-value table never sits in memory at once."""
        entry = self._entry(name)
        rows = entry.shape[0]
        per_row = max(int(np.prod(entry.shape[1:], dtype=np.int64)) * 4, 1)
        step = max(1, max_bytes // per_row)
        file = self._files[self._where[name]]
        for start in range(0, rows, step):
            yield file.read(self.prefix + name, slice(start, start + step))

    def dtype_of(self, name: str) -> str:
        return self._entry(name).dtype

    def dtypes(self) -> list[str]:
        return sorted({self._entry(n).dtype for n in self.expected})
