"""Gemma 3n's config.json, resolved the way transformers' Gemma3nTextConfig resolves it into a `Gemma3nSpec`.

Published as the multimodal `Gemma3nForConditionalGeneration` wrapper (text model under `text_config`, weights under
`model.language_model.`) and loadable as text-only `Gemma3nForCausalLM`. Where Gemma 4 differs, transformers' Gemma 3n
rules are taken: the last layer keeps its type, RoPE comes from the old `rope_theta` / `rope_local_base_freq` keys,
final softcapping defaults to 30, and the first 10 layers of a model deeper than 10 cut their MLP activations. Any
config whose features this runtime would silently compute wrongly is refused, by field name and value.
"""

from __future__ import annotations

from dataclasses import dataclass
from statistics import NormalDist
from typing import Any, ClassVar

from edge_runtime.families.family import CheckpointLayout, text_config
from edge_runtime.model_spec import (
    FULL,
    LAYER_TYPES,
    MISSING,
    SLIDING,
    ConfigFields,
    ModelSpec,
    RopeSpec,
    refuse,
    refuse_unsupported,
)

ARCHITECTURES = {
    "Gemma3nForConditionalGeneration": "model.language_model.",
    "Gemma3nForCausalLM": "model.",
}
# Keys that set tensor shapes and differ between the published models, or whose transformers default is one model's
# value (Gemma3nTextConfig's defaults are E4B's: a config without num_kv_shared_layers would be E4B's 15 shared layers
# on whatever depth it has). Every config transformers saves carries them all.
REQUIRED_KEYS = ("vocab_size", "vocab_size_per_layer_input", "hidden_size", "num_hidden_layers",
                 "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_size_per_layer_input",
                 "num_kv_shared_layers")
# Gemma3nVisionConfig's and Gemma3nAudioConfig's default vocab_offset: where the multimodal model's image and audio ids
# start when the wrapper config leaves their configs (or the offsets) out, as model_configs/ does.
VISION_VOCAB_OFFSET, AUDIO_VOCAB_OFFSET = 262_144, 262_272
SPARSE_LAYERS, SPARSITY = 10, 0.95  # transformers' default activation_sparsity_pattern


@dataclass(frozen=True, kw_only=True)
class Gemma3nSpec(ModelSpec):
    """A Gemma 3n text decoder: the shared fields, and what AltUp, LAuReL and the sparse MLPs need.

    `intermediate_sizes` and `activation_sparsity` are per layer (a layer cuts its MLP's gate activations below
    mean + z(sparsity) * std when its sparsity is above 0); `altup_num_inputs` streams, stream 0 the active one,
    `altup_correct_scale` whether the PLE gate reads the corrected active stream scaled by `correct_output_scale`;
    `laurel_rank` the LAuReL bottleneck. `multimodal_token_start`: from this id on, the multimodal model embeds tokens
    with its vision and audio embedders, which this runtime does not export (None for a text-only checkpoint, whose
    model embeds every id with embed_tokens)."""

    family: ClassVar[str] = "gemma3n"
    ple_fill_row: ClassVar[int | None] = 0  # transformers' get_per_layer_inputs: ids past the PLE table take row 0
    intermediate_sizes: tuple[int, ...]
    activation_sparsity: tuple[float, ...]
    altup_num_inputs: int
    altup_correct_scale: bool
    laurel_rank: int
    multimodal_token_start: int | None

    def mlp_size(self, layer: int) -> int:
        return self.intermediate_sizes[layer]

    def sparsity_cutoff(self, layer: int) -> float | None:
        """z of the layer's Gaussian top-k cut-off (mean + z * std), or None for a dense MLP: the standard normal
        quantile of its sparsity, as transformers takes it from torch.distributions.Normal(0, 1).icdf in float32
        (0.95: 1.6448536)."""
        sparsity = self.activation_sparsity[layer]
        return NormalDist().inv_cdf(sparsity) if sparsity > 0 else None

    @property
    def input_vocab_size(self) -> int:
        return self.vocab_size if self.multimodal_token_start is None else self.multimodal_token_start

    def refuse_token(self, token: int) -> str:
        if self.multimodal_token_start is None or not self.multimodal_token_start <= token < self.vocab_size:
            return super().refuse_token(token)
        return (f"token id {token} is one of Gemma 3n's image and audio ids ({self.multimodal_token_start}-"
                f"{self.vocab_size - 1}), which the multimodal model embeds with its vision and audio embedders; this "
                "text-only runtime does not export them: leave such ids out of the prompt")


def checkpoint_layout(config: dict[str, Any], where: str) -> CheckpointLayout:
    _, architecture = text_config(config, where, ARCHITECTURES)
    return CheckpointLayout(ARCHITECTURES[architecture], architecture)


def _multimodal_token_start(config: dict[str, Any], where: str, vocab_size: int) -> int | None:
    """The first id the multimodal model embeds with embed_vision or embed_audio (Gemma3nModel.forward: vision ids
    from the vision config's vocab_offset, audio ids from the audio config's), if the vocabulary reaches it."""
    starts = []
    for key, default in (("vision_config", VISION_VOCAB_OFFSET), ("audio_config", AUDIO_VOCAB_OFFSET)):
        tower = config.get(key) or {}
        if not isinstance(tower, dict):
            raise ConfigFields(config, where, "")._wrong(key, tower, "an object")
        starts.append(ConfigFields(tower, where, f"{key}.").integer("vocab_offset", default, least=0))
    start = min(starts)
    return start if start < vocab_size else None


def _rope(fields: ConfigFields, where: str) -> dict[str, RopeSpec]:
    """Gemma3nTextConfig.convert_rope_params_to_dict: `rope_parameters` per layer type where given, else default RoPE
    with `rope_theta` (full layers, 1e6) and `rope_local_base_freq` (sliding, 1e4); `rope_scaling` updates the full
    layers' entry. Only default RoPE is implemented for Gemma 3n."""
    params = fields.mapping("rope_parameters") or {}
    scaling = fields.mapping("rope_scaling")
    rope = {}
    for lt, key, theta in ((FULL, "rope_theta", 1_000_000.0), (SLIDING, "rope_local_base_freq", 10_000.0)):
        entry, name = params.get(lt) or {"rope_type": "default"}, f"rope_parameters.{lt}"
        if not isinstance(entry, dict):
            raise fields._wrong(name, entry, "an object")
        if lt == FULL and scaling:
            entry, name = {**entry, **scaling}, "rope_scaling"
        rope_type = entry.get("rope_type", entry.get("type", "default"))
        if rope_type != "default":
            raise refuse(where, f"{fields.prefix}{name}.rope_type", rope_type,
                         "only default RoPE is implemented for Gemma 3n")
        value = (ConfigFields(entry, where, f"{fields.prefix}{name}.").number("rope_theta") if "rope_theta" in entry
                 else fields.number(key, theta))
        rope[lt] = RopeSpec(rope_type="default", theta=value)
    return rope


def spec_from_hf_config(config: dict[str, Any], where: str = "config.json") -> Gemma3nSpec:
    """Resolve a HF Gemma 3n config the way transformers does, refusing what this runtime cannot run.

    The keys of REQUIRED_KEYS must be present; intermediate_size too, one for all layers or one per layer. The rest
    keep transformers' defaults, the published values of both models: 4 AltUp streams with stream 0 active and the
    corrected output scaled, LAuReL rank 64, sliding_window 512, layer_types 4 sliding : 1 full, the RoPE thetas,
    final softcapping 30, activation sparsity 0.95 on the first 10 layers of a model deeper than 10,
    max_position_embeddings 32768, the token ids. `query_pre_attn_scalar` is not read, as transformers does not.
    """
    text, architecture = text_config(config, where, ARCHITECTURES)
    fields = ConfigFields(text, where, "text_config." if text is not config else "")
    model_type = text.get("model_type", "gemma3n_text")
    if model_type != "gemma3n_text":
        raise refuse(where, f"{fields.prefix}model_type", model_type, "expected gemma3n_text")
    refusals = {
        "attention_bias": (False, "attention projections with bias are not implemented"),
        "hidden_activation": ("gelu_pytorch_tanh", "only gelu_pytorch_tanh is implemented"),
        "altup_active_idx": (0, "only stream 0 as the active AltUp stream is implemented, as published"),
    }
    refuse_unsupported(text, config, where, "Gemma 3n", refusals)

    sizes = {key: fields.integer(key, least=0 if key == "num_kv_shared_layers" else 1) for key in REQUIRED_KEYS}
    n = sizes["num_hidden_layers"]
    intermediate = text.get("intermediate_size", MISSING)
    if isinstance(intermediate, list):
        if len(intermediate) != n:
            raise fields.error("intermediate_size", f"has {len(intermediate)} entries but num_hidden_layers is {n}; "
                                                    "give one per layer or one for all")
        mlp = [ConfigFields({"intermediate_size": v}, where, fields.prefix).integer("intermediate_size")
               for v in intermediate]
    else:
        mlp = [fields.integer("intermediate_size")] * n

    layer_types = fields.strings("layer_types") or [FULL if (i + 1) % 5 == 0 else SLIDING for i in range(n)]
    if len(layer_types) != n:
        raise fields.error("layer_types", f"has {len(layer_types)} entries but num_hidden_layers is {n}; give one "
                                          "type per layer")
    for i, lt in enumerate(layer_types):
        if lt not in LAYER_TYPES:
            raise refuse(where, f"layer_types[{i}]", lt, f"expected one of {LAYER_TYPES}")

    sparsity = text.get("activation_sparsity_pattern")
    if sparsity is None:
        sparse = SPARSE_LAYERS if n > SPARSE_LAYERS else 0
        sparsity = [SPARSITY] * sparse + [0.0] * (n - sparse)
    if not isinstance(sparsity, list) or len(sparsity) != n:
        raise fields.error("activation_sparsity_pattern", f"must be a list of {n} numbers (one per layer), got "
                                                          f"{sparsity!r:.60}")
    for i, value in enumerate(sparsity):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise fields.error(f"activation_sparsity_pattern[{i}]", f"must be a number in [0, 1), got {value!r}")

    num_heads, num_kv = sizes["num_attention_heads"], sizes["num_key_value_heads"]
    if num_heads % num_kv:
        raise refuse(where, "num_key_value_heads", num_kv, f"must divide num_attention_heads={num_heads}")
    num_shared = sizes["num_kv_shared_layers"]
    if num_shared >= n:
        raise refuse(where, "num_kv_shared_layers", num_shared, f"must be in [0, {n})")
    if sizes["head_dim"] % 2:
        raise refuse(where, "head_dim", sizes["head_dim"], "RoPE rotates pairs: it must be even")
    streams = fields.integer("altup_num_inputs", 4)
    if streams < 2:
        raise refuse(where, "altup_num_inputs", streams, "at least 2 AltUp streams: the per-layer embeddings feed "
                                                         "the streams past the first")

    vocab = sizes["vocab_size"]
    return Gemma3nSpec(
        vocab_size=vocab,
        vocab_size_per_layer_input=sizes["vocab_size_per_layer_input"],
        hidden_size=sizes["hidden_size"],
        num_hidden_layers=n,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv,
        head_dims=(sizes["head_dim"],) * n,
        hidden_size_per_layer_input=sizes["hidden_size_per_layer_input"],
        sliding_window=fields.integer("sliding_window", 512),
        layer_types=tuple(layer_types),
        num_kv_shared_layers=num_shared,
        rms_norm_eps=fields.number("rms_norm_eps", 1e-6),
        final_logit_softcapping=fields.optional_number("final_logit_softcapping", 30.0),
        rope=_rope(fields, where),
        max_position_embeddings=fields.integer("max_position_embeddings", 32_768),
        bos_token_id=fields.optional_integer("bos_token_id", 2),
        eos_token_ids=fields.token_ids("eos_token_id", config.get("eos_token_id", 1)),
        pad_token_id=fields.optional_integer("pad_token_id", 0),
        intermediate_sizes=tuple(mlp),
        activation_sparsity=tuple(float(v) for v in sparsity),
        altup_num_inputs=streams,
        altup_correct_scale=fields.flag("altup_correct_scale", True),
        laurel_rank=fields.integer("laurel_rank", 64),
        multimodal_token_start=(_multimodal_token_start(config, where, vocab)
                                if architecture == "Gemma3nForConditionalGeneration" else None),
    )
