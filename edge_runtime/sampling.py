"""Next-token choice: greedy, or seeded sampling with temperature, top-k, top-p (nucleus) and min-p, after an
optional repetition penalty.

The defaults are Gemma's recommended ones (temperature 1.0, top-k 64, top-p 0.95), overridden by the
checkpoint's generation_config.json when it ships one (`do_sample: false` there means greedy, as in
transformers); temperature 0 means greedy.

The steps run in transformers' order: repetition penalty -> temperature -> top-k -> top-p -> min-p -> draw.
The penalty also applies to greedy decoding (as in transformers and llama.cpp), and min-p follows llama.cpp:
it drops the tokens less likely than `min_p` times the most likely one, which adapts the cut to how confident
the model is where top-p's fixed mass does not.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from edge_runtime.errors import EdgeRuntimeError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_k: int = 64
    top_p: float = 0.95
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # CTRL's rule as in transformers; 1.0 disables it
    repetition_window: int = 64  # llama.cpp's repeat_last_n: the last N tokens of prompt + output; -1 all, 0 none

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise EdgeRuntimeError(f"temperature={self.temperature}: must be >= 0 (0 means greedy)")
        if self.top_k < 0:
            raise EdgeRuntimeError(f"top_k={self.top_k}: must be >= 0 (0 disables it)")
        if not 0 < self.top_p <= 1:
            raise EdgeRuntimeError(f"top_p={self.top_p}: must be in (0, 1]")
        if not 0 <= self.min_p < 1:
            raise EdgeRuntimeError(f"min_p={self.min_p}: must be in [0, 1) (0 disables it)")
        if not self.repetition_penalty > 0:
            raise EdgeRuntimeError(f"repetition_penalty={self.repetition_penalty}: must be > 0 (1 disables it)")
        if self.repetition_window < -1:
            raise EdgeRuntimeError(f"repetition_window={self.repetition_window}: must be >= -1 "
                                   "(-1: the whole history, 0 disables the penalty)")


def penalize_repetition(logits: np.ndarray, history: Sequence[int], penalty: float, window: int) -> np.ndarray:
    """`logits` with each distinct token of the last `window` of `history` made less likely.

    CTRL's rule (transformers' RepetitionPenaltyLogitsProcessor, llama.cpp's repeat_penalty): a positive
    logit is divided by `penalty`, a negative one multiplied, so the token loses likelihood either way.
    Returns `logits` itself when there is nothing to penalize, else a penalized copy.
    """
    if penalty == 1.0 or window == 0 or len(history) == 0:
        return logits
    recent = history if window == -1 else history[-window:]
    ids = np.unique(np.asarray(recent, dtype=np.int64))
    out = np.array(logits, copy=True)
    seen = out[ids]
    out[ids] = np.where(seen > 0, seen / penalty, seen * penalty)
    return out


def filter_probabilities(logits: np.ndarray, params: SamplingParams) -> tuple[np.ndarray, np.ndarray]:
    """The tokens left after temperature, top-k, top-p and min-p, most likely first, and their probabilities
    (renormalized to sum to 1). Needs temperature > 0."""
    scaled = logits.astype(np.float64) / params.temperature
    if 0 < params.top_k < scaled.size:
        candidates = np.argpartition(-scaled, params.top_k - 1)[: params.top_k]
    else:
        candidates = np.arange(scaled.size)
    candidates = candidates[np.argsort(-scaled[candidates], kind="stable")]
    probs = np.exp(scaled[candidates] - scaled[candidates[0]])
    probs /= probs.sum()
    keep = len(probs)
    if params.top_p < 1.0:
        keep = min(keep, int(np.searchsorted(np.cumsum(probs), params.top_p) + 1))
    if params.min_p > 0.0:  # probs is sorted, so the tokens above the threshold are a prefix
        keep = min(keep, int(np.count_nonzero(probs >= params.min_p * probs[0])))
    candidates, probs = candidates[:keep], probs[:keep]
    return candidates, probs / probs.sum()


class Sampler:
    def __init__(self, params: SamplingParams, seed: int | None = None) -> None:
        self.params = params
        self.rng = np.random.default_rng(seed)

    def __call__(self, logits: np.ndarray, history: Sequence[int] = ()) -> int:
        """The next token from `logits` [vocab]; `history` is the token ids so far (prompt and output), which
        the repetition penalty reads."""
        p = self.params
        logits = penalize_repetition(logits, history, p.repetition_penalty, p.repetition_window)
        if p.temperature == 0:
            return int(np.argmax(logits))
        candidates, probs = filter_probabilities(logits, p)
        return int(candidates[self.rng.choice(len(candidates), p=probs)])
