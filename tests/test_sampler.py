"""The sampler: each filter on its own, the chain's order, seeding, the repetition penalty."""

from __future__ import annotations

import numpy as np
import pytest

from workbench.engine.sampler import (
    Sampler,
    SamplerConfig,
    apply_repeat_penalty,
    candidate_ids,
    log_softmax,
)


def probs(logits):
    z = np.exp(logits - logits.max())
    return z / z.sum()


def test_greedy_is_argmax(rng):
    logits = rng.standard_normal(1000).astype(np.float32)
    assert Sampler(SamplerConfig(temperature=0))(logits) == int(np.argmax(logits))


def test_top_k_keeps_the_k_largest_in_order(rng):
    logits = rng.standard_normal(500).astype(np.float32)
    ids = candidate_ids(logits, top_k=7, top_p=1.0, min_p=0.0)
    assert ids.tolist() == np.argsort(-logits)[:7].tolist()


def test_top_p_keeps_smallest_prefix_reaching_p():
    logits = np.log(np.array([0.5, 0.25, 0.15, 0.1], dtype=np.float32))
    assert candidate_ids(logits, 0, 0.5, 0.0).tolist() == [0]
    assert candidate_ids(logits, 0, 0.6, 0.0).tolist() == [0, 1]
    assert candidate_ids(logits, 0, 0.9, 0.0).tolist() == [0, 1, 2]
    assert candidate_ids(logits, 0, 1.0, 0.0).tolist() == [0, 1, 2, 3]


def test_min_p_is_relative_to_the_best_token():
    logits = np.log(np.array([0.4, 0.3, 0.2, 0.1], dtype=np.float32))
    assert candidate_ids(logits, 0, 1.0, 0.45).tolist() == [0, 1, 2]  # 0.2 >= 0.45*0.4
    assert candidate_ids(logits, 0, 1.0, 0.7).tolist() == [0, 1]  # 0.2 < 0.7*0.4 <= 0.3


def test_repeat_penalty_divides_positive_and_multiplies_negative():
    logits = np.array([2.0, -2.0, 1.0], dtype=np.float32)
    out = apply_repeat_penalty(logits, [0, 1, 1], 2.0)
    assert out.tolist() == [1.0, -4.0, 1.0]
    assert logits.tolist() == [2.0, -2.0, 1.0], "input left unchanged"


def test_repeat_penalty_applies_in_the_sampler():
    logits = np.array([3.0, 2.9, 0.0], dtype=np.float32)
    s = Sampler(SamplerConfig(temperature=0, repeat_penalty=1.5))
    assert s(logits, history=[]) == 0
    assert s(logits, history=[0]) == 1


def test_seeded_draws_repeat_and_follow_the_distribution(rng):
    logits = rng.standard_normal(8).astype(np.float32)
    cfg = SamplerConfig(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=123)
    a = [Sampler(cfg)(logits) for _ in range(3)]
    s1, s2 = Sampler(cfg), Sampler(cfg)
    assert [s1(logits) for _ in range(50)] == [s2(logits) for _ in range(50)]
    assert len(set(a)) == 1  # a fresh sampler with the same seed draws the same first token
    s = Sampler(SamplerConfig(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=5))
    draws = np.bincount([s(logits) for _ in range(20000)], minlength=8) / 20000
    assert np.abs(draws - probs(logits.astype(np.float64))).max() < 0.02


def test_temperature_sharpens():
    logits = np.array([1.0, 0.0], dtype=np.float32)
    cold = Sampler(SamplerConfig(temperature=0.25, top_k=0, top_p=1.0, min_p=0.0, seed=1))
    hot = Sampler(SamplerConfig(temperature=4.0, top_k=0, top_p=1.0, min_p=0.0, seed=1))
    n = 4000
    cold_p = sum(cold(logits) == 0 for _ in range(n)) / n
    hot_p = sum(hot(logits) == 0 for _ in range(n)) / n
    assert cold_p == pytest.approx(probs(np.array([4.0, 0.0]))[0], abs=0.03)
    assert hot_p == pytest.approx(probs(np.array([0.25, 0.0]))[0], abs=0.03)


def test_log_softmax_normalised(rng):
    logits = rng.standard_normal(100).astype(np.float32) * 10
    assert np.exp(log_softmax(logits)).sum() == pytest.approx(1.0)
