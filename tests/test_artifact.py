"""What export writes: manifest with checksums, the PLE table outside every graph, weights mapped not inlined."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from edge_runtime.artifact import MANIFEST, read_manifest, sha256_file, verify_artifact
from edge_runtime.errors import ArtifactError
from export.checkpoint import Checkpoint


def test_manifest_lists_every_file_with_its_checksum(artifacts):
    path = artifacts["shared-mqa-wide"]
    manifest = read_manifest(path)
    on_disk = {p.name for p in path.iterdir()} - {MANIFEST}
    assert set(manifest.files) == on_disk
    for name, entry in manifest.files.items():
        assert entry["size"] == (path / name).stat().st_size
        assert entry["sha256"] == sha256_file(path / name)
    assert manifest.formats == {"weights": "fp32", "ple": "fp16", "kv": "fp32"}
    assert manifest.tokenizer["chat_template"] == "chat_template.jinja"
    assert manifest.source["architecture"] == "Gemma4ForConditionalGeneration"
    assert verify_artifact(path) == []


def test_ple_table_lives_only_in_the_store(artifacts, checkpoints):
    name = "shared-mqa-wide"
    path = artifacts[name]
    manifest = read_manifest(path)
    spec = manifest.spec
    table_values = spec.vocab_size_per_layer_input * spec.num_hidden_layers * spec.hidden_size_per_layer_input
    assert (path / "ple.bin").stat().st_size == table_values * 2  # fp16, nothing else in the file
    for graph in [manifest.graphs["prologue"], *manifest.graphs["layers"], manifest.graphs["head"]]:
        model = onnx.load(path / graph, load_external_data=False)
        for init in model.graph.initializer:
            assert int(np.prod(init.dims)) < table_values, f"{graph}: {init.name} is as big as the PLE table"
        for value in model.graph.input:
            dims = [d.dim_value for d in value.type.tensor_type.shape.dim]
            assert spec.vocab_size_per_layer_input not in dims, f"{graph}: input {value.name} spans the vocabulary"
    expected = Checkpoint(checkpoints[name]).tensor("embed_tokens_per_layer.weight")
    stored = np.fromfile(path / "ple.bin", dtype=np.float16).reshape(expected.shape)
    np.testing.assert_array_equal(stored.astype(np.float32), expected)  # bf16 values are exact in fp16


def test_big_weights_are_external_and_aligned(artifacts):
    path = artifacts["shared-gqa"]
    model = onnx.load(path / "layer_00.onnx", load_external_data=False)
    external = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert external, "matmul weights should live in weights.bin"
    for tensor in external:
        info = {e.key: e.value for e in tensor.external_data}
        assert info["location"] == "weights.bin" and int(info["offset"]) % 65536 == 0
    assert (path / "layer_00.onnx").stat().st_size < 64 << 10


def test_damaged_artifact_is_reported(artifacts, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(artifacts["shared-gqa"], copy)
    data = bytearray((copy / "layer_01.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01
    (copy / "layer_01.onnx").write_bytes(bytes(data))
    assert verify_artifact(copy) == ["layer_01.onnx"]
    (copy / "ple.bin").write_bytes(b"short")
    with pytest.raises(ArtifactError, match="ple.bin: size 5 differs from the manifest"):
        read_manifest(copy)
    (copy / MANIFEST).write_text(json.dumps({"format": "edge-runtime-artifact", "format_version": 99}))
    with pytest.raises(ArtifactError, match="format_version 99 is not supported"):
        read_manifest(copy)
