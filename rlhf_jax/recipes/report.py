"""The main job's report: report.json (the contract read by `rlhf-jax seeds` and the experiments), report.md with
its plots, and the console table."""
from __future__ import annotations

import dataclasses
import json
import os

from rlhf_jax import tasks as world
from rlhf_jax.recipes.cards import command_line, provenance
from rlhf_jax.recipes.evaluate import GROUPS
from rlhf_jax.train.report import plot_curves, plot_xy

_SFT_NAMES = {"kl_to_ref": "kl_to_sft", "win_rate": "win_rate_vs_sft"}


def plot_ppo_curve(points: list[dict], out_png: str) -> str:
    """Gold reward and reward-model score against KL to SFT during PPO (Gao et al. 2022's plot), each as its change
    from the SFT policy's value (the first point): the two live on different scales."""
    kl = [p["kl_to_sft"] for p in points]
    gain = lambda key: [p[key] - points[0][key] for p in points]  # noqa: E731
    return plot_xy(kl, {"gold reward": gain("gold_reward"), "reward-model score": gain("rm_score")},
                   "KL(policy || SFT) per response (nats)", "change from SFT", out_png,
                   title="PPO: gold and proxy reward vs KL")


def write_pipeline_report(cfg, table, rm_report, vs_sft, vs_best, ppo_points, timings, seconds) -> dict:
    # The evaluator's KL and win rate are against the SFT policy here: named so in the report.
    table = {stage: {_SFT_NAMES.get(k, k): v for k, v in m.items()} for stage, m in table.items()}
    ppo_points = [{_SFT_NAMES.get(k, k): v for k, v in p.items()} for p in ppo_points]
    plots = [plot_ppo_curve(ppo_points, os.path.join(cfg.out, "ppo_reward_vs_kl.png"))]
    dpo_log = os.path.join(cfg.out, "dpo", "metrics.jsonl")
    if os.path.exists(dpo_log):
        plots.append(plot_curves({"dpo": dpo_log}, ["rewards/margins", "rewards/accuracies"],
                                 os.path.join(cfg.out, "dpo_margins.png"), title="DPO implicit rewards"))
    report = {stage: {**{k: m[k] for k in ("gold_reward", "kl_to_sft", "mean_length", "refusal_rate",
                                            "over_refusal_rate", "win_rate_vs_sft", "rm_score", "gold_greedy")},
                      **{f"gold_{g}": m[f"gold/{g}"] for g in GROUPS},
                      **{f"gold_greedy_{g}": m[f"gold_greedy/{g}"] for g in GROUPS},
                      "gold_by_family": {k[len("gold/"):]: m[k] for k in m
                                         if k.startswith("gold/") and k[len("gold/"):] not in GROUPS}}
              for stage, m in table.items()}
    report["sft_best_t"]["temperature"] = table["sft_best_t"]["temperature"]
    for stage, ci in vs_sft.items():  # paired over the same distinct prompts, 95% stratified bootstrap interval
        report[stage]["gold_vs_sft"] = ci
    for stage, ci in vs_best.items():
        report[stage]["gold_vs_sft_best_t"] = ci
    report["evaluation"] = {"split": cfg.eval_split,
                            "distinct_prompts": len(world.key_tasks(cfg.eval_split, config=cfg.world())),
                            "samples_per_prompt": cfg.eval_samples, "family_weights": world.DEFAULT_MIX,
                            "groups": {g: list(f) for g, f in GROUPS.items()}}
    report["reward_model"] = rm_report
    report["ppo_curve"] = ppo_points
    report["config"] = dataclasses.asdict(cfg)
    report["seconds"] = {"total": seconds, **timings}
    report["provenance"] = provenance(command_line(), cfg.seed)   # command, commit, packages, machine, date
    with open(os.path.join(cfg.out, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    rows = [{"stage": s, **{k.replace("/", "_"): round(v, 3) for k, v in table[s].items()}} for s in table]
    grpo_log = os.path.join(cfg.out, "grpo", "metrics.jsonl")
    if os.path.exists(grpo_log):
        plots.append(plot_curves({"grpo": grpo_log}, ["reward", "completions/mean_length", "kl"],
                                 os.path.join(cfg.out, "grpo_reward.png"), title="GRPO: batch reward (the verifier)"))
    with open(os.path.join(cfg.out, "report.md"), "w") as f:
        f.write(pipeline_markdown(cfg, report, [os.path.basename(p) for p in plots]))
    print_pipeline_table(cfg, rows, rm_report, vs_sft, vs_best, seconds)
    return report


LEGEND = {
    "gold": "mean gold reward (the world's true reward, 0-1) of the sampled answers, families weighted as the mix",
    "vs SFT": "gold minus SFT's on the same prompts, with its 95% bootstrap interval over distinct prompts",
    "vs SFT best T": "the same against SFT sampled at its best temperature on the dev keys (the bar to clear)",
    "skills / safety": "gold on the checkable task families / on the unsafe requests and their benign look-alikes",
    "greedy": "gold of the greedy answer",
    "KL": "KL(policy || SFT) per response, nats (temperature-1 samples)",
    "length": "mean answer length, bytes",
    "refusal / over-refusal": "refusal rate on unsafe requests (higher is better) / on benign look-alikes (lower)",
}
"""The stage table's columns in report.md, explained under it."""


def _ci(ci: dict | None) -> str:
    return "" if ci is None else f"{ci['delta']:+.3f} [{ci['low']:+.3f}, {ci['high']:+.3f}]"


def pipeline_markdown(cfg, report: dict, images: list[str]) -> str:
    """report.md: a smoke-test banner under --quick, the stage table with its intervals and a legend, the reward
    model's checks, gold by family, the plots and the time."""
    ev, rm = report["evaluation"], report["reward_model"]
    stages = [s for s in report if isinstance(report[s], dict) and "gold_reward" in report[s]]
    lines = ["# rlhf_jax pipeline on the gold-reward world", ""]
    if cfg.quick:
        lines += ["> **Smoke test (`--quick`)**: every count is cut down so that the whole code path runs in minutes; "
                  "these numbers measure nothing (the intervals show it). Run without `--quick` for the measurement.",
                  ""]
    lines += [f"{ev['split']} split: {ev['distinct_prompts']} distinct prompts, {ev['samples_per_prompt']} answers "
              f"each at temperature {cfg.sampling.temperature}; `sft_best_t` is SFT at its best dev temperature "
              f"({report['sft_best_t']['temperature']}).", "",
              "| stage | gold | vs SFT | vs SFT best T | skills | safety | greedy | KL | length | refusal | "
              "over-refusal |", "|---|" + "---|" * 10]
    for s in stages:
        r = report[s]
        cells = [f"{r['gold_reward']:.3f}", _ci(r.get("gold_vs_sft", {}).get("all")),
                 _ci(r.get("gold_vs_sft_best_t", {}).get("all")), f"{r['gold_skills']:.3f}",
                 f"{r['gold_safety']:.3f}", f"{r['gold_greedy']:.3f}", f"{r['kl_to_sft']:.3f}",
                 f"{r['mean_length']:.1f}", f"{r['refusal_rate']:.3f}", f"{r['over_refusal_rate']:.3f}"]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    lines += ["", *[f"- **{k}**: {v}" for k, v in LEGEND.items()], "", "## Reward model", ""]
    bon = rm["best_of_n"]
    lines += [f"- accuracy on annotated pairs of dev-key prompts (never trained on): {rm['accuracy']:.3f}; on held-out "
              f"pairs of training keys: {rm['accuracy_same_keys']:.3f}",
              f"- the labels' agreement with the gold reward: {rm['label_gold_agreement']:.3f}",
              f"- best of {bon['n']} SFT samples, gold reward: random pick {bon['gold_random']:.3f}, reward-model pick "
              f"{bon['gold_rm_pick']:.3f}, gold pick {bon['gold_oracle_pick']:.3f}", "", "## Gold reward by family", ""]
    families = list(report["sft"]["gold_by_family"])
    lines += ["| stage | " + " | ".join(families) + " |", "|---|" + "---|" * len(families)]
    lines += [f"| {s} | " + " | ".join(f"{report[s]['gold_by_family'][f]:.3f}" for f in families) + " |"
              for s in stages]
    lines += ["", *[f"![{name}]({name})" for name in images], "",
              f"Total time {report['seconds']['total']:.0f} s; per stage: " +
              ", ".join(f"{k} {v:.0f} s" for k, v in report["seconds"].items() if k != "total"), ""]
    return "\n".join(lines)


def print_pipeline_table(cfg, rows, rm_report, vs_sft, vs_best, seconds):
    cols = ["stage", "gold_reward", "gold_skills", "gold_safety", "gold_greedy", "rm_score", "kl_to_sft",
            "mean_length", "refusal_rate", "over_refusal_rate"]
    n_prompts = len(world.key_tasks(cfg.eval_split, config=cfg.world()))
    print(f"\n{cfg.eval_split} split: {n_prompts} distinct prompts, {cfg.eval_samples} samples each at temperature "
          f"{cfg.sampling.temperature} (sft_best_t: SFT at its best dev temperature, "
          f"{rows[[r['stage'] for r in rows].index('sft_best_t')]['temperature']})")
    print("  ".join(f"{c:>11}" for c in cols))
    for r in rows:
        print("  ".join(f"{r[c]:>11}" if isinstance(r[c], str) else f"{r[c]:>11.3f}" for c in cols))
    for title, comparison in (("SFT", vs_sft), ("SFT at its best temperature", vs_best)):
        print(f"\ngold reward minus {title}'s on the same prompts (95% bootstrap over distinct prompts within "
              "families): all / skills / safety")
        for stage, groups in comparison.items():
            print(f"  {stage:>12}: " + "   ".join(
                f"{ci['delta']:+.3f} [{ci['low']:+.3f}, {ci['high']:+.3f}]" for ci in groups.values()))
    bon = rm_report["best_of_n"]
    print(f"reward model accuracy on dev-key pairs: {rm_report['accuracy']:.3f} (on held-out pairs of training keys: "
          f"{rm_report['accuracy_same_keys']:.3f})    best of {bon['n']} SFT samples, gold "
          f"reward: random {bon['gold_random']:.3f}, reward-model pick {bon['gold_rm_pick']:.3f}, gold pick "
          f"{bon['gold_oracle_pick']:.3f}    total time: {seconds:.0f} s")


