"""The main job's report: report.json (the contract read by `rlhf-jax seeds` and the experiments), report.md with
its plots, and the console table."""
from __future__ import annotations

import dataclasses
import json
import os

from rlhf_jax import tasks as world
from rlhf_jax.recipes.evaluate import GROUPS
from rlhf_jax.train.report import plot_curves, plot_xy, write_report

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
    with open(os.path.join(cfg.out, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    rows = [{"stage": s, **{k.replace("/", "_"): round(v, 3) for k, v in table[s].items()}} for s in table]
    bon = rm_report["best_of_n"]
    write_report(cfg.out, {"reward_model.accuracy (dev-key prompts)": round(rm_report["accuracy"], 3),
                           "SFT's best temperature on dev": table["sft_best_t"]["temperature"],
                           f"best-of-{bon['n']} gold (random / reward-model pick / gold pick)":
                           f"{bon['gold_random']:.3f} / {bon['gold_rm_pick']:.3f} / {bon['gold_oracle_pick']:.3f}",
                           "seconds": round(seconds, 1)},
                 {"stages": rows}, title="rlhf_jax pipeline on the gold-reward world", images=plots)
    with open(os.path.join(cfg.out, "report.json"), "w") as f:  # write_report wrote its own; ours is the contract
        json.dump(report, f, indent=2)
    print_pipeline_table(cfg, rows, rm_report, vs_sft, vs_best, seconds)
    return report


def print_pipeline_table(cfg, rows, rm_report, vs_sft, vs_best, seconds):
    cols = ["stage", "gold_reward", "gold_skills", "gold_safety", "gold_greedy", "rm_score", "kl_to_sft",
            "mean_length", "refusal_rate", "over_refusal_rate"]
    n_prompts = len(world.key_tasks(cfg.eval_split, config=cfg.world()))
    print(f"\n{cfg.eval_split} split: {n_prompts} distinct prompts, {cfg.eval_samples} samples each at temperature "
          f"{cfg.temperature} (sft_best_t: SFT at its best dev temperature, "
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


