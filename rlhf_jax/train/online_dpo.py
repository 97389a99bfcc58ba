"""Online (iterative) DPO: DPO on pairs the current policy samples and a judge labels, every iteration.

Offline DPO never sees its own samples (the lecture's first limit of DPO). Here one iteration on B prompts:

1. `sample_episodes`: k completions per prompt from the current policy (k consecutive rows, as GRPO's groups);
2. a judge scores them: a reward model, a jittable `RewardFn`, or a host function of the decoded texts (the
   world's annotators, a verifier); per prompt the best-scored completion is "chosen", the worst "rejected"
   (Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback"; Xiong et al. 2024, iterative
   DPO with best-vs-worst of k). A prompt whose k scores are all equal gives no pair: it is left out of the loss;
3. `num_updates` DPO steps (`losses.dpo_loss`, any DPO loss type) on the B pairs, against a fixed reference (the
   SFT model), or one refreshed to the current policy every `ref_refresh_every` iterations (iterative DPO).

Sequence log-probs are those of the responses as sampled (left-padded prompt, `episode_sequence_logps`: token
log-probs at temperature 1, the model's own distribution whatever the sampling temperature).
"""
from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.checks import check_ranges, config_check
from rlhf_jax.generation import SamplingConfig
from rlhf_jax.lora import LoraConfig
from rlhf_jax.losses import DPO_LOSS_TYPES, dpo_loss
from rlhf_jax.models.config import ModelConfig
from rlhf_jax.train.optim import OptimConfig
from rlhf_jax.train.rl import Episodes, decode_masked, episode_sequence_logps, sample_episodes
from rlhf_jax.train.state import TrainState
from rlhf_jax.train.steps import _grad_metrics, lora_params, on_adapters


@dataclasses.dataclass(frozen=True, kw_only=True)
class OnlineDPOConfig:
    """Online DPO: sample k completions per prompt, judge them, DPO on best vs worst (see the module docstring)."""

    num_steps: int = 100
    """Iterations (each: sample, judge, num_updates DPO steps)."""
    log_every: int = 1
    """Host metric pull / hook period (in iterations)."""
    batch_size: int = 16
    """Prompts per iteration (one preference pair each); the prompt data must yield batches of this size."""
    num_generations: int = 2
    """k: completions sampled per prompt; the pair is the best and the worst by the judge."""
    sampling: SamplingConfig = SamplingConfig(temperature=1.0)
    """Sampling of the completions."""
    beta: float = 0.1
    """DPO's inverse temperature."""
    loss_type: Literal[DPO_LOSS_TYPES] = "sigmoid"
    """DPO loss on the fresh pairs (losses.dpo_loss)."""
    label_smoothing: float = 0.0
    """Assumed label-flip probability of the judge (conservative / robust DPO)."""
    rpo_alpha: float = 0.0
    """Weight of the chosen completion's per-token NLL added to each pair's loss (RPO, as DPOConfig.rpo_alpha)."""
    num_updates: int = 1
    """DPO steps on each iteration's pairs (the same pairs each time)."""
    ref_refresh_every: int = 0
    """Copy the current policy into the reference every this many iterations (iterative DPO); 0: the reference
    stays the initial model (the SFT model)."""
    pairs_every: int = 0
    """Log the first `pairs_rows` sampled pairs with their judge scores every this many iterations (0: never)."""
    pairs_rows: int = 4
    """Pairs in each logged table."""
    optim: OptimConfig = OptimConfig(learning_rate=5e-7)
    """Optimizer (TRL's online DPO default 5e-7 for 7B models)."""

    def __post_init__(self):
        check_ranges(self, positive=("num_steps", "log_every", "batch_size", "beta", "num_updates", "pairs_rows"),
                     non_negative=("ref_refresh_every", "pairs_every", "rpo_alpha"))
        config_check(self, self.num_generations >= 2, f"num_generations = {self.num_generations} must be >= 2 "
                     "(a pair needs two completions)")
        config_check(self, 0 <= self.label_smoothing < 0.5,
                     f"label_smoothing = {self.label_smoothing} must be in [0, 0.5)")


def best_and_worst(scores, group_size: int):
    """Row indices of each group's best- and worst-scored completion, and whether they differ.

    Args:
      scores: ``[B*k]`` judge scores, groups of ``k = group_size`` consecutive rows.
      group_size: ``k``.

    Returns:
      ``(chosen [B], rejected [B], informative [B] bool)``; ties go to the first row (argmax / argmin order);
      ``informative`` is False where all k scores are equal (chosen and rejected are then the same row).
    """
    groups = jnp.asarray(scores, jnp.float32).reshape(-1, group_size)
    base = jnp.arange(groups.shape[0]) * group_size
    chosen, rejected = base + jnp.argmax(groups, axis=1), base + jnp.argmin(groups, axis=1)
    return chosen, rejected, jnp.max(groups, axis=1) > jnp.min(groups, axis=1)


def online_dpo_sample(state: TrainState, batch: dict, base_params=None, *, config: OnlineDPOConfig,
                      model_config: ModelConfig, lora: LoraConfig | None = None):
    """(state with its rng advanced, episodes of B*k rows): the sampling half of an iteration."""
    rng, key = jax.random.split(state.rng)
    params = state.params if lora is None else lora_params(base_params, state.params, lora)
    ep = sample_episodes(params, batch["prompts"], batch["prompt_mask"], key, sampling=config.sampling,
                         model_config=model_config, num_samples_per_prompt=config.num_generations)
    return state.replace(rng=rng), ep


def _pair_loss(params, pairs, ref_c, ref_r, informative, *, config, model_config):
    lp_c = episode_sequence_logps(params, pairs["chosen"], model_config=model_config)
    lp_r = episode_sequence_logps(params, pairs["rejected"], model_config=model_config)
    len_c = jnp.sum(pairs["chosen"].response_mask, axis=1).astype(jnp.float32)
    len_r = jnp.sum(pairs["rejected"].response_mask, axis=1).astype(jnp.float32)

    def one(*xs):  # dpo_loss on a single pair, so that tied prompts can be left out of the mean
        loss, m = dpo_loss(*(x[None] for x in xs[:4]), beta=config.beta, loss_type=config.loss_type,
                           label_smoothing=config.label_smoothing, chosen_lengths=xs[4][None],
                           rejected_lengths=xs[5][None], rpo_alpha=config.rpo_alpha)
        return loss, m

    losses, m = jax.vmap(one)(lp_c, lp_r, ref_c, ref_r, len_c, len_r)
    w = informative.astype(jnp.float32)
    n = jnp.maximum(jnp.sum(w), 1.0)
    mean = lambda x: jnp.sum(w * x) / n  # noqa: E731
    loss = mean(losses)
    metrics = {"loss": loss, "rewards/chosen": mean(m["rewards_chosen"]),
               "rewards/rejected": mean(m["rewards_rejected"]), "rewards/margins": mean(m["rewards_margin"]),
               "rewards/accuracies": mean(m["rewards_accuracy"]), "logps/chosen": mean(lp_c),
               "logps/rejected": mean(lp_r)}
    return loss, metrics


def online_dpo_update(state: TrainState, episodes: Episodes, scores, ref_params, *, config: OnlineDPOConfig,
                      model_config: ModelConfig, lora: LoraConfig | None = None):
    """Pairs from judged episodes ([B*k] scores) and `config.num_updates` DPO steps on them.

    With `lora`, `state.params` are the adapters of `ref_params` (the policy's base and the reference).
    Metrics: the DPO metrics (means over informative pairs), "judge/score" (mean over all samples),
    "judge/margin" (mean best - worst score over informative pairs), "pairs/informative_fraction",
    "completions/mean_length", "grad_norm" (last update), "learning_rate".
    """
    chosen, rejected, informative = best_and_worst(scores, config.num_generations)
    pairs = {"chosen": jax.tree.map(lambda x: x[chosen], episodes),
             "rejected": jax.tree.map(lambda x: x[rejected], episodes)}
    ref_c = jax.lax.stop_gradient(episode_sequence_logps(ref_params, pairs["chosen"], model_config=model_config))
    ref_r = jax.lax.stop_gradient(episode_sequence_logps(ref_params, pairs["rejected"], model_config=model_config))
    loss_fn = on_adapters(_pair_loss, ref_params, lora)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def update(state, _):
        (_, m), grads = grad_fn(state.params, pairs, ref_c, ref_r, informative, config=config,
                                model_config=model_config)
        return state.apply_gradients(grads), {**m, **_grad_metrics(state, grads)}

    state, ms = jax.lax.scan(update, state, None, length=config.num_updates)
    m = jax.tree.map(lambda x: x[-1], ms)
    scores = jnp.asarray(scores, jnp.float32)
    w = informative.astype(jnp.float32)
    margin = jnp.sum(w * (scores[chosen] - scores[rejected])) / jnp.maximum(jnp.sum(w), 1.0)
    metrics = {**m, "judge/score": jnp.mean(scores), "judge/margin": margin,
               "pairs/informative_fraction": jnp.mean(w),
               "completions/mean_length": jnp.mean(jnp.sum(episodes.response_mask, axis=1).astype(jnp.float32)),
               "learning_rate": state.learning_rate()}
    return state, metrics


def pair_rows(episodes: Episodes, scores, config: OnlineDPOConfig, tokenizer, gold=None) -> list[dict]:
    """Host side: the first `config.pairs_rows` pairs as {"prompt", "chosen", "rejected", "score_chosen",
    "score_rejected"} (and "gold_chosen", "gold_rejected" with `gold` [B*k] scores), texts decoded."""
    chosen, rejected, _ = jax.device_get(best_and_worst(scores, config.num_generations))
    k = min(config.pairs_rows, len(chosen))
    ep = jax.device_get(episodes)
    P = ep.tokens.shape[1] - ep.response_mask.shape[1]
    rows = []
    for c, r in zip(chosen[:k], rejected[:k]):
        prompt = decode_masked(tokenizer, ep.tokens[c:c + 1, :P], ep.mask[c:c + 1, :P])[0]
        texts = decode_masked(tokenizer, ep.tokens[[c, r], P:], ep.response_mask[[c, r]])
        row = {"prompt": prompt, "chosen": texts[0], "rejected": texts[1], "score_chosen": float(scores[c]),
               "score_rejected": float(scores[r])}
        if gold is not None:
            row.update(gold_chosen=float(gold[c]), gold_rejected=float(gold[r]))
        rows.append(row)
    return rows


def judge_agreement(scores, gold, group_size: int) -> dict:
    """Host side: how often the judge's pairs agree with the gold reward, as two fractions of all B pairs:
    "judge/gold_decided" (the gold scores of chosen and rejected differ) and "judge/gold_agree" (they differ and
    the gold prefers the judge's chosen). Their ratio is the judge's agreement with the gold reward; over a
    logging window the ratio of the windows' means is the pooled agreement (no NaN when no pair is decided)."""
    chosen, rejected, informative = jax.device_get(best_and_worst(scores, group_size))
    gold = np.asarray(gold, np.float64)
    decided = informative & (gold[chosen] != gold[rejected])
    return {"judge/gold_decided": float(np.mean(decided)),
            "judge/gold_agree": float(np.mean(decided & (gold[chosen] > gold[rejected])))}
