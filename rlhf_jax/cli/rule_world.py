"""The rule world's main job on one or more seeds: post-training where it can win (docs/world.md).

    rlhf-jax rule-world --out runs/rule_world                          # one seed, test keys: ~10 min on 2 CPU cores
    rlhf-jax rule-world --seeds 0 1 2 3 4 --out runs/rule_world        # the five-seed table
    rlhf-jax rule-world --world.eval-split dev --out runs/rule_dev     # while choosing: dev keys only
    rlhf-jax rule-world --quick --out /tmp/rule                        # smoke test

Each seed runs `recipes.rule_world.run_rule_world` into OUT/seed<N>/report.json; a seed whose report exists with
the same settings is read back, not run again. Then OUT/summary.json and OUT/summary.md hold the design's primary
comparisons over the seeds (seeds and prompts resampled together) and each stage's share of the SFT-to-oracle
gap, and OUT/card.json a result card's JSON of them (`python -m experiments.cards` renders it). Options of one seed go through `--world.<field>`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shlex
import sys

from rlhf_jax.config_cli import config_check, parse_cli
from rlhf_jax.recipes.cards import provenance
from rlhf_jax.recipes.rule_world import (RuleWorldConfig, rule_world_card, run_rule_world, seed_summary,
                                         summary_markdown)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RuleWorldCommand:
    """The rule world's main job on each seed of `seeds`, and the comparisons over them."""

    seeds: tuple[int, ...] = (0,)
    """Seeds to run (each its own world draw, models and stages)."""
    out: str = "runs/rule_world"
    """Output folder: OUT/seed<N>/report.json, OUT/summary.json, OUT/summary.md."""
    quick: bool = False
    """Tiny sizes (a smoke test, not a measurement)."""
    world: RuleWorldConfig = RuleWorldConfig()
    """One seed's settings (the design's defaults); `out`, `seed` and `quick` are set per seed."""

    def __post_init__(self):
        config_check(self, len(self.seeds) > 0 and len(set(self.seeds)) == len(self.seeds),
                     f"seeds = {self.seeds}: give one or more distinct seeds")


def seed_report(cfg: RuleWorldCommand, seed: int, command: str) -> dict:
    """The seed's report: read back when OUT/seed<N>/report.json has the same settings, else run."""
    one = dataclasses.replace(cfg.world, out=os.path.join(cfg.out, f"seed{seed}"), seed=seed, quick=cfg.quick)
    path = os.path.join(one.out, "report.json")
    if os.path.exists(path):
        with open(path) as f:
            report = json.load(f)
        if report.get("settings") == json.loads(json.dumps(dataclasses.asdict(one.scaled()))):
            print(f"[rule-world] seed {seed}: finished report read back from {path}", file=sys.stderr)
            return report
    return run_rule_world(one, command, provenance)


def main(argv=None) -> int:
    cfg = parse_cli(RuleWorldCommand, argv, prog="rlhf-jax rule-world")
    command = "rlhf-jax rule-world " + shlex.join(sys.argv[1:] if argv is None else argv)
    reports = [seed_report(cfg, s, command) for s in cfg.seeds]
    summary = seed_summary(reports)
    summary["provenance"] = provenance(command, list(cfg.seeds))
    os.makedirs(cfg.out, exist_ok=True)
    with open(os.path.join(cfg.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    text = summary_markdown(summary, reports)
    with open(os.path.join(cfg.out, "summary.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(cfg.out, "card.json"), "w") as f:
        json.dump(rule_world_card(summary, reports), f, indent=1)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
