"""Annotator populations' measures (`python -m experiments.annotators`): the policy's own log-probability of an
answer (the self-preferring judge's bonus; Panickssery et al. 2024), a judge's position bias with answers shown in
both orders, what a population's labels favour, the across-seed summary (each DPO policy against SFT, each
population against the careful one, paired by seed) and the report's markdown and figures.
"""
from __future__ import annotations

import os

import jax
import numpy as np

from rlhf_jax import tasks as world
from rlhf_jax.recipes import TOK, prompt_batch
from rlhf_jax.recipes import populations as pop
from rlhf_jax.recipes.stats import across_seeds, fmt_interval
from rlhf_jax.tasks.annotators import format_bias, get_annotator, preference_prob
from rlhf_jax.train.rl import Episodes, episode_logprobs

SELF = "ai-judge-self"
"""The self-preferring judge: "ai-judge" plus `self_weight` x the policy's mean log-probability of the answer."""
POLICY_METRICS = ("gold_reward", "gold/skills", "gold/safety", "mean_length", "format_rate", "refusal_rate",
                  "over_refusal_rate", "kl_to_ref")
"""The DPO policies' numbers summarised across seeds (against SFT's)."""
LABEL_METRICS = ("gold_agreement", "longer_wins", "better_format_wins", "more_likely_wins")
"""The labels' numbers summarised across seeds (against the careful population's)."""
RM_METRICS = ("gold_agreement_dev", "prefers_longer_equal_gold_dev")
"""The reward models' numbers summarised across seeds (against the careful population's)."""


def mean_logprobs(params, mc, tasks, texts: list[str], width: int, chunk: int = 256) -> np.ndarray:
    """The policy's mean log-probability per token (EOS included) of each answer to its task's prompt, at
    temperature 1; answers longer than `width - 1` bytes are cut to fit."""
    out = []
    for i in range(0, len(tasks), chunk):
        n = min(chunk, len(tasks) - i)
        rows = list(range(i, i + n)) + [i + n - 1] * (chunk - n)      # one shape: one compiled program
        batch = prompt_batch([tasks[r] for r in rows])
        resp = np.full((chunk, width), TOK.pad_id, np.int32)
        rmask = np.zeros((chunk, width), np.int32)
        for j, r in enumerate(rows):
            ids = TOK.encode(texts[r])[:width - 1] + [TOK.eos_id]
            resp[j, :len(ids)], rmask[j, :len(ids)] = ids, 1
        ep = Episodes(tokens=np.concatenate([np.asarray(batch["prompts"]), resp], axis=1),
                      mask=np.concatenate([np.asarray(batch["prompt_mask"]), rmask], axis=1),
                      response_mask=rmask, sampler_logprobs=np.zeros((chunk, width), np.float32))
        lp = np.asarray(_LOGPS(params, ep, mc), np.float64)
        out.append((lp.sum(axis=1) / rmask.sum(axis=1))[:n])
    return np.concatenate(out)


_LOGPS = jax.jit(lambda params, ep, mc: episode_logprobs(params, ep, model_config=mc), static_argnums=2)


def position_bias(annotator, tasks, a: list[str], b: list[str]) -> dict:
    """Answers shown in both orders: the mean probability that the answer shown first wins (0.5: no position
    bias) and the share of pairs whose more probable winner changes with the order."""
    ann = get_annotator(annotator)
    members = ann.members if hasattr(ann, "members") else ((ann, 1.0),)
    first, flips, total = 0.0, 0.0, 0.0
    for member, weight in members:
        for task, x, y in zip(tasks, a, b):
            if x == y:
                continue
            p_xy = preference_prob(member, task, x, y)      # x shown first wins
            p_yx = preference_prob(member, task, y, x)      # y shown first wins
            first += weight * 0.5 * (p_xy + p_yx)
            flips += weight * float((p_xy > 0.5) != (p_yx < 0.5))
            total += weight
    return {"first_shown_wins": first / total, "order_flips": flips / total}


def label_stats(pairs: list[dict], likelihood: dict[str, float]) -> dict:
    """Of the on-policy pairs: gold agreement, and how often the longer / better-formatted / more likely (under
    SFT) answer wins where they differ."""
    def rate(key):
        decisive = [p for p in pairs if key(p["chosen"]) != key(p["rejected"])]
        return float(np.mean([key(p["chosen"]) > key(p["rejected"]) for p in decisive])) if decisive else float("nan")
    return {"gold_agreement": world.gold_agreement(pairs), "longer_wins": rate(pop.text_length),
            "better_format_wins": rate(format_bias), "more_likely_wins": rate(lambda t: likelihood.get(t, 0.0)),
            "pairs": len(pairs)}


def summarise(result: dict) -> dict:
    """Across seeds (`recipes.stats.across_seeds`: mean with its t-interval, and paired-by-seed differences): each
    DPO policy against SFT ("<name>-sft|<metric>"), and each population's labels and reward model against the
    careful population's ("<name>-careful|<metric>", when "careful" was run)."""
    per_seed = result["per_seed"]
    names = [n for n in next(iter(per_seed.values()))["populations"] if n != "sft"]
    out = {"policy": across_seeds({s: {n: r["policy"] for n, r in v["populations"].items()}
                                   for s, v in per_seed.items()}, ["sft", *names], POLICY_METRICS, "sft")}
    if "careful" in names:
        for part, metrics in (("labels", LABEL_METRICS), ("reward_model", RM_METRICS)):
            out[part] = across_seeds({s: {n: v["populations"][n][part] for n in names} for s, v in per_seed.items()},
                                     names, metrics, "careful")
    return out


def markdown(result: dict) -> str:
    """annotators.md: the across-seed tables (several seeds), then per seed the labels table and the reward
    model and DPO table."""
    lines = ["# Annotator populations and AI feedback", ""]
    if len(result["per_seed"]) > 1 and "across_seeds" in result:
        lines += _across_markdown(result)
    for seed, r in result["per_seed"].items():
        pops = {k: v for k, v in r["populations"].items() if k != "sft"}
        lines += [f"## Seed {seed} ({r['seconds']:.0f} s)", "",
                  "Labels of the same SFT answers (on-policy pairs of the main job's preference prompts; every "
                  "population labels the same pairs). Position bias: answers shown in both orders.", "",
                  "| population | train pairs | labels agree with gold | longer wins | better format wins | "
                  "more likely (SFT) wins | first shown wins | order flips the choice |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, e in pops.items():
            lab, pos = e["labels"], e["position"]
            lines.append(f"| {name} | {e['train_pairs']} | {lab['gold_agreement']:.3f} | {lab['longer_wins']:.3f} | "
                         f"{lab['better_format_wins']:.3f} | {lab['more_likely_wins']:.3f} | "
                         f"{pos['first_shown_wins']:.3f} | {pos['order_flips']:.3f} |")
        lines += ["", "Reward model on each population's labels (dev-key pairs: prompts no training saw) and DPO on "
                  "them, evaluated on every distinct test-key prompt (gold weighted as the main job's table).", "",
                  "| population | RM on own held-out labels | RM agrees with gold (dev) | RM prefers longer at equal "
                  "gold (dev) | DPO gold | gold skills | gold safety | length | format | pet phrase | refusal | "
                  "over-refusal | KL to SFT |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, e in r["populations"].items():
            m = e["policy"]
            rm = e.get("reward_model")
            rm_cols = (f"{rm['own_labels_accuracy']:.3f} | {rm['gold_agreement_dev']:.3f} | "
                       f"{rm['prefers_longer_equal_gold_dev']:.3f}") if rm else "- | - | -"
            lines.append(f"| {name if name != 'sft' else 'SFT (no preference step)'} | {rm_cols} | "
                         f"{m['gold_reward']:.3f} | {m['gold/skills']:.3f} | {m['gold/safety']:.3f} | "
                         f"{m['mean_length']:.1f} | {m['format_rate']:.2f} | {m['phrase_rate']:.3f} | "
                         f"{m['refusal_rate']:.2f} | {m['over_refusal_rate']:.2f} | {m['kl_to_ref']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def _across_markdown(result: dict) -> list[str]:
    a, seeds = result["across_seeds"], list(result["per_seed"])
    names = [n for n in result["populations"] if f"{n}|gold_reward" in a["policy"]]
    lines = [f"## Across seeds {', '.join(seeds)}", "",
             "Mean over seeds [95% t-interval across seeds]; differences are paired by seed.", "",
             "DPO on each population's labels against SFT (every distinct test-key prompt):", "",
             "| labels | DPO gold | gold - SFT | skills - SFT | safety - SFT | over-refusal (- SFT) | length (- SFT) | "
             "KL to SFT |", "|---|---|---|---|---|---|---|---|"]
    p = a["policy"]
    lines.append(f"| SFT (no labels) | {p['sft|gold_reward']['mean']:.3f} | | | | "
                 f"{p['sft|over_refusal_rate']['mean']:.2f} | {p['sft|mean_length']['mean']:.1f} | |")
    for n in names:
        lines.append(f"| {n} | {p[f'{n}|gold_reward']['mean']:.3f} | {fmt_interval(p[f'{n}-sft|gold_reward'])} | "
                     f"{fmt_interval(p[f'{n}-sft|gold/skills'])} | {fmt_interval(p[f'{n}-sft|gold/safety'])} | "
                     f"{p[f'{n}|over_refusal_rate']['mean']:.2f} ({fmt_interval(p[f'{n}-sft|over_refusal_rate'])}) | "
                     f"{p[f'{n}|mean_length']['mean']:.1f} ({p[f'{n}-sft|mean_length']['mean']:+.2f}) | "
                     f"{p[f'{n}|kl_to_ref']['mean']:.2f} |")
    if "labels" in a:
        lines += ["", "Labels and reward models against the careful population's:", "",
                  "| labels | agree with gold | longer wins | better format wins | more likely wins | RM agrees with "
                  "gold (dev) | - careful's | RM prefers longer at equal gold (dev) |", "|---|---|---|---|---|---|---|---|"]
        lab, rm = a["labels"], a["reward_model"]
        for n in names:
            diff = "" if n == "careful" else fmt_interval(rm[f"{n}-careful|gold_agreement_dev"])
            lines.append(f"| {n} | " + " | ".join(f"{lab[f'{n}|{k}']['mean']:.3f}" for k in LABEL_METRICS) +
                         f" | {rm[f'{n}|gold_agreement_dev']['mean']:.3f} | {diff} | "
                         f"{rm[f'{n}|prefers_longer_equal_gold_dev']['mean']:.3f} |")
    return lines + [""]


def plot(result: dict, out: str) -> None:
    """annotators.png in `out` (one per seed when there are several, and annotators_seeds.png)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    if len(result["per_seed"]) > 1 and "across_seeds" in result:
        _plot_across(result, out, plt)
    for seed, r in result["per_seed"].items():
        suffix = "" if len(result["per_seed"]) == 1 else f"_seed{seed}"
        names = list(r["populations"])
        panels = (("gold_reward", "DPO gold reward (test keys)"), ("mean_length", "length (bytes)"),
                  ("format_rate", "format score"), ("over_refusal_rate", "over-refusal"))
        fig, axes = plt.subplots(1, len(panels) + 1, figsize=(3.2 * (len(panels) + 1), 3.6))
        x = np.arange(len(names))
        for ax, (key, title) in zip(axes, panels):
            ax.bar(x, [r["populations"][n]["policy"][key] for n in names], color="tab:blue")
            ax.set_title(title, fontsize=9)
        axes[-1].bar(x[1:], [r["populations"][n]["reward_model"]["gold_agreement_dev"] for n in names[1:]],
                     color="tab:orange")
        axes[-1].set_title("RM agrees with gold (dev pairs)", fontsize=9)
        axes[-1].set_ylim(0.4, 1.0)
        for ax in axes:
            ax.set_xticks(x, [n.replace("-", "-\n") for n in names], fontsize=7, rotation=90)
            ax.grid(alpha=0.3, axis="y")
        fig.suptitle(f"Annotator populations, seed {seed}: same answers, different labellers", fontsize=10)
        fig.tight_layout()
        fig.savefig(os.path.join(out, f"annotators{suffix}.png"), dpi=100)
        plt.close(fig)


def _plot_across(result: dict, out: str, plt) -> None:
    """Each population's DPO change from SFT (gold, over-refusal) and its reward model's gold agreement, with the
    t-intervals across seeds."""
    a, n_seeds = result["across_seeds"], len(result["per_seed"])
    names = [n for n in result["populations"] if f"{n}|gold_reward" in a["policy"]]
    panels = [("policy", "{n}-sft|gold_reward", "DPO gold - SFT's"),
              ("policy", "{n}-sft|over_refusal_rate", "over-refusal - SFT's")]
    if "reward_model" in a:
        panels.append(("reward_model", "{n}|gold_agreement_dev", "RM agrees with gold (dev pairs)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.8))
    x = np.arange(len(names))
    for ax, (part, key, title) in zip(np.atleast_1d(axes), panels):
        cis = [a[part][key.format(n=n)] for n in names]
        means = np.asarray([c["mean"] for c in cis])
        err = np.asarray([[c["mean"] - c["low"] for c in cis], [c["high"] - c["mean"] for c in cis]])
        ax.bar(x, means, yerr=err, capsize=3, color="tab:orange" if part == "reward_model" else "tab:blue")
        ax.axhline(0.0, color="black", linewidth=0.6)
        ax.set_title(title, fontsize=9)
        ax.set_xticks(x, [n.replace("-", "-\n") for n in names], fontsize=7, rotation=90)
        ax.grid(alpha=0.3, axis="y")
    if "reward_model" in a:
        np.atleast_1d(axes)[-1].set_ylim(0.4, 0.8)
    fig.suptitle(f"Annotator populations: mean over {n_seeds} seeds, 95% t-intervals", fontsize=10)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "annotators_seeds.png"), dpi=100)
    plt.close(fig)
