"""KV cache formats: every format runs through the sliding ring and KV sharing, its logits stay as close to the
exact cache as its width allows, attention reads codes without decoding them, sizes match the issue's budget,
and bad names are refused."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

import edge_runtime
from edge_runtime.cli import app
from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.kv_formats import KV_FORMATS, ROLLBACK_TOKENS, kv_format

TEXT_SLICE = slice(2000, 6000)
# Relative RMS logit error against the exact (fp32) cache on the bundled trained model, 200 held-out tokens fed
# one at a time (so every past token is read from the codes). Measured: see the test's printout and the README.
BOUNDS = {"fp16": 1e-3, "int8": 0.01, "qjl": 0.3,
          "tq4": 0.06, "tq3.5": 0.06, "tq3": 0.09, "tq2.5": 0.11,
          "tq4-mse": 0.07, "tq3.5-mse": 0.07, "tq3-mse": 0.10, "tq2.5-mse": 0.12,
          "tq4-prod": 0.12, "tq3.5-prod": 0.13, "tq3-prod": 0.18, "tq2.5-prod": 0.18}


@pytest.fixture(scope="module")
def bundled(tmp_path_factory):
    from edge_runtime.bundled import BUNDLED_CHECKPOINT
    from edge_runtime.export import export_checkpoint

    artifact = export_checkpoint(BUNDLED_CHECKPOINT, tmp_path_factory.mktemp("kv") / "bundled")
    exact = edge_runtime.load(artifact, kv="fp32")
    ids = np.asarray(exact.encode((BUNDLED_CHECKPOINT / "heldout.txt").read_text()[TEXT_SLICE])[:200])
    return artifact, ids, exact.logits(ids, mode="decode")


def test_every_format_is_listed_in_the_bounds():
    assert set(KV_FORMATS) == {"fp32", *BOUNDS}


@pytest.mark.parametrize("name", list(BOUNDS))
def test_logits_stay_close_to_the_exact_cache(name, bundled):
    artifact, ids, expected = bundled
    got = edge_runtime.load(artifact, kv=name, kv_recent=0, kv_sliding=name).logits(ids, mode="decode")
    error = float(np.sqrt(np.mean((got - expected) ** 2) / np.mean(expected ** 2)))
    top1 = float((got.argmax(1) == expected.argmax(1)).mean())
    print(f"kv {name}: relative RMS logit error {error:.4f}, top-1 agreement {top1:.3f}")
    assert 0 < error <= BOUNDS[name]


def test_unbiased_keys_beat_the_papers_mse_and_prod_keys(bundled):
    """Why tqN means norm-corrected codes: at every width they track the exact cache more closely than the
    paper's MSE codes (which shrink every score by 1 - D) and its prod keys (unbiased, but QJL's variance)."""
    artifact, ids, expected = bundled

    def error(name: str) -> float:
        got = edge_runtime.load(artifact, kv=name, kv_recent=0, kv_sliding=name).logits(ids[:120], mode="decode")
        return float(np.sqrt(np.mean((got - expected[:120]) ** 2) / np.mean(expected[:120] ** 2)))

    for bits in ("4", "3.5", "3", "2.5"):
        unbiased, mse, prod = error(f"tq{bits}"), error(f"tq{bits}-mse"), error(f"tq{bits}-prod")
        print(f"tq{bits}: unbiased {unbiased:.4f}, mse {mse:.4f}, prod {prod:.4f}")
        assert unbiased < mse < prod


@pytest.mark.parametrize("config", ["shared-mqa-wide", "shared-gqa", "3n-multimodal", "3n-causal"])
def test_recent_window_covering_everything_is_exact(config, artifacts):
    """With every token in the exact recent ring, no code is read: tq2.5 must equal the fp32 cache, through
    sliding rings (3x their window) and KV sharing, in prefill chunks and in decode."""
    model = edge_runtime.load(artifacts[config], kv="fp32", prefill_chunk=5)
    ids = np.arange(3, 3 + 40)
    for mode in ("prefill", "decode"):
        expected = model.logits(ids, mode=mode)
        recent = edge_runtime.load(artifacts[config], kv="tq2.5", kv_recent=64, kv_sliding="tq2.5", prefill_chunk=5)
        np.testing.assert_allclose(recent.logits(ids, mode=mode), expected, atol=5e-5)  # summation order only
        coded = edge_runtime.load(artifacts[config], kv="tq2.5", kv_recent=0, kv_sliding="tq2.5", prefill_chunk=5)
        assert np.abs(coded.logits(ids, mode=mode) - expected).max() > 1e-3


def test_a_small_recent_window_reads_old_tokens_from_codes(artifacts):
    """kv_recent=4 reads only the last 4 tokens exactly: between the coded cache and the all-exact one."""
    ids = np.arange(3, 3 + 40)
    exact = edge_runtime.load(artifacts["shared-gqa"], kv="fp32").logits(ids, mode="decode")
    errors = [np.abs(edge_runtime.load(artifacts["shared-gqa"], kv="tq2.5", kv_recent=r, kv_sliding="tq2.5")
                     .logits(ids, mode="decode") - exact).max() for r in (0, 4, 64)]
    assert errors[0] > errors[2] and errors[1] > errors[2] and errors[2] < 5e-5


def test_attention_never_decodes_the_cache(artifacts, monkeypatch):
    from edge_runtime.quant import turboquant

    def refuse(self, codes):
        raise AssertionError("attention decoded a block of the cache to floats")

    for codec in (turboquant.TurboQuantizer, turboquant.QJLQuantizer, turboquant.ChannelSplit):
        monkeypatch.setattr(codec, "decode", refuse)
    ids = np.arange(3, 3 + 30)
    for name in ("tq3.5", "tq3-prod", "qjl"):
        model = edge_runtime.load(artifacts["shared-gqa"], kv=name, kv_sliding=name)
        assert np.isfinite(model.logits(ids, mode="decode")).all()


def test_cache_bytes_match_the_format(artifacts):
    model = edge_runtime.load(artifacts["shared-mqa-wide"], kv="tq3.5", kv_recent=0, kv_sliding="tq3.5")
    spec = model.spec
    model.logits(np.arange(3, 3 + 20), mode="decode")
    cache = model.engine.cache
    full = [i for i in spec.cache_layers() if spec.layer_types[i] == "full_attention"]
    expected = sum(kv_format("tq3.5").bytes_per_token(spec.head_dims[i]) * spec.num_key_value_heads * cache.length
                   for i in full)
    sliding = [i for i in spec.cache_layers() if spec.layer_types[i] == "sliding_attention"]
    expected += sum(kv_format("tq3.5").bytes_per_token(spec.head_dims[i]) * spec.num_key_value_heads
                    * min(cache.length, spec.sliding_window + ROLLBACK_TOKENS) for i in sliding)
    assert sum(cache.bytes_read(i) for i in spec.cache_layers()) == expected


@pytest.mark.parametrize("dim", [256, 512])
def test_e2b_bytes_per_token_against_fp16(dim):
    """The issue's budget: tq3.5 at most 0.25 of fp16, everything (codes, norms) included."""
    fp16 = kv_format("fp16").bytes_per_token(dim)
    assert fp16 == 4 * dim
    ratios = {name: kv_format(name).bytes_per_token(dim) / fp16 for name in KV_FORMATS}
    print(dim, {k: round(v, 3) for k, v in ratios.items()})
    assert ratios["tq3.5"] <= 0.25
    assert ratios["tq2.5"] < ratios["tq3"] < ratios["tq3.5"] < ratios["tq4"] < ratios["int8"] < 1


def test_compressed_formats_keep_recent_tokens_exact_by_default(artifacts):
    assert edge_runtime.load(artifacts["shared-gqa"], kv="tq3.5").engine.cache.recent == 32
    assert edge_runtime.load(artifacts["shared-gqa"], kv="qjl").engine.cache.recent == 32
    assert edge_runtime.load(artifacts["shared-gqa"], kv="fp16").engine.cache.recent == 0
    assert edge_runtime.load(artifacts["shared-gqa"], kv="tq3.5", kv_recent=0).engine.cache.recent == 0


def test_unknown_format_is_refused(artifacts):
    with pytest.raises(EdgeRuntimeError, match=r"kv='tq9': not a KV cache format; choose one of fp32, fp16, int8"):
        edge_runtime.load(artifacts["shared-gqa"], kv="tq9")
    with pytest.raises(EdgeRuntimeError, match="kv_recent=-1: must be 0 or more"):
        edge_runtime.load(artifacts["shared-gqa"], kv_recent=-1)
    result = CliRunner().invoke(app, ["run", "hi", "-m", str(artifacts["shared-gqa"]), "--kv", "tq9"])
    assert result.exit_code == 1
    assert "error: kv='tq9': not a KV cache format" in result.output


@pytest.mark.parametrize("name,recent", [("fp16", 0), ("tq3.5", 16), ("qjl", 4)])
def test_predicted_cache_bytes_equal_what_the_cache_holds(name, recent, artifacts):
    """kv_format(...).cache_bytes (what the planner and tools/kv_sizes.py print) against the allocated arrays."""
    for sliding in (name, "fp32"):
        model = edge_runtime.load(artifacts["shared-gqa"], kv=name, kv_recent=recent, kv_sliding=sliding)
        model.feed(np.arange(3, 3 + 256))  # a multiple of the 256-slot growth step: nothing allocated ahead
        expected = kv_format(name).cache_bytes(model.spec, 256, recent, kv_format(sliding))
        assert model.kv_cache_bytes == expected


@pytest.mark.parametrize("name, dim, rotations", [("tq4", 512, ["hadamard"]), ("tq3.5", 512, ["hadamard"] * 2),
                                                  ("tq3.5", 256, ["hadamard"] * 2), ("tq2.5", 128, ["haar"] * 2),
                                                  ("tq4", 64, ["haar"]), ("tq4-prod", 80, ["haar"])])
def test_turboquant_rotates_gemmas_head_widths_by_hadamard_and_narrow_or_odd_ones_by_haar(name, dim, rotations):
    from edge_runtime.kv_formats import HADAMARD_MIN_WIDTH
    from edge_runtime.quant.turboquant import is_power_of_two

    codec = kv_format(name).keys.build(dim, np.random.default_rng(0).standard_normal((16, dim)))
    halves = [codec.hi, codec.lo] if hasattr(codec, "hi") else [codec]
    assert ["haar" if h.hadamard is None else "hadamard" for h in halves] == rotations
    for half in halves:
        assert (half.hadamard is not None) == (half.dim >= HADAMARD_MIN_WIDTH and is_power_of_two(half.dim))
        parts = half.parts(half.encode(np.ones((2, half.dim), np.float32)))
        assert (parts[0].hadamard is half.hadamard) and parts[0].transform is half.rotation


def test_sliding_rings_default_to_fp16_exact_beside_exact_full_layers_and_take_any_format(artifacts):
    from edge_runtime.quant.float_codecs import Float16Codec, Float32Codec
    from edge_runtime.quant.turboquant import ChannelSplit

    # the recent ring each layer type keeps: none beside an exact format or a near-exact sliding one of its own
    for kv, sliding, codec, full, rings in (("tq3.5", None, Float16Codec, ChannelSplit, (32, 0)),
                                            ("fp32", None, Float32Codec, Float32Codec, (0, 0)),
                                            ("tq3.5", "tq3.5", ChannelSplit, ChannelSplit, (32, 32)),
                                            ("tq3.5", "fp32", Float32Codec, ChannelSplit, (32, 0))):
        model = edge_runtime.load(artifacts["shared-gqa"], kv=kv, **({} if sliding is None else
                                                                     {"kv_sliding": sliding}))
        model.feed(np.arange(3, 3 + 20))
        spec, cache = model.spec, model.engine.cache
        for i in spec.cache_layers():
            expected = codec if spec.layer_types[i] == "sliding_attention" else full
            assert all(isinstance(s.codec, expected) for s in (*cache.stores[i].keys, *cache.stores[i].values))
        assert (cache.recent_of["full_attention"], cache.recent_of["sliding_attention"]) == rings
        assert model.kv_cache_bytes == model.kv_format.cache_bytes(spec, 256, model.kv_recent, model.kv_sliding_format)


@pytest.mark.parametrize("kv, recent", [("fp16", None), ("int8", None), ("tq3.5", 4), ("tq3.5", 0)])
def test_a_prompt_run_at_once_reads_its_own_tokens_as_it_would_after_a_cached_prefix(artifacts, kv, recent):
    """A token reads itself and the `recent` positions before it exactly and older ones through their codes, however
    the tokens came. So a prompt's last token gives the same logits run in the prompt's chunk as run alone after the
    cached rest (what a second call with the same prompt does), to float32 precision: 1.2e-6 to 3.2e-6 here, where a
    chunk used to read its own tokens exactly and the two differed by the format's error (fp16 0.9e-3 to 2.3e-3, int8
    0.03 to 0.04, tq3.5 0.28 to 0.59), and seeded replies changed on a second call far more often."""
    model = edge_runtime.load(artifacts["shared-gqa"], kv=kv, kv_recent=recent, kv_sliding=kv)
    ids = list(range(3, 3 + 40))
    for n in (12, 25, 40):
        model.reset()
        fresh = model.engine.forward(np.array(ids[:n]), False)
        kept = model.engine.reuse(ids[:n])
        assert kept == n - 1
        again = model.engine.forward(np.array(ids[kept:n]), False)
        assert np.abs(again - fresh).max() < 2e-5


def test_a_second_call_with_the_same_prompt_keeps_what_the_first_stored_for_its_last_token(artifacts):
    """A step must run a token to give logits, so a second call with a cached prompt runs its last token again; it
    keeps the keys and values the first call stored for it (computed in the prompt's batch, where onnxruntime's sums
    round otherwise), so every later token reads what the first call's later tokens read: the exact recent ring holds
    the very same floats, and seeded replies repeat themselves (seeds of 30 whose 40-token reply changed on a second
    call before: fp16 2, int8 14; with only the chunk fix above, int8 and tq3.5 2 each; now none)."""
    prompt = "the quick brown fox jumps over"
    model = edge_runtime.load(artifacts["shared-gqa"], kv="tq3.5", kv_recent=4)
    ids = model.encode(prompt)
    model.reset()
    model.engine.forward(np.array(ids + [7, 8]), False)  # the first call's prompt and two generated tokens
    cache, last = model.engine.cache, len(ids) - 1
    ring = last % cache.recent_slots

    def stored() -> list[np.ndarray]:
        return [s.data["values"][ring].copy() for store in cache.stores.values()
                for s in (*store.recent_keys, *store.recent_values) if len(s.data["values"])]  # full layers

    first = stored()
    assert model.engine.reuse(ids) == last
    model.engine.forward(np.array(ids[last:]), False)
    assert all(np.array_equal(a, b) for a, b in zip(first, stored(), strict=True)) and first
    for kv in ("fp16", "int8", "tq3.5"):
        model = edge_runtime.load(artifacts["shared-gqa"], kv=kv)
        for seed in range(8):
            model.reset()
            reply = model.generate(prompt, max_new_tokens=24, temperature=1.0, seed=seed)
            assert model.generate(prompt, max_new_tokens=24, temperature=1.0, seed=seed) == reply
