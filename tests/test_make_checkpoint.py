"""tools/make_checkpoint.py writes what transformers itself builds and loads: same names, shapes, layout.

The tool derives tensor names and shapes from the config alone; these tests hold that description against
transformers' own Gemma4 models (built on the meta device, so even the real E2B/E4B shapes cost nothing) and
load the written files with `from_pretrained`, the path a published checkpoint takes.
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
    with pytest.raises(ConfigError, match="'e3b': no such file .*e2b or e4b"):
        make_checkpoint.load_config("e3b")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ConfigError, match="not valid JSON"):
        make_checkpoint.load_config(tmp_path / "broken.json")
    (tmp_path / "llama.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    with pytest.raises(ConfigError, match="not a Gemma 4 config"):
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
