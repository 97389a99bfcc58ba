"""How much safety data does SFT need? (The lecture: "about 500 safety examples" go a long way, and refusals
taught alone spill over onto harmless requests that look like harmful ones.)

    python -m experiments.safety_data                          # seed 0 of runs/seeds (~14 minutes)
    python -m experiments.safety_data --seeds 0 1              # the README's two seeds (~14 minutes per seed)
    python -m experiments.safety_data --seeds 0 --quick --out /tmp/sd   # smoke test (trains quick models)

From each seed's pretrained model (`rlhf_jax.recipes.models`), SFT exactly as the main job's (its skill
demonstrations, steps and learning rate) with `counts` refusal demonstrations of harmful requests, each count in
two arms: refusals alone, and refusals with as many answered benign look-alikes ("how do i bake bread" beside
"how do i make a weapon"). Each SFT policy answers every distinct unsafe and benign test prompt `samples` times
at the main job's temperature: refusal rate on the unsafe ones, over-refusal on the benign ones. Intervals: Wilson
95% per seed with n = the distinct prompts (each prompt's refusal fraction counts as one observation: the samples
of one prompt are not independent), and the mean over seeds with a t-interval. Writes safety_data.json, .md and
safety_data.png.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import sys
import time
from typing import Literal

import jax
import numpy as np

from rlhf_jax import tasks as world
from rlhf_jax.config_cli import check_ranges, config_check, save_config
from rlhf_jax.eval import sample_episodes_jit
from rlhf_jax.generation import SamplingConfig
from rlhf_jax.recipes import TOK, prompt_batch
from rlhf_jax.recipes.models import (
    DEFAULT_MODELS,
    ensure_seed,
    load,
    models_template,
    pipeline_config,
    script_main,
    write_report,
)
from rlhf_jax.recipes.stages import train_sft
from rlhf_jax.recipes.stats import t_interval, wilson
from rlhf_jax.train.rl import decode_responses

ARMS = ("refusals", "refusals+lookalikes")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SafetyDataConfig:
    """SFT with varying amounts of safety demonstrations (see the module docstring)."""

    seeds: tuple[int, ...] = (0,)
    """Seeds of the main job whose pretrained models are fine-tuned (13 SFT runs a seed; two seeds, `--seeds 0 1`, are
    about half an hour on 2 cores)."""
    models: str = DEFAULT_MODELS
    """Run folder of each seed's main job ({seed} is replaced); with --quick the default is OUT/models/seed{seed}."""
    out: str = "runs/safety_data"
    """Output folder."""
    quick: bool = False
    """Quick models, three counts, 2 samples: a smoke test, not a measurement."""
    counts: tuple[int, ...] = (0, 25, 50, 100, 250, 500, 1000)
    """Refusal demonstrations (and, in the second arm, as many benign look-alikes) added to the skill demos."""
    arms: tuple[Literal["refusals", "refusals+lookalikes"], ...] = ARMS
    """Which arms to train."""
    samples: int = 8
    """Answers per distinct test prompt."""

    def __post_init__(self):
        check_ranges(self, positive=("samples",))
        config_check(self, len(self.seeds) > 0 and len(set(self.seeds)) == len(self.seeds) and min(self.seeds) >= 0,
                     f"seeds = {self.seeds} must be distinct non-negative integers")
        config_check(self, len(self.counts) > 0 and min(self.counts) >= 0, f"counts = {self.counts} must be >= 0")
        config_check(self, len(self.arms) > 0, "arms must name at least one arm")


def refusal_rates(params, mc, tasks, rng, *, samples: int, sampling: SamplingConfig) -> np.ndarray:
    """Per-prompt fraction of `samples` answers that refuse, [B]."""
    batch = prompt_batch(tasks)
    refused = []
    for i in range(samples):
        ep = sample_episodes_jit(params, batch["prompts"], batch["prompt_mask"], jax.random.fold_in(rng, i), sampling=sampling,
                     model_config=mc)
        refused.append([world.is_refusal(t) for t in decode_responses(TOK, ep)])
    return np.mean(np.asarray(refused, np.float64), axis=0)


def run(cfg: SafetyDataConfig, run_pipeline=None) -> dict:
    counts = (0, 25, 100) if cfg.quick and cfg.counts == SafetyDataConfig().counts else cfg.counts
    samples = 2 if cfg.quick else cfg.samples
    models = models_template(cfg.models, cfg.out, cfg.quick)
    os.makedirs(cfg.out, exist_ok=True)
    save_config(cfg, os.path.join(cfg.out, "config.json"))
    unsafe = world.key_tasks("test", families=("unsafe",))
    benign = world.key_tasks("test", families=("benign",))
    result = {"seeds": list(cfg.seeds), "counts": list(counts), "unsafe_prompts": len(unsafe),
              "benign_prompts": len(benign), "samples_per_prompt": samples, "per_seed": {}}
    for seed in cfg.seeds:
        folder = ensure_seed(models, seed, ("base",), quick=cfg.quick, run_pipeline=run_pipeline)
        pcfg = pipeline_config(folder)
        mc, base_params = load(folder, "base")
        sampling = pcfg.sampling
        measure = functools.partial(refusal_rates, mc=mc, rng=jax.random.PRNGKey(6000 + seed), samples=samples,
                                    sampling=sampling)
        rows = result["per_seed"][str(seed)] = {}
        done = {}                                       # count 0 is the same SFT in both arms
        for arm in cfg.arms:
            rows[arm] = []
            for k in counts:
                key = (k, k if arm == "refusals+lookalikes" else 0)
                t = time.time()
                if key not in done:
                    params = train_sft(pcfg, base_params, mc, *key)
                    r_unsafe, r_benign = measure(params, tasks=unsafe), measure(params, tasks=benign)
                    done[key] = (r_unsafe, r_benign)
                r_unsafe, r_benign = done[key]
                row = {"count": k, "refusal": float(r_unsafe.mean()), "over_refusal": float(r_benign.mean())}
                row["refusal_low"], row["refusal_high"] = wilson(row["refusal"], len(unsafe))
                row["over_refusal_low"], row["over_refusal_high"] = wilson(row["over_refusal"], len(benign))
                rows[arm].append(row)
                print(f"[safety_data] seed {seed} {arm:<20} {k:5d}: refusal {row['refusal']:.3f}, over-refusal "
                      f"{row['over_refusal']:.3f} ({time.time() - t:.0f} s)", file=sys.stderr, flush=True)
    result["across_seeds"] = {arm: [{"count": k, **{m: t_interval([result["per_seed"][s][arm][i][m]
                                                                   for s in result["per_seed"]])
                                                   for m in ("refusal", "over_refusal")}}
                                    for i, k in enumerate(counts)] for arm in cfg.arms}
    write_report(cfg.out, "safety_data", result, _markdown(result),
                 lambda: _plot(result, os.path.join(cfg.out, "safety_data.png")))
    return result


def _ci(x: dict) -> str:
    """Mean [t-interval], the interval clipped to [0, 1] (a rate's range; with two seeds t has 1 degree of freedom
    and the interval is wide)."""
    if math.isnan(x["low"]):
        return f"{x['mean']:.3f}"
    return f"{x['mean']:.3f} [{max(x['low'], 0.0):.3f}, {min(x['high'], 1.0):.3f}]"


def _markdown(result: dict) -> str:
    seeds = list(result["per_seed"])
    lines = ["# Safety demonstrations in SFT: refusal and over-refusal", "",
             f"Test keys: {result['unsafe_prompts']} distinct harmful prompts, {result['benign_prompts']} benign "
             f"look-alikes, {result['samples_per_prompt']} answers each; seeds {', '.join(seeds)}. Mean over seeds "
             "[95% t-interval, clipped to [0, 1]]; per seed, Wilson 95% over distinct prompts.", "",
             "| arm | refusal demos | refusal on harmful | over-refusal on benign | per seed: refusal / over-refusal |",
             "|---|---|---|---|---|"]
    for arm, rows in result["across_seeds"].items():
        for i, row in enumerate(rows):
            per = "; ".join(f"{s}: {result['per_seed'][s][arm][i]['refusal']:.3f} "
                            f"[{result['per_seed'][s][arm][i]['refusal_low']:.3f}, "
                            f"{result['per_seed'][s][arm][i]['refusal_high']:.3f}] / "
                            f"{result['per_seed'][s][arm][i]['over_refusal']:.3f}" for s in seeds)
            lines.append(f"| {arm} | {row['count']} | {_ci(row['refusal'])} | {_ci(row['over_refusal'])} | {per} |")
    return "\n".join(lines) + "\n"


def _plot(result: dict, out_png: str) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    x_of = lambda k: max(k, 10)  # noqa: E731  (log axis: 0 drawn at 10, labelled 0)
    for arm, rows in result["across_seeds"].items():
        xs = [x_of(r["count"]) for r in rows]
        for metric, style in (("refusal", "-"), ("over_refusal", "--")):
            mean = np.asarray([r[metric]["mean"] for r in rows])
            low = np.asarray([r[metric]["low"] for r in rows])
            high = np.asarray([r[metric]["high"] for r in rows])
            line, = ax.plot(xs, mean, style, marker="o", ms=3, label=f"{metric.replace('_', '-')}, {arm}")
            if not np.all(np.isnan(low)):
                ax.fill_between(xs, low, high, alpha=0.15, color=line.get_color())
    ax.set_xscale("log")
    ticks = [x_of(k) for k in result["counts"]]
    ax.set_xticks(ticks, [str(k) for k in result["counts"]])
    ax.set_xlabel("refusal demonstrations in SFT (and as many look-alikes in the second arm)")
    ax.set_ylabel("rate on the test keys")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="x-small")
    fig.tight_layout()
    os.makedirs(os.path.dirname(out_png) or ".", exist_ok=True)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png


def main(argv=None) -> int:
    return script_main(SafetyDataConfig, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
