"""KL penalty: per-token estimators, the adaptive KL coefficient, and InstructGPT reward shaping.

* Estimators of ``KL(pi || ref)`` from tokens sampled from ``pi`` (Schulman 2020, "Approximating KL Divergence",
  http://joschu.net/blog/kl-approx.html), with ``log r = log ref - log pi``: ``k1 = -log r`` (unbiased, can be
  negative), ``k2 = (log r)^2 / 2`` (low variance, biased), ``k3 = (r - 1) - log r`` (unbiased and >= 0).
* Adaptive coefficient — Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences", sec. 2.2:
  ``e = clip(KL / target - 1, -0.2, 0.2)``, ``beta <- beta * (1 + e * n_steps / horizon)``.
* Shaped reward — Ziegler et al. 2019 eq. 2 / InstructGPT (Ouyang et al. 2022) eq. 2: every response token gets
  ``-beta * KL_t`` and the last one also gets the reward-model score.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax import lax

from rlhf_jax.losses._common import masked_sum

KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_penalty(logprobs, ref_logprobs, *, estimator: str = "k1"):
    """Per-token estimate of ``KL(pi || ref)`` at tokens sampled from ``pi``.

    Args:
      logprobs: ``[B, T]`` log-probabilities of the sampled tokens under the policy ``pi``.
      ref_logprobs: ``[B, T]`` the same tokens under the reference model.
      estimator: ``"k1"`` = ``lp - ref_lp``; ``"k2"`` = ``(lp - ref_lp)^2 / 2``;
        ``"k3"`` = ``exp(ref_lp - lp) - 1 - (ref_lp - lp)`` (always >= 0).

    Returns:
      ``[B, T]`` float32 (padding is not masked here; reduce with ``masked_sum``/``masked_mean``).
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_penalty: unknown estimator={estimator!r}; choose one of {', '.join(KL_ESTIMATORS)}.")
    log_ratio = jnp.asarray(logprobs, jnp.float32) - jnp.asarray(ref_logprobs, jnp.float32)
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * jnp.square(log_ratio)
    return jnp.expm1(-log_ratio) + log_ratio


def adaptive_kl_update(coef, observed_kl, n_steps, *, target, horizon):
    """Ziegler et al. 2019 proportional controller for the KL coefficient.

    ``e = clip(observed_kl / target - 1, -0.2, 0.2)``; ``new_coef = coef * (1 + e * n_steps / horizon)``.

    Args:
      coef: scalar current KL coefficient ``beta`` (array; can live in a jitted train state).
      observed_kl: scalar mean per-sequence KL of the latest rollout batch.
      n_steps: number of samples (sequences) in that batch.
      target: target KL (nats per sequence).
      horizon: controller horizon in samples.

    Returns:
      Scalar float32 new coefficient.
    """
    err = jnp.clip(jnp.asarray(observed_kl, jnp.float32) / target - 1.0, -0.2, 0.2)
    return jnp.asarray(coef, jnp.float32) * (1.0 + err * jnp.asarray(n_steps, jnp.float32) / horizon)


@dataclasses.dataclass(frozen=True, kw_only=True)
class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al. 2019); defaults as TRL's PPO (init 0.2, target 6, horizon 10000)."""

    target: float = 6.0
    """Target KL(pi || ref) per sequence, in nats."""
    horizon: float = 10000.0
    """Number of samples over which the error is corrected."""
    init_coef: float = 0.2
    """Initial coefficient ``beta``."""

    def initial_coef(self):
        """The initial coefficient as a float32 scalar array (put it in the train state)."""
        return jnp.asarray(self.init_coef, jnp.float32)

    def update(self, coef, observed_kl, n_steps):
        """``adaptive_kl_update(coef, observed_kl, n_steps, target=self.target, horizon=self.horizon)``."""
        return adaptive_kl_update(coef, observed_kl, n_steps, target=self.target, horizon=self.horizon)


def shape_rewards(scores, logprobs, ref_logprobs, response_mask, *, kl_coef, kl_estimator: str = "k1",
                  missing_eos_penalty=None, ends_with_eos=None):
    """Per-token PPO rewards: KL penalty on every response token plus the score at the last one.

    ``r_t = -kl_coef * KL_t * m_t + [t == last valid token] * s``, where ``KL_t = kl_penalty(lp, ref_lp)`` and
    ``s`` is the reward-model score (Ziegler et al. 2019 eq. 2; InstructGPT eq. 2). With ``missing_eos_penalty``
    ``p``, rows whose response did not end with EOS get ``s - p`` instead of ``s`` (TRL's ``missing_eos_penalty``,
    which subtracts ``p``). Padding always gets 0; rows with no valid token get no score.

    Args:
      scores: ``[B]`` reward-model scores of the full responses.
      logprobs: ``[B, T]`` response-token log-probs under the rollout policy (no gradient flows).
      ref_logprobs: ``[B, T]`` the same tokens under the reference model.
      response_mask: ``[B, T]`` 1 on response tokens (up to and including EOS), right padded.
      kl_coef: KL coefficient ``beta`` (float or traced scalar).
      kl_estimator: ``"k1"``, ``"k2"`` or ``"k3"`` (see ``kl_penalty``).
      missing_eos_penalty: amount subtracted from the score of rows without EOS, or ``None``.
      ends_with_eos: ``[B]`` bool, whether each response ended with EOS; required with ``missing_eos_penalty``.

    Returns:
      ``(rewards [B, T], metrics)``; metrics (float32 scalars): ``"objective/kl"`` (mean over rows of the summed
      per-token KL), ``"objective/scores"`` (mean score after the EOS penalty), ``"objective/non_score_reward"``
      (mean over rows of the summed ``-kl_coef * KL_t``), ``"objective/rlhf_reward"`` (their sum).
    """
    if missing_eos_penalty is not None and ends_with_eos is None:
        raise ValueError("shape_rewards: missing_eos_penalty needs ends_with_eos ([B] bool, True where the "
                         "response contains EOS).")
    # Rewards are data for PPO, computed from the rollout: never differentiate through them.
    lp = lax.stop_gradient(jnp.asarray(logprobs, jnp.float32))
    ref_lp = lax.stop_gradient(jnp.asarray(ref_logprobs, jnp.float32))
    scores = lax.stop_gradient(jnp.asarray(scores, jnp.float32))
    valid = jnp.asarray(response_mask) > 0
    if missing_eos_penalty is not None:
        scores = jnp.where(jnp.asarray(ends_with_eos, bool), scores, scores - missing_eos_penalty)
    kl = jnp.where(valid, kl_penalty(lp, ref_lp, estimator=kl_estimator), 0.0)
    non_score = -kl_coef * kl
    t_idx = jnp.arange(valid.shape[-1])
    last = jnp.max(jnp.where(valid, t_idx, -1), axis=-1)  # -1 for an empty row: matches no position
    at_last = t_idx[None, :] == last[:, None]
    rewards = non_score + jnp.where(at_last, scores[:, None], 0.0)
    kl_seq = masked_sum(kl, valid, axis=-1)
    non_score_seq = masked_sum(non_score, valid, axis=-1)
    metrics = {
        "objective/kl": jnp.mean(kl_seq),
        "objective/scores": jnp.mean(scores),
        "objective/non_score_reward": jnp.mean(non_score_seq),
        "objective/rlhf_reward": jnp.mean(scores) + jnp.mean(non_score_seq),
    }
    return rewards, metrics
