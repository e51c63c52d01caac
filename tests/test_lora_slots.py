"""LoRA adapters attached at load (`export --lora-slots`, `load(adapter=...)`, `Model.set_adapter`): fp32 artifacts
with slots give the logits of the same adapter merged at export (test_lora_export.py proves that one against PEFT),
and with no adapter the logits of the slot-less export, in prefill and decode; switching adapters empties the cache;
what the slots cannot take is refused in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

import edge_runtime
from conftest import CONFIGS, free_port, overwrite_first_value
from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.export import export_checkpoint
from edge_runtime.lora_slots import MODULES, slot_inputs, slot_scale

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import make_adapter

TOLERANCE = 5e-5
BASE = "shared-gqa"  # causal layout, KV-shared layers (which have no k or v to slot)


def _ids(name: str = BASE, length: int = 40) -> np.ndarray:
    vocab = CONFIGS[name]["text"]["vocab_size_per_layer_input"]
    return np.concatenate([[2], np.random.default_rng(0).integers(3, vocab, length - 1)])


@pytest.fixture(scope="module")
def adapters(checkpoints, tmp_path_factory) -> dict[str, Path]:
    root, base = tmp_path_factory.mktemp("slot-adapters"), checkpoints[BASE]
    projections = make_adapter.PROJECTIONS
    return {
        "r8": make_adapter.make_adapter(base, root / "r8", r=8, alpha=16, target_modules=projections, seed=1),
        "r4-rslora": make_adapter.make_adapter(base, root / "r4-rslora", r=4, alpha=8, use_rslora=True,
                                               target_modules=projections, rank_pattern={"o_proj": 2}, seed=2),
        "qv": make_adapter.make_adapter(base, root / "qv", r=8, target_modules=["q_proj", "v_proj"], seed=3),
        "r16": make_adapter.make_adapter(base, root / "r16", r=16, target_modules=projections, seed=4),
        "dora": make_adapter.make_adapter(base, root / "dora", r=4, use_dora=True, target_modules=projections),
        "saved": make_adapter.make_adapter(base, root / "saved", r=4, target_modules=projections,
                                           modules_to_save=["norm"]),
        "all-linear": make_adapter.make_adapter(base, root / "all-linear", r=4),
    }


@pytest.fixture(scope="module")
def slotted(checkpoints, tmp_path_factory) -> Path:
    return export_checkpoint(checkpoints[BASE], tmp_path_factory.mktemp("slotted") / "art", lora_slots="8")


@pytest.fixture(scope="module")
def merged(checkpoints, adapters, tmp_path_factory):
    root = tmp_path_factory.mktemp("merged")

    def export(name: str | None) -> Path:
        out = root / (name or "plain")
        if not out.exists():
            export_checkpoint(checkpoints[BASE], out, adapters=[adapters[name]] if name else [])
        return out
    return export


def _logits(artifact: Path, ids: np.ndarray, mode: str, **options) -> np.ndarray:
    return edge_runtime.load(artifact, prefill_chunk=7, kv="fp32", **options).logits(ids, mode=mode)


@pytest.mark.parametrize("name", ["r8", "r4-rslora", "qv", "all-linear"])
def test_attached_equals_merged(name, slotted, merged, adapters):
    """r8 fills the projections' slots; r4-rslora (o_proj at rank 2) has ranks below theirs; qv leaves k, o and the
    MLP empty; all-linear (PEFT's target) adds the PLE projections, each layer's two and the model's."""
    ids = _ids()
    model = edge_runtime.load(slotted, prefill_chunk=7, kv="fp32", adapter=adapters[name])
    plain = _logits(merged(None), ids, "prefill")
    for mode in ("prefill", "decode"):
        expected = _logits(merged(name), ids, mode)
        error = float(np.abs(model.logits(ids, mode=mode) - expected).max())
        print(f"{name} {mode}: attached vs merged max abs {error:.2e} (the adapter moves the logits by "
              f"{np.abs(plain - expected).max():.2f})")
        assert error <= TOLERANCE
    assert np.abs(plain - expected).max() > 1000 * TOLERANCE


def test_no_adapter_equals_the_slotless_export(slotted, merged):
    ids = _ids()
    for mode in ("prefill", "decode"):
        error = float(np.abs(_logits(slotted, ids, mode) - _logits(merged(None), ids, mode)).max())
        print(f"no adapter {mode}: slots vs no slots max abs {error:.2e}")
        assert error <= TOLERANCE


def _greedy(model, ids: np.ndarray, n: int = 6) -> tuple[list[int], int]:
    """n greedy tokens after `ids`, and how many prompt tokens came from the cache."""
    tokens = list(model.generate_tokens(ids.tolist(), max_new_tokens=n, temperature=0.0))
    return tokens, model.stats.cached_tokens


def test_switching_adapters_empties_the_cache(slotted, adapters):
    """A -> none -> B -> A on one model: each gives the tokens a model loaded with it alone gives, and none reuses
    the cache the previous adapter filled (same prompt each time, which would otherwise be reused in full)."""
    ids = _ids(length=12)
    alone = {name: _greedy(edge_runtime.load(slotted, kv="fp32", adapter=adapters[name] if name else None), ids)[0]
             for name in ("r8", None, "r4-rslora")}
    assert len({tuple(t) for t in alone.values()}) == 3  # the adapters change the greedy tokens
    model = edge_runtime.load(slotted, kv="fp32", adapter=adapters["r8"])
    assert _greedy(model, ids) == (alone["r8"], 0)
    assert _greedy(model, ids) == (alone["r8"], len(ids) - 1)  # the same adapter reuses its cache
    for name in (None, "r4-rslora", "r8"):
        model.set_adapter(adapters[name] if name else None)
        assert model.context_used == 0
        assert _greedy(model, ids) == (alone[name], 0)
    model.set_adapter(adapters["r8"])  # the one attached: nothing to do, the cache stays
    assert model.context_used > 0
    assert model.adapter == adapters["r8"].resolve()


def test_manifest_records_the_slots(slotted, checkpoints, tmp_path):
    record = json.loads((slotted / "manifest.json").read_text())
    slots = record["lora_slots"]
    assert slots["rank"] == 8
    assert slots["dtype"] == "float32"  # beside fp32 weights
    assert slots["modules"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                                "per_layer_input_gate", "per_layer_projection", "per_layer_model_projection"]
    manifest = edge_runtime.load(slotted).manifest
    spec = manifest.spec
    shared = [i for i in range(spec.num_hidden_layers) if spec.is_kv_shared(i)]
    assert shared  # KV-shared layers have q, o and the MLP slotted, no k or v
    expected, p = {}, spec.hidden_size_per_layer_input
    for i in range(spec.num_hidden_layers):
        h, q, kv, mlp = spec.hidden_size, spec.num_attention_heads * spec.head_dims[i], \
            spec.num_key_value_heads * spec.head_dims[i], spec.mlp_size(i)
        expected[f"layers.{i}.self_attn.q_proj"] = [h, q]
        if i not in shared:
            expected[f"layers.{i}.self_attn.k_proj"] = [h, kv]
            expected[f"layers.{i}.self_attn.v_proj"] = [h, kv]
        expected.update({f"layers.{i}.self_attn.o_proj": [q, h], f"layers.{i}.mlp.gate_proj": [h, mlp],
                         f"layers.{i}.mlp.up_proj": [h, mlp], f"layers.{i}.mlp.down_proj": [mlp, h],
                         f"layers.{i}.per_layer_input_gate": [h, p], f"layers.{i}.per_layer_projection": [p, h]})
    expected["per_layer_model_projection"] = [h, spec.num_hidden_layers * p]
    assert slots["tensors"] == expected
    qv = export_checkpoint(checkpoints[BASE], tmp_path / "qv", lora_slots="4:v_proj,q_proj")
    slots = json.loads((qv / "manifest.json").read_text())["lora_slots"]
    assert (slots["rank"], slots["modules"]) == (4, ["q_proj", "v_proj"])
    assert {name.rsplit(".", 1)[-1] for name in slots["tensors"]} == {"q_proj", "v_proj"}
    assert json.loads((export_checkpoint(checkpoints[BASE], tmp_path / "none") / "manifest.json").read_text()
                      )["lora_slots"] is None


@pytest.mark.parametrize("name,message", [
    ("r16", ("{dir}/adapter_model.safetensors: base_model.model.model.layers.0.mlp.down_proj.lora_A.weight: rank 16 is "
            "more than the slots' 8 in {art}; export with --lora-slots 16 or more, or merge it at export instead "
            "(edge-runtime export --adapter)")),
    ("qv-slots", ("{dir}/adapter_model.safetensors: base_model.model.model.layers.0.mlp.down_proj.lora_A.weight: "
                 "down_proj has no LoRA slot in {art} (slots: q_proj,v_proj); export with it in --lora-slots, or "
                 "merge it at export instead (edge-runtime export --adapter)")),
    ("dora", ("{dir}/adapter_config.json: use_dora: a DoRA adapter cannot be attached at load (its magnitude rescales "
             "the merged weights); merge it at export instead (edge-runtime export --adapter)")),
    ("saved", ("{dir}/adapter_model.safetensors: base_model.model.model.layers.0.input_layernorm.weight: "
              "modules_to_save cannot be attached at load (it replaces a whole tensor); merge it at export instead "
              "(edge-runtime export --adapter)")),
    ("no-slots", ("--adapter {dir}: {art} has no LoRA slots to attach an adapter to; export it with --lora-slots RANK, "
                 "or merge it at export instead (edge-runtime export --adapter)")),
])
def test_refusals_are_one_line(name, message, slotted, merged, adapters, checkpoints, tmp_path):
    artifact = {"no-slots": merged(None), "qv-slots": None}.get(name, slotted)
    if name == "qv-slots":
        artifact = export_checkpoint(checkpoints[BASE], tmp_path / "qv-slots", lora_slots="8:q_proj,v_proj")
    adapter = adapters["r8" if name in ("no-slots", "qv-slots") else name]
    model = edge_runtime.load(artifact, kv="fp32")
    before = model.logits(_ids())
    with pytest.raises(EdgeRuntimeError) as refusal:
        model.set_adapter(adapter)
    assert str(refusal.value) == message.format(dir=adapter, art=artifact)
    assert model.adapter is None
    assert np.array_equal(model.logits(_ids()), before)  # nothing was swapped


def test_export_refusals(checkpoints, tmp_path):
    for text, message in [
        ("0", ("--lora-slots 0: the rank must be a whole number from 1 to 256 (RANK[:MODULES], e.g. 16 or "
              "16:q_proj,v_proj)")),
        ("8:q_proj,lm_head", ("--lora-slots 8:q_proj,lm_head: unknown module 'lm_head'; choose among q_proj, k_proj, "
                             "v_proj, o_proj, gate_proj, up_proj, down_proj, per_layer_input_gate, "
                             "per_layer_projection, per_layer_model_projection")),
    ]:
        with pytest.raises(EdgeRuntimeError) as refusal:
            export_checkpoint(checkpoints[BASE], tmp_path / "art", lora_slots=text)
        assert str(refusal.value) == message
    with pytest.raises(EdgeRuntimeError) as refusal:
        export_checkpoint(checkpoints[BASE], tmp_path / "art", lora_slots="8", lora_slot_precision="bf16")
    assert str(refusal.value) == "--lora-slot-precision bf16: not available; choose one of fp32, fp16, int8"
    assert not (tmp_path / "art").exists()


def test_server_per_request_adapter(slotted, adapters):
    """Requests naming different adapters (and none) take turns on one model, each answered as a model loaded with
    that adapter alone answers it; concurrent ones too. An unknown name or a wrong type is a 400 naming `adapter`."""
    from test_server import LiveServer

    from edge_runtime.server.app import ServerSettings

    prompt = "the quick brown fox"

    def alone(name: str | None) -> str:
        model = edge_runtime.load(slotted, kv="fp32", adapter=adapters[name] if name else None)
        return model.create_completion(prompt, max_tokens=6, temperature=0.0)["choices"][0]["text"]

    expected = {name: alone(name) for name in ("r8", "r4-rslora", None)}
    assert len(set(expected.values())) == 3
    model = edge_runtime.load(slotted, kv="fp32")
    settings = ServerSettings(adapters={"a": adapters["r8"], "b": adapters["r4-rslora"]})
    with LiveServer(model, settings) as server:
        def ask(name: str | None) -> str:
            body = {"prompt": prompt, "max_tokens": 6, "temperature": 0, **({"adapter": name} if name else {})}
            response = server.post("/v1/completions", json=body)
            assert response.status_code == 200, response.text
            return response.json()["choices"][0]["text"]

        names = {"a": "r8", "b": "r4-rslora", None: None}
        for name in ("a", None, "b", "a", "a"):
            assert ask(name) == expected[names[name]]
        with ThreadPoolExecutor(4) as pool:
            order = ["a", "b", None, "b", "a", None]
            assert list(pool.map(ask, order)) == [expected[names[n]] for n in order]
        for value, message in [("c", "adapter 'c' is not served here; this server offers one of a, b"),
                               (3, "adapter must be a string, got int 3")]:
            response = server.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                                  "adapter": value})
            assert response.status_code == 400
            assert response.json()["error"]["param"] == "adapter"
            assert response.json()["error"]["message"] == message


def test_cli(slotted, adapters, tmp_path):
    """run --adapter gives the adapter's greedy text; its refusals are one line on stderr with exit code 1."""
    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "edge_runtime", *args], capture_output=True, text=True,
                              env={**os.environ, "EDGE_RUNTIME_CACHE": str(tmp_path / "cache")})

    prompt, options = "the quick brown fox", ["-n", "6", "--temperature", "0", "--no-stats", "--kv", "fp32"]
    result = cli("run", "-m", str(slotted), prompt, *options, "--adapter", str(adapters["r8"]))
    assert result.returncode == 0, result.stderr
    model = edge_runtime.load(slotted, kv="fp32", adapter=adapters["r8"])
    assert result.stdout == model.create_completion(prompt, max_tokens=6, temperature=0.0)["choices"][0]["text"] + "\n"
    result = cli("run", "-m", str(slotted), prompt, *options, "--adapter", str(adapters["dora"]))
    assert result.returncode == 1
    assert result.stderr == (f"error: {adapters['dora']}/adapter_config.json: use_dora: a DoRA adapter cannot be "
                             "attached at load (its magnitude rescales the merged weights); merge it at export instead "
                             "(edge-runtime export --adapter)\n")
    result = cli("serve", "-m", str(slotted), "--port", str(free_port()), "--adapter", str(adapters["r8"]), "--adapter",
                 str(adapters["qv"]))
    assert (result.returncode, result.stderr) == (1, ("error: --adapter given 2 directories without a name; attach "
                                                     "one to every request, and offer the others as NAME=DIR\n"))
    result = cli("serve", "-m", str(slotted), "--port", str(free_port()), "--adapter", f"a={adapters['r16']}")
    assert result.returncode == 1
    assert result.stderr.startswith(f"error: {adapters['r16']}/adapter_model.safetensors: ")
    assert "rank 16 is more than the slots' 8" in result.stderr and result.stderr.count("\n") == 1


def test_perplexity_cli_attaches_the_adapter(slotted, merged, adapters, tmp_path):
    """perplexity --adapter scores the text as load(adapter=) does, which is the merged export's score; an artifact
    without slots, or an adapter the slots cannot take, is refused in one line."""
    from edge_runtime.perplexity import evaluate

    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog, and then the dog sleeps in the sun. " * 6)

    def cli(artifact: Path, adapter: Path) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "edge_runtime", "perplexity", "-m", str(artifact), "--text-file",
                               str(text), "--context", "32", "--kv", "fp32", "--json", "--adapter", str(adapter)],
                              capture_output=True, text=True,
                              env={**os.environ, "EDGE_RUNTIME_CACHE": str(tmp_path / "cache")})

    result = cli(slotted, adapters["r8"])
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)
    attached = evaluate(edge_runtime.load(slotted, kv="fp32", adapter=adapters["r8"]), text.read_text(), 32)
    with_merge = evaluate(edge_runtime.load(merged("r8"), kv="fp32"), text.read_text(), 32).perplexity
    without = evaluate(edge_runtime.load(slotted, kv="fp32"), text.read_text(), 32).perplexity
    print(f"perplexity: attached {figures['perplexity']:.4f}, merged {with_merge:.4f}, no adapter {without:.4f}")
    assert figures["adapter"] == str(adapters["r8"].resolve())
    assert figures["perplexity"] == pytest.approx(attached.perplexity, rel=1e-9)
    assert figures["perplexity"] == pytest.approx(with_merge, rel=1e-5)
    assert abs(figures["perplexity"] - without) > 1  # the adapter moves it (412.1 -> 408.6)
    for artifact, adapter, message in [
        (merged(None), adapters["r8"], (f"--adapter {adapters['r8']}: {merged(None)} has no LoRA slots to attach an "
                                        "adapter to; export it with --lora-slots RANK, or merge it at export instead "
                                        "(edge-runtime export --adapter)")),
        (slotted, adapters["r16"], (f"{adapters['r16']}/adapter_model.safetensors: base_model.model.model.layers.0.mlp."
                                    f"down_proj.lora_A.weight: rank 16 is more than the slots' 8 in {slotted}; export "
                                    "with --lora-slots 16 or more, or merge it at export instead (edge-runtime export "
                                    "--adapter)")),
    ]:
        result = cli(artifact, adapter)
        assert (result.returncode, result.stdout, result.stderr) == (1, "", f"error: {message}\n")


def test_info_shows_merged_adapters_and_slots(checkpoints, slotted, adapters, tmp_path):
    import hashlib

    def info(artifact: Path, *options: str) -> str:
        result = subprocess.run([sys.executable, "-m", "edge_runtime", "info", str(artifact), *options],
                                capture_output=True, text=True,
                                env={**os.environ, "EDGE_RUNTIME_CACHE": str(tmp_path / "cache")})
        assert result.returncode == 0, result.stderr
        return result.stdout

    first, second = adapters["r8"], adapters["qv"]
    merged = export_checkpoint(checkpoints[BASE], tmp_path / "merged", adapters=[first, second],
                               adapter_scales=[0.5, 1.5])
    short = {path: hashlib.sha256((path / "adapter_model.safetensors").read_bytes()).hexdigest()[:12]
             for path in (first, second)}
    lines = info(merged).splitlines()
    assert lines[-1] == (f"  LoRA adapters merged: r8 (scale 0.5, weights sha256 {short[first]}), qv (scale 1.5, "
                         f"weights sha256 {short[second]})")
    assert "LoRA slots" not in info(merged)
    data = json.loads(info(merged, "--json"))
    assert [(a["name"], a["scale"]) for a in data["adapters"]] == [("r8", 0.5), ("qv", 1.5)]
    assert data["lora_slots"] is None
    spec = edge_runtime.load(slotted).spec
    projections = 9 * spec.num_hidden_layers + 1 - 2 * sum(spec.is_kv_shared(i) for i in range(spec.num_hidden_layers))
    assert info(slotted).splitlines()[-1] == (f"  LoRA slots: rank 8 in q_proj, k_proj, v_proj, o_proj, gate_proj, "
                                              f"up_proj, down_proj, per_layer_input_gate, per_layer_projection, "
                                              f"per_layer_model_projection ({projections} projections, float32); "
                                              "attach an adapter with --adapter DIR")
    data = json.loads(info(slotted, "--json"))
    assert data["lora_slots"] == {"rank": 8, "modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                         "up_proj", "down_proj", "per_layer_input_gate",
                                                         "per_layer_projection", "per_layer_model_projection"],
                                  "dtype": "float32", "slotted_tensors": projections}
    assert data["adapters"] == []


def test_planner_counts_the_attached_adapter(checkpoints, slotted, adapters):
    """The plan holds an attached adapter's arrays as fed (float32 A and B at each module's own rank), to the byte,
    and load's fit check refuses what fits only without it."""
    from dataclasses import replace

    from edge_runtime.planner import plan_memory
    from edge_runtime.profiles import load_profile

    profile = load_profile("pi4-4gb")
    plain = plan_memory(slotted, profile, 64)
    assert "LoRA adapter attached" not in dict(plain.items)
    tensors = json.loads((slotted / "manifest.json").read_text())["lora_slots"]["tensors"]
    ranks = {"r8": dict.fromkeys(make_adapter.PROJECTIONS, 8),
             "r4-rslora": {**dict.fromkeys(make_adapter.PROJECTIONS, 4), "o_proj": 2},
             "qv": {"q_proj": 8, "v_proj": 8}}
    for name, rank in ranks.items():
        expected = sum(4 * rank[t.rsplit(".", 1)[-1]] * (k + n) for t, (k, n) in tensors.items()
                       if t.rsplit(".", 1)[-1] in rank)
        model = edge_runtime.load(slotted, adapter=adapters[name])
        fed = sum(array.nbytes for array in model._adapter_feeds[model.adapter].values())
        plan = plan_memory(slotted, profile, 64, adapter=adapters[name])
        print(f"{name}: planned {dict(plan.items)['LoRA adapter attached']} bytes, fed {fed}")
        assert dict(plan.items)["LoRA adapter attached"] == expected == fed
        assert plan.peak_bytes - plain.peak_bytes == expected
    result = subprocess.run([sys.executable, "-m", "edge_runtime", "plan", "-m", str(slotted), "--profile", "pi4-4gb",
                             "--context", "64", "--adapter", str(adapters["qv"]), "--json"], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr
    assert {"name": "LoRA adapter attached", "bytes": expected} in json.loads(result.stdout)["items"]
    tight = replace(profile, memory_bytes=plain.peak_bytes + expected // 2, app_share=1.0)
    assert edge_runtime.load(slotted, profile=tight, context_length=64).adapter is None
    with pytest.raises(EdgeRuntimeError) as refusal:
        edge_runtime.load(slotted, profile=tight, context_length=64, adapter=adapters["qv"])
    assert str(refusal.value) == plan_memory(slotted, tight, 64, adapter=adapters["qv"]).refusal()
    with pytest.raises(EdgeRuntimeError) as refusal:
        plan_memory(checkpoints[BASE], profile, adapter=adapters["qv"])
    assert str(refusal.value) == (f"--adapter {adapters['qv']}: {checkpoints[BASE]} is a checkpoint, with no LoRA "
                                  "slots to attach an adapter to; plan the artifact it exports with --lora-slots RANK")


def test_gemma3n_attached_equals_merged(checkpoints, tmp_path):
    """Gemma 3n's slots (its attention inputs are Gemma 4's; o_proj and the MLP its own, the gate's update before a
    sparse layer's cut-off): a rank-8 adapter on the seven projections attached gives the logits of it merged, and
    no adapter the slot-less export's."""
    base = checkpoints["3n-causal"]  # sparse MLPs on layers 0 and 1, 3 KV-shared layers
    adapter = make_adapter.make_adapter(base, tmp_path / "r8", r=8, target_modules=make_adapter.PROJECTIONS, seed=5)
    slotted = export_checkpoint(base, tmp_path / "slotted", lora_slots="8")
    merged = export_checkpoint(base, tmp_path / "merged", adapters=[adapter])
    plain = export_checkpoint(base, tmp_path / "plain")
    ids = _ids("3n-causal")
    model = edge_runtime.load(slotted, prefill_chunk=7, kv="fp32", adapter=adapter)
    for mode in ("prefill", "decode"):
        expected = _logits(merged, ids, mode)
        error = float(np.abs(model.logits(ids, mode=mode) - expected).max())
        unslotted = float(np.abs(_logits(slotted, ids, mode) - _logits(plain, ids, mode)).max())
        moved = float(np.abs(_logits(plain, ids, mode) - expected).max())
        print(f"gemma3n {mode}: attached vs merged max abs {error:.2e}, no adapter vs no slots {unslotted:.2e} (the "
              f"adapter moves the logits by {moved:.2f})")
        assert error <= TOLERANCE and unslotted <= TOLERANCE
        assert moved > 1000 * TOLERANCE
    slots = json.loads((slotted / "manifest.json").read_text())["lora_slots"]["tensors"]
    assert {name.rsplit(".", 1)[-1] for name in slots} == set(MODULES)


def _rewritten(adapter: Path, out: Path, rewrite: Callable[[str, np.ndarray], np.ndarray]) -> Path:
    """A copy of `adapter` with each tensor `value` of its weights file replaced by `rewrite(key, value)`."""
    import shutil

    from safetensors.numpy import load_file, save_file

    shutil.copytree(adapter, out)
    tensors = {key: rewrite(key, value) for key, value in load_file(adapter / "adapter_model.safetensors").items()}
    save_file(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
    return out


def _half_exact(adapter: Path, out: Path) -> Path:
    """A copy of `adapter` whose tensors hold float16 values (stored as they were, float32), so that float16 slots
    hold it exactly (its scaling, alpha / r = 2, keeps them so)."""
    return _rewritten(adapter, out, lambda key, value: value.astype(np.float16).astype(value.dtype))


def _node_counts(artifact: Path) -> dict[str, int]:
    """How many nodes of each op type the artifact's graphs hold together."""
    import onnx

    counts: dict[str, int] = {}
    for segment in json.loads((artifact / "manifest.json").read_text())["graphs"]["segments"]:
        for node in onnx.load(artifact / segment["graph"], load_external_data=False).graph.node:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def test_float16_slots_hold_a_float16_adapter_as_merged(checkpoints, adapters, tmp_path):
    """Float16 slots (edge-runtime's LoraSlot operator, one node a slot) beside fp32 weights: an adapter whose values
    float16 holds gives the logits of it merged at export to float32 precision, prefill and decode."""
    base, ids = checkpoints[BASE], _ids()
    half = export_checkpoint(base, tmp_path / "half", lora_slots="8", lora_slot_precision="fp16")
    assert json.loads((half / "manifest.json").read_text())["lora_slots"]["dtype"] == "float16"
    slotted = len(json.loads((half / "manifest.json").read_text())["lora_slots"]["tensors"])
    assert _node_counts(half)["LoraSlot"] == slotted and "MatMul" not in _node_counts(half)
    adapter = _half_exact(adapters["r8"], tmp_path / "r8-half")
    merged = export_checkpoint(base, tmp_path / "merged", adapters=[adapter])
    model = edge_runtime.load(half, prefill_chunk=7, kv="fp32", adapter=adapter)
    assert {a.dtype for a in model._adapter_feeds[model.adapter].values()} == {np.dtype(np.float16)}
    for mode in ("prefill", "decode"):
        error = float(np.abs(model.logits(ids, mode=mode) - _logits(merged, ids, mode)).max())
        print(f"float16 slots {mode}: attached vs merged max abs {error:.2e}")
        assert error <= TOLERANCE


def _int8_exact(adapter: Path, out: Path) -> Path:
    """A copy of `adapter` that int8 slots hold exactly: each row of lora_A and each column of lora_B (the slot's B
    rows, once scaled by alpha / r = 2) integers times a power of two, with a largest value of 127 of them, so that
    quantizing them (max / 127) finds that power of two and the integers again."""

    def exact(rows: np.ndarray, step: float) -> np.ndarray:
        codes = np.rint(rows / np.abs(rows).max(axis=1, keepdims=True) * 127)
        return (codes * step).astype(np.float32)

    def rewrite(key: str, value: np.ndarray) -> np.ndarray:
        if key.endswith("lora_A.weight"):
            return exact(value, 2.0 ** -10)
        if key.endswith("lora_B.weight"):
            return exact(value.T, 2.0 ** -12).T.copy()
        return value

    return _rewritten(adapter, out, rewrite)


def test_int8_slots_hold_an_int8_adapter_as_merged(checkpoints, adapters, tmp_path):
    """Int8 slots (LoraSlotInt8) beside fp32 weights: an adapter whose rows int8 holds gives the logits of it merged at
    export to float32 precision, prefill and decode."""
    base, ids = checkpoints[BASE], _ids()
    slots = export_checkpoint(base, tmp_path / "int8-slots", lora_slots="8", lora_slot_precision="int8")
    record = json.loads((slots / "manifest.json").read_text())["lora_slots"]
    assert record["dtype"] == "int8"
    assert _node_counts(slots)["LoraSlotInt8"] == len(record["tensors"]) and "MatMul" not in _node_counts(slots)
    adapter = _int8_exact(adapters["r8"], tmp_path / "r8-int8")
    merged = export_checkpoint(base, tmp_path / "merged", adapters=[adapter])
    model = edge_runtime.load(slots, prefill_chunk=7, kv="fp32", adapter=adapter)
    for mode in ("prefill", "decode"):
        error = float(np.abs(model.logits(ids, mode=mode) - _logits(merged, ids, mode)).max())
        print(f"int8 slots {mode}: attached vs merged max abs {error:.2e}")
        assert error <= TOLERANCE


@pytest.mark.parametrize("weights,dtype", [("fp32", "float32"), ("fp16", "float16"), ("int8", "int8"),
                                           ("int4", "int8"), ("fp32,o_proj=int4", "int8"), ("int4-mixed", "int8")])
def test_slot_precision_follows_the_weights(weights, dtype):
    """By default: float32 beside fp32 weights only, float16 beside float ones, int8 beside any integer ones."""
    from edge_runtime.export.exporter import SLOTTED_ROLES
    from edge_runtime.lora_slots import slot_dtype
    from edge_runtime.weight_recipe import parse_recipe

    recipe = parse_recipe(weights, 32)
    assert slot_dtype(None, tuple(recipe.format_for(role).name for role in SLOTTED_ROLES)) == dtype


def test_quantized_exports_take_int8_slots(checkpoints, adapters, tmp_path):
    """int4 weights take int8 slots by default, added in the projections' own MatMulInt4 nodes (no LoraSlotInt8
    node): with no adapter the logits of the slot-less int4 export exactly, with one the adapter's arrays at a
    quarter of float32's bytes (and a scale a rank row); in float16 slots, a value float16 cannot hold is refused in
    one line."""
    import onnx

    base, ids = checkpoints[BASE], _ids()
    slotted = export_checkpoint(base, tmp_path / "int4-slots", weights="int4", lora_slots="8")
    plain = export_checkpoint(base, tmp_path / "int4", weights="int4")
    assert json.loads((slotted / "manifest.json").read_text())["lora_slots"]["dtype"] == "int8"
    nodes = [n for f in slotted.glob("segment_*.onnx") for n in onnx.load(f, load_external_data=False).graph.node]
    fed = {name for n in nodes if n.op_type == "MatMulInt4" for name in n.input[4:]}
    assert not [n for n in nodes if n.op_type.startswith("LoraSlot")]
    assert fed == {name for t in json.loads((slotted / "manifest.json").read_text())["lora_slots"]["tensors"]
                   for name in (*slot_inputs(t), slot_scale(t))}
    for mode in ("prefill", "decode"):
        assert np.array_equal(_logits(slotted, ids, mode), _logits(plain, ids, mode))
    model = edge_runtime.load(slotted, kv="fp32", adapter=adapters["r8"])
    fed = sum(a.nbytes for a in model._adapter_feeds[model.adapter].values())
    tensors = json.loads((slotted / "manifest.json").read_text())["lora_slots"]["tensors"]
    assert fed == sum(8 * (k + n) + 4 * 8 for t, (k, n) in tensors.items()
                      if t.rsplit(".", 1)[-1] in make_adapter.PROJECTIONS)
    moved = np.abs(model.logits(ids, mode="decode") - _logits(plain, ids, "decode")).max()
    assert moved > 0.1, moved
    half = export_checkpoint(base, tmp_path / "int4-half-slots", weights="int4", lora_slots="8",
                             lora_slot_precision="fp16")
    huge = _half_exact(adapters["r8"], tmp_path / "huge")
    key = "base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"
    overwrite_first_value(huge, key, 1e5, "adapter_model.safetensors")
    with pytest.raises(EdgeRuntimeError) as refusal:
        edge_runtime.load(half, adapter=huge)
    assert str(refusal.value) == (
        f"{huge / 'adapter_model.safetensors'}: {key}: 200000 "
        "(with the adapter's scaling) is beyond the range of these LoRA slots' float16 (65504); export with "
        "--lora-slot-precision fp32, or merge it at export instead (edge-runtime export --adapter)")
