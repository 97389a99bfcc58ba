"""distill_loss (forward KL, reverse KL, generalised JSD) against numpy loops, its properties, and the top-k teacher."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.losses import distill_loss, distill_loss_from_topk, teacher_topk_logprobs

B, T, V = 3, 5, 7


def inputs(seed=0, scale=2.0):
    rng = np.random.default_rng(seed)
    s = (scale * rng.normal(size=(B, T, V))).astype(np.float32)
    t = (scale * rng.normal(size=(B, T, V))).astype(np.float32)
    lengths = rng.integers(1, T + 1, B)
    mask = (np.arange(T)[None] < lengths[:, None]).astype(np.float32)
    return s, t, mask


def np_log_softmax(x):
    x = np.asarray(x, np.float64)
    z = x - x.max()
    return z - math.log(np.exp(z).sum())


def np_kl(p, q):
    """KL(p || q) of two log-prob vectors, one term per outcome."""
    return sum(math.exp(p[i]) * (p[i] - q[i]) for i in range(len(p)))


def np_divergence(s, t, beta):
    if beta == 0:
        return np_kl(t, s)
    if beta == 1:
        return np_kl(s, t)
    m = [math.log((1 - beta) * math.exp(s[i]) + beta * math.exp(t[i])) for i in range(len(s))]
    return beta * np_kl(t, m) + (1 - beta) * np_kl(s, m)


def np_loss(s_logits, t_logits, mask, beta, temperature, topk=None):
    """Loops over tokens in float64; with topk, the distributions coarsened to (teacher's top k, the rest)."""
    total, fwd, rev, n = 0.0, 0.0, 0.0, 0.0
    for b in range(B):
        for i in range(T):
            if not mask[b, i]:
                continue
            s = np_log_softmax(s_logits[b, i] / temperature)
            t = np_log_softmax(t_logits[b, i] / temperature)
            if topk is not None:
                keep = sorted(range(V), key=lambda v: -t[v])[:topk]
                rest = [v for v in range(V) if v not in keep]
                s = [s[v] for v in keep] + ([math.log(sum(math.exp(s[v]) for v in rest))] if rest else [])
                t = [t[v] for v in keep] + ([math.log(sum(math.exp(t[v]) for v in rest))] if rest else [])
            total += mask[b, i] * np_divergence(s, t, beta)
            fwd += mask[b, i] * np_kl(t, s)
            rev += mask[b, i] * np_kl(s, t)
            n += mask[b, i]
    n = max(n, 1.0)
    return total / n, fwd / n, rev / n


@pytest.mark.parametrize("beta, temperature", [(0.0, 1.0), (0.3, 0.7), (0.5, 1.0), (1.0, 0.7)])
def test_matches_numpy_loops(beta, temperature):
    s, t, mask = inputs(1)
    loss, m = jax.jit(lambda *a: distill_loss(*a, beta=beta, temperature=temperature))(s, t, mask)
    want, fwd, rev = np_loss(s, t, mask, beta, temperature)
    np.testing.assert_allclose(loss, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m["loss"], want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m["kl_forward"], fwd, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m["kl_reverse"], rev, rtol=1e-5, atol=1e-6)


def test_ends_are_the_two_kls_and_jsd_is_between():
    s, t, mask = inputs(2)
    _, m = distill_loss(s, t, mask, beta=0.5)
    np.testing.assert_allclose(distill_loss(s, t, mask, beta=0.0)[0], m["kl_forward"], rtol=1e-6)
    np.testing.assert_allclose(distill_loss(s, t, mask, beta=1.0)[0], m["kl_reverse"], rtol=1e-6)
    jsd = float(distill_loss(s, t, mask, beta=0.5)[0])
    assert 0 < jsd <= math.log(2) + 1e-6         # the symmetric JSD is bounded by log 2
    assert float(m["kl_forward"]) != pytest.approx(float(m["kl_reverse"]), rel=1e-3)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_equal_distributions_give_zero_loss_and_zero_gradient(beta):
    s, _, mask = inputs(3)
    shifted = s + 5.0                            # the same distribution: logits differ by a constant
    loss, grad = jax.jit(jax.value_and_grad(lambda x: distill_loss(x, shifted, mask, beta=beta)[0]))(jnp.asarray(s))
    assert abs(float(loss)) < 1e-6
    np.testing.assert_allclose(grad, 0.0, atol=1e-6)


@pytest.mark.parametrize("topk", [None, 3])
def test_no_gradient_reaches_the_teacher(topk):
    s, t, mask = inputs(4)
    grads = jax.jit(jax.grad(lambda x, y: distill_loss(x, y, mask, beta=0.5, teacher_topk=topk)[0], argnums=(0, 1)))
    g_s, g = grads(jnp.asarray(s), jnp.asarray(t))
    np.testing.assert_array_equal(g, 0.0)
    assert float(jnp.abs(g_s).sum()) > 0


@pytest.mark.parametrize("beta, topk", [(0.0, None), (1.0, None), (0.5, None), (0.5, 3)])
def test_nan_and_inf_in_masked_slots_leak_nowhere(beta, topk):
    s, t, mask = inputs(5)
    bad_s, bad_t = s.copy(), t.copy()
    pad = mask == 0
    assert pad.any()
    bad_s[pad] = np.nan
    bad_t[pad] = np.inf
    bad_s[pad, 0] = -np.inf
    def fn(x, y):
        return distill_loss(x, y, mask, beta=beta, teacher_topk=topk)

    vg = jax.jit(jax.value_and_grad(fn, has_aux=True))
    (loss, m), grad = vg(jnp.asarray(bad_s), jnp.asarray(bad_t))
    (clean, _), clean_grad = vg(jnp.asarray(s), jnp.asarray(t))
    assert all(np.isfinite(float(v)) for v in m.values())
    np.testing.assert_allclose(loss, clean, rtol=1e-6)
    assert np.all(np.isfinite(grad))
    np.testing.assert_array_equal(np.asarray(grad)[pad], 0.0)
    np.testing.assert_allclose(grad, clean_grad, rtol=1e-5, atol=1e-7)


def test_temperature_divides_both_logits():
    s, t, mask = inputs(6)
    for beta in (0.0, 0.5, 1.0):
        scaled = distill_loss(s, t, mask, beta=beta, temperature=2.0)[0]
        np.testing.assert_allclose(scaled, distill_loss(s / 2.0, t / 2.0, mask, beta=beta)[0], rtol=1e-6)
    hot = float(distill_loss(s, t, mask, beta=0.0, temperature=4.0)[0])
    assert hot < float(distill_loss(s, t, mask, beta=0.0)[0])   # flatter distributions are closer


def test_empty_mask_gives_zero():
    s, t, _ = inputs(7)
    loss, m = distill_loss(s, t, np.zeros((B, T), np.float32))
    assert float(loss) == 0.0 and float(m["kl_forward"]) == 0.0


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_topk_all_of_the_vocabulary_equals_the_full_loss(beta):
    s, t, mask = inputs(8)
    full, m_full = distill_loss(s, t, mask, beta=beta, temperature=0.8)
    topk, m_topk = distill_loss(s, t, mask, beta=beta, temperature=0.8, teacher_topk=V)
    np.testing.assert_allclose(topk, full, rtol=1e-5)
    np.testing.assert_allclose(m_topk["kl_reverse"], m_full["kl_reverse"], rtol=1e-5)
    g_full = jax.jit(jax.grad(lambda x: distill_loss(x, t, mask, beta=beta)[0]))(jnp.asarray(s))
    g_topk = jax.jit(jax.grad(lambda x: distill_loss(x, t, mask, beta=beta, teacher_topk=V)[0]))(jnp.asarray(s))
    np.testing.assert_allclose(g_topk, g_full, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("beta, k", [(0.0, 3), (0.5, 1), (1.0, 3)])
def test_topk_is_the_divergence_of_the_coarsened_distributions(beta, k):
    s, t, mask = inputs(9, scale=1.0)
    loss, m = jax.jit(lambda *a: distill_loss(*a, beta=beta, temperature=0.9, teacher_topk=k))(s, t, mask)
    want, fwd, rev = np_loss(s, t, mask, beta, 0.9, topk=k)
    np.testing.assert_allclose(loss, want, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(m["kl_forward"], fwd, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(m["kl_reverse"], rev, rtol=1e-4, atol=1e-6)
    assert float(loss) <= float(distill_loss(s, t, mask, beta=beta, temperature=0.9)[0]) + 1e-6


def test_from_topk_takes_a_stored_teacher():
    s, t, mask = inputs(10)
    logp, ids = teacher_topk_logprobs(t, 4, temperature=0.5)
    assert logp.shape == ids.shape == (B, T, 4)
    assert np.all(np.diff(np.asarray(logp), axis=-1) <= 0)
    got = distill_loss_from_topk(s, np.asarray(logp), np.asarray(ids), mask, beta=0.5, temperature=0.5)[0]
    np.testing.assert_allclose(got, distill_loss(s, t, mask, beta=0.5, temperature=0.5, teacher_topk=4)[0],
                               rtol=1e-6)


def test_bad_options_are_refused():
    s, t, mask = inputs(11)
    with pytest.raises(ValueError, match="beta"):
        distill_loss(s, t, mask, beta=1.5)
    with pytest.raises(ValueError, match="temperature"):
        distill_loss(s, t, mask, temperature=0.0)
    with pytest.raises(ValueError, match="k must be"):
        distill_loss(s, t, mask, teacher_topk=V + 1)
