"""Rotary position tables, computed in numpy exactly as transformers' Gemma 4 rotary embedding does.

The tables are inputs to the layer graphs rather than constants inside them so that one graph serves
any position and context length; they are computed once per step per layer type, not per layer.
"""

from __future__ import annotations

import numpy as np

from edge_runtime.model_spec import RopeSpec


def inverse_frequencies(rope: RopeSpec, head_dim: int) -> np.ndarray:
    """Half-width inverse frequencies; `proportional` pads the unrotated part with zero frequencies.

    Proportional RoPE rotates pairs (i, i + head_dim/2) for the first `partial_rotary_factor * head_dim/2`
    frequencies, with exponents over the full head_dim; the rest keep cos=1, sin=0 (identity).
    """
    if rope.rope_type == "default":
        exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim
        return (1.0 / (rope.theta ** exponents)).astype(np.float32)
    angles = int(rope.partial_rotary_factor * head_dim // 2)
    exponents = np.arange(0, 2 * angles, 2, dtype=np.int64).astype(np.float32) / head_dim
    rotated = (1.0 / (rope.theta ** exponents)).astype(np.float32)
    inv = np.concatenate([rotated, np.zeros(head_dim // 2 - angles, dtype=np.float32)])
    return (inv / np.float32(rope.factor)).astype(np.float32)


def cos_sin(inv_freq: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[T, head_dim / 2] cos and sin tables for these positions: rotate-half RoPE uses each angle for the pair
    (i, i + head_dim / 2), which is how com.microsoft.RotaryEmbedding takes its cache."""
    freqs = positions.astype(np.float32)[:, None] * inv_freq[None, :]
    return np.cos(freqs).astype(np.float32), np.sin(freqs).astype(np.float32)
