"""PPO for language models: the clipped policy and value losses (advantages: ``_advantages.py``).

* Clipped surrogate — Schulman et al. 2017, "Proximal Policy Optimization Algorithms", eq. 7, with the optional
  dual clip of Ye et al. 2020 ("Mastering Complex Control in MOBA Games with Deep RL") for negative advantages.
* Clipped value loss — as in the OpenAI baselines / InstructGPT PPO code (Ziegler et al. 2019; Ouyang et al. 2022).

Every reduction is a token-weighted ``masked_mean`` over the valid (response) tokens of the batch.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from rlhf_jax.losses._common import masked_mean, masked_var

def _valid_only(x, valid):
    """x as float32 with its padded entries replaced by 0 (the first `where` of the double-where pattern)."""
    return jnp.where(valid, jnp.asarray(x, jnp.float32), 0.0)


def ppo_policy_loss(logprobs, old_logprobs, advantages, mask, *, clip_eps: float = 0.2, dual_clip=None):
    """PPO clipped surrogate policy loss (Schulman et al. 2017, eq. 7), optionally dual-clipped.

    ``rho = exp(logp - logp_old)``; per token ``l = max(-A * rho, -A * clip(rho, 1 - eps, 1 + eps))``; with dual
    clip ``c > 1`` (Ye et al. 2020), tokens with ``A < 0`` use ``min(l, -c * A)`` so a huge ratio cannot make the
    loss unbounded. ``loss = masked_mean(l, mask)``.

    Args:
      logprobs: ``[B, T]`` log-probabilities of the sampled tokens under the current policy (differentiated).
      old_logprobs: ``[B, T]`` log-probabilities under the rollout policy (treated as constants).
      advantages: ``[B, T]`` advantage estimates (treated as constants).
      mask: ``[B, T]`` valid response-token mask.
      clip_eps: trust-region half width ``eps``.
      dual_clip: ``c`` (> 1) for the dual clip, or ``None``.

    Returns:
      ``(loss, metrics)`` with ``"loss"``, ``"clipfrac"`` (fraction of valid tokens where the clip is active,
      ``-A * clip(rho) > -A * rho``), ``"approx_kl"`` (masked mean of ``(rho - 1) - log rho``), ``"ratio_mean"``,
      and ``"dual_clipfrac"`` when ``dual_clip`` is set.
    """
    if dual_clip is not None and isinstance(dual_clip, (int, float)) and dual_clip <= 1.0:
        raise ValueError(f"ppo_policy_loss: dual_clip must be > 1 (Ye et al. 2020 use 3), got {dual_clip}.")
    # The rollout policy and the advantages are fixed targets: only the current policy gets gradients. Padded
    # slots are zeroed before any arithmetic, so NaN/Inf there reach neither the value nor the gradient.
    valid = jnp.asarray(mask) > 0
    old = lax.stop_gradient(_valid_only(old_logprobs, valid))
    adv = lax.stop_gradient(_valid_only(advantages, valid))
    log_ratio = _valid_only(logprobs, valid) - old
    ratio = jnp.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    per_token = jnp.maximum(unclipped, clipped)
    metrics = {}
    if dual_clip is not None:
        cap = -dual_clip * adv
        dual_active = (adv < 0) & (per_token > cap)
        per_token = jnp.where(adv < 0, jnp.minimum(per_token, cap), per_token)
        metrics["dual_clipfrac"] = masked_mean(dual_active.astype(jnp.float32), mask)
    loss = masked_mean(per_token, mask)
    metrics = {
        "loss": loss,
        "clipfrac": masked_mean((clipped > unclipped).astype(jnp.float32), mask),
        "approx_kl": masked_mean(lax.stop_gradient((ratio - 1.0) - log_ratio), mask),
        "ratio_mean": masked_mean(lax.stop_gradient(ratio), mask),
        **metrics,
    }
    return loss, metrics


def ppo_value_loss(values, old_values, returns, mask, *, clip_eps: float | None = 0.2):
    """Clipped value-function loss.

    ``v_clip = clip(v, v_old - eps, v_old + eps)`` (= ``v_old + clip(v - v_old, -eps, eps)``);
    ``loss = 0.5 * masked_mean(max((v - R)^2, (v_clip - R)^2))`` (unclipped ``0.5 * (v - R)^2`` when ``eps`` is None).

    Args:
      values: ``[B, T]`` current value predictions (differentiated).
      old_values: ``[B, T]`` value predictions at rollout time (constants).
      returns: ``[B, T]`` targets ``R`` (e.g. from ``gae``; constants).
      mask: ``[B, T]`` valid-token mask.
      clip_eps: clip half width, or ``None`` for no clipping.

    Returns:
      ``(loss, metrics)`` with ``"loss"``, ``"clipfrac"`` (fraction of valid tokens where the clipped term is the
      larger; a token inside the clip range has ``v_clip == v`` bit for bit, so it never counts, however close
      ``v`` is to ``v_old``: on-policy, where the two come from different forwards, the count is 0, not float
      noise), ``"explained_variance"`` (``1 - Var[R - v] / Var[R]`` over valid tokens; 0 when ``Var[R] = 0``).
    """
    valid = jnp.asarray(mask) > 0                  # padded slots zeroed first: no NaN/Inf reaches the gradient
    v = _valid_only(values, valid)
    old = lax.stop_gradient(_valid_only(old_values, valid))
    ret = lax.stop_gradient(_valid_only(returns, valid))
    err = jnp.square(v - ret)
    if clip_eps is None:
        per_token = err
        clipfrac = jnp.zeros((), jnp.float32)
    else:
        # Clip v itself (not old + clipped difference, which rounds): inside the range v_clip is v exactly, and
        # only a token outside it can count as clipped (on-policy v == old up to float noise: no ties to flip).
        err_clipped = jnp.square(jnp.clip(v, old - clip_eps, old + clip_eps) - ret)
        per_token = jnp.maximum(err, err_clipped)
        outside = jnp.abs(v - old) > clip_eps
        clipfrac = masked_mean((outside & (err_clipped > err)).astype(jnp.float32), mask)
    loss = 0.5 * masked_mean(per_token, mask)
    explained = explained_variance(lax.stop_gradient(v), ret, mask)
    return loss, {"loss": loss, "clipfrac": clipfrac, "explained_variance": explained}


def explained_variance(values, returns, mask):
    """``1 - Var[R - v] / Var[R]`` over valid tokens (population variances; 0 when ``Var[R] = 0``): the share of
    the returns' variance the value predictions explain (1 perfect, 0 no better than a constant, < 0 worse)."""
    ret = jnp.asarray(returns, jnp.float32)
    var_ret = masked_var(ret, mask, unbiased=False)
    var_err = masked_var(ret - jnp.asarray(values, jnp.float32), mask, unbiased=False)
    return jnp.where(var_ret > 0, 1.0 - var_err / jnp.where(var_ret > 0, var_ret, 1.0), 0.0)
