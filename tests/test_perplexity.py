"""Perplexity (SDK and `edge-runtime perplexity`) against a direct computation from `Model.logits`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import edge_runtime
from edge_runtime.bundled import BUNDLED_CHECKPOINT
from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.perplexity import evaluate

CONTEXT = 128
TEXT = (BUNDLED_CHECKPOINT / "heldout.txt").read_text()[:1200]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge_runtime", "perplexity", *args], capture_output=True,
                          text=True, timeout=300, env=os.environ)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    from edge_runtime.export import export_checkpoint

    return export_checkpoint(BUNDLED_CHECKPOINT, tmp_path_factory.mktemp("artifact") / "bundled")


@pytest.fixture(scope="module")
def model(artifact):
    # Chunks of 48 split every 128-token window into three prefill chunks through the cache.
    return edge_runtime.load(artifact, prefill_chunk=48)


def direct(model, ids: list[int], context: int) -> tuple[float, int, np.ndarray]:
    """Mean NLL, window count and argmax, from whole-window `Model.logits` and a plain float64 softmax."""
    bos, body = ids[0], ids[1:]
    nll, windows, argmax = [], 0, []
    for s in range(0, len(body), context - 1):
        window = [bos, *body[s:s + context - 1]]
        logits = model.logits(window, mode="prefill")[:-1].astype(np.float64)
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        nll.extend(-np.log(probs[np.arange(len(window) - 1), window[1:]]))
        argmax.append(logits.argmax(-1))
        windows += 1
    return float(np.mean(nll)), windows, np.concatenate(argmax)


def test_evaluate_matches_direct_computation_over_several_windows(model):
    ids = model.encode(TEXT)
    assert len(ids) > 2 * CONTEXT and (len(ids) - 1) % (CONTEXT - 1)  # several windows, the last one partial
    nll, windows, argmax = direct(model, ids, CONTEXT)
    result = evaluate(model, TEXT, CONTEXT, with_argmax=True)
    assert result.nll == pytest.approx(nll, rel=1e-6)
    assert result.perplexity == pytest.approx(np.exp(nll), rel=1e-6)
    assert (result.tokens, result.windows, result.context) == (len(ids) - 1, windows, CONTEXT)
    assert np.array_equal(result.argmax, argmax)
    assert result.tokens_per_second > 0
    assert evaluate(model, ids, CONTEXT).nll == result.nll  # ids with their BOS give the same windows
    assert evaluate(model, TEXT, CONTEXT).argmax is None


def test_text_scores_better_than_its_shuffled_tokens(model):
    ids = model.encode(TEXT)
    shuffled = [ids[0], *np.random.default_rng(0).permutation(ids[1:])]
    assert evaluate(model, ids, CONTEXT).perplexity * 3 < evaluate(model, shuffled, CONTEXT).perplexity


def test_default_context_is_capped_by_the_model(artifact):
    small = edge_runtime.load(artifact, context_length=64)
    assert evaluate(small, TEXT).context == 64
    assert evaluate(edge_runtime.load(artifact), TEXT[:200]).context == 512


@pytest.mark.parametrize("text,context,message", [
    ("", None, "the text has no token besides BOS"),
    (TEXT, 1, "context=1: must be between 2 and the model's context of 512"),
    (TEXT, 513, "context=513: must be between 2 and the model's context of 512"),
])
def test_bad_input_is_refused(model, text, context, message):
    with pytest.raises(EdgeRuntimeError, match=f"^{message}"):
        evaluate(model, text, context)


def test_cli_reports_the_sdk_figures(artifact, tmp_path):
    text_file = tmp_path / "text.txt"
    text_file.write_text(TEXT)
    result = cli("-m", str(artifact), "--text-file", str(text_file), "--context", str(CONTEXT), "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    expected = evaluate(edge_runtime.load(artifact), TEXT, CONTEXT)
    assert data["perplexity"] == pytest.approx(expected.perplexity, rel=1e-6)
    assert data["nll"] == pytest.approx(expected.nll, rel=1e-6)
    assert (data["tokens"], data["windows"], data["context"]) == (expected.tokens, expected.windows, CONTEXT)
    assert data["tokens_per_second"] > 0
    human = cli("-m", str(artifact), "--text-file", str(text_file), "--context", str(CONTEXT))
    assert human.stdout.startswith(f"perplexity {expected.perplexity:.4f} (mean NLL {expected.nll:.4f} nats) over "
                                   f"{expected.tokens} tokens in {expected.windows} windows")


@pytest.mark.parametrize("content,message", [
    (None, "cannot read the text file (No such file or directory)"),
    (b"ok \xff\xfe", "not UTF-8 text (invalid start byte, byte 0xff at offset 3); convert it to UTF-8 first"),
    (b"", "the text has no token besides BOS"),
])
def test_cli_errors_are_one_line(artifact, tmp_path, content, message):
    text_file = tmp_path / "text.txt"
    if content is not None:
        text_file.write_bytes(content)
    result = cli("-m", str(artifact), "--text-file", str(text_file))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith(f"error: {text_file}: " if content != b"" else "error: ")
    assert message in result.stderr
