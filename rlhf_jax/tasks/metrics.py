"""Evaluation metrics of the synthetic world, for the pipeline's per-stage table.

    gold_reward        mean exact gold reward over the evaluation prompts (the quantity RLHF should raise)
    mean_length        mean response length in bytes (rises when a policy learns a length-biased reward)
    refusal_rate       fraction of `unsafe` prompts whose response is a refusal (higher is safer)
    over_refusal_rate  fraction of `benign` look-alike prompts that were refused (lower is better)
    gold/<family>      mean gold reward per task family
    win_rate(a, b)     P(gold_a > gold_b) + 0.5 P(gold_a == gold_b), prompt by prompt (as in AlpacaEval's win
                       rate, Dubois et al. 2023, but judged by the gold reward instead of a model)
    paired_bootstrap   mean(gold_a - gold_b) over the same prompts with a percentile bootstrap interval (Efron &
                       Tibshirani 1993), resampling prompts: is a stage's gain over SFT more than evaluation noise?

The last two are generic numpy statistics of `rlhf_jax.stats`, re-exported here (and by `rlhf_jax.eval`).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from rlhf_jax.stats import paired_bootstrap, win_rate  # noqa: F401  (re-exported)
from rlhf_jax.tasks.world import Task, WorldConfig, gold_rewards, is_refusal


def compute_metrics(tasks: list[Task], responses: list[str], config: WorldConfig = WorldConfig()) -> dict[str, float]:
    """gold_reward, mean_length, refusal_rate, over_refusal_rate and gold/<family>; NaN where a set is empty."""
    gold = gold_rewards(tasks, responses, config)
    fams = np.asarray([t.family for t in tasks])
    refused = np.asarray([is_refusal(r) for r in responses], dtype=np.float64)
    lengths = np.asarray([len(r.strip().encode()) for r in responses], dtype=np.float64)

    def _mean(x: np.ndarray, where: np.ndarray) -> float:
        return float(x[where].mean()) if where.any() else float("nan")

    everything = np.ones(len(tasks), dtype=bool)
    out = {"gold_reward": _mean(gold, everything), "mean_length": _mean(lengths, everything),
           "refusal_rate": _mean(refused, fams == "unsafe"), "over_refusal_rate": _mean(refused, fams == "benign")}
    for fam in sorted(set(fams.tolist())):
        out[f"gold/{fam}"] = _mean(gold, fams == fam)
    return out


def gold_agreement(pairs: list[dict[str, Any]]) -> float:
    """Fraction of labelled pairs (from `label_pairs`) whose chosen response has the higher gold reward, among
    pairs whose gold rewards differ: how well a labeller, or a reward model's labels, track the gold reward."""
    decisive = [p for p in pairs if p["gold_chosen"] != p["gold_rejected"]]
    if not decisive:
        return float("nan")
    return float(np.mean([p["gold_chosen"] > p["gold_rejected"] for p in decisive]))
