"""Sampling filters equal transformers' logits warpers (temperature, top-k, top-p, min-p, in that
order) and repetition penalty; sampled tokens follow the filtered distribution."""

import mlx.core as mx
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from mlx_gemma3n.sampling import REPETITION_CONTEXT, make_sampler, repetition_penalty, warp


def reference_warp(logits: np.ndarray, temperature, top_k, top_p, min_p) -> np.ndarray:
    scores = torch.tensor(logits)
    warpers = [TemperatureLogitsWarper(temperature)]
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1:
        warpers.append(TopPLogitsWarper(top_p))
    if min_p:
        warpers.append(MinPLogitsWarper(min_p))
    for w in warpers:
        scores = w(None, scores)
    return scores.numpy()


@pytest.mark.parametrize("temperature, top_k, top_p, min_p", [
    (1.0, 64, 0.95, 0.0),  # the published generation config
    (0.7, 0, 1.0, 0.0), (1.0, 5, 1.0, 0.0), (1.3, 0, 0.5, 0.0), (1.0, 0, 1.0, 0.1),
    (0.6, 40, 0.9, 0.05), (1.0, 1, 1.0, 0.0),
])
def test_filters_equal_transformers_warpers(temperature, top_k, top_p, min_p):
    logits = np.random.default_rng(0).normal(scale=3.0, size=(4, 1000)).astype(np.float32)
    ours = np.array(warp(mx.array(logits), temperature, top_k, top_p, min_p))
    expected = reference_warp(logits, temperature, top_k, top_p, min_p)
    kept, kept_expected = np.isfinite(ours), np.isfinite(expected)
    assert (kept == kept_expected).all(), f"kept tokens differ in {np.argwhere(kept != kept_expected)[:5].tolist()}"
    assert np.allclose(ours[kept], expected[kept], atol=1e-5)


def test_samples_follow_the_filtered_distribution():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = mx.array(np.tile(np.log(probs), (20_000, 1)).astype(np.float32))
    mx.random.seed(0)
    drawn = np.array(make_sampler(1.0, top_p=0.7)(logits))
    assert set(drawn.tolist()) == {0, 1}, "top-p 0.7 keeps the two most likely of 0.5, 0.3, 0.15, 0.05"
    assert abs((drawn == 0).mean() - 0.5 / 0.8) < 0.015
    drawn = np.array(make_sampler(0.5)(logits))  # temperature 0.5 squares the odds
    expected = probs**2 / (probs**2).sum()
    assert np.abs(np.bincount(drawn, minlength=4) / len(drawn) - expected).max() < 0.015


def test_temperature_zero_is_greedy():
    logits = mx.array(np.random.default_rng(1).normal(size=(3, 50)).astype(np.float32))
    assert np.array(make_sampler(0.0)(logits)).tolist() == np.argmax(np.array(logits), axis=-1).tolist()


def test_repetition_penalty_equals_transformers_over_the_recent_tokens():
    rng = np.random.default_rng(2)
    tokens = rng.integers(0, 100, size=50)
    logits = rng.normal(size=(1, 100)).astype(np.float32)
    ours = np.array(repetition_penalty(1.3)(mx.array(tokens), mx.array(logits)))
    expected = RepetitionPenaltyLogitsProcessor(1.3)(
        torch.tensor(tokens[-REPETITION_CONTEXT:][None]), torch.tensor(logits)).numpy()
    assert np.allclose(ours, expected, atol=1e-6)
    assert not np.allclose(ours, logits)


@pytest.mark.parametrize("options", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(min_p=2), dict(top_k=-1)])
def test_bad_options_are_refused(options):
    with pytest.raises(ValueError, match="Sampling needs"):
        make_sampler(**options)
