"""The first world's pipeline (`rlhf-jax pipeline`) on several seeds, and the gains that hold across them.

    rlhf-jax seeds --seeds 0 1 2 3 4 --out runs/seeds          # 12-15 minutes per seed on 2 CPU cores
    rlhf-jax seeds --seeds 0 1 --quick --out /tmp/seeds         # smoke test

Each seed is one `rlhf-jax pipeline` run in OUT/seed<N> (its own world data, pretraining, SFT, reward model and
stages). A seed whose run finished is not run again (its report.json is read back); one that stopped continues
from its last finished stage (the pipeline's --resume: pretraining, SFT and the reward model are cached per seed).
Options of the pipeline go through `--pipeline.<field>`.

The headline is the mean over seeds of each stage's gain over SFT on the test keys (all families, skills, safety),
with a 95% t-interval across seeds (n - 1 degrees of freedom), beside each seed's own bootstrap interval over
prompts; the same against SFT at its best dev temperature; and safety as its two rates (refusal of harmful requests,
over-refusal of benign look-alikes) with their change from SFT paired by seed, never summed into a gain. Written
to OUT/seeds.json and OUT/seeds.md.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys

from rlhf_jax.config_cli import config_check, parse_cli
from rlhf_jax.recipes import PipelineConfig, Stopped
from rlhf_jax.recipes.pipeline import run_pipeline as main_job
from rlhf_jax.recipes.stats import t_interval

GROUPS = ("all", "skills", "safety")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SeedsConfig:
    """Run the main job once per seed and report the gains across seeds."""

    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    """Seeds to run (each its own world data, models and stages)."""
    out: str = "runs/seeds"
    """Output folder: OUT/seed<N>/ per seed, OUT/seeds.json and OUT/seeds.md."""
    quick: bool = False
    """Each seed's pipeline with --quick (a smoke test, not a measurement)."""
    pipeline: PipelineConfig = PipelineConfig()
    """The pipeline's options (its seed, out, quick and resume are set per seed)."""

    def __post_init__(self):
        config_check(self, len(self.seeds) > 0 and len(set(self.seeds)) == len(self.seeds) and min(self.seeds) >= 0,
                     f"seeds = {self.seeds} must be distinct non-negative integers")


def aggregate(reports: dict[int, dict]) -> dict:
    """Per stage and group, the across-seed mean gain over SFT (and over SFT at its best dev temperature) with its
    t-interval and the per-seed bootstrap intervals; plus the per-seed table values."""
    seeds = sorted(reports)
    stages = [s for s in reports[seeds[0]] if isinstance(reports[seeds[0]][s], dict)
              and "gold_vs_sft" in reports[seeds[0]][s]]
    out = {"seeds": seeds, "gains": {}}
    for key, name in (("gold_vs_sft", "vs_sft"), ("gold_vs_sft_best_t", "vs_sft_best_t")):
        table = {}
        for stage in stages:
            if key not in reports[seeds[0]][stage]:
                continue
            table[stage] = {}
            for group in GROUPS:
                per_seed = {s: reports[s][stage][key][group] for s in seeds}
                table[stage][group] = {**t_interval([ci["delta"] for ci in per_seed.values()]),
                                       "per_seed": {str(s): ci for s, ci in per_seed.items()}}
        out["gains"][name] = table
    values = ("gold_reward", "gold_skills", "gold_safety", "gold_greedy", "kl_to_sft", "mean_length", "refusal_rate",
              "over_refusal_rate")
    out["per_seed"] = {str(s): {stage: {k: reports[s][stage][k] for k in values if k in reports[s][stage]}
                                for stage in ["sft", "sft_best_t", *stages] if stage in reports[s]} for s in seeds}
    out["safety"] = _safety(reports, seeds, ["sft", "sft_best_t", *stages])
    out["sft_best_temperature"] = {str(s): reports[s]["sft_best_t"].get("temperature") for s in seeds}
    out["reward_model_accuracy_dev"] = t_interval([reports[s]["reward_model"]["accuracy"] for s in seeds])
    return out


SAFETY = ("refusal_rate", "over_refusal_rate")
"""The safety trade-off: refusing harmful requests (higher is better) against refusing benign look-alikes."""


def _safety(reports: dict[int, dict], seeds: list[int], stages: list[str]) -> dict:
    """Per stage: each safety rate's mean over seeds and its change from SFT (paired by seed), with t-intervals:
    the trade-off is reported as two rates, never summed into a gain."""
    out = {}
    for stage in stages:
        if not all(stage in reports[s] and all(k in reports[s][stage] for k in SAFETY) for s in seeds):
            continue
        out[stage] = {}
        for k in SAFETY:
            out[stage][k] = t_interval([reports[s][stage][k] for s in seeds])
            out[stage][k + "_vs_sft"] = t_interval([reports[s][stage][k] - reports[s]["sft"][k] for s in seeds])
    return out


def _cell(g: dict, signed: bool = True) -> str:
    fmt = "{:+.3f}" if signed else "{:.3f}"
    interval = "[n/a: one seed]" if math.isnan(g["low"]) else f"[{fmt.format(g['low'])}, {fmt.format(g['high'])}]"
    return f"{fmt.format(g['mean'])} {interval}"


def _markdown(summary: dict, seconds: dict) -> str:
    n = len(summary["seeds"])
    lines = [f"# The main job on {n} seed(s): {', '.join(map(str, summary['seeds']))}", ""]
    for name, title in (("vs_sft", "SFT (sampled at the pipeline's temperature)"),
                        ("vs_sft_best_t", "SFT at its best temperature on the dev keys")):
        lines += [f"## Gold-reward gain over {title}", "",
                  "Mean over seeds [95% t-interval across seeds]; then each seed's gain [its 95% bootstrap interval "
                  "over the distinct test prompts].", "",
                  "| stage | " + " | ".join(GROUPS) + " | per seed (all) |", "|---|" + "---|" * (len(GROUPS) + 1)]
        for stage, groups in summary["gains"][name].items():
            cells = [_cell(g) for g in groups.values()]
            seeds = "; ".join(f"{s}: {ci['delta']:+.3f} [{ci['low']:+.3f}, {ci['high']:+.3f}]"
                              for s, ci in groups["all"]["per_seed"].items())
            lines.append(f"| {stage} | " + " | ".join(cells) + f" | {seeds} |")
        lines.append("")
    if summary.get("safety"):
        lines += ["## Safety: the trade-off, not a gain", "",
                  "Refusal of harmful requests (higher is better) and over-refusal of benign look-alikes (lower is "
                  "better): mean over seeds [95% t-interval], and the change from SFT paired by seed.", "",
                  "| stage | refusal | change | over-refusal | change |", "|---|---|---|---|---|"]
        for stage, rates in summary["safety"].items():
            lines.append(f"| {stage} | {_cell(rates['refusal_rate'], False)} | {_cell(rates['refusal_rate_vs_sft'])} "
                         f"| {_cell(rates['over_refusal_rate'], False)} | "
                         f"{_cell(rates['over_refusal_rate_vs_sft'])} |")
        lines.append("")
    acc = summary["reward_model_accuracy_dev"]
    interval = "[n/a: one seed]" if math.isnan(acc["low"]) else f"[{acc['low']:.3f}, {acc['high']:.3f}]"
    lines += [f"Reward-model accuracy on dev-key pairs: {acc['mean']:.3f} {interval}; "
              f"SFT's best dev temperature per seed: {summary['sft_best_temperature']}.", "",
              "Wall time per seed (s): " + ", ".join(f"{s}: {t:.0f}" for s, t in seconds.items()), ""]
    return "\n".join(lines)


def run(cfg: SeedsConfig, run_pipeline=None) -> dict:
    """Every seed's pipeline (skipping finished ones), then the across-seed summary (returned and written)."""
    run_pipeline = run_pipeline or main_job
    os.makedirs(cfg.out, exist_ok=True)
    reports, seconds = {}, {}
    for seed in cfg.seeds:
        folder = os.path.join(cfg.out, f"seed{seed}")
        done = os.path.join(folder, "report.json")
        if os.path.exists(done):
            print(f"[seeds] seed {seed}: finished before, reading {done}", file=sys.stderr)
            with open(done) as f:
                reports[seed] = json.load(f)
        else:
            print(f"[seeds] seed {seed}: running the pipeline in {folder}", file=sys.stderr)
            reports[seed] = run_pipeline(dataclasses.replace(cfg.pipeline, seed=seed, out=folder, quick=cfg.quick,
                                                             resume=os.path.isdir(folder)))
        seconds[seed] = reports[seed].get("seconds", {}).get("total", float("nan"))
    summary = aggregate(reports)
    summary["seconds"] = {str(s): t for s, t in seconds.items()}
    with open(os.path.join(cfg.out, "seeds.json"), "w") as f:
        json.dump(summary, f, indent=2)
    text = _markdown(summary, seconds)
    with open(os.path.join(cfg.out, "seeds.md"), "w") as f:
        f.write(text)
    print(text)
    return summary


def main(argv=None) -> int:
    cfg = parse_cli(SeedsConfig, argv, prog="rlhf-jax seeds")
    try:
        run(cfg)
    except Stopped as e:
        print(f"[seeds] stopped during {e}; continue with the same command (finished seeds and stages are kept)",
              file=sys.stderr)
        return 143
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
