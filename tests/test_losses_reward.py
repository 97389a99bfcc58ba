"""bradley_terry_loss vs numpy (margin, centring), its gradient, jit/vmap/no retrace."""
import jax
import numpy as np
import pytest

from rlhf_jax.losses import bradley_terry_loss


def np_bt(rc, rr, margin, center):
    rc, rr = rc.astype(np.float64), rr.astype(np.float64)
    m = np.zeros_like(rc) if margin is None else margin
    terms = [np.log1p(np.exp(-(c - r - mm))) for c, r, mm in zip(rc, rr, m)]
    return np.mean(terms) + center * np.mean((rc + rr) ** 2)


@pytest.mark.parametrize("b", [1, 4, 9])
@pytest.mark.parametrize("use_margin,center", [(False, 0.0), (True, 0.0), (True, 0.01), (False, 0.5)])
def test_bt_vs_numpy(b, use_margin, center):
    rng = np.random.default_rng(b)
    rc, rr = rng.normal(size=b).astype(np.float32) * 2, rng.normal(size=b).astype(np.float32) * 2
    margin = rng.uniform(0, 1, size=b).astype(np.float32) if use_margin else None
    loss, m = jax.jit(lambda c, r, mg: bradley_terry_loss(c, r, margin=mg, center_coef=center))(rc, rr, margin)
    np.testing.assert_allclose(loss, np_bt(rc, rr, margin, center), rtol=1e-5)
    np.testing.assert_allclose(m["loss"], loss)
    np.testing.assert_allclose(m["accuracy"], np.mean(rc > rr), rtol=1e-6)
    np.testing.assert_allclose(m["reward_chosen"], rc.mean(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m["reward_rejected"], rr.mean(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m["reward_margin"], (rc - rr).mean(), rtol=1e-5, atol=1e-6)


def test_bt_gradient():
    rc, rr = np.array([0.3, -1.0], np.float32), np.array([0.1, 2.0], np.float32)
    gc, gr = jax.grad(lambda c, r: bradley_terry_loss(c, r, center_coef=0.1)[0], argnums=(0, 1))(rc, rr)
    sig = 1 / (1 + np.exp(-(rc - rr)))
    np.testing.assert_allclose(gc, -(1 - sig) / 2 + 0.1 * 2 * (rc + rr) / 2, rtol=1e-5)
    np.testing.assert_allclose(gr, (1 - sig) / 2 + 0.1 * 2 * (rc + rr) / 2, rtol=1e-5)
    np.testing.assert_allclose(bradley_terry_loss(np.zeros(3), np.zeros(3))[0], np.log(2), rtol=1e-6)


def test_vmap_and_no_retrace():
    rng = np.random.default_rng(0)
    rc, rr = rng.normal(size=(3, 4)).astype(np.float32), rng.normal(size=(3, 4)).astype(np.float32)
    losses, _ = jax.vmap(bradley_terry_loss)(rc, rr)
    for i in range(3):
        np.testing.assert_allclose(losses[i], np_bt(rc[i], rr[i], None, 0.0), rtol=1e-5)
    traces = [0]

    @jax.jit
    def f(c, r, mg):
        traces[0] += 1
        return jax.value_and_grad(lambda c: bradley_terry_loss(c, r, margin=mg, center_coef=0.01)[0])(c)

    f(rc[0], rr[0], rr[1])
    f(rc[1], rr[2], rc[2])
    assert traces[0] == 1
