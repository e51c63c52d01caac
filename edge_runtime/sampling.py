"""Next-token choice: greedy, or seeded sampling with temperature, top-k and top-p (nucleus).

The defaults are Gemma's recommended ones (temperature 1.0, top-k 64, top-p 0.95), overridden by the
checkpoint's generation_config.json when it ships one (`do_sample: false` there means greedy, as in
transformers); temperature 0 means greedy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edge_runtime.errors import EdgeRuntimeError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_k: int = 64
    top_p: float = 0.95

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise EdgeRuntimeError(f"temperature={self.temperature}: must be >= 0 (0 means greedy)")
        if self.top_k < 0:
            raise EdgeRuntimeError(f"top_k={self.top_k}: must be >= 0 (0 disables it)")
        if not 0 < self.top_p <= 1:
            raise EdgeRuntimeError(f"top_p={self.top_p}: must be in (0, 1]")


class Sampler:
    def __init__(self, params: SamplingParams, seed: int | None = None) -> None:
        self.params = params
        self.rng = np.random.default_rng(seed)

    def __call__(self, logits: np.ndarray) -> int:
        p = self.params
        if p.temperature == 0:
            return int(np.argmax(logits))
        scaled = logits.astype(np.float64) / p.temperature
        if 0 < p.top_k < scaled.size:
            candidates = np.argpartition(-scaled, p.top_k - 1)[: p.top_k]
        else:
            candidates = np.arange(scaled.size)
        candidates = candidates[np.argsort(-scaled[candidates], kind="stable")]
        probs = np.exp(scaled[candidates] - scaled[candidates[0]])
        probs /= probs.sum()
        if p.top_p < 1.0:
            keep = int(np.searchsorted(np.cumsum(probs), p.top_p) + 1)
            candidates, probs = candidates[:keep], probs[:keep] / probs[:keep].sum()
        return int(candidates[self.rng.choice(len(candidates), p=probs)])
