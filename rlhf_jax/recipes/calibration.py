"""Calibration's measures (`python -m experiments.calibration`; the GPT-4 technical report, fig. 8): sampled
answers with their confidence (the sequence probability under the policy) and correctness, the expected
calibration error with a bootstrap interval over distinct prompts, and the report's markdown and reliability
diagram.
"""
from __future__ import annotations

import math
import os

import jax
import numpy as np

from rlhf_jax import tasks as world
from rlhf_jax.eval import (
    expected_calibration_error,
    reliability_bins,
    sample_episodes_jit,
)
from rlhf_jax.generation import SamplingConfig
from rlhf_jax.recipes import TOK, prompt_batch
from rlhf_jax.train.rl import decode_responses

STAGES = ("base", "sft", "ppo", "dpo", "grpo")
"""The main job's policies measured by default (folders of a run)."""


def answers(params, mc, tasks, rng, *, samples: int, sampling: SamplingConfig):
    """(confidence [S, B], correct [S, B], texts [S][B]) of `samples` answers to each task's prompt."""
    batch = prompt_batch(tasks)
    conf, ok, texts = [], [], []
    for i in range(samples):
        ep = sample_episodes_jit(params, batch["prompts"], batch["prompt_mask"], jax.random.fold_in(rng, i), sampling=sampling,
                     model_config=mc)
        logp = np.sum(np.where(np.asarray(ep.response_mask) > 0, np.asarray(ep.sampler_logprobs, np.float64), 0.0),
                      axis=1)
        t = decode_responses(TOK, ep)
        conf.append(np.exp(logp))
        ok.append(np.asarray([world.answer_credit(task, r) >= 1.0 for task, r in zip(tasks, t)], np.float64))
        texts.append(t)
    return np.stack(conf), np.stack(ok), texts


def summarise(conf, ok, *, num_bins: int, bootstrap: int, seed: int) -> dict:
    """ECE of [S, B] answers with its 95% bootstrap interval over the B distinct prompts, and the other numbers."""
    flat_c, flat_ok = conf.reshape(-1), ok.reshape(-1)
    rng = np.random.default_rng(seed)
    reps = [expected_calibration_error(conf[:, idx].reshape(-1), ok[:, idx].reshape(-1), num_bins=num_bins)
            for idx in rng.integers(0, conf.shape[1], size=(bootstrap, conf.shape[1]))]
    bins = reliability_bins(flat_c, flat_ok, num_bins=num_bins)
    return {"ece": expected_calibration_error(flat_c, flat_ok, num_bins=num_bins),
            "ece_low": float(np.quantile(reps, 0.025)), "ece_high": float(np.quantile(reps, 0.975)),
            "accuracy": float(flat_ok.mean()), "confidence": float(flat_c.mean()),
            "overconfidence": float(flat_c.mean() - flat_ok.mean()),
            "brier": float(np.mean((flat_c - flat_ok) ** 2)), "answers": int(flat_c.size),
            "bins": {k: [None if math.isnan(x) else float(x) for x in v] for k, v in bins.items()}}


def _ci(x: dict, fmt: str = "+.3f") -> str:
    if math.isnan(x["low"]):
        return f"{x['mean']:{fmt}} [n/a: one seed]"
    return f"{x['mean']:{fmt}} [{x['low']:{fmt}}, {x['high']:{fmt}}]"


def markdown(summary: dict) -> str:
    """calibration.md: per stage the mean over seeds of ECE (and its difference from SFT's), accuracy,
    confidence, over-confidence and Brier, and each seed's ECE with its bootstrap interval."""
    seeds = summary["seeds"]
    lines = [f"# Calibration on the checkable families, {summary['split']} keys", "",
             f"{summary['distinct_prompts']} distinct prompts x {summary['samples_per_prompt']} answers at "
             f"temperature {summary['temperature']}, seeds {', '.join(map(str, seeds))}. Confidence: the answer's "
             "sequence probability; correct: the exact answer. Mean over seeds [95% t-interval across seeds].", "",
             "| stage | ECE | ECE - SFT's | accuracy | confidence | over-confidence | Brier | ECE per seed [bootstrap] |",
             "|---|---|---|---|---|---|---|---|"]
    for stage, row in summary["across_seeds"].items():
        per = "; ".join(f"{s}: {summary['per_seed'][s][stage]['ece']:.3f} [{summary['per_seed'][s][stage]['ece_low']:.3f},"
                        f" {summary['per_seed'][s][stage]['ece_high']:.3f}]" for s in summary["per_seed"])
        diff = "-" if stage == "sft" else _ci(row["ece_minus_sft"])
        lines.append(f"| {stage} | {_ci(row['ece'], '.3f')} | {diff} | {_ci(row['accuracy'], '.3f')} | "
                     f"{_ci(row['confidence'], '.3f')} | {_ci(row['overconfidence'])} | {_ci(row['brier'], '.3f')} "
                     f"| {per} |")
    return "\n".join(lines) + "\n"


def plot(summary: dict, out_png: str) -> str:
    """The reliability diagram of every stage, seeds pooled, written to `out_png` (returned)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    stages = list(summary["pooled_bins"])
    fig, axes = plt.subplots(1, len(stages), figsize=(2.6 * len(stages), 2.9), sharey=True)
    for ax, stage in zip(np.atleast_1d(axes), stages):
        b = summary["pooled_bins"][stage]
        edges = np.asarray(b["edges"])
        centers = (edges[:-1] + edges[1:]) / 2
        acc = np.asarray([np.nan if a is None else a for a in b["accuracy"]])
        count = np.asarray(b["count"])
        ax.bar(centers, np.nan_to_num(acc), width=edges[1] - edges[0], edgecolor="k", alpha=0.7, label="accuracy")
        ax.plot([0, 1], [0, 1], "k--", lw=1)
        for c, a, n in zip(centers, acc, count):
            if n > 0:
                ax.text(c, min(np.nan_to_num(a) + 0.02, 0.95), f"{int(n)}", ha="center", fontsize=5)
        row = summary["across_seeds"][stage]["ece"]
        ax.set_title(f"{stage}: ECE {row['mean']:.3f}", fontsize=9)
        ax.set_xlabel("confidence", fontsize=8)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
    np.atleast_1d(axes)[0].set_ylabel("accuracy (answers per bin on the bars)", fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(out_png) or ".", exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
