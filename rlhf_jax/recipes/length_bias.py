"""Length bias's summaries (`python -m experiments.length_bias`; Singhal et al. 2023, "A Long Way to Go"): each
seed's numbers for one population (how often its labels and its reward model prefer the longer answer, and how
PPO's and DPO's length, gold and proxy change from SFT), their across-seed summary with each population's
difference from the careful one, paired by seed, and the report's markdown and figures.
"""
from __future__ import annotations

import os

import numpy as np

from rlhf_jax.recipes.stats import across_seeds, fmt_interval

SUMMARY = ("prefers_longer", "prefers_longer_equal_gold", "rm_prefers_longer_equal_gold_dev", "rm_gold_agreement_dev",
           "rm_own_labels", "length_only_own_labels", "ppo_length_change", "ppo_gold_change", "ppo_proxy_change",
           "ppo_refusal_change", "dpo_length_change", "dpo_gold_change")
"""The per-seed numbers summarised across seeds; "*_change" = at the last evaluation minus at the first."""


def seed_row(e: dict) -> dict:
    """One population's numbers of one seed, keyed as `SUMMARY` (`e`: its entry of the per-seed result)."""
    lab, rm = e["labels"], e["reward_model"]
    row = {"prefers_longer": lab["rate"], "prefers_longer_equal_gold": lab["rate_equal_gold"],
           "rm_prefers_longer_equal_gold_dev": rm["prefers_longer_equal_gold_dev"],
           "rm_gold_agreement_dev": rm["gold_agreement_dev"], "rm_own_labels": rm["own_labels_accuracy"],
           "length_only_own_labels": e["length_only_accuracy"]}
    for method, keys in (("ppo", ("length", "gold", "proxy", "refusal")), ("dpo", ("length", "gold"))):
        first, last = e[method][0]["test"], e[method][-1]["test"]
        row.update({f"{method}_{k}_change": last[k] - first[k] for k in keys})
    return row


def summarise(result: dict) -> dict:
    """Across seeds (`recipes.stats.across_seeds`): each population's numbers (mean with its t-interval) and, when
    "careful" was run, every other population's difference from it, paired by seed ("<name>-careful|<key>")."""
    names = list(next(iter(result["per_seed"].values()))["populations"])
    rows = {s: {n: seed_row(e) for n, e in r["populations"].items()} for s, r in result["per_seed"].items()}
    return across_seeds(rows, names, SUMMARY, "careful" if "careful" in names else names[0])


def markdown(result: dict) -> str:
    """length_bias.md: the across-seed table (several seeds), then per seed the labels and reward models
    table and the PPO and DPO table (first, middle and last evaluation)."""
    lines = ["# Length bias: labels, reward models, PPO and DPO", ""]
    if len(result["per_seed"]) > 1 and "across_seeds" in result:
        a, names = result["across_seeds"], list(result["populations"])
        base = "careful" if "careful" in names else names[0]
        others = [n for n in names if n != base]
        lines += [f"## Across seeds {', '.join(result['per_seed'])}", "",
                  "Mean over seeds [95% t-interval across seeds]" + (
                      f"; the last column{'s give' if len(others) > 1 else ' gives'} the difference from the {base} "
                      "population, paired by seed" if others else "") +
                  ". Changes: last evaluation minus the first (SFT).", "",
                  "| measure | " + " | ".join([*names, *(f"{n} - {base}" for n in others)]) + " |",
                  "|---|" + "---|" * (len(names) + len(others))]
        for key in SUMMARY:
            signed = key.endswith("_change")
            lines.append(f"| {key} | " + " | ".join([*(fmt_interval(a[f"{n}|{key}"], signed) for n in names),
                                                     *(fmt_interval(a[f"{n}-{base}|{key}"]) for n in others)]) + " |")
        lines.append("")
    for seed, r in result["per_seed"].items():
        lines += [f"## Seed {seed} ({r['seconds']:.0f} s)", "",
                  "Labels on pairs of two SFT answers to a preference prompt; reward models scored on dev-key pairs "
                  "(prompts no training saw); the length-only model scores r = len(answer).", "",
                  "| population | prefers longer (pairs) | ... at equal gold (pairs) | RM on own held-out labels | "
                  "length-only on them | RM agrees with gold (dev) | length-only agrees with gold (dev) | "
                  "RM prefers longer at equal gold (dev) |", "|---|---|---|---|---|---|---|---|"]
        for name, e in r["populations"].items():
            lab, rm = e["labels"], e["reward_model"]
            lines.append(f"| {name} | {lab['rate']:.3f} ({lab['pairs']}) | {lab['rate_equal_gold']:.3f} "
                         f"({lab['pairs_equal_gold']}) | {rm['own_labels_accuracy']:.3f} | "
                         f"{e['length_only_accuracy']:.3f} | {rm['gold_agreement_dev']:.3f} | "
                         f"{e['length_only_gold_agreement_dev']:.3f} | {rm['prefers_longer_equal_gold_dev']:.3f} |")
        lines += ["", f"Policies from SFT, answers up to {result['max_new_tokens']} bytes, on every distinct test-key "
                  "prompt (gold weighted as the main job's table; proxy = that population's reward model).", "",
                  "| population | method | step | gold | gold skills | gold safety | proxy | length (bytes) | "
                  "KL to SFT | format | refusal | over-refusal |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, e in r["populations"].items():
            for method in ("ppo", "dpo"):
                pts = e[method]
                for p in (pts[0], pts[len(pts) // 2], pts[-1]):
                    m = p["test"]
                    lines.append(f"| {name} | {method} | {p['iteration']} | {m['gold']:.3f} | "
                                 f"{m.get('gold_skills', float('nan')):.3f} | {m.get('gold_safety', float('nan')):.3f} "
                                 f"| {m['proxy']:.3f} | {m['length']:.1f} | {m['kl']:.2f} | "
                                 f"{m.get('format', float('nan')):.2f} | {m['refusal']:.2f} | {m['over_refusal']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def plot(result: dict, out: str) -> None:
    """length_bias.png in `out` (one per seed when there are several, and length_bias_seeds.png)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    if len(result["per_seed"]) > 1:
        _plot_seeds(result, out, plt)
    for seed, r in result["per_seed"].items():
        suffix = "" if len(result["per_seed"]) == 1 else f"_seed{seed}"
        fig, axes = plt.subplots(3, 2, figsize=(9, 8.4), sharex="col")
        for name, e in r["populations"].items():
            for j, method in enumerate(("ppo", "dpo")):
                steps = [p["iteration"] for p in e[method]]
                for i, key in enumerate(("length", "gold", "proxy")):
                    axes[i, j].plot(steps, [p["test"][key] for p in e[method]], marker="o", ms=3, label=name)
        for j, method in enumerate(("PPO iteration", "DPO step")):
            axes[-1, j].set_xlabel(method)
        for i, key in enumerate(("length (bytes)", "gold reward (test keys)", "proxy (own reward model)")):
            axes[i, 0].set_ylabel(key)
        for ax in axes.flat:
            ax.grid(alpha=0.3)
            ax.legend(fontsize="x-small")
        fig.suptitle(f"Length bias, seed {seed}: labels of each population -> reward model -> PPO / DPO", fontsize=10)
        fig.tight_layout()
        fig.savefig(os.path.join(out, f"length_bias{suffix}.png"), dpi=100)
        plt.close(fig)


def _plot_seeds(result: dict, out: str, plt) -> None:
    """PPO's and DPO's length and gold against step, every seed (thin) and their mean (thick), per population."""
    fig, axes = plt.subplots(2, 2, figsize=(9, 6), sharex="col")
    colors = dict(zip(result["populations"], ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple")))
    for j, method in enumerate(("ppo", "dpo")):
        for name in result["populations"]:
            curves = [r["populations"][name][method] for r in result["per_seed"].values()]
            steps = [p["iteration"] for p in curves[0]]
            for i, key in enumerate(("length", "gold")):
                ys = np.asarray([[p["test"][key] for p in c] for c in curves if len(c) == len(steps)])
                for y in ys:
                    axes[i, j].plot(steps, y, color=colors.get(name), alpha=0.3, linewidth=0.8)
                axes[i, j].plot(steps, ys.mean(axis=0), color=colors.get(name), marker="o", ms=3, label=name)
        axes[-1, j].set_xlabel(("PPO iteration", "DPO step")[j])
    axes[0, 0].set_ylabel("length (bytes)")
    axes[1, 0].set_ylabel("gold reward (test keys)")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small")
    fig.suptitle(f"Length bias over seeds {', '.join(result['per_seed'])}: each seed (thin) and the mean",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "length_bias_seeds.png"), dpi=100)
    plt.close(fig)
