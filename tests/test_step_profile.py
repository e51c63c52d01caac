"""tools/step_profile.py: the profile's figures come out of a filled cache (Model.fill_cache, tested in
test_bench), and --floor's weight graphs hold the artifact's linears."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import step_profile

TOOL = Path(__file__).resolve().parents[1] / "tools" / "step_profile.py"


def test_the_tool_profiles_a_filled_cache(artifacts):
    out = subprocess.run([sys.executable, str(TOOL), "-m", str(artifacts["shared-gqa"]), "-d", "200", "--fill",
                          "--steps", "3", "-t", "1", "--json"], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout)
    assert (result["depth"], result["filled"], result["threads"]) == (200, True, 1)
    assert result["step_ms"] > 0
    assert set(result["split_ms"]) == {"onnxruntime", "attention", "glue"}


def test_the_weight_graphs_hold_every_linear_of_the_artifact_on_its_own_weights(checkpoints, tmp_path):
    """--floor's graphs: each segment's weight nodes (int4-mixed: MatMulInt4 and MatMulInt8), nothing
    else, on the very initializers the segment reads, one each of the linears the manifest lists; they run."""
    import onnx

    from edge_runtime.artifact import read_manifest
    from edge_runtime.export import export_checkpoint

    artifact = export_checkpoint(checkpoints["shared-gqa"], tmp_path / "a", weights="int4-mixed", block_size=32)
    nodes = []
    for source in sorted(artifact.glob("segment_*.onnx")):
        graph, inputs = step_profile.weight_graph(source)
        made, original = onnx.load_from_string(graph).graph, onnx.load(source, load_external_data=False).graph
        weights = {t.name for t in original.initializer}
        expected = [(n.op_type, list(n.input[1:])) for n in original.node
                    if n.op_type in step_profile.WEIGHT_OPS and n.input[1] in weights]
        assert [(n.op_type, list(n.input[1:])) for n in made.node] == expected
        nodes += [n.op_type for n in made.node]
        session = step_profile.weight_session(graph, artifact, 1)
        feeds = {x: np.ones((1, width), dtype) for x, (width, dtype) in inputs.items()}
        assert all(np.isfinite(y).all() and y.shape[0] == 1 for y in session.run(None, feeds))
    assert len(nodes) == len(read_manifest(artifact).weight_formats)
    assert set(nodes) == {"MatMulInt4", "MatMulInt8"}


def test_the_floor_is_timed_against_bench_s_ceiling(artifacts):
    out = subprocess.run([sys.executable, str(TOOL), "-m", str(artifacts["shared-gqa"]), "--steps", "3", "-t", "1",
                          "--floor", "--json"], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout)
    assert result["floor_ms"] > 0 and result["bandwidth_gb_s"] > 0
    assert result["floor_fraction"] == pytest.approx(result["bytes_per_token"] / result["floor_ms"] * 1e3
                                                     / result["bandwidth_gb_s"] / 1e9)
