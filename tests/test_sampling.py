"""Sampling beyond top-k/top-p (tested in test_runtime.py): min-p, the repetition penalty and its window,
and their validation."""

from __future__ import annotations

import numpy as np
import pytest

from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.sampling import Sampler, SamplingParams, filter_probabilities, penalize_repetition

PROBS = np.array([0.05, 0.4, 0.2, 0.019, 0.3, 0.031])  # token 1 is the most likely


def params(**kw: float) -> SamplingParams:
    return SamplingParams(**{"temperature": 1.0, "top_k": 0, "top_p": 1.0, **kw})


def test_min_p_keeps_exactly_the_tokens_above_its_share_of_the_best():
    logits = np.log(PROBS)
    tokens, probs = filter_probabilities(logits, params(min_p=0.1))  # threshold 0.04
    assert tokens.tolist() == [1, 4, 2, 0]
    np.testing.assert_allclose(probs, PROBS[[1, 4, 2, 0]] / PROBS[[1, 4, 2, 0]].sum())
    assert filter_probabilities(logits, params(min_p=0.45))[0].tolist() == [1, 4, 2]
    assert filter_probabilities(logits, params())[0].tolist() == [1, 4, 2, 0, 5, 3]


def test_min_p_applies_after_temperature():
    logits = np.log(PROBS)
    assert filter_probabilities(logits, params(min_p=0.2))[0].tolist() == [1, 4, 2]
    # Temperature 2 flattens the ratios to the best token to their square roots (0.019 / 0.4 -> 0.218 >= 0.2),
    # temperature 0.5 sharpens them to their squares (0.2 / 0.4 -> 0.25 < 0.3).
    assert filter_probabilities(logits, params(temperature=2.0, min_p=0.2))[0].tolist() == [1, 4, 2, 0, 5, 3]
    assert filter_probabilities(logits, params(min_p=0.3))[0].tolist() == [1, 4, 2]
    assert filter_probabilities(logits, params(temperature=0.5, min_p=0.3))[0].tolist() == [1, 4]


def test_min_p_combines_with_top_k_and_top_p():
    logits = np.log(PROBS)
    assert filter_probabilities(logits, params(top_k=2, min_p=0.1))[0].tolist() == [1, 4]
    assert filter_probabilities(logits, params(top_p=0.99))[0].tolist() == [1, 4, 2, 0, 5, 3]
    assert filter_probabilities(logits, params(top_p=0.99, min_p=0.1))[0].tolist() == [1, 4, 2, 0]
    assert filter_probabilities(logits, params(top_p=0.8, min_p=0.1))[0].tolist() == [1, 4, 2]


def test_seeded_draws_never_pick_a_token_min_p_removed():
    sampler = Sampler(params(min_p=0.1), seed=0)
    draws = np.bincount([sampler(np.log(PROBS)) for _ in range(3000)], minlength=6)
    assert draws[3] == draws[5] == 0
    np.testing.assert_allclose(draws[[1, 4, 2, 0]] / 3000, PROBS[[1, 4, 2, 0]] / 0.95, atol=0.03)


def test_repetition_penalty_flips_the_greedy_choice():
    logits = np.array([0.0, 3.0, 2.5, -1.0], dtype=np.float32)
    greedy = Sampler(params(temperature=0.0, repetition_penalty=1.5))
    assert greedy(logits) == 1
    assert greedy(logits, history=[1, 1, 3]) == 2  # 3.0 / 1.5 = 2.0 < 2.5
    assert Sampler(params(temperature=0.0))(logits, history=[1]) == 1  # penalty 1.0 is off


def test_repetition_penalty_rule_and_no_mutation():
    logits = np.array([2.0, -2.0, 1.0, 0.0, 4.0], dtype=np.float32)
    out = penalize_repetition(logits, [0, 1, 0, 3], penalty=2.0, window=-1)
    np.testing.assert_array_equal(out, [1.0, -4.0, 1.0, 0.0, 4.0])  # each token once, negative ones pushed down
    np.testing.assert_array_equal(logits, [2.0, -2.0, 1.0, 0.0, 4.0])
    assert out.dtype == np.float32
    assert penalize_repetition(logits, [0], penalty=1.0, window=64) is logits
    assert penalize_repetition(logits, [], penalty=2.0, window=64) is logits


def test_repetition_window_reads_only_the_last_tokens():
    logits = np.array([2.0, 2.0, 2.0, 2.0], dtype=np.float32)
    history = [0, 1, 2, 3, 2]
    np.testing.assert_array_equal(penalize_repetition(logits, history, 2.0, window=2), [2.0, 2.0, 1.0, 1.0])
    np.testing.assert_array_equal(penalize_repetition(logits, np.array(history), 2.0, window=3),
                                  [2.0, 2.0, 1.0, 1.0])
    np.testing.assert_array_equal(penalize_repetition(logits, history, 2.0, window=-1), [1.0] * 4)
    np.testing.assert_array_equal(penalize_repetition(logits, history, 2.0, window=100), [1.0] * 4)
    assert penalize_repetition(logits, history, 2.0, window=0) is logits
    # Through the sampler: token 0 is outside the window, so it wins greedily despite being in the history.
    logits = np.array([3.0, 3.5, 1.0], dtype=np.float32)
    sampler = Sampler(params(temperature=0.0, repetition_penalty=2.0, repetition_window=2))
    assert sampler(logits, history=[0, 1, 2]) == 0
    assert Sampler(params(temperature=0.0, repetition_penalty=2.0, repetition_window=-1))(logits, [0, 1, 2]) == 1


def test_penalty_shapes_sampled_draws_too():
    logits = np.log(np.array([0.5, 0.5]))  # negative logits: the penalty multiplies them
    sampler = Sampler(params(repetition_penalty=3.0), seed=1)
    draws = np.bincount([sampler(logits, history=[0]) for _ in range(2000)], minlength=2)
    # log 0.5 * 3 = log 0.125: token 0 keeps 0.125 / (0.125 + 0.5) of the mass.
    np.testing.assert_allclose(draws / 2000, [0.2, 0.8], atol=0.03)


def test_defaults_and_positional_fields_are_unchanged():
    assert SamplingParams() == SamplingParams(1.0, 64, 0.95, 0.0, 1.0, 64)
    assert SamplingParams(0.5, 0, 1.0).min_p == 0.0


@pytest.mark.parametrize("kw,message", [
    (dict(min_p=-0.1), "min_p=-0.1: must be in [0, 1) (0 disables it)"),
    (dict(min_p=1.0), "min_p=1.0: must be in [0, 1) (0 disables it)"),
    (dict(min_p=float("nan")), "min_p=nan: must be in [0, 1) (0 disables it)"),
    (dict(repetition_penalty=0.0), "repetition_penalty=0.0: must be > 0 (1 disables it)"),
    (dict(repetition_penalty=-1.2), "repetition_penalty=-1.2: must be > 0 (1 disables it)"),
    (dict(repetition_window=-2), "repetition_window=-2: must be >= -1 (-1: the whole history, 0 disables the penalty)"),
])
def test_bad_parameters(kw, message):
    with pytest.raises(EdgeRuntimeError) as info:
        SamplingParams(**kw)
    assert str(info.value) == message
