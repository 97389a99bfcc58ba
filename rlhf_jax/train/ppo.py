"""PPO for RLHF (InstructGPT; Ziegler et al. 2019; Huang et al. 2024, "The N+ Implementation Details of RLHF with
PPO", numbered in docs/training.md), composed from the RL core (`rlhf_jax.train.rl`). One iteration:

  rollout:  sample N tokens after left-padded prompts at the sampling temperature (distinct PAD and EOS); the
            policy's and the reference's log-probs of them (logits / temperature, as sampled), the value model's
            V(s_t), and a score per episode (reward model, jittable function, or host function of text).
  update:   per-token rewards r_t = -beta * KL_t (+ the score at the last token), optional EOS penalty and reward
            whitening; GAE; advantages whitened over valid tokens; `num_epochs` x `num_minibatches` clipped
            policy updates (optional dual clip, entropy bonus and PPO-ptx NLL) and clipped value updates, each
            model with its own optimizer; then the adaptive KL coefficient.

Our transformer has no dropout, so the update's first minibatch has ratio 1 exactly (TRL must disable dropout).

LoRA (`lora=LoraConfig`): the policy state holds adapters of the reference params (the frozen base, which is also
the reference: no second copy), the value state adapters of its base (the reward model for value_init="reward",
else the reference) plus its scalar head. Every forward merges the adapters into the base (`lora_params`).
"""
from __future__ import annotations

import dataclasses
from typing import Literal

import flax
import jax
import jax.numpy as jnp
from jax import lax

from rlhf_jax.checks import check_ranges, config_check
from rlhf_jax.generation import SamplingConfig
from rlhf_jax.lora import LoraConfig, init_lora
from rlhf_jax.losses import (AdaptiveKLController, entropy_from_logits, explained_variance, gae, masked_mean,
                             masked_sum, ppo_policy_loss, ppo_value_loss, shape_rewards, token_logprobs, whiten)
from rlhf_jax.models.config import ModelConfig
from rlhf_jax.train.optim import OptimConfig
from rlhf_jax.train.rl import (COMPLETIONS_TABLE, Episodes, completions_table, RewardFn, episode_logits, episode_logprobs, episode_values,
                               epochs_minibatches, reward_model_scores, sample_episodes)
from rlhf_jax.train.state import PPOState, as_key, create_train_state, with_score_head
from rlhf_jax.train.steps import lora_params, on_adapters, sft_nll


@dataclasses.dataclass(frozen=True, kw_only=True)
class PPOConfig:
    """PPO with a learned reward and a KL penalty to the reference (Ouyang et al. 2022; Huang et al. 2024)."""

    num_steps: int = 1000
    """PPO iterations (each: one rollout batch, then num_epochs x num_minibatches updates)."""
    log_every: int = 1
    """Host metric pull / hook period."""
    batch_size: int = 64
    """Prompts per rollout batch; the prompt data must yield batches of this size."""
    sampling: SamplingConfig = SamplingConfig()
    """Rollout sampling (max new tokens, temperature, top-k/p, eos/pad ids)."""
    kl_coef: float = 0.05
    """Initial KL penalty coefficient beta (TRL default 0.05)."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    """Per-token KL estimator in the reward (k1 = log pi - log ref, as InstructGPT)."""
    kl_target: float | None = None
    """Adaptive KL (Ziegler et al. 2019): target per-sequence KL in nats (they use 6); None keeps beta fixed."""
    kl_horizon: float = 10000.0
    """Adaptive KL horizon in samples."""
    gamma: float = 1.0
    """Discount."""
    lam: float = 0.95
    """GAE lambda."""
    clip_eps: float = 0.2
    """Policy ratio clip."""
    dual_clip: float | None = None
    """Dual clip c > 1 for negative advantages (Ye et al. 2020 use 3); None disables."""
    vf_clip: float | None = 0.2
    """Value clip around the rollout values; None disables."""
    vf_coef: float = 0.1
    """Value loss coefficient."""
    num_epochs: int = 4
    """Passes over each rollout batch."""
    num_minibatches: int = 4
    """Minibatches per epoch (batch_size must be divisible by it)."""
    whiten_rewards: bool = False
    """Rescale per-token rewards to unit variance before GAE."""
    missing_eos_penalty: float | None = None
    """Subtract this from the score of responses without EOS (TRL's missing_eos_penalty; Huang et al. use 1)."""
    entropy_coef: float = 0.0
    """Entropy bonus coefficient (0 in InstructGPT and TRL)."""
    ptx_coef: float = 0.0
    """PPO-ptx: weight of the pretraining NLL mixed into the policy loss (InstructGPT gamma = 27.8); needs
    ptx_data."""
    value_init: Literal["reward", "policy"] = "reward"
    """Initialise the value model from the reward model, or from the policy with a fresh scalar head."""
    optim: OptimConfig = OptimConfig(learning_rate=3e-6, eps=1e-5)
    """Policy optimizer (TRL's PPO learning rate 3e-6; Adam eps 1e-5 as lm-human-preferences)."""
    value_optim: OptimConfig | None = None
    """Value optimizer; None uses `optim`."""
    completions_every: int = 0
    """Every this many iterations, log a table of `completions_rows` sampled completions with their scores and
    mean advantages (hooks' `on_samples`: DIR/<stage>/completions.jsonl and TensorBoard text); 0: never."""
    completions_rows: int = 4
    """Rows of that table (the first rows of the rollout batch; all of them when the batch is smaller)."""

    def __post_init__(self):
        check_ranges(self, positive=("num_steps", "log_every", "batch_size", "num_epochs", "num_minibatches",
                                     "clip_eps", "vf_clip", "kl_target", "kl_horizon", "completions_rows"),
                     non_negative=("kl_coef", "vf_coef", "entropy_coef", "ptx_coef", "missing_eos_penalty",
                                   "completions_every"),
                     unit=("gamma", "lam"))
        config_check(self, self.sampling.temperature > 0,
                     f"sampling.temperature = {self.sampling.temperature} must be > 0 for PPO")
        config_check(self, self.num_minibatches > 0 and self.batch_size % self.num_minibatches == 0,
                     f"batch_size = {self.batch_size} must be divisible by num_minibatches = {self.num_minibatches}")
        config_check(self, self.dual_clip is None or self.dual_clip > 1,
                     f"dual_clip = {self.dual_clip} must be > 1 (Ye et al. 2020 use 3) or None")


@flax.struct.dataclass
class Rollout:
    """A batch of scored episodes with what the update needs; rows B, response length N."""

    episodes: Episodes
    logprobs: jax.Array         # [B,N] float32: policy log pi(y_t) at the sampling temperature (recomputed)
    ref_logprobs: jax.Array     # [B,N] float32: reference model, same temperature
    values: jax.Array           # [B,N] float32: V(s_t) before emitting y_t
    scores: jax.Array           # [B] float32: reward of the whole episode


def init_ppo_state(policy_params, config: PPOConfig, *, model_config: ModelConfig, rng, reward_params=None,
                   lora: LoraConfig | None = None) -> PPOState:
    """Policy and value TrainStates (value from the reward model or the policy per `config.value_init`).

    Params are copied, so the caller's SFT / reward params stay valid as the frozen reference and reward model
    while the state is donated to the step. With `lora`, the states hold adapters instead (B = 0: the models
    start as their bases), the value state also its scalar head (the reward model's, or a fresh one).
    """
    k_policy, k_value, k_head, k_state = jax.random.split(as_key(rng), 4)
    if config.value_init == "reward":
        if reward_params is None:
            raise ValueError("PPOConfig.value_init='reward' needs reward_params (or use value_init='policy')")
        value_params = reward_params
    else:
        value_params = with_score_head(policy_params, model_config, k_head)
    if lora is not None:
        k_a, k_b = jax.random.split(jax.random.fold_in(k_state, 17))
        head = value_params["score_head"]
        policy_params = init_lora(policy_params, model_config, lora, k_a)
        value_params = {**init_lora(value_params, model_config, lora, k_b), "score_head": head}
    updates = config.num_steps * config.num_epochs * config.num_minibatches
    return PPOState(
        policy=create_train_state(policy_params, config.optim, k_policy, total_steps=updates),
        value=create_train_state(value_params, config.value_optim or config.optim, k_value, total_steps=updates),
        kl_coef=jnp.asarray(config.kl_coef, jnp.float32), rng=k_state, step=jnp.zeros((), jnp.int32))


def value_base(config: PPOConfig, ref_params, reward_params):
    """The frozen base under a LoRA value model: the reward model for value_init="reward", else the reference."""
    return reward_params if config.value_init == "reward" else ref_params


def _models(state: PPOState, ref_params, value_params_base, lora):
    """(policy params, value params) to run forwards with: the states' own, or adapters merged into their bases."""
    if lora is None:
        return state.policy.params, state.value.params
    return (lora_params(ref_params, state.policy.params, lora),
            lora_params(value_params_base, state.value.params, lora))


def score_rollout(state: PPOState, episodes: Episodes, scores, ref_params, *, config: PPOConfig,
                  model_config: ModelConfig, lora: LoraConfig | None = None, value_params_base=None) -> Rollout:
    """Episodes and their scores [B] -> a Rollout (policy and reference log-probs, values); no gradient."""
    temp = config.sampling.temperature
    policy, value = _models(state, ref_params, value_params_base, lora)
    return lax.stop_gradient(Rollout(
        episodes=episodes,
        logprobs=episode_logprobs(policy, episodes, model_config=model_config, temperature=temp),
        ref_logprobs=episode_logprobs(ref_params, episodes, model_config=model_config, temperature=temp),
        values=episode_values(value, episodes, model_config=model_config),
        scores=jnp.asarray(scores, jnp.float32)))


def rollout(state: PPOState, prompts, prompt_mask, rng, ref_params, reward_params=None, *, config: PPOConfig,
            model_config: ModelConfig, reward_fn: RewardFn | None = None, lora: LoraConfig | None = None) -> Rollout:
    """Sample responses to prompts [B,P] and score them by `reward_params` (a reward model) or `reward_fn`."""
    v_base = value_base(config, ref_params, reward_params)
    ep = sample_episodes(_models(state, ref_params, v_base, lora)[0], prompts, prompt_mask, rng,
                         sampling=config.sampling, model_config=model_config)
    scores = (reward_fn(prompts, ep.responses, ep.response_mask) if reward_fn is not None
              else reward_model_scores(reward_params, ep, model_config=model_config))
    return score_rollout(state, ep, scores, ref_params, config=config, model_config=model_config, lora=lora,
                         value_params_base=v_base)


def ppo_update(state: PPOState, data: Rollout, rng, *, config: PPOConfig, model_config: ModelConfig,
               ptx_batch=None, lora: LoraConfig | None = None, ref_params=None, value_params_base=None):
    """Rewards, GAE and `num_epochs` x `num_minibatches` PPO updates of policy and value; the KL coefficient.

    `ptx_batch` (SFT-style batch, rows divisible by num_minibatches) adds `ptx_coef` * its NLL to the policy
    loss (PPO-ptx, InstructGPT eq. 2). With `lora` the states hold adapters of `ref_params` (policy) and of
    `value_params_base` (value). Returns (new state, metrics with TRL names).
    """
    c, ep, mask = config, data.episodes, data.episodes.response_mask
    B = mask.shape[0]
    rewards, objective = shape_rewards(
        data.scores, data.logprobs, data.ref_logprobs, mask, kl_coef=state.kl_coef, kl_estimator=c.kl_estimator,
        missing_eos_penalty=c.missing_eos_penalty, ends_with_eos=ep.ends_with_eos(c.sampling.eos_id))
    if c.whiten_rewards:
        rewards = whiten(rewards, mask, shift_mean=False)
    advantages, returns = gae(rewards, data.values, mask, gamma=c.gamma, lam=c.lam)
    advantages = whiten(advantages, mask)
    use_ptx = ptx_batch is not None and c.ptx_coef > 0

    def policy_loss(params, mb, ptx_mb):
        logits = episode_logits(params, mb["episodes"], model_config=model_config, temperature=c.sampling.temperature)
        lp = token_logprobs(logits, mb["episodes"].responses)
        loss, m = ppo_policy_loss(lp, mb["logprobs"], mb["advantages"], mb["episodes"].response_mask,
                                  clip_eps=c.clip_eps, dual_clip=c.dual_clip)
        # Without an entropy bonus the entropy is only a metric: no backward pass through [B,N,V].
        ent_logits = logits if c.entropy_coef else lax.stop_gradient(logits)
        entropy = masked_mean(entropy_from_logits(ent_logits), mb["episodes"].response_mask)
        loss, m = loss - c.entropy_coef * entropy, {**m, "entropy": entropy}
        if use_ptx:
            ptx_loss = sft_nll(params, ptx_mb, model_config=model_config)[0]
            loss, m = loss + c.ptx_coef * ptx_loss, {**m, "ptx_loss": ptx_loss}
        return loss, m

    def value_loss(params, mb):
        v = episode_values(params, mb["episodes"], model_config=model_config)
        loss, m = ppo_value_loss(v, mb["values"], mb["returns"], mb["episodes"].response_mask, clip_eps=c.vf_clip)
        return c.vf_coef * loss, m

    policy_fn = on_adapters(policy_loss, ref_params, lora)
    value_fn = on_adapters(value_loss, value_params_base, lora)

    def minibatch_step(carry, mb, ptx_mb):
        policy, value = carry
        (_, pm), pg = jax.value_and_grad(policy_fn, has_aux=True)(policy.params, mb, ptx_mb)
        (_, vm), vg = jax.value_and_grad(value_fn, has_aux=True)(value.params, mb)
        metrics = {"policy/clipfrac": pm["clipfrac"], "policy/approxkl": pm["approx_kl"],
                   "policy/entropy": pm["entropy"], "loss/policy": pm["loss"], "loss/value": vm["loss"],
                   "val/clipfrac": vm["clipfrac"], "val/ratio": pm["ratio_mean"]}
        if use_ptx:
            metrics["loss/ptx"] = pm["ptx_loss"]
        return (policy.apply_gradients(pg), value.apply_gradients(vg)), metrics

    fields = dict(episodes=ep, logprobs=data.logprobs, values=data.values, advantages=advantages, returns=returns)
    ptx = {k: v for k, v in ptx_batch.items() if k in _SFT_KEYS} if use_ptx else None
    (policy, value), metrics = epochs_minibatches(minibatch_step, (state.policy, state.value), fields, rng,
                                                  num_epochs=c.num_epochs, num_minibatches=c.num_minibatches,
                                                  extra=ptx)
    kl_coef = state.kl_coef
    if c.kl_target is not None:
        kl_coef = AdaptiveKLController(target=c.kl_target, horizon=c.kl_horizon).update(
            kl_coef, objective["objective/kl"], B)
    metrics = {
        **objective, **metrics,
        # Sum over the response of -log pi(y_t): a one-sample estimate of the sequence entropy (as TRL).
        "objective/entropy": jnp.mean(masked_sum(-data.logprobs, mask, axis=1)),
        "val/explained_variance": explained_variance(data.values, returns, mask),
        "kl_coef": state.kl_coef,
        "episode_length": jnp.mean(jnp.sum(mask, axis=1).astype(jnp.float32)),
        "eos_fraction": jnp.mean(ep.ends_with_eos(c.sampling.eos_id).astype(jnp.float32)),
        "learning_rate": state.policy.learning_rate(),
    }
    if c.completions_every:
        metrics[COMPLETIONS_TABLE] = completions_table(ep, mask, data.scores, advantages, c.completions_rows)
    return state.replace(policy=policy, value=value, kl_coef=kl_coef, step=state.step + 1), metrics


_SFT_KEYS = ("inputs", "targets", "loss_mask", "positions", "segment_ids")


def ppo_step(state: PPOState, batch: dict, ref_params, reward_params, ptx_batch=None, *, config: PPOConfig,
             model_config: ModelConfig, reward_fn: RewardFn | None = None, lora: LoraConfig | None = None):
    """One PPO iteration on a prompt batch {"prompts" [B,P], "prompt_mask" [B,P]}: rollout, then update."""
    rng, k_rollout, k_update = jax.random.split(state.rng, 3)
    data = rollout(state, batch["prompts"], batch["prompt_mask"], k_rollout, ref_params, reward_params,
                   config=config, model_config=model_config, reward_fn=reward_fn, lora=lora)
    return ppo_update(state.replace(rng=rng), data, k_update, config=config, model_config=model_config,
                      ptx_batch=ptx_batch, lora=lora, ref_params=ref_params,
                      value_params_base=value_base(config, ref_params, reward_params))


def ppo_sample(state: PPOState, batch: dict, ref_params=None, *, config: PPOConfig, model_config: ModelConfig,
               lora: LoraConfig | None = None):
    """The first half of an iteration scored on the host: (state with its rng advanced, episodes, update key).
    Uses the same random numbers as `ppo_step`. `ref_params` only with `lora` (the policy's base)."""
    rng, k_rollout, k_update = jax.random.split(state.rng, 3)
    policy = state.policy.params if lora is None else lora_params(ref_params, state.policy.params, lora)
    ep = sample_episodes(policy, batch["prompts"], batch["prompt_mask"], k_rollout, sampling=config.sampling,
                         model_config=model_config)
    return state.replace(rng=rng), ep, k_update


def ppo_update_scored(state: PPOState, episodes: Episodes, scores, rng, ref_params, ptx_batch=None, *,
                      config: PPOConfig, model_config: ModelConfig, lora: LoraConfig | None = None):
    """The second half: log-probs and values of `episodes` with host-computed `scores` [B], then the update.
    (Host-scored runs have no reward model: a LoRA value model's base is the reference.)"""
    data = score_rollout(state, episodes, scores, ref_params, config=config, model_config=model_config, lora=lora,
                         value_params_base=ref_params)
    return ppo_update(state, data, rng, config=config, model_config=model_config, ptx_batch=ptx_batch, lora=lora,
                      ref_params=ref_params, value_params_base=ref_params)
