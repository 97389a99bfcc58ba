"""GRPO, Dr. GRPO, DAPO and RLOO on the same budget, against the gold reward.

    python -m experiments.grpo_variants --seeds 0 1 2              # ~15 min a seed once the main job's models exist
    python -m experiments.grpo_variants --quick --out /tmp/gv      # smoke test (trains quick models)

From each seed's SFT policy (`rlhf_jax.recipes.models`), the main job's GRPO stage in the shape its run folder
records (by default 32 train-key prompts x 8 answers an iteration in one update, 40 iterations, lr 3e-5, the
gold reward as a verifier) with one named
component changed at a time:

* "grpo": the main job's own stage (group-normalised advantages, per-sequence token mean, k3 KL 0.04 in the loss;
  DeepSeekMath), loaded, not retrained;
* "dr_grpo": no std division and a constant normaliser (Liu et al. 2025, "Understanding R1-Zero-Like Training");
* "dapo": token-level loss, clip-higher 0.28, no KL, dynamic sampling (twice the prompts sampled, the most
  informative half of the groups updated) and the soft overlong penalty over the last 6 bytes (Yu et al. 2025);
* "rloo": leave-one-out advantages (Ahmadian et al. 2024), the rest as "grpo".

Every variant makes the same number of updates on the same number of answers (DAPO samples twice as many and
keeps half). Scored on every distinct test-key prompt (`eval_samples` answers at the main job's temperature): gold
reward, skills and safety, length, KL to SFT, with the paired bootstrap against SFT per seed and t-intervals
across seeds. Finished seeds are kept in grpo_variants.json and reused by a rerun with the same settings. Writes
grpo_variants.json, .md and .png.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import jax

from rlhf_jax import recipes
from rlhf_jax.config_cli import check_ranges, config_check, save_config
from rlhf_jax.recipes import grpo_variants as gv
from rlhf_jax.recipes.grpo_variants import VARIANTS
from rlhf_jax.recipes.models import (
    DEFAULT_MODELS,
    ensure_seed,
    kept_seeds,
    load,
    models_template,
    pipeline_config,
    script_main,
    write_report,
)
from rlhf_jax.recipes.evaluate import test_evaluator, test_tasks
from rlhf_jax.recipes.stats import across_seeds


@dataclasses.dataclass(frozen=True, kw_only=True)
class GRPOVariantsConfig:
    """GRPO, Dr. GRPO, DAPO and RLOO from the main job's SFT policy (see the module docstring)."""

    seeds: tuple[int, ...] = (0,)
    """Seeds of the main job whose SFT policy (and GRPO stage) are used."""
    models: str = DEFAULT_MODELS
    """Run folder of each seed's main job ({seed} is replaced); with --quick the default is OUT/models/seed{seed}."""
    out: str = "runs/grpo_variants"
    """Output folder."""
    quick: bool = False
    """Quick models, 2 answers on 64 prompts: a smoke test, not a measurement."""
    eval_samples: int = 8
    """Answers per test prompt (the main job's eval_samples)."""

    def __post_init__(self):
        check_ranges(self, positive=("eval_samples",))
        config_check(self, len(self.seeds) > 0 and len(set(self.seeds)) == len(self.seeds) and min(self.seeds) >= 0,
                     f"seeds = {self.seeds} must be distinct non-negative integers")


def _log(msg: str) -> None:
    print(f"[grpo_variants] {msg}", file=sys.stderr, flush=True)


def run(cfg: GRPOVariantsConfig, run_pipeline=None) -> dict:
    models = models_template(cfg.models, cfg.out, cfg.quick)
    os.makedirs(cfg.out, exist_ok=True)
    save_config(cfg, os.path.join(cfg.out, "config.json"))
    tasks, samples = test_tasks(64 if cfg.quick else None), 2 if cfg.quick else cfg.eval_samples
    settings = {"models": models, "quick": cfg.quick, "eval_samples": samples, "variants": VARIANTS}
    path = os.path.join(cfg.out, "grpo_variants.json")
    done = kept_seeds(path, settings)
    result = {"settings": settings, "seeds": list(cfg.seeds), "prompts": len(tasks), "per_seed": {}}
    for seed in cfg.seeds:
        if str(seed) in done:
            _log(f"seed {seed}: kept from {path}")
            result["per_seed"][str(seed)] = done[str(seed)]
            continue
        t0 = time.time()
        folder = ensure_seed(models, seed, ("sft", "grpo"), quick=cfg.quick, run_pipeline=run_pipeline)
        pcfg = pipeline_config(folder)
        mc, sft_params = load(folder, "sft")
        evaluate = test_evaluator(mc, pcfg.sampling.max_new_tokens, samples, pcfg.sampling.temperature,
                                  prompts=64 if cfg.quick else None)
        rng = jax.random.PRNGKey(8000 + seed)
        metrics, sft_gold = evaluate(sft_params, ref_params=sft_params, rng=rng)
        rows = {"sft": gv.scalars(metrics)}
        vs, train = {}, {}
        for name in VARIANTS:
            t = time.time()
            if name == "grpo":
                params, history = load(folder, "grpo")[1], None       # the main job's own stage
            else:
                params, history = gv.train_variant(pcfg, name, mc, sft_params)
            metrics, gold = evaluate(params, ref_params=sft_params, rng=rng)
            rows[name] = gv.scalars(metrics)
            vs[name] = recipes.compare_to(evaluate, tasks, gold, sft_gold, seed)
            if history:
                train[name] = gv.train_summary(history)
            _log(f"seed {seed} {name}: gold {rows[name]['gold_reward']:.3f} (SFT {rows['sft']['gold_reward']:.3f}), "
                 f"KL {rows[name]['kl_to_ref']:.2f}, length {rows[name]['mean_length']:.1f} "
                 f"({time.time() - t:.0f} s)")
        result["per_seed"][str(seed)] = {"rows": rows, "vs_sft": vs, "train": train, "seconds": time.time() - t0}
        with open(path, "w") as f:                   # after every seed: a stopped run keeps what it measured
            json.dump(result, f, indent=2)
    result["across_seeds"] = across_seeds({s: r["rows"] for s, r in result["per_seed"].items()}, ("sft", *VARIANTS),
                                          gv.METRICS, "sft")
    write_report(cfg.out, "grpo_variants", result, gv.markdown(result), lambda: gv.plot(result, cfg.out))
    return result


def main(argv=None) -> int:
    return script_main(GRPOVariantsConfig, run, argv)


if __name__ == "__main__":
    sys.exit(main())
