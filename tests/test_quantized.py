"""Quantized weights: codes decode within their rounding bound, the bytes are laid out exactly as the
onnxruntime kernels read them, quantized artifacts stay close to transformers, and on the bundled trained
model each format meets its perplexity budget."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import edge_runtime
from conftest import reference_model
from edge_runtime.artifact import read_manifest
from edge_runtime.bundled import BUNDLED_CHECKPOINT
from edge_runtime.engine import open_session
from edge_runtime.errors import ArtifactError, EdgeRuntimeError
from edge_runtime.export import export_checkpoint
from edge_runtime.export.onnx_graph import GraphBuilder, WeightsWriter
from edge_runtime.quant.integer import (
    dequantize_int4_blocks,
    dequantize_int8_blocks,
    dequantize_int8_rows,
    quantize_int4_blocks,
    quantize_int8_blocks,
    quantize_int8_rows,
)
from edge_runtime.weight_formats import weight_format


def test_int8_rows_round_to_the_nearest_step():
    w = np.random.default_rng(0).standard_normal((16, 100)).astype(np.float32)
    codes, scale = quantize_int8_rows(w)
    assert codes.dtype == np.int8 and np.abs(codes).max() == 127
    np.testing.assert_allclose(scale, np.abs(w).max(1) / 127, rtol=1e-6)
    assert (np.abs(dequantize_int8_rows(codes, scale) - w) <= scale[:, None] / 2 + 1e-7).all()


def test_int4_blocks_use_q4_0_grid_and_nibble_order():
    row = np.array([[1.0, -2.0, 0.5, 4.0] + [0.0] * 28], dtype=np.float32)
    packed, scale = quantize_int4_blocks(row, 32)
    assert packed.shape == (1, 1, 16) and scale.shape == (1, 1)
    assert scale[0, 0] == pytest.approx(-0.5)  # the extreme value 4.0 becomes code -8
    # codes + 8: 1.0 -> 6, -2.0 -> 12, 0.5 -> 7, 4.0 -> 0; even elements in the low nibble
    assert packed[0, 0, 0] == 6 | (12 << 4) and packed[0, 0, 1] == 7 | (0 << 4)
    np.testing.assert_array_equal(dequantize_int4_blocks(packed, scale, 32), row)


def test_int4_pads_rows_that_are_not_whole_blocks():
    w = np.random.default_rng(1).standard_normal((3, 40)).astype(np.float32)
    packed, scale = quantize_int4_blocks(w, 32)
    assert packed.shape == (3, 2, 16)
    back = dequantize_int4_blocks(packed, scale, 40)
    assert back.shape == (3, 40)
    assert (np.abs(back - w) <= np.abs(scale).repeat(32, axis=1)[:, :40] + 1e-6).all()


@pytest.mark.parametrize("fmt,block", [("fp16", 32), ("int8", 32), ("int4", 32), ("int4", 64), ("int4", 128),
                                       ("int8-block", 32), ("int8-block", 128)])
def test_kernels_read_the_layout_export_writes(fmt, block, tmp_path):
    """Inputs the kernels' activation quantizers represent exactly, so the graph must equal numpy exactly."""
    rng = np.random.default_rng(2)
    n, k = 48, 256
    w = rng.standard_normal((n, k)).astype(np.float32)
    x = rng.integers(-127, 128, (3, k)).astype(np.float32)
    x[:, ::block] = 127.0  # every activation block (int8's: the row) has max |x| = 127: int8 scale 1
    with WeightsWriter(tmp_path / "weights.bin") as writer:
        g = GraphBuilder("one", writer)
        g.output(g.linear(g.input("x", ["T", k]), "w", w, weight_format(fmt, block)), "y", ["T", n])
        g.save(tmp_path / "one.onnx")
    own = ("its weights are", "use another format") if weight_format(fmt, block).own_operator else None
    got = open_session(tmp_path / "one.onnx", own_ops=own).run(None, {"x": x})[0]
    if fmt == "fp16":
        expected = x.astype(np.float16).astype(np.float64) @ w.astype(np.float16).astype(np.float64).T
        np.testing.assert_allclose(got, expected, rtol=2e-3, atol=0.5)
        return
    if fmt == "int8":
        codes, scale = quantize_int8_rows(w)
        dequant = dequantize_int8_rows(codes, scale)
    elif fmt == "int8-block":
        codes, scale = quantize_int8_blocks(w, block)
        dequant = dequantize_int8_blocks(codes, scale, k)
    else:  # float16 scales
        packed, scale = quantize_int4_blocks(w, block, np.dtype(np.float16))
        dequant = dequantize_int4_blocks(packed, scale, k)
    expected = x.astype(np.float64) @ dequant.astype(np.float64).T
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-3 * np.abs(expected).max())


# Against transformers' fp32 model of the bundled trained checkpoint (realistic activations; random weights
# amplify quantization noise layer after layer and say little): (relative RMS error of the logits, least
# top-1 agreement). Measured on the chat-trained model (x86): fp16 1.5e-4 / 1.0; int8 8.5e-3 prefill and decode /
# 0.985-0.99 (MatMulInt8, activations per row; per tensor before stop 33: 1.5e-2 prefill, 7e-3 decode); int4 5.8e-2 (block 32) to 6.6e-2 (block 128) / 0.945-0.955; the int4-mixed recipe (qkv and the
# per-layer-input projections in int8) 5.0e-2 (block 32) to 5.9e-2 (block 128) / 0.945-0.96; int8-block 6.0e-3
# (block 32) to 7.6e-3 (block 128) / 0.985-0.995. int4-mixed's bound was 6e-2 for the plain-text model, whose
# figure the chat-trained one came within 1% of: 7e-2 keeps int4's margin. (The plain-text model
# before it: fp16 1.3e-4; int8 1.4e-2 / 6e-3; int4 4.8e-2 to 5.5e-2; int4-mixed 4.1e-2 to 4.8e-2.)
BOUNDS = {("fp16", 32): (5e-4, 1.0), ("int8", 32): (3e-2, 0.95), ("int4", 32): (8e-2, 0.85),
          ("int4", 128): (8e-2, 0.85), ("int4-mixed", 32): (7e-2, 0.88), ("int4-mixed", 128): (7e-2, 0.88),
          ("int8-block", 32): (1.5e-2, 0.97), ("int8-block", 128): (1.5e-2, 0.97)}


@pytest.fixture(scope="module")
def bundled_fp32_artifact(tmp_path_factory) -> Path:
    return export_checkpoint(BUNDLED_CHECKPOINT, tmp_path_factory.mktemp("bundled") / "fp32")


@pytest.fixture(scope="module")
def trained_reference(bundled_fp32_artifact):
    model = edge_runtime.load(bundled_fp32_artifact)
    ids = np.asarray(model.encode((BUNDLED_CHECKPOINT / "heldout.txt").read_text()[5000:9000])[:200])
    with torch.no_grad():
        return ids, reference_model(BUNDLED_CHECKPOINT)(torch.tensor(ids)[None]).logits[0].numpy()


@pytest.mark.parametrize("fmt,block", list(BOUNDS))
def test_quantized_logits_stay_close_to_transformers(fmt, block, trained_reference, tmp_path):
    ids, expected = trained_reference
    model = edge_runtime.load(export_checkpoint(BUNDLED_CHECKPOINT, tmp_path / "a", weights=fmt, block_size=block),
                              prefill_chunk=64, kv="fp32")
    bound, agreement = BOUNDS[fmt, block]
    for mode in ("prefill", "decode"):
        got = model.logits(ids, mode=mode)
        error = float(np.sqrt(np.mean((got - expected) ** 2) / np.mean(expected ** 2)))
        top1 = float((got.argmax(1) == expected.argmax(1)).mean())
        print(f"{fmt} block {block} {mode}: relative RMS error {error:.2e}, top-1 agreement {top1:.3f}")
        assert 0 < error <= bound and top1 >= agreement


def test_quantized_artifact_sizes(checkpoints, tmp_path):
    """Weights shrink by the format's bits (int4 block 32: 4 bits + a 32-bit scale per 32 weights)."""
    sizes = {}
    for fmt in ("fp32", "fp16", "int8", "int4", "int8-block"):
        manifest = read_manifest(export_checkpoint(checkpoints["shared-gqa"], tmp_path / fmt, weights=fmt))
        sizes[fmt] = manifest.read_per_token["weights"]
        assert manifest.formats["weights"] == fmt
    assert sizes["fp16"] / sizes["fp32"] == pytest.approx(0.5, abs=0.03)
    assert sizes["int8"] / sizes["fp32"] == pytest.approx(0.25, abs=0.03)
    assert sizes["int4"] / sizes["fp32"] == pytest.approx(5 / 32, abs=0.03)
    assert sizes["int8-block"] / sizes["fp32"] == pytest.approx(9 / 32, abs=0.03)  # 8 bits + a 32-bit scale per 32


HELDOUT_TOKENS = 512  # the bundled model's whole context
# Perplexity budgets of the issue, relative to fp32, on the bundled trained model.
BUDGETS = [("int8", 32, "fp32", 0.01), ("int8-block", 128, "fp32", 0.01), ("int4", 32, "fp32", 0.05),
           ("int4-mixed", 32, "fp32", 0.05),
           ("fp32", 32, "int8", 0.005)]


def _perplexity(path: Path, text: str) -> tuple[float, np.ndarray]:
    model = edge_runtime.load(path)
    ids = np.asarray(model.encode(text)[:HELDOUT_TOKENS])
    logits = model.logits(ids).astype(np.float64)
    top = logits.max(1, keepdims=True)
    log_probs = logits - top - np.log(np.exp(logits - top).sum(1, keepdims=True))
    return float(np.exp(-log_probs[np.arange(len(ids) - 1), ids[1:]].mean())), logits.argmax(1)


@pytest.fixture(scope="module")
def bundled_fp32(bundled_fp32_artifact):
    text = (BUNDLED_CHECKPOINT / "heldout.txt").read_text()
    return text, *_perplexity(bundled_fp32_artifact, text)


@pytest.mark.parametrize("weights,block,ple,budget", BUDGETS)
def test_bundled_model_quality_budget(weights, block, ple, budget, bundled_fp32, tmp_path):
    text, base, base_top = bundled_fp32
    path = export_checkpoint(BUNDLED_CHECKPOINT, tmp_path / "a", weights=weights, block_size=block, ple=ple)
    ppl, top = _perplexity(path, text)
    print(f"weights {weights} ple {ple}: perplexity {ppl:.3f} vs fp32 {base:.3f} ({ppl / base - 1:+.2%}), "
          f"top-1 agreement {(top == base_top).mean():.3f}")
    assert ppl != base and ppl <= base * (1 + budget)


@pytest.mark.parametrize("option,value,message", [
    ("weights", "int3", "--weights int3: not available; choose one of fp32, fp16, int8, int4, int8-block"),
    ("block_size", 48, "--block-size 48: not available; choose one of 32, 64, 128"),
    ("ple", "int2", "--ple int2: not available; choose auto or one of fp32, bf16, fp16, int8, int4"),
])
def test_unknown_formats_are_refused(option, value, message, checkpoints, tmp_path):
    with pytest.raises(EdgeRuntimeError, match=message):
        export_checkpoint(checkpoints["shared-gqa"], tmp_path / "a", **{option: value})
    assert not (tmp_path / "a").exists()


def test_runtime_refuses_unknown_weight_format(artifacts, tmp_path):
    import json
    import shutil

    path = shutil.copytree(artifacts["shared-gqa"], tmp_path / "a")
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["formats"]["weights"] = "int2"
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="weight format 'int2' is not supported by this runtime"):
        edge_runtime.load(path)



def test_an_uncached_prompt_answers_as_a_fresh_model_does_despite_batch_dependent_kernels(tmp_path, monkeypatch):
    """onnxruntime's float32 Gemm sums in another order for another number of rows, so a prompt run after a cached
    prefix gets other logits than run whole; cache_prompt=False must give the fresh model's bits exactly."""
    path = export_checkpoint(BUNDLED_CHECKPOINT, tmp_path / "fp32", weights="fp32")
    fresh, used = (edge_runtime.load(path, profile=None, kv="fp32") for _ in range(2))
    prompt = fresh.encode("The sea is wide and the light of the lighthouse turns all night")
    expected = fresh.feed(prompt)[-1]  # the path a generation takes: later layers run the last position only
    seen, sampler = [], used.sampler

    def recording(*args, **kwargs):
        sample = sampler(*args, **kwargs)
        return lambda logits, history: seen.append(logits.copy()) or sample(logits, history)

    monkeypatch.setattr(used, "sampler", recording)
    for cache_prompt, cached in ((True, 5), (False, 0)):
        used.logits(prompt[:5])  # leaves a 5-token prefix in the cache
        list(used.generate_tokens(prompt, max_new_tokens=1, temperature=0, cache_prompt=cache_prompt))
        assert used.stats.cached_tokens == cached
    reused, whole = seen
    assert not np.array_equal(reused, expected) and np.abs(reused - expected).max() < 0.5
    assert np.array_equal(whole, expected)
