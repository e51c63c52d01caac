"""Keys scored in integers (edge_runtime.quant.integer_scores): the int8 grid, the power-of-two query scale, and the
TurboQuant inner products built on them (the attention kernel's reference)."""

from __future__ import annotations

import numpy as np
import pytest

from edge_runtime.quant.integer_scores import BUTTERFLY_ROWS, LEVEL, int8_grid, quantize_rows
from edge_runtime.quant.turboquant import (
    TurboQuantizer,
    hadamard_rotate,
    hadamard_rotation,
    hadamard_signs,
    lloyd_max_codebook,
)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_the_int8_grid_holds_the_codebook_to_half_a_step(bits):
    codebook = lloyd_max_codebook(256, bits)
    levels, step = int8_grid(codebook)
    assert levels.dtype == np.int8 and levels.shape == codebook.shape
    assert np.abs(levels).max() == LEVEL and np.all(np.diff(levels.astype(int)) > 0)
    assert np.abs(levels * step - codebook).max() <= step / 2
    assert step == np.float32(np.abs(codebook).max()) / np.float32(LEVEL)


def test_a_query_row_is_scaled_by_a_power_of_two_and_keeps_seven_to_eight_bits():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((64, 300)) * np.exp(rng.uniform(-30, 30, (64, 1)))).astype(np.float32)
    x[5] = 0
    x[6] = 2.0**-70  # below integer_scores.TINY: all zeros
    x[7, :] = 0
    x[7, 3] = 127 * 2.0**-9  # exactly 127 integers at the smallest scale
    x[8, :] = 0
    x[8, 3] = 127.5 * 2.0**-9  # just past: the next power of two
    integers, scale = quantize_rows(x)
    assert integers.dtype == np.float32 and scale.dtype == np.float32
    assert np.array_equal(integers, np.rint(integers)) and np.abs(integers).max() <= LEVEL
    live = scale > 0
    assert np.array_equal(live, np.abs(x).max(axis=1) >= 2.0**-64)
    mantissa, _ = np.frexp(scale[live])
    assert np.all(mantissa == 0.5)  # powers of two
    assert np.all(np.abs(integers[live]).max(axis=1) >= 64)
    error = integers[live].astype(np.float64) * scale[live, None] - x[live]
    assert np.all(np.abs(error) <= scale[live, None] / 2)
    assert not integers[~live].any()
    assert scale[7] == np.float32(2.0**-9) and integers[7, 3] == 127
    assert scale[8] == np.float32(2.0**-8) and integers[8, 3] == 64


@pytest.mark.parametrize("d", [128, 512])
def test_the_fast_hadamard_rotation_is_the_dense_one(d):
    x = np.random.default_rng(d).standard_normal((9, d)).astype(np.float32)
    np.testing.assert_allclose(hadamard_rotate(x, hadamard_signs(d, 3)), x @ hadamard_rotation(d, 3), atol=2e-6)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_a_hadamard_quantizer_scores_integers_and_costs_next_to_nothing(bits):
    """Its inner products are float(ints @ levels) * (2**e * step) * norm exactly, and against float scoring with
    the same codes they add ~1% of the quantization error's RMS on Gaussian data (d 512, 8 queries)."""
    d = 512
    tq = TurboQuantizer(d, bits, rotation="hadamard")
    assert tq.levels is not None and np.array_equal(tq.codebook, tq.levels * tq.step)
    rng = np.random.default_rng(bits)
    q = rng.standard_normal((8, d)).astype(np.float32)
    x = rng.standard_normal((3000, d)).astype(np.float32)
    codes = tq.encode(x)
    got = tq.inner_products(q, codes)
    integers, scale = quantize_rows(hadamard_rotate(q, tq.hadamard))
    assert np.array_equal(got, integer_scores_of(tq, integers, scale, codes))
    levels = tq._level_table(codes["codes"])
    floats = (q @ tq.rotation) @ (levels * tq.step).T * codes["norm"]
    exact = q @ x.T
    rms = float(np.sqrt(np.mean((floats - exact) ** 2)))
    assert np.sqrt(np.mean((got - exact) ** 2)) <= 1.01 * rms
    assert 0 < np.sqrt(np.mean((got - floats) ** 2)) <= 0.15 * rms
    assert TurboQuantizer(d, bits).levels is None  # Haar (the PLE store's): float codebook and scores


def test_a_prefill_chunks_rows_rotate_by_blas_and_land_on_the_same_integers_but_at_ties():
    """Past BUTTERFLY_ROWS numpy rotates the query by the dense product (prefill's speed); its float32 rounding
    differs from the butterflies' by ulps, so a row's integers are the same except where one sits at a rounding
    tie, and then by one."""
    d = 256
    tq = TurboQuantizer(d, 4, rotation="hadamard")
    rng = np.random.default_rng(7)
    q = rng.standard_normal((BUTTERFLY_ROWS + 36, d)).astype(np.float32)
    by_blas, scale = quantize_rows(q @ tq.rotation)
    by_butterflies, same_scale = quantize_rows(hadamard_rotate(q, tq.hadamard))
    assert np.array_equal(scale, same_scale)
    moved = by_blas != by_butterflies
    assert moved.mean() < 1e-3 and np.abs(by_blas - by_butterflies).max() <= 1
    codes = tq.encode(rng.standard_normal((50, d)).astype(np.float32))
    many, few = tq.inner_products(q, codes), tq.inner_products(q[:8], codes)
    assert np.array_equal(many, integer_scores_of(tq, by_blas, scale, codes))
    assert np.array_equal(few, integer_scores_of(tq, by_butterflies[:8], scale[:8], codes))


def integer_scores_of(tq: TurboQuantizer, integers: np.ndarray, scale: np.ndarray, codes: dict) -> np.ndarray:
    return integers @ tq._level_table(codes["codes"]).T * (scale * tq.step)[:, None] * codes["norm"]
