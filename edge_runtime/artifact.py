"""The artifact format: file names, manifest schema and integrity checks, defined once.

Export writes exactly what this module describes and the runtime reads nothing it does not describe.
An artifact is a flat directory: the decoder as ONNX graphs cut only at attention, which the runtime computes from
its KV cache in the format chosen at run time (`segment_NN.onnx`, run as the manifest's graph contract says:
families/contract.py); the big tensors in `weights.bin` (ONNX external data, 64 KiB aligned so onnxruntime can map
it); the PLE table in `ple.bin`; the tokenizer and chat template; and `manifest.json` with a SHA-256 of each. The
manifest names the model's family (families/), whose spec its `model.config` holds.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_runtime.errors import ArtifactError
from edge_runtime.families import family_named
from edge_runtime.families.contract import SEGMENT_GRAPH, GraphContract
from edge_runtime.families.family import Family
from edge_runtime.lora_slots import LoraSlots
from edge_runtime.model_spec import ModelSpec
from edge_runtime.weight_formats import BLOCK_SIZES, WeightFormat, weight_format
from edge_runtime.weight_recipe import WeightRecipe, parse_recipe

FORMAT_NAME = "edge-runtime-artifact"
FORMAT_VERSION = 7
MANIFEST = "manifest.json"
WEIGHTS_FILE = "weights.bin"
PLE_FILE = "ple.bin"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
EXTERNAL_DATA_ALIGNMENT = 65536
EMBED_SCALES = "embed_scales"  # in `tensors`, the scales of the embedding's lookup rows (formats that have them)

NAMED_FILES = frozenset({MANIFEST, WEIGHTS_FILE, PLE_FILE, TOKENIZER_FILE, TOKENIZER_CONFIG_FILE,
                         GENERATION_CONFIG_FILE, CHAT_TEMPLATE_FILE})


def is_artifact_file(name: str) -> bool:
    """Whether an artifact can hold a file of this name: how export tells its own leftovers from a user's files."""
    return name in NAMED_FILES or SEGMENT_GRAPH.fullmatch(name) is not None


@dataclass(frozen=True)
class TensorRef:
    """Where a raw tensor lives inside an artifact file, for tensors the runtime reads with numpy."""

    file: str
    offset: int
    shape: tuple[int, ...]
    dtype: str

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "offset": self.offset, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TensorRef:
        return cls(data["file"], int(data["offset"]), tuple(data["shape"]), data["dtype"])


@dataclass(frozen=True)
class Manifest:
    """Everything the runtime needs to know about an artifact, as stored in manifest.json.

    `formats["weights"]` is the weight recipe export was given (edge_runtime/weight_recipe.py; a uniform one is the
    format's name), `formats["block_size"]` the block of its int4 weights; `weight_formats` is what each linear of the
    graphs was written in, by its name (families/family.Linear: "layers.3.self_attn.o_proj", the head HEAD), stored
    as format names. Artifacts written before recipes have no `weight_formats`: all their linears are in the one
    format `formats["weights"]` names, which is how they are read (the format version did not change).
    `adapters` are the LoRA adapters merged into the weights at export, in order (edge_runtime/lora_adapter.py:
    name, SHA-256 of each file, scale); empty when none were, and in artifacts written before adapters.
    `lora_slots` are the graphs' inputs for adapters attached at load (edge_runtime/lora_slots.py), None when the
    artifact was exported without `--lora-slots`.
    """

    spec: ModelSpec
    source: dict[str, Any]
    formats: dict[str, Any]
    weight_formats: dict[str, WeightFormat]
    graphs: GraphContract
    tensors: dict[str, TensorRef]
    ple_store: TensorRef
    tokenizer: dict[str, str | None]
    files: dict[str, dict[str, Any]]
    created_by: str
    read_per_token: dict[str, int]
    adapters: tuple[dict[str, Any], ...] = ()
    lora_slots: LoraSlots | None = None

    @property
    def bytes_per_token(self) -> int:
        """Model bytes one decode step reads: every graph's weights, one embedding row and one PLE row.

        This is what bounds decode speed (tokens/s <= bandwidth / bytes); the KV cache read comes on top
        and grows with the context.
        """
        return sum(self.read_per_token.values())

    @property
    def weight_recipe(self) -> WeightRecipe:
        return parse_recipe(self.formats["weights"], self.formats["block_size"])

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "created_by": self.created_by,
            "model": {"family": self.spec.family, "config": self.spec.to_dict(), "source": self.source},
            "formats": self.formats,
            "weight_formats": {name: fmt.name for name, fmt in self.weight_formats.items()},
            "graphs": self.graphs.to_dict(),
            "tensors": {k: v.to_dict() for k, v in self.tensors.items()},
            "ple_store": self.ple_store.to_dict(),
            "tokenizer": self.tokenizer,
            "files": self.files,
            "read_per_token": self.read_per_token,
            "adapters": list(self.adapters),
            "lora_slots": None if self.lora_slots is None else self.lora_slots.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str) -> Manifest:
        if not isinstance(data, dict):
            raise ArtifactError(f"{where}: not an edge-runtime manifest (not a JSON object)")
        if data.get("format") != FORMAT_NAME:
            raise ArtifactError(f"{where}: not an edge-runtime manifest (format={data.get('format')!r})")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise ArtifactError(
                f"{where}: format_version {version!r} is not supported by this runtime (reads {FORMAT_VERSION}); "
                "re-export the checkpoint with this version of edge-runtime"
            )
        formats = data.get("formats", {})
        weights, block_size = formats.get("weights"), formats.get("block_size") or BLOCK_SIZES[0]
        try:
            recipe = parse_recipe(weights, block_size)
        except (ValueError, TypeError) as exc:
            raise ArtifactError(f"{where}: weight format {weights!r} is not supported by this runtime ({exc}); "
                                "upgrade edge-runtime or re-export") from None
        try:
            family = family_named(data["model"]["family"], where)
            spec = family.spec_type.from_dict(data["model"]["config"])
            return cls(
                spec=spec,
                source=data["model"].get("source", {}),
                formats=formats,
                weight_formats=_weight_formats(data.get("weight_formats"), recipe, family, spec, block_size),
                graphs=GraphContract.from_dict(data["graphs"], where),
                tensors={k: TensorRef.from_dict(v) for k, v in data["tensors"].items()},
                ple_store=TensorRef.from_dict(data["ple_store"]),
                tokenizer=data["tokenizer"],
                files=data["files"],
                created_by=data.get("created_by", "unknown"),
                read_per_token={k: int(v) for k, v in data["read_per_token"].items()},
                adapters=tuple(data.get("adapters", ())),
                lora_slots=None if data.get("lora_slots") is None else LoraSlots.from_dict(data["lora_slots"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"{where}: manifest is missing or has a malformed field ({exc!r}); re-export") from exc


def _weight_formats(recorded: Any, recipe: WeightRecipe, family: Family, spec: ModelSpec,
                    block_size: int) -> dict[str, WeightFormat]:
    """Each linear's format as the manifest records it, or, in an artifact written before recipes, as its uniform
    recipe gives it to every linear the family's graphs hold."""
    if recorded is None:
        return {linear.name: recipe.format_for(linear.role)
                for segment in family.graph_parts(spec) for part in segment for linear in part.linears}
    return {name: weight_format(value, block_size) for name, value in recorded.items()}


def sha256_file(path: Path, chunk: int = 8 << 20) -> str:
    """The file's SHA-256, leaving none of it in the page cache.

    Hashing reads gigabytes in large chunks; left cached, those pages come back as large folios when ple.bin is
    mapped, so every PLE row touched maps far more than its own pages (measured: 1.6 MB per token instead of
    21 KiB). They are clean and reclaimable, but they swell RSS and push the rest of the system out of memory.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    return digest.hexdigest()


def file_entry(path: Path) -> dict[str, Any]:
    return {"size": path.stat().st_size, "sha256": sha256_file(path)}


def _parse_manifest(artifact: Path) -> Manifest:
    """The manifest of `artifact`, validated, without looking at the files it lists."""
    path = artifact / MANIFEST
    if not artifact.is_dir():
        raise ArtifactError(f"{artifact}: no such artifact directory (create one with `edge-runtime export`)")
    if not path.is_file():
        hint = ""
        if (artifact / "config.json").is_file():
            command = f"edge-runtime export {shlex.quote(str(artifact))} -o {shlex.quote(artifact.resolve().name + '.art')}"
            hint = f" but a Hugging Face checkpoint; export it first: {command}"
        raise ArtifactError(f"{artifact}: no {MANIFEST}; this is not an edge-runtime artifact{hint}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path}: not valid JSON ({exc})") from exc
    return Manifest.from_dict(data, str(path))


def read_manifest(artifact: Path) -> Manifest:
    """Load and validate the manifest; checks that every listed file is present with its recorded size.

    Sizes are checked on every read because it is free and catches truncated copies; SHA-256 is checked by
    `verify_artifact`, and at load time by `integrity.check_artifact` for files not yet seen intact.
    """
    artifact = Path(artifact)
    manifest = _parse_manifest(artifact)
    for name, entry in manifest.files.items():
        file = artifact / name
        if not file.is_file():
            raise ArtifactError(f"{file}: listed in the manifest but missing; the artifact is incomplete")
        if file.stat().st_size != entry["size"]:
            raise ArtifactError(
                f"{file}: size {file.stat().st_size} differs from the manifest's {entry['size']}; "
                "the artifact is damaged, re-export or re-copy it"
            )
    return manifest


MISSING, SIZE_DIFFERS, SHA256_DIFFERS = "missing", "size differs from the manifest", "SHA-256 mismatch"
_DAMAGE_LINES = {SHA256_DIFFERS: "SHA-256 mismatch in {}", SIZE_DIFFERS: "size differs from the manifest in {}",
                 MISSING: "missing {}"}


def verify_artifact(artifact: Path) -> dict[str, str]:
    """Every damaged file, by name: MISSING, SIZE_DIFFERS or SHA256_DIFFERS (empty when intact).

    Unlike loading, this goes on past the first damaged file, so that one run says everything to re-copy.
    """
    artifact = Path(artifact)
    damaged = {}
    for name, entry in _parse_manifest(artifact).files.items():
        file = artifact / name
        if not file.is_file():
            damaged[name] = MISSING
        elif file.stat().st_size != entry["size"]:
            damaged[name] = SIZE_DIFFERS
        elif sha256_file(file) != entry["sha256"]:
            damaged[name] = SHA256_DIFFERS
    return damaged


def describe_damage(artifact: Path, damaged: dict[str, str]) -> str:
    """One line for `verify_artifact`'s findings: what is wrong with which files, and what to do."""
    parts = []
    for kind, shown in _DAMAGE_LINES.items():
        if names := [name for name, found in damaged.items() if found == kind]:
            parts.append(shown.format(", ".join(names)))
    return f"{artifact}: {'; '.join(parts)}; the artifact is damaged, re-export or re-copy it"
