"""KL estimators, adaptive KL controller and InstructGPT reward shaping vs numpy."""
import dataclasses
import math

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhf_jax.losses import (
    AdaptiveKLController,
    adaptive_kl_update,
    kl_penalty,
    shape_rewards,
)


def ragged(rng, b, t, min_len=0):
    lengths = rng.integers(min_len, t + 1, size=b)
    return (np.arange(t)[None, :] < lengths[:, None]).astype(np.float32)


_kl_jit = jax.jit(lambda lp, ref, est: kl_penalty(lp, ref, estimator=est), static_argnums=2)


@pytest.mark.parametrize("shape", [(1, 1), (3, 7)])
def test_estimators_vs_numpy(shape):
    rng = np.random.default_rng(shape[1])
    lp, ref = (rng.normal(size=shape) - 2).astype(np.float32), (rng.normal(size=shape) - 2).astype(np.float32)
    d = lp.astype(np.float64) - ref
    np.testing.assert_allclose(_kl_jit(lp, ref, "k1"), d, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_kl_jit(lp, ref, "k2"), d ** 2 / 2, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_kl_jit(lp, ref, "k3"), np.exp(-d) - 1 + d, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="k1, k2, k3"):
        kl_penalty(lp, ref, estimator="k4")


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), scale=st.floats(1e-3, 5.0))
def test_k2_k3_nonnegative(seed, scale):
    rng = np.random.default_rng(seed)
    lp, ref = (rng.normal(size=(4, 5)) * scale).astype(np.float32), (rng.normal(size=(4, 5)) * scale).astype(
        np.float32)
    assert np.all(np.asarray(_kl_jit(lp, ref, "k3")) >= 0)
    assert np.all(np.asarray(_kl_jit(lp, ref, "k2")) >= 0)


def test_k1_k3_unbiased_on_exact_distribution():
    # Expectation over tokens sampled from pi equals the exact KL(pi || ref) for k1 and k3.
    rng = np.random.default_rng(0)
    p, q = rng.dirichlet(np.ones(6)), rng.dirichlet(np.ones(6))
    kl = float(np.sum(p * np.log(p / q)))
    lp, ref = np.log(p)[None].astype(np.float32), np.log(q)[None].astype(np.float32)
    for est in ("k1", "k3"):
        np.testing.assert_allclose(np.sum(p * np.asarray(_kl_jit(lp, ref, est))[0]), kl, rtol=1e-4)


@pytest.mark.parametrize("kl,target,n,horizon", [(3.0, 6.0, 64, 10000), (6.3, 6.0, 512, 1000), (100.0, 6.0, 8, 10),
                                                 (0.0, 1.0, 16, 32)])
def test_adaptive_kl_update(kl, target, n, horizon):
    coef = 0.2
    err = min(max(kl / target - 1, -0.2), 0.2)
    expected = coef * (1 + err * n / horizon)
    got = jax.jit(lambda c, k, n: adaptive_kl_update(c, k, n, target=target, horizon=horizon))(coef, kl, n)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    ctrl = AdaptiveKLController(target=target, horizon=horizon, init_coef=coef)
    np.testing.assert_allclose(ctrl.update(ctrl.initial_coef(), kl, n), expected, rtol=1e-6)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ctrl.target = 1.0


def np_shape(scores, lp, ref, mask, coef, penalty, eos):
    b, t = lp.shape
    rewards = np.zeros((b, t))
    kls, non = [], []
    s = scores.astype(np.float64).copy()
    if penalty is not None:
        s = np.where(eos, s, s - penalty)
    for i in range(b):
        n = int(mask[i].sum())
        kl_row = 0.0
        for j in range(n):
            k = float(lp[i, j]) - float(ref[i, j])
            rewards[i, j] = -coef * k
            kl_row += k
        if n > 0:
            rewards[i, n - 1] += s[i]
        kls.append(kl_row)
        non.append(-coef * kl_row)
    metrics = {"objective/kl": np.mean(kls), "objective/scores": s.mean(),
               "objective/non_score_reward": np.mean(non), "objective/rlhf_reward": s.mean() + np.mean(non)}
    return rewards, metrics


_shape_jit = jax.jit(lambda s, lp, ref, m, c, e: shape_rewards(s, lp, ref, m, kl_coef=c, missing_eos_penalty=1.5,
                                                               ends_with_eos=e))
_shape_nopen_jit = jax.jit(lambda s, lp, ref, m, c: shape_rewards(s, lp, ref, m, kl_coef=c))


@pytest.mark.parametrize("b,t", [(1, 1), (3, 6), (5, 4)])
@pytest.mark.parametrize("penalty", [None, 1.5])
def test_shape_rewards_vs_numpy(b, t, penalty):
    rng = np.random.default_rng(b * t)
    scores = rng.normal(size=b).astype(np.float32) * 3
    lp, ref = (rng.normal(size=(b, t)) - 2).astype(np.float32), (rng.normal(size=(b, t)) - 2).astype(np.float32)
    mask = ragged(rng, b, t)
    eos = rng.random(b) < 0.5
    if penalty is None:
        rewards, m = _shape_nopen_jit(scores, lp, ref, mask, 0.05)
    else:
        rewards, m = _shape_jit(scores, lp, ref, mask, 0.05, eos)
    ref_rewards, ref_m = np_shape(scores, lp, ref, mask, 0.05, penalty, eos)
    np.testing.assert_allclose(rewards, ref_rewards, rtol=1e-5, atol=1e-6)
    for k, v in ref_m.items():
        np.testing.assert_allclose(m[k], v, rtol=1e-5, atol=1e-6)


def test_score_exactly_at_last_token_and_nothing_on_padding():
    mask = np.array([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], np.float32)
    garbage = np.full((4, 5), 7.0, np.float32) * (1 - mask) + 0 * mask  # differs from ref only on padding
    scores = np.array([1.0, 2.0, 3.0, 4.0], np.float32)
    rewards, _ = _shape_jit(scores, garbage, np.zeros((4, 5), np.float32), mask, 0.1,
                            np.array([True, False, True, True]))
    expected = np.zeros((4, 5))
    expected[0, 2], expected[1, 0], expected[3, 4] = 1.0, 2.0 - 1.5, 4.0
    np.testing.assert_array_equal(np.asarray(rewards), expected)
    with pytest.raises(ValueError, match="ends_with_eos"):
        shape_rewards(scores, garbage, garbage, mask, kl_coef=0.1, missing_eos_penalty=1.0)


def test_vmap_and_no_retrace():
    rng = np.random.default_rng(3)
    lp, ref = rng.normal(size=(2, 3, 4)).astype(np.float32), rng.normal(size=(2, 3, 4)).astype(np.float32)
    out = jax.jit(jax.vmap(lambda a, b: kl_penalty(a, b, estimator="k3")))(lp, ref)
    np.testing.assert_allclose(out, np.exp(ref - lp) - 1 - (ref - lp), rtol=1e-5, atol=1e-6)
    traces = [0]

    @jax.jit
    def f(scores, lp, ref, mask, coef, kl, n):
        traces[0] += 1
        rewards, m = shape_rewards(scores, lp, ref, mask, kl_coef=coef, kl_estimator="k2")
        new_coef = AdaptiveKLController(target=6.0, horizon=100.0).update(coef, m["objective/kl"], n)
        return rewards, new_coef, jax.grad(lambda lp: kl_penalty(lp, ref, estimator="k3").sum())(lp)

    f(np.ones(3, np.float32), lp[0], ref[0], np.ones((3, 4), np.float32), 0.1, 1.0, 8)
    f(np.zeros(3, np.float32), lp[1], ref[1], ragged(rng, 3, 4), 0.3, 2.0, 16)
    assert traces[0] == 1
    assert math.isfinite(float(adaptive_kl_update(0.1, 5.0, 4, target=6.0, horizon=10.0)))
