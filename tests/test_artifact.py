"""What export writes: manifest with checksums, the PLE table outside every graph, weights mapped not inlined."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from conftest import overwrite_first_value
from edge_runtime.artifact import FORMAT_VERSION, MANIFEST, read_manifest, sha256_file, verify_artifact
from edge_runtime.errors import ArtifactError, CheckpointError
from edge_runtime.export import export_checkpoint
from edge_runtime.export.checkpoint import Checkpoint
from edge_runtime.families.contract import segment_graph
from edge_runtime.ple_store import decode_rows, storage_dtype, stored_width


def test_manifest_lists_every_file_with_its_checksum(artifacts):
    path = artifacts["shared-mqa-wide"]
    manifest = read_manifest(path)
    on_disk = {p.name for p in path.iterdir()} - {MANIFEST}
    assert set(manifest.files) == on_disk
    for name, entry in manifest.files.items():
        assert entry["size"] == (path / name).stat().st_size
        assert entry["sha256"] == sha256_file(path / name)
    assert manifest.formats == {"weights": "fp32", "block_size": 32, "ple": "bf16"}  # auto: the checkpoint's bf16
    assert manifest.tokenizer["chat_template"] == "chat_template.jinja"
    assert manifest.source["architecture"] == "Gemma4ForConditionalGeneration"
    assert verify_artifact(path) == {}


def test_ple_table_lives_only_in_the_store(artifacts, checkpoints):
    name = "shared-mqa-wide"
    path = artifacts[name]
    manifest = read_manifest(path)
    spec = manifest.spec
    table_values = spec.vocab_size_per_layer_input * spec.num_hidden_layers * spec.hidden_size_per_layer_input
    assert (path / "ple.bin").stat().st_size == table_values * 2  # bf16, nothing else in the file
    segments = [segment.graph for segment in manifest.graphs.segments]
    assert segments == [segment_graph(i) for i in range(spec.num_hidden_layers + 1)]
    for graph in segments:
        model = onnx.load(path / graph, load_external_data=False)
        for init in model.graph.initializer:
            assert int(np.prod(init.dims)) < table_values, f"{graph}: {init.name} is as big as the PLE table"
        for value in model.graph.input:
            dims = [d.dim_value for d in value.type.tensor_type.shape.dim]
            assert spec.vocab_size_per_layer_input not in dims, f"{graph}: input {value.name} spans the vocabulary"
    expected = Checkpoint(checkpoints[name]).tensor("embed_tokens_per_layer.weight")
    stored = np.fromfile(path / "ple.bin", dtype=np.uint16).reshape(expected.shape)
    np.testing.assert_array_equal(decode_rows(stored, "bf16", expected.shape[1]), expected)


FP16_SUBNORMAL_STEP = 2.0 ** -24


@pytest.mark.parametrize("fmt,checkpoint,bound", [
    ("bf16", "shared-mqa-wide", 0.0),  # auto's choice for a bf16 checkpoint: exact
    ("fp32", "shared-gqa", 0.0),  # auto's choice for an f32 checkpoint: exact
    ("fp16", "shared-mqa-wide", FP16_SUBNORMAL_STEP),  # bf16 -> fp16 loses bits only below fp16's normal range
    ("fp16", "shared-gqa", 1e-3),  # f32 -> fp16 rounds every value (relative to the largest)
    ("int8", "shared-gqa", 1 / 254),  # half a step of 127 levels, relative to the largest value
    ("int4", "shared-mqa-wide", 1 / 8),  # Q4_0's grid ends one step short on the side opposite the extreme
])
def test_ple_formats(fmt, checkpoint, bound, checkpoints, tmp_path):
    path = export_checkpoint(checkpoints[checkpoint], tmp_path / "a", ple=fmt)
    manifest = read_manifest(path)
    assert manifest.formats["ple"] == fmt
    expected = Checkpoint(checkpoints[checkpoint]).tensor("embed_tokens_per_layer.weight")
    vocab, width = expected.shape
    row = stored_width(fmt, width)
    assert (path / "ple.bin").stat().st_size == vocab * row * storage_dtype(fmt).itemsize
    assert manifest.read_per_token["ple_row"] == row * storage_dtype(fmt).itemsize
    raw = np.fromfile(path / "ple.bin", dtype=storage_dtype(fmt)).reshape(vocab, row)
    error = float(np.abs(decode_rows(raw, fmt, width) - expected).max())
    if bound < FP16_SUBNORMAL_STEP * 2:
        assert error <= bound
    else:
        assert 0 < error <= bound * float(np.abs(expected).max())


def test_ple_fp16_overflow_is_refused(checkpoints, tmp_path):
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(checkpoints["shared-gqa"], ckpt)
    overwrite_first_value(ckpt, "model.embed_tokens_per_layer.weight", 1e6)
    with pytest.raises(CheckpointError, match="outside the fp16 range .* export with --ple bf16 or fp32"):
        export_checkpoint(ckpt, tmp_path / "a", ple="fp16")
    assert list(tmp_path.iterdir()) == [ckpt]


def test_big_weights_are_external_and_aligned(artifacts):
    path = artifacts["shared-gqa"]
    model = onnx.load(path / segment_graph(1), load_external_data=False)
    external = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert external, "matmul weights should live in weights.bin"
    for tensor in external:
        info = {e.key: e.value for e in tensor.external_data}
        assert info["location"] == "weights.bin" and int(info["offset"]) % 65536 == 0
    assert (path / segment_graph(1)).stat().st_size < 64 << 10


def test_damaged_artifact_is_reported(artifacts, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(artifacts["shared-gqa"], copy)
    data = bytearray((copy / segment_graph(2)).read_bytes())
    data[len(data) // 2] ^= 0x01
    (copy / segment_graph(2)).write_bytes(bytes(data))
    assert verify_artifact(copy) == {segment_graph(2): "SHA-256 mismatch"}
    (copy / "ple.bin").write_bytes(b"short")
    with pytest.raises(ArtifactError, match="ple.bin: size 5 differs from the manifest"):
        read_manifest(copy)
    (copy / MANIFEST).write_text(json.dumps({"format": "edge-runtime-artifact", "format_version": 99}))
    with pytest.raises(ArtifactError, match="format_version 99 is not supported"):
        read_manifest(copy)


def test_an_artifact_from_before_the_graph_contract_asks_for_a_re_export(artifacts, tmp_path):
    """Version 4 manifests named their graphs and the one taking rows, not how to run them: refused, not guessed."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(artifacts["shared-gqa"], copy)
    data = json.loads((copy / MANIFEST).read_text())
    data.update(format_version=4, graphs={"segments": [s["graph"] for s in data["graphs"]["segments"]],
                                          "rows_segment": 4})
    (copy / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(ArtifactError) as info:
        read_manifest(copy)
    assert str(info.value) == (f"{copy / MANIFEST}: format_version 4 is not supported by this runtime (reads {FORMAT_VERSION}); "
                               "re-export the checkpoint with this version of edge-runtime")


def test_export_never_reads_tower_tensors(checkpoints, tmp_path, monkeypatch):
    """The multimodal checkpoint's vision/audio tensors are skipped: only text-model bytes are read."""
    from edge_runtime.safetensors_reader import SafetensorsFile

    read: list[str] = []
    original = SafetensorsFile.read

    def spy(self, name, rows=None):
        read.append(name)
        return original(self, name, rows)

    monkeypatch.setattr(SafetensorsFile, "read", spy)
    export_checkpoint(checkpoints["shared-mqa-wide"], tmp_path / "a")
    assert read and all(name.startswith("model.language_model.") for name in read)
    towers = [n for f in Checkpoint(checkpoints["shared-mqa-wide"])._files.values() for n in f.entries
              if not n.startswith("model.language_model.")]
    assert towers, "the test checkpoint should contain tower tensors"


def test_ple_format_and_stored_dtype_must_agree(artifacts, tmp_path):
    import shutil

    import edge_runtime

    copy = tmp_path / "copy"
    shutil.copytree(artifacts["shared-mqa-wide"], copy)
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["formats"]["ple"] = "fp16"  # the store holds bf16 bits (uint16): decoding them as fp16 would be garbage
    (copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="stores PLE format fp16 as uint16, not float16"):
        edge_runtime.load(copy)
