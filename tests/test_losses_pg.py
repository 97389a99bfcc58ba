"""policy_gradient_loss (GRPO, DAPO, Dr. GRPO, GSPO, CISPO) against numpy loops on ragged masks, and its properties."""
import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.losses import group_advantages, policy_gradient_loss

B, T = 4, 6


def ragged(rng):
    lengths = rng.integers(1, T + 1, B)
    return (np.arange(T)[None] < lengths[:, None]).astype(np.float32)


def k3(lp, ref):
    return np.exp(ref - lp) - 1 - (ref - lp)


def np_loss(lp, old, adv, mask, loss_type, eps, hi, max_tokens, ref, kl_coef, w):
    """Loops over sequences and tokens, in float64."""
    hi = eps if hi is None else hi
    adv = np.broadcast_to(adv[:, None], lp.shape) if adv.ndim == 1 else adv
    w = np.ones_like(lp) if w is None else w
    seq_losses, tok_sum, n_tok = [], 0.0, 0
    kl_seq, kl_sum = [], 0.0
    for b in range(B):
        idx = [t for t in range(T) if mask[b, t]]
        terms, kls = [], []
        if loss_type == "gspo":
            s = np.exp(np.mean([lp[b, t] - old[b, t] for t in idx]))
            a, wb = adv[b, 0], np.mean([w[b, t] for t in idx])
            seq_losses.append(-wb * min(s * a, np.clip(s, 1 - eps, 1 + hi) * a))
        for t in idx:
            rho = np.exp(lp[b, t] - old[b, t])
            if loss_type == "cispo":
                terms.append(-w[b, t] * min(rho, 1 + hi) * adv[b, t] * lp[b, t])
            elif loss_type != "gspo":
                terms.append(-w[b, t] * min(rho * adv[b, t], np.clip(rho, 1 - eps, 1 + hi) * adv[b, t]))
            kls.append(k3(lp[b, t], ref[b, t]))
        if loss_type != "gspo":
            seq_losses.append(np.mean(terms))
            tok_sum += np.sum(terms)
        n_tok += len(idx)
        kl_seq.append(np.mean(kls))
        kl_sum += np.sum(kls)
    if loss_type in ("grpo", "gspo"):
        loss, kl = np.mean(seq_losses), np.mean(kl_seq)
    elif loss_type in ("dapo", "cispo"):
        loss, kl = tok_sum / n_tok, kl_sum / n_tok
    else:
        loss, kl = tok_sum / (B * (max_tokens or T)), kl_sum / (B * (max_tokens or T))
    return loss + kl_coef * kl


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo", "gspo", "cispo"])
@pytest.mark.parametrize("kl_coef, hi, tis", [(0.0, None, False), (0.1, 0.28, True)])
def test_policy_gradient_loss_vs_numpy(loss_type, kl_coef, hi, tis):
    rng = np.random.default_rng(zlib.crc32(f"{loss_type} {kl_coef}".encode()))  # not hash(): salted per process
    mask = ragged(rng)
    old = -rng.random((B, T)).astype(np.float32) * 3
    lp = (old + rng.normal(size=(B, T)) * 0.3).astype(np.float32)                # ratios on both sides of the clip
    ref = (old + rng.normal(size=(B, T)) * 0.2).astype(np.float32)
    adv = rng.normal(size=B).astype(np.float32)
    w = rng.uniform(0.5, 1.0, (B, T)).astype(np.float32) if tis else None
    fn = jax.jit(functools.partial(policy_gradient_loss, loss_type=loss_type, clip_eps=0.2, clip_eps_high=hi,
                                   max_tokens=8, kl_coef=kl_coef))
    loss, m = fn(lp, old, adv, mask, ref_logprobs=ref, importance_weights=w)
    want = np_loss(*(x.astype(np.float64) for x in (lp, old, adv, mask)), loss_type, 0.2, hi, 8,
                   ref.astype(np.float64), kl_coef, None if w is None else w.astype(np.float64))
    np.testing.assert_allclose(loss, want, rtol=1e-5, atol=1e-6)
    assert ("kl" in m) == (kl_coef > 0) and {"loss", "clipfrac", "approx_kl", "ratio_mean"} <= m.keys()
    if loss_type != "gspo":                                                  # the clip is active somewhere
        assert 0.0 < float(m["clipfrac"]) < 1.0
    low, high = np_clip_sides(lp, old, adv, mask, loss_type, 0.2, hi)
    np.testing.assert_allclose([m["clipfrac_low"], m["clipfrac_high"]], [low, high], atol=1e-6)
    if loss_type not in ("gspo", "cispo"):           # for ppo-style clipping the sides partition the clipped set
        np.testing.assert_allclose(float(m["clipfrac_low"]) + float(m["clipfrac_high"]), m["clipfrac"], atol=1e-6)


def np_clip_sides(lp, old, adv, mask, loss_type, eps, hi):
    """Fractions of tokens (sequences for gspo) clipped below (rho < 1 - eps, A < 0) and above (rho > 1 + hi, A > 0)."""
    hi = eps if hi is None else hi
    low = high = count = 0
    for b in range(B):
        idx = [t for t in range(T) if mask[b, t]]
        if loss_type == "gspo":
            rhos, count = [np.exp(np.mean([lp[b, t] - old[b, t] for t in idx]))], count + 1
            advs = [adv[b]]
        else:
            rhos, count = [np.exp(lp[b, t] - old[b, t]) for t in idx], count + len(idx)
            advs = [adv[b]] * len(idx)
        for rho, a in zip(rhos, advs):
            low += loss_type != "cispo" and rho < 1 - eps and a < 0
            high += rho > 1 + hi and (a > 0 or loss_type == "cispo")
    return low / count, high / count


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo", "gspo", "cispo"])
def test_equal_rewards_give_zero_gradient_and_padding_never_matters(loss_type):
    rng = np.random.default_rng(1)
    mask = ragged(rng)
    old = -rng.random((B, T)).astype(np.float32)
    lp = (old + rng.normal(size=(B, T)) * 0.3).astype(np.float32)
    adv = group_advantages(np.full(B, 0.7, np.float32), group_size=2)             # equal rewards in each group
    g = jax.grad(lambda x: policy_gradient_loss(x, old, adv, mask, loss_type=loss_type)[0])(lp)
    assert np.all(np.asarray(g) == 0.0)
    adv = rng.normal(size=B).astype(np.float32)
    pad = mask == 0
    poisoned = [np.where(pad, np.float32(np.nan), x) for x in (lp, old)]
    f = lambda x, o: policy_gradient_loss(x, o, adv, mask, loss_type=loss_type, ref_logprobs=o, kl_coef=0.1)[0]  # noqa
    np.testing.assert_allclose(f(*poisoned), f(lp, old), rtol=1e-6)
    g_clean, g_bad = jax.grad(f)(lp, old), jax.grad(f)(*poisoned)
    assert np.all(np.isfinite(g_bad)) and np.all(np.asarray(g_bad)[pad] == 0)
    np.testing.assert_allclose(g_bad, g_clean, rtol=1e-6, atol=1e-8)


def test_on_policy_gradients_are_reinforce_with_each_types_weights():
    """At ratio 1 (lp == old) the clip is inactive: d loss / d lp_t = -A_b * weight_t, the weight being 1/(B n_b)
    for grpo, 1/N for dapo, 1/(B max_tokens) for dr_grpo; gspo's ratio is 1 and its gradient 1/(B n_b) as grpo's."""
    rng = np.random.default_rng(2)
    mask = ragged(rng)
    lp = -rng.random((B, T)).astype(np.float32)
    adv = rng.normal(size=B).astype(np.float32)
    n = mask.sum(1, keepdims=True)
    weights = {"grpo": 1 / (B * n), "dapo": 1 / mask.sum(), "dr_grpo": 1 / (B * 10.0), "gspo": 1 / (B * n)}
    for loss_type, weight in weights.items():
        loss_fn = lambda x: policy_gradient_loss(x, lp, adv, mask, loss_type=loss_type, max_tokens=10)  # noqa
        g = jax.grad(lambda x: loss_fn(x)[0])(lp)
        np.testing.assert_allclose(g, -adv[:, None] * weight * mask, rtol=1e-5, atol=1e-7, err_msg=loss_type)
        assert float(loss_fn(lp)[1]["ratio_mean"]) == pytest.approx(1.0) and float(loss_fn(lp)[1]["clipfrac"]) == 0


def test_cispo_gradient_is_the_clipped_stop_gradient_weight_times_advantage():
    rng = np.random.default_rng(3)
    mask = ragged(rng)
    old = -rng.random((B, T)).astype(np.float32)
    lp = (old + rng.normal(size=(B, T)) * 0.5).astype(np.float32)
    adv = rng.normal(size=B).astype(np.float32)
    g = jax.grad(lambda x: policy_gradient_loss(x, old, adv, mask, loss_type="cispo", clip_eps_high=0.28)[0])(lp)
    w = np.minimum(np.exp(lp - old), 1.28)
    assert (np.exp(lp - old)[mask > 0] > 1.28).any()                          # some weights are truncated
    np.testing.assert_allclose(g, -w * adv[:, None] * mask / mask.sum(), rtol=1e-5, atol=1e-7)


def test_bad_arguments():
    x = np.zeros((B, T), np.float32)
    with pytest.raises(ValueError, match="loss_type must be one of"):
        policy_gradient_loss(x, x, np.zeros(B), x, loss_type="ppo")
    with pytest.raises(ValueError, match="needs ref_logprobs"):
        policy_gradient_loss(x, x, np.zeros(B), x, kl_coef=0.1)
    with pytest.raises(ValueError, match="gspo needs sequence advantages"):
        policy_gradient_loss(x, x, x, x, loss_type="gspo")
