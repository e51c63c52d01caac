"""Perplexity of a text under an artifact: the number that says whether a weight or PLE format lost quality.

The text's tokens are cut into windows of `context` tokens, each starting with BOS and evaluated from an
empty cache, and every next-token prediction inside a window is scored, so each token of the text is
scored exactly once (the first token of a window is predicted from BOS alone). Windows go through the KV
cache in prefill chunks of `model.prefill_chunk` (`Model.logits_in_chunks`), so the chunked,
cached path generation uses is the one measured. Log-softmax is taken in float64, a few rows at a time so
that a chunk of E2B's 262144-wide logits is never held in float64 at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.model import Model
from edge_runtime.text_input import decode_utf8

DEFAULT_CONTEXT = 512
_ROWS = 16  # logits rows converted to float64 at a time


@dataclass(frozen=True)
class PerplexityResult:
    """exp(nll) over `tokens` scored predictions in `windows` windows of up to `context` tokens.

    `argmax` (when asked for) holds the model's top-1 token at each scored position, in text order, so that
    a tool can compute the top-1 agreement of two artifacts on the same text.
    """

    perplexity: float
    nll: float
    tokens: int
    windows: int
    context: int
    seconds: float
    argmax: np.ndarray | None = None

    @property
    def tokens_per_second(self) -> float:
        """Tokens run through the model per second of evaluation (one per scored prediction)."""
        return self.tokens / self.seconds if self.seconds else 0.0


def read_text(path: str | Path) -> str:
    """The UTF-8 text of `path`, or an EdgeRuntimeError saying why it cannot be read."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise EdgeRuntimeError(f"{path}: cannot read the text file ({exc.strerror})") from None
    return decode_utf8(data, str(path))


def _score(logits: np.ndarray, targets: np.ndarray) -> tuple[float, np.ndarray]:
    """Sum of -log p(target) over rows, and each row's argmax; log-softmax in float64."""
    total, argmax = 0.0, np.argmax(logits, axis=-1)
    for s in range(0, len(targets), _ROWS):
        x = logits[s:s + _ROWS].astype(np.float64)
        top = x.max(axis=-1, keepdims=True)
        log_z = top[:, 0] + np.log(np.exp(x - top).sum(axis=-1))
        total += float((log_z - x[np.arange(len(x)), targets[s:s + _ROWS]]).sum())
    return total, argmax


def evaluate(model: Model, text_or_ids: str | Sequence[int] | np.ndarray, context: int | None = None, *,
             with_argmax: bool = False,
             progress: Callable[[str, int, int], None] | None = None) -> PerplexityResult:
    """Perplexity of a text (or of token ids; a leading BOS is dropped since every window brings its own).

    `context` is the window length, BOS included (default: min(512, the model's context)).
    """
    limit = model.context_length
    context = min(DEFAULT_CONTEXT, limit) if context is None else context
    if not 2 <= context <= limit:
        raise EdgeRuntimeError(f"context={context}: must be between 2 and the model's context of {limit}")
    bos = model.spec.bos_token_id
    ids = model.encode(text_or_ids) if isinstance(text_or_ids, str) else list(np.asarray(text_or_ids).reshape(-1))
    body = np.asarray(ids[1:] if ids and ids[0] == bos else ids, dtype=np.int64)
    if not len(body):
        raise EdgeRuntimeError("the text has no token besides BOS; perplexity needs at least 2 tokens, "
                               "give a longer text")

    step = context - 1
    windows = [np.concatenate([[bos], body[s:s + step]]) for s in range(0, len(body), step)]
    nll, argmax = 0.0, []
    start = time.perf_counter()
    for w, window in enumerate(windows):
        if progress:
            progress("perplexity", w, len(windows))
        inputs, targets = window[:-1], window[1:]  # the last token predicts nothing that is scored
        done = 0
        for logits in model.logits_in_chunks(inputs):
            total, top = _score(logits, targets[done:done + len(logits)])
            done += len(logits)
            nll += total
            argmax.append(top)
    seconds = time.perf_counter() - start
    mean = nll / len(body)
    return PerplexityResult(perplexity=float(np.exp(mean)), nll=mean, tokens=len(body), windows=len(windows),
                            context=context, seconds=seconds,
                            argmax=np.concatenate(argmax) if with_argmax else None)
