"""tools/make_checkpoint.py writes what transformers itself builds and loads: same names, shapes, layout.

The tool derives tensor names and shapes from the config alone; these tests hold that description against
transformers' own Gemma4 and Gemma3n models (built on the meta device, so even the real E2B/E4B shapes cost nothing)
and load the written files with `from_pretrained`, the path a published checkpoint takes.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import gemma3n_checkpoint
import make_checkpoint
from make_checkpoint import ConfigError

S, F = "sliding_attention", "full_attention"
BASE = dict(rms_norm_eps=1e-6, final_logit_softcapping=30.0, hidden_activation="gelu_pytorch_tanh",
            max_position_embeddings=256, bos_token_id=2, eos_token_id=1, pad_token_id=0)
# Between them: KV sharing over both layer types, head_dim != global_head_dim, 1 and 2 KV heads, the
# double-wide MLP on and off.
CONFIGS = {
    "shared-mqa-wide": dict(BASE, vocab_size=512, vocab_size_per_layer_input=512, hidden_size=64,
                            intermediate_size=128, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=1,
                            head_dim=16, global_head_dim=32, hidden_size_per_layer_input=16, sliding_window=8,
                            num_kv_shared_layers=2, use_double_wide_mlp=True, layer_types=[S, S, F, S, S, F]),
    "shared-gqa": dict(BASE, vocab_size=384, vocab_size_per_layer_input=384, hidden_size=96, intermediate_size=160,
                       num_hidden_layers=7, num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                       global_head_dim=48, hidden_size_per_layer_input=8, sliding_window=6, num_kv_shared_layers=3,
                       use_double_wide_mlp=False, layer_types=[S, F, S, S, F, S, F]),
    "unshared": dict(BASE, vocab_size=320, vocab_size_per_layer_input=320, hidden_size=48, intermediate_size=96,
                     num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=2, head_dim=16,
                     global_head_dim=16, hidden_size_per_layer_input=12, sliding_window=5, num_kv_shared_layers=0,
                     use_double_wide_mlp=True, layer_types=[S, S, F, F]),
}
TOWERS = ("model.vision_tower.", "model.audio_tower.", "model.embed_vision.", "model.embed_audio.")
PREFIX = {"multimodal": "model.language_model.", "causal": "model."}


def _transformers_text_config(text: dict):
    from transformers import Gemma4TextConfig

    return Gemma4TextConfig(**{k: v for k, v in text.items() if k not in ("model_type", "architectures")})


def _transformers_shapes(text: dict) -> dict[str, tuple[int, ...]]:
    """The text model's state dict as transformers builds it, named relative to the text model."""
    from transformers import Gemma4ForCausalLM

    with torch.device("meta"):
        model = Gemma4ForCausalLM(_transformers_text_config(text))
    # lm_head is tied to embed_tokens, so save_pretrained does not write it
    return {k.removeprefix("model."): tuple(v.shape) for k, v in model.state_dict().items() if k != "lm_head.weight"}


def _saved_by_transformers() -> dict:
    """A config as save_pretrained writes it: no global_head_dim, a zero-padded per_layer_config instead."""
    config = _transformers_text_config(dict(CONFIGS["shared-gqa"], num_hidden_layers=12, layer_types=[S, S, F] * 4,
                                            num_kv_shared_layers=4)).to_dict()
    assert "global_head_dim" not in config and "11" in config["per_layer_config"]
    return config


SHAPE_CASES = {
    **CONFIGS,
    "e2b": make_checkpoint.load_config("e2b"),
    "e4b": make_checkpoint.load_config("e4b"),
    "saved-by-transformers": _saved_by_transformers(),
    # transformers' defaults fill what is left out: 5:1 layer pattern (last layer forced full), PLE vocab 262144
    "defaults": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=7, num_attention_heads=2,
                     num_key_value_heads=1, head_dim=8, global_head_dim=16, hidden_size_per_layer_input=4),
    "moe-k-eq-v-bias-no-ple": dict(CONFIGS["unshared"], hidden_size_per_layer_input=0, attention_bias=True,
                                   attention_k_eq_v=True, num_global_key_value_heads=1, enable_moe_block=True,
                                   num_experts=4, top_k_experts=2, moe_intermediate_size=24),
}


@pytest.mark.parametrize("name", list(SHAPE_CASES))
def test_tensor_shapes_are_transformers_state_dict(name):
    assert make_checkpoint.tensor_shapes(SHAPE_CASES[name]) == _transformers_shapes(SHAPE_CASES[name])


def test_real_configs_have_the_published_sizes():
    e2b = make_checkpoint.tensor_shapes(make_checkpoint.load_config("e2b"))
    e4b = make_checkpoint.tensor_shapes(make_checkpoint.load_config("e4b"))
    assert e2b["embed_tokens_per_layer.weight"] == (262144, 35 * 256)
    assert round(sum(_numel(s) for s in e2b.values()) / 1e9, 2) == 4.63
    assert round(sum(_numel(s) for s in e4b.values()) / 1e9, 2) == 7.46


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _read_all(path: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            tensors.update({name: f.get_tensor(name) for name in f.keys()})  # noqa: SIM118 (safe_open is not iterable)
    return tensors


LOAD_CASES = [  # (config, layout, dtype, max_shard_bytes)
    ("shared-mqa-wide", "multimodal", "bf16", 40_000),
    ("shared-mqa-wide", "causal", "f32", None),
    ("shared-gqa", "causal", "bf16", 40_000),
    ("shared-gqa", "multimodal", "f32", None),
    ("unshared", "multimodal", "f16", None),
]


@pytest.mark.parametrize(("name", "layout", "dtype", "shard"), LOAD_CASES)
def test_transformers_loads_it_without_missing_or_unexpected_keys(name, layout, dtype, shard, tmp_path):
    from transformers import Gemma4ForCausalLM, Gemma4ForConditionalGeneration

    path = make_checkpoint.make_checkpoint(tmp_path, CONFIGS[name], layout=layout, dtype=dtype, max_shard_bytes=shard,
                                           seed=3)
    config = json.loads((path / "config.json").read_text())
    files = _read_all(path)
    expected_files = {"model.safetensors"}
    if shard:
        index = json.loads((path / "model.safetensors.index.json").read_text())
        expected_files = set(index["weight_map"].values())
        assert len(expected_files) >= 2
        assert index["weight_map"] == {n: f.name for f in path.glob("model-*.safetensors")
                                       for n in safe_open(f, "pt").keys()}  # noqa: SIM118
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in files.values())
    assert {f.name for f in path.glob("*.safetensors")} == expected_files
    assert (path / "model.safetensors.index.json").exists() == bool(shard)
    assert {t.dtype for t in files.values()} == {{"bf16": torch.bfloat16, "f16": torch.float16,
                                                  "f32": torch.float32}[dtype]}

    if layout == "multimodal":
        assert config["architectures"] == ["Gemma4ForConditionalGeneration"] and config["model_type"] == "gemma4"
        assert config["text_config"]["model_type"] == "gemma4_text"
        model_class, towers = Gemma4ForConditionalGeneration, set(make_checkpoint.TOWER_PLACEHOLDERS)
    else:
        assert config["architectures"] == ["Gemma4ForCausalLM"] and config["model_type"] == "gemma4_text"
        model_class, towers = Gemma4ForCausalLM, set()
    assert {n for n in files if n.startswith(TOWERS)} == towers

    model, info = model_class.from_pretrained(path, output_loading_info=True, dtype=torch.float32)
    # The tower stand-ins are the only keys transformers does not take: there is no vision/audio config.
    assert not info["missing_keys"] and not info["mismatched_keys"] and not info["error_msgs"]
    assert set(info["unexpected_keys"]) == towers
    # transformers silently ignores K/V weights on KV-shared layers: check the exact name set as well
    state = model.state_dict()
    assert set(files) - towers == set(state) - {"lm_head.weight"}
    for key, value in files.items():
        if key not in towers:
            assert torch.equal(state[key], value.to(torch.float32)), key

    with torch.no_grad():
        logits = model(torch.tensor([[2, 10, 11, 12, 13, 14, 15, 16, 17, 18]])).logits[0]
    assert torch.isfinite(logits).all()
    assert 0.3 < logits.std() < 10
    assert (logits[1:] - logits[:-1]).abs().amax() > 0.1, "every position must get its own logits"


def test_values_are_seeded_per_tensor_and_identical_across_dtypes_layouts_and_blocks(tmp_path, monkeypatch):
    text = CONFIGS["shared-mqa-wide"]
    make = make_checkpoint.make_checkpoint
    f32 = _read_all(make(tmp_path / "f32", text, layout="causal", dtype="f32", max_shard_bytes=None))
    bf16 = _read_all(make(tmp_path / "bf16", text, dtype="bf16", max_shard_bytes=40_000))
    f16 = _read_all(make(tmp_path / "f16", text, layout="causal", dtype="f16"))
    for name, value in f32.items():
        local = name.removeprefix("model.")
        # torch's own conversions round to nearest even, as the tool must
        assert torch.equal(bf16["model.language_model." + local], value.to(torch.bfloat16)), name
        assert torch.equal(f16[name], value.to(torch.float16)), name
    up = f32["model.layers.1.mlp.up_proj.weight"]
    assert not torch.equal(up, f32["model.layers.2.mlp.up_proj.weight"]), "each tensor gets its own values"
    assert abs(up.std().item() * 64**0.5 - 1) < 0.1, "linear weights ~ N(0, 1/fan_in)"
    assert all(0.5 <= f32[f"model.layers.{i}.layer_scalar"].item() <= 1 for i in range(6))

    def digest(path: Path) -> str:
        return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(path.glob("*.safetensors")))).hexdigest()

    again = make(tmp_path / "again", text, dtype="bf16", max_shard_bytes=40_000)
    assert digest(again) == digest(tmp_path / "bf16")
    monkeypatch.setattr(make_checkpoint, "BLOCK_VALUES", 100)  # many row blocks per tensor: same stream
    assert digest(make(tmp_path / "blocks", text, dtype="bf16", max_shard_bytes=40_000)) == digest(again)
    other = _read_all(make(tmp_path / "seed1", text, layout="causal", dtype="f32", max_shard_bytes=None, seed=1))
    assert not torch.equal(other["model.embed_tokens.weight"], f32["model.embed_tokens.weight"])


def test_rewriting_a_directory_leaves_no_stale_weight_files(tmp_path):
    make_checkpoint.make_checkpoint(tmp_path, CONFIGS["unshared"], max_shard_bytes=20_000)
    make_checkpoint.make_checkpoint(tmp_path, CONFIGS["unshared"], max_shard_bytes=None)
    assert sorted(p.name for p in tmp_path.glob("model*")) == ["model.safetensors"]


def test_tokenizer_round_trips_with_gemma_ids_and_chat_template(tmp_path):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    path = make_checkpoint.make_checkpoint(tmp_path, CONFIGS["unshared"], layout="causal", dtype="f32")
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    assert tok.get_vocab_size() == CONFIGS["unshared"]["vocab_size"]  # capped at the model's vocabulary
    assert [tok.token_to_id(t) for t in make_checkpoint.SPECIAL_TOKENS] == [0, 1, 2, 3, 4, 5]
    text = "Return the list of values, naïve café \u2603 \U0001f642."
    ids = tok.encode(text).ids
    assert ids[0] == 2 and ids.count(2) == 1 and tok.decode(ids, skip_special_tokens=True) == text
    assert json.loads((path / "generation_config.json").read_text()) == {"bos_token_id": 2, "eos_token_id": [1, 5],
                                                                          "pad_token_id": 0}

    hf = AutoTokenizer.from_pretrained(path)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (2, 1, 0)
    assert hf(text)["input_ids"] == ids
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Why?"}]
    prompt = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == ("<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello<end_of_turn>\n"
                      "<start_of_turn>user\nWhy?<end_of_turn>\n<start_of_turn>model\n")
    assert hf.apply_chat_template(messages[1:2], tokenize=False) == "<bos><start_of_turn>user\nHi<end_of_turn>\n"
    assert tok.encode(prompt, add_special_tokens=False).ids[:2] == [2, 4]  # turn markers are single tokens

    big = make_checkpoint.make_checkpoint(tmp_path / "big", dict(CONFIGS["unshared"], vocab_size=100_000),
                                          tokenizer_vocab=1000)
    assert Tokenizer.from_file(str(big / "tokenizer.json")).get_vocab_size() == 1000


def test_load_config_accepts_names_wrappers_and_text_configs(tmp_path):
    e2b = make_checkpoint.load_config("e2b")
    assert e2b["hidden_size"] == 1536 and e2b["num_kv_shared_layers"] == 20
    make_checkpoint.make_checkpoint(tmp_path / "mm", CONFIGS["unshared"])
    make_checkpoint.make_checkpoint(tmp_path / "causal", CONFIGS["unshared"], layout="causal")
    wrapper = make_checkpoint.load_config(tmp_path / "mm" / "config.json")
    text_only = make_checkpoint.load_config(tmp_path / "causal" / "config.json")
    assert wrapper == {k: v for k, v in text_only.items() if k != "architectures"}
    assert make_checkpoint.tensor_shapes(wrapper) == make_checkpoint.tensor_shapes(CONFIGS["unshared"])


def test_bad_configs_are_refused_clearly(tmp_path):
    with pytest.raises(ConfigError, match="'e3b': no such file .*e2b, e4b, gemma-3n-e2b, gemma-3n-e4b"):
        make_checkpoint.load_config("e3b")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ConfigError, match="not valid JSON"):
        make_checkpoint.load_config(tmp_path / "broken.json")
    (tmp_path / "llama.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    with pytest.raises(ConfigError, match="not a Gemma 4 or Gemma 3n config"):
        make_checkpoint.load_config(tmp_path / "llama.json")
    with pytest.raises(ConfigError, match="num_kv_shared_layers=3"):  # the shared layers' type has no producer
        make_checkpoint.tensor_shapes(dict(CONFIGS["shared-gqa"], layer_types=[S, S, S, S, F, F, F]))
    with pytest.raises(ConfigError, match="layer_types has 3 entries"):
        make_checkpoint.tensor_shapes(dict(CONFIGS["unshared"], layer_types=[S, S, F]))
    with pytest.raises(ConfigError, match="at least 262 ids"):
        make_checkpoint.make_checkpoint(tmp_path / "tiny-vocab", dict(CONFIGS["unshared"], vocab_size=200))
    assert not (tmp_path / "tiny-vocab").exists(), "a refused config writes nothing"


def test_cli(tmp_path):
    config = tmp_path / "text.json"
    config.write_text(json.dumps(CONFIGS["unshared"]))
    tool = [sys.executable, str(ROOT / "tools" / "make_checkpoint.py")]
    ok = subprocess.run([*tool, str(tmp_path / "out"), "--config", str(config), "--layout", "causal",
                         "--dtype", "f32", "--single-file"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == ["Gemma4ForCausalLM"]
    assert (tmp_path / "out" / "model.safetensors").is_file()
    bad = subprocess.run([*tool, str(tmp_path / "nope"), "--config", "e3b"], capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.startswith("error: config 'e3b'") and bad.stderr.count("\n") == 1
    assert not (tmp_path / "nope").exists()


# ---- Gemma 3n ----------------------------------------------------------------------------------------------------

BASE_3N = dict(BASE, model_type="gemma3n_text", rope_theta=1e6, rope_local_base_freq=1e4)  # the published RoPE keys
# Between them: KV sharing and none, a per-layer and a scalar MLP size, 4 and 3 AltUp streams, a PLE vocabulary
# shorter than the vocabulary (ids past it take PLE row 0) and an equal one, GQA and MQA, head_dim != hidden/heads,
# attention bias, the default 4:1 layer pattern.
CONFIGS_3N = {
    "3n-shared": dict(BASE_3N, vocab_size=400, vocab_size_per_layer_input=384, hidden_size=64,
                      intermediate_size=[128, 96, 128, 96, 128, 96], num_hidden_layers=6, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, hidden_size_per_layer_input=8, laurel_rank=8,
                      num_kv_shared_layers=2, layer_types=[S, S, F, S, S, F], sliding_window=8,
                      activation_sparsity_pattern=[0.95, 0.95, 0.0, 0.0, 0.0, 0.0]),
    "3n-unshared": dict(BASE_3N, vocab_size=320, vocab_size_per_layer_input=320, hidden_size=96, intermediate_size=160,
                        num_hidden_layers=5, num_attention_heads=2, num_key_value_heads=1, head_dim=24,
                        hidden_size_per_layer_input=12, laurel_rank=4, altup_num_inputs=3, num_kv_shared_layers=0,
                        attention_bias=True, sliding_window=5, activation_sparsity_pattern=[0.95, 0.0, 0.0, 0.0, 0.0]),
}
SHARED_KV_EXTRAS = ("self_attn.k_proj.", "self_attn.v_proj.", "self_attn.k_norm.")


def _transformers_3n_shapes(text: dict) -> dict[str, tuple[int, ...]]:
    from transformers import Gemma3nForCausalLM, Gemma3nTextConfig

    with torch.device("meta"):
        model = Gemma3nForCausalLM(Gemma3nTextConfig(**{k: v for k, v in text.items() if k != "model_type"}))
    return {k.removeprefix("model."): tuple(v.shape) for k, v in model.state_dict().items() if k != "lm_head.weight"}


def _shared_layers(text: dict) -> set[int]:
    from transformers import Gemma3nTextConfig

    config = Gemma3nTextConfig(**{k: v for k, v in text.items() if k != "model_type"})
    return {i for i, mode in enumerate(config.kv_sharing_modes) if mode == "reuse"}


SHAPE_CASES_3N = {
    **CONFIGS_3N,
    "gemma-3n-e2b": make_checkpoint.load_config("gemma-3n-e2b"),
    "gemma-3n-e4b": make_checkpoint.load_config("gemma-3n-e4b"),
    # transformers' defaults fill what is left out: 4:1 layer pattern, last layer sliding, 4 streams, sharing 2
    "3n-defaults": dict(model_type="gemma3n_text", vocab_size=300, vocab_size_per_layer_input=256, hidden_size=32,
                        intermediate_size=64, num_hidden_layers=7, num_attention_heads=2, head_dim=8,
                        hidden_size_per_layer_input=4, num_kv_shared_layers=2),
}


@pytest.mark.parametrize("name", list(SHAPE_CASES_3N))
def test_gemma3n_tensor_shapes_are_transformers_state_dict_plus_the_published_shared_kv(name):
    """transformers (5.x) builds no K/V weights for KV-shared layers, but the published files hold them and it drops
    them on load: the tool writes them, and nothing else beyond transformers' state dict."""
    text = SHAPE_CASES_3N[name]
    ours, theirs = make_checkpoint.tensor_shapes(text), _transformers_3n_shapes(text)
    extras = {k for k in ours if k not in theirs}
    shared = _shared_layers(text)
    assert extras == {k for k in ours if any(k.startswith(f"layers.{i}.{t}") for i in shared for t in SHARED_KV_EXTRAS)}
    assert bool(extras) == bool(shared)
    assert {k: v for k, v in ours.items() if k not in extras} == theirs
    for key in extras:  # as shaped on the layers that compute K/V
        assert ours[key] == ours[key.replace(f"layers.{key.split('.')[1]}.", "layers.0.")]


def test_gemma3n_real_configs_match_the_published_checkpoints():
    """Counts from the published model.safetensors.index.json files: 731 (E2B) and 851 (E4B) language-model tensors,
    and E2B, E4B and the 4 + 4 embedder tensors (embed_vision, embed_audio) named as published."""
    e2b, e4b = make_checkpoint.load_config("gemma-3n-e2b"), make_checkpoint.load_config("gemma-3n-e4b")
    s2, s4 = make_checkpoint.tensor_shapes(e2b), make_checkpoint.tensor_shapes(e4b)
    assert (len(s2), len(s4)) == (731, 851)
    assert s2["embed_tokens.weight"] == s4["embed_tokens.weight"] == (262400, 2048)
    assert (s2["embed_tokens_per_layer.weight"], s4["embed_tokens_per_layer.weight"]) == ((262144, 30 * 256),
                                                                                        (262144, 35 * 256))
    assert (s2["layers.0.mlp.gate_proj.weight"], s4["layers.0.mlp.gate_proj.weight"]) == ((8192, 2048), (16384, 2048))
    assert round(sum(_numel(s) for s in s2.values()) / 1e9, 3) == 4.456
    assert round(sum(_numel(s) for s in s4.values()) / 1e9, 3) == 6.867
    towers = make_checkpoint.family_of(e4b).tower_tensors(e4b)
    assert sorted(k for k in towers if k.startswith("model.embed_")) == sorted(
        f"model.{e}.{t}.weight" for e in ("embed_vision", "embed_audio")
        for t in ("embedding", "hard_embedding_norm", "soft_embedding_norm", "embedding_projection"))
    assert towers["model.embed_vision.embedding_projection.weight"] == (2048, 2048)
    assert towers["model.embed_audio.embedding_projection.weight"] == (2048, 1536)


LOAD_CASES_3N = [  # (config, layout, dtype, max_shard_bytes)
    ("3n-shared", "multimodal", "bf16", 40_000),
    ("3n-shared", "causal", "f32", None),
    ("3n-unshared", "causal", "bf16", 60_000),
    ("3n-unshared", "multimodal", "f32", None),
    ("3n-shared", "multimodal", "f16", None),
]


@pytest.mark.parametrize(("name", "layout", "dtype", "shard"), LOAD_CASES_3N)
def test_gemma3n_loads_in_transformers(name, layout, dtype, shard, tmp_path, gemma3n_without_towers):
    from transformers import Gemma3nForCausalLM, Gemma3nForConditionalGeneration

    text = CONFIGS_3N[name]
    path = make_checkpoint.make_checkpoint(tmp_path, text, layout=layout, dtype=dtype, max_shard_bytes=shard, seed=5)
    config = json.loads((path / "config.json").read_text())
    files = _read_all(path)
    if shard:
        index = json.loads((path / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) >= 2
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in files.values())
    else:
        assert [p.name for p in path.glob("*.safetensors")] == ["model.safetensors"]
    assert {t.dtype for t in files.values()} == {{"bf16": torch.bfloat16, "f16": torch.float16,
                                                  "f32": torch.float32}[dtype]}

    prefix = PREFIX[layout]
    shared = {prefix + f"layers.{i}.{t}weight" for i in _shared_layers(text) for t in SHARED_KV_EXTRAS}
    shared |= {k.replace("weight", "bias") for k in shared if "norm" not in k} if text.get("attention_bias") else set()
    assert shared <= set(files)
    if layout == "multimodal":
        assert config["architectures"] == ["Gemma3nForConditionalGeneration"] and config["model_type"] == "gemma3n"
        assert config["text_config"]["model_type"] == "gemma3n_text"
        assert config["vision_config"]["vocab_offset"] == text["vocab_size_per_layer_input"]
        assert config["audio_config"]["vocab_offset"] == text["vocab_size_per_layer_input"] + 128
        model_class, stand_ins = Gemma3nForConditionalGeneration, set(gemma3n_checkpoint.TOWER_PLACEHOLDERS)
        embedders = {n for n in files if n.startswith(("model.embed_vision.", "model.embed_audio."))}
        assert len(embedders) == 8
    else:
        assert config["architectures"] == ["Gemma3nForCausalLM"] and config["model_type"] == "gemma3n_text"
        model_class, stand_ins, embedders = Gemma3nForCausalLM, set(), set()
    assert {n for n in files if n.startswith(TOWERS)} == stand_ins | embedders

    model, info = model_class.from_pretrained(path, output_loading_info=True, dtype=torch.float32)
    # The tower stand-ins are the only keys left over; the shared layers' K/V weights are dropped without a word.
    assert not info["missing_keys"] and not info["mismatched_keys"] and not info["error_msgs"]
    assert set(info["unexpected_keys"]) == stand_ins
    state = model.state_dict()
    assert set(files) - stand_ins - shared == set(state) - {"lm_head.weight"}
    for key in set(files) - stand_ins - shared:
        assert torch.equal(state[key], files[key].to(torch.float32)), key

    # 390: past the PLE vocabulary of 3n-shared (PLE row 0) and, in the multimodal model, a vision token
    ids = [2, 10, 11, 12, 13, 14, 15, 16, 17, 390 if text["vocab_size"] > 390 else 18]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    assert torch.isfinite(logits).all()
    assert 0.3 < logits.std() < 10
    assert (logits[1:] - logits[:-1]).abs().amax() > 0.1, "every position must get its own logits"


def test_gemma3n_named_configs_and_wrappers(tmp_path):
    e2b = make_checkpoint.load_config("gemma-3n-e2b")
    assert (e2b["model_type"], e2b["num_hidden_layers"], e2b["hidden_size"], e2b["num_kv_shared_layers"]) == (
        "gemma3n_text", 30, 2048, 10)
    assert make_checkpoint.load_config("GEMMA-3N-E4B")["num_hidden_layers"] == 35
    text = CONFIGS_3N["3n-unshared"]
    make_checkpoint.make_checkpoint(tmp_path / "mm", text)
    make_checkpoint.make_checkpoint(tmp_path / "causal", text, layout="causal")
    wrapper = make_checkpoint.load_config(tmp_path / "mm" / "config.json")
    assert wrapper == {k: v for k, v in make_checkpoint.load_config(tmp_path / "causal" / "config.json").items()
                       if k != "architectures"}
    assert make_checkpoint.tensor_shapes(wrapper) == make_checkpoint.tensor_shapes(text)
    # a wrapper whose text_config leaves model_type out takes it from the wrapper's
    bare = {"model_type": "gemma3n", "text_config": {k: v for k, v in text.items() if k != "model_type"}}
    (tmp_path / "bare.json").write_text(json.dumps(bare))
    assert make_checkpoint.load_config(tmp_path / "bare.json")["model_type"] == "gemma3n_text"


def test_gemma3n_bad_configs_are_refused_clearly(tmp_path):
    text = CONFIGS_3N["3n-shared"]
    with pytest.raises(ConfigError, match=r"intermediate_size has 5 entries for num_hidden_layers=6; give one per"):
        make_checkpoint.tensor_shapes(dict(text, intermediate_size=[64] * 5))
    with pytest.raises(ConfigError, match="num_kv_shared_layers=3"):  # layers 0-2: no full layer to reuse
        make_checkpoint.tensor_shapes(dict(text, num_kv_shared_layers=3, layer_types=[S, S, S, F, S, F]))
    with pytest.raises(ConfigError, match="tie_word_embeddings=false: Gemma 3n ties"):
        make_checkpoint.tensor_shapes(dict(text, tie_word_embeddings=False))
    with pytest.raises(ConfigError, match="model_type 'gemma3_text': expected one of"):
        make_checkpoint.make_checkpoint(tmp_path / "g3", dict(text, model_type="gemma3_text"))
    assert not (tmp_path / "g3").exists(), "a refused config writes nothing"


def test_gemma3n_cli(tmp_path):
    config = tmp_path / "text.json"
    config.write_text(json.dumps(CONFIGS_3N["3n-unshared"]))
    tool = [sys.executable, str(ROOT / "tools" / "make_checkpoint.py")]
    ok = subprocess.run([*tool, str(tmp_path / "out"), "--config", str(config), "--dtype", "f32", "--single-file"],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == [
        "Gemma3nForConditionalGeneration"]
    config.write_text(json.dumps(dict(CONFIGS_3N["3n-unshared"], intermediate_size=[64, 64])))
    bad = subprocess.run([*tool, str(tmp_path / "nope"), "--config", str(config)], capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr == ("error: intermediate_size has 2 entries for num_hidden_layers=5; "
                                                  "give one per layer or one for all\n")
    assert not (tmp_path / "nope").exists()
