"""Evaluation of policies and reward models, library side: every stage and experiment scores models here.

* `PolicyEvaluator` / `evaluate_policy`: a policy's answers to a fixed prompt set, `samples` per prompt at the
  sampling temperature (the objective an RL stage maximises, E_{y~pi}[r(x, y)]) and the greedy answer, scored by a
  gold function of the texts; a reward model's mean score of the same samples; KL(pi || ref) per response on
  temperature-1 samples; `best_of_n` (how well a reward model ranks a policy's own samples against a random and
  the gold pick).
* `pairwise_accuracy`: a reward model's agreement with the labels of preference batches.
* `paired_bootstrap`, `seed_prompt_bootstrap`, `seed_prompt_replicates`, `win_rate`, `reliability_bins`,
  `expected_calibration_error`, `best_of_n_expectation`: numpy statistics of per-prompt numbers, defined in
  `rlhf_jax.stats` and re-exported here.

Every model call goes through the RL core (`rlhf_jax.train.rl`): the same sampling, log-prob and reward-model
code paths as training.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.generation import SamplingConfig
from rlhf_jax.models.config import ModelConfig
from rlhf_jax.stats import (best_of_n_expectation, expected_calibration_error, paired_bootstrap,  # noqa: F401
                            reliability_bins, seed_prompt_bootstrap,
                            seed_prompt_replicates, win_rate)  # (re-exported)
from rlhf_jax.train.rl import decode_responses, episode_sequence_logps, reward_model_scores, sample_episodes
from rlhf_jax.train.steps import pair_scores

GoldFn = Callable[[list], np.ndarray]
"""completions (one per prompt of the evaluator, in order) -> gold rewards [B]."""
MetricsFn = Callable[[list, list], dict]
"""(prompt indices, completions) -> named metrics of those answers (e.g. `rlhf_jax.tasks.compute_metrics`)."""


sample_episodes_jit = jax.jit(sample_episodes, static_argnames=("sampling", "model_config",
                                                               "num_samples_per_prompt"))
_SAMPLE = sample_episodes_jit
_SEQ_LOGPS = jax.jit(episode_sequence_logps, static_argnames=("model_config",))
reward_model_scores_jit = jax.jit(reward_model_scores, static_argnames=("model_config",))
_RM_SCORES = reward_model_scores_jit


def sample_texts(params, prompts, prompt_mask, rng, *, model_config: ModelConfig, sampling: SamplingConfig,
                 tokenizer, chunk: int) -> list[str]:
    """Responses to left-padded prompts [B,P], `chunk` rows at a time (one shape: one compiled program; the last
    chunk is padded by repeating its last prompt). Chunk i uses `fold_in(rng, i * chunk)`."""
    prompts, prompt_mask = np.asarray(prompts), np.asarray(prompt_mask)
    texts = []
    for i in range(0, len(prompts), chunk):
        n = min(chunk, len(prompts) - i)
        rows = np.concatenate([np.arange(i, i + n), np.full(chunk - n, i + n - 1)])
        ep = _SAMPLE(params, prompts[rows], prompt_mask[rows], jax.random.fold_in(rng, i), sampling=sampling,
                     model_config=model_config)
        texts += decode_responses(tokenizer, ep)[:n]
    return texts


class PolicyEvaluator:
    """A fixed prompt set [B,P] with its gold function; call it on any params (see the module docstring)."""

    def __init__(self, prompts, prompt_mask, *, model_config: ModelConfig, tokenizer, sampling: SamplingConfig,
                 gold_fn: GoldFn, metrics_fn: MetricsFn | None = None, samples: int = 4, weights=None,
                 groups: dict[str, Any] | None = None):
        """`weights` [B] (default equal): how much each prompt counts in `gold_reward` and `gold_greedy` (e.g.
        `rlhf_jax.tasks.family_weights`: each family its declared share, however many distinct prompts it has);
        `groups`: name -> boolean mask [B], each reported as the weighted `gold/<name>` (e.g. skills, safety)."""
        self.prompts, self.prompt_mask = jnp.asarray(prompts), jnp.asarray(prompt_mask)
        self.mc, self.tok, self.sampling, self.samples = model_config, tokenizer, sampling, samples
        self.gold_fn, self.metrics_fn = gold_fn, metrics_fn
        n = len(self.prompts)
        self.weights = np.ones(n) if weights is None else np.asarray(weights, np.float64)
        self.groups = {k: np.asarray(v, bool) for k, v in (groups or {}).items()}
        if self.weights.shape != (n,) or any(v.shape != (n,) for v in self.groups.values()):
            raise ValueError(f"PolicyEvaluator: weights and group masks must have shape ({n},)")

    def with_temperature(self, temperature: float) -> "PolicyEvaluator":
        """The same prompts, weights and groups, sampled at `temperature`."""
        ev = copy.copy(self)
        ev.sampling = dataclasses.replace(self.sampling, temperature=temperature)
        return ev

    def weighted(self, per_prompt, mask=None) -> float:
        """The weighted mean of a per-prompt array [B] over `mask` (default all prompts)."""
        w = self.weights if mask is None else self.weights * mask
        return float(np.sum(w * np.asarray(per_prompt)) / np.sum(w))

    def generate(self, params, rng, temperature: float):
        """Episodes of one answer per prompt at `temperature` (0: greedy)."""
        sampling = dataclasses.replace(self.sampling, temperature=temperature)
        return _SAMPLE(params, self.prompts, self.prompt_mask, rng, sampling=sampling, model_config=self.mc)

    def texts(self, episodes) -> list[str]:
        return decode_responses(self.tok, episodes)

    def __call__(self, params, *, ref_params, reward_params=None, rng, baseline_gold=None
                 ) -> tuple[dict[str, float], np.ndarray]:
        """(metrics, per-prompt mean gold reward [B]) of `params`. Every policy evaluated with the same `rng` gets
        the same random numbers. Metrics: gold_reward (mean of `samples` answers per prompt), gold_greedy,
        rm_score (NaN without a reward model), kl_to_ref (mean over temperature-1 samples of
        sum_t log pi(y_t) - log ref(y_t)), win_rate (against `baseline_gold`, 0.5 without), and whatever
        `metrics_fn` returns for the sampled answers."""
        draws = [self.generate(params, jax.random.fold_in(rng, 2 + i), self.sampling.temperature)
                 for i in range(self.samples)]
        texts = [self.texts(d) for d in draws]
        gold = np.mean([self.gold_fn(t) for t in texts], axis=0)
        greedy = self.gold_fn(self.texts(self.generate(params, rng, 0.0)))
        scores = (float(np.mean([np.asarray(_RM_SCORES(reward_params, d, model_config=self.mc)) for d in draws]))
                  if reward_params is not None else float("nan"))
        ep = self.generate(params, jax.random.fold_in(rng, 1), 1.0)
        kl = _SEQ_LOGPS(params, ep, model_config=self.mc) - _SEQ_LOGPS(ref_params, ep, model_config=self.mc)
        out = {}
        if self.metrics_fn is not None:  # first: the evaluator's own (weighted) numbers below take precedence
            index = list(range(len(self.prompts))) * self.samples
            out.update(self.metrics_fn(index, [r for t in texts for r in t]))
        out.update({"gold_reward": self.weighted(gold), "gold_greedy": self.weighted(greedy), "rm_score": scores,
                    "kl_to_ref": float(jnp.mean(kl)),
                    "win_rate": win_rate(gold, baseline_gold) if baseline_gold is not None else 0.5})
        for name, mask in self.groups.items():
            out[f"gold/{name}"] = self.weighted(gold, mask)
            out[f"gold_greedy/{name}"] = self.weighted(greedy, mask)
        return out, gold

    def best_of_n(self, params, reward_params, rng, *, n: int, temperature: float) -> dict:
        """How well the reward model ranks the policy's own samples: gold reward of n samples per prompt taken at
        random (the mean), picked by the reward model, and picked by the gold reward (the ceiling). A reward model
        worth optimising picks better than random; RL against it can at best climb towards its pick."""
        golds, scores = [], []
        for i in range(n):
            ep = self.generate(params, jax.random.fold_in(rng, i), temperature)
            golds.append(self.gold_fn(self.texts(ep)))
            scores.append(np.asarray(_RM_SCORES(reward_params, ep, model_config=self.mc)))
        golds, scores = np.stack(golds), np.stack(scores)
        picked = golds[np.argmax(scores, axis=0), np.arange(golds.shape[1])]
        return {"n": n, "temperature": temperature, "gold_random": float(golds.mean()),
                "gold_rm_pick": float(picked.mean()), "gold_oracle_pick": float(golds.max(axis=0).mean())}


def evaluate_policy(params, prompts, prompt_mask, *, model_config: ModelConfig, tokenizer, gold_fn: GoldFn, rng,
                    ref_params=None, reward_params=None, samples_per_prompt: int = 4,
                    sampling: SamplingConfig = SamplingConfig(), metrics_fn: MetricsFn | None = None,
                    baseline_gold=None) -> tuple[dict[str, float], np.ndarray]:
    """`PolicyEvaluator(...)(params, ...)` in one call; `ref_params` defaults to `params` (KL 0)."""
    ev = PolicyEvaluator(prompts, prompt_mask, model_config=model_config, tokenizer=tokenizer, sampling=sampling,
                         gold_fn=gold_fn, metrics_fn=metrics_fn, samples=samples_per_prompt)
    return ev(params, ref_params=params if ref_params is None else ref_params, reward_params=reward_params,
              rng=rng, baseline_gold=baseline_gold)


_PAIR_SCORES = jax.jit(pair_scores, static_argnames=("model_config",))


def pairwise_accuracy(reward_params, batches: Iterable[dict], *, model_config: ModelConfig) -> float:
    """Fraction of the real pairs of preference batches whose chosen side the reward model scores higher (rows
    with no real token, batch padding, are not counted); the same scoring call as reward-model training."""
    wins, total = 0.0, 0
    for batch in batches:
        real = np.asarray(batch["chosen"]["segment_ids"]).max(axis=1) > 0
        device = {k: {kk: vv for kk, vv in batch[k].items() if isinstance(vv, np.ndarray)}
                  for k in ("chosen", "rejected")}
        rc, rr = map(np.asarray, _PAIR_SCORES(reward_params, device, model_config=model_config))
        wins += float(np.sum((rc > rr)[real]))
        total += int(real.sum())
    return wins / max(total, 1)
