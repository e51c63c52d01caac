"""tools/make_checkpoint.py writes what transformers itself would load: same names, shapes and layout."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

import make_checkpoint
from conftest import COMMON, CONFIGS, build_checkpoint
from export.checkpoint import Checkpoint


@pytest.mark.parametrize("name", list(CONFIGS))
def test_transformers_loads_it_without_missing_or_unexpected_keys(name, tmp_path):
    from transformers import Gemma4ForCausalLM, Gemma4ForConditionalGeneration

    path = build_checkpoint(tmp_path / name, name)
    layout = CONFIGS[name]["layout"]
    if layout == "causal":
        model, info = Gemma4ForCausalLM.from_pretrained(path, output_loading_info=True, dtype=torch.float32)
        assert not info["missing_keys"]
    else:
        model, info = Gemma4ForConditionalGeneration.from_pretrained(path, output_loading_info=True,
                                                                     dtype=torch.float32)
        tower = ("model.vision_tower", "model.audio_tower", "model.embed_vision", "model.embed_audio")
        assert not [k for k in info["missing_keys"] if not k.startswith(tower)]
    assert not [k for k in info["unexpected_keys"] if not k.startswith(("model.vision", "model.audio",
                                                                         "model.embed_vision", "model.embed_audio"))]
    with torch.no_grad():
        logits = model(torch.tensor([[2, 10, 11, 12]])).logits
    assert torch.isfinite(logits).all() and logits.std() > 0.01


def test_shards_index_and_dtypes(tmp_path):
    text = {**COMMON, **CONFIGS["shared-mqa-wide"]["text"]}
    sharded = make_checkpoint.make_checkpoint(tmp_path / "bf16", text, dtype="bf16", max_shard_bytes=40_000)
    single = make_checkpoint.make_checkpoint(tmp_path / "f32", text, dtype="f32", max_shard_bytes=None)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = sorted(sharded.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 2 and set(index["weight_map"].values()) == {p.name for p in shards}
    name = "model.language_model.layers.1.mlp.up_proj.weight"
    a = Checkpoint(sharded).tensor(name.removeprefix("model.language_model."))
    b = load_file(single / "model.safetensors")[name]
    assert b.dtype == np.float32
    # bf16 keeps the top 16 bits of the same seeded values (round to nearest even)
    np.testing.assert_allclose(a, b, rtol=2 ** -8, atol=0)
    other = load_file(single / "model.safetensors")["model.language_model.layers.2.mlp.up_proj.weight"]
    assert not np.array_equal(b, other), "each tensor must get its own random values"


def test_tokenizer_round_trips_with_gemma_ids(tmp_path):
    from tokenizers import Tokenizer

    path = build_checkpoint(tmp_path / "c", "shared-gqa")
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    text = "Return the list of values."
    encoding = tok.encode(text)
    assert encoding.ids[0] == 2 and tok.decode(encoding.ids, skip_special_tokens=True) == text
    assert [tok.token_to_id(t) for t in make_checkpoint.SPECIAL_TOKENS] == [0, 1, 2, 3, 4, 5]
    assert max(tok.get_vocab().values()) < CONFIGS["shared-gqa"]["text"]["vocab_size"]
    assert json.loads((path / "generation_config.json").read_text())["eos_token_id"] == [1, 5]


def test_real_e2b_shapes_match_the_published_parameter_count():
    shapes = make_checkpoint.tensor_shapes(make_checkpoint.load_config("e2b"))
    total = sum(int(np.prod(s)) for s in shapes.values())
    ple = int(np.prod(shapes["embed_tokens_per_layer.weight"]))
    assert ple == 262144 * 35 * 256
    assert abs(total / 1e9 - 4.629) < 0.005  # DESIGN.md: 4.629 B in all for E2B
