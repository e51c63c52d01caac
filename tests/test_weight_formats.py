"""Weight formats and recipes: each format's row codes decode within its rounding step and its linear emits its kernel
with exactly the bytes the planner counts; a recipe's text is parsed or refused in one line naming the bad part; a
mixed recipe's artifact records and holds each tensor group's format, the planner counts those groups' bytes exactly,
and an artifact written before recipes reads as its one format."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import edge_runtime
from conftest import overwrite_first_value
from edge_runtime.artifact import MANIFEST, read_manifest
from edge_runtime.errors import ArtifactError, CheckpointError, EdgeRuntimeError
from edge_runtime.export import export_checkpoint
from edge_runtime.export.onnx_graph import GraphBuilder, WeightsWriter
from edge_runtime.families import family_of
from edge_runtime.planner import linear_formats, read_per_token, read_per_token_by_format
from edge_runtime.weight_formats import NBITS_ACCURACY_LEVEL, Float16, Float32, Int4, Int8, Int8Block, WeightFormat
from edge_runtime.weight_recipe import EMBED, O_PROJ, PER_LAYER, ROLES, parse_recipe

FORMATS = [Float32(), Float16(), Int8(), Int4(32), Int4(64), Int4(128), Int8Block(32), Int8Block(128)]
KERNELS = {"fp32": ["Gemm"], "fp16": ["Cast", "Gemm", "Cast"], "int8": ["MatMulInt8"],
           "int4": ["MatMulInt4"], "int8-block": ["MatMulNBits"]}
MIXED = "int4,o_proj=int8,per_layer=int8,embed=int8"
ROLE_LIST = ", ".join(ROLES)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.label)
def test_embedding_rows_round_trip_within_the_formats_step(fmt: WeightFormat):
    rows = np.random.default_rng(0).standard_normal((5, 200)).astype(np.float32)
    codes, scales = fmt.encode_rows(rows)
    (code_shape, code_dtype), scale_layout = fmt.row_layout(200)
    per = fmt.rows_per_record  # int4's tiles hold 16 rows, the last one padded
    assert codes.shape == (-(-5 // per), *code_shape) and codes.dtype == code_dtype
    if scale_layout is None:
        assert scales is None
    else:
        assert scales.shape == (-(-5 // per), *scale_layout[0]) and scales.dtype == scale_layout[1]
    assert fmt.row_bytes(200) == codes[0].nbytes + (0 if scales is None else scales[0].nbytes)
    ids = np.array([3, 0, 4, 1, 2])
    codes, scales = fmt.select_rows(codes[ids // per], None if scales is None else scales[ids // per], ids % per)
    rows = rows[ids]
    error = np.abs(fmt.decode_rows(codes, scales, 200) - rows)
    if fmt.name == "fp32":
        assert error.max() == 0
    elif fmt.name == "fp16":
        assert 0 < error.max() and (error <= np.abs(rows) * 2.0 ** -11).all()
    elif fmt.name == "int8":  # half a step of the row's scale
        assert 0 < error.max() and (error <= scales[:, None] / 2 + 1e-7).all()
    elif fmt.name == "int8-block":  # half a step of the block's scale
        step = scales.repeat(fmt.block_size, axis=1)[:, :200]
        assert 0 < error.max() and (error <= step / 2 + 1e-7).all()
    else:  # Q4_0: one step of the block's scale (the grid ends a step short opposite the extreme)
        step = np.abs(scales).repeat(fmt.block_size, axis=1)[:, :200]
        assert 0 < error.max() and (error <= step + 1e-6).all()


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.label)
def test_a_linear_emits_its_kernel_with_the_bytes_the_planner_counts(fmt: WeightFormat, tmp_path: Path):
    n, k = 48, 200  # k not a multiple of any block: int4 pads the last one
    w = np.random.default_rng(1).standard_normal((n, k)).astype(np.float32)
    with WeightsWriter(tmp_path / "weights.bin") as writer:
        g = GraphBuilder("one", writer)
        g.output(g.linear(g.input("x", ["T", k]), "layers.0.w", w, fmt), "y", ["T", n])
        g.save(tmp_path / "one.onnx")
    assert g.linears == {"layers.0.w": fmt}
    graph = onnx.load(str(tmp_path / "one.onnx"), load_external_data=False).graph
    assert [node.op_type for node in graph.node if node.op_type != "Identity"] == KERNELS[fmt.name]
    assert _group_bytes(graph) == {"layers.0.w": fmt.linear_bytes(n, k)[0]}
    if fmt.name == "int8-block":
        (node,) = graph.node[:1]
        attrs = {a.name: a.i for a in node.attribute}
        assert attrs == {"K": k, "N": n, "bits": 8, "block_size": fmt.block_size,
                         "accuracy_level": NBITS_ACCURACY_LEVEL}


def test_a_checkpoint_weight_needs_its_format(tmp_path: Path):
    with WeightsWriter(tmp_path / "weights.bin") as writer:
        g = GraphBuilder("one", writer)
        with pytest.raises(TypeError, match="linear w: a checkpoint weight needs the format to write it in"):
            g.linear(g.input("x", ["T", 4]), "w", np.ones((2, 4), np.float32))


@pytest.mark.parametrize("text,canonical", [
    ("int4", "int4"),
    ("int4-mixed", "int4,qkv=int8,per_layer=int8"),
    (" int4 , per_layer = int8 ,o_proj=int8", "int4,o_proj=int8,per_layer=int8"),  # roles in ROLES order
    ("int8,embed=int8", "int8"),  # an override equal to the base is the base
    ("int4-mixed,embed=fp16", "int4,qkv=int8,per_layer=int8,embed=fp16"),
])
def test_recipes_read_as_their_canonical_text(text: str, canonical: str):
    recipe = parse_recipe(text, 64)
    assert recipe.text == canonical
    for role in ROLES:
        expected = dict(part.split("=") for part in canonical.split(",")[1:]).get(role, canonical.split(",")[0])
        assert recipe.format_for(role).name == expected
        assert recipe.format_for(role).block_size == (64 if expected == "int4" else None)


def test_recipe_labels_and_blocks():
    assert parse_recipe("int4-mixed", 128).label == "int4 b128, qkv int8, per_layer int8"
    assert parse_recipe("int4-mixed", 128).block_size == 128
    assert parse_recipe("int8,embed=fp16", 128).block_size is None
    assert parse_recipe("fp32,qkv=int4", 32).block_size == 32


@pytest.mark.parametrize("text,message", [
    ("int3", ("not available; choose one of fp32, fp16, int8, int4, int8-block or a named recipe (int4-mixed), then "
              "any ROLE=FORMAT overrides")),
    ("int4,oproj=int8", f"unknown role 'oproj'; roles: {ROLE_LIST}"),
    ("int4,v_proj=int8", (f"unknown role 'v_proj' (v_proj is computed in one matrix with the rest of qkv: give qkv); "
                         f"roles: {ROLE_LIST}")),
    ("int4,up_proj=int8", (f"unknown role 'up_proj' (up_proj is computed in one matrix with the rest of gate_up: give "
                          f"gate_up); roles: {ROLE_LIST}")),
    ("int4,o_proj=int9", "o_proj=int9: not available; choose one of fp32, fp16, int8, int4, int8-block"),
    ("int4,o_proj", f"'o_proj' is not ROLE=FORMAT (e.g. o_proj=int8); roles: {ROLE_LIST}"),
    ("o_proj=int8,int4", ("'o_proj=int8' comes first; a recipe starts with its base: fp32, fp16, int8, int4, "
                         "int8-block or a named recipe (int4-mixed)")),
    ("int4,o_proj=int8,o_proj=fp16", "o_proj is given twice"),
    ("int4,,o_proj=int8", "an empty part; write BASE[,ROLE=FORMAT...], e.g. int4,o_proj=int8"),
    ("int4", "block size 48 is not available for int4; choose one of 32, 64, 128"),
])
def test_bad_recipes_are_refused_in_one_line(text: str, message: str):
    with pytest.raises(ValueError) as refused:
        parse_recipe(text, 48 if message.startswith("block size") else 32)
    assert str(refused.value) == message


def test_export_refuses_a_bad_recipe_naming_the_part(checkpoints, tmp_path: Path):
    out = tmp_path / "a"
    result = subprocess.run([sys.executable, "-m", "edge_runtime", "export", str(checkpoints["shared-gqa"]), "-o",
                             str(out), "--weights", "int4,o_proj=int8,mlp=int8"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 1
    assert result.stderr == f"error: --weights int4,o_proj=int8,mlp=int8: unknown role 'mlp'; roles: {ROLE_LIST}\n"
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def mixed(checkpoints, tmp_path_factory) -> Path:
    return export_checkpoint(checkpoints["shared-gqa"], tmp_path_factory.mktemp("mixed") / "a", weights=MIXED,
                             block_size=64)


def _group_bytes(graph: onnx.GraphProto) -> dict[str, int]:
    """Bytes of each linear's initializers ("NAME.<part>", inline or in weights.bin), by NAME."""
    found: dict[str, int] = defaultdict(int)
    for tensor in graph.initializer:
        name, _, part = tensor.name.rpartition(".")
        if part not in ("weight", "weight_t", "codes", "scale", "zero_point") or name.endswith("norm"):
            continue
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            found[name] += int({e.key: e.value for e in tensor.external_data}["length"])
        else:
            found[name] += numpy_helper.to_array(tensor).nbytes
    return dict(found)


def test_the_manifest_records_each_tensor_groups_format(mixed: Path):
    data = json.loads((mixed / MANIFEST).read_text())
    assert data["formats"] == {"weights": MIXED, "block_size": 64, "ple": "fp32"}
    manifest = read_manifest(mixed)
    linears = [linear for segment in family_of(manifest.spec).graph_parts(manifest.spec) for part in segment
               for linear in part.linears]
    expected = {linear.name: "int8" if linear.role in (O_PROJ, PER_LAYER, EMBED) else "int4" for linear in linears}
    assert data["weight_formats"] == expected
    assert {"embed_tokens", "per_layer_model_projection", "layers.0.self_attn.qkv_proj", "layers.0.self_attn.o_proj",
            "layers.6.self_attn.q_proj", "layers.6.per_layer_projection"} <= set(expected)  # KV-shared: q alone
    assert manifest.weight_formats == {name: Int8() if fmt == "int8" else Int4(64) for name, fmt in expected.items()}
    assert manifest.tensors["embed_tokens"].dtype == "int8"  # int8's row-major lookup copy
    # the graphs hold each group in its format's kernel
    kernels = {}
    for segment in manifest.graphs.segments:
        graph = onnx.load(str(mixed / segment.graph), load_external_data=False).graph
        for node in graph.node:
            for name in node.input:
                if name.rpartition(".")[0] in expected and node.op_type != "Identity":
                    kernels[name.rpartition(".")[0]] = node.op_type
    assert kernels == {name: KERNELS[fmt][0] for name, fmt in expected.items()}


def test_planner_bytes_equal_the_artifacts_bytes_per_tensor_group(mixed: Path, checkpoints, tmp_path: Path):
    int4 = export_checkpoint(checkpoints["shared-gqa"], tmp_path / "int4", weights="int4", block_size=128)
    for artifact in (mixed, int4):
        manifest = read_manifest(artifact)
        spec, weights, block = manifest.spec, manifest.formats["weights"], manifest.formats["block_size"]
        formats = linear_formats(spec, weights, block)
        assert formats == manifest.weight_formats
        planned = {linear.name: formats[linear.name].linear_bytes(linear.n, linear.k)[0]
                   for segment in family_of(spec).graph_parts(spec) for part in segment for linear in part.linears}
        on_disk: dict[str, int] = {}
        for segment in manifest.graphs.segments:
            on_disk |= _group_bytes(onnx.load(str(artifact / segment.graph), load_external_data=False).graph)
        assert on_disk == planned
        assert read_per_token(spec, weights, block, manifest.formats["ple"]) == manifest.read_per_token
        by_format = read_per_token_by_format(spec, weights, block, manifest.formats["ple"])
        assert sum(by_format.values()) == manifest.bytes_per_token
        assert set(by_format) == {fmt.name for fmt in manifest.weight_formats.values()}


def test_a_mixed_artifact_runs_closer_to_fp32_than_its_base(mixed: Path, checkpoints, tmp_path: Path):
    """Its int8 groups are computed as int8: on the same random weights, less error than int4 everywhere."""
    fp32 = export_checkpoint(checkpoints["shared-gqa"], tmp_path / "fp32")
    int4 = export_checkpoint(checkpoints["shared-gqa"], tmp_path / "int4", weights="int4", block_size=64)
    ids = edge_runtime.load(fp32).encode("the quick brown fox jumps over the lazy dog")
    logits = {path: edge_runtime.load(path, kv="fp32").logits(ids) for path in (fp32, int4, mixed)}
    int4_error, mixed_error = (float(np.abs(logits[path] - logits[fp32]).max()) for path in (int4, mixed))
    assert 0 < mixed_error < int4_error


def test_an_artifact_written_before_recipes_reads_as_its_format(mixed: Path, checkpoints, tmp_path: Path):
    """Format-5 manifests had no weight_formats: every linear is in formats.weights (its uniform recipe)."""
    for name, path in (("int4", export_checkpoint(checkpoints["shared-gqa"], tmp_path / "int4", weights="int4")),
                       ("int8", export_checkpoint(checkpoints["shared-gqa"], tmp_path / "int8", weights="int8"))):
        old = shutil.copytree(path, tmp_path / f"old-{name}")
        data = json.loads((old / MANIFEST).read_text())
        del data["weight_formats"]
        (old / MANIFEST).write_text(json.dumps(data))
        assert read_manifest(old).weight_formats == read_manifest(path).weight_formats
        ids = np.arange(1, 12)
        assert np.array_equal(edge_runtime.load(old).logits(ids), edge_runtime.load(path).logits(ids))


def test_a_manifest_naming_an_unknown_tensor_format_is_refused(mixed: Path, tmp_path: Path):
    bad = shutil.copytree(mixed, tmp_path / "bad")
    data = json.loads((bad / MANIFEST).read_text())
    data["weight_formats"]["layers.0.self_attn.o_proj"] = "int2"
    (bad / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="manifest is missing or has a malformed field .*; re-export"):
        read_manifest(bad)
    data["formats"]["weights"] = "int4,o_proj=int2"
    (bad / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match=r"weight format 'int4,o_proj=int2' is not supported by this runtime "
                                            r"\(o_proj=int2: not available; choose one of fp32, fp16, int8, int4, "
                                            r"int8-block\)"):
        read_manifest(bad)


def test_fp16_refuses_a_weight_it_cannot_hold_and_a_recipe_keeps_it(checkpoints, tmp_path: Path):
    ckpt = shutil.copytree(checkpoints["shared-gqa"], tmp_path / "ckpt")
    overwrite_first_value(ckpt, "model.layers.1.self_attn.o_proj.weight", 1e6)
    with pytest.raises(CheckpointError, match=r"layers\.1\.self_attn\.o_proj has values outside the fp16 range "
                                              r"\(largest magnitude 1e\+06\); export it in another format"):
        export_checkpoint(ckpt, tmp_path / "a", weights="fp16")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    path = export_checkpoint(ckpt, tmp_path / "a", weights="fp16,o_proj=fp32")
    assert np.isfinite(edge_runtime.load(path).logits(np.arange(1, 6))).all()


def test_export_names_the_recipe_error_for_the_sdk_too(checkpoints, tmp_path: Path):
    with pytest.raises(EdgeRuntimeError, match=r"^--weights int4,embed=int5: embed=int5: not available; choose one "
                                               r"of fp32, fp16, int8, int4, int8-block$"):
        export_checkpoint(checkpoints["shared-gqa"], tmp_path / "a", weights="int4,embed=int5")


def test_info_shows_the_recipe_and_each_tensors_format(mixed: Path):
    def info(*args: str) -> str:
        result = subprocess.run([sys.executable, "-m", "edge_runtime", "info", str(mixed), *args], capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        return result.stdout

    assert "  formats: weights int4 b64, o_proj int8, per_layer int8, embed int8, PLE fp32 " in info()
    data = json.loads(info("--json"))
    assert data["formats"]["weights"] == MIXED
    assert data["weight_formats"] == json.loads((mixed / MANIFEST).read_text())["weight_formats"]
    assert data["weight_formats"]["layers.2.mlp.down_proj"] == "int4"


def test_int8_block_warns_once_at_load_where_the_cpu_has_no_int8_dot_product(checkpoints, tmp_path: Path,
                                                                              monkeypatch, caplog):
    from edge_runtime import model as model_module

    path = export_checkpoint(checkpoints["shared-gqa"], tmp_path / "a", weights="int4,gate_up=int8-block",
                             block_size=32)
    for has_dot_product in (True, False):
        monkeypatch.setattr(model_module, "has_int8_dot_product", lambda answer=has_dot_product: answer)
        caplog.clear()
        with caplog.at_level("WARNING", logger="edge_runtime.model"):
            edge_runtime.load(path)
        expected = [] if has_dot_product else [
            (f"{path}: this CPU has no int8 dot-product instructions, which int8-block weights need to run fast "
             "(onnxruntime widens them to float32 at every step here); re-export with --weights int8 or int4")]
        assert [r.getMessage() for r in caplog.records] == expected


@pytest.mark.parametrize("machine,flags,expected", [
    ("aarch64", "fp asimd evtstrm aes crc32 cpuid asimdrdm lrcpc dcpop asimddp", True),  # Pi 5's Cortex-A76
    ("aarch64", "fp asimd evtstrm crc32 cpuid", False),  # Pi 4's Cortex-A72
    ("x86_64", "fpu sse sse2 ssse3 fma avx avx2", True),
    ("x86_64", "fpu sse sse2 ssse3 avx", False),
])
def test_int8_dot_products_are_read_from_the_cpus_flags(machine, flags, expected, monkeypatch):
    from edge_runtime import cpu_features

    monkeypatch.setattr(cpu_features.platform, "machine", lambda: machine)
    monkeypatch.setattr(cpu_features, "cpu_flags", lambda: frozenset(flags.split()))
    assert cpu_features.has_int8_dot_product() is expected
