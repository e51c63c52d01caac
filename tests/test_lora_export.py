"""LoRA adapters merged at export (`export --adapter`): fp32 artifacts against transformers + PEFT's own merge
(`PeftModel.from_pretrained(...).merge_and_unload()`), logits within 1e-4 in prefill and decode, for every PEFT
feature edge-runtime merges, on both checkpoint layouts; the manifest's record; adapters refused in one line naming
the key with nothing written; and a checkpoint merged by Unsloth (save_pretrained_merged) exported as it is."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import edge_runtime
from conftest import CONFIGS
from edge_runtime.export import export_checkpoint
from edge_runtime.lora_adapter import AdapterError

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "tools"))
import make_adapter

TOLERANCE = 1e-4
PATTERN_TARGETS = r".*\.(q_proj|o_proj|down_proj|per_layer_input_gate)"

# name: (checkpoint of conftest.CONFIGS, [(make_adapter options, scale)]): together every feature, both layouts.
CASES = {
    "lora-multimodal": ("shared-mqa-wide", [(dict(r=8, alpha=16), 1.0)]),
    "rslora-causal": ("shared-gqa", [(dict(r=8, alpha=4, use_rslora=True, target_modules=make_adapter.PROJECTIONS),
                                      1.0)]),
    "dora-layers-multimodal": ("unshared-f16", [(dict(r=4, alpha=8, use_dora=True, layers_to_transform=[0, 2],
                                                      target_modules=make_adapter.PROJECTIONS), 1.0)]),
    "patterns-causal": ("shared-gqa", [(dict(r=4, alpha=8, target_modules=PATTERN_TARGETS,
                                             rank_pattern={"q_proj": 2, "layers.1.mlp.down_proj": 6},
                                             alpha_pattern={"o_proj": 3}, fan_in_fan_out=True), 1.0)]),
    "modules-to-save": ("shared-mqa-wide", [(dict(r=4, modules_to_save=["embed_tokens", "norm"],
                                                  ensure_weight_tying=True), 1.0)]),
    "stacked-scaled": ("shared-gqa", [(dict(r=4, seed=1), 0.5), (dict(r=2, use_dora=True, seed=2), 1.5)]),
    "gemma3n-causal": ("3n-causal", [(dict(r=4, alpha=8), 1.0)]),
}


def _ids(name: str, length: int = 40) -> np.ndarray:
    vocab = CONFIGS[name]["text"]["vocab_size_per_layer_input"]
    return np.concatenate([[2], np.random.default_rng(0).integers(3, vocab, length - 1)])


def _peft_merged(checkpoint, adapters: list, scales: list[float]):
    """transformers' model of the checkpoint (its own class and loader, float32), each adapter loaded by PEFT, scaled
    by PEFT, merged by PEFT, in order."""
    import transformers
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    config = json.loads((checkpoint / "config.json").read_text())
    model = getattr(transformers, config["architectures"][0]).from_pretrained(
        checkpoint, dtype=torch.float32, attn_implementation="eager").eval()
    for adapter, scale in zip(adapters, scales):
        model = PeftModel.from_pretrained(model, adapter)
        for module in model.modules():
            if isinstance(module, LoraLayer):
                module.scale_layer(scale)
        model = model.merge_and_unload()
    return model


@pytest.fixture(scope="module")
def adapters(checkpoints, tmp_path_factory) -> dict[str, list]:
    root = tmp_path_factory.mktemp("adapters")
    return {case: [make_adapter.make_adapter(checkpoints[base], root / f"{case}-{i}", **options)
                   for i, (options, _) in enumerate(specs)]
            for case, (base, specs) in CASES.items()}


@pytest.mark.parametrize("case", list(CASES))
def test_merged_export_matches_peft_merge(case, checkpoints, adapters, tmp_path):
    base, specs = CASES[case]
    scales = [scale for _, scale in specs]
    artifact = export_checkpoint(checkpoints[base], tmp_path / "art", adapters=adapters[case], adapter_scales=scales)
    ids = _ids(base)
    with torch.no_grad():
        expected = _peft_merged(checkpoints[base], adapters[case], scales)(torch.tensor(ids)[None]).logits[0].numpy()
    model = edge_runtime.load(artifact, prefill_chunk=7, kv="fp32")
    unchanged = edge_runtime.load(export_checkpoint(checkpoints[base], tmp_path / "base"), kv="fp32").logits(ids)
    for mode in ("prefill", "decode"):
        error = float(np.abs(model.logits(ids, mode=mode) - expected).max())
        print(f"{case} {mode}: max abs error {error:.2e} (the adapter moves the logits by "
              f"{np.abs(unchanged - expected).max():.2f})")
        assert error <= TOLERANCE
    assert np.abs(unchanged - expected).max() > 100 * TOLERANCE  # the adapter changed the model


def test_manifest_records_the_adapters(checkpoints, adapters, tmp_path):
    import hashlib

    first, second = adapters["stacked-scaled"]
    artifact = export_checkpoint(checkpoints["shared-gqa"], tmp_path / "art", adapters=[first, second],
                                 adapter_scales=[0.5, 1.5], weights="int4")
    record = json.loads((artifact / "manifest.json").read_text())["adapters"]
    assert record == [{"name": path.name, "scale": scale,
                       "sha256": {file: hashlib.sha256((path / file).read_bytes()).hexdigest()
                                  for file in ("adapter_config.json", "adapter_model.safetensors")}}
                      for path, scale in ((first, 0.5), (second, 1.5))]
    assert edge_runtime.load(artifact).manifest.adapters == tuple(record)
    plain = export_checkpoint(checkpoints["shared-gqa"], tmp_path / "plain")
    assert json.loads((plain / "manifest.json").read_text())["adapters"] == []


def test_int4_quantizes_the_merged_weights(checkpoints, adapters, tmp_path):
    """An int4 export with the adapter is the int4 export of PEFT's merged checkpoint (saved by transformers)."""
    base, case = checkpoints["shared-gqa"], "rslora-causal"
    merged = tmp_path / "merged"
    _peft_merged(base, adapters[case], [1.0]).save_pretrained(merged)
    for file in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(base / file, merged / file)
    ours = edge_runtime.load(export_checkpoint(base, tmp_path / "ours", adapters=adapters[case], weights="int4"),
                             kv="fp32")
    theirs = edge_runtime.load(export_checkpoint(merged, tmp_path / "theirs", weights="int4"), kv="fp32")
    ids = _ids("shared-gqa")
    error = float(np.abs(ours.logits(ids) - theirs.logits(ids)).max())
    print(f"int4 with --adapter against int4 of PEFT's merged checkpoint: max abs {error:.2e}")
    assert error <= 1e-3


def _rewrite(adapter, out, rename=None, drop=(), config=None):
    """A copy of `adapter` with keys renamed / dropped and config fields changed (a broken or foreign adapter)."""
    from safetensors.numpy import load_file, save_file

    out.mkdir()
    tensors = load_file(adapter / "adapter_model.safetensors")
    tensors = {(rename(k) if rename else k): v for k, v in tensors.items() if not any(d in k for d in drop)}
    save_file(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**cfg, **(config or {})}))
    return out


Q0 = "base_model.model.model.language_model.layers.0.self_attn.q_proj"
VISION_Q0 = "base_model.model.model.vision_tower.encoder.layers.0.self_attn.q_proj"


@pytest.mark.parametrize("kind,message", [
    ("vision", ("{file}: base_model.model.model.vision_tower.encoder.layers.0.self_attn.q_proj.lora_A.weight: adapts "
               "the vision or audio tower, which edge-runtime does not run; train with target_modules limited to the "
               "language model")),
    ("layer", ("{file}: base_model.model.model.language_model.layers.9.self_attn.q_proj.lora_A.weight: the base "
              "checkpoint has no linear weight layers.9.self_attn.q_proj.weight; was the adapter trained on another "
              "model?")),
    ("shape", ("{file}: base_model.model.model.language_model.layers.0.mlp.down_proj.lora_A.weight: lora_A [8, 128] "
               "and lora_B [64, 8] do not fit the base's layers.0.mlp.down_proj.weight [48, 96]; was the adapter "
               "trained on another model?")),
    ("rank", (f"{{file}}: {Q0}.lora_A.weight: rank 8, but adapter_config.json gives this module r=2 (r, rank_pattern); "
             "the adapter is inconsistent")),
    ("untargeted", (f"{{file}}: {Q0}.lora_A.weight: module model.language_model.layers.0.self_attn.q_proj is not among "
                   "target_modules of adapter_config.json; the adapter is inconsistent, save it again with PEFT")),
    ("no-b", (f"{{file}}: {Q0}.lora_A.weight: has no lora_B beside it; the adapter file is incomplete, save it again")),
    ("untied", ("{file}: base_model.model.model.language_model.embed_tokens.weight: retrains embed_tokens but not the LM "
               "head tied to it, so PEFT's merge would untie them; train with ensure_weight_tying=True (or leave "
               "embed_tokens out of modules_to_save)")),
])
def test_refused_adapters_name_the_key_and_write_nothing(kind, message, checkpoints, adapters, tmp_path):
    plain, tied = adapters["lora-multimodal"][0], adapters["modules-to-save"][0]
    base = checkpoints["unshared-f16"] if kind == "shape" else checkpoints["shared-mqa-wide"]
    bad = {
        "vision": lambda: _rewrite(plain, tmp_path / "bad", lambda k: k.replace(Q0, VISION_Q0)),
        "layer": lambda: _rewrite(plain, tmp_path / "bad", lambda k: k.replace(Q0, Q0.replace(".0.", ".9."))),
        "shape": lambda: plain,
        "rank": lambda: _rewrite(plain, tmp_path / "bad", config={"rank_pattern": {"q_proj": 2}}),
        "untargeted": lambda: _rewrite(plain, tmp_path / "bad", config={"target_modules": ["k_proj", "v_proj", "o_proj",
                                       "gate_proj", "up_proj", "down_proj", "per_layer_input_gate",
                                       "per_layer_projection", "per_layer_model_projection"]}),
        "no-b": lambda: _rewrite(plain, tmp_path / "bad", drop=[f"{Q0}.lora_B"]),
        "untied": lambda: _rewrite(tied, tmp_path / "bad", drop=["lm_head"]),
    }[kind]()
    out = tmp_path / "art"
    with pytest.raises(AdapterError) as refusal:
        export_checkpoint(base, out, adapters=[bad])
    assert str(refusal.value) == message.format(file=bad / "adapter_model.safetensors")
    assert not out.exists() and not list(tmp_path.glob(".art.partial-*"))


def test_cli_refusal_is_one_line(checkpoints, adapters, tmp_path):
    out = tmp_path / "art"
    result = subprocess.run([sys.executable, "-m", "edge_runtime", "export", str(checkpoints["shared-gqa"]), "-o",
                             str(out), "--adapter", str(adapters["lora-multimodal"][0]), "--adapter",
                             str(adapters["rslora-causal"][0]), "--adapter-scale", "1", "--adapter-scale", "2",
                             "--adapter-scale", "3"], capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr == ("error: --adapter-scale given 3 times for 2 adapters; give it once (for all) or once per "
                             "--adapter\n")
    assert not out.exists()


def _unsloth_merged(base, adapter, out):
    """What Unsloth's save_pretrained_merged(..., save_method="merged_16bit") writes (unsloth_zoo's
    merge_and_overwrite_lora): each of the base's safetensors shards, under its own name and with the base's index,
    rewritten with W + s B A merged in float32 and cast back to the base's dtype (bf16), every other tensor (the
    towers too) as it was, metadata {"format": "pt"}; the base's config.json and other files beside them, the
    tokenizer saved again (with special_tokens_map.json)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    cfg = json.loads((adapter / "adapter_config.json").read_text())
    scaling = cfg["lora_alpha"] / cfg["r"]
    with safe_open(adapter / "adapter_model.safetensors", "pt") as f:
        keys = f.keys()
        lora = {k[len("base_model.model."):-len(".lora_A.weight")] + ".weight": (f.get_tensor(k), f.get_tensor(
            k.replace("lora_A", "lora_B"))) for k in keys if k.endswith(".lora_A.weight")}
    out.mkdir()
    for file in base.iterdir():
        if file.suffix != ".safetensors":
            shutil.copy(file, out / file.name)
    for shard in base.glob("*.safetensors"):
        tensors = {}
        with safe_open(shard, "pt") as f:
            keys = f.keys()
            for key in keys:
                weight = f.get_tensor(key)
                if key in lora:
                    a, b = lora[key]
                    weight = weight.to(torch.float32).addmm_(b, a, alpha=scaling).to(weight.dtype)
                tensors[key] = weight
        save_file(tensors, out / shard.name, metadata={"format": "pt"})
    (out / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<bos>", "eos_token": "<eos>",
                                                             "pad_token": "<pad>"}))
    return out


def test_unsloth_merged_checkpoint_exports_unchanged(checkpoints, adapters, tmp_path):
    from conftest import reference_model

    base = checkpoints["shared-mqa-wide"]  # multimodal, bf16, sharded with an index: as Gemma 4 is published
    merged = _unsloth_merged(base, adapters["lora-multimodal"][0], tmp_path / "unsloth")
    assert sorted(p.name for p in merged.glob("*.safetensors")) == sorted(p.name for p in base.glob("*.safetensors"))
    model = edge_runtime.load(export_checkpoint(merged, tmp_path / "art"), prefill_chunk=7, kv="fp32")
    ids = _ids("shared-mqa-wide")
    with torch.no_grad():
        expected = reference_model(merged)(torch.tensor(ids)[None]).logits[0].numpy()
    for mode in ("prefill", "decode"):
        error = float(np.abs(model.logits(ids, mode=mode) - expected).max())
        print(f"Unsloth-merged checkpoint {mode}: max abs error {error:.2e}")
        assert error <= TOLERANCE
