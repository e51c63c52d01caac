"""The PLE store's TurboQuant formats: error as Lloyd-Max predicts, exact sizes, and an export that runs."""

from __future__ import annotations

import numpy as np
import pytest

import edge_runtime
from edge_runtime.artifact import read_manifest
from edge_runtime.export import export_checkpoint
from edge_runtime.export.checkpoint import Checkpoint
from edge_runtime.ple_store import PLE_FORMATS, decode_rows, encode_rows, storage_dtype, stored_width
from edge_runtime.quant.turboquant import lloyd_max_distortion

TURBO = {"tq4": 4, "tq3": 3, "tq2": 2}


@pytest.mark.parametrize("fmt", TURBO)
def test_round_trip_error_is_the_lloyd_max_distortion(fmt):
    """Each layer's slice keeps its own norm: slices of very different scale all lose D_mse of their energy."""
    layers, width, rows = 5, 256, 400
    rng = np.random.default_rng(0)
    scales = np.array([1e-3, 0.1, 1.0, 10.0, 300.0], np.float32).repeat(width)
    x = (rng.standard_normal((rows, layers * width)) * scales).astype(np.float32)
    stored = encode_rows(x, fmt, width)
    assert stored.dtype == storage_dtype(fmt) and stored.shape == (rows, stored_width(fmt, layers * width, width))
    back = decode_rows(stored, fmt, layers * width, width)
    assert back.dtype == np.float32 and back.shape == x.shape
    err = ((back - x) ** 2).reshape(rows, layers, width).sum(2) / (x**2).reshape(rows, layers, width).sum(2)
    expected = lloyd_max_distortion(width, TURBO[fmt])
    np.testing.assert_allclose(err.mean(axis=0), expected, rtol=0.05)  # per layer: 400 vectors, ~1% error bars
    alone = decode_rows(stored[7:9], fmt, layers * width, width)  # rows alone: BLAS rounding may vary with the count
    np.testing.assert_allclose(alone, back[7:9], rtol=1e-5, atol=1e-6 * np.abs(back[7:9]).max())


def test_stored_sizes():
    layers, width = 35, 256  # E2B's row
    assert stored_width("tq4", layers * width, width) == layers * (128 + 2)
    assert stored_width("tq3", layers * width, width) == layers * (96 + 2)
    assert stored_width("tq2", layers * width, width) == layers * (64 + 2)
    assert stored_width("tq3", 3 * 12, 12) == 3 * (6 + 2)  # slices pad to whole bytes of 8 codes
    assert {"tq4", "tq3", "tq2"} <= set(PLE_FORMATS)
    with pytest.raises(ValueError, match="layer_width"):
        stored_width("tq4", layers * width)
    with pytest.raises(ValueError, match="whole slices"):
        stored_width("tq4", 100, 256)


def test_zero_and_row_layout():
    """A row is [codes of every slice | fp16 norms]; an all-zero slice stays zero."""
    x = np.zeros((2, 3 * 16), np.float32)
    x[1, 16:32] = np.arange(16)
    stored = encode_rows(x, "tq4", 16)
    assert stored.shape == (2, 3 * 8 + 3 * 2)
    norms = stored[:, 24:].copy().view(np.float16)
    np.testing.assert_array_equal(norms, [[0, 0, 0], [0, np.float16(np.linalg.norm(np.arange(16))), 0]])
    back = decode_rows(stored, "tq4", 48, 16)
    assert not back[0].any() and not back[1, :16].any() and not back[1, 32:].any()


def test_export_with_tq4_ple_runs(checkpoints, tmp_path):
    name = "unshared-f16"  # per-layer width 12: not a multiple of 8, the padded case
    path = export_checkpoint(checkpoints[name], tmp_path / "a", ple="tq4")
    manifest = read_manifest(path)
    assert manifest.formats["ple"] == "tq4"
    expected = Checkpoint(checkpoints[name]).tensor("embed_tokens_per_layer.weight")
    spec = manifest.spec
    vocab, width = expected.shape
    row = stored_width("tq4", width, spec.hidden_size_per_layer_input)
    assert (path / "ple.bin").stat().st_size == vocab * row and manifest.read_per_token["ple_row"] == row
    raw = np.fromfile(path / "ple.bin", dtype=np.uint8).reshape(vocab, row)
    back = decode_rows(raw, "tq4", width, spec.hidden_size_per_layer_input)
    assert np.linalg.norm(back - expected) / np.linalg.norm(expected) < 0.15  # sqrt(D_mse(12, 4)) ~ 0.09
    model = edge_runtime.load(path)
    ids = np.array([2, 17, 99, 5, 250, 3])
    logits = model.logits(ids)
    assert logits.shape[0] == len(ids) and np.isfinite(logits).all()
