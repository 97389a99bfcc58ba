"""GAE, whiten, PPO policy/value losses vs numpy loops; trust-region gradient and padding properties."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhf_jax.losses import gae, ppo_policy_loss, ppo_value_loss, whiten


def ragged(rng, b, t, min_len=0):
    lengths = rng.integers(min_len, t + 1, size=b)
    return (np.arange(t)[None, :] < lengths[:, None]).astype(np.float32)


def np_gae(r, v, mask, gamma, lam):
    adv, ret = np.zeros(r.shape), np.zeros(r.shape)
    for b in range(r.shape[0]):
        n = int(mask[b].sum())
        a = 0.0
        for t in reversed(range(n)):
            next_v = v[b, t + 1] if t + 1 < n else 0.0
            delta = r[b, t] + gamma * next_v - v[b, t]
            a = delta + gamma * lam * a
            adv[b, t] = a
            ret[b, t] = a + v[b, t]
    return adv, ret


def np_policy(lp, old, adv, mask, eps, dual):
    total, n, clipped_count = 0.0, 0, 0
    for b in range(lp.shape[0]):
        for t in range(lp.shape[1]):
            if not mask[b, t]:
                continue
            ratio = np.exp(float(lp[b, t]) - float(old[b, t]))
            a = float(adv[b, t])
            u, c = -a * ratio, -a * min(max(ratio, 1 - eps), 1 + eps)
            loss = max(u, c)
            if dual is not None and a < 0:
                loss = min(loss, -dual * a)
            total += loss
            n += 1
            clipped_count += c > u
    return total / n, clipped_count / n


def np_value(v, old, ret, mask, eps):
    total, n, clipped = 0.0, 0, 0
    for b in range(v.shape[0]):
        for t in range(v.shape[1]):
            if mask[b, t]:
                e1 = (v[b, t] - ret[b, t]) ** 2
                vc = old[b, t] + min(max(v[b, t] - old[b, t], -eps), eps) if eps is not None else v[b, t]
                e2 = (vc - ret[b, t]) ** 2
                total += max(e1, e2)
                n += 1
                clipped += e2 > e1
    valid = mask > 0
    ev = 1 - np.var((ret - v)[valid]) / np.var(ret[valid])
    return 0.5 * total / n, clipped / n, ev


_gae_jit = jax.jit(lambda r, v, m, g, l: gae(r, v, m, gamma=g, lam=l))


@pytest.mark.parametrize("b,t", [(1, 1), (3, 6), (4, 10)])
@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.0), (0.9, 1.0), (1.0, 1.0), (0.5, 0.7)])
def test_gae_vs_backward_loop(b, t, gamma, lam):
    rng = np.random.default_rng(b * t)
    r, v = rng.normal(size=(b, t)).astype(np.float32), rng.normal(size=(b, t)).astype(np.float32)
    mask = ragged(rng, b, t)
    adv, ret = _gae_jit(r, v, mask, gamma, lam)
    ref_adv, ref_ret = np_gae(r, v, mask, gamma, lam)
    np.testing.assert_allclose(adv, ref_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ret, ref_ret, rtol=1e-5, atol=1e-5)


def test_gae_over_policy_turns_separated_by_environment_tokens():
    """Multi-turn rows: the policy's turns separated by environment tokens (m = 0). The next state of a policy token
    is the next policy token, whatever lies between: a loop over each row's policy positions only."""
    rng = np.random.default_rng(3)
    b, t = 4, 12
    r, v = rng.normal(size=(b, t)).astype(np.float32), rng.normal(size=(b, t)).astype(np.float32)
    mask = np.zeros((b, t), np.float32)
    mask[0, [0, 1, 2, 5, 6, 9]] = 1          # three turns
    mask[1, [2, 3, 7]] = 1                   # starts after environment tokens
    mask[2, :5] = 1                          # one turn (the contiguous case)
    mask[3, [11]] = 1
    adv, ret = _gae_jit(r, v, mask, 0.9, 0.8)
    ref_adv, ref_ret = np.zeros((b, t)), np.zeros((b, t))
    for i in range(b):
        pos = np.flatnonzero(mask[i])
        a = np_gae(r[i, pos][None], v[i, pos][None], np.ones((1, pos.size)), 0.9, 0.8)[0]
        ref_adv[i, pos] = a[0]
        ref_ret[i, pos] = a[0] + v[i, pos]
    np.testing.assert_allclose(adv, ref_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ret, ref_ret, rtol=1e-5, atol=1e-5)
    # The last turn's reward reaches the first turn's tokens (the episode is one return).
    only_end = np.zeros((b, t), np.float32)
    only_end[0, 9] = 1.0
    adv_end, _ = _gae_jit(only_end, np.zeros((b, t), np.float32), mask, 1.0, 1.0)
    np.testing.assert_allclose(np.asarray(adv_end)[0, [0, 1, 2, 5, 6, 9]], 1.0)
    assert np.all(np.asarray(adv_end)[0, [3, 4, 7, 8, 10, 11]] == 0)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), pad=st.integers(1, 3))
def test_gae_monte_carlo_and_padding(seed, pad):
    rng = np.random.default_rng(seed)
    b, t = 3, 5
    r, v = rng.normal(size=(b, t)).astype(np.float32), rng.normal(size=(b, t)).astype(np.float32)
    mask = ragged(rng, b, t)
    adv, ret = _gae_jit(r, v, mask, 1.0, 1.0)
    reward_to_go = np.flip(np.cumsum(np.flip(r * mask, 1), 1), 1)
    np.testing.assert_allclose(adv, (reward_to_go - v) * mask, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ret, reward_to_go * mask, rtol=1e-5, atol=1e-5)
    garbage = lambda: rng.normal(size=(b, pad)).astype(np.float32) * 1e3  # noqa: E731
    adv_p, ret_p = _gae_jit(np.concatenate([r, garbage()], 1), np.concatenate([v, garbage()], 1),
                            np.concatenate([mask, np.zeros((b, pad), np.float32)], 1), 0.9, 0.8)
    adv_0, ret_0 = _gae_jit(r, v, mask, 0.9, 0.8)
    np.testing.assert_allclose(adv_p[:, :t], adv_0, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ret_p[:, :t], ret_0, rtol=1e-6, atol=1e-6)
    assert np.all(np.asarray(adv_p[:, t:]) == 0) and np.all(np.asarray(ret_p[:, t:]) == 0)


@pytest.mark.parametrize("shift_mean", [True, False])
def test_whiten(shift_mean):
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(4, 7)) * 3 + 2).astype(np.float32)
    mask = ragged(rng, 4, 7, min_len=2)
    y = np.asarray(jax.jit(functools.partial(whiten, shift_mean=shift_mean))(x, mask))
    vals = x[mask > 0].astype(np.float64)
    ref = (x - vals.mean()) / np.sqrt(vals.var(ddof=1) + 1e-8) + (0 if shift_mean else vals.mean())
    np.testing.assert_allclose(y[mask > 0], ref[mask > 0], rtol=1e-5, atol=1e-5)
    assert np.all(y[mask == 0] == 0)
    valid = y[mask > 0]
    if shift_mean:
        np.testing.assert_allclose(valid.mean(), 0.0, atol=1e-6)
    np.testing.assert_allclose(valid.var(ddof=1), 1.0, rtol=1e-5)


_policy_eps_jit = jax.jit(lambda lp, old, adv, m, eps, dual: ppo_policy_loss(lp, old, adv, m, clip_eps=eps,
                                                                                dual_clip=dual), static_argnums=5)


@pytest.mark.parametrize("b,t", [(1, 3), (3, 8)])
@pytest.mark.parametrize("eps,dual", [(0.2, None), (0.1, None), (0.2, 3.0), (0.3, 1.5)])
def test_policy_loss_vs_numpy(b, t, eps, dual):
    rng = np.random.default_rng(b + t)
    old = rng.normal(size=(b, t)).astype(np.float32) - 2
    lp = (old + rng.normal(size=(b, t)) * 0.8).astype(np.float32)
    adv = rng.normal(size=(b, t)).astype(np.float32)
    mask = ragged(rng, b, t, min_len=1)
    loss, m = _policy_eps_jit(lp, old, adv, mask, eps, dual)
    ref, clipfrac = np_policy(lp, old, adv, mask, eps, dual)
    np.testing.assert_allclose(loss, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m["clipfrac"], clipfrac, atol=1e-6)
    ratio = np.exp(lp.astype(np.float64) - old)
    valid = mask > 0
    np.testing.assert_allclose(m["approx_kl"], ((ratio - 1) - np.log(ratio))[valid].mean(), rtol=1e-4)
    np.testing.assert_allclose(m["ratio_mean"], ratio[valid].mean(), rtol=1e-5)
    assert ("dual_clipfrac" in m) == (dual is not None)


_policy_grad = jax.jit(jax.grad(lambda lp, old, adv, mask: ppo_policy_loss(lp, old, adv, mask, clip_eps=0.2)[0]))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_policy_gradient_zero_outside_trust_region(seed):
    rng = np.random.default_rng(seed)
    shape = (2, 6)
    ratio = rng.uniform(0.5, 1.5, size=shape)
    ratio = np.where(np.abs(np.abs(ratio - 1) - 0.2) < 1e-3, 1.0, ratio)  # keep away from the clip boundary
    adv = rng.choice([-1, 1], size=shape) * rng.uniform(0.1, 2.0, size=shape)
    old = rng.normal(size=shape) - 1
    lp = (old + np.log(ratio)).astype(np.float32)
    g = np.asarray(_policy_grad(lp, old.astype(np.float32), adv.astype(np.float32), np.ones(shape, np.float32)))
    clipped_side = ((adv > 0) & (ratio > 1.2)) | ((adv < 0) & (ratio < 0.8))
    assert np.all(g[clipped_side] == 0.0)
    assert np.all(g[~clipped_side] != 0.0)
    np.testing.assert_allclose(g[~clipped_side], (-adv * ratio / adv.size)[~clipped_side], rtol=1e-4)


_policy_jit = jax.jit(lambda lp, old, adv, m: ppo_policy_loss(lp, old, adv, m, clip_eps=0.2, dual_clip=3.0))
_value_jit = jax.jit(lambda v, old, ret, m: ppo_value_loss(v, old, ret, m, clip_eps=0.2))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), pad=st.integers(1, 3))
def test_padding_never_changes_losses(seed, pad):
    rng = np.random.default_rng(seed)
    b, t = 2, 4
    arrays = [rng.normal(size=(b, t)).astype(np.float32) for _ in range(4)]
    mask = ragged(rng, b, t, min_len=1)
    padded = [np.concatenate([a, rng.normal(size=(b, pad)).astype(np.float32) * 50], 1) for a in arrays]
    mask_p = np.concatenate([mask, np.zeros((b, pad), np.float32)], 1)
    for fn in (_policy_jit, _value_jit):
        loss, m = fn(*arrays[:3], mask)
        loss_p, m_p = fn(*padded[:3], mask_p)
        np.testing.assert_allclose(loss_p, loss, rtol=1e-5, atol=1e-6)
        for k in m:
            np.testing.assert_allclose(m_p[k], m[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("eps", [0.2, 0.05, None])
def test_value_loss_vs_numpy(eps):
    rng = np.random.default_rng(1)
    shape = (3, 6)
    old = rng.normal(size=shape).astype(np.float32)
    v = (old + rng.normal(size=shape) * 0.3).astype(np.float32)
    ret = rng.normal(size=shape).astype(np.float32)
    mask = ragged(rng, *shape, min_len=2)
    loss, m = jax.jit(functools.partial(ppo_value_loss, clip_eps=eps))(v, old, ret, mask)
    ref, clipfrac, ev = np_value(v, old, ret, mask, eps)
    np.testing.assert_allclose(loss, ref, rtol=1e-5)
    np.testing.assert_allclose(m["clipfrac"], clipfrac, atol=1e-6)
    np.testing.assert_allclose(m["explained_variance"], ev, rtol=1e-4, atol=1e-5)
    grad_fn = jax.grad(lambda o, r: ppo_value_loss(v, o, r, mask, clip_eps=eps)[0], argnums=(0, 1))
    g_old, g_ret = jax.jit(grad_fn)(old, ret)
    assert np.all(np.asarray(g_old) == 0) and np.all(np.asarray(g_ret) == 0)


def test_vmap_grad_and_no_retrace():
    rng = np.random.default_rng(2)
    arrays = [rng.normal(size=(2, 3, 5)).astype(np.float32) for _ in range(4)]
    mask = np.ones((2, 3, 5), np.float32)
    adv, _ = jax.jit(jax.vmap(lambda r, v, m: gae(r, v, m, gamma=0.9, lam=0.8)))(arrays[0], arrays[1], mask)
    np.testing.assert_allclose(adv[1], np_gae(arrays[0][1], arrays[1][1], mask[1], 0.9, 0.8)[0], rtol=1e-5,
                               atol=1e-5)
    white = jax.jit(jax.vmap(whiten))(arrays[0], mask)
    np.testing.assert_allclose(white[1], whiten(arrays[0][1], mask[1]), rtol=1e-5, atol=1e-6)
    vlosses, _ = jax.jit(jax.vmap(ppo_value_loss))(*arrays[:3], mask)
    np.testing.assert_allclose(vlosses[1], np_value(*(a[1] for a in arrays[:3]), mask[1], 0.2)[0], rtol=1e-5)
    losses, _ = jax.jit(jax.vmap(ppo_policy_loss))(*arrays[:3], mask)
    np.testing.assert_allclose(losses[0], np_policy(*(a[0] for a in arrays[:3]), mask[0], 0.2, None)[0], rtol=1e-5)
    traces = [0]

    @jax.jit
    def f(lp, old, adv, v, m, gamma, lam):
        traces[0] += 1
        a, ret = gae(adv, v, m, gamma=gamma, lam=lam)
        a = whiten(a, m)
        gp = jax.grad(lambda lp: ppo_policy_loss(lp, old, a, m, dual_clip=2.0)[0])(lp)
        gv = jax.grad(lambda v: ppo_value_loss(v, old, ret, m)[0])(v)
        ga = jax.grad(lambda r: jnp.sum(gae(r, v, m, gamma=gamma, lam=lam)[0]))(adv)
        return gp, gv, ga

    f(*(a[0] for a in arrays), mask[0], 1.0, 0.95)
    f(*(a[1] for a in arrays), ragged(rng, 3, 5), 0.9, 0.5)
    assert traces[0] == 1


def test_value_clipfrac_counts_no_token_inside_the_clip_range():
    """Every |v - old| < eps: no token is clipped, so clipfrac is exactly 0 and the gradient is the unclipped one,
    whatever the rounding. (Computed as old + clip(v - old), v_clip differs from v by an ulp for about a third of
    such tokens, and some then counted as clipped: how a sharded PPO run's val/clipfrac differed from one
    device's.)"""
    rng = np.random.default_rng(0)
    old = rng.uniform(-0.09, 0.09, (8, 64)).astype(np.float32)
    v = rng.uniform(-0.09, 0.09, old.shape).astype(np.float32)               # |v - old| < 0.18 < eps = 0.2
    ret = rng.normal(size=old.shape).astype(np.float32)
    mask = np.ones(old.shape, np.float32)
    loss, m = _value_jit(v, old, ret, mask)
    assert float(m["clipfrac"]) == 0.0
    g = jax.jit(jax.grad(lambda v: ppo_value_loss(v, old, ret, mask, clip_eps=0.2)[0]))(v)
    np.testing.assert_allclose(g, (v - ret) / v.size, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("poison", [np.nan, 1e30, -1e30])
def test_no_nan_or_inf_in_a_padded_slot_reaches_a_gradient(poison):
    """Every input's padded slots hold NaN or +-1e30: the loss, the metrics and the gradient equal those with clean
    padding (and are finite), for the policy, value and SFT losses."""
    from rlhf_jax.losses import sft_loss
    rng = np.random.default_rng(0)
    shape = (3, 5)
    mask = ragged(rng, *shape, min_len=1)
    pad = mask == 0
    arrays = [rng.normal(size=shape).astype(np.float32) for _ in range(3)]
    poisoned = [np.where(pad, np.float32(poison), a) for a in arrays]
    cases = {
        "policy": lambda x, o, a: ppo_policy_loss(x, o, a, mask, clip_eps=0.2, dual_clip=3.0),
        "value": lambda x, o, a: ppo_value_loss(x, o, a, mask, clip_eps=0.2),
    }
    for name, fn in cases.items():
        clean_loss, clean_m = fn(*arrays)
        loss, m = fn(*poisoned)
        np.testing.assert_allclose(loss, clean_loss, rtol=1e-6, err_msg=name)
        for k in clean_m:
            np.testing.assert_allclose(m[k], clean_m[k], rtol=1e-6, atol=1e-7, err_msg=f"{name} {k}")
        g = jax.grad(lambda x: fn(x, *poisoned[1:])[0])(poisoned[0])
        g_clean = jax.grad(lambda x: fn(x, *arrays[1:])[0])(arrays[0])
        assert np.all(np.isfinite(g)), name
        np.testing.assert_allclose(g, g_clean, rtol=1e-6, atol=1e-8, err_msg=name)
    logits = rng.normal(size=(*shape, 7)).astype(np.float32)
    targets = rng.integers(0, 7, shape)
    bad_logits = np.where(pad[..., None], np.float32(poison), logits)
    bad_targets = np.where(pad, 10**6, targets)                                  # out of range in padding too
    g = jax.grad(lambda z: sft_loss(z, bad_targets, mask)[0])(bad_logits)
    g_clean = jax.grad(lambda z: sft_loss(z, targets, mask)[0])(logits)
    assert np.all(np.isfinite(g)) and np.all(np.asarray(g)[pad] == 0)
    np.testing.assert_allclose(g, g_clean, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(sft_loss(bad_logits, bad_targets, mask)[0], sft_loss(logits, targets, mask)[0],
                               rtol=1e-6)
