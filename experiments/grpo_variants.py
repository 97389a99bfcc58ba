"""GRPO, Dr. GRPO, DAPO and RLOO on the same budget, against the gold reward (issue 17's comparison).

    python -m experiments.grpo_variants --seeds 0 1 2              # ~15 min a seed once the main job's models exist
    python -m experiments.grpo_variants --quick --out /tmp/gv      # smoke test (trains quick models)

From each seed's SFT policy (`rlhf_jax.recipes.models`), the main job's GRPO stage in the shape its run folder
records (since session 15: 32 train-key prompts x 8 answers an iteration in one update; session 13's figures:
16 x 4 in 2 passes x 4 minibatches; 40 iterations, lr 3e-5, the gold reward as a verifier) with one named
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
import numpy as np

from rlhf_jax import recipes
from rlhf_jax.config_cli import check_ranges, config_check, save_config
from rlhf_jax.generation import SamplingConfig
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
from rlhf_jax.recipes.populations import test_evaluator, test_tasks
from rlhf_jax.recipes.stats import across_seeds, fmt_interval

VARIANTS = {
    "grpo": {},
    "dr_grpo": {"pipeline": {"grpo_scale": "none", "grpo_loss_type": "dr_grpo"}},
    "dapo": {"pipeline": {"grpo_loss_type": "dapo", "grpo_clip_eps_high": 0.28, "grpo_kl_coef": 0.0},
             "oversample": 2, "overlong_buffer": 6},
    "rloo": {"pipeline": {"grpo_advantage": "rloo"}},
}
"""Each variant's changes to the main job's GRPO settings (PipelineConfig fields; DAPO's dynamic sampling factor
and overlong buffer)."""
METRICS = ("gold_reward", "gold/skills", "gold/safety", "mean_length", "kl_to_ref", "refusal_rate",
           "over_refusal_rate")


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


def variant_config(pcfg, name: str, sampling: SamplingConfig):
    """(PipelineConfig, GRPOConfig) of a variant: the main job's GRPO with the variant's changes."""
    spec = VARIANTS[name]
    cfg = dataclasses.replace(pcfg, **spec.get("pipeline", {}))
    grpo_cfg = recipes.grpo_config(cfg, sampling)
    if "oversample" in spec:
        grpo_cfg = dataclasses.replace(grpo_cfg, batch_size=cfg.grpo_prompts * spec["oversample"],
                                       dynamic_sampling_groups=cfg.grpo_prompts)
    if "overlong_buffer" in spec:
        grpo_cfg = dataclasses.replace(grpo_cfg, overlong_buffer=spec["overlong_buffer"])
    return cfg, grpo_cfg


def train_variant(pcfg, name: str, mc, sft_params):
    """(params, history) of the main job's GRPO stage with variant `name`'s changes (its key and prompts)."""
    sampling = SamplingConfig(max_new_tokens=pcfg.max_new_tokens, temperature=pcfg.temperature,
                              eos_id=recipes.TOK.eos_id, pad_id=recipes.TOK.pad_id)
    return recipes.train_grpo(*variant_config(pcfg, name, sampling), mc, sft_params)


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
        evaluate = test_evaluator(mc, pcfg.max_new_tokens, samples, pcfg.temperature,
                                  prompts=64 if cfg.quick else None)
        rng = jax.random.PRNGKey(8000 + seed)
        metrics, sft_gold = evaluate(sft_params, ref_params=sft_params, rng=rng)
        rows = {"sft": _scalars(metrics)}
        vs, train = {}, {}
        for name in VARIANTS:
            t = time.time()
            if name == "grpo":
                params, history = load(folder, "grpo")[1], None       # the main job's own stage
            else:
                params, history = train_variant(pcfg, name, mc, sft_params)
            metrics, gold = evaluate(params, ref_params=sft_params, rng=rng)
            rows[name] = _scalars(metrics)
            vs[name] = recipes.compare_to(evaluate, tasks, gold, sft_gold, seed)
            if history:
                train[name] = _train_summary(history)
            _log(f"seed {seed} {name}: gold {rows[name]['gold_reward']:.3f} (SFT {rows['sft']['gold_reward']:.3f}), "
                 f"KL {rows[name]['kl_to_ref']:.2f}, length {rows[name]['mean_length']:.1f} "
                 f"({time.time() - t:.0f} s)")
        result["per_seed"][str(seed)] = {"rows": rows, "vs_sft": vs, "train": train, "seconds": time.time() - t0}
        with open(path, "w") as f:                   # after every seed: a stopped run keeps what it measured
            json.dump(result, f, indent=2)
    result["across_seeds"] = across_seeds({s: r["rows"] for s, r in result["per_seed"].items()}, ("sft", *VARIANTS),
                                          METRICS, "sft")
    write_report(cfg.out, "grpo_variants", result, _markdown(result), lambda: _plot(result, cfg.out))
    return result


def _scalars(metrics: dict) -> dict:
    return {k: float(v) for k, v in metrics.items() if np.ndim(v) == 0 and not isinstance(v, str)}


def _train_summary(history: list[dict]) -> dict:
    """The training batches' mean gold reward at the first and the last log (each a mean over `log_every`
    iterations), the share of groups with equal rewards, and the share of informative groups DAPO sampled."""
    out = {"reward_first": float(history[0]["reward"]), "reward_last": float(history[-1]["reward"]),
           "frac_reward_zero_std": float(np.mean([h["frac_reward_zero_std"] for h in history]))}
    key = "dynamic_sampling/informative_fraction"
    if key in history[0]:
        out["informative_fraction"] = float(np.mean([h[key] for h in history]))
    return out


def _markdown(result: dict) -> str:
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


def _plot(result: dict, out: str) -> None:
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


def main(argv=None) -> int:
    return script_main(GRPOVariantsConfig, run, argv)


if __name__ == "__main__":
    sys.exit(main())
