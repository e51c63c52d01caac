"""fp32 artifacts with an fp32 KV cache against transformers' Gemma4ForCausalLM or Gemma3nForCausalLM (eager,
float32): logits within 1e-4 max-abs in prefill (one chunk and many) and decode modes, and identical greedy tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import edge_runtime
from conftest import CONFIGS, reference_model

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def references(checkpoints):
    return {name: reference_model(path) for name, path in checkpoints.items()}


def _tokens(name: str, length: int, seed: int = 0) -> np.ndarray:
    """BOS and random ids over all the model can take: Gemma 3n's multimodal layout leaves out its image and audio
    ids (refused: tests/test_gemma3n.py), its causal layout keeps the ids past its PLE table (PLE row 0)."""
    text = CONFIGS[name]["text"]
    mm = CONFIGS[name]["layout"] == "multimodal" and text.get("model_type") == "gemma3n_text"
    vocab = text["vocab_size_per_layer_input"] if mm else text["vocab_size"]
    rng = np.random.default_rng(seed)
    return np.concatenate([[2], rng.integers(3, vocab, length - 1)])


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("mode,chunk", [("prefill", 256), ("prefill", 7), ("decode", 1)])
def test_logits_match_transformers(name, mode, chunk, artifacts, references):
    window = CONFIGS[name]["text"]["sliding_window"]
    ids = _tokens(name, 3 * window + 11)
    with torch.no_grad():
        expected = references[name](torch.tensor(ids)[None]).logits[0].numpy()
    model = edge_runtime.load(artifacts[name], prefill_chunk=chunk, kv="fp32")
    got = model.logits(ids, mode=mode)
    assert got.shape == expected.shape and got.dtype == np.float32
    error = float(np.abs(got - expected).max())
    print(f"{name} {mode} chunk={chunk}: max abs error {error:.2e} (logits up to {np.abs(expected).max():.2f})")
    assert error <= TOLERANCE


@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_tokens_match_transformers(name, artifacts, references):
    model = edge_runtime.load(artifacts[name], prefill_chunk=5, kv="fp32")
    prompt = _tokens(name, 2 * CONFIGS[name]["text"]["sliding_window"], seed=1).tolist()
    eos = sorted(model.eos_token_ids)
    unsampled = list(range(model.spec.input_vocab_size, model.spec.vocab_size)) or None  # as the runtime does
    with torch.no_grad():
        out = references[name].generate(torch.tensor([prompt]), max_new_tokens=30, do_sample=False,
                                         eos_token_id=eos, pad_token_id=0, suppress_tokens=unsampled)
    expected = [t for t in out[0, len(prompt):].tolist()]
    if expected and expected[-1] in eos:
        expected = expected[:-1]
    got = list(model.generate_tokens(prompt, max_new_tokens=30, temperature=0))
    assert got == expected
    assert len(got) > 3


def test_trained_bundled_model_matches_transformers(tmp_path):
    """The trained default model on its held-out text (past 2x its 128-token window), both modes."""
    from transformers import Gemma4ForCausalLM

    from edge_runtime.bundled import BUNDLED_CHECKPOINT
    from edge_runtime.export import export_checkpoint

    artifact = export_checkpoint(BUNDLED_CHECKPOINT, tmp_path / "bundled")
    model = edge_runtime.load(artifact, prefill_chunk=100, kv="fp32")
    ids = model.encode((BUNDLED_CHECKPOINT / "heldout.txt").read_text()[:4000])[:300]
    reference = Gemma4ForCausalLM.from_pretrained(BUNDLED_CHECKPOINT, dtype=torch.float32,
                                                  attn_implementation="eager").eval()
    with torch.no_grad():
        expected = reference(torch.tensor([ids])).logits[0].numpy()
    for mode in ("prefill", "decode"):
        error = float(np.abs(model.logits(ids, mode=mode) - expected).max())
        print(f"bundled {mode}: max abs error {error:.2e} over {len(ids)} tokens")
        assert error <= TOLERANCE
