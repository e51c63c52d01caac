"""Gemma 4's config.json, resolved the way transformers resolves it into a `Gemma4Spec`.

A Hugging Face `config.json` comes in two shapes (the multimodal `Gemma4ForConditionalGeneration` wrapper with the
text model under `text_config`, and the text-only `Gemma4ForCausalLM`), and transformers fills in defaults and
derived per-layer values (head dims, KV sharing) in code. Any config whose features this runtime would silently
compute wrongly is refused, by field name and value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from edge_runtime.families.family import CheckpointLayout, text_config
from edge_runtime.model_spec import (
    FULL,
    LAYER_TYPES,
    MISSING,
    ROPE_TYPES,
    SLIDING,
    ConfigFields,
    ModelSpec,
    RopeSpec,
    refuse,
    refuse_unsupported,
)

ARCHITECTURES = {
    "Gemma4ForConditionalGeneration": "model.language_model.",
    "Gemma4ForCausalLM": "model.",
}
_DEFAULT_ROPE = {
    SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
    FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
}
# Keys that set tensor shapes. transformers' Gemma4TextConfig has a default for each, but those are one model
# size's numbers (30 layers, hidden 2304: neither E2B nor E4B), so a config without one would be exported at a
# guessed size and fail much later, on a tensor, for a reason no longer visible. Every config transformers
# saves carries them all; only a hand-edited one lacks any.
REQUIRED_KEYS = ("vocab_size", "vocab_size_per_layer_input", "hidden_size", "intermediate_size",
                 "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                 "hidden_size_per_layer_input")


@dataclass(frozen=True, kw_only=True)
class Gemma4Spec(ModelSpec):
    """A Gemma 4 "E" text decoder: the shared fields, and its MLP width (doubled on KV-shared layers where
    `use_double_wide_mlp`)."""

    family: ClassVar[str] = "gemma4"
    intermediate_size: int
    use_double_wide_mlp: bool

    def mlp_size(self, layer: int) -> int:
        wide = self.use_double_wide_mlp and self.is_kv_shared(layer)
        return self.intermediate_size * (2 if wide else 1)


def checkpoint_layout(config: dict[str, Any], where: str) -> CheckpointLayout:
    _, architecture = text_config(config, where, ARCHITECTURES)
    return CheckpointLayout(ARCHITECTURES[architecture], architecture)


def spec_from_hf_config(config: dict[str, Any], where: str = "config.json") -> Gemma4Spec:
    """Resolve a HF Gemma 4 config the way transformers does, refusing what this runtime cannot run.

    The keys that set tensor shapes (REQUIRED_KEYS; and global_head_dim or per_layer_config when there are
    full-attention layers) must be present. The rest keep transformers' defaults, because those are the same
    for every Gemma 4 model or mean "feature off": sliding_window 512, the RoPE parameters, rms_norm_eps,
    max_position_embeddings (no tensor depends on it), the token ids, num_kv_shared_layers 0 and
    use_double_wide_mlp false, and layer_types derived from num_hidden_layers by transformers' own rule.
    Every value is type-checked, naming the key, what it holds and what was expected.
    """
    text, _ = text_config(config, where, ARCHITECTURES)
    fields = ConfigFields(text, where, "text_config." if text is not config else "")
    model_type = text.get("model_type", "gemma4_text")
    if model_type != "gemma4_text":
        raise refuse(where, "text_config.model_type", model_type, "expected gemma4_text")

    refusals = {
        "enable_moe_block": (False, "mixture-of-experts layers are not implemented"),
        "attention_k_eq_v": (False, "shared K/V projections are not implemented"),
        "use_bidirectional_attention": (None, "only causal attention is implemented"),
        "attention_bias": (False, "attention projections with bias are not implemented"),
        "hidden_activation": ("gelu_pytorch_tanh", "only gelu_pytorch_tanh is implemented"),
    }
    refuse_unsupported(text, config, where, "Gemma 4", refusals)

    if text.get("hidden_size_per_layer_input", MISSING) in (None, 0):
        raise refuse(where, "hidden_size_per_layer_input", text["hidden_size_per_layer_input"],
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
            raise refuse(where, f"layer_types[{i}]", lt, f"expected one of {LAYER_TYPES}")
    layer_types[-1] = FULL  # transformers forces the last layer to full attention

    rope_params = fields.mapping("rope_parameters") or _DEFAULT_ROPE
    rope: dict[str, RopeSpec] = {}
    for lt in sorted(set(layer_types)):
        params = rope_params.get(lt)
        if params is None:
            raise refuse(where, "rope_parameters", sorted(rope_params), f"no entry for {lt}")
        if not isinstance(params, dict):
            raise fields._wrong(f"rope_parameters.{lt}", params, "an object")
        entry = ConfigFields(params, where, f"{fields.prefix}rope_parameters.{lt}.")
        rope_type = params.get("rope_type", "default")
        if rope_type not in ROPE_TYPES:
            raise refuse(where, f"rope_parameters.{lt}.rope_type", rope_type, f"expected one of {ROPE_TYPES}")
        factor = entry.number("factor", 1.0)
        if rope_type == "default" and factor != 1.0:
            raise refuse(where, f"rope_parameters.{lt}.factor", factor, "default rope has no scaling factor")
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
                raise refuse(where, f"per_layer_config.{key}", sorted(extra), "only head_dim overrides are supported")
            if not key.isdigit() or int(key) >= num_layers:
                raise fields.error(f"per_layer_config.{key}", f"must be keyed by a layer index below {num_layers}")
            head_dims[int(key)] = ConfigFields(overrides, where, f"{fields.prefix}per_layer_config.{key}.").integer(
                "head_dim")
    else:
        global_head_dim = fields.integer("global_head_dim", MISSING if FULL in layer_types else head_dim)
        head_dims = [global_head_dim if lt == FULL else head_dim for lt in layer_types]

    num_heads, num_kv = sizes["num_attention_heads"], sizes["num_key_value_heads"]
    if num_heads % num_kv:
        raise refuse(where, "num_key_value_heads", num_kv, f"must divide num_attention_heads={num_heads}")
    num_shared = fields.integer("num_kv_shared_layers", 0, least=0)
    if not 0 <= num_shared < num_layers:
        raise refuse(where, "num_kv_shared_layers", num_shared, f"must be in [0, {num_layers})")
    for lt, spec in rope.items():
        dims = {d for d, t in zip(head_dims, layer_types) if t == lt}
        for d in dims:
            if d % 2 or int(spec.partial_rotary_factor * d // 2) <= 0:
                raise refuse(where, f"rope_parameters.{lt}.partial_rotary_factor", spec.partial_rotary_factor,
                              f"leaves no rotated pairs at head_dim {d}")

    eos_ids = fields.token_ids("eos_token_id", config.get("eos_token_id", 1))
    return Gemma4Spec(
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
