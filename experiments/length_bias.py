"""Length bias: annotators who like longer answers, the reward model that learns it, and the policies that follow.

    python -m experiments.length_bias                        # seed 0 of runs/seeds (17 min alone on 2 cores)
    python -m experiments.length_bias --quick --out /tmp/lb  # smoke test (trains quick models)

The lecture cites human and model raters preferring the longer of two answers 60-70% of the time (Singhal et al.
2023, "A Long Way to Go"). From the main job's SFT policy (`rlhf_jax.recipes.models`; a missing seed is trained
first), for each population of `populations` (the main job's "careful" one and the "length-loving" one):

1. Labels: how often it prefers the longer of two SFT answers to a preference prompt (all pairs of different
   length, and those of equal gold, where only length separates them for a careful labeller).
2. A reward model on its labels (the main job's step 4), scored on dev-key pairs (prompts no training saw): its
   agreement with the gold reward and how often it prefers the longer of two answers of equal gold; beside it the
   length-only reward model r(x, y) = len(y): its accuracy on the population's held-out labels against the learned
   model's.
3. PPO against that reward model and the main job's DPO on those labels, both from SFT with room to grow
   (`max_new_tokens` above the main job's 28): gold reward, proxy score, length and KL to SFT on every distinct
   test-key prompt against training step.

With several seeds: each seed's numbers are saved as it finishes and reused by a later run with the same settings,
and the summary gives the mean over seeds with a t-interval and each population's difference from the careful
one, paired by seed. Writes length_bias.json, length_bias.md and length_bias.png (per seed) and
length_bias_seeds.png (several seeds) to --out.
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
from rlhf_jax import tasks as world
from rlhf_jax.config_cli import check_ranges, config_check, save_config
from rlhf_jax.generation import SamplingConfig
from rlhf_jax.recipes import TOK
from rlhf_jax.recipes import populations as pop
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
from rlhf_jax.recipes.stages import EvalCurve
from rlhf_jax.recipes.stats import across_seeds, fmt_interval
from rlhf_jax.tasks.annotators import ANNOTATORS
from rlhf_jax.train import stages
from rlhf_jax.train.optim import OptimConfig
from rlhf_jax.train.ppo import init_ppo_state


@dataclasses.dataclass(frozen=True, kw_only=True)
class LengthBiasConfig:
    """Labels, reward models, PPO and DPO of a careful and a length-loving population (see the module docstring)."""

    seeds: tuple[int, ...] = (0,)
    """Seeds of the main job (each: its SFT policy and its preference prompts)."""
    models: str = DEFAULT_MODELS
    """Run folder of each seed's main job ({seed} is replaced); with --quick the default is OUT/models/seed{seed}."""
    out: str = "runs/length_bias"
    """Output folder."""
    quick: bool = False
    """Quick models and a few steps: a smoke test, not a measurement."""
    populations: tuple[str, ...] = ("careful", "length-loving")
    """Annotator populations (rlhf_jax.tasks.ANNOTATORS) whose labels train a reward model, PPO and DPO."""
    max_new_tokens: int = 48
    """Response budget of PPO's rollouts and of every evaluation (the main job's is 28; 48 is what the prompt
    positions leave within the pretraining length of 96)."""
    ppo_iterations: int = 40
    """PPO iterations (64 rollouts each, the main job's batch)."""
    ppo_kl_coef: float = 0.05
    """PPO's KL penalty (k1 in the reward), below the main job's 0.2, without PPO-ptx: room for the policy to move.
    Chosen before any run, not tuned."""
    ppo_lr: float = 1.5e-5
    """PPO's learning rate (the main job's)."""
    eval_every: int = 10
    """PPO iterations between evaluations (besides 1, 2, 4, 8); DPO is evaluated every `dpo_eval_every` steps."""
    dpo_eval_every: int = 25
    """DPO steps between evaluations."""
    eval_samples: int = 4
    """Answers per distinct test-key prompt in each evaluation (temperature 0.7, the main job's)."""
    eval_prompts: int | None = None
    """Evaluate on the first N distinct test-key prompts of a fixed shuffle (None: all 241)."""

    def __post_init__(self):
        check_ranges(self, positive=("max_new_tokens", "ppo_iterations", "ppo_lr", "eval_every", "dpo_eval_every",
                                     "eval_samples", "eval_prompts"), non_negative=("ppo_kl_coef",))
        config_check(self, len(self.seeds) > 0 and len(set(self.seeds)) == len(self.seeds) and min(self.seeds) >= 0,
                     f"seeds = {self.seeds} must be distinct non-negative integers")
        config_check(self, len(self.populations) > 0 and all(p in ANNOTATORS for p in self.populations),
                     f"populations = {self.populations} must name annotators of {sorted(ANNOTATORS)}")
        config_check(self, self.max_new_tokens <= 56, f"max_new_tokens = {self.max_new_tokens} must be <= 56 (a "
                     "prompt of up to 40 bytes plus the answer must fit the 96 positions pretraining trained)")

    def scaled(self) -> "LengthBiasConfig":
        if not self.quick:
            return self
        return dataclasses.replace(self, populations=("length-loving",), ppo_iterations=2, eval_every=2, dpo_eval_every=10, eval_samples=1,
                                   eval_prompts=24)


class _StyleCurve(EvalCurve):
    """`EvalCurve` plus the style metrics (format, pet phrase) and the skills/safety gold of each evaluation."""

    def record(self, step, params):
        point = {"iteration": step}
        for name, ev in self.evaluators.items():
            m, _ = ev(params, **self.kwargs)
            point[name] = {"gold": m["gold_reward"], "proxy": m["rm_score"], "kl": m["kl_to_ref"],
                           "length": m["mean_length"], "refusal": m["refusal_rate"],
                           "over_refusal": m["over_refusal_rate"], "format": m["format_rate"],
                           "phrase": m["phrase_rate"], "gold_skills": m["gold/skills"],
                           "gold_safety": m["gold/safety"]}
        self.points.append(point)


def _ppo(cfg, pcfg, sft_params, mc, rm, evaluator, seed) -> list[dict]:
    sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=pcfg.temperature, eos_id=TOK.eos_id,
                              pad_id=TOK.pad_id)
    ppo_cfg = dataclasses.replace(recipes.ppo_config(pcfg, sampling), num_steps=cfg.ppo_iterations,
                                  kl_coef=cfg.ppo_kl_coef, ptx_coef=0.0, log_every=5,
                                  optim=OptimConfig(learning_rate=cfg.ppo_lr, eps=1e-5, max_grad_norm=1.0))
    data = recipes.rl_prompt_batches(pcfg, pcfg.ppo_batch, cfg.ppo_iterations)   # the main job's RL prompts
    curve = _StyleCurve({"test": evaluator}, cfg.eval_every, lambda s: s.policy.params, ref_params=sft_params,
                        reward_params=rm, rng=jax.random.PRNGKey(6000 + seed))
    curve.record(0, sft_params)
    state = init_ppo_state(sft_params, ppo_cfg, model_config=mc, rng=jax.random.PRNGKey(4000 + seed),
                           reward_params=rm)
    stages.run_ppo(state, data, ppo_cfg, model_config=mc, ref_params=sft_params, reward_params=rm, hooks=curve)
    return curve.points


def run(cfg: LengthBiasConfig, run_pipeline=None) -> dict:
    cfg = cfg.scaled()
    models = models_template(cfg.models, cfg.out, cfg.quick)
    os.makedirs(cfg.out, exist_ok=True)
    save_config(cfg, os.path.join(cfg.out, "config.json"))
    path, settings = os.path.join(cfg.out, "length_bias.json"), _settings(cfg)
    done = kept_seeds(path, settings)
    result = {"settings": settings, "seeds": list(cfg.seeds), "populations": list(cfg.populations),
              "max_new_tokens": cfg.max_new_tokens, "per_seed": {}}
    for seed in cfg.seeds:
        if str(seed) in done:
            print(f"[length_bias] seed {seed}: kept from {path}", file=sys.stderr, flush=True)
            result["per_seed"][str(seed)] = done[str(seed)]
            continue
        t0 = time.time()
        folder = ensure_seed(models, seed, ("sft", "reward"), quick=cfg.quick, run_pipeline=run_pipeline)
        pcfg = pipeline_config(folder)
        mc, sft_params = load(folder, "sft")
        tasks, samples = pop.sft_samples(pcfg, sft_params, mc, folder)
        dev_sets = pop.dev_pair_sets(*pop.dev_answers(pcfg, sft_params, mc, folder))
        evaluator = pop.test_evaluator(mc, cfg.max_new_tokens, cfg.eval_samples, prompts=cfg.eval_prompts)
        per_pop = {}
        for name in cfg.populations:
            t = time.time()
            two = world.label_pairs(tasks, samples[0], samples[1], name, np.random.default_rng(seed))
            prefs = pop.population_data(pcfg, tasks, samples, name)
            rm = pop.reward_model(pcfg, sft_params, mc, prefs, folder, name)
            entry = {"labels": pop.prefers_longer(two),
                     "reward_model": pop.reward_model_report(rm, mc, pcfg, prefs, dev_sets),
                     "length_only_accuracy": pop.length_only_accuracy(prefs.test_pairs),
                     "length_only_gold_agreement_dev": pop.length_only_accuracy(dev_sets["gold"])}
            entry["ppo"] = _ppo(cfg, pcfg, sft_params, mc, rm, evaluator, seed)
            dpo_curve = _StyleCurve({"test": evaluator}, cfg.dpo_eval_every, lambda s: s.params,
                                    ref_params=sft_params, reward_params=rm, rng=jax.random.PRNGKey(6000 + seed))
            dpo_curve.record(0, sft_params)
            pop.dpo_policy(pcfg, sft_params, mc, prefs, folder, name, hooks=dpo_curve, retrain=True)
            if dpo_curve.points[-1]["iteration"] != pcfg.dpo_steps:
                dpo_curve.record(pcfg.dpo_steps, pop.dpo_policy(pcfg, sft_params, mc, prefs, folder, name))
            entry["dpo"] = dpo_curve.points
            entry["seconds"] = time.time() - t
            per_pop[name] = entry
            last_p, last_d = entry["ppo"][-1]["test"], entry["dpo"][-1]["test"]
            print(f"[length_bias] seed {seed} {name}: prefers longer {entry['labels']['rate']:.3f}; PPO length "
                  f"{entry['ppo'][0]['test']['length']:.1f} -> {last_p['length']:.1f}, gold {last_p['gold']:.3f}; "
                  f"DPO length {last_d['length']:.1f}, gold {last_d['gold']:.3f} ({entry['seconds']:.0f} s)",
                  file=sys.stderr, flush=True)
        result["per_seed"][str(seed)] = {"populations": per_pop, "seconds": time.time() - t0}
        with open(path, "w") as f:                   # after every seed: a stopped run keeps what it measured
            json.dump(result, f, indent=2)
    result["across_seeds"] = summarise(result)
    write_report(cfg.out, "length_bias", result, _markdown(result), lambda: _plot(result, cfg.out))
    return result


def _settings(cfg: LengthBiasConfig) -> dict:
    """What a seed's numbers depend on besides its models: a saved seed is reused only when these match."""
    return {"quick": cfg.quick, "populations": list(cfg.populations), "max_new_tokens": cfg.max_new_tokens,
            "ppo_iterations": cfg.ppo_iterations, "ppo_kl_coef": cfg.ppo_kl_coef, "ppo_lr": cfg.ppo_lr,
            "eval_every": cfg.eval_every, "dpo_eval_every": cfg.dpo_eval_every, "eval_samples": cfg.eval_samples,
            "eval_prompts": cfg.eval_prompts}


SUMMARY = ("prefers_longer", "prefers_longer_equal_gold", "rm_prefers_longer_equal_gold_dev", "rm_gold_agreement_dev",
           "rm_own_labels", "length_only_own_labels", "ppo_length_change", "ppo_gold_change", "ppo_proxy_change",
           "ppo_refusal_change", "dpo_length_change", "dpo_gold_change")
"""The per-seed numbers summarised across seeds; "*_change" = at the last evaluation minus at the first."""


def _seed_row(e: dict) -> dict:
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
    """Across seeds (`world_models.across_seeds`): each population's numbers (mean with its t-interval) and, when
    "careful" was run, every other population's difference from it, paired by seed ("<name>-careful|<key>")."""
    names = list(next(iter(result["per_seed"].values()))["populations"])
    rows = {s: {n: _seed_row(e) for n, e in r["populations"].items()} for s, r in result["per_seed"].items()}
    return across_seeds(rows, names, SUMMARY, "careful" if "careful" in names else names[0])


def _markdown(result: dict) -> str:
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


def _plot(result: dict, out: str) -> None:
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


def main(argv=None) -> int:
    return script_main(LengthBiasConfig, run, argv)


if __name__ == "__main__":
    sys.exit(main())
