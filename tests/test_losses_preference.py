"""kto_loss, simpo_loss, orpo_loss vs numpy loops; the issue's properties; gradients; no NaN from empty rows."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.losses import kto_loss, orpo_loss, simpo_loss


def logsig(x):
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sig(x):
    return math.exp(logsig(x))


def np_kto(pi, ref, good, kpi, kref, beta, wd, wu):
    z0 = max(0.0, sum(float(a) - float(b) for a, b in zip(kpi, kref)) / len(kpi))
    total = 0.0
    for p, q, g in zip(pi, ref, good):
        r = float(p) - float(q)
        total += wd * (1 - sig(beta * (r - z0))) if g else wu * (1 - sig(beta * (z0 - r)))
    return total / len(pi), z0


def np_simpo(pc, pr, lc, lr, beta, gamma, eps):
    total = 0.0
    for i in range(len(pc)):
        h = beta * (float(pc[i]) / lc[i] - float(pr[i]) / lr[i]) - gamma
        total += -(1 - eps) * logsig(h) - eps * logsig(-h)
    return total / len(pc)


def np_orpo(pc, pr, lc, lr, nll, lam):
    terms = []
    for i in range(len(pc)):
        ac, ar = float(pc[i]) / lc[i], float(pr[i]) / lr[i]
        odds_c = math.exp(ac) / (1 - math.exp(ac))
        odds_r = math.exp(ar) / (1 - math.exp(ar))
        terms.append(-logsig(math.log(odds_c / odds_r)))
    or_loss = sum(terms) / len(terms)
    return nll + lam * or_loss, or_loss


def _pairs(rng, b):
    pc, pr = (-rng.uniform(0.5, 30, size=b)).astype(np.float32), (-rng.uniform(0.5, 30, size=b)).astype(np.float32)
    lc, lr = rng.integers(1, 12, size=b).astype(np.float32), rng.integers(1, 12, size=b).astype(np.float32)
    return pc, pr, lc, lr


@pytest.mark.parametrize("b", [1, 6])
@pytest.mark.parametrize("beta,wd,wu", [(0.1, 1.0, 1.0), (0.7, 1.0, 1.33)])
@pytest.mark.parametrize("kl_sign", [1.0, -1.0])        # z0 = max(0, kl): positive KL and clamped negative KL
def test_kto_vs_numpy(b, beta, wd, wu, kl_sign):
    rng = np.random.default_rng(b)
    pi, ref = (-rng.uniform(1, 20, size=b)).astype(np.float32), (-rng.uniform(1, 20, size=b)).astype(np.float32)
    good = rng.random(b) < 0.5
    kref = (-rng.uniform(1, 20, size=b)).astype(np.float32)
    kpi = (kref + kl_sign * rng.uniform(0.1, 2, size=b)).astype(np.float32)
    fn = jax.jit(functools.partial(kto_loss, beta=beta, desirable_weight=wd, undesirable_weight=wu))
    loss, m = fn(pi, ref, good, kpi, kref)
    want, z0 = np_kto(pi, ref, good, kpi, kref, beta, wd, wu)
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    np.testing.assert_allclose(m["kl"], z0, rtol=1e-5, atol=1e-6)
    r = beta * (pi - ref)
    np.testing.assert_allclose(m["rewards_desirable"], r[good].mean() if good.any() else 0.0, rtol=1e-5)
    np.testing.assert_allclose(m["rewards_undesirable"], r[~good].mean() if (~good).any() else 0.0, rtol=1e-5)


def test_kto_symmetry_and_z0_is_a_constant():
    # z0 = 0, equal weights: a desirable example at log-ratio r has the loss of an undesirable one at -r.
    r = jnp.array([1.7, -0.4, 3.0])
    zeros = jnp.zeros(3)
    good, _ = kto_loss(r, zeros, jnp.ones(3, bool), zeros, zeros, beta=0.5)
    bad, _ = kto_loss(-r, zeros, jnp.zeros(3, bool), zeros, zeros, beta=0.5)
    np.testing.assert_allclose(good, bad, rtol=1e-6)
    # No gradient flows through z0's pairs or the reference; the policy gets one.
    g = jax.grad(lambda *a: kto_loss(*a, beta=0.5)[0], argnums=(0, 1, 3, 4))(
        r, zeros, jnp.array([True, False, True]), jnp.full(3, -2.0), jnp.full(3, -3.0))
    assert np.all(np.abs(g[0]) > 0) and all(np.all(x == 0) for x in g[1:])
    # A desirable example's loss falls as its log-ratio rises; an undesirable one's rises.
    dg = jax.grad(lambda x: kto_loss(x, zeros, jnp.array([True, False, True]), zeros, zeros)[0])(r)
    assert dg[0] < 0 and dg[1] > 0 and dg[2] < 0


def test_kto_metrics_without_one_kind_are_zero_not_nan():
    x = jnp.array([-3.0, -4.0])
    _, m = kto_loss(x, x - 1, jnp.array([True, True]), x, x)
    assert float(m["rewards_undesirable"]) == 0.0 and np.isfinite(float(m["rewards_desirable"]))


@pytest.mark.parametrize("b", [1, 7])
@pytest.mark.parametrize("beta,gamma,eps", [(2.0, 0.5, 0.0), (2.5, 1.2, 0.0), (1.0, 0.3, 0.1)])
def test_simpo_vs_numpy(b, beta, gamma, eps):
    rng = np.random.default_rng(10 + b)
    pc, pr, lc, lr = _pairs(rng, b)
    loss, m = jax.jit(functools.partial(simpo_loss, beta=beta, gamma=gamma, label_smoothing=eps))(pc, pr, lc, lr)
    np.testing.assert_allclose(loss, np_simpo(pc, pr, lc, lr, beta, gamma, eps), rtol=1e-5)
    rc, rr = beta * pc / lc, beta * pr / lr
    np.testing.assert_allclose(m["rewards_chosen"], rc.mean(), rtol=1e-5)
    np.testing.assert_allclose(m["rewards_rejected"], rr.mean(), rtol=1e-5)
    np.testing.assert_allclose(m["rewards_margin"], (rc - rr).mean(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(m["rewards_accuracy"], np.mean(rc > rr))


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.6])
def test_simpo_at_equal_average_logps_is_log1p_exp_gamma(gamma):
    # Same average log-prob at different lengths: the length normalisation is what makes these equal.
    loss, _ = simpo_loss(jnp.array([-6.0, -1.0]), jnp.array([-9.0, -4.0]), jnp.array([4.0, 2.0]),
                         jnp.array([6.0, 8.0]), beta=2.0, gamma=gamma)
    np.testing.assert_allclose(loss, math.log1p(math.exp(gamma)), rtol=1e-6)


@pytest.mark.parametrize("b", [1, 5])
@pytest.mark.parametrize("lam", [0.1, 1.0])
def test_orpo_vs_numpy(b, lam):
    rng = np.random.default_rng(20 + b)
    pc, pr, lc, lr = _pairs(rng, b)
    nll = float(-pc.sum() / lc.sum())
    loss, m = jax.jit(functools.partial(orpo_loss, lam=lam))(pc, pr, lc, lr, nll)
    want, or_loss = np_orpo(pc, pr, lc, lr, nll, lam)
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    np.testing.assert_allclose(m["or_loss"], or_loss, rtol=1e-5)
    np.testing.assert_allclose(m["nll"], nll, rtol=1e-6)
    ratio = [math.log((math.exp(a) / (1 - math.exp(a))) / (math.exp(c) / (1 - math.exp(c))))
             for a, c in zip(pc / lc, pr / lr)]
    np.testing.assert_allclose(m["log_odds_ratio"], np.mean(ratio), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(m["rewards_accuracy"], np.mean(np.array(ratio) > 0))


def test_orpo_odds_ratio_term_is_log2_at_equal_average_logps():
    loss, m = orpo_loss(jnp.array([-6.0, -0.3]), jnp.array([-9.0, -0.9]), jnp.array([4.0, 1.0]),
                        jnp.array([6.0, 3.0]), 0.0, lam=1.0)
    np.testing.assert_allclose(m["or_loss"], math.log(2.0), rtol=1e-6)
    np.testing.assert_allclose(loss, math.log(2.0), rtol=1e-6)


def test_reference_free_losses_are_finite_at_empty_rows_and_probability_one():
    # An all-padding response (length 0, logp 0) and a response of probability 1 (avg logp 0): finite value and grads.
    pc, pr = jnp.array([0.0, -2.0]), jnp.array([-3.0, 0.0])
    lc, lr = jnp.array([0.0, 3.0]), jnp.array([2.0, 0.0])
    for fn in (lambda c, r: simpo_loss(c, r, lc, lr)[0], lambda c, r: orpo_loss(c, r, lc, lr, 0.5)[0]):
        value, grads = jax.value_and_grad(fn, argnums=(0, 1))(pc, pr)
        assert np.isfinite(float(value)) and all(np.all(np.isfinite(g)) for g in grads)


def test_orpo_gradient_raises_chosen_and_lowers_rejected():
    g_c, g_r = jax.grad(lambda c, r: orpo_loss(c, r, jnp.array([3.0]), jnp.array([3.0]), 0.0)[0], argnums=(0, 1))(
        jnp.array([-3.0]), jnp.array([-4.5]))
    assert float(g_c[0]) < 0 < float(g_r[0])


def test_kto_padding_rows_change_nothing_and_get_no_gradient():
    rng = np.random.default_rng(3)
    pi, ref, kpi, kref = [(-rng.uniform(1, 9, size=4)).astype(np.float32) for _ in range(4)]
    good = np.array([True, False, True, False])
    want, wm = kto_loss(pi, ref, good, kpi, kref, beta=0.3)
    pad = lambda x, v: np.concatenate([x, np.full(2, v, np.float32)])  # noqa: E731
    valid = np.array([True] * 4 + [False] * 2)
    args = (pad(pi, np.nan), pad(ref, 1e30), np.concatenate([good, [True, False]]), pad(kpi, np.inf), pad(kref, np.nan))
    got, gm = kto_loss(*args, beta=0.3, valid=valid)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    for k in wm:
        np.testing.assert_allclose(gm[k], wm[k], rtol=1e-6, err_msg=k)
    g = jax.grad(lambda x: kto_loss(x, *args[1:], beta=0.3, valid=valid)[0])(args[0])
    assert np.all(np.isfinite(g)) and np.all(g[4:] == 0)
