"""The clipped policy-gradient loss of the GRPO family, one function with a loss type per paper.

Per token, with ``rho_t = exp(lp_t - old_t)`` and ``hi = clip_eps_high or clip_eps``:

    l_t = -w_t * min(rho_t A, clip(rho_t, 1 - clip_eps, 1 + hi) A) + kl_coef * KL_t

* ``"grpo"``: mean over sequences of each sequence's token mean (Shao et al. 2024, "DeepSeekMath", eq. 3).
* ``"dapo"``: token-level mean over the batch (Yu et al. 2025, "DAPO", eq. 8), with clip-higher (``hi > eps``).
* ``"dr_grpo"``: sum over tokens divided by a constant ``B * max_tokens`` (Liu et al. 2025, "Understanding
  R1-Zero-Like Training", sec. 3.1: no length normalisation, so no length bias).
* ``"gspo"``: one ratio per sequence, ``s_i = exp(mean_t (lp_t - old_t))``, clipped per sequence (Zheng et al.
  2025, "Group Sequence Policy Optimization", eq. 5-7); needs sequence advantages ``[B]``.
* ``"cispo"``: ``l_t = -sg(min(rho_t, 1 + hi)) * w_t * A * lp_t``, a clipped, stop-gradient importance weight on the
  log-prob, so no token's gradient is dropped (MiniMax 2025, "MiniMax-M1", eq. 4), aggregated as ``"dapo"``.

``KL_t`` is ``kl_penalty(lp, ref_lp, kl_estimator)`` "in the loss" (DeepSeekMath uses k3; its gradient is biased
as an estimate of grad KL(pi || ref), see docs/algorithms.md), aggregated as the surrogate (``"grpo"`` for gspo).
``w_t`` are truncated importance weights between the sampler and the trainer (TIS), constants multiplying the
surrogate only. Padded slots are zeroed before any arithmetic, so NaN/Inf there reach no value or gradient.
"""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from rlhf_jax.losses._common import masked_mean, masked_sum
from rlhf_jax.losses._kl import kl_penalty

PG_LOSS_TYPES = ("grpo", "dapo", "dr_grpo", "gspo", "cispo")


def _aggregate(per_token, valid, loss_type: str, max_tokens: int | None):
    if loss_type == "grpo" or loss_type == "gspo":
        n = jnp.sum(valid, axis=1)
        per_seq = masked_sum(per_token, valid, axis=1) / jnp.maximum(n, 1)
        return jnp.mean(per_seq)
    if loss_type in ("dapo", "cispo"):
        return masked_mean(per_token, valid)
    B, T = per_token.shape
    return masked_sum(per_token, valid) / (B * (max_tokens or T))


def policy_gradient_loss(logprobs, old_logprobs, advantages, mask, *, loss_type: str = "grpo", clip_eps: float = 0.2,
                         clip_eps_high: float | None = None, max_tokens: int | None = None, ref_logprobs=None,
                         kl_coef: float = 0.0, kl_estimator: str = "k3", importance_weights=None):
    """The GRPO-family loss (see the module docstring for each ``loss_type``).

    Args:
      logprobs: ``[B, T]`` log-probs of the sampled tokens under the current policy (differentiated).
      old_logprobs: ``[B, T]`` under the policy that sampled them (constants).
      advantages: ``[B]`` (one per sequence, broadcast over its tokens) or ``[B, T]`` (constants).
      mask: ``[B, T]`` valid response tokens.
      loss_type: one of ``PG_LOSS_TYPES``.
      clip_eps, clip_eps_high: lower and upper clip widths (``clip_eps_high`` None: symmetric).
      max_tokens: the constant normaliser of ``"dr_grpo"`` (None: T).
      ref_logprobs: ``[B, T]`` reference log-probs, required when ``kl_coef > 0``.
      kl_coef, kl_estimator: the KL term in the loss.
      importance_weights: ``[B, T]`` TIS weights (constants), or None.

    Returns:
      ``(loss, metrics)``: ``"loss"``, ``"clipfrac"`` (fraction of valid tokens, or sequences for gspo, where the
      clip is active: the clipped term is the smaller one, for cispo the weight was truncated), ``"clipfrac_low"``
      and ``"clipfrac_high"`` (the same fraction split by side, as TRL's ``clip_ratio/low_mean`` and ``high_mean``:
      ``rho < 1 - clip_eps`` with ``A < 0``, and ``rho > 1 + hi`` with ``A > 0``), ``"approx_kl"``
      (masked mean of ``(rho - 1) - log rho``), ``"ratio_mean"`` (masked mean of ``rho``; gspo: mean ``s_i``), and
      ``"kl"`` (masked mean of ``KL_t``) when ``kl_coef > 0``.
    """
    if loss_type not in PG_LOSS_TYPES:
        raise ValueError(f"policy_gradient_loss: loss_type must be one of {PG_LOSS_TYPES}, got {loss_type!r}")
    if kl_coef and ref_logprobs is None:
        raise ValueError("policy_gradient_loss: kl_coef > 0 needs ref_logprobs")
    valid = jnp.asarray(mask) > 0
    zero = lambda x: jnp.where(valid, jnp.asarray(x, jnp.float32), 0.0)  # noqa: E731  (first where of two)
    lp = zero(logprobs)
    old = lax.stop_gradient(zero(old_logprobs))
    adv = jnp.asarray(advantages, jnp.float32)
    if loss_type == "gspo" and adv.ndim != 1:
        raise ValueError("policy_gradient_loss: gspo needs sequence advantages [B]")
    adv = lax.stop_gradient(zero(jnp.broadcast_to(adv[:, None], lp.shape) if adv.ndim == 1 else adv))
    w = 1.0 if importance_weights is None else lax.stop_gradient(zero(importance_weights))
    hi = clip_eps if clip_eps_high is None else clip_eps_high
    log_ratio = lp - old
    ratio = jnp.exp(log_ratio)
    metrics = {"approx_kl": masked_mean(lax.stop_gradient(jnp.expm1(log_ratio) - log_ratio), valid)}
    if loss_type == "gspo":
        n = jnp.maximum(jnp.sum(valid, axis=1), 1)
        seq_ratio = jnp.exp(masked_sum(log_ratio, valid, axis=1) / n)                          # [B]
        seq_adv = adv[:, 0]
        seq_w = 1.0 if importance_weights is None else masked_sum(w, valid, axis=1) / n
        clipped_ratio = jnp.clip(seq_ratio, 1.0 - clip_eps, 1.0 + hi)
        surrogate = -seq_w * jnp.minimum(seq_ratio * seq_adv, clipped_ratio * seq_adv)          # [B]
        loss = jnp.mean(surrogate)
        metrics["clipfrac"] = jnp.mean((clipped_ratio * seq_adv < seq_ratio * seq_adv).astype(jnp.float32))
        metrics["clipfrac_low"] = jnp.mean(((seq_ratio < 1.0 - clip_eps) & (seq_adv < 0)).astype(jnp.float32))
        metrics["clipfrac_high"] = jnp.mean(((seq_ratio > 1.0 + hi) & (seq_adv > 0)).astype(jnp.float32))
        metrics["ratio_mean"] = jnp.mean(lax.stop_gradient(seq_ratio))
    else:
        if loss_type == "cispo":
            weight = lax.stop_gradient(jnp.minimum(ratio, 1.0 + hi))
            per_token = -w * weight * adv * lp
            active = ratio > 1.0 + hi
        else:
            clipped = jnp.clip(ratio, 1.0 - clip_eps, 1.0 + hi) * adv
            per_token = -w * jnp.minimum(ratio * adv, clipped)
            active = clipped < ratio * adv
        loss = _aggregate(per_token, valid, loss_type, max_tokens)
        metrics["clipfrac"] = masked_mean(active.astype(jnp.float32), valid)
        low = jnp.zeros_like(active) if loss_type == "cispo" else (ratio < 1.0 - clip_eps) & (adv < 0)
        high = active if loss_type == "cispo" else (ratio > 1.0 + hi) & (adv > 0)
        metrics["clipfrac_low"] = masked_mean(low.astype(jnp.float32), valid)
        metrics["clipfrac_high"] = masked_mean(high.astype(jnp.float32), valid)
        metrics["ratio_mean"] = masked_mean(lax.stop_gradient(ratio), valid)
    if kl_coef:
        kl = kl_penalty(lp, lax.stop_gradient(zero(ref_logprobs)), estimator=kl_estimator)
        kl = jnp.where(valid, kl, 0.0)
        kl_loss = _aggregate(kl, valid, "grpo" if loss_type == "gspo" else loss_type, max_tokens)
        loss = loss + kl_coef * kl_loss
        metrics["kl"] = masked_mean(lax.stop_gradient(kl), valid)
    metrics["loss"] = loss
    return loss, metrics
