"""Direct preference optimisation losses on sequence log-probabilities.

With ``h = beta * [(log pi(y_c) - log ref(y_c)) - (log pi(y_r) - log ref(y_r))]``:

* ``"sigmoid"`` — DPO, Rafailov et al. 2023, eq. 7: ``-log sigmoid(h)``; with label smoothing ``eps`` the
  conservative cDPO of Mitchell 2023: ``-(1 - eps) log sigmoid(h) - eps log sigmoid(-h)``.
* ``"robust"`` — Chowdhury et al. 2024 (robust DPO, unbiased under label-flip rate ``eps``):
  ``(-(1 - eps) log sigmoid(h) + eps log sigmoid(-h)) / (1 - 2 eps)``.
* ``"hinge"`` — SLiC-HF, Zhao et al. 2023: ``relu(1 - h)``.
* ``"ipo"`` — IPO, Azar et al. 2023, eq. 17, on length-normalised log-ratios (as TRL):
  ``(lr_c / len_c - lr_r / len_r - 1 / (2 beta))^2``.

``reference_free`` treats the reference log-probabilities as 0 (no reference model).

``rpo_alpha`` adds ``alpha`` times the negative log-likelihood per token of the chosen responses,
``alpha * sum(-log pi(y_c)) / sum(len_c)`` over the batch (RPO: Pang et al. 2024, "Iterative Reasoning Preference
Optimization", eq. 1; TRL's ``rpo_alpha``, paper value 1.0). DPO's gradient can lower the likelihood of the chosen
responses together with the rejected ones when the two are alike ("likelihood displacement", Razin et al. 2024,
who show it unlearning refusals); the NLL term keeps the chosen responses likely.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo")


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *,
             beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
             chosen_lengths=None, rejected_lengths=None, reference_free: bool = False, rpo_alpha: float = 0.0):
    """DPO-family preference loss (mean over the batch of pairs).

    Args:
      policy_chosen_logps: ``[B]`` ``log pi(y_c | x)``, summed over response tokens (``sequence_logprobs``).
      policy_rejected_logps: ``[B]`` ``log pi(y_r | x)``.
      ref_chosen_logps: ``[B]`` reference-model log-probabilities of the chosen responses (no gradient flows).
      ref_rejected_logps: ``[B]`` reference log-probabilities of the rejected responses.
      beta: inverse temperature of the implicit reward ``beta * log(pi / ref)`` (may be a traced scalar).
      loss_type: one of ``"sigmoid"``, ``"robust"``, ``"hinge"``, ``"ipo"`` (see the module docstring).
      label_smoothing: ``eps``, the assumed probability that a preference label is flipped (sigmoid, robust).
      chosen_lengths: ``[B]`` number of response tokens of each chosen sequence; required by ``"ipo"``.
      rejected_lengths: ``[B]`` the same for the rejected sequences; required by ``"ipo"``.
      reference_free: ignore the reference log-probabilities (treat them as 0).
      rpo_alpha: weight of the chosen responses' per-token NLL (RPO); needs ``chosen_lengths``; 0 is plain DPO.

    Returns:
      ``(loss, metrics)``; metrics (batch means): ``"loss"``, ``"rewards_chosen"`` (``beta * lr_c``),
      ``"rewards_rejected"``, ``"rewards_margin"``, ``"rewards_accuracy"`` (fraction of pairs with
      ``rewards_chosen > rewards_rejected``), ``"logps_chosen"``, ``"logps_rejected"`` (policy log-probs), and
      ``"nll_chosen"`` (the per-token NLL of the chosen responses) when ``rpo_alpha`` is set.

    Raises:
      ValueError: unknown ``loss_type``; ``"ipo"`` without lengths; ``"robust"`` with ``label_smoothing >= 0.5``;
        ``rpo_alpha`` without ``chosen_lengths``.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"dpo_loss: unknown loss_type={loss_type!r}; choose one of {', '.join(LOSS_TYPES)}.")
    if loss_type == "ipo" and (chosen_lengths is None or rejected_lengths is None):
        raise ValueError("dpo_loss: loss_type='ipo' normalises log-ratios by length; pass chosen_lengths and "
                         "rejected_lengths ([B] token counts, e.g. loss_mask.sum(-1)).")
    if loss_type == "robust" and isinstance(label_smoothing, (int, float)) and not 0 <= label_smoothing < 0.5:
        raise ValueError(f"dpo_loss: loss_type='robust' needs 0 <= label_smoothing < 0.5, got {label_smoothing}.")
    if rpo_alpha and chosen_lengths is None:
        raise ValueError("dpo_loss: rpo_alpha weights the chosen responses' NLL per token; pass chosen_lengths.")
    f32 = jnp.float32
    pi_c = jnp.asarray(policy_chosen_logps).astype(f32)
    pi_r = jnp.asarray(policy_rejected_logps).astype(f32)
    if reference_free:
        ref_c, ref_r = jnp.zeros_like(pi_c), jnp.zeros_like(pi_r)
    else:
        # The reference model is frozen: never differentiate through its log-probabilities.
        ref_c = jax.lax.stop_gradient(jnp.asarray(ref_chosen_logps).astype(f32))
        ref_r = jax.lax.stop_gradient(jnp.asarray(ref_rejected_logps).astype(f32))
    lr_c, lr_r = pi_c - ref_c, pi_r - ref_r
    h = beta * (lr_c - lr_r)
    eps = label_smoothing
    if loss_type == "sigmoid":
        losses = -(1 - eps) * jax.nn.log_sigmoid(h) - eps * jax.nn.log_sigmoid(-h)
    elif loss_type == "robust":
        losses = (-(1 - eps) * jax.nn.log_sigmoid(h) + eps * jax.nn.log_sigmoid(-h)) / (1 - 2 * eps)
    elif loss_type == "hinge":
        losses = jax.nn.relu(1 - h)
    else:  # ipo
        len_c = jnp.asarray(chosen_lengths).astype(f32)
        len_r = jnp.asarray(rejected_lengths).astype(f32)
        losses = jnp.square(lr_c / jnp.maximum(len_c, 1.0) - lr_r / jnp.maximum(len_r, 1.0) - 1 / (2 * beta))
    loss = jnp.mean(losses)
    nll_chosen = None
    if rpo_alpha:
        nll_chosen = -jnp.sum(pi_c) / jnp.maximum(jnp.sum(jnp.asarray(chosen_lengths).astype(f32)), 1.0)
        loss = loss + rpo_alpha * nll_chosen
    rewards_c = jax.lax.stop_gradient(beta * lr_c)
    rewards_r = jax.lax.stop_gradient(beta * lr_r)
    metrics = {
        "loss": loss,
        "rewards_chosen": jnp.mean(rewards_c),
        "rewards_rejected": jnp.mean(rewards_r),
        "rewards_margin": jnp.mean(rewards_c - rewards_r),
        "rewards_accuracy": jnp.mean((rewards_c > rewards_r).astype(f32)),
        "logps_chosen": jnp.mean(pi_c),
        "logps_rejected": jnp.mean(pi_r),
    }
    if nll_chosen is not None:
        metrics["nll_chosen"] = nll_chosen
    return loss, metrics
