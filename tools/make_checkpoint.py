"""Write a random-weight Gemma 4 or Gemma 3n text checkpoint in Hugging Face's published on-disk layout.

Real Gemma weights cannot be downloaded here, so correctness is proven on tiny random checkpoints against
transformers, and speed and memory are measured on random checkpoints at the real E2B/E4B shapes (speed
does not depend on the values). Both need the *published* layout, so that the loading code under test is
the one a real checkpoint goes through: the multimodal wrapper config with the text weights under
`model.language_model.` (plus a few vision/audio tensors that a text reader must skip), or text-only
`Gemma4ForCausalLM` / `Gemma3nForCausalLM`; bf16, f16 or f32; sharded with an index or one file. The config's
model_type picks the family (gemma4_text, gemma3n_text); Gemma 3n's rules live in gemma3n_checkpoint.py.

Tensor names and shapes are derived from the config alone, following transformers' modeling code,
so that a real-size model never has to be instantiated (E2B is 4.6 B parameters) and so that tests comparing
this description with transformers check two independent ones. Values are generated in row blocks and
streamed straight into the safetensors files, so memory stays flat whatever the model size.

    python tools/make_checkpoint.py /tmp/ckpt-e2b --config e2b
    python tools/make_checkpoint.py /tmp/ckpt-3n-e4b --config gemma-3n-e4b
    python tools/make_checkpoint.py /tmp/tiny --config my_config.json --layout causal --dtype f32 --single-file
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import struct
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import gemma3n_checkpoint
from config_error import ConfigError

CONFIGS_DIR = Path(__file__).resolve().parent / "configs"  # the published Gemma 4 configs, shipped with the tool
MODEL_CONFIGS = Path(__file__).resolve().parents[1] / "edge_runtime" / "model_configs"  # Gemma 3n's, with sources
NAMED_CONFIGS = {"e2b": CONFIGS_DIR / "gemma-4-e2b.config.json", "e4b": CONFIGS_DIR / "gemma-4-e4b.config.json",
                 "gemma-3n-e2b": MODEL_CONFIGS / "gemma-3n-e2b.json",
                 "gemma-3n-e4b": MODEL_CONFIGS / "gemma-3n-e4b.json"}

# Gemma4TextConfig's defaults for every field that decides a tensor's name or shape: a config that leaves one
# out gets the tensor transformers would build for it.
TEXT_DEFAULTS = {
    "vocab_size": 262_144, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 30,
    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "global_head_dim": 512,
    "num_global_key_value_heads": None, "attention_k_eq_v": False, "attention_bias": False,
    "vocab_size_per_layer_input": 262_144, "hidden_size_per_layer_input": 256, "num_kv_shared_layers": 0,
    "use_double_wide_mlp": False, "enable_moe_block": False, "num_experts": None, "moe_intermediate_size": None,
    "tie_word_embeddings": True, "max_position_embeddings": 131_072,
}
SLIDING, FULL = "sliding_attention", "full_attention"

SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]  # ids 0..5
PAD_ID, EOS_ID, BOS_ID = 0, 1, 2
START_OF_TURN_ID, END_OF_TURN_ID = 4, 5
DEFAULT_TOKENIZER_VOCAB = 4096

DTYPES = {"bf16": ("BF16", 2), "f16": ("F16", 2), "f32": ("F32", 4)}  # safetensors name, bytes per value
BLOCK_VALUES = 1 << 22  # values generated at once: 16 MiB of float32, whatever the tensor's size

# Stand-ins for the vision and audio towers of the multimodal checkpoint (real names, tiny shapes). The text
# config has no vision/audio config, so transformers reports them as unexpected keys and a text reader must
# skip them.
TOWER_PLACEHOLDERS = {
    "model.vision_tower.encoder.layers.0.mlp.gate_proj.linear.weight": (16, 8),
    "model.vision_tower.patch_embedder.input_proj.weight": (8, 12),
    "model.audio_tower.layers.0.feed_forward1.ffw_layer_1.linear.weight": (16, 8),
    "model.embed_vision.embedding_projection.weight": (8, 8),
    "model.embed_audio.embedding_projection.weight": (8, 8),
}

# Gemma's turn format; a system prompt has no turn of its own and opens the first user turn.
CHAT_TEMPLATE = """{{ bos_token }}
{%- if messages and messages[0]['role'] == 'system' -%}
{%- set system = messages[0]['content'] | trim + '\\n\\n' -%}
{%- set messages = messages[1:] -%}
{%- else -%}
{%- set system = '' -%}
{%- endif -%}
{%- for message in messages -%}
{%- set role = 'model' if message['role'] in ('assistant', 'model') else 'user' -%}
<start_of_turn>{{ role }}{{ '\\n' }}{{ system if loop.first else '' }}
{{- message['content'] | trim }}<end_of_turn>{{ '\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
<start_of_turn>model{{ '\\n' }}
{%- endif -%}
"""


def load_config(name_or_path: str | Path) -> dict:
    """Accept the names benchmarks use and any config.json a user has, so callers need not unwrap it."""
    name = str(name_or_path)
    path = NAMED_CONFIGS.get(name.lower(), Path(name))
    if not path.is_file():
        raise ConfigError(f"config {name!r}: no such file (use {', '.join(NAMED_CONFIGS)}, or a path to a "
                          "config.json)")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config {str(path)!r}: not valid JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise ConfigError(f"config {str(path)!r}: expected a JSON object")
    text = config.get("text_config", config)
    wrapper_type = config.get("model_type", "gemma4") if text is not config else None
    if isinstance(text, dict) and wrapper_type in WRAPPER_TYPES:  # a text_config may leave its model_type out
        text = {"model_type": FAMILIES[WRAPPER_TYPES[wrapper_type]].text_type, **text}
    if not isinstance(text, dict) or text.get("model_type", "gemma4_text") not in FAMILIES:
        raise ConfigError(f"config {str(path)!r}: not a Gemma 4 or Gemma 3n config (expected model_type 'gemma4' "
                          "or 'gemma3n' with a text_config, or 'gemma4_text' or 'gemma3n_text')")
    return dict(text)


@dataclass(frozen=True)
class Family:
    """What differs between the model families the tool writes: names, tensor rules, what the wrapper adds."""

    text_type: str
    wrapper_type: str
    causal: str
    multimodal: str
    tensor_shapes: Callable[[dict], dict[str, tuple[int, ...]]]
    tower_tensors: Callable[[dict], dict[str, tuple[int, ...]]]  # full names, multimodal layout only
    tower_configs: Callable[[dict], dict[str, dict]]  # the wrapper config's keys beside text_config
    defaults: dict


def _layer_types(cfg: dict) -> list[str]:
    n = cfg["num_hidden_layers"]
    types = list(cfg.get("layer_types") or [SLIDING if (i + 1) % 6 else FULL for i in range(n)])
    if len(types) != n:
        raise ConfigError(f"layer_types has {len(types)} entries for num_hidden_layers={n}")
    if unknown := sorted(set(types) - {SLIDING, FULL}):
        raise ConfigError(f"layer_types: unknown layer type(s) {unknown}")
    types[-1] = FULL  # transformers forces the last layer to full attention
    return types


def _attention_shapes(cfg: dict, types: list[str]) -> list[tuple[int, int]]:
    """(head_dim, kv_heads) per layer, resolved the way Gemma4TextConfig.__post_init__ does.

    A config as published carries `global_head_dim`; one saved by transformers carries the resolved
    `per_layer_config` instead, keyed by zero-padded layer index, and then no global rule applies.
    """
    head_dim, kv_heads = cfg["head_dim"], cfg["num_key_value_heads"]
    if "per_layer_config" in cfg:
        overrides = {int(k): v for k, v in (cfg["per_layer_config"] or {}).items()}
    else:
        full = {"head_dim": cfg["global_head_dim"]}
        if cfg["attention_k_eq_v"] and cfg["num_global_key_value_heads"] is not None:
            full["num_key_value_heads"] = cfg["num_global_key_value_heads"]
        overrides = {i: full for i, t in enumerate(types) if t == FULL}
    return [(overrides.get(i, {}).get("head_dim", head_dim), overrides.get(i, {}).get("num_key_value_heads", kv_heads))
            for i in range(len(types))]


def _gemma4_tensor_shapes(text_config: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor transformers' Gemma4 text model holds for this config, named relative to the text model.

    Mirrors transformers' modeling code rule by rule instead of instantiating it, so real sizes cost nothing
    and the test comparing the two compares independent descriptions.
    """
    cfg = {**TEXT_DEFAULTS, **text_config}
    if not cfg["tie_word_embeddings"]:
        raise ConfigError("tie_word_embeddings=false: Gemma 4 ties the LM head to embed_tokens; untied "
                          "checkpoints are not supported")
    n, h, heads = cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"]
    p = cfg["hidden_size_per_layer_input"]  # 0 or None: no per-layer embeddings at all
    types = _layer_types(cfg)
    first_shared = n - cfg["num_kv_shared_layers"]
    if first_shared < n and set(types[:first_shared]) != set(types):
        raise ConfigError(f"num_kv_shared_layers={cfg['num_kv_shared_layers']}: the shared layers' types "
                          f"{sorted(set(types[first_shared:]))} must each have an earlier non-shared layer to "
                          "reuse the cache of")
    bias = cfg["attention_bias"]

    shapes: dict[str, tuple[int, ...]] = {"embed_tokens.weight": (cfg["vocab_size"], h)}
    if p:
        shapes["embed_tokens_per_layer.weight"] = (cfg["vocab_size_per_layer_input"], n * p)
        shapes["per_layer_model_projection.weight"] = (n * p, h)
        shapes["per_layer_projection_norm.weight"] = (p,)
    shapes["norm.weight"] = (h,)

    for i, (layer_type, (hd, kv)) in enumerate(zip(types, _attention_shapes(cfg, types))):
        pre = f"layers.{i}."
        shared = i >= first_shared
        projections = {"q_proj": (heads * hd, h)}
        if not shared:
            projections["k_proj"] = (kv * hd, h)
            if not (cfg["attention_k_eq_v"] and layer_type != SLIDING):  # k_eq_v: full layers use K as V
                projections["v_proj"] = (kv * hd, h)
        projections["o_proj"] = (h, heads * hd)
        shapes[pre + "layer_scalar"] = (1,)
        for proj, shape in projections.items():
            shapes[pre + f"self_attn.{proj}.weight"] = shape
            if bias:
                shapes[pre + f"self_attn.{proj}.bias"] = shape[:1]
        shapes[pre + "self_attn.q_norm.weight"] = (hd,)
        if not shared:
            shapes[pre + "self_attn.k_norm.weight"] = (hd,)  # v_norm is scale-free: no weight
        mlp = cfg["intermediate_size"] * (2 if shared and cfg["use_double_wide_mlp"] else 1)
        shapes[pre + "mlp.gate_proj.weight"] = (mlp, h)
        shapes[pre + "mlp.up_proj.weight"] = (mlp, h)
        shapes[pre + "mlp.down_proj.weight"] = (h, mlp)
        norms = ["input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                 "post_feedforward_layernorm"]
        if cfg["enable_moe_block"]:
            experts, moe = cfg["num_experts"], cfg["moe_intermediate_size"]
            if not experts or not moe:
                raise ConfigError("enable_moe_block=true needs num_experts and moe_intermediate_size")
            shapes[pre + "router.proj.weight"] = (experts, h)
            shapes[pre + "router.scale"] = (h,)
            shapes[pre + "router.per_expert_scale"] = (experts,)
            shapes[pre + "experts.gate_up_proj"] = (experts, 2 * moe, h)
            shapes[pre + "experts.down_proj"] = (experts, h, moe)
            norms += ["post_feedforward_layernorm_1", "post_feedforward_layernorm_2", "pre_feedforward_layernorm_2"]
        if p:
            shapes[pre + "per_layer_input_gate.weight"] = (p, h)
            shapes[pre + "per_layer_projection.weight"] = (h, p)
            norms.append("post_per_layer_input_norm")
        for norm in norms:
            shapes[pre + norm + ".weight"] = (h,)
    return shapes


FAMILIES = {family.text_type: family for family in (
    Family("gemma4_text", "gemma4", "Gemma4ForCausalLM", "Gemma4ForConditionalGeneration", _gemma4_tensor_shapes,
           lambda text: dict(TOWER_PLACEHOLDERS), lambda text: {}, TEXT_DEFAULTS),
    Family("gemma3n_text", "gemma3n", "Gemma3nForCausalLM", "Gemma3nForConditionalGeneration",
           gemma3n_checkpoint.tensor_shapes, gemma3n_checkpoint.tower_tensors, gemma3n_checkpoint.tower_configs,
           gemma3n_checkpoint.TEXT_DEFAULTS),
)}
WRAPPER_TYPES = {family.wrapper_type: family.text_type for family in FAMILIES.values()}


def family_of(text_config: dict) -> Family:
    """A text config without model_type is Gemma 4's, as the tool has always taken it."""
    return FAMILIES[text_config.get("model_type", "gemma4_text")]


def tensor_shapes(text_config: dict) -> dict[str, tuple[int, ...]]:
    """The text model's tensors for this config in the published layout, named relative to the text model."""
    return family_of(text_config).tensor_shapes(text_config)


def _values(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Row blocks of values in a trained model's range, so activations stay O(1) through every layer.

    Projections get std 1/sqrt(fan_in) and gains sit near 1 (Gemma 4's RMSNorm multiplies by the weight
    itself). q/k norm gains are hd**-0.25: Gemma 4 attends with scaling 1.0, so this keeps attention logits at
    unit variance for any head size instead of sqrt(head_dim).
    """
    if name.endswith("layer_scalar"):
        yield rng.uniform(0.5, 1.0, size=shape).astype(np.float32)
        return
    if name.endswith(".bias"):
        yield 0.02 * rng.standard_normal(shape, dtype=np.float32)
        return
    if len(shape) == 1:
        gain = shape[0] ** -0.25 if name.endswith(("q_norm.weight", "k_norm.weight")) else 1.0
        yield np.float32(gain) * (1 + 0.1 * rng.standard_normal(shape, dtype=np.float32))
        return
    rows, width = int(np.prod(shape[:-1], dtype=np.int64)), shape[-1]
    std = np.float32(0.05 if "embed_tokens" in name else width ** -0.5)
    step = max(1, BLOCK_VALUES // width)
    for start in range(0, rows, step):
        block = rng.standard_normal((min(step, rows - start), width), dtype=np.float32)
        block *= std
        yield block


def _encode(block: np.ndarray, dtype: str) -> np.ndarray:
    """Little-endian values of the block in the file's dtype; bf16 rounds to nearest even, as torch does."""
    if dtype == "f32":
        return block.astype("<f4", copy=False)
    if dtype == "f16":
        return block.astype("<f2")
    bits = block.view(np.uint32)  # the block is ours: round in place
    bits += ((bits >> 16) & 1) + np.uint32(0x7FFF)
    return (bits >> 16).astype("<u2")


def _tensor_seed(name: str) -> int:
    """Seed from the name without its layout prefix: both layouts, every dtype and any sharding hold the same
    values, and a tensor's values do not depend on which other tensors exist."""
    local = name.removeprefix("model.language_model.").removeprefix("model.")
    return int.from_bytes(hashlib.sha256(local.encode()).digest()[:8], "little")


def _write_safetensors(path: Path, tensors: list[tuple[str, tuple[int, ...]]], dtype: str, seed: int) -> int:
    """Stream one safetensors file: the header first (offsets follow from the shapes), then each tensor's
    blocks as they are generated. Returns the data size in bytes."""
    st_dtype, size = DTYPES[dtype]
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in tensors:
        nbytes = int(np.prod(shape, dtype=np.int64)) * size
        header[name] = {"dtype": st_dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, shape in tensors:
            rng = np.random.default_rng([seed, _tensor_seed(name)])
            for block in _values(name, shape, rng):
                f.write(memoryview(_encode(block, dtype)).cast("B"))
    return offset


def _plan_shards(tensors: list[tuple[str, tuple[int, ...]]], size: int,
                 max_shard_bytes: int | None) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Greedy in order, as save_pretrained does: a tensor larger than the limit gets a shard of its own."""
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    filled = 0
    for name, shape in tensors:
        nbytes = int(np.prod(shape, dtype=np.int64)) * size
        if max_shard_bytes is not None and shards[-1] and filled + nbytes > max_shard_bytes:
            shards.append([])
            filled = 0
        shards[-1].append((name, shape))
        filled += nbytes
    return shards


@functools.lru_cache(maxsize=8)
def _tokenizer_json(vocab: int) -> str:
    """A byte-level BPE trained on English that ships with Python, with Gemma's special-token ids.

    Cached because tests build many checkpoints and training is the slowest step for a tiny one.
    """
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(topics.values(), trainer)
    if tok.get_vocab_size() > vocab:  # the 256 byte symbols and the special tokens are always kept
        raise ConfigError(f"a byte-level tokenizer needs at least {tok.get_vocab_size()} ids, more than the "
                          f"{vocab} available (raise vocab_size or tokenizer_vocab)")
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B:1",
                                                       special_tokens=[("<bos>", BOS_ID)])
    return tok.to_str()


def _write_tokenizer(out: Path, tokenizer_json: str, max_positions: int) -> None:
    (out / "tokenizer.json").write_text(tokenizer_json)
    (out / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
        "add_bos_token": True, "model_max_length": max_positions,
        "tokenizer_class": "PreTrainedTokenizerFast"}, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": BOS_ID, "eos_token_id": [EOS_ID, END_OF_TURN_ID], "pad_token_id": PAD_ID}, indent=2) + "\n")
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)


def make_checkpoint(out_dir: Path | str, text_config: dict, *, layout: str = "multimodal", dtype: str = "bf16",
                    max_shard_bytes: int | None = 2 << 30, seed: int = 0,
                    tokenizer_vocab: int | None = None) -> Path:
    """Write the checkpoint into `out_dir` (created; an earlier checkpoint's weight files are replaced).

    As with save_pretrained, weights that fit in one shard go to a single `model.safetensors`;
    `max_shard_bytes=None` forces that whatever the size.
    """
    if layout not in ("multimodal", "causal"):
        raise ValueError(f"layout={layout!r}: expected 'multimodal' or 'causal'")
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: expected one of {sorted(DTYPES)}")
    text = {k: v for k, v in text_config.items() if k not in ("architectures", "transformers_version")}
    text.setdefault("model_type", "gemma4_text")
    if text["model_type"] not in FAMILIES:
        raise ConfigError(f"model_type {text['model_type']!r}: expected one of {sorted(FAMILIES)}")
    family = family_of(text)
    shapes = family.tensor_shapes(text)  # refuses a bad config before anything is written
    vocab_size = text.get("vocab_size", family.defaults["vocab_size"])
    tokenizer_json = _tokenizer_json(min(tokenizer_vocab or DEFAULT_TOKENIZER_VOCAB, vocab_size))

    if layout == "multimodal":
        tensors = [("model.language_model." + name, shape) for name, shape in shapes.items()]
        tensors += list(family.tower_tensors(text).items())
        config = {"architectures": [family.multimodal], "model_type": family.wrapper_type, "text_config": text,
                  **family.tower_configs(text)}
    else:
        tensors = [("model." + name, shape) for name, shape in shapes.items()]
        config = {"architectures": [family.causal], **text}

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("model-*-of-*.safetensors"), out / "model.safetensors",
                  out / "model.safetensors.index.json"]:
        stale.unlink(missing_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    shards = _plan_shards(tensors, DTYPES[dtype][1], max_shard_bytes)
    if len(shards) == 1:
        _write_safetensors(out / "model.safetensors", shards[0], dtype, seed)
    else:
        files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        total = sum(_write_safetensors(out / file, shard, dtype, seed) for file, shard in zip(files, shards))
        weight_map = {name: file for file, shard in zip(files, shards) for name, _ in shard}
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")

    _write_tokenizer(out, tokenizer_json,
                     text.get("max_position_embeddings", family.defaults["max_position_embeddings"]))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="checkpoint directory to write")
    parser.add_argument("--config", required=True,
                        help=f"{', '.join(NAMED_CONFIGS)}, or a path to a config.json (wrapper or text-only)")
    parser.add_argument("--layout", choices=["multimodal", "causal"], default="multimodal",
                        help="multimodal: Gemma4ForConditionalGeneration / Gemma3nForConditionalGeneration, as "
                             "published (default); causal: Gemma4ForCausalLM / Gemma3nForCausalLM")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--max-shard-gb", type=float, default=2.0, help="shard size limit in GiB (default 2)")
    parser.add_argument("--single-file", action="store_true", help="write one model.safetensors, no index")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer-vocab", type=int, default=None,
                        help=f"tokenizer vocabulary (default {DEFAULT_TOKENIZER_VOCAB}, capped at vocab_size)")
    args = parser.parse_args(argv)
    try:
        out = make_checkpoint(args.out, load_config(args.config), layout=args.layout, dtype=args.dtype,
                              max_shard_bytes=None if args.single_file else int(args.max_shard_gb * (1 << 30)),
                              seed=args.seed, tokenizer_vocab=args.tokenizer_vocab)
    except (ConfigError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
