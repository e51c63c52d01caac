"""What every model family's spec holds: the decoder facts the family-independent runtime reads.

A family (edge_runtime/families/) resolves a Hugging Face `config.json` into a spec of its own, a subclass of
`ModelSpec`: transformers fills in defaults and derived per-layer values (head dims, KV sharing) in code, and the
spec resolves all of that into plain fields so that the artifact's manifest carries a self-contained description.
The fields here are the ones the embedding, the PLE store, the KV cache, RoPE, the planner and generation read
whatever the family; a family's own fields (its MLP widths, say) are read by the family's code alone.
`ConfigFields` is the typed config reading every family's config reader uses, so that a wrong value is refused by
its key's name whichever family's it is.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

from edge_runtime.errors import CheckpointError, UnsupportedConfigError

SLIDING = "sliding_attention"
FULL = "full_attention"
LAYER_TYPES = (SLIDING, FULL)
ROPE_TYPES = ("default", "proportional")  # what edge_runtime/rope.py computes
MISSING = object()  # a config key with no default: ConfigFields refuses its absence


@dataclass(frozen=True)
class RopeSpec:
    """Rotary embedding of one layer type; `proportional` leaves the non-rotated frequencies at zero."""

    rope_type: str
    theta: float
    partial_rotary_factor: float = 1.0
    factor: float = 1.0


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """A text decoder with per-layer embeddings, sliding and full attention and KV sharing, fully resolved (no
    defaults left to look up elsewhere). `family` names the family whose subclass this is (the manifest's
    `model.family`, the registry's key)."""

    family: ClassVar[str]
    # The PLE row of a token id past the PLE table (vocab_size_per_layer_input): None refuses such ids (the family's
    # transformers model would fail on them), a row index maps them to that row.
    ple_fill_row: ClassVar[int | None] = None
    vocab_size: int
    vocab_size_per_layer_input: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dims: tuple[int, ...]
    hidden_size_per_layer_input: int
    sliding_window: int
    layer_types: tuple[str, ...]
    num_kv_shared_layers: int
    rms_norm_eps: float
    final_logit_softcapping: float | None
    rope: dict[str, RopeSpec]
    max_position_embeddings: int
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    pad_token_id: int | None
    kv_sources: tuple[int, ...] = field(default=())

    def __post_init__(self) -> None:
        object.__setattr__(self, "kv_sources", _kv_sources(self.layer_types, self.num_kv_shared_layers))

    @property
    def first_shared_layer(self) -> int:
        return self.num_hidden_layers - self.num_kv_shared_layers

    def is_kv_shared(self, layer: int) -> bool:
        """Shared layers own no K/V projection and attend over the cache of `kv_sources[layer]`."""
        return layer >= self.first_shared_layer

    def cache_layers(self) -> list[int]:
        """Layers whose keys and values are stored: only these need KV cache memory."""
        return [i for i in range(self.num_hidden_layers) if not self.is_kv_shared(i)]

    @property
    def input_vocab_size(self) -> int:
        """Token ids a prompt may hold are [0, input_vocab_size): the vocabulary, unless the family's model embeds
        some ids with parts this runtime does not export. Generation samples only these."""
        return self.vocab_size

    def refuse_token(self, token: int) -> str:
        """Why a token id outside [0, input_vocab_size) cannot be run, in one line."""
        return f"token id {token} is outside the model's vocabulary of {self.vocab_size}"

    def window(self, layer_type: str) -> int | None:
        return self.sliding_window if layer_type == SLIDING else None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("kv_sources")
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        """Rebuild from `to_dict` output (the artifact manifest's `model.config`): lists back to tuples."""
        values = {key: tuple(value) if isinstance(value, list) else value for key, value in data.items()}
        values["rope"] = {k: RopeSpec(**v) for k, v in values["rope"].items()}
        return cls(**values)


def _kv_sources(layer_types: tuple[str, ...], num_shared: int) -> tuple[int, ...]:
    """Mirror of transformers' `kv_sharing_modes`: a shared layer reuses the last unshared layer of its type."""
    n = len(layer_types)
    first_shared = n - num_shared
    sources = list(range(n))
    for i in range(first_shared, n):
        candidates = [j for j in range(first_shared) if layer_types[j] == layer_types[i]]
        if not candidates:
            raise UnsupportedConfigError(
                f"layer {i} is KV-shared ({layer_types[i]}) but no earlier unshared layer of that type exists "
                f"(num_kv_shared_layers={num_shared}, layer_types={list(layer_types)})"
            )
        sources[i] = candidates[-1]
    return tuple(sources)


def refuse(where: str, name: str, value: Any, why: str) -> UnsupportedConfigError:
    """The one-line refusal of a config value this runtime would compute wrongly, by key and value."""
    return UnsupportedConfigError(f"{where}: unsupported {name}={value!r} ({why})")


def refuse_unsupported(text: dict[str, Any], config: dict[str, Any], where: str, title: str,
                       supported: dict[str, tuple[Any, str]]) -> None:
    """Refuse a config whose LM head is not tied to the embedding (every family here ties it), or that sets a key of
    `supported` (key -> (the one value implemented, why)) to anything else."""
    if text.get("tie_word_embeddings", config.get("tie_word_embeddings", True)) is False:
        raise refuse(where, "tie_word_embeddings", False, f"{title} ties the LM head to the embedding")
    for name, (value, why) in supported.items():
        if text.get(name, value) != value:
            raise refuse(where, name, text[name], why)


class ConfigFields:
    """Typed reads of a config's keys, for every family's config reader; an error names the key as written in the
    file, the value's type, and what was expected, instead of `int()` quietly accepting "1536" or 1536.7."""

    def __init__(self, text: dict[str, Any], where: str, prefix: str) -> None:
        self.text, self.where, self.prefix = text, where, prefix

    def error(self, key: str, message: str) -> CheckpointError:
        return CheckpointError(f"{self.where}: {self.prefix}{key} {message}")

    def _present(self, key: str, default: Any) -> Any:
        value = self.text.get(key, default)
        if value is MISSING:
            raise self.error(key, "is missing; it sets the model's tensor shapes, so it has no safe default: add it "
                                  "(the checkpoint's published config.json has it)")
        return value

    def _wrong(self, key: str, value: Any, expected: str) -> CheckpointError:
        return self.error(key, f"must be {expected}, got {type(value).__name__} {value!r:.60}")

    def integer(self, key: str, default: Any = MISSING, least: int = 1) -> int:
        value = self._present(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._wrong(key, value, "an integer")
        if value < least:
            raise self.error(key, f"must be at least {least}, got {value}")
        return value

    def optional_integer(self, key: str, default: int | None) -> int | None:
        return None if self.text.get(key, default) is None else self.integer(key, default, least=0)

    def number(self, key: str, default: Any = MISSING) -> float:
        value = self._present(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self._wrong(key, value, "a number")
        return float(value)

    def optional_number(self, key: str, default: float | None) -> float | None:
        return None if self.text.get(key, default) is None else self.number(key, default)

    def flag(self, key: str, default: bool) -> bool:
        value = self.text.get(key, default)
        if not isinstance(value, bool):
            raise self._wrong(key, value, "true or false")
        return value

    def mapping(self, key: str) -> dict[str, Any] | None:
        value = self.text.get(key)
        if value is not None and not isinstance(value, dict):
            raise self._wrong(key, value, "an object")
        return value

    def strings(self, key: str) -> list[str] | None:
        value = self.text.get(key)
        if value is None:
            return None
        if not isinstance(value, list):
            raise self._wrong(key, value, "a list of strings")
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise self._wrong(f"{key}[{i}]", item, "a string")
        return value

    def token_ids(self, key: str, default: Any) -> tuple[int, ...]:
        value = self.text.get(key, default)
        items = value if isinstance(value, list) else [] if value is None else [value]
        for item in items:
            if isinstance(item, bool) or not isinstance(item, int):
                raise self._wrong(key, value, "a token id or a list of token ids")
        return tuple(items)


def embed_scale(size: int) -> float:
    """Gemma scales embeddings by sqrt(width); kept here so export and runtime agree on the constant."""
    return math.sqrt(size)
