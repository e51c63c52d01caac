"""Write a random-weight Gemma 4 text checkpoint in Hugging Face's published on-disk layout.

Real Gemma weights cannot be downloaded here, so correctness is proven on tiny random checkpoints against
transformers, and speed and memory are measured on random checkpoints at the real E2B/E4B shapes (speed
does not depend on the values). Both need the *published* layout, so that the loading code under test is
the one a real checkpoint goes through: the multimodal wrapper config with the text weights under
`model.language_model.` (plus vision/audio tensors that a reader must skip), or text-only
`Gemma4ForCausalLM`; bf16, f16 or f32; sharded with an index or one file. Tensors are generated in row
blocks and streamed to disk, so a 4.6 B-parameter E2B needs well under 1 GB of memory.

    python tools/make_checkpoint.py /tmp/ckpt-e2b --config e2b
    python tools/make_checkpoint.py /tmp/tiny --config my_text_config.json --layout causal --dtype f32
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np

MODELS_DIR = Path(__file__).resolve().parent / "configs"  # the published text configs of E2B and E4B
NAMED_CONFIGS = {"e2b": "gemma-4-e2b.config.json", "e4b": "gemma-4-e4b.config.json"}
SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
END_OF_TURN_ID = SPECIAL_TOKENS.index("<end_of_turn>")
DTYPES = {"bf16": ("BF16", 2), "f16": ("F16", 2), "f32": ("F32", 4)}
BLOCK_VALUES = 1 << 24
CHAT_TEMPLATE = """{{ bos_token }}{%- set first = true -%}
{%- set system = messages[0]['content'] if messages and messages[0]['role'] == 'system' else '' -%}
{%- for message in messages if message['role'] != 'system' -%}
<start_of_turn>{{ 'model' if message['role'] == 'assistant' else 'user' }}
{% if loop.first and system %}{{ system }}

{% endif %}{{ message['content'] | trim }}<end_of_turn>
{% endfor -%}
{%- if add_generation_prompt %}<start_of_turn>model
{% endif -%}"""


def load_config(name_or_path: str) -> dict:
    """A named real config ("e2b", "e4b") or a JSON file, in wrapper or text-only form; returns the text config."""
    path = MODELS_DIR / NAMED_CONFIGS[name_or_path] if name_or_path in NAMED_CONFIGS else Path(name_or_path)
    if not path.is_file():
        raise SystemExit(f"error: config {name_or_path!r}: no such file (use e2b, e4b or a path to a config.json)")
    config = json.loads(path.read_text())
    return dict(config.get("text_config", config))


def tensor_shapes(text: dict) -> dict[str, tuple[int, ...]]:
    """Every text-model tensor transformers' Gemma4 holds for this config, named relative to the text model.

    Derived from the config on its own (not from edge-runtime's reader) so that tests comparing the two, and
    transformers loading the result without missing or unexpected keys, check independent descriptions.
    """
    n, h, p = text["num_hidden_layers"], text["hidden_size"], text["hidden_size_per_layer_input"]
    heads, kv_heads = text["num_attention_heads"], text["num_key_value_heads"]
    layer_types = text.get("layer_types") or ["sliding_attention" if (i + 1) % 6 else "full_attention"
                                              for i in range(n)]
    per_layer = text.get("per_layer_config") or {}
    first_shared = n - text.get("num_kv_shared_layers", 0)
    shapes: dict[str, tuple[int, ...]] = {
        "embed_tokens.weight": (text["vocab_size"], h),
        "embed_tokens_per_layer.weight": (text.get("vocab_size_per_layer_input", text["vocab_size"]), n * p),
        "per_layer_model_projection.weight": (n * p, h),
        "per_layer_projection_norm.weight": (p,),
        "norm.weight": (h,),
    }
    for i in range(n):
        full = layer_types[i] == "full_attention" or i == n - 1
        hd = per_layer.get(str(i), {}).get("head_dim") or (text.get("global_head_dim", 512) if full
                                                           else text.get("head_dim", 256))
        shared = i >= first_shared
        mlp = text["intermediate_size"] * (2 if shared and text.get("use_double_wide_mlp") else 1)
        pre = f"layers.{i}."
        shapes[pre + "layer_scalar"] = (1,)
        shapes[pre + "self_attn.q_proj.weight"] = (heads * hd, h)
        shapes[pre + "self_attn.q_norm.weight"] = (hd,)
        if not shared:
            shapes[pre + "self_attn.k_proj.weight"] = (kv_heads * hd, h)
            shapes[pre + "self_attn.v_proj.weight"] = (kv_heads * hd, h)
            shapes[pre + "self_attn.k_norm.weight"] = (hd,)
        shapes[pre + "self_attn.o_proj.weight"] = (h, heads * hd)
        shapes[pre + "mlp.gate_proj.weight"] = (mlp, h)
        shapes[pre + "mlp.up_proj.weight"] = (mlp, h)
        shapes[pre + "mlp.down_proj.weight"] = (h, mlp)
        for norm in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm", "post_per_layer_input_norm"):
            shapes[pre + norm + ".weight"] = (h,)
        shapes[pre + "per_layer_input_gate.weight"] = (p, h)
        shapes[pre + "per_layer_projection.weight"] = (h, p)
    return shapes


# Small stand-ins for the vision and audio towers of the multimodal checkpoint: never read by an exporter.
TOWER_PLACEHOLDERS = {
    "model.vision_tower.encoder.layers.0.mlp.gate_proj.linear.weight": (16, 8),
    "model.vision_tower.patch_embedder.input_proj.weight": (8, 12),
    "model.audio_tower.layers.0.feed_forward1.ffw_layer_1.linear.weight": (16, 8),
    "model.embed_vision.embedding_projection.weight": (8, 8),
    "model.embed_audio.embedding_projection.weight": (8, 8),
}


def _values(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Row blocks of numerically sane random values: activations stay O(1) through every layer."""
    if name.endswith("layer_scalar"):
        yield rng.uniform(0.5, 1.0, size=shape).astype(np.float32)
        return
    if len(shape) == 1:
        # q/k norms set the attention temperature (Gemma 4 attends with scaling 1.0): keep logits O(1).
        centre = 0.5 if name.endswith(("q_norm.weight", "k_norm.weight")) else 1.0
        yield (centre + 0.1 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)
        return
    std = 0.05 if "embed_tokens" in name else shape[1] ** -0.5
    rows = max(1, BLOCK_VALUES // shape[1])
    for start in range(0, shape[0], rows):
        block = rng.standard_normal((min(rows, shape[0] - start), shape[1]), dtype=np.float32)
        block *= np.float32(std)
        yield block


def _encode(block: np.ndarray, dtype: str) -> bytes:
    if dtype == "f32":
        return block.astype("<f4").tobytes()
    if dtype == "f16":
        return block.astype("<f2").tobytes()
    bits = block.view(np.uint32)
    rounded = (bits + (((bits >> 16) & 1) + 0x7FFF)) >> 16  # round to nearest even
    return rounded.astype("<u2").tobytes()


def _write_safetensors(path: Path, tensors: list[tuple[str, tuple[int, ...]]], dtype: str, seed: int) -> int:
    """Stream one safetensors file: header first (offsets are known from shapes), then each tensor's blocks."""
    st_dtype, size = DTYPES[dtype]
    header, offset = {"__metadata__": {"format": "pt"}}, 0
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
                f.write(_encode(block, dtype))
    return offset


def _tensor_seed(name: str) -> int:
    """Per-tensor seed from the name without its layout prefix: both layouts and any sharding hold equal values."""
    local = name.removeprefix("model.language_model.").removeprefix("model.")
    return int.from_bytes(hashlib.sha256(local.encode()).digest()[:8], "little")


@functools.lru_cache(maxsize=8)
def _tokenizer_json(vocab: int) -> str:
    """A byte-level BPE trained on English that ships with Python, with Gemma's special-token ids."""
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(topics.values(), trainer)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                                       special_tokens=[("<bos>", 2)])
    return tok.to_str()


def _write_tokenizer(out: Path, vocab: int, max_positions: int) -> None:
    (out / "tokenizer.json").write_text(_tokenizer_json(vocab))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
        "model_max_length": max_positions, "tokenizer_class": "PreTrainedTokenizerFast"}, indent=1))
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 2, "eos_token_id": [1, END_OF_TURN_ID], "pad_token_id": 0}, indent=1))
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)


def make_checkpoint(out_dir: Path | str, text_config: dict, *, layout: str = "multimodal", dtype: str = "bf16",
                    max_shard_bytes: int | None = 2 << 30, seed: int = 0,
                    tokenizer_vocab: int | None = None) -> Path:
    """Write the checkpoint into `out_dir` (created) and return it."""
    if layout not in ("multimodal", "causal"):
        raise ValueError(f"layout={layout!r}: expected 'multimodal' or 'causal'")
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: expected one of {sorted(DTYPES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = {"model_type": "gemma4_text", **text_config}
    prefix = "model.language_model." if layout == "multimodal" else "model."
    tensors = [(prefix + name, shape) for name, shape in tensor_shapes(text).items()]
    if layout == "multimodal":
        tensors += list(TOWER_PLACEHOLDERS.items())
        config = {"architectures": ["Gemma4ForConditionalGeneration"], "model_type": "gemma4", "text_config": text}
    else:
        config = {**text, "architectures": ["Gemma4ForCausalLM"]}
    (out / "config.json").write_text(json.dumps(config, indent=1))

    size = DTYPES[dtype][1]
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    filled = 0
    for name, shape in tensors:
        nbytes = int(np.prod(shape, dtype=np.int64)) * size
        if max_shard_bytes is not None and shards[-1] and filled + nbytes > max_shard_bytes:
            shards.append([])
            filled = 0
        shards[-1].append((name, shape))
        filled += nbytes
    if max_shard_bytes is None:
        total = _write_safetensors(out / "model.safetensors", shards[0], dtype, seed)
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        total = sum(_write_safetensors(out / file, shard, dtype, seed) for file, shard in zip(names, shards))
        weight_map = {name: file for file, shard in zip(names, shards) for name, _ in shard}
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))

    vocab = min(tokenizer_vocab or 4096, text["vocab_size"])
    _write_tokenizer(out, vocab, text.get("max_position_embeddings", 131072))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="checkpoint directory to write")
    parser.add_argument("--config", required=True, help="e2b, e4b, or a path to a (wrapper or text) config.json")
    parser.add_argument("--layout", choices=["multimodal", "causal"], default="multimodal")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--max-shard-gb", type=float, default=2.0, help="0 writes one model.safetensors")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer-vocab", type=int, default=None)
    args = parser.parse_args()
    shard = int(args.max_shard_gb * (1 << 30)) or None
    out = make_checkpoint(args.out, load_config(args.config), layout=args.layout, dtype=args.dtype,
                          max_shard_bytes=shard, seed=args.seed, tokenizer_vocab=args.tokenizer_vocab)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
