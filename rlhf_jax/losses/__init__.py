"""Losses and advantage estimators for LLM post-training, as pure functions over arrays."""

from rlhf_jax.losses._common import masked_count, masked_mean, masked_sum, masked_var
from rlhf_jax.losses._dpo import LOSS_TYPES as DPO_LOSS_TYPES
from rlhf_jax.losses._dpo import dpo_loss
from rlhf_jax.losses._distill import distill_loss, distill_loss_from_topk, teacher_topk_logprobs
from rlhf_jax.losses._kl import (
    KL_ESTIMATORS,
    AdaptiveKLController,
    adaptive_kl_update,
    kl_penalty,
    shape_rewards,
)
from rlhf_jax.losses._logprobs import entropy_from_logits, sequence_logprobs, token_logprobs
from rlhf_jax.losses._advantages import (GROUP_SCALES, discounted_returns, gae, group_advantages, overlong_penalty,
                                        rloo_advantages, whiten)
from rlhf_jax.losses._pg import PG_LOSS_TYPES, policy_gradient_loss
from rlhf_jax.losses._preference import kto_loss, orpo_loss, simpo_loss
from rlhf_jax.losses._ppo import explained_variance, ppo_policy_loss, ppo_value_loss
from rlhf_jax.losses._reward import bradley_terry_loss
from rlhf_jax.losses._sft import sft_loss, sft_loss_from_sums, sft_loss_sums

__all__ = [
    "AdaptiveKLController",
    "DPO_LOSS_TYPES",
    "KL_ESTIMATORS",
    "adaptive_kl_update",
    "bradley_terry_loss",
    "distill_loss",
    "distill_loss_from_topk",
    "dpo_loss",
    "entropy_from_logits",
    "explained_variance",
    "GROUP_SCALES",
    "discounted_returns",
    "gae",
    "group_advantages",
    "rloo_advantages",
    "kl_penalty",
    "kto_loss",
    "masked_count",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "orpo_loss",
    "overlong_penalty",
    "PG_LOSS_TYPES",
    "policy_gradient_loss",
    "ppo_policy_loss",
    "ppo_value_loss",
    "sequence_logprobs",
    "sft_loss",
    "sft_loss_from_sums",
    "sft_loss_sums",
    "shape_rewards",
    "simpo_loss",
    "teacher_topk_logprobs",
    "token_logprobs",
    "whiten",
]
