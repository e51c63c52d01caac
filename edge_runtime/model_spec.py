"""The Gemma 4 text-model facts that export and runtime both need, read once from a HF config.

A Hugging Face `config.json` comes in two shapes (the multimodal `Gemma4ForConditionalGeneration` wrapper
with the text model under `text_config`, and the text-only `Gemma4ForCausalLM`), and transformers fills
in defaults and derived per-layer values (head dims, KV sharing) in code. `ModelSpec` resolves all of that
into plain fields so that the artifact's manifest carries a self-contained description, and refuses, by
field name and value, any config whose features this runtime would silently compute wrongly.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from edge_runtime.errors import CheckpointError, UnsupportedConfigError

SLIDING = "sliding_attention"
FULL = "full_attention"
LAYER_TYPES = (SLIDING, FULL)
ROPE_TYPES = ("default", "proportional")
ARCHITECTURES = {
    "Gemma4ForConditionalGeneration": "model.language_model.",
    "Gemma4ForCausalLM": "model.",
}
_DEFAULT_ROPE = {
    SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
    FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
}


@dataclass(frozen=True)
class RopeSpec:
    """Rotary embedding of one layer type; `proportional` leaves the non-rotated frequencies at zero."""

    rope_type: str
    theta: float
    partial_rotary_factor: float = 1.0
    factor: float = 1.0


@dataclass(frozen=True)
class ModelSpec:
    """A Gemma 4 "E" text decoder, fully resolved (no defaults left to look up elsewhere)."""

    vocab_size: int
    vocab_size_per_layer_input: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dims: tuple[int, ...]
    hidden_size_per_layer_input: int
    sliding_window: int
    layer_types: tuple[str, ...]
    num_kv_shared_layers: int
    use_double_wide_mlp: bool
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

    def mlp_size(self, layer: int) -> int:
        wide = self.use_double_wide_mlp and self.is_kv_shared(layer)
        return self.intermediate_size * (2 if wide else 1)

    def window(self, layer_type: str) -> int | None:
        return self.sliding_window if layer_type == SLIDING else None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("kv_sources")
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        """Rebuild from `to_dict` output (the artifact manifest's `model.config`)."""
        values = dict(data)
        values["head_dims"] = tuple(values["head_dims"])
        values["layer_types"] = tuple(values["layer_types"])
        values["eos_token_ids"] = tuple(values["eos_token_ids"])
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


def text_config_of(config: dict[str, Any], where: str) -> tuple[dict[str, Any], str]:
    """Return the text config and the tensor-name prefix of its weights, refusing unknown architectures."""
    architectures = config.get("architectures") or []
    known = [a for a in architectures if a in ARCHITECTURES]
    if not known:
        raise UnsupportedConfigError(
            f"{where}: architectures={architectures!r} is not supported; expected one of {sorted(ARCHITECTURES)}"
        )
    if known[0] == "Gemma4ForConditionalGeneration":
        text = config.get("text_config")
        if not isinstance(text, dict):
            raise UnsupportedConfigError(f"{where}: Gemma4ForConditionalGeneration config has no text_config object")
        return text, ARCHITECTURES[known[0]]
    return config, ARCHITECTURES[known[0]]


def _refuse(where: str, name: str, value: Any, why: str) -> UnsupportedConfigError:
    return UnsupportedConfigError(f"{where}: unsupported {name}={value!r} ({why})")


# Keys that set tensor shapes. transformers' Gemma4TextConfig has a default for each, but those are one model
# size's numbers (30 layers, hidden 2304: neither E2B nor E4B), so a config without one would be exported at a
# guessed size and fail much later, on a tensor, for a reason no longer visible. Every config transformers
# saves carries them all; only a hand-edited one lacks any.
REQUIRED_KEYS = ("vocab_size", "vocab_size_per_layer_input", "hidden_size", "intermediate_size",
                 "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                 "hidden_size_per_layer_input")
_MISSING = object()


class _ConfigFields:
    """Typed reads of the text config's keys; an error names the key as written in the file, the value's type,
    and what was expected, instead of `int()` quietly accepting "1536" or 1536.7."""

    def __init__(self, text: dict[str, Any], where: str, prefix: str) -> None:
        self.text, self.where, self.prefix = text, where, prefix

    def error(self, key: str, message: str) -> CheckpointError:
        return CheckpointError(f"{self.where}: {self.prefix}{key} {message}")

    def _present(self, key: str, default: Any) -> Any:
        value = self.text.get(key, default)
        if value is _MISSING:
            raise self.error(key, "is missing; it sets the model's tensor shapes, so it has no safe default: add it "
                                  "(the checkpoint's published config.json has it)")
        return value

    def _wrong(self, key: str, value: Any, expected: str) -> CheckpointError:
        return self.error(key, f"must be {expected}, got {type(value).__name__} {value!r:.60}")

    def integer(self, key: str, default: Any = _MISSING, least: int = 1) -> int:
        value = self._present(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._wrong(key, value, "an integer")
        if value < least:
            raise self.error(key, f"must be at least {least}, got {value}")
        return value

    def optional_integer(self, key: str, default: int | None) -> int | None:
        return None if self.text.get(key, default) is None else self.integer(key, default, least=0)

    def number(self, key: str, default: Any = _MISSING) -> float:
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


def spec_from_hf_config(config: dict[str, Any], where: str = "config.json") -> ModelSpec:
    """Resolve a HF Gemma 4 config the way transformers does, refusing what this runtime cannot run.

    The keys that set tensor shapes (REQUIRED_KEYS; and global_head_dim or per_layer_config when there are
    full-attention layers) must be present. The rest keep transformers' defaults, because those are the same
    for every Gemma 4 model or mean "feature off": sliding_window 512, the RoPE parameters, rms_norm_eps,
    max_position_embeddings (no tensor depends on it), the token ids, num_kv_shared_layers 0 and
    use_double_wide_mlp false, and layer_types derived from num_hidden_layers by transformers' own rule.
    Every value is type-checked, naming the key, what it holds and what was expected.
    """
    text, _ = text_config_of(config, where)
    fields = _ConfigFields(text, where, "text_config." if text is not config else "")
    model_type = text.get("model_type", "gemma4_text")
    if model_type != "gemma4_text":
        raise _refuse(where, "text_config.model_type", model_type, "expected gemma4_text")

    refusals = {
        "enable_moe_block": (False, "mixture-of-experts layers are not implemented"),
        "attention_k_eq_v": (False, "shared K/V projections are not implemented"),
        "use_bidirectional_attention": (None, "only causal attention is implemented"),
        "attention_bias": (False, "attention projections with bias are not implemented"),
        "hidden_activation": ("gelu_pytorch_tanh", "only gelu_pytorch_tanh is implemented"),
    }
    for name, (supported, why) in refusals.items():
        value = text.get(name, supported)
        if value != supported:
            raise _refuse(where, name, value, why)

    if text.get("hidden_size_per_layer_input", _MISSING) in (None, 0):
        raise _refuse(where, "hidden_size_per_layer_input", text["hidden_size_per_layer_input"],
                      "Gemma 4 E models need per-layer embeddings")
    sizes = {key: fields.integer(key) for key in REQUIRED_KEYS}
    num_layers = sizes["num_hidden_layers"]
    layer_types = fields.strings("layer_types") or [
        SLIDING if (i + 1) % 6 else FULL for i in range(num_layers)
    ]
    layer_types = list(layer_types)
    if len(layer_types) != num_layers:
        raise fields.error("layer_types", f"has {len(layer_types)} entries but num_hidden_layers is {num_layers}; "
                                          "give one type per layer")
    for i, lt in enumerate(layer_types):
        if lt not in LAYER_TYPES:
            raise _refuse(where, f"layer_types[{i}]", lt, f"expected one of {LAYER_TYPES}")
    layer_types[-1] = FULL  # transformers forces the last layer to full attention

    rope_params = fields.mapping("rope_parameters") or _DEFAULT_ROPE
    rope: dict[str, RopeSpec] = {}
    for lt in sorted(set(layer_types)):
        params = rope_params.get(lt)
        if params is None:
            raise _refuse(where, "rope_parameters", sorted(rope_params), f"no entry for {lt}")
        if not isinstance(params, dict):
            raise fields._wrong(f"rope_parameters.{lt}", params, "an object")
        entry = _ConfigFields(params, where, f"{fields.prefix}rope_parameters.{lt}.")
        rope_type = params.get("rope_type", "default")
        if rope_type not in ROPE_TYPES:
            raise _refuse(where, f"rope_parameters.{lt}.rope_type", rope_type, f"expected one of {ROPE_TYPES}")
        factor = entry.number("factor", 1.0)
        if rope_type == "default" and factor != 1.0:
            raise _refuse(where, f"rope_parameters.{lt}.factor", factor, "default rope has no scaling factor")
        rope[lt] = RopeSpec(
            rope_type=rope_type,
            theta=entry.number("rope_theta", 10_000.0),
            partial_rotary_factor=entry.number("partial_rotary_factor", 1.0),
            factor=factor,
        )

    head_dim = sizes["head_dim"]
    per_layer = fields.mapping("per_layer_config")
    if per_layer:
        head_dims = [head_dim] * num_layers
        for key, overrides in per_layer.items():
            if not isinstance(overrides, dict):
                raise fields._wrong(f"per_layer_config.{key}", overrides, "an object such as {\"head_dim\": 512}")
            extra = set(overrides) - {"head_dim"}
            if extra:
                raise _refuse(where, f"per_layer_config.{key}", sorted(extra), "only head_dim overrides are supported")
            if not key.isdigit() or int(key) >= num_layers:
                raise fields.error(f"per_layer_config.{key}", f"must be keyed by a layer index below {num_layers}")
            head_dims[int(key)] = _ConfigFields(overrides, where, f"{fields.prefix}per_layer_config.{key}.").integer(
                "head_dim")
    else:
        global_head_dim = fields.integer("global_head_dim", _MISSING if FULL in layer_types else head_dim)
        head_dims = [global_head_dim if lt == FULL else head_dim for lt in layer_types]

    num_heads, num_kv = sizes["num_attention_heads"], sizes["num_key_value_heads"]
    if num_heads % num_kv:
        raise _refuse(where, "num_key_value_heads", num_kv, f"must divide num_attention_heads={num_heads}")
    num_shared = fields.integer("num_kv_shared_layers", 0, least=0)
    if not 0 <= num_shared < num_layers:
        raise _refuse(where, "num_kv_shared_layers", num_shared, f"must be in [0, {num_layers})")
    for lt, spec in rope.items():
        dims = {d for d, t in zip(head_dims, layer_types) if t == lt}
        for d in dims:
            if d % 2 or int(spec.partial_rotary_factor * d // 2) <= 0:
                raise _refuse(where, f"rope_parameters.{lt}.partial_rotary_factor", spec.partial_rotary_factor,
                              f"leaves no rotated pairs at head_dim {d}")

    eos_ids = fields.token_ids("eos_token_id", config.get("eos_token_id", 1))
    return ModelSpec(
        vocab_size=sizes["vocab_size"],
        vocab_size_per_layer_input=sizes["vocab_size_per_layer_input"],
        hidden_size=sizes["hidden_size"],
        intermediate_size=sizes["intermediate_size"],
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv,
        head_dims=tuple(head_dims),
        hidden_size_per_layer_input=sizes["hidden_size_per_layer_input"],
        sliding_window=fields.integer("sliding_window", 512),
        layer_types=tuple(layer_types),
        num_kv_shared_layers=num_shared,
        use_double_wide_mlp=fields.flag("use_double_wide_mlp", False),
        rms_norm_eps=fields.number("rms_norm_eps", 1e-6),
        final_logit_softcapping=fields.optional_number("final_logit_softcapping", None),
        rope=rope,
        max_position_embeddings=fields.integer("max_position_embeddings", 131_072),
        bos_token_id=fields.optional_integer("bos_token_id", 2),
        eos_token_ids=eos_ids,
        pad_token_id=fields.optional_integer("pad_token_id", 0),
    )


def embed_scale(size: int) -> float:
    """Gemma scales embeddings by sqrt(width); kept here so export and runtime agree on the constant."""
    return math.sqrt(size)
