"""GRPO variants as changes to the main job's GRPO stage (`python -m experiments.grpo_variants`): Dr. GRPO (Liu
et al. 2025), DAPO (Yu et al. 2025) and RLOO (Ahmadian et al. 2024) each as the main job's GRPO settings with
only its named components changed; training one; summarising its training log; the report's markdown and figure.
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np

from rlhf_jax import recipes
from rlhf_jax.generation import SamplingConfig
from rlhf_jax.recipes.stats import fmt_interval

VARIANTS = {
    "grpo": {},
    "dr_grpo": {"pipeline": {"grpo.scale": "none", "grpo.loss_type": "dr_grpo"}},
    "dapo": {"pipeline": {"grpo.loss_type": "dapo", "grpo.clip_eps_high": 0.28, "grpo.kl_coef": 0.0},
             "oversample": 2, "overlong_buffer": 6},
    "rloo": {"pipeline": {"grpo.advantage": "rloo"}},
}
"""Each variant's changes to the main job's GRPO settings (PipelineConfig fields; DAPO's dynamic sampling factor
and overlong buffer)."""
METRICS = ("gold_reward", "gold/skills", "gold/safety", "mean_length", "kl_to_ref", "refusal_rate",
           "over_refusal_rate")
"""The policies' numbers in the report, summarised across seeds."""


def variant_config(pcfg, name: str, sampling: SamplingConfig):
    """(PipelineConfig, GRPOConfig) of a variant: the main job's GRPO with the variant's changes."""
    spec = VARIANTS[name]
    cfg = recipes.with_options(pcfg, spec.get("pipeline", {}))
    grpo_cfg = recipes.grpo_config(cfg, sampling)
    if "oversample" in spec:
        grpo_cfg = dataclasses.replace(grpo_cfg, batch_size=cfg.grpo.batch_size * spec["oversample"],
                                       dynamic_sampling_groups=cfg.grpo.batch_size)
    if "overlong_buffer" in spec:
        grpo_cfg = dataclasses.replace(grpo_cfg, overlong_buffer=spec["overlong_buffer"])
    return cfg, grpo_cfg


def train_variant(pcfg, name: str, mc, sft_params):
    """(params, history) of the main job's GRPO stage with variant `name`'s changes (its key and prompts)."""
    sampling = SamplingConfig(max_new_tokens=pcfg.sampling.max_new_tokens, temperature=pcfg.sampling.temperature,
                              eos_id=recipes.TOK.eos_id, pad_id=recipes.TOK.pad_id)
    return recipes.train_grpo(*variant_config(pcfg, name, sampling), mc, sft_params)


def scalars(metrics: dict) -> dict:
    """The scalar numbers of an evaluator's metrics, as floats (for the JSON)."""
    return {k: float(v) for k, v in metrics.items() if np.ndim(v) == 0 and not isinstance(v, str)}


def train_summary(history: list[dict]) -> dict:
    """The training batches' mean gold reward at the first and the last log (each a mean over `log_every`
    iterations), the share of groups with equal rewards, and the share of informative groups DAPO sampled."""
    out = {"reward_first": float(history[0]["reward"]), "reward_last": float(history[-1]["reward"]),
           "frac_reward_zero_std": float(np.mean([h["frac_reward_zero_std"] for h in history]))}
    key = "dynamic_sampling/informative_fraction"
    if key in history[0]:
        out["informative_fraction"] = float(np.mean([h[key] for h in history]))
    return out


def markdown(result: dict) -> str:
    """grpo_variants.md: every policy's mean over seeds, the differences from SFT (paired by seed) and per
    seed the paired bootstrap over test prompts with the training reward."""
    a, n = result["across_seeds"], len(result["per_seed"])
    lines = ["# GRPO, Dr. GRPO, DAPO and RLOO against the gold reward, on the same budget", "",
             f"{n} seed(s) ({', '.join(result['per_seed'])}); {result['prompts']} distinct test prompts, "
             f"{result['settings']['eval_samples']} answers each; mean over seeds (t-interval across seeds when "
             "there are 2 or more).", "",
             "| policy | " + " | ".join(METRICS) + " |", "|---|" + "---|" * len(METRICS)]
    for name in ("sft", *VARIANTS):
        lines.append(f"| {name} | " + " | ".join(f"{a[f'{name}|{k}']['mean']:.3f}" for k in METRICS) + " |")
    lines += ["", "Differences from SFT (paired by seed):", "",
              "| variant - sft | gold | skills | safety | length |", "|---|---|---|---|---|"]
    for name in VARIANTS:
        lines.append(f"| {name} | " + " | ".join(fmt_interval(a[f"{name}-sft|{k}"]) for k in (
            "gold_reward", "gold/skills", "gold/safety", "mean_length")) + " |")
    lines += ["", "Per seed, paired bootstrap over distinct test prompts (95%), gold minus SFT's:", "",
              "| seed | variant | all | skills | safety | training reward, first -> last log (DAPO's with its "
              "overlong penalty) |",
              "|---|---|---|---|---|---|"]
    for seed, row in result["per_seed"].items():
        for name in VARIANTS:
            vs, tr = row["vs_sft"][name], row["train"].get(name)
            trained = f"{tr['reward_first']:.3f} -> {tr['reward_last']:.3f}" if tr else "(the main job's stage)"
            lines.append(f"| {seed} | {name} | " + " | ".join(
                f"{vs[g]['delta']:+.3f} [{vs[g]['low']:+.3f}, {vs[g]['high']:+.3f}]"
                for g in ("all", "skills", "safety")) + f" | {trained} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, out: str) -> None:
    """grpo_variants.png in `out`: each policy's gold reward against its KL to SFT, mean over seeds."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    a = result["across_seeds"]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name in ("sft", *VARIANTS):
        kl, gold = a[f"{name}|kl_to_ref"]["mean"], a[f"{name}|gold_reward"]
        err = None if gold["n"] < 2 else [[gold["mean"] - gold["low"]], [gold["high"] - gold["mean"]]]
        ax.errorbar([kl], [gold["mean"]], yerr=err, marker="o", capsize=3, label=name)
    ax.set_xlabel("KL to SFT (nats)")
    ax.set_ylabel("gold reward, test keys")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="x-small")
    ax.set_title(f"GRPO variants against the gold reward ({len(result['per_seed'])} seed(s))", fontsize=10)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "grpo_variants.png"), dpi=100)
    plt.close(fig)
