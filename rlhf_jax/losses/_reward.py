"""Reward-model loss: the Bradley–Terry pairwise preference likelihood.

Bradley & Terry (1952) model ``P(y_c > y_r | x) = sigmoid(r(x, y_c) - r(x, y_r))``; the reward model minimises
``-log sigmoid(r_c - r_r - m)`` (InstructGPT, Ouyang et al. 2022, eq. 1; the optional per-pair margin ``m`` as in
Llama 2, Touvron et al. 2023). Rewards are only defined up to a constant, so ``center_coef`` adds the auxiliary
``coef * mean((r_c + r_r)^2)`` that pulls them towards zero mean (Eisenstein et al. 2023, "Helping or Herding?";
TRL's ``center_rewards_coefficient``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def bradley_terry_loss(chosen_rewards, rejected_rewards, *, margin=None, center_coef: float = 0.0):
    """Pairwise Bradley–Terry loss for reward modelling.

    ``loss = -mean(log sigmoid(r_c - r_r - margin)) + center_coef * mean((r_c + r_r)^2)``

    Args:
      chosen_rewards: ``[B]`` scalar rewards of the preferred responses.
      rejected_rewards: ``[B]`` rewards of the dispreferred responses.
      margin: optional ``[B]`` required reward gap per pair (``None`` means 0).
      center_coef: weight of the reward-centring term (0 disables it).

    Returns:
      ``(loss, metrics)`` with ``"loss"``, ``"accuracy"`` (fraction with ``r_c > r_r``), ``"reward_chosen"``,
      ``"reward_rejected"`` and ``"reward_margin"`` (means of ``r_c``, ``r_r`` and ``r_c - r_r``).
    """
    r_c = jnp.asarray(chosen_rewards).astype(jnp.float32)
    r_r = jnp.asarray(rejected_rewards).astype(jnp.float32)
    diff = r_c - r_r
    logits = diff if margin is None else diff - jnp.asarray(margin, jnp.float32)
    loss = -jnp.mean(jax.nn.log_sigmoid(logits))
    loss = loss + center_coef * jnp.mean(jnp.square(r_c + r_r))
    metrics = {
        "loss": loss,
        "accuracy": jnp.mean((r_c > r_r).astype(jnp.float32)),
        "reward_chosen": jnp.mean(r_c),
        "reward_rejected": jnp.mean(r_r),
        "reward_margin": jnp.mean(diff),
    }
    return loss, metrics
