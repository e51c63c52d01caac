"""Gemma 3n's part of make_checkpoint.py: its text tensors, tower stand-ins and wrapper config, from the config alone.

Written rule by rule from transformers' Gemma3n modeling code (modeling_gemma3n.py: Gemma3nTextModel,
Gemma3nTextDecoderLayer, Gemma3nTextAltUp, Gemma3nTextLaurelBlock, Gemma3nMultimodalEmbedder) and checked against
the published checkpoints' tensor names (model.safetensors.index.json of google/gemma-3n-E2B-it and -E4B-it), so that
tests comparing it with transformers compare two independent descriptions.
"""

from __future__ import annotations

from config_error import ConfigError

SLIDING, FULL = "sliding_attention", "full_attention"

# Gemma3nTextConfig's defaults (E4B's values) for every field that decides a tensor's name or shape.
TEXT_DEFAULTS = {
    "vocab_size": 262_400, "vocab_size_per_layer_input": 262_144, "hidden_size": 2048, "intermediate_size": 16_384,
    "num_hidden_layers": 35, "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 256,
    "hidden_size_per_layer_input": 256, "altup_num_inputs": 4, "laurel_rank": 64, "num_kv_shared_layers": 15,
    "attention_bias": False, "tie_word_embeddings": True, "max_position_embeddings": 32_768,
}

# Both published checkpoints: a 128-id vision vocabulary and a 128-id audio one right after the PLE vocabulary
# (262144 + 128 + 128 = vocab_size 262400), MobileNet-v5 features of width 2048, audio features of width 1536.
MULTIMODAL_VOCAB = 128
VISION_WIDTH, AUDIO_WIDTH = 2048, 1536

# Stand-ins for the vision (MobileNet-v5, 547 tensors) and audio (USM conformer, 269 tensors) towers: real names
# from the published index, tiny shapes. transformers builds the vision tower through timm, so the towers are never
# instantiated here; an exporter must skip every one of these.
TOWER_PLACEHOLDERS = {
    "model.vision_tower.timm_model.conv_stem.conv.weight": (8, 3, 3, 3),
    "model.vision_tower.timm_model.blocks.0.0.conv_exp.weight": (16, 8, 3, 3),
    "model.vision_tower.timm_model.msfa.ffn.pw_proj.conv.weight": (8, 16, 1, 1),
    "model.vision_tower.timm_model.msfa.norm.weight": (8,),
    "model.audio_tower.subsample_conv_projection.conv_0.conv.weight": (8, 1, 3, 3),
    "model.audio_tower.subsample_conv_projection.input_proj_linear.weight": (16, 8),
    "model.audio_tower.conformer.0.attention.attn.q_proj.weight": (16, 16),
    "model.audio_tower.conformer.0.lconv1d.depthwise_conv1d.weight": (16, 1, 5),
}


def _layer_types(cfg: dict) -> list[str]:
    n = cfg["num_hidden_layers"]
    types = list(cfg.get("layer_types") or [FULL if (i + 1) % 5 == 0 else SLIDING for i in range(n)])
    if len(types) != n:
        raise ConfigError(f"layer_types has {len(types)} entries for num_hidden_layers={n}")
    if unknown := sorted(set(types) - {SLIDING, FULL}):
        raise ConfigError(f"layer_types: unknown layer type(s) {unknown}")
    return types  # unlike Gemma 4, the last layer keeps its type


def _mlp_sizes(cfg: dict) -> list[int]:
    n, sizes = cfg["num_hidden_layers"], cfg["intermediate_size"]
    sizes = list(sizes) if isinstance(sizes, list) else [sizes] * n
    if len(sizes) != n:
        raise ConfigError(f"intermediate_size has {len(sizes)} entries for num_hidden_layers={n}; give one per "
                          "layer or one for all")
    return sizes


def tensor_shapes(text_config: dict) -> dict[str, tuple[int, ...]]:
    """Every text tensor of the published layout, named relative to the text model.

    The published files also hold k_proj, v_proj and k_norm for the KV-shared layers, which transformers (5.x) does
    not build and drops on load (`_keys_to_ignore_on_load_unexpected`); they are written here as published.
    """
    cfg = {**TEXT_DEFAULTS, **text_config}
    if not cfg["tie_word_embeddings"]:
        raise ConfigError("tie_word_embeddings=false: Gemma 3n ties the LM head to embed_tokens; untied checkpoints "
                          "are not supported")
    n, h, heads = cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"]
    hd, kv, p, streams = cfg["head_dim"], cfg["num_key_value_heads"], cfg["hidden_size_per_layer_input"], \
        cfg["altup_num_inputs"]
    types, mlp = _layer_types(cfg), _mlp_sizes(cfg)
    first_shared = n - cfg["num_kv_shared_layers"]
    if first_shared < n and set(types[:first_shared]) != set(types):
        raise ConfigError(f"num_kv_shared_layers={cfg['num_kv_shared_layers']}: the shared layers' types "
                          f"{sorted(set(types[first_shared:]))} must each have an earlier non-shared layer to reuse "
                          "the cache of")

    shapes: dict[str, tuple[int, ...]] = {
        "embed_tokens.weight": (cfg["vocab_size"], h),
        "embed_tokens_per_layer.weight": (cfg["vocab_size_per_layer_input"], n * p),
        "per_layer_model_projection.weight": (n * p, h),
        "per_layer_projection_norm.weight": (p,),
    }
    for kind in ("altup_projections", "altup_unembed_projections"):  # streams 1.. only: stream 0 is the embedding
        shapes.update({f"{kind}.{i}.weight": (h, h) for i in range(streams - 1)})
    shapes["norm.weight"] = (h,)

    bias = cfg["attention_bias"]
    for i in range(n):
        pre = f"layers.{i}."
        projections = {"q_proj": (heads * hd, h), "k_proj": (kv * hd, h), "v_proj": (kv * hd, h),
                       "o_proj": (h, heads * hd)}
        for proj, shape in projections.items():
            shapes[pre + f"self_attn.{proj}.weight"] = shape
            if bias:
                shapes[pre + f"self_attn.{proj}.bias"] = shape[:1]
        shapes[pre + "self_attn.q_norm.weight"] = (hd,)
        shapes[pre + "self_attn.k_norm.weight"] = (hd,)  # v_norm is scale-free: no weight
        shapes[pre + "mlp.gate_proj.weight"] = (mlp[i], h)
        shapes[pre + "mlp.up_proj.weight"] = (mlp[i], h)
        shapes[pre + "mlp.down_proj.weight"] = (h, mlp[i])
        shapes[pre + "altup.correct_output_scale"] = (h,)
        shapes[pre + "altup.correction_coefs.weight"] = (streams, streams)
        shapes[pre + "altup.prediction_coefs.weight"] = (streams * streams, streams)
        shapes[pre + "altup.modality_router.weight"] = (streams, h)
        shapes[pre + "altup.router_norm.weight"] = (h,)
        shapes[pre + "laurel.linear_left.weight"] = (cfg["laurel_rank"], h)
        shapes[pre + "laurel.linear_right.weight"] = (h, cfg["laurel_rank"])
        shapes[pre + "laurel.post_laurel_norm.weight"] = (h,)
        shapes[pre + "per_layer_input_gate.weight"] = (p, h)
        shapes[pre + "per_layer_projection.weight"] = (h, p)
        for norm in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm", "post_per_layer_input_norm"):
            shapes[pre + norm + ".weight"] = (h,)
    return shapes


def tower_configs(text_config: dict) -> dict[str, dict]:
    """The wrapper's vision and audio configs: the published ones, their vocabularies placed right after the PLE
    vocabulary as published. label_names is given so that transformers need not ask timm for ImageNet's."""
    cfg = {**TEXT_DEFAULTS, **text_config}
    offset = cfg["vocab_size_per_layer_input"]
    return {
        "vision_config": {"model_type": "gemma3n_vision", "architecture": "mobilenetv5_300m_enc", "do_pooling": False,
                          "hidden_size": VISION_WIDTH, "label_names": ["LABEL_0", "LABEL_1"], "num_classes": 2,
                          "rms_norm_eps": 1e-6, "vocab_offset": offset, "vocab_size": MULTIMODAL_VOCAB},
        "audio_config": {"model_type": "gemma3n_audio", "hidden_size": AUDIO_WIDTH, "rms_norm_eps": 1e-6,
                         "vocab_offset": offset + MULTIMODAL_VOCAB, "vocab_size": MULTIMODAL_VOCAB},
    }


def tower_tensors(text_config: dict) -> dict[str, tuple[int, ...]]:
    """The multimodal checkpoint's tensors beyond the text model: the tower stand-ins, and the two embedders in full
    (Gemma3nMultimodalEmbedder: its post-projection norm is scale-free), named as published."""
    h = {**TEXT_DEFAULTS, **text_config}["hidden_size"]
    shapes = dict(TOWER_PLACEHOLDERS)
    for name, width in (("embed_vision", VISION_WIDTH), ("embed_audio", AUDIO_WIDTH)):
        shapes[f"model.{name}.embedding.weight"] = (MULTIMODAL_VOCAB, width)
        shapes[f"model.{name}.hard_embedding_norm.weight"] = (width,)
        shapes[f"model.{name}.soft_embedding_norm.weight"] = (width,)
        shapes[f"model.{name}.embedding_projection.weight"] = (h, width)
    return shapes
