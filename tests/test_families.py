"""Model families: the registry finds a family by a config's model_type or a manifest's family and refuses any other
by name; the graph contract in the manifest is the family's and is what the graphs on disk take and return; a contract
the engine could not run as written is refused when read; and the engine runs whatever names a family gives its
tensors, wherever their tokens lie."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

import edge_runtime
from edge_runtime.artifact import MANIFEST, file_entry, read_manifest
from edge_runtime.errors import ArtifactError, UnsupportedConfigError
from edge_runtime.families import FAMILIES, family_of, spec_from_hf_config
from edge_runtime.families.contract import TOKENS, GraphContract
from edge_runtime.families.gemma4 import FAMILY as GEMMA4
from edge_runtime.planner import MODEL_CONFIGS

KNOWN = "gemma4 (model_type gemma4 or gemma4_text), gemma3n (model_type gemma3n or gemma3n_text)"


def _edit_manifest(artifact: Path, out: Path, edit) -> Path:
    shutil.copytree(artifact, out)
    data = json.loads((out / MANIFEST).read_text())
    edit(data)
    (out / MANIFEST).write_text(json.dumps(data))
    return out


def test_a_config_finds_its_family_by_model_type():
    for name in ("gemma-4-e2b", "gemma-4-e4b"):
        config = json.loads((MODEL_CONFIGS / f"{name}.json").read_text())
        assert config["model_type"] == "gemma4"
        assert family_of(spec_from_hf_config(config)) is GEMMA4 is FAMILIES["gemma4"]
        assert family_of(spec_from_hf_config({**config["text_config"], "architectures": ["Gemma4ForCausalLM"]})) \
            is GEMMA4  # model_type gemma4_text


@pytest.mark.parametrize("config,message", [
    ({"model_type": "llama", "architectures": ["LlamaForCausalLM"]},
     f"ckpt/config.json: model_type 'llama' is not a model family edge-runtime knows; it knows {KNOWN}"),
    ({"architectures": ["Gemma4ForCausalLM"]},
     (f"ckpt/config.json: no model_type; a Hugging Face config.json names its model's type, and edge-runtime knows "
     f"{KNOWN}")),
])
def test_an_unknown_model_type_is_refused_naming_the_known_families(config, message):
    with pytest.raises(UnsupportedConfigError) as info:
        spec_from_hf_config(config, "ckpt/config.json")
    assert str(info.value) == message


def test_export_of_an_unknown_model_type_is_one_line(checkpoints, tmp_path):
    checkpoint = tmp_path / "ckpt"
    shutil.copytree(checkpoints["shared-gqa"], checkpoint)
    config = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps({**config, "model_type": "gemma3_text"}))
    result = subprocess.run([sys.executable, "-m", "edge_runtime", "export", str(checkpoint), "-o",
                             str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [(f"error: {checkpoint / 'config.json'}: model_type 'gemma3_text' is not a "
                                          f"model family edge-runtime knows; it knows {KNOWN}")]
    assert not (tmp_path / "out").exists()


def test_a_manifest_of_an_unknown_family_is_one_line(artifacts, tmp_path):
    artifact = _edit_manifest(artifacts["shared-gqa"], tmp_path / "a",
                              lambda data: data["model"].update(family="gemma3"))
    result = subprocess.run([sys.executable, "-m", "edge_runtime", "info", str(artifact)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [(f"error: {artifact / MANIFEST}: model family 'gemma3' is not one this "
                                          f"runtime knows ({KNOWN}); upgrade edge-runtime, or re-export the "
                                          "checkpoint with this version")]


def _dims(value: onnx.ValueInfoProto) -> list:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


@pytest.mark.parametrize("name,family,carried", [
    ("shared-mqa-wide", "gemma4", {"hidden": 0, "ple_context": 1}),
    ("unshared-f16", "gemma4", {"hidden": 0, "ple_context": 1}),
    ("3n-multimodal", "gemma3n", {"predictions": 0, "ple_context": 1}),
    ("3n-causal", "gemma3n", {"predictions": 0, "ple_context": 1}),
])
def test_the_manifest_holds_the_familys_contract_and_the_graphs_keep_it(name, family, carried, artifacts):
    manifest = read_manifest(artifacts[name])
    spec, contract = manifest.spec, manifest.graphs
    assert manifest.spec.family == family
    assert contract == FAMILIES[family].contract(spec)
    written = json.loads((artifacts[name] / MANIFEST).read_text())
    assert written["model"]["family"] == family and written["graphs"] == contract.to_dict()
    assert written["graphs"]["attention_tensors"]["query"] == [TOKENS, "kv_heads", "groups", "head_dim"]
    axes = contract.token_axes()
    assert {name: axes[name] for name in contract.carried} == carried and axes["ple_rows"] == 1
    kvh, groups = spec.num_key_value_heads, spec.num_attention_heads // spec.num_key_value_heads
    for segment in contract.segments:
        graph = onnx.load(artifacts[name] / segment.graph, load_external_data=False).graph
        inputs, outputs = {v.name: _dims(v) for v in graph.input}, {v.name: _dims(v) for v in graph.output}
        assert set(inputs) == {f.input for f in segment.feeds}, segment.graph
        for feed in segment.feeds:
            if feed.value in axes:  # a value holding tokens: the graph takes them on the contract's axis
                axis = axes[feed.value] - (feed.layer is not None)
                assert inputs[feed.input][axis] == TOKENS, (segment.graph, feed)
        for output, value in segment.outputs.items():
            assert value == contract.logits or outputs[output][axes[value]] == TOKENS
        attention = segment.attention
        if attention is None:
            continue
        hd = spec.head_dims[attention.layer]
        assert outputs[attention.query] == [TOKENS, kvh, groups, hd]
        assert (attention.key is None) == spec.is_kv_shared(attention.layer)
        if attention.key is not None:
            assert outputs[attention.key] == outputs[attention.value] == [TOKENS, kvh, hd]
        assert (attention.kv_layer, attention.layer_type, attention.window, attention.scaling, attention.softcap) == (
            spec.kv_sources[attention.layer], spec.layer_types[attention.layer],
            spec.window(spec.layer_types[attention.layer]), 1.0, None)
    assert [s.takes_rows for s in contract.segments].index(True) == (
        spec.first_shared_layer if spec.num_kv_shared_layers else spec.num_hidden_layers)


def _segment(data: dict, k: int) -> dict:
    return data["graphs"]["segments"][k]


CONTRACT_REFUSALS = {
    "a value no graph returns": (
        lambda d: _segment(d, 2)["feeds"][0].update(value="residual"),
        ("graphs.segments[2] (segment_02.onnx) feeds input 'hidden' from 'residual', which no earlier graph returns "
        "and the runtime does not compute")),
    "an attention softcap": (
        lambda d: _segment(d, 1)["attention"].update(softcap=50.0),
        ("graphs.segments[1] (segment_01.onnx) caps layer 1's attention logits at 50.0, which this runtime's "
        "attention does not implement; upgrade edge-runtime")),
    "keys written after rows": (
        lambda d: _segment(d, 4)["attention"].update(key="key", value="value"),
        ("graphs.segments[4] (segment_04.onnx) writes layer 4's keys and values after rows were taken, when only some "
        "tokens are left")),
    "another layer type's cache": (
        lambda d: _segment(d, 2)["attention"].update(kv_layer=1),
        ("graphs.segments[2] (segment_02.onnx) reads the keys and values of layer 1, which no full_attention layer "
        "before it writes")),
    "no graph taking rows": (
        lambda d: [segment.update(takes_rows=False) for segment in d["graphs"]["segments"]],
        "graphs.segments[6] (segment_06.onnx) is the last graph, and no graph takes rows"),
    "an output neither carried nor the logits": (
        lambda d: _segment(d, 1)["outputs"].update(hidden_out="residual"),
        ("graphs.segments[1] (segment_01.onnx) keeps output 'hidden_out' as 'residual', neither a carried tensor nor "
        "the logits")),
    "another query layout": (
        lambda d: d["graphs"]["attention_tensors"].update(query=["T", "heads", "head_dim"]),
        "graphs.attention_tensors are not the ones this runtime hands to the graphs and takes from them"),
    "a carried tensor without tokens": (
        lambda d: d["graphs"]["carried"].update(hidden=["hidden"]),
        "graphs.carried.hidden has dims ['hidden'], none of them T (tokens)"),
}


@pytest.mark.parametrize("case", list(CONTRACT_REFUSALS))
def test_a_contract_the_engine_cannot_run_is_refused_when_read(case, artifacts, tmp_path):
    """shared-mqa-wide: layers S S F S S F, the last two KV-shared; segment 4 takes rows."""
    edit, message = CONTRACT_REFUSALS[case]
    artifact = _edit_manifest(artifacts["shared-mqa-wide"], tmp_path / "a", edit)
    with pytest.raises(ArtifactError) as info:
        read_manifest(artifact)
    assert str(info.value).startswith(f"{artifact / MANIFEST}: {message}")
    assert str(info.value).endswith("; upgrade edge-runtime") or str(info.value).endswith(
        "; re-export with this version of edge-runtime")


@pytest.mark.parametrize("edit,message", [
    (lambda d: _segment(d, 2)["feeds"][0].update(input="residual"),
     ("segment_02.onnx: takes ['attention', 'cos', 'hidden', 'ple_context', 'ple_rows', 'sin'] and returns "
     "['hidden_out', 'key', 'query', 'value'], but the manifest feeds it ['attention', 'cos', 'ple_context', "
     "'ple_rows', 'residual', 'sin'] and fetches ['hidden_out', 'query', 'key', 'value']; the artifact is damaged, "
     "re-export")),
    (lambda d: _segment(d, 1)["attention"].update(window=4),
     ("segment_01.onnx: the manifest gives layer 1's attention window 4, but its sliding_attention layers' is 8; the "
     "manifest is damaged, re-export")),
])
def test_the_engine_refuses_a_contract_its_graphs_or_cache_do_not_keep(edit, message, artifacts, tmp_path):
    artifact = _edit_manifest(artifacts["shared-mqa-wide"], tmp_path / "a", edit)
    with pytest.raises(ArtifactError) as info:
        edge_runtime.load(artifact)
    assert str(info.value) == f"{artifact}/{message}"


def _rename(graph: onnx.GraphProto, io: str, old: str, new: str, op: str = "Identity", axes: int | None = None) -> None:
    """Give graph input or output `old` the name `new`, through an Identity (or a Squeeze / Unsqueeze of axis `axes`,
    the tensor then carrying one more leading axis outside the graph)."""
    values = graph.input if io == "input" else graph.output
    (value,) = [v for v in values if v.name == old]
    dims = _dims(value) if op == "Identity" else [1, *_dims(value)]
    renamed = helper.make_tensor_value_info(new, value.type.tensor_type.elem_type, dims)
    values.remove(value)
    values.append(renamed)
    extra = [helper.make_tensor(f"{new}_axes", onnx.TensorProto.INT64, [1], [axes])] if axes is not None else []
    graph.initializer.extend(extra)
    if io == "input":  # nodes stay in topological order: the new one first
        graph.node.insert(0, helper.make_node(op, [new, *(t.name for t in extra)], [old]))
    else:
        graph.node.append(helper.make_node(op, [old, *(t.name for t in extra)], [new]))


def test_the_engine_runs_whatever_names_a_family_gives_and_wherever_its_tokens_lie(artifacts, tmp_path):
    """The Gemma 4 artifact rewritten as another family might build it: the residual stream carried as `streams`
    [1, T, H] (tokens on axis 1, as AltUp's [streams, T, H] would be), queries returned as `q`. Same logits, in
    prefill with rows taken (the KV-shared layers and the head on the last position) and in decode."""
    source = artifacts["shared-mqa-wide"]
    artifact = tmp_path / "renamed"
    shutil.copytree(source, artifact)
    data = json.loads((artifact / MANIFEST).read_text())
    graphs = data["graphs"]
    graphs["carried"]["streams"] = ["streams", TOKENS, "hidden"]
    del graphs["carried"]["hidden"]
    for k, segment in enumerate(graphs["segments"]):
        model = onnx.load(artifact / segment["graph"], load_external_data=False)
        if k >= 2:
            _rename(model.graph, "input", "hidden", "streams", "Squeeze", axes=0)
            for feed in segment["feeds"]:
                if feed["input"] == "hidden":
                    feed.update(input="streams", value="streams")
        if "hidden_out" in segment["outputs"]:
            _rename(model.graph, "output", "hidden_out", "streams_out", "Unsqueeze", axes=0)
            segment["outputs"] = {"streams_out": "streams"}
        if segment["attention"]:
            _rename(model.graph, "output", "query", "q")
            segment["attention"]["query"] = "q"
        onnx.save(model, artifact / segment["graph"])
        data["files"][segment["graph"]] = file_entry(artifact / segment["graph"])
    (artifact / MANIFEST).write_text(json.dumps(data))
    assert read_manifest(artifact).graphs.token_axes()["streams"] == 1

    ids = np.random.default_rng(3).integers(3, 512, 40)
    original, renamed = (edge_runtime.load(path, kv="fp32") for path in (source, artifact))
    assert {i.name for i in renamed.engine.segments[2].get_inputs()} == {
        "streams", "attention", "ple_rows", "ple_context", "cos", "sin"}
    for start, stop in ((0, 19), (19, 20), (20, 33), (33, 34)):  # prefill chunks (rows: the last), decode steps
        expected = original.engine.forward(ids[start:stop], all_logits=False)
        got = renamed.engine.forward(ids[start:stop], all_logits=False)
        assert got.shape == expected.shape == (1, 512)
        np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(renamed.logits(ids), original.logits(ids))


@pytest.mark.parametrize("name,rows_at", [("gemma-4-e2b", 15), ("gemma-4-e4b", 24)])
def test_the_contract_at_the_published_shapes_passes_its_checks(name, rows_at):
    """E2B and E4B: one graph per layer and the head's, rows taken where the KV-shared layers start, every shared
    layer reading the last unshared layer of its type; written and read back unchanged."""
    spec = spec_from_hf_config(json.loads((MODEL_CONFIGS / f"{name}.json").read_text()), name)
    contract = GEMMA4.contract(spec)
    assert GraphContract.from_dict(json.loads(json.dumps(contract.to_dict())), name) == contract
    assert len(contract.segments) == len(GEMMA4.graph_parts(spec)) == spec.num_hidden_layers + 1
    assert [s.takes_rows for s in contract.segments].index(True) == rows_at == spec.first_shared_layer
    last_writer = {t: max(i for i in range(rows_at) if spec.layer_types[i] == t) for t in set(spec.layer_types)}
    for segment in contract.segments[rows_at:-1]:
        attention = segment.attention
        assert attention.key is None and attention.kv_layer == last_writer[attention.layer_type]


def test_running_and_planning_never_import_onnx(artifacts, checkpoints):
    """A family's graph builders need onnx and are imported by export alone: loading, generating and planning,
    whatever the family, run on the runtime's dependencies."""
    script = (f"import sys, edge_runtime; from edge_runtime.planner import plan_memory; "
              f"from edge_runtime.profiles import load_profile; "
              f"edge_runtime.load({str(artifacts['shared-gqa'])!r}).generate('a', max_new_tokens=2); "
              f"plan_memory({str(checkpoints['shared-mqa-wide'])!r}, load_profile('x86_64-dev')); "
              f"print(sorted(m for m in sys.modules if m.split('.')[0] == 'onnx' or m.endswith('.graphs')))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("family", ["gemma4", "gemma3n"])
def test_each_family_reads_its_wrapper_and_refuses_other_architectures(family):
    """families/family.text_config, shared by every family: the wrapper's text_config, or the causal LM's config
    itself; an unknown architecture or a wrapper without text_config is one line naming the file."""
    read = FAMILIES[family].read_config
    title = {"gemma4": "Gemma4", "gemma3n": "Gemma3n"}[family]
    config = json.loads((MODEL_CONFIGS / {"gemma4": "gemma-4-e2b.json", "gemma3n": "gemma-3n-e2b.json"}[family]).read_text())
    wrapped = read(config, "w.json")
    causal = read({**config["text_config"], "architectures": [f"{title}ForCausalLM"]}, "c.json")
    differs = {k for k, v in wrapped.to_dict().items() if causal.to_dict().get(k) != v}
    assert differs <= {"multimodal_token_start"}  # Gemma 3n's wrapper has image and audio ids past the text's
    assert wrapped.num_hidden_layers == causal.num_hidden_layers > 0
    with pytest.raises(UnsupportedConfigError, match=rf"^x\.json: architectures=\['{title}ForSomethingElse'\] is not "
                                                     rf"supported; expected one of \['{title}ForCausalLM', "
                                                     rf"'{title}ForConditionalGeneration'\]$"):
        read({**config, "architectures": [f"{title}ForSomethingElse"]}, "x.json")
    without = {k: v for k, v in config.items() if k != "text_config"}
    with pytest.raises(UnsupportedConfigError, match=rf"^y\.json: {title}ForConditionalGeneration config has no "
                                                     rf"text_config object$"):
        read(without, "y.json")


@pytest.mark.parametrize("family,title", [("gemma4", "Gemma 4"), ("gemma3n", "Gemma 3n")])
def test_each_family_refuses_an_untied_head_and_unimplemented_values(family, title):
    """model_spec.refuse_unsupported, shared by the families' config readers: exact one-line refusals."""
    read = FAMILIES[family].read_config
    config = json.loads((MODEL_CONFIGS / {"gemma4": "gemma-4-e2b.json", "gemma3n": "gemma-3n-e2b.json"}[family]).read_text())
    untied = {**config, "text_config": {**config["text_config"], "tie_word_embeddings": False}}
    with pytest.raises(UnsupportedConfigError, match=rf"^u\.json: unsupported tie_word_embeddings=False \({title} ties "
                                                     r"the LM head to the embedding\)$"):
        read(untied, "u.json")
    biased = {**config, "text_config": {**config["text_config"], "attention_bias": True}}
    with pytest.raises(UnsupportedConfigError, match=r"^b\.json: unsupported attention_bias=True \(attention "
                                                     r"projections with bias are not implemented\)$"):
        read(biased, "b.json")
