"""The memory planner's structure and arithmetic, on tiny artifacts and checkpoints (no timing, no RSS readings:
tools/plan_accuracy.py measures the predictions against the bench)."""

from __future__ import annotations

import dataclasses
import inspect
import json
import shutil
from pathlib import Path

import pytest

from conftest import build_checkpoint
from edge_runtime.artifact import read_manifest
from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.families import spec_from_hf_config
from edge_runtime.kv_cache import KVCache
from edge_runtime.kv_formats import kv_format
from edge_runtime.planner import (
    KV_GROWTH,
    MODEL_CONFIGS,
    format_plan,
    known_models,
    model_name,
    plan_memory,
    ple_page_bytes,
    read_per_token,
    weight_bytes,
)
from edge_runtime.profiles import Profile, load_profile

TINY = "shared-mqa-wide"  # bf16 checkpoint: its PLE exports as bf16 under --ple auto


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("planner") / TINY, TINY)


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory) -> dict[str, Path]:
    """The tiny checkpoint in every weight format."""
    from edge_runtime.export import export_checkpoint

    root = tmp_path_factory.mktemp("planner-artifacts")
    return {fmt: export_checkpoint(checkpoint, root / fmt, weights=fmt, block_size=32)
            for fmt in ("fp32", "fp16", "int8", "int4")}


def profile(**changes) -> Profile:
    return dataclasses.replace(load_profile("x86_64-dev"), **changes)


def config_only(tmp_path: Path, name: str) -> Path:
    """A checkpoint directory holding only a packaged config: enough to plan (PLE format given by the profile)."""
    shutil.copy(MODEL_CONFIGS / f"{name}.json", tmp_path / "config.json")
    return tmp_path


@pytest.mark.parametrize("fmt", ["fp32", "fp16", "int8", "int4"])
def test_weight_bytes_from_shapes_equal_the_exported_graphs(exported, fmt):
    manifest = read_manifest(exported[fmt])
    assert weight_bytes(manifest.spec, fmt, 32)[0] == manifest.read_per_token["weights"]


@pytest.mark.parametrize("fmt", ["fp32", "fp16", "int8", "int4"])
def test_read_per_token_from_shapes_equals_the_manifests(exported, fmt):
    """What the cost model reads per token, known before exporting, is what the export records (and bench uses)."""
    manifest = read_manifest(exported[fmt])
    assert read_per_token(manifest.spec, fmt, 32, manifest.formats["ple"]) == manifest.read_per_token


def test_checkpoint_plans_as_its_export(checkpoint, exported):
    # ple "auto" is the checkpoint's own dtype, as export writes it
    as_exported = profile(weights="int4", block_size=32, ple="auto")
    planned, artifact = plan_memory(checkpoint, as_exported, 100), plan_memory(exported["int4"], as_exported, 100)
    assert artifact.ple == planned.ple == "bf16"
    assert planned.items == artifact.items
    assert (planned.weights, planned.block_size) == (artifact.weights, artifact.block_size) == ("int4", 32)


def test_artifact_formats_win_over_the_profiles(exported):
    plan = plan_memory(exported["int8"], profile(weights="int4", ple="int4"), 64)
    assert (plan.weights, plan.block_size, plan.ple) == ("int8", None, "bf16")


@pytest.mark.parametrize("kv", ["fp16", "tq3.5"])
def test_kv_item_is_the_formats_cache_bytes_at_the_grown_size(tmp_path, kv):
    e2b = config_only(tmp_path, "gemma-4-e2b")
    spec = spec_from_hf_config(json.loads((e2b / "config.json").read_text()))
    assert KV_GROWTH == inspect.signature(KVCache).parameters["growth"].default
    for context in (1, 256, 257, 8000):
        plan = plan_memory(e2b, profile(), context, kv=kv)
        slots = -(-context // KV_GROWTH) * KV_GROWTH
        expected = kv_format(kv).cache_bytes(spec, slots, plan.kv_recent, kv_format("fp16"))  # rings fp16 by default
        assert dict(plan.items)["KV cache at context"] == expected
    assert plan.kv_recent == kv_format(kv).default_recent


def test_ple_pages_grow_with_context_up_to_the_vocabulary(exported):
    spec = read_manifest(exported["fp32"]).spec
    pages = [dict(plan_memory(exported["fp32"], profile(), c).items)["PLE pages at context"] for c in (1, 10, 100)]
    assert pages[0] < pages[1] < pages[2] == ple_page_bytes(spec, "bf16", 100)
    vocab = spec.vocab_size_per_layer_input
    assert ple_page_bytes(spec, "bf16", 10 * vocab) == ple_page_bytes(spec, "bf16", vocab)
    # a row of exactly one page starts on a page boundary: one page per token
    assert ple_page_bytes(dataclasses.replace(spec, num_hidden_layers=4, hidden_size_per_layer_input=256),
                          "fp32", 10) == 10 * 4096


def test_items_sum_to_the_peak_and_serialize(exported):
    plan = plan_memory(exported["int4"], profile())
    assert plan.context == 256  # the profile's 32768, capped at the model's 256
    assert sum(b for _, b in plan.items) == plan.peak_bytes
    assert [n for n, _ in plan.items][:5] == ["weights resident", "tokenizer", "runtime overhead",
                                             "PLE pages at context", "KV cache at context"]
    data = json.loads(json.dumps(plan.to_dict()))
    assert data["fits"] and data["peak_bytes"] == plan.peak_bytes and data["max_context"] == 256
    text = format_plan(plan)
    assert all(name in text for name, _ in plan.items) and "peak RSS" in text and "fits" in text


def test_max_context_is_the_largest_that_fits(exported):
    short, long = (plan_memory(exported["fp32"], profile(), c).peak_bytes for c in (60, 200))
    small = profile(memory_bytes=(short + long) // 2, app_share=1.0)
    plan = plan_memory(exported["fp32"], small, 256)
    assert not plan.fits and 60 < plan.max_context < 200
    assert plan_memory(exported["fp32"], small, plan.max_context).fits
    assert not plan_memory(exported["fp32"], small, plan.max_context + 1).fits
    refusal = plan.refusal()
    assert "\n" not in refusal and f"--context {plan.max_context}" in refusal and plan.suggestions
    assert all(s in refusal for s in plan.suggestions)


def test_nothing_fits_a_tiny_budget(exported):
    plan = plan_memory(exported["int4"], profile(memory_bytes=1 << 20, app_share=1.0))
    assert not plan.fits and plan.max_context == 0 and plan.suggestions == []
    assert plan.refusal().endswith("over); nothing smaller fits")


def test_e4b_on_a_2gb_pi_suggests_e2b(tmp_path):
    plan = plan_memory(config_only(tmp_path, "gemma-4-e4b"), load_profile("pi4-2gb"))
    assert plan.model == "Gemma 4 E4B (42 layers, hidden 2560)"
    assert not plan.fits and plan.max_context == 0
    assert any(s.startswith("Gemma 4 E2B int4 at context") for s in plan.suggestions)
    assert "Gemma 4 E2B int4" in plan.refusal()


def test_names(exported, tmp_path):
    assert model_name(read_manifest(exported["fp32"]).spec) == "Gemma 4 (6 layers, hidden 64)"
    assert plan_memory(config_only(tmp_path, "gemma-4-e2b"), profile()).model == "Gemma 4 E2B (35 layers, hidden 1536)"


def test_known_models_are_every_packaged_config_of_a_registered_family():
    """Family by family in the registry's order; a config of a family the runtime does not know is left out."""
    assert list(known_models()) == ["Gemma 4 E2B", "Gemma 4 E4B", "Gemma 3n E2B", "Gemma 3n E4B"]
    assert {name: (spec.family, spec.num_hidden_layers, spec.hidden_size) for name, spec in known_models().items()} == {
        "Gemma 4 E2B": ("gemma4", 35, 1536), "Gemma 4 E4B": ("gemma4", 42, 2560),
        "Gemma 3n E2B": ("gemma3n", 30, 2048), "Gemma 3n E4B": ("gemma3n", 35, 2048)}


def test_errors(tmp_path, exported):
    e4b = config_only(tmp_path, "gemma-4-e4b")
    with pytest.raises(EdgeRuntimeError) as err:
        plan_memory(e4b, profile(), 200000)
    assert str(err.value) == "context 200000 is larger than the model's 131072; pass --context 131072 or less"
    with pytest.raises(EdgeRuntimeError) as err:
        plan_memory(e4b, profile(), 0)
    assert str(err.value) == "context 0 is not a positive number of tokens; pass --context 1 or more"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(EdgeRuntimeError) as err:
        plan_memory(empty, profile())
    assert str(err.value) == (f"{empty}: neither an artifact (no manifest.json) nor a Hugging Face checkpoint (no "
                              "config.json); pass an artifact directory from `edge-runtime export` or a checkpoint")
    with pytest.raises(EdgeRuntimeError, match="not a KV cache format"):
        plan_memory(exported["fp32"], profile(), kv="fp8")


def test_sliding_rings_are_planned_as_loading_makes_them(tmp_path):
    """fp16 unless asked otherwise, fp32 beside fp32 full layers (kv_formats.default_sliding_format)."""
    e2b = config_only(tmp_path, "gemma-4-e2b")
    assert plan_memory(e2b, profile(), 64, kv="fp32").kv_sliding == "fp32"
    assert plan_memory(e2b, profile(), 64, kv="tq3.5").kv_sliding == "fp16"
    assert plan_memory(e2b, profile(), 64, kv="tq3.5", kv_sliding="int8").kv_sliding == "int8"
