"""Annotator populations and AI feedback: whose labels a reward model and DPO learn from, and what it does to them.

    python -m experiments.annotators                          # seed 0 of runs/seeds (26 min alone on 2 cores)
    python -m experiments.annotators --seeds 0 1 2            # three seeds and the across-seed summary
    python -m experiments.annotators --quick --out /tmp/ann   # smoke test (trains quick models)

From the main job's SFT policy (`rlhf_jax.recipes.models`; a missing seed is trained first), every population of
`populations` labels the same SFT answers (the main job's step 3: equal label counts by construction):
"careful", "length-loving", "format-loving", "noisy", "mixture" (rlhf_jax.tasks.ANNOTATORS), the RLAIF judge
"ai-judge" (Bai et al. 2022; Lee et al. 2023: verbosity, a pet phrase, a position bias) and "ai-judge-self", the
same judge whose utility also counts the policy's own mean per-token log-probability of the answer, times
`self_weight` (self-preference: Panickssery et al. 2024, "LLM Evaluators Recognize and Favor Their Own
Generations"; the judge and the policy being the same model, as when a model labels its own samples).

For each: its labels (agreement with the gold reward, how often the longer / better-formatted / more likely
answer wins, the position bias with answers swapped), a reward model on them (the main job's step 4; agreement
with gold on dev-key pairs, prompts no training saw) and DPO on them (the main job's step 6): gold reward (skills and
safety), length, format, pet phrase and refusals on every distinct test-key prompt.

With several seeds: each seed's numbers are saved as it finishes and reused by a later run with the same settings
(so seeds run apart can be merged), and the summary gives the mean over seeds with a t-interval, each DPO policy
against SFT and each reward model against the careful population's, paired by seed. Writes annotators.json,
annotators.md and annotators.png (per seed) and annotators_seeds.png (several seeds) to --out.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import jax

from rlhf_jax.config_cli import check_ranges, config_check, save_config
from rlhf_jax.recipes import annotators as ann
from rlhf_jax.recipes import populations as pop
from rlhf_jax.recipes.annotators import SELF
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
from rlhf_jax.tasks.annotators import ANNOTATORS, get_annotator


@dataclasses.dataclass(frozen=True, kw_only=True)
class AnnotatorsConfig:
    """Labels, reward models and DPO policies of each annotator population (see the module docstring)."""

    seeds: tuple[int, ...] = (0,)
    """Seeds of the main job (each: its SFT policy and its preference prompts)."""
    models: str = DEFAULT_MODELS
    """Run folder of each seed's main job ({seed} is replaced); with --quick the default is OUT/models/seed{seed}."""
    out: str = "runs/annotators"
    """Output folder."""
    quick: bool = False
    """Quick models and few prompts: a smoke test, not a measurement."""
    populations: tuple[str, ...] = ("careful", "length-loving", "format-loving", "noisy", "mixture", "ai-judge", SELF)
    """Labelling populations: names of rlhf_jax.tasks.ANNOTATORS, and "ai-judge-self"."""
    self_weight: float = 0.1
    """Weight of the policy's mean per-token log-probability of an answer in the self-preferring judge's utility
    (the gold reward has weight 0.8 and the choice temperature is 0.1, so 0.1 nat per token moves a choice about as
    much as the judge's own noise). Set before any run, not tuned."""
    eval_samples: int = 4
    """Answers per distinct test-key prompt (temperature 0.7, answers up to the main job's 28 bytes)."""
    eval_prompts: int | None = None
    """Evaluate on the first N distinct test-key prompts of a fixed shuffle (None: all 241)."""

    def __post_init__(self):
        check_ranges(self, positive=("eval_samples", "eval_prompts"), non_negative=("self_weight",))
        config_check(self, len(self.seeds) > 0 and len(set(self.seeds)) == len(self.seeds) and min(self.seeds) >= 0,
                     f"seeds = {self.seeds} must be distinct non-negative integers")
        config_check(self, len(self.populations) > 0 and all(p in ANNOTATORS or p == SELF for p in self.populations),
                     f"populations = {self.populations} must name annotators of {sorted(ANNOTATORS)} or {SELF!r}")

    def scaled(self) -> "AnnotatorsConfig":
        if not self.quick:
            return self
        return dataclasses.replace(self, populations=("careful", SELF), eval_samples=1, eval_prompts=24)


def run(cfg: AnnotatorsConfig, run_pipeline=None) -> dict:
    cfg = cfg.scaled()
    models = models_template(cfg.models, cfg.out, cfg.quick)
    os.makedirs(cfg.out, exist_ok=True)
    save_config(cfg, os.path.join(cfg.out, "config.json"))
    path, settings = os.path.join(cfg.out, "annotators.json"), _settings(cfg)
    done = kept_seeds(path, settings)
    result = {"settings": settings, "seeds": list(cfg.seeds), "populations": list(cfg.populations),
              "self_weight": cfg.self_weight, "per_seed": {}}
    for seed in cfg.seeds:
        if str(seed) in done:
            print(f"[annotators] seed {seed}: kept from {path}", file=sys.stderr, flush=True)
            result["per_seed"][str(seed)] = done[str(seed)]
            continue
        t0 = time.time()
        folder = ensure_seed(models, seed, ("sft", "reward", "dpo"), quick=cfg.quick, run_pipeline=run_pipeline)
        pcfg = pipeline_config(folder)
        mc, sft_params = load(folder, "sft")
        tasks, samples = pop.sft_samples(pcfg, sft_params, mc, folder)
        dev_sets = pop.dev_pair_sets(*pop.dev_answers(pcfg, sft_params, mc, folder))
        evaluator = pop.test_evaluator(mc, pcfg.sampling.max_new_tokens, cfg.eval_samples, prompts=cfg.eval_prompts)
        t = time.time()
        self_lp = [ann.mean_logprobs(sft_params, mc, tasks, s, pcfg.sampling.max_new_tokens + 1) for s in samples]
        likelihood = {text: float(lp) for s, lps in zip(samples, self_lp) for text, lp in zip(s, lps)}
        print(f"[annotators] seed {seed}: SFT log-probabilities of {len(likelihood)} distinct answers in "
              f"{time.time() - t:.0f} s", file=sys.stderr, flush=True)
        rng = jax.random.PRNGKey(7000 + seed)
        sft_metrics, _ = evaluator(sft_params, ref_params=sft_params, rng=rng)
        per_pop = {"sft": {"policy": sft_metrics}}
        for name in cfg.populations:
            t = time.time()
            judge, bonus = (("ai-judge", [list(cfg.self_weight * lp) for lp in self_lp]) if name == SELF
                            else (name, None))
            prefs = pop.population_data(pcfg, tasks, samples, get_annotator(judge), bonus=bonus)
            rm = pop.reward_model(pcfg, sft_params, mc, prefs, folder, name)
            dpo = pop.dpo_policy(pcfg, sft_params, mc, prefs, folder, name)
            metrics, _ = evaluator(dpo, ref_params=sft_params, reward_params=rm, rng=rng)
            per_pop[name] = {"labels": ann.label_stats(prefs.on_policy, likelihood),
                             "position": ann.position_bias(judge, tasks, samples[0], samples[1]),
                             "train_pairs": len(prefs.train_pairs),
                             "reward_model": pop.reward_model_report(rm, mc, pcfg, prefs, dev_sets),
                             "policy": metrics, "seconds": time.time() - t}
            print(f"[annotators] seed {seed} {name}: labels agree with gold "
                  f"{per_pop[name]['labels']['gold_agreement']:.3f}; RM agrees with gold on dev "
                  f"{per_pop[name]['reward_model']['gold_agreement_dev']:.3f}; DPO gold {metrics['gold_reward']:.3f}"
                  f", length {metrics['mean_length']:.1f} ({time.time() - t:.0f} s)", file=sys.stderr, flush=True)
        result["per_seed"][str(seed)] = {"populations": per_pop, "seconds": time.time() - t0}
        with open(path, "w") as f:                   # after every seed: a stopped run keeps what it measured
            json.dump(result, f, indent=2)
    result["across_seeds"] = ann.summarise(result)
    write_report(cfg.out, "annotators", result, ann.markdown(result), lambda: ann.plot(result, cfg.out))
    return result


def _settings(cfg: AnnotatorsConfig) -> dict:
    """What a seed's numbers depend on besides its models: a saved seed is reused only when these match."""
    return {"quick": cfg.quick, "populations": list(cfg.populations), "self_weight": cfg.self_weight,
            "eval_samples": cfg.eval_samples, "eval_prompts": cfg.eval_prompts}


def main(argv=None) -> int:
    return script_main(AnnotatorsConfig, run, argv)


if __name__ == "__main__":
    sys.exit(main())
