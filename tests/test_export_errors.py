"""Bad checkpoints: one-line error naming the file or tensor, non-zero exit, and no artifact left behind."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import build_checkpoint


def _export(checkpoint: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge_runtime", "export", str(checkpoint), "-o", str(out)],
                          capture_output=True, text=True, timeout=120)


@pytest.fixture()
def checkpoint(tmp_path) -> Path:
    """A fresh single-file f32 text-only checkpoint that each test may damage."""
    return build_checkpoint(tmp_path / "ckpt", "shared-gqa")


def _rewrite_safetensors(path: Path, edit) -> None:
    """Rewrite a safetensors file after `edit(header, blobs)` changed its header and tensor bytes."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    meta = header.pop("__metadata__", None)
    blobs = {k: data[8 + n + v["data_offsets"][0]: 8 + n + v["data_offsets"][1]] for k, v in header.items()}
    edit(header, blobs)
    offset, body, new_header = 0, b"", {} if meta is None else {"__metadata__": meta}
    for key, blob in blobs.items():
        new_header[key] = {**header[key], "data_offsets": [offset, offset + len(blob)]}
        body += blob
        offset += len(blob)
    raw = json.dumps(new_header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)


def _drop(name):
    def edit(header, blobs):
        del header[name], blobs[name]
    return edit


def _wrong_shape(name):
    def edit(header, blobs):
        rows, cols = header[name]["shape"]
        header[name]["shape"] = [rows // 2, cols * 2]
    return edit


def _config(**changes):
    def damage(ckpt: Path) -> None:
        config = json.loads((ckpt / "config.json").read_text())
        config.update(changes)
        (ckpt / "config.json").write_text(json.dumps(config))
    return damage


def _config_without(key):
    def damage(ckpt: Path) -> None:
        config = json.loads((ckpt / "config.json").read_text())
        del config[key]
        (ckpt / "config.json").write_text(json.dumps(config))
    return damage


CASES = {
    "missing config": (lambda c: (c / "config.json").unlink(), "config.json: missing"),
    "unsupported architecture": (_config(architectures=["LlamaForCausalLM"]),
                                 "architectures=['LlamaForCausalLM'] is not supported"),
    "unsupported feature": (_config(enable_moe_block=True), "unsupported enable_moe_block=True"),
    "unknown rope type": (_config(rope_parameters={"sliding_attention": {"rope_type": "yarn", "rope_theta": 1e4},
                                                   "full_attention": {"rope_type": "default", "rope_theta": 1e6}}),
                          "rope_parameters.sliding_attention.rope_type='yarn'"),
    "missing tensor": (lambda c: _rewrite_safetensors(c / "model.safetensors",
                                                      _drop("model.layers.2.mlp.up_proj.weight")),
                       "tensor model.layers.2.mlp.up_proj.weight is missing"),
    "wrong shape": (lambda c: _rewrite_safetensors(c / "model.safetensors",
                                                   _wrong_shape("model.layers.1.self_attn.q_proj.weight")),
                    ("tensor model.layers.1.self_attn.q_proj.weight has shape [96, 192], but config.json implies "
                     "[192, 96]")),
    "truncated file": (lambda c: (c / "model.safetensors").write_bytes((c / "model.safetensors").read_bytes()[:-1000]),
                       "model.safetensors: truncated"),
    "no tokenizer": (lambda c: (c / "tokenizer.json").unlink(), "tokenizer.json: missing"),
    # transformers would default these to 30 layers / 2304 wide: a size no E model has, found out much later
    "missing shape key": (_config_without("num_hidden_layers"),
                          "config.json: num_hidden_layers is missing; it sets the model's tensor shapes"),
    "missing head_dim": (_config_without("head_dim"), "config.json: head_dim is missing"),
    "layer_types a string": (_config(layer_types="oops"),
                             "config.json: layer_types must be a list of strings, got str 'oops'"),
    "layer_types with a number": (_config(layer_types=["sliding_attention", "full_attention", 3]),
                                  "config.json: layer_types[2] must be a string, got int 3"),
    "size as a string": (_config(hidden_size="96"), "config.json: hidden_size must be an integer, got str '96'"),
    "fractional size": (_config(intermediate_size=160.5),
                        "config.json: intermediate_size must be an integer, got float 160.5"),
    "zero heads": (_config(num_key_value_heads=0), "config.json: num_key_value_heads must be at least 1, got 0"),
    "rope as a string": (_config(rope_parameters="default"),
                         "config.json: rope_parameters must be an object, got str 'default'"),
    "eos as a string": (_config(eos_token_id="</s>"),
                        "config.json: eos_token_id must be a token id or a list of token ids, got str '</s>'"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_checkpoint_is_refused_cleanly(case, checkpoint, tmp_path):
    damage, message = CASES[case]
    damage(checkpoint)
    out_root = tmp_path / "out"
    out_root.mkdir()
    result = _export(checkpoint, out_root / "artifact")
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert message in lines[0]
    assert list(out_root.iterdir()) == []


def test_missing_shard_named(tmp_path):
    ckpt = build_checkpoint(tmp_path / "ckpt", "shared-mqa-wide")
    shard = max(ckpt.glob("model-*.safetensors"))
    shard.unlink()
    result = _export(ckpt, tmp_path / "artifact")
    assert result.returncode == 1
    assert f"{shard.name}: shard listed in model.safetensors.index.json is missing" in result.stderr
    assert not (tmp_path / "artifact").exists()


def test_existing_output_needs_force(checkpoint, tmp_path, artifacts):
    out = tmp_path / "artifact"
    shutil.copytree(artifacts["shared-gqa"], out)
    result = _export(checkpoint, out)
    assert result.returncode == 1 and "already exists" in result.stderr
    forced = subprocess.run([sys.executable, "-m", "edge_runtime", "export", str(checkpoint), "-o", str(out),
                             "--force"], capture_output=True, text=True, timeout=120)
    assert forced.returncode == 0, forced.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifact", "ckpt"]


def test_failure_midway_leaves_nothing(checkpoint, tmp_path, monkeypatch):
    """An error after files were written (here: while copying the tokenizer) removes the partial directory."""
    from edge_runtime.errors import UnwritableError
    from edge_runtime.export import exporter

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(exporter, "_copy_tokenizer", explode)
    with pytest.raises(UnwritableError, match="cannot write the artifact at .*: disk full; choose an output path"):
        exporter.export_checkpoint(checkpoint, tmp_path / "out" / "artifact")
    assert list((tmp_path / "out").iterdir()) == []


def test_a_wrapped_config_names_the_key_under_text_config():
    """In the multimodal layout the text model's keys live under text_config, and the message says so."""
    from edge_runtime.errors import CheckpointError
    from edge_runtime.families import spec_from_hf_config

    config = json.loads((Path(__file__).parents[1] / "edge_runtime/model_configs/gemma-4-e2b.json").read_text())
    assert spec_from_hf_config(config).num_hidden_layers == 35
    del config["text_config"]["hidden_size"]
    with pytest.raises(CheckpointError, match=r"^e2b/config.json: text_config.hidden_size is missing; "):
        spec_from_hf_config(config, "e2b/config.json")
