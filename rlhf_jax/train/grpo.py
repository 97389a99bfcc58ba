"""The GRPO family, RLOO and REINFORCE++ on the RL core: G samples per prompt, a value-free advantage, a clipped
policy-gradient loss (`losses.policy_gradient_loss`), `num_iterations` passes over each batch.

One iteration on B prompts: `sample_episodes` (B*G rows), scores (reward model, jittable function, or a host
function of text), the trainer's own log-probs of the samples ("old", and their mismatch with the sampler's), the
reference's only when `kl_coef > 0`, an advantage per `advantage`:

  grpo                   `group_advantages(scores, scale)` (Shao et al. 2024; scale "none" is Dr. GRPO)
  rloo                   `rloo_advantages(scores)` (Ahmadian et al. 2024)
  reinforce++            token rewards (score at the last token, -beta * k1 KL per token when the KL is in the
                         reward), returns with gamma 1, whitened over the batch (Hu 2025)
  reinforce++-baseline   the same after subtracting each group's mean score

then `num_iterations` x `num_minibatches` updates through `epochs_minibatches`. KL placement (`kl_in`): "loss"
adds `kl_coef * KL_t` (estimator `kl_estimator`, k3 by default, DeepSeekMath) to the loss; "reward" subtracts
`kl_coef * sum_t k1_t` from each score (InstructGPT's placement; per token for REINFORCE++). With `kl_coef = 0`
(DAPO) no reference model is read at all.
"""
from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax

from rlhf_jax.checks import check_ranges, config_check
from rlhf_jax.generation import SamplingConfig
from rlhf_jax.lora import LoraConfig
from rlhf_jax.losses import (PG_LOSS_TYPES, discounted_returns, group_advantages, kl_penalty, masked_mean,
                             masked_sum, overlong_penalty, policy_gradient_loss, rloo_advantages, token_logprobs,
                             whiten)
from rlhf_jax.models.config import ModelConfig
from rlhf_jax.train.optim import OptimConfig
from rlhf_jax.train.rl import (COMPLETIONS_TABLE, Episodes, RewardFn, completion_rows, completions_table,  # noqa: F401
                               episode_logits, episode_logprobs, epochs_minibatches, reward_model_scores,
                               sample_episodes)
from rlhf_jax.train.state import TrainState
from rlhf_jax.train.steps import lora_params, on_adapters

Advantage = Literal["grpo", "rloo", "reinforce++", "reinforce++-baseline"]
"""The advantage estimators (GRPOConfig.advantage): the one list every config and command line reads."""
Scale = Literal["group", "batch", "none"]
"""GRPO's advantage scaling (GRPOConfig.scale)."""
LossType = Literal[PG_LOSS_TYPES]
"""Policy-gradient loss aggregations (GRPOConfig.loss_type), `losses.PG_LOSS_TYPES`."""

@dataclasses.dataclass(frozen=True, kw_only=True)
class GRPOConfig:
    """GRPO and its variants (DAPO, Dr. GRPO, GSPO, CISPO), RLOO and REINFORCE++: see the module docstring."""

    num_steps: int = 1000
    """Iterations (each: sample B prompts x G answers, then num_iterations x num_minibatches updates)."""
    log_every: int = 1
    """Host metric pull / hook period."""
    batch_size: int = 16
    """Prompts per iteration; the prompt data must yield batches of this size."""
    num_generations: int = 8
    """G: answers sampled per prompt (a group; consecutive rows)."""
    sampling: SamplingConfig = SamplingConfig(temperature=1.0)
    """Sampling of the answers (the loss divides the logits by its temperature too)."""
    advantage: Advantage = "grpo"
    """Advantage estimator."""
    scale: Scale = "group"
    """grpo: divide by the group's std, the batch's, or nothing (Dr. GRPO)."""
    loss_type: LossType = "grpo"
    """Aggregation and ratio form of the policy-gradient loss (losses.policy_gradient_loss)."""
    clip_eps: float = 0.2
    """Lower clip width of the ratio."""
    clip_eps_high: float | None = None
    """Upper clip width (DAPO's clip-higher uses 0.28); None: clip_eps."""
    kl_coef: float = 0.0
    """beta; 0 reads no reference model at all (DAPO). DeepSeekMath uses 0.04 in the loss."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    """KL estimator of the in-loss term."""
    kl_in: Literal["loss", "reward"] = "loss"
    """Where the KL penalty goes: the loss (DeepSeekMath) or the reward (InstructGPT, REINFORCE++)."""
    num_iterations: int = 1
    """mu: passes over each batch (1: on-policy, ratio 1)."""
    num_minibatches: int = 1
    """Minibatches per pass (batch_size * num_generations must divide by it)."""
    dynamic_sampling_groups: int | None = None
    """DAPO's dynamic sampling with fixed shapes: of the batch_size groups sampled, update on this many, groups
    whose rewards are not all equal first (groups of equal rewards carry no advantage); batch_size /
    dynamic_sampling_groups is the oversampling factor. The fraction of informative groups is logged. None: all."""
    overlong_buffer: int | None = None
    """DAPO's soft overlong punishment: the last this many tokens of the budget cost up to 1 reward, linearly
    (losses.overlong_penalty with max_len = sampling.max_new_tokens); None: off."""
    tis_cap: float | None = None
    """Truncated importance sampling between the sampler's and the trainer's log-probs: weight
    min(exp(trainer - sampler), cap) on the surrogate (None: off; 2 is common)."""
    completions_every: int = 0
    """Every this many iterations, log a table of `completions_rows` sampled completions with their rewards and
    advantages (hooks' `on_samples`: DIR/<stage>/completions.jsonl and TensorBoard text); 0: never."""
    completions_rows: int = 4
    """Rows of that table (the first rows of the updated batch)."""
    optim: OptimConfig = OptimConfig(learning_rate=1e-6)
    """Optimizer (TRL's GRPO learning rate 1e-6)."""

    @property
    def updates_per_iteration(self) -> int:
        """Optimizer updates (TrainState.step increments) per iteration: num_iterations * num_minibatches. A
        learning-rate schedule over the run needs total_steps = num_steps * updates_per_iteration."""
        return self.num_iterations * self.num_minibatches

    def __post_init__(self):
        check_ranges(self, positive=("num_steps", "log_every", "batch_size", "num_generations", "clip_eps",
                                     "clip_eps_high", "num_iterations", "num_minibatches", "tis_cap",
                                     "overlong_buffer"),
                     non_negative=("kl_coef", "completions_every"))
        check_ranges(self, positive=("completions_rows",))
        config_check(self, self.sampling.temperature > 0, "sampling.temperature must be > 0")
        config_check(self, self.overlong_buffer is None or self.overlong_buffer <= self.sampling.max_new_tokens,
                     "overlong_buffer must be <= sampling.max_new_tokens")
        config_check(self, self.advantage != "rloo" or self.num_generations >= 2, "rloo needs num_generations >= 2")
        config_check(self, self.loss_type != "gspo" or not self.advantage.startswith("reinforce++"),
                     "gspo needs a sequence advantage (grpo or rloo)")
        groups = self.batch_size if self.dynamic_sampling_groups is None else self.dynamic_sampling_groups
        check_ranges(self, positive=("dynamic_sampling_groups",))
        config_check(self, groups <= self.batch_size, "dynamic_sampling_groups must be <= batch_size")
        rows = groups * self.num_generations
        config_check(self, self.num_minibatches > 0 and rows % self.num_minibatches == 0,
                     f"the {rows} rows of an update (groups x num_generations) must divide by num_minibatches = "
                     f"{self.num_minibatches}")

    @property
    def uses_reference(self) -> bool:
        return self.kl_coef > 0


def _advantages(config: GRPOConfig, scores, ep: Episodes, kl):
    """[B] or [B, N] advantages; `kl` [B, N] is the per-token k1 KL when it goes in the reward, else None."""
    G, mask = config.num_generations, ep.response_mask
    if config.advantage in ("grpo", "rloo"):
        if kl is not None:
            scores = scores - config.kl_coef * masked_sum(kl, mask, axis=1)
        if config.advantage == "rloo":
            return rloo_advantages(scores, group_size=G)
        return group_advantages(scores, group_size=G, scale=config.scale)
    if config.advantage == "reinforce++-baseline":
        scores = scores - jnp.repeat(jnp.mean(scores.reshape(-1, G), axis=1), G)
    # The last policy token (a multi-turn response_mask has gaps: tool results, user turns)
    last = mask.shape[1] - 1 - jnp.argmax(mask[:, ::-1] > 0, axis=1)
    rewards = jnp.where(jnp.arange(mask.shape[1])[None] == last[:, None], scores[:, None], 0.0)
    if kl is not None:
        rewards = rewards - config.kl_coef * kl
    return whiten(discounted_returns(rewards, mask, gamma=1.0), mask)


def _informative_first(ep: Episodes, scores, informative, G: int, keep: int):
    """The rows of `keep` groups, groups with unequal rewards first (in their order), then the others."""
    order = jnp.argsort(jnp.logical_not(informative), stable=True)[:keep]                    # [keep] group ids
    rows = (order[:, None] * G + jnp.arange(G)[None]).reshape(-1)
    return jax.tree.map(lambda x: x[rows], ep), scores[rows]


def grpo_update(state: TrainState, episodes: Episodes, scores, rng, ref_params=None, *, config: GRPOConfig,
                model_config: ModelConfig, lora: LoraConfig | None = None):
    """Advantages of scored episodes ([B*G] scores) and `num_iterations` x `num_minibatches` updates.

    With `lora`, `state.params` are the adapters of `ref_params`, the frozen base that is also the reference."""
    c, ep, mask = config, episodes, episodes.response_mask
    temp = c.sampling.temperature
    scores = jnp.asarray(scores, jnp.float32)
    if c.overlong_buffer is not None:
        scores = scores + overlong_penalty(jnp.sum(mask, axis=1), max_len=c.sampling.max_new_tokens,
                                           cache_len=c.overlong_buffer)
    all_scores, all_ends = scores, ep.ends_with_eos(c.sampling.eos_id)
    all_lengths = jnp.sum(mask, axis=1).astype(jnp.float32)
    groups = scores.reshape(-1, c.num_generations)
    informative = jnp.max(groups, axis=1) > jnp.min(groups, axis=1)
    if c.dynamic_sampling_groups is not None:
        ep, scores = _informative_first(ep, scores, informative, c.num_generations, c.dynamic_sampling_groups)
        mask = ep.response_mask
    policy = state.params if lora is None else lora_params(ref_params, state.params, lora)
    old = lax.stop_gradient(episode_logprobs(policy, ep, model_config=model_config, temperature=temp))
    ref = (lax.stop_gradient(episode_logprobs(ref_params, ep, model_config=model_config, temperature=temp))
           if c.uses_reference else None)
    kl_reward = kl_penalty(old, ref, estimator="k1") * mask if c.uses_reference and c.kl_in == "reward" else None
    advantages = lax.stop_gradient(_advantages(c, scores, ep, kl_reward))
    # TIS: the trainer's and the sampler's log-probs differ (kernels, precision); weight the surrogate by their
    # truncated ratio. Their mismatch is logged every step (0 up to float noise in f32 on one device).
    log_gap = jnp.where(mask > 0, old - ep.sampler_logprobs, 0.0)
    weights = None if c.tis_cap is None else jnp.minimum(jnp.exp(log_gap), c.tis_cap)
    in_loss = c.uses_reference and c.kl_in == "loss"

    def loss_fn(params, mb):
        logits = episode_logits(params, mb["episodes"], model_config=model_config, temperature=temp)
        lp = token_logprobs(logits, mb["episodes"].responses)
        loss, m = policy_gradient_loss(
            lp, mb["old"], mb["advantages"], mb["episodes"].response_mask, loss_type=c.loss_type,
            clip_eps=c.clip_eps, clip_eps_high=c.clip_eps_high, max_tokens=c.sampling.max_new_tokens,
            ref_logprobs=mb.get("ref"), kl_coef=c.kl_coef if in_loss else 0.0, kl_estimator=c.kl_estimator,
            importance_weights=mb.get("weights"))
        return loss, m

    def update(state, mb, _):
        (_, m), grads = jax.value_and_grad(on_adapters(loss_fn, ref_params, lora), has_aux=True)(state.params, mb)
        return state.apply_gradients(grads), m

    data = {"episodes": ep, "old": old, "advantages": advantages}
    if in_loss:
        data["ref"] = ref
    if weights is not None:
        data["weights"] = weights
    state, m = epochs_minibatches(update, state, data, rng, num_epochs=c.num_iterations,
                                  num_minibatches=c.num_minibatches)
    group_std = jnp.std(groups, axis=1, ddof=1) if c.num_generations > 1 else jnp.zeros(groups.shape[0])
    metrics = {                      # rewards and completions: every sample; the rest: the updated rows
        "loss": m["loss"], "reward": jnp.mean(all_scores), "reward_std": jnp.mean(group_std),
        "frac_reward_zero_std": jnp.mean((group_std == 0).astype(jnp.float32)),
        "completions/mean_length": jnp.mean(all_lengths),
        "completions/clipped_ratio": 1.0 - jnp.mean(all_ends.astype(jnp.float32)),
        "clip_ratio": m["clipfrac"], "clip_ratio/low_mean": m["clipfrac_low"],
        "clip_ratio/high_mean": m["clipfrac_high"], "policy/approxkl": m["approx_kl"], "policy/ratio_mean": m["ratio_mean"],
        # Mean over response tokens of -log pi(y_t): a one-sample estimate of TRL's per-token entropy.
        "entropy": masked_mean(-old, mask),
        "sampler/logprob_mismatch": masked_mean(jnp.abs(log_gap), mask),
        "learning_rate": state.learning_rate(),
    }
    if c.dynamic_sampling_groups is not None:
        metrics["dynamic_sampling/informative_fraction"] = jnp.mean(informative.astype(jnp.float32))
    if c.uses_reference:
        metrics["kl"] = jnp.mean(masked_sum(kl_penalty(old, ref, estimator=c.kl_estimator), mask, axis=1))
    if c.completions_every:
        metrics[COMPLETIONS_TABLE] = completions_table(ep, mask, scores, advantages, c.completions_rows)
    return state, metrics


def grpo_sample(state: TrainState, batch: dict, base_params=None, *, config: GRPOConfig, model_config: ModelConfig,
                lora: LoraConfig | None = None):
    """(state with its rng advanced, episodes of B*G rows, update key): the sampling half of an iteration."""
    rng, k_sample, k_update = jax.random.split(state.rng, 3)
    params = state.params if lora is None else lora_params(base_params, state.params, lora)
    ep = sample_episodes(params, batch["prompts"], batch["prompt_mask"], k_sample, sampling=config.sampling,
                         model_config=model_config, num_samples_per_prompt=config.num_generations)
    return state.replace(rng=rng), ep, k_update


def grpo_step(state: TrainState, batch: dict, ref_params=None, reward_params=None, *, config: GRPOConfig,
              model_config: ModelConfig, reward_fn: RewardFn | None = None, lora: LoraConfig | None = None):
    """One iteration on {"prompts" [B,P], "prompt_mask" [B,P]}, scored by `reward_fn` or a reward model. With
    `lora`, `state.params` are adapters of `ref_params` (the frozen base and the reference)."""
    state, ep, key = grpo_sample(state, batch, ref_params, config=config, model_config=model_config, lora=lora)
    if reward_fn is not None:
        scores = reward_fn(jnp.repeat(batch["prompts"], config.num_generations, axis=0), ep.responses,
                           ep.response_mask)
    else:
        scores = reward_model_scores(reward_params, ep, model_config=model_config)
    return grpo_update(state, ep, scores, key, ref_params, config=config, model_config=model_config, lora=lora)
