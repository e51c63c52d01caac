"""The cost model's arithmetic: its figures follow from the profile's facts and the shapes, the bytes and products it
counts are the ones the runtime reads and runs, and `plan` / `profiles show` print them labelled as an estimate.
(No timing here: tools/cost_model_check.py compares the estimate with the bench.)"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import edge_runtime
from edge_runtime import cost_model
from edge_runtime.cost_model import (
    LABEL,
    PREFILL_EFFICIENCY,
    SHORT_CONTEXT,
    SUSTAINED_SHARE,
    estimate,
    format_estimates,
    profile_estimates,
)
from edge_runtime.device_profiles import PROFILE_DIR
from edge_runtime.kv_formats import kv_format
from edge_runtime.planner import (
    known_models,
    linear_macs,
    linear_macs_by_format,
    read_per_token,
    read_per_token_by_format,
)
from edge_runtime.profiles import load_profile

E2B, E4B = known_models()["Gemma 4 E2B"], known_models()["Gemma 4 E4B"]
FORMATS = dict(weights="int4", block_size=128, ple="int4", kv="tq3.5", kv_recent=32, kv_sliding="fp32")


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge_runtime", *args], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ))


def speeds(profile, spec=E2B, contexts=(SHORT_CONTEXT, 32768), **changes):
    e = estimate(spec, profile, contexts=contexts, **{**FORMATS, **changes})
    return [d.tokens_per_second for d in e.decode], e.prefill_tokens_per_second


def attention_seconds(reads, profile) -> float:
    """The cache's part of a step, as the module docstring states it: its bytes' read or the kernel's arithmetic."""
    arithmetic = ((reads.values - reads.packed) / cost_model.ATTENTION_VALUES_PER_CYCLE
                  + reads.packed / cost_model.PACKED_VALUES_PER_CYCLE) / (profile.threads * profile.clock_ghz * 1e9)
    return max(reads.bytes / (profile.sustained_gb_s * 1e9), arithmetic)


def test_decode_is_the_sum_of_its_terms():
    pi5 = load_profile("pi5-8gb")
    model_bytes = sum(read_per_token(E2B, "int4", 128, "int4").values())
    rate = pi5.sustained_gb_s * 1e9
    for kv, context in (("tq3.5", 4096), ("tq3.5", 32768), ("fp16", 4096), ("fp16", 32768)):
        e = estimate(E2B, pi5, contexts=(context,), **{**FORMATS, "kv": kv})
        reads = kv_format(kv).attention_reads(E2B, context, 32, kv_format("fp32"))
        seconds = model_bytes / (cost_model.DECODE_EFFICIENCY["int4"] * rate) + attention_seconds(reads, pi5)
        assert e.decode[0].tokens_per_second == pytest.approx(1 / seconds, rel=1e-12)
        assert (e.bytes_per_token, e.decode[0].kv_bytes_per_token) == (model_bytes, reads.bytes)
    # on the Pi 5, fp16's cache at 32k is read at the bandwidth's pace, tq3.5's codes at the arithmetic's
    for kv, bound_by_bytes in (("fp16", True), ("tq3.5", False)):
        reads = kv_format(kv).attention_reads(E2B, 32768, 32, kv_format("fp32"))
        assert (attention_seconds(reads, pi5) == reads.bytes / rate) is bound_by_bytes


def test_attention_reads_count_packed_codes_apart():
    """Packed codes (TurboQuant, QJL) are the full layers' keys and values in those formats, never the exact recent
    ring or float sliding rings: each kind goes through the kernel at its own rate."""
    fp32 = kv_format("fp32")
    full = sum(E2B.num_key_value_heads * 2 * E2B.head_dims[i] for i in E2B.kv_sources
               if E2B.window(E2B.layer_types[i]) is None)
    assert kv_format("fp16").attention_reads(E2B, 4096, 0, kv_format("fp16")).packed == 0
    for kv in ("tq3.5", "tq2.5-prod", "qjl"):
        reads = kv_format(kv).attention_reads(E2B, 4096, 32, fp32)
        assert reads.packed == 4096 * full < reads.values, kv
    own = kv_format("tq3.5").attention_reads(E2B, 4096, 32)  # the sliding rings in tq3.5 too
    assert reads.packed < own.packed < own.values


def test_bandwidth_and_clock_scale_decode_and_prefill():
    pi5 = load_profile("pi5-8gb")
    (short, long), prefill = speeds(pi5)
    (short2, long2), prefill2 = speeds(dataclasses.replace(pi5, sustained_gb_s=2 * pi5.sustained_gb_s,
                                                           peak_gb_s=2 * pi5.peak_gb_s, clock_ghz=2 * pi5.clock_ghz))
    assert (short2, long2, prefill2) == pytest.approx((2 * short, 2 * long, 2 * prefill), rel=1e-12)
    (short_bw, long_bw), prefill_bw = speeds(dataclasses.replace(pi5, sustained_gb_s=2 * pi5.sustained_gb_s))
    assert prefill_bw == prefill  # prefill is bound by arithmetic, not bytes
    assert short_bw == pytest.approx(2 * short, rel=1e-12)  # a short cache is read at the bandwidth's pace
    assert long < long_bw < 2 * long  # tq3.5's codes at 32k at the kernel's: its arithmetic does not scale
    assert speeds(dataclasses.replace(pi5, int8_macs_per_cycle=64))[1] == pytest.approx(2 * prefill, rel=1e-12)
    assert speeds(dataclasses.replace(pi5, threads=2))[1] == pytest.approx(prefill / 2, rel=1e-12)
    assert long < short  # the cache read grows with the context


def test_fewer_bytes_decode_faster_and_kv_formats_count():
    pi5 = load_profile("pi5-8gb")
    int4 = sum(read_per_token(E2B, "int4", 128, "int4").values())
    int8 = sum(read_per_token(E2B, "int8", 0, "int8").values())
    assert int4 < 0.55 * int8
    assert speeds(pi5)[0][0] > speeds(pi5, weights="int8", ple="int8")[0][0]
    assert speeds(pi5, spec=E4B)[0][0] < speeds(pi5)[0][0]  # E4B reads twice E2B's bytes
    tq, fp16 = speeds(pi5, contexts=(32768,))[0][0], speeds(pi5, contexts=(32768,), kv="fp16", kv_recent=0)[0][0]
    assert tq > fp16  # tq3.5 reads 0.23x fp16's KV bytes


def test_linear_macs_are_the_published_parameters_read_per_token():
    """DESIGN.md's table: E2B reads 2.280 B parameters per token (all but PLE), E4B 4.644 B; every one is a
    multiply-accumulate of a decode step, bar the norms (and the embedding row, which is looked up)."""
    for spec, billions in ((E2B, 2.280), (E4B, 4.644)):
        every, last = linear_macs(spec)
        assert (every + last) / 1e9 == pytest.approx(billions, rel=0.002)
        assert last > spec.vocab_size * spec.hidden_size  # the head, and the KV-shared layers


def test_prefill_counts_the_last_position_graphs_once_per_chunk():
    pi5 = load_profile("pi5-8gb")
    every, last = linear_macs(E2B)
    rate = pi5.threads * pi5.int8_macs_per_cycle * pi5.clock_ghz * 1e9 * PREFILL_EFFICIENCY["int4"]
    for prompt, chunks in ((1, 1), (128, 1), (256, 1), (257, 2)):
        e = estimate(E2B, pi5, contexts=(prompt,), prompt_tokens=prompt, **FORMATS)
        assert e.prefill_tokens_per_second == pytest.approx(prompt * rate / (prompt * every + chunks * last))


def test_without_a_sustained_figure_a_share_of_the_peak():
    phone = load_profile("android-8gb")
    assert phone.sustained_gb_s is None
    e = estimate(E2B, phone, contexts=(SHORT_CONTEXT,), **FORMATS)
    assert e.bandwidth_gb_s == pytest.approx(SUSTAINED_SHARE * phone.peak_gb_s)
    assert f"{SUSTAINED_SHARE:g} x the {phone.peak_gb_s:g} GB/s peak" in e.bandwidth_basis
    assert estimate(E2B, load_profile("pi5-8gb"), contexts=(1,), **FORMATS).bandwidth_basis == "the profile's sustained read"


def test_uncalibrated_formats_have_no_figures():
    e = estimate(E2B, load_profile("pi5-8gb"), contexts=(SHORT_CONTEXT,), **{**FORMATS, "weights": "fp16"})
    assert (e.decode, e.prefill_tokens_per_second) == ((), None)
    assert e.unavailable == ("no estimate for fp16 weights: the cost model's efficiencies are measured for int8, "
                             "int4, int8-block only")
    assert e.unavailable in format_estimates([e])


def test_int8_block_is_estimated_only_where_its_kernel_runs():
    """int8-block needs int8 dot products: the Pi 5 has them (and decodes it faster than int8 per channel, whose
    bytes are nearly the same), the Pi 4 does not, where onnxruntime widens the weights at every step."""
    pi5, pi4 = load_profile("pi5-8gb"), load_profile("pi4-8gb")
    block, channel = (speeds(pi5, weights=w, ple="int8")[0][0] for w in ("int8-block", "int8"))
    assert block > channel
    e = estimate(E2B, pi4, contexts=(SHORT_CONTEXT,), **{**FORMATS, "weights": "int4,gate_up=int8-block"})
    assert (e.decode, e.prefill_tokens_per_second) == ((), None)
    assert e.unavailable == ("no estimate for int8-block weights: this CPU (neon (no dot-product)) has no int8 "
                             "dot-product kernel for them, and onnxruntime widens them to float32 at every step; "
                             "use int8 or int4")


def test_attention_reads_are_what_the_cache_reads(artifacts):
    """The shapes' count of a step's KV read equals the bench's (every layer's read of its source's store), past the
    sliding window and its rollback slots, with an exact recent ring and without."""
    for kv, recent in (("fp16", 0), ("tq3.5", 4), ("int8", 0)):
        model = edge_runtime.load(artifacts["shared-mqa-wide"], kv=kv, kv_recent=recent, kv_sliding="fp32")
        for length in (5, 90):
            model.reset()
            model.feed(np.arange(3, 3 + length))
            reads = kv_format(kv).attention_reads(model.spec, length, recent, kv_format("fp32"))[0]
            assert reads == model.kv_read_bytes, (kv, length)


def test_profile_estimates_cover_every_known_model_at_short_and_profile_context():
    pi4 = load_profile("pi4-4gb")
    estimates = profile_estimates(pi4)
    assert [e.model.split(" (")[0] for e in estimates] == ["Gemma 4 E2B", "Gemma 4 E4B", "Gemma 3n E2B",
                                                           "Gemma 3n E4B"]
    for e in estimates:
        assert [d.context for d in e.decode] == [SHORT_CONTEXT, pi4.context]
        assert (e.weights, e.block_size, e.ple, e.kv, e.threads) == ("int4", 128, "int4", "tq3.5", 4)
        assert e.kernel_path == "neon (no dot-product)"
    text = format_estimates(estimates)
    assert text.startswith(f"{LABEL}: weights int4 b128, PLE int4, KV tq3.5")
    assert f"decode t/s @ {SHORT_CONTEXT}" in text and f"decode t/s @ {pi4.context}" in text
    assert "4.8 GB/s" in text and "4 threads x 8 int8 MACs/cycle (neon (no dot-product)) x 1.8 GHz" in text


def test_profiles_show_prints_the_estimate():
    text = cli("profiles", "show", "pi5-8gb").stdout
    assert LABEL in text and "E2B" in text and "E4B" in text and "prefill t/s bound" in text
    data = json.loads(cli("profiles", "show", "pi5-8gb", "--json").stdout)
    assert (data["peak_gb_s"], data["sustained_gb_s"], data["clock_ghz"], data["int8_macs_per_cycle"]) == (
        17.07, 11.6, 2.4, 32)
    assert [e["label"] for e in data["estimate"]] == [LABEL] * 4
    assert [e["model"].split(" (")[0] for e in data["estimate"]] == list(known_models())
    e2b = data["estimate"][0]
    assert e2b["weights"] == "int4" and [d["context"] for d in e2b["decode"]] == [SHORT_CONTEXT, 32768]
    assert e2b["decode"][0]["tokens_per_second"] > e2b["decode"][1]["tokens_per_second"] > 0
    assert e2b["prefill_tokens_per_second"] > 0 and e2b["calibrated_on"] == cost_model.CALIBRATED_ON


def test_plan_prints_the_estimate(artifacts, checkpoints):
    data = json.loads(cli("plan", str(checkpoints["shared-gqa"]), "--profile", "pi4-2gb", "--context", "200",
                          "--json").stdout)
    e = data["estimate"]
    assert e["label"] == LABEL and e["weights"] == data["weights"] == "int4" and e["kv"] == data["kv"]
    assert [d["context"] for d in e["decode"]] == [SHORT_CONTEXT, 200] and e["prefill_tokens_per_second"] > 0
    text = cli("plan", str(checkpoints["shared-gqa"]), "--profile", "pi4-2gb").stdout
    assert f"{LABEL}: weights int4 b128" in text
    fp32 = cli("plan", "-m", str(artifacts["shared-gqa"]), "--profile", "pi4-2gb")
    assert fp32.returncode == 0 and "no estimate for fp32 weights" in fp32.stdout


def test_a_profile_without_the_cost_facts_loads_and_says_there_is_no_estimate(tmp_path):
    """Custom profiles written to plan memory (before the cost model) keep working; the estimate says what is missing."""
    text = (PROFILE_DIR / "pi4-4gb.toml").read_text()
    for line in ("peak_gb_s = 12.8\n", "clock_ghz = 1.8\n", "int8_macs_per_cycle = 8\n"):
        assert line in text
        text = text.replace(line, "")
    text = "\n".join(line for line in text.splitlines() if not line.startswith("sustained_gb_s"))
    (tmp_path / "board.toml").write_text(text.replace('name = "pi4-4gb"', 'name = "board"'))
    profile = load_profile(tmp_path / "board.toml")
    assert (profile.peak_gb_s, profile.clock_ghz, profile.int8_macs_per_cycle) == (None, None, None)
    shown = cli("profiles", "show", str(tmp_path / "board.toml"))
    assert shown.returncode == 0, shown.stderr
    assert "no estimate: the profile gives no peak_gb_s, clock_ghz, int8_macs_per_cycle" in shown.stdout
    assert "  bandwidth not given" in shown.stdout


def test_a_mixed_recipe_reads_each_formats_bytes_at_that_formats_efficiency():
    """int4-mixed's int8 groups go through int8's kernel: each format's bytes and MACs at its own efficiency."""
    pi5 = load_profile("pi5-8gb")
    e = estimate(E2B, pi5, contexts=(4096,), **{**FORMATS, "weights": "int4-mixed"})
    by_format = read_per_token_by_format(E2B, "int4-mixed", 128, "int4")
    assert set(by_format) == {"int4", "int8"}
    assert sum(by_format.values()) == sum(read_per_token(E2B, "int4-mixed", 128, "int4").values()) == e.bytes_per_token
    reads = kv_format("tq3.5").attention_reads(E2B, 4096, 32, kv_format("fp32"))
    rate = pi5.sustained_gb_s * 1e9
    seconds = (by_format["int4"] / (cost_model.DECODE_EFFICIENCY["int4"] * rate)
               + by_format["int8"] / (cost_model.DECODE_EFFICIENCY["int8"] * rate) + attention_seconds(reads, pi5))
    assert e.decode[0].tokens_per_second == pytest.approx(1 / seconds, rel=1e-12)
    macs = linear_macs_by_format(E2B, "int4-mixed", 128)
    assert tuple(map(sum, zip(*macs.values(), strict=True))) == linear_macs(E2B)
    peak = pi5.threads * pi5.int8_macs_per_cycle * pi5.clock_ghz * 1e9
    prompt = e.prompt_tokens
    prefill_seconds = sum((prompt * every + last) / (peak * PREFILL_EFFICIENCY[name])  # one chunk of 128
                          for name, (every, last) in macs.items())
    assert e.prefill_tokens_per_second == pytest.approx(prompt / prefill_seconds, rel=1e-12)
    int4, int8 = (estimate(E2B, pi5, contexts=(4096,), **{**FORMATS, "weights": w}) for w in ("int4", "int8"))
    assert int8.decode[0].tokens_per_second < e.decode[0].tokens_per_second < int4.decode[0].tokens_per_second
    assert format_estimates([e]).startswith(f"{LABEL}: weights int4 b128, qkv int8, per_layer int8, PLE int4")
