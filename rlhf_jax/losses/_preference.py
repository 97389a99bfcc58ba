"""The preference family beyond DPO: unpaired (KTO) and reference-free (SimPO, ORPO) losses.

All three take sequence log-probabilities summed over response tokens (``sequence_logprobs``), as ``dpo_loss``
does; SimPO and ORPO divide them by the response lengths themselves (their rewards are average log-probs).

* ``kto_loss`` — KTO, Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization", eq. 8,
  with TRL's estimate of the reference point ``z0`` (the batch's KL between policy and reference, measured on
  mismatched prompt/completion pairs so that it carries no signal about the labels).
* ``simpo_loss`` — SimPO, Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward",
  eq. 6: the implicit reward is ``beta`` times the average log-probability, and the Bradley–Terry margin must
  exceed ``gamma``.
* ``orpo_loss`` — ORPO, Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model",
  eqs. 4-7: the SFT negative log-likelihood of the chosen response plus ``lambda`` times the log-sigmoid of the
  log odds ratio between chosen and rejected (odds of the average per-token probability).

Lengths below 1 are taken as 1, so an empty response (all padding) gives a finite loss and gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_F32 = jnp.float32


def _avg(logps, lengths):
    """Average log-prob per token: ``logps / max(len, 1)``."""
    return jnp.asarray(logps).astype(_F32) / jnp.maximum(jnp.asarray(lengths).astype(_F32), 1.0)


def _mean_where(x, where):
    """Mean of ``x`` over ``where``; 0 when nothing is selected (no NaN in value or gradient)."""
    n = jnp.sum(where.astype(_F32))
    return jnp.sum(jnp.where(where, x, 0.0)) / jnp.maximum(n, 1.0)


def kto_loss(policy_logps, ref_logps, desirable, kl_policy_logps, kl_ref_logps, *, beta: float = 0.1,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0, valid=None):
    """KTO loss on unpaired feedback (Ethayarajh et al. 2024, eq. 8; TRL's ``KTOTrainer`` estimator).

    With the implicit reward ``r = log pi(y|x) - log ref(y|x)`` and the reference point
    ``z0 = stop_gradient(max(0, mean_i(kl_policy_i - kl_ref_i)))`` (the batch's KL estimate on mismatched pairs
    ``(x_i, y_j)``, ``j != i``), each example contributes
    ``w_D (1 - sigmoid(beta (r - z0)))`` if desirable and ``w_U (1 - sigmoid(beta (z0 - r)))`` if not;
    the loss is the mean over the batch. The paper's ``lambda_y`` value function scaling is ``w_D``/``w_U``; it
    recommends ``w_D n_D / (w_U n_U)`` in ``[1, 4/3]`` when the kinds are imbalanced.

    Args:
      policy_logps: ``[B]`` ``log pi(y_i | x_i)`` summed over response tokens.
      ref_logps: ``[B]`` the reference model's ``log ref(y_i | x_i)`` (no gradient flows).
      desirable: ``[B]`` bool, True where the completion was labelled desirable.
      kl_policy_logps: ``[B]`` ``log pi(y_j | x_i)`` on the mismatched pairs (no gradient flows: z0 is a constant).
      kl_ref_logps: ``[B]`` ``log ref(y_j | x_i)`` on the mismatched pairs.
      beta: inverse temperature of the implicit reward (paper and TRL default 0.1).
      desirable_weight: ``w_D``.
      undesirable_weight: ``w_U``.
      valid: optional ``[B]`` bool, False for padding rows of a fixed-shape batch: they take no part in ``z0``,
        the loss (a mean over valid rows) or the metrics. None: every row is valid.

    Returns:
      ``(loss, metrics)``; metrics: ``"loss"``, ``"kl"`` (``z0``), ``"rewards_desirable"`` and
      ``"rewards_undesirable"`` (means of ``beta * r`` over each kind; 0 where the batch has none).
    """
    ok = jnp.ones(jnp.shape(policy_logps), bool) if valid is None else jnp.asarray(valid).astype(bool)
    # Padding rows are masked before any arithmetic, so whatever they hold reaches no value or gradient.
    pi = jnp.where(ok, jnp.asarray(policy_logps).astype(_F32), 0.0)
    ref = jax.lax.stop_gradient(jnp.where(ok, jnp.asarray(ref_logps).astype(_F32), 0.0))
    good = jnp.asarray(desirable).astype(bool) & ok
    kl_diff = jnp.asarray(kl_policy_logps).astype(_F32) - jnp.asarray(kl_ref_logps).astype(_F32)
    kl = _mean_where(jnp.where(ok, kl_diff, 0.0), ok)
    z0 = jax.lax.stop_gradient(jnp.maximum(kl, 0.0))
    r = pi - ref
    # 1 - sigmoid(x) computed as sigmoid(-x): exact where sigmoid(x) rounds to 1 in float32.
    losses = jnp.where(good, desirable_weight * jax.nn.sigmoid(-beta * (r - z0)),
                       undesirable_weight * jax.nn.sigmoid(-beta * (z0 - r)))
    loss = _mean_where(losses, ok)
    rewards = jax.lax.stop_gradient(beta * r)
    metrics = {"loss": loss, "kl": z0, "rewards_desirable": _mean_where(rewards, good),
               "rewards_undesirable": _mean_where(rewards, ok & ~good)}
    return loss, metrics


def _pair_metrics(loss, rewards_c, rewards_r) -> dict:
    rewards_c, rewards_r = jax.lax.stop_gradient(rewards_c), jax.lax.stop_gradient(rewards_r)
    return {"loss": loss, "rewards_chosen": jnp.mean(rewards_c), "rewards_rejected": jnp.mean(rewards_r),
            "rewards_margin": jnp.mean(rewards_c - rewards_r),
            "rewards_accuracy": jnp.mean((rewards_c > rewards_r).astype(_F32))}


def simpo_loss(policy_chosen_logps, policy_rejected_logps, chosen_lengths, rejected_lengths, *, beta: float = 2.0,
               gamma: float = 0.5, label_smoothing: float = 0.0):
    """SimPO loss (Meng et al. 2024, eq. 6): reference-free, length-normalised, with a target margin.

    ``h = beta (lp_c / len_c - lp_r / len_r) - gamma``;
    ``loss = mean(-(1 - eps) log sigmoid(h) - eps log sigmoid(-h))`` (``eps`` = label smoothing, as TRL's CPO
    trainer). At equal average log-probs and ``eps = 0`` the loss is ``log(1 + e^gamma)``.

    Args:
      policy_chosen_logps: ``[B]`` ``log pi(y_c | x)`` summed over response tokens.
      policy_rejected_logps: ``[B]`` ``log pi(y_r | x)``.
      chosen_lengths: ``[B]`` response token counts of the chosen sequences.
      rejected_lengths: ``[B]`` the same for the rejected sequences.
      beta: reward scale (the paper uses 2.0 to 2.5; 10 for some instruct models).
      gamma: target reward margin (the paper's gamma; TRL's ``simpo_gamma``, default 0.5).
      label_smoothing: assumed label-flip probability ``eps`` in ``[0, 0.5)``.

    Returns:
      ``(loss, metrics)``; metrics: ``"loss"``, ``"rewards_chosen"`` (``beta * lp_c / len_c``),
      ``"rewards_rejected"``, ``"rewards_margin"``, ``"rewards_accuracy"``.
    """
    rewards_c = beta * _avg(policy_chosen_logps, chosen_lengths)
    rewards_r = beta * _avg(policy_rejected_logps, rejected_lengths)
    h = rewards_c - rewards_r - gamma
    eps = label_smoothing
    loss = jnp.mean(-(1 - eps) * jax.nn.log_sigmoid(h) - eps * jax.nn.log_sigmoid(-h))
    return loss, _pair_metrics(loss, rewards_c, rewards_r)


# An average log-prob of exactly 0 (probability 1) has infinite odds; clamp just below it.
_MAX_AVG_LOGP = -1e-6


def _log_odds(avg_logp):
    """``log(p / (1 - p))`` for ``p = exp(a)``: ``a - log(1 - e^a)``, with ``log(-expm1(a))`` for accuracy."""
    a = jnp.minimum(avg_logp, _MAX_AVG_LOGP)
    return a - jnp.log(-jnp.expm1(a))


def orpo_loss(policy_chosen_logps, policy_rejected_logps, chosen_lengths, rejected_lengths, nll_chosen, *,
              lam: float = 0.1):
    """ORPO loss (Hong et al. 2024, eqs. 4-7): SFT NLL on the chosen response plus an odds-ratio penalty.

    ``a_c = lp_c / len_c``, ``a_r = lp_r / len_r`` (average per-token log-probs),
    ``log_odds(a) = a - log(1 - e^a)``, ``L_OR = -mean log sigmoid(log_odds(a_c) - log_odds(a_r))``,
    ``loss = nll_chosen + lam * L_OR``. No reference model. At equal average log-probs ``L_OR = log 2``.
    Average log-probs are clamped to ``<= -1e-6`` (probability 1 would have infinite odds).

    Args:
      policy_chosen_logps: ``[B]`` ``log pi(y_c | x)`` summed over response tokens.
      policy_rejected_logps: ``[B]`` ``log pi(y_r | x)``.
      chosen_lengths: ``[B]`` response token counts of the chosen sequences.
      rejected_lengths: ``[B]`` the same for the rejected sequences.
      nll_chosen: scalar, the SFT loss on the chosen responses (per-token mean, e.g.
        ``-sum(lp_c) / sum(len_c)``).
      lam: weight of the odds-ratio term (the paper's lambda; 0.1 in its experiments and TRL's ``beta``).

    Returns:
      ``(loss, metrics)``; metrics: ``"loss"``, ``"nll"``, ``"or_loss"``, ``"log_odds_ratio"`` (batch mean),
      ``"rewards_accuracy"`` (fraction of pairs with a positive log odds ratio).
    """
    a_c = _avg(policy_chosen_logps, chosen_lengths)
    a_r = _avg(policy_rejected_logps, rejected_lengths)
    log_odds_ratio = _log_odds(a_c) - _log_odds(a_r)
    or_loss = -jnp.mean(jax.nn.log_sigmoid(log_odds_ratio))
    nll = jnp.asarray(nll_chosen).astype(_F32)
    loss = nll + lam * or_loss
    ratio = jax.lax.stop_gradient(log_odds_ratio)
    metrics = {"loss": loss, "nll": nll, "or_loss": or_loss, "log_odds_ratio": jnp.mean(ratio),
               "rewards_accuracy": jnp.mean((ratio > 0).astype(_F32))}
    return loss, metrics
