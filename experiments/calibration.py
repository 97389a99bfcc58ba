"""Calibration after RLHF: is a policy's probability of its own answer the chance that the answer is right?

    python -m experiments.calibration                        # seeds 0 1 2 of runs/seeds (~4 minutes once trained)
    python -m experiments.calibration --seeds 0 --quick --out /tmp/cal   # smoke test (trains quick models)

On the checkable families (add, reverse, sort, count, lookup, upper) of the test keys, each policy of the main
job (base, SFT, PPO, DPO, GRPO) answers every distinct prompt `samples` times at temperature 1. An answer's
confidence is its sequence probability under the policy, exp(sum_t log pi(y_t | x, y_<t)), and it is correct when
its extracted answer is exactly the key's (`tasks.answer_credit` = 1; the length penalty plays no part). The
report: expected calibration error over 10 equal-width bins (`rlhf_jax.eval.expected_calibration_error`) with a
bootstrap interval over distinct prompts, per seed; the mean over seeds with a t-interval, and each stage's ECE
minus SFT's likewise; accuracy, mean confidence, their gap (positive: over-confident) and the Brier score; a
reliability diagram per stage, seeds pooled (reliability.png).

The lecture's claim (GPT-4 technical report, fig. 8): the pretrained model is well calibrated and RLHF hurts its
calibration. Here the "pretrained" model answers in the chat format only as often as the web corpus does, so its
sequence probabilities also spread over chatter; read its row with that in mind. Models come from
`rlhf_jax.recipes.models` (the seed driver's run folders; a missing one is trained there first).
"""
from __future__ import annotations

import dataclasses
import math
import os
import sys
from typing import Literal

import jax
import numpy as np

from rlhf_jax import tasks as world
from rlhf_jax.config_cli import check_ranges, config_check, save_config
from rlhf_jax.eval import reliability_bins
from rlhf_jax.generation import SamplingConfig
from rlhf_jax.recipes import CONTROLS, FAMILY, TOK
from rlhf_jax.recipes import calibration as cal
from rlhf_jax.recipes.calibration import STAGES
from rlhf_jax.recipes.models import (
    DEFAULT_MODELS,
    ensure_seed,
    load,
    models_template,
    script_main,
    write_report,
)
from rlhf_jax.recipes.stats import t_interval


@dataclasses.dataclass(frozen=True, kw_only=True)
class CalibrationConfig:
    """Calibration of the main job's policies on the checkable families (see the module docstring)."""

    seeds: tuple[int, ...] = (0, 1, 2)
    """Seeds of the main job whose policies are measured."""
    models: str = DEFAULT_MODELS
    """Run folder of each seed's main job ({seed} is replaced); with --quick the default is OUT/models/seed{seed}."""
    out: str = "runs/calibration"
    """Output folder: calibration.json, calibration.md, reliability.png."""
    quick: bool = False
    """Quick models and 2 samples per prompt: a smoke test, not a measurement."""
    stages: tuple[str, ...] = STAGES
    """Policies measured (folders of the run)."""
    split: Literal["test", "dev"] = "test"
    """Key split whose distinct prompts are answered."""
    samples: int = 8
    """Answers per distinct prompt."""
    temperature: float = 1.0
    """Sampling temperature; the confidence is the probability at this temperature."""
    num_bins: int = 10
    """Equal-width confidence bins of the ECE and the diagram."""
    bootstrap: int = 1000
    """Bootstrap replicates (resampling distinct prompts) of each seed's ECE interval."""
    max_new_tokens: int = 28
    """Answer budget (the main job's)."""

    def __post_init__(self):
        check_ranges(self, positive=("samples", "temperature", "num_bins", "bootstrap", "max_new_tokens"))
        config_check(self, len(self.seeds) > 0 and len(set(self.seeds)) == len(self.seeds) and min(self.seeds) >= 0,
                     f"seeds = {self.seeds} must be distinct non-negative integers")
        config_check(self, "sft" in self.stages, "stages must include sft (the reference of every difference)")
        unknown = set(self.stages) - {"base", "sft", "ppo", "dpo", "grpo", *_extra_stages()}
        config_check(self, not unknown, f"stages: unknown {sorted(unknown)}; known: {', '.join(STAGES)} and the "
                                        f"pipeline's optional stages")


def _extra_stages() -> tuple[str, ...]:
    return (*CONTROLS, *FAMILY)


def run(cfg: CalibrationConfig, run_pipeline=None) -> dict:
    models = models_template(cfg.models, cfg.out, cfg.quick)
    samples = 2 if cfg.quick else cfg.samples
    os.makedirs(cfg.out, exist_ok=True)
    save_config(cfg, os.path.join(cfg.out, "config.json"))
    tasks = world.key_tasks(cfg.split, families=world.SKILL_FAMILIES)
    per_seed, pooled = {}, {s: ([], []) for s in cfg.stages}
    for seed in cfg.seeds:
        folder = ensure_seed(models, seed, cfg.stages, quick=cfg.quick, run_pipeline=run_pipeline)
        per_seed[str(seed)] = {}
        for stage in cfg.stages:
            mc, params = load(folder, stage)
            sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                      eos_id=TOK.eos_id, pad_id=TOK.pad_id)
            # One rng per seed: every stage answers with the same random numbers.
            conf, ok, _ = cal.answers(params, mc, tasks, jax.random.PRNGKey(1000 + seed), samples=samples,
                                  sampling=sampling)
            per_seed[str(seed)][stage] = cal.summarise(conf, ok, num_bins=cfg.num_bins, bootstrap=cfg.bootstrap,
                                                   seed=seed)
            pooled[stage][0].append(conf.reshape(-1))
            pooled[stage][1].append(ok.reshape(-1))
            s = per_seed[str(seed)][stage]
            print(f"[calibration] seed {seed} {stage:<6} ECE {s['ece']:.3f} [{s['ece_low']:.3f}, {s['ece_high']:.3f}]"
                  f"  accuracy {s['accuracy']:.3f}  confidence {s['confidence']:.3f}", file=sys.stderr, flush=True)
    seeds = list(per_seed)
    summary = {"seeds": [int(s) for s in seeds], "split": cfg.split, "distinct_prompts": len(tasks),
               "samples_per_prompt": samples, "temperature": cfg.temperature, "per_seed": per_seed,
               "across_seeds": {}, "pooled_bins": {}}
    for stage in cfg.stages:
        row = {k: t_interval([per_seed[s][stage][k] for s in seeds])
               for k in ("ece", "accuracy", "confidence", "overconfidence", "brier")}
        row["ece_minus_sft"] = t_interval([per_seed[s][stage]["ece"] - per_seed[s]["sft"]["ece"] for s in seeds])
        summary["across_seeds"][stage] = row
        bins = reliability_bins(np.concatenate(pooled[stage][0]), np.concatenate(pooled[stage][1]),
                                num_bins=cfg.num_bins)
        summary["pooled_bins"][stage] = {k: [None if math.isnan(x) else float(x) for x in v] for k, v in bins.items()}
    write_report(cfg.out, "calibration", summary, cal.markdown(summary),
                 lambda: cal.plot(summary, os.path.join(cfg.out, "reliability.png")))
    return summary


def main(argv=None) -> int:
    return script_main(CalibrationConfig, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
