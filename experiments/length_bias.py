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
from rlhf_jax.recipes import length_bias as lb
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
    sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=pcfg.sampling.temperature, eos_id=TOK.eos_id,
                              pad_id=TOK.pad_id)
    ppo_cfg = dataclasses.replace(recipes.ppo_config(pcfg, sampling), num_steps=cfg.ppo_iterations,
                                  kl_coef=cfg.ppo_kl_coef, ptx_coef=0.0, log_every=5,
                                  optim=OptimConfig(learning_rate=cfg.ppo_lr, eps=1e-5, max_grad_norm=1.0))
    data = recipes.rl_prompt_batches(pcfg, pcfg.ppo.batch_size, cfg.ppo_iterations)   # the main job's RL prompts
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
            if dpo_curve.points[-1]["iteration"] != pcfg.dpo.num_steps:
                dpo_curve.record(pcfg.dpo.num_steps, pop.dpo_policy(pcfg, sft_params, mc, prefs, folder, name))
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
    result["across_seeds"] = lb.summarise(result)
    write_report(cfg.out, "length_bias", result, lb.markdown(result), lambda: lb.plot(result, cfg.out))
    return result


def _settings(cfg: LengthBiasConfig) -> dict:
    """What a seed's numbers depend on besides its models: a saved seed is reused only when these match."""
    return {"quick": cfg.quick, "populations": list(cfg.populations), "max_new_tokens": cfg.max_new_tokens,
            "ppo_iterations": cfg.ppo_iterations, "ppo_kl_coef": cfg.ppo_kl_coef, "ppo_lr": cfg.ppo_lr,
            "eval_every": cfg.eval_every, "dpo_eval_every": cfg.dpo_eval_every, "eval_samples": cfg.eval_samples,
            "eval_prompts": cfg.eval_prompts}


def main(argv=None) -> int:
    return script_main(LengthBiasConfig, run, argv)


if __name__ == "__main__":
    sys.exit(main())
