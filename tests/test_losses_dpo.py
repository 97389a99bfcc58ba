"""dpo_loss (sigmoid/cDPO, robust, hinge, ipo, reference-free) vs numpy; properties; jit/grad/vmap/no retrace."""
import functools
import math

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhf_jax.losses import dpo_loss


def logsig(x):
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def np_dpo(pc, pr, rc, rr, beta, loss_type, eps, lc, lr, ref_free):
    losses = []
    for i in range(len(pc)):
        ref_c, ref_r = (0.0, 0.0) if ref_free else (float(rc[i]), float(rr[i]))
        lrc, lrr = float(pc[i]) - ref_c, float(pr[i]) - ref_r
        h = beta * (lrc - lrr)
        if loss_type == "sigmoid":
            losses.append(-(1 - eps) * logsig(h) - eps * logsig(-h))
        elif loss_type == "robust":
            losses.append((-(1 - eps) * logsig(h) + eps * logsig(-h)) / (1 - 2 * eps))
        elif loss_type == "hinge":
            losses.append(max(0.0, 1 - h))
        else:
            losses.append((lrc / lc[i] - lrr / lr[i] - 1 / (2 * beta)) ** 2)
    return sum(losses) / len(losses)


def make(rng, b):
    arrays = [(-rng.uniform(1, 20, size=b)).astype(np.float32) for _ in range(4)]
    lengths = [rng.integers(1, 10, size=b).astype(np.float32) for _ in range(2)]
    return arrays, lengths


@pytest.mark.parametrize("b", [1, 5])
@pytest.mark.parametrize("loss_type,eps", [("sigmoid", 0.0), ("sigmoid", 0.1), ("robust", 0.0), ("robust", 0.2),
                                           ("hinge", 0.0), ("ipo", 0.0)])
@pytest.mark.parametrize("ref_free", [False, True])
def test_dpo_vs_numpy(b, loss_type, eps, ref_free):
    rng = np.random.default_rng(b)
    (pc, pr, rc, rr), (lc, lr) = make(rng, b)
    beta = 0.3
    fn = jax.jit(functools.partial(dpo_loss, beta=beta, loss_type=loss_type, label_smoothing=eps,
                                   reference_free=ref_free))
    loss, m = fn(pc, pr, rc, rr, chosen_lengths=lc, rejected_lengths=lr)
    np.testing.assert_allclose(loss, np_dpo(pc, pr, rc, rr, beta, loss_type, eps, lc, lr, ref_free), rtol=1e-5)
    zc = 0 if ref_free else rc
    zr = 0 if ref_free else rr
    np.testing.assert_allclose(m["loss"], loss)
    np.testing.assert_allclose(m["rewards_chosen"], np.mean(beta * (pc - zc)), rtol=1e-5)
    np.testing.assert_allclose(m["rewards_rejected"], np.mean(beta * (pr - zr)), rtol=1e-5)
    np.testing.assert_allclose(m["rewards_margin"], np.mean(beta * (pc - zc - pr + zr)), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(m["rewards_accuracy"], np.mean(pc - zc > pr - zr))
    np.testing.assert_allclose(m["logps_chosen"], pc.mean(), rtol=1e-6)
    np.testing.assert_allclose(m["logps_rejected"], pr.mean(), rtol=1e-6)


def test_errors():
    x = np.zeros(2, np.float32)
    with pytest.raises(ValueError, match="sigmoid, robust, hinge, ipo"):
        dpo_loss(x, x, x, x, loss_type="kto")
    with pytest.raises(ValueError, match="chosen_lengths"):
        dpo_loss(x, x, x, x, loss_type="ipo")
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(x, x, x, x, loss_type="robust", label_smoothing=0.5)


def test_gradient_sigmoid_and_no_grad_into_reference():
    pc, pr, rc, rr = (np.array([v], np.float32) for v in (-3.0, -5.0, -4.0, -4.5))
    beta = 0.5
    grads = jax.jit(jax.grad(lambda *a: dpo_loss(*a, beta=beta)[0], argnums=(0, 1, 2, 3)))(pc, pr, rc, rr)
    h = beta * ((-3.0 + 4.0) - (-5.0 + 4.5))
    s = 1 / (1 + math.exp(-h))
    np.testing.assert_allclose(grads[0], [-beta * (1 - s)], rtol=1e-5)
    np.testing.assert_allclose(grads[1], [beta * (1 - s)], rtol=1e-5)
    np.testing.assert_array_equal(grads[2], [0.0])
    np.testing.assert_array_equal(grads[3], [0.0])


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), b=st.integers(1, 4), beta=st.floats(0.01, 2.0))
def test_policy_equals_reference_gives_log2(seed, b, beta):
    rng = np.random.default_rng(seed)
    pc, pr = (-rng.uniform(0, 50, size=b)).astype(np.float32), (-rng.uniform(0, 50, size=b)).astype(np.float32)
    loss, m = _dpo_jit(pc, pr, pc, pr, beta)
    np.testing.assert_allclose(loss, math.log(2), rtol=1e-6)
    assert float(m["rewards_accuracy"]) == 0.0


_dpo_jit = jax.jit(lambda pc, pr, rc, rr, beta: dpo_loss(pc, pr, rc, rr, beta=beta))


def test_vmap_and_no_retrace():
    rng = np.random.default_rng(0)
    arrays = [(-rng.uniform(1, 20, size=(3, 4))).astype(np.float32) for _ in range(4)]
    losses, _ = jax.jit(jax.vmap(functools.partial(dpo_loss, beta=0.2)))(*arrays)
    for i in range(3):
        ref = np_dpo(*(a[i] for a in arrays), 0.2, "sigmoid", 0.0, None, None, False)
        np.testing.assert_allclose(losses[i], ref, rtol=1e-5)
    traces = [0]

    @jax.jit
    def f(pc, pr, rc, rr, lc, lr, beta):
        traces[0] += 1
        return jax.value_and_grad(lambda pc: dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="ipo",
                                                      chosen_lengths=lc, rejected_lengths=lr)[0])(pc)

    lengths = np.ones((2, 4), np.float32) * 3
    f(*(a[0] for a in arrays), lengths[0], lengths[1], 0.1)
    f(*(a[1] for a in arrays), lengths[1] + 1, lengths[0], 0.5)
    assert traces[0] == 1


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_rpo_alpha_adds_the_chosen_nll_per_token(loss_type):
    """RPO = the DPO-family loss + alpha * sum(-log pi(y_c)) / sum(len_c) (numpy), with its gradient on the chosen
    log-probs (-alpha / sum(len_c) each, on top of DPO's); alpha = 0 is plain DPO."""
    rng = np.random.default_rng(5)
    (pc, pr, rc, rr), (lc, lr) = make(rng, 6)
    kw = dict(beta=0.2, loss_type=loss_type, chosen_lengths=lc, rejected_lengths=lr)
    base = np_dpo(pc, pr, rc, rr, 0.2, loss_type, 0.0, lc, lr, False)
    nll = -float(np.sum(pc)) / float(np.sum(lc))
    loss, m = dpo_loss(pc, pr, rc, rr, rpo_alpha=0.5, **kw)
    np.testing.assert_allclose(loss, base + 0.5 * nll, rtol=1e-5)
    np.testing.assert_allclose(m["nll_chosen"], nll, rtol=1e-6)
    plain, m0 = dpo_loss(pc, pr, rc, rr, **kw)
    np.testing.assert_allclose(plain, base, rtol=1e-5)
    assert "nll_chosen" not in m0
    g_rpo = jax.grad(lambda x: dpo_loss(x, pr, rc, rr, rpo_alpha=0.5, **kw)[0])(pc)
    g_dpo = jax.grad(lambda x: dpo_loss(x, pr, rc, rr, **kw)[0])(pc)
    np.testing.assert_allclose(g_rpo - g_dpo, np.full(6, -0.5 / np.sum(lc)), rtol=1e-5)
    with pytest.raises(ValueError, match="rpo_alpha"):
        dpo_loss(pc, pr, rc, rr, rpo_alpha=1.0)
