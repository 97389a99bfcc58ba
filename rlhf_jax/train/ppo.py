"""PPO for RLHF: rollout (sample, score, reference logprobs, values) and the clipped PPO update.

Follows InstructGPT (Ouyang et al. 2022), Ziegler et al. 2019, and the checklist of Huang et al. 2024, "The N+
Implementation Details of RLHF with PPO" (numbered list in docs/training.md). One PPO iteration:

  rollout:  sample N tokens after left-padded prompts at `temperature` (distinct PAD and EOS); recompute the
            policy logprobs with one full forward (logits / temperature, as sampled), reference logprobs the
            same way, values at the response positions, and the reward model's score at the last real
            response token (EOS included).
  update:   per-token rewards r_t = -beta * KL_t (+ score at the last token), optional EOS penalty and reward
            whitening; GAE (gamma, lambda); advantages whitened over valid tokens; `num_epochs` passes over
            `num_minibatches` shuffled minibatches (nested `lax.scan`) with the clipped policy loss (plus an
            optional entropy bonus and PPO-ptx pretraining NLL) and the clipped value loss, each model with its
            own optimizer; then the adaptive KL coefficient update.

Our transformer has no dropout, so the recomputed logprobs equal the rollout ones and the first minibatch has
ratio 1 exactly (TRL must disable dropout for this).
"""
from __future__ import annotations

from typing import Callable

import flax
import jax
import jax.numpy as jnp
from jax import lax

from rlhf_jax.generation import sample
from rlhf_jax.losses import (adaptive_kl_update, entropy_from_logits, gae, masked_mean, masked_sum, masked_var,
                             ppo_policy_loss, ppo_value_loss, shape_rewards, token_logprobs, whiten)
from rlhf_jax.losses._sft import sft_loss_from_hidden
from rlhf_jax.models import forward_hidden, lm_logits
from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.transformer import lm_head_kernel, scalar_head
from rlhf_jax.train.state import PPOState
from rlhf_jax.train.steps import reward_scores

_PTX_KEYS = ("inputs", "targets", "loss_mask", "positions", "segment_ids")

RewardFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
"""(prompts [B,P], responses [B,N], response_mask [B,N]) -> scores [B]; jittable. Replaces the reward model."""


@flax.struct.dataclass
class Rollout:
    """One batch of sampled episodes; P prompt length, N max_new_tokens."""

    tokens: jax.Array           # [B,P+N] int32: left-padded prompt, response, PAD after EOS
    attention_mask: jax.Array   # [B,P+N] int32: prompt_mask ++ response_mask (used as segment_ids)
    response_mask: jax.Array    # [B,N] int32: 1 up to and including EOS
    logprobs: jax.Array         # [B,N] float32: policy log pi(y_t) at the sampling temperature
    ref_logprobs: jax.Array     # [B,N] float32: reference model, same temperature
    values: jax.Array           # [B,N] float32: V(s_t) before emitting y_t
    scores: jax.Array           # [B] float32: reward at the last real response token
    ends_with_eos: jax.Array    # [B] bool


def sequence_positions(mask) -> jax.Array:
    """mask [B,S] (left-padded prompt ++ response) -> positions [B,S]: 0 at the first real token, as `sample`."""
    return jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)


def _response_hidden(params, tokens, mask, *, model_config: ModelConfig, num_new: int):
    """Hidden states [B,N,D] at the positions P-1 .. P+N-2, which predict the N response tokens.

    The real tokens of a row are contiguous (left-padded prompt, response, PAD after EOS), so each row is
    rotated to start at its first real token: one right-padded example per row, which attends with
    `is_causal` + sequence lengths (cuDNN flash attention, no [B,1,S,S] mask) at the same positions
    (`sequence_positions`). Outputs at positions that predict a padding token are finite but unspecified.
    """
    S = tokens.shape[1]
    shift = jnp.argmax(mask > 0, axis=1)                                                  # [B] leading pads
    rolled = jnp.take_along_axis(tokens, (jnp.arange(S)[None] + shift[:, None]) % S, axis=1)
    positions = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), tokens.shape)
    h = forward_hidden(params, rolled, config=model_config, positions=positions,
                       seq_lengths=jnp.sum(mask > 0, axis=1))                           # [B,S,D]
    idx = jnp.clip(jnp.arange(S - num_new - 1, S - 1)[None] - shift[:, None], 0, S - 1)   # [B,N]
    return jnp.take_along_axis(h, idx[..., None], axis=1)


def response_logits(params, tokens, mask, *, model_config: ModelConfig, num_new: int, temperature: float):
    """Logits / temperature [B,N,V] that predict the N response tokens of `tokens` [B,P+N]."""
    # The LM head runs at the N response positions only (not over the prompt); divide by the sampling
    # temperature (Huang et al. detail).
    h = _response_hidden(params, tokens, mask, model_config=model_config, num_new=num_new)
    return lm_logits(params, h, config=model_config) / temperature


def response_values(params, tokens, mask, *, model_config: ModelConfig, num_new: int):
    """Value head outputs [B,N] at the positions that predict the N response tokens."""
    h = _response_hidden(params, tokens, mask, model_config=model_config, num_new=num_new)
    return scalar_head(params, h, config=model_config)


def rollout(policy_params, ref_params, reward_params, value_params, prompts, prompt_mask, rng, *, config,
            model_config: ModelConfig, reward_fn: RewardFn | None = None) -> Rollout:
    """Sample responses to prompts [B,P] and score them. `config` is a `PPOConfig`.

    `reward_fn` (a jittable function, see `RewardFn`) replaces the reward model (then `reward_params` may be
    None). All four params pytrees are read, none is modified.
    """
    N, temp = config.max_new_tokens, config.temperature
    samples = sample(policy_params, prompts, prompt_mask, rng, config=model_config, max_new_tokens=N,
                     temperature=temp, eos_id=config.eos_id, pad_id=config.pad_id)
    tokens, response_mask = samples.tokens, samples.response_mask
    mask = jnp.concatenate([prompt_mask.astype(jnp.int32), response_mask], axis=1)               # [B,P+N]
    responses = tokens[:, -N:]

    def logprobs_of(params):
        logits = response_logits(params, tokens, mask, model_config=model_config, num_new=N, temperature=temp)
        return jnp.where(response_mask > 0, token_logprobs(logits, responses), 0.0)

    logprobs = logprobs_of(policy_params)
    ref_logprobs = logprobs_of(ref_params)
    values = response_values(value_params, tokens, mask, model_config=model_config, num_new=N)
    if reward_fn is not None:
        scores = reward_fn(prompts, responses, response_mask)
    else:
        # The reward model reads the last real token (segment_ids > 0): EOS, or the last token if truncated.
        scores = reward_scores(reward_params, {"inputs": tokens, "positions": sequence_positions(mask),
                                               "segment_ids": mask}, model_config=model_config)
    ends = jnp.any((responses == config.eos_id) & (response_mask > 0), axis=1)
    # Rollout quantities are data for the update: no gradient may flow into them.
    return lax.stop_gradient(Rollout(
        tokens=tokens, attention_mask=mask, response_mask=response_mask, logprobs=logprobs,
        ref_logprobs=ref_logprobs, values=jnp.where(response_mask > 0, values, 0.0),
        scores=scores.astype(jnp.float32), ends_with_eos=ends))


def _minibatches(tree, perm, num_minibatches: int):
    """Shuffle the leading axis by `perm` and split it into [M, B/M, ...]."""
    return jax.tree.map(lambda x: x[perm].reshape(num_minibatches, -1, *x.shape[1:]), tree)


def ppo_update(state: PPOState, data: Rollout, rng, *, config, model_config: ModelConfig, ptx_batch=None):
    """Rewards, GAE and `num_epochs` x `num_minibatches` PPO updates of policy and value; the KL coefficient.

    `ptx_batch` (SFT-style batch, rows divisible by num_minibatches) adds `ptx_coef` * its NLL to the policy
    loss (PPO-ptx, InstructGPT eq. 2). Returns (new state, metrics with TRL names).
    """
    c = config
    N = data.response_mask.shape[1]
    B = data.tokens.shape[0]
    M = c.num_minibatches
    if B % M:
        raise ValueError(f"rollout batch {B} is not divisible by PPOConfig.num_minibatches={M}")
    mask = data.response_mask
    rewards, objective = shape_rewards(
        data.scores, data.logprobs, data.ref_logprobs, mask, kl_coef=state.kl_coef, kl_estimator=c.kl_estimator,
        missing_eos_penalty=c.missing_eos_penalty, ends_with_eos=data.ends_with_eos)
    if c.whiten_rewards:
        rewards = whiten(rewards, mask, shift_mean=False)
    advantages, returns = gae(rewards, data.values, mask, gamma=c.gamma, lam=c.lam)
    advantages = whiten(advantages, mask)

    fields = dict(tokens=data.tokens, attention_mask=data.attention_mask, mask=mask, logprobs=data.logprobs,
                  values=data.values, advantages=advantages, returns=returns)
    use_ptx = ptx_batch is not None and c.ptx_coef > 0
    ptx = jnp.zeros((M,))
    if use_ptx:
        ptx = {k: jnp.reshape(jnp.asarray(v), (M, -1, *v.shape[1:])) for k, v in ptx_batch.items() if k in _PTX_KEYS}

    def policy_loss(params, mb, ptx_mb):
        logits = response_logits(params, mb["tokens"], mb["attention_mask"], model_config=model_config,
                                 num_new=N, temperature=c.temperature)
        lp = token_logprobs(logits, mb["tokens"][:, -N:])
        loss, m = ppo_policy_loss(lp, mb["logprobs"], mb["advantages"], mb["mask"], clip_eps=c.clip_eps)
        # Without an entropy bonus the entropy is only a metric: no backward pass through [B,N,V].
        ent_logits = logits if c.entropy_coef else lax.stop_gradient(logits)
        entropy = masked_mean(entropy_from_logits(ent_logits), mb["mask"])
        loss = loss - c.entropy_coef * entropy
        m = {**m, "entropy": entropy}
        if use_ptx:
            ptx_h = forward_hidden(params, ptx_mb["inputs"], config=model_config,
                                   positions=ptx_mb.get("positions"), segment_ids=ptx_mb.get("segment_ids"))
            ptx_loss = sft_loss_from_hidden(ptx_h, lm_head_kernel(params, config=model_config),
                                            ptx_mb["targets"], ptx_mb["loss_mask"],
                                            chunk_size=model_config.logits_chunk)[0]
            loss = loss + c.ptx_coef * ptx_loss
            m = {**m, "ptx_loss": ptx_loss}
        return loss, m

    def value_loss(params, mb):
        v = response_values(params, mb["tokens"], mb["attention_mask"], model_config=model_config, num_new=N)
        loss, m = ppo_value_loss(v, mb["values"], mb["returns"], mb["mask"], clip_eps=c.vf_clip)
        return c.vf_coef * loss, m

    def minibatch_step(carry, xs):
        policy, value = carry
        mb, ptx_mb = xs
        (_, pm), pg = jax.value_and_grad(policy_loss, has_aux=True)(policy.params, mb, ptx_mb)
        (_, vm), vg = jax.value_and_grad(value_loss, has_aux=True)(value.params, mb)
        metrics = {"policy/clipfrac": pm["clipfrac"], "policy/approxkl": pm["approx_kl"],
                   "policy/entropy": pm["entropy"], "loss/policy": pm["loss"], "loss/value": vm["loss"],
                   "val/clipfrac": vm["clipfrac"], "val/ratio": pm["ratio_mean"]}
        if use_ptx:
            metrics["loss/ptx"] = pm["ptx_loss"]
        return (policy.apply_gradients(pg), value.apply_gradients(vg)), metrics

    def epoch(carry, key):
        perm = jax.random.permutation(key, B)
        return lax.scan(minibatch_step, carry, (_minibatches(fields, perm, M), ptx))

    (policy, value), metrics = lax.scan(epoch, (state.policy, state.value), jax.random.split(rng, c.num_epochs))
    metrics = jax.tree.map(jnp.mean, metrics)

    var_ret = masked_var(returns, mask, unbiased=False)
    var_err = masked_var(returns - data.values, mask, unbiased=False)
    kl_coef = state.kl_coef
    if c.kl_target is not None:
        kl_coef = adaptive_kl_update(kl_coef, objective["objective/kl"], B, target=c.kl_target,
                                     horizon=c.kl_horizon)
    metrics = {
        **objective, **metrics,
        # Sum over the response of -log pi(y_t): a one-sample estimate of the sequence entropy (as TRL).
        "objective/entropy": jnp.mean(masked_sum(-data.logprobs, mask, axis=1)),
        "val/explained_variance": jnp.where(var_ret > 0, 1.0 - var_err / jnp.where(var_ret > 0, var_ret, 1.0), 0.0),
        "kl_coef": state.kl_coef,
        "episode_length": jnp.mean(jnp.sum(mask, axis=1).astype(jnp.float32)),
        "eos_fraction": jnp.mean(data.ends_with_eos.astype(jnp.float32)),
        "learning_rate": state.policy.learning_rate(),
    }
    new_state = state.replace(policy=policy, value=value, kl_coef=kl_coef, step=state.step + 1)
    return new_state, metrics


def ppo_step(state: PPOState, batch: dict, ref_params, reward_params, ptx_batch=None, *, config,
             model_config: ModelConfig, reward_fn: RewardFn | None = None):
    """One PPO iteration on a prompt batch {"prompts" [B,P], "prompt_mask" [B,P]}: rollout, then update."""
    rng, k_rollout, k_update = jax.random.split(state.rng, 3)
    data = rollout(state.policy.params, ref_params, reward_params, state.value.params, batch["prompts"],
                   batch["prompt_mask"], k_rollout, config=config, model_config=model_config, reward_fn=reward_fn)
    return ppo_update(state.replace(rng=rng), data, k_update, config=config, model_config=model_config,
                      ptx_batch=ptx_batch)
