"""A PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors; Unsloth saves through PEFT), read
as updates to the text decoder's tensors by their names relative to the text model ("layers.3.mlp.up_proj.weight").

Export merges these updates while streaming (export/adapter_merge.py); loading will attach them with the same
reading, so this module needs numpy alone. Which modules an adapter changes is what its weights file holds, as when
PEFT loads it; the config gives each module's scale (lora_alpha / r, or / sqrt(r) with use_rslora, r and alpha
taken from rank_pattern / alpha_pattern by PEFT's matching rule) and must target every module the file holds.
Keys are accepted in the multimodal layout (`base_model.model.model.language_model.`), the causal one
(`base_model.model.model.`) and the older multimodal one (`base_model.model.language_model.model.`), whatever the
base's own layout. Anything the decoder cannot take (a vision or audio tower, the LM head, LoRA on an embedding, a
shape that does not fit, a tensor the base lacks) is refused in one line naming the key, before anything is written.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.artifact import sha256_file
from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.safetensors_reader import SafetensorsFile

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS)
WRAPPER = "base_model.model."  # PeftModel's prefix of every key
TEXT_PREFIXES = ("model.language_model.", "language_model.model.", "model.")  # multimodal, older multimodal, causal
TOWERS = ("model.vision_tower.", "model.audio_tower.", "model.embed_vision.", "model.embed_audio.",
          "vision_tower.", "audio_tower.", "multi_modal_projector.")
HEAD_KEY = WRAPPER + "lm_head.weight"  # modules_to_save's copy of the head, tied to the embedding's
LORA_A, LORA_B, MAGNITUDE = ".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector"
# init_lora_weights values that change the base weights themselves: an adapter trained so is relative to those.
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")
CONVERSION = "save_pretrained(path_initial_model_for_weight_conversion=...)"
DEFAULT_LAYER_PATTERN = re.compile(r".*\.[^.]*\.(\d+)\.")  # PEFT's layer index when layers_pattern is unset


class AdapterError(EdgeRuntimeError):
    """A LoRA adapter that edge-runtime cannot merge into this checkpoint, explained in one line."""


@dataclass(frozen=True)
class LoraUpdate:
    """One linear's update: W + scaling * B @ A, and with DoRA rescaled row by row to `magnitude` (PEFT's merge:
    m * (W + s BA) / ||W + s BA||, the norm over each output row's inputs)."""

    a: np.ndarray  # [r, in]
    b: np.ndarray  # [out, r]
    scaling: float
    magnitude: np.ndarray | None  # [out], DoRA

    def apply(self, weight: np.ndarray) -> np.ndarray:
        merged = weight + np.float32(self.scaling) * (self.b @ self.a)
        if self.magnitude is not None:
            merged *= (self.magnitude / np.linalg.norm(merged, axis=1))[:, None]
        return merged.astype(np.float32, copy=False)


@dataclass(frozen=True)
class _Module:
    """Where one module's LoRA tensors are in the adapter file, and its scaling (the adapter's scale included)."""

    a: str
    b: str
    magnitude: str | None
    scaling: float


class Adapter:
    """One adapter directory, checked against the decoder's tensors (`expected`: name -> shape, relative to the text
    model) when opened; its tensors are read when asked for, so a retrained embedding is streamed like the base's."""

    def __init__(self, path: Path, expected: dict[str, tuple[int, ...]], embedding: str, scale: float = 1.0) -> None:
        self.path, self.scale = Path(path), float(scale)
        self.name = self.path.resolve().name
        if not self.path.is_dir():
            raise AdapterError(f"--adapter {self.path}: no such adapter directory")
        self.config = _read_config(self.path)
        weights = self.path / ADAPTER_WEIGHTS
        if not weights.is_file():
            pickled = (self.path / "adapter_model.bin").is_file()
            how = ("load it with PEFT and save_pretrained it again, which writes safetensors" if pickled
                   else "an adapter directory is what PEFT's save_pretrained writes")
            raise AdapterError(f"{weights}: missing; edge-runtime reads PEFT adapters in safetensors ({how})")
        self.file = SafetensorsFile(weights)
        self.lora: dict[str, _Module] = {}
        self.replaced: dict[str, str] = {}  # tensor name -> adapter key (modules_to_save)
        self._read_keys(expected)
        self._check_head(embedding)

    def _fail(self, key: str, why: str) -> AdapterError:
        return AdapterError(f"{self.path / ADAPTER_WEIGHTS}: {key}: {why}")

    def _read_keys(self, expected: dict[str, tuple[int, ...]]) -> None:
        keys = set(self.file.entries)
        for key in sorted(keys):
            module_path = self._module_path(key)
            if key.endswith((LORA_B, MAGNITUDE)) or key == HEAD_KEY:
                continue  # read with their lora_A; the head with the embedding
            if key.endswith(LORA_A):
                module = module_path[:-len(LORA_A)]
                self._add_lora(key, module, keys, expected)
            elif ".lora_embedding_" in key:
                raise self._fail(key, "LoRA on an embedding is not supported; train the embedding with "
                                      "modules_to_save instead, or leave it out of target_modules")
            elif ".lora_" in key:
                raise self._fail(key, "not a LoRA tensor edge-runtime can merge (only lora_A, lora_B and DoRA's "
                                      "lora_magnitude_vector; no lora_bias)")
            else:
                name = self._text_name(key, module_path)
                if name not in expected:
                    raise self._fail(key, f"the base checkpoint has no tensor {name} for it to replace; was the "
                                          "adapter trained on another model?")
                shape = self.file.entries[key].shape
                if shape != expected[name]:
                    raise self._fail(key, f"shape {list(shape)} does not fit the base's {name} "
                                          f"{list(expected[name])}; was the adapter trained on another model?")
                self.replaced[name] = key
        for key in sorted(keys):
            for suffix in (LORA_B, MAGNITUDE):
                if key.endswith(suffix) and key[:-len(suffix)] + LORA_A not in keys:
                    raise self._fail(key, "has no lora_A beside it; the adapter file is incomplete, save it again")

    def _check_head(self, embedding: str) -> None:
        """A retrained embedding must come with the head tied to it, as PEFT saves it with ensure_weight_tying:
        without, PEFT's merge keeps the old head beside the new embedding, which an artifact (one tensor for both)
        cannot hold."""
        head = self.file.entries.get(HEAD_KEY)
        if embedding not in self.replaced:
            if head is not None:
                raise self._fail(HEAD_KEY, "retrains the LM head, which edge-runtime ties to embed_tokens; train "
                                           "embed_tokens with ensure_weight_tying=True instead")
            return
        key = self.replaced[embedding]
        if head is None:
            raise self._fail(key, "retrains embed_tokens but not the LM head tied to it, so PEFT's merge would untie "
                                  "them; train with ensure_weight_tying=True (or leave embed_tokens out of "
                                  "modules_to_save)")
        rows = self.file.entries[key].shape[0]
        step = max(1, (64 << 20) // max(self.file.entries[key].row_bytes, 1))
        if head.shape != self.file.entries[key].shape or not all(
                np.array_equal(self.file.read(key, slice(i, i + step)), self.file.read(HEAD_KEY, slice(i, i + step)))
                for i in range(0, rows, step)):
            raise self._fail(HEAD_KEY, "differs from the adapter's embed_tokens; edge-runtime ties the LM head to "
                                       "embed_tokens, so train with ensure_weight_tying=True")

    def _module_path(self, key: str) -> str:
        if not key.startswith(WRAPPER):
            raise self._fail(key, f"not a PEFT key (no {WRAPPER!r} prefix); save the adapter with PEFT's "
                                  "save_pretrained")
        return key[len(WRAPPER):]

    def _text_name(self, key: str, module_path: str) -> str:
        """The decoder tensor `module_path` names, relative to the text model."""
        if module_path.startswith(TOWERS):
            raise self._fail(key, "adapts the vision or audio tower, which edge-runtime does not run; train with "
                                  "target_modules limited to the language model")
        if module_path.startswith("lm_head."):
            raise self._fail(key, "adapts the LM head, which edge-runtime ties to embed_tokens; leave lm_head out of "
                                  "target_modules")
        for prefix in TEXT_PREFIXES:
            if module_path.startswith(prefix):
                return module_path[len(prefix):]
        raise self._fail(key, "not a tensor of the text decoder (expected model.language_model.* or model.*)")

    def _add_lora(self, key: str, module: str, keys: set[str], expected: dict[str, tuple[int, ...]]) -> None:
        b_key = WRAPPER + module + LORA_B
        m_key = WRAPPER + module + MAGNITUDE
        if b_key not in keys:
            raise self._fail(key, "has no lora_B beside it; the adapter file is incomplete, save it again")
        if not _targeted(self.config, module):
            raise self._fail(key, f"module {module} is not among target_modules of {ADAPTER_CONFIG}; the "
                                  "adapter is inconsistent, save it again with PEFT")
        name = self._text_name(key, module) + ".weight"
        if name not in expected or len(expected[name]) != 2:
            raise self._fail(key, f"the base checkpoint has no linear weight {name}; was the adapter trained on "
                                  "another model?")
        out_features, in_features = expected[name]
        a_shape, b_shape = self.file.entries[key].shape, self.file.entries[b_key].shape
        rank, alpha = _rank_alpha(self.config, module)
        if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[1] != in_features or b_shape[0] != out_features \
                or a_shape[0] != b_shape[1]:
            raise self._fail(key, f"lora_A {list(a_shape)} and lora_B {list(b_shape)} do not fit the base's {name} "
                                  f"[{out_features}, {in_features}]; was the adapter trained on another model?")
        if a_shape[0] != rank:
            raise self._fail(key, f"rank {a_shape[0]}, but {ADAPTER_CONFIG} gives this module r={rank} (r, "
                                  "rank_pattern); the adapter is inconsistent")
        magnitude = None
        if m_key in keys:
            if not self.config.get("use_dora"):
                raise self._fail(m_key, f"a DoRA magnitude, but {ADAPTER_CONFIG} has no use_dora")
            if self.file.entries[m_key].shape != (out_features,):
                raise self._fail(m_key, f"shape {list(self.file.entries[m_key].shape)} does not fit the base's "
                                        f"{name} [{out_features}, {in_features}]")
            magnitude = m_key
        elif self.config.get("use_dora"):
            raise self._fail(key, f"{ADAPTER_CONFIG} sets use_dora, but there is no lora_magnitude_vector for this "
                                  "module; the adapter file is incomplete")
        scaling = alpha / (math.sqrt(rank) if self.config.get("use_rslora") else rank)
        self.lora[name] = _Module(key, b_key, magnitude, scaling * self.scale)

    def update(self, name: str) -> LoraUpdate | None:
        """The update of tensor `name`, or None when this adapter leaves it alone."""
        module = self.lora.get(name)
        if module is None:
            return None
        magnitude = self.file.read(module.magnitude) if module.magnitude else None
        return LoraUpdate(self.file.read(module.a), self.file.read(module.b), module.scaling, magnitude)

    def replacement(self, name: str, rows: slice | None = None) -> np.ndarray | None:
        """The adapter's own copy of tensor `name` (modules_to_save), or rows of it; None when it has none."""
        key = self.replaced.get(name)
        return None if key is None else self.file.read(key, rows)

    def record(self) -> dict[str, Any]:
        """What the manifest says about this adapter: its name, the SHA-256 of its files, its scale."""
        return {"name": self.name, "sha256": {file: sha256_file(self.path / file) for file in ADAPTER_FILES},
                "scale": self.scale}


def _read_config(path: Path) -> dict[str, Any]:
    where = path / ADAPTER_CONFIG
    if not where.is_file():
        raise AdapterError(f"{where}: missing; an adapter directory is what PEFT's save_pretrained writes "
                           f"({ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    try:
        config = json.loads(where.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterError(f"{where}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{where}: not a PEFT adapter config (not a JSON object)")
    init = config.get("init_lora_weights")
    refusals = [
        ("peft_type", config.get("peft_type") != "LORA",
         f"{config.get('peft_type')!r}: only LORA adapters can be merged"),
        ("init_lora_weights", init in BASE_CHANGING_INITS,
         f"{init!r} changes the base weights; convert the adapter to a plain LoRA with PEFT ({CONVERSION})"),
        ("layer_replication", bool(config.get("layer_replication")), "not supported"),
        ("lora_bias", bool(config.get("lora_bias")), "not supported"),
        ("target_parameters", bool(config.get("target_parameters")), "not supported"),
        ("trainable_token_indices", bool(config.get("trainable_token_indices")), "not supported; use modules_to_save"),
    ]
    for field, refused, why in refusals:
        if refused:
            raise AdapterError(f"{where}: {field}: {why}")
    for field in ("r", "lora_alpha"):
        if not isinstance(config.get(field), (int, float)) or config[field] <= 0:
            raise AdapterError(f"{where}: {field} must be a positive number, not {config.get(field)!r}")
    return config


def _targeted(config: dict[str, Any], module: str) -> bool:
    """Whether PEFT would have put a LoRA on `module` (its path in the model, "model.layers.0.mlp.up_proj")."""
    targets = config.get("target_modules")
    if targets == "all-linear" or targets == ["all-linear"]:
        hit = True
    elif isinstance(targets, str):
        hit = re.fullmatch(targets, module) is not None
    elif isinstance(targets, list):
        hit = module in targets or any(module.endswith("." + t) for t in targets)
    else:
        hit = False
    exclude = config.get("exclude_modules")
    if hit and exclude:
        hit = not (re.fullmatch(exclude, module) if isinstance(exclude, str)
                   else module in exclude or any(module.endswith("." + e) for e in exclude))
    layers = config.get("layers_to_transform")
    if hit and layers is not None:
        layers = [layers] if isinstance(layers, int) else layers
        patterns = config.get("layers_pattern") or None
        patterns = [patterns] if isinstance(patterns, str) else patterns
        if patterns:
            found = next((m for p in patterns if (m := re.match(rf".*\.{p}\.(\d+)\.", module))), None)
        else:
            found = DEFAULT_LAYER_PATTERN.match(module)
        hit = found is not None and int(found[1]) in layers
    return hit


def _pattern_value(pattern: dict[str, Any], module: str, default: float) -> float:
    """PEFT's get_pattern_key: the first pattern that matches the end of the module's path, at a dot."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _rank_alpha(config: dict[str, Any], module: str) -> tuple[int, float]:
    return (int(_pattern_value(config.get("rank_pattern") or {}, module, config["r"])),
            float(_pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"])))


def open_adapters(paths: list[Path], scales: list[float], expected: dict[str, tuple[int, ...]],
                  embedding: str) -> list[Adapter]:
    """The adapters to merge, in order, each with its scale: one --adapter-scale for all, or one per adapter."""
    if scales and len(scales) not in (1, len(paths)):
        raise AdapterError(f"--adapter-scale given {len(scales)} times for {len(paths)} adapters; give it once (for "
                           "all) or once per --adapter")
    if scales and not paths:
        raise AdapterError("--adapter-scale without --adapter; name the adapter directory with --adapter")
    per_adapter = scales * len(paths) if len(scales) == 1 else scales or [1.0] * len(paths)
    return [Adapter(Path(path), expected, embedding, scale) for path, scale in zip(paths, per_adapter)]
