"""Does RL against the exact verifier on training keys transfer to keys it never saw? A dev-split diagnostic.

    python -m experiments.grpo_transfer                       # seed 0 of runs/seeds (~12 minutes once trained)
    python -m experiments.grpo_transfer --prompts-per-iteration 16 --generations 4 --passes 2 --minibatches 4
                                                              # 16 x 4 answers in 2 x 4 updates an iteration
    python -m experiments.grpo_transfer --quick --out /tmp/gt  # smoke test (trains quick models)

Separates "the update does not work" from "what it learns does not transfer": from the SFT policy, GRPO as the
main job's (its prompts per iteration, group size, passes and minibatches unless set here; KL 0.04 in the loss,
sampling at 0.7), in variants: fresh train-key prompts every iteration at several learning rates (the main job's
case), and the same prompts every iteration (can it fit what it sees?). For each: the batch reward over training
(on the prompts it is about to update on), the gold reward on fixed train-key prompts of the distribution it
trains on (does the update raise its own objective?) and on the dev keys (does it transfer?), before and after
(4 answers per distinct prompt, families weighted as the table). Only train and dev keys are read: this is a
diagnostic for choosing what to change; the main job's GRPO shape was chosen with it (docs/results/grpo_shape_dev.md).
Writes grpo_transfer.json and grpo_transfer.md.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time

import jax

from rlhf_jax import recipes
from rlhf_jax.config_cli import check_ranges, config_check, save_config
from rlhf_jax.data.iterators import Replayable
from rlhf_jax.recipes import TOK, prompt_batch, split_evaluator, task_evaluator
from rlhf_jax.recipes.models import (
    DEFAULT_MODELS,
    ensure_seed,
    load,
    models_template,
    pipeline_config,
    script_main,
    write_report,
)
from rlhf_jax.train import stages
from rlhf_jax.train.logging import StageHooks
from rlhf_jax.train.state import create_train_state


@dataclasses.dataclass(frozen=True, kw_only=True)
class GRPOTransferConfig:
    """GRPO on fresh or fixed train-key prompts, judged on the dev keys (see the module docstring)."""

    seed: int = 0
    """Seed of the main job whose SFT policy starts every variant."""
    models: str = DEFAULT_MODELS
    """Run folder of the seed's main job ({seed} is replaced); with --quick the default is OUT/models/seed{seed}."""
    out: str = "runs/grpo_transfer"
    """Output folder."""
    quick: bool = False
    """Quick models and 4 iterations: a smoke test, not a measurement."""
    iterations: int = 40
    """GRPO iterations per variant (the main job's)."""
    learning_rates: tuple[float, ...] = (1e-5, 3e-5)
    """Learning rates of the fresh-prompt variants (3e-5 is the main job's)."""
    fixed_lr: float = 3e-5
    """Learning rate of the fixed-prompt variant."""
    fixed: bool = True
    """Run the fixed-prompt variant too."""
    prompts_per_iteration: int = 0
    """Prompts per iteration (0: the main job's grpo_prompts)."""
    generations: int = 0
    """Answers per prompt (0: the main job's grpo_generations)."""
    passes: int = 0
    """Passes over each batch of answers (GRPOConfig.num_iterations; 0: the main job's grpo_passes)."""
    minibatches: int = 0
    """Minibatches per pass (0: the main job's grpo_minibatches): passes x minibatches updates per iteration."""
    train_prompts: int = 240
    """Distinct train-key prompts (the first of the main job's RL prompts, which the fresh variants train on) on
    which every policy is also judged: does the update raise the reward on the distribution it optimises?"""

    def __post_init__(self):
        check_ranges(self, positive=("iterations", "fixed_lr", "train_prompts"),
                     non_negative=("seed", "prompts_per_iteration", "generations", "passes", "minibatches"))
        config_check(self, len(self.learning_rates) > 0 and min(self.learning_rates) > 0,
                     f"learning_rates = {self.learning_rates} must be positive")


class _Rewards(StageHooks):
    def __init__(self):
        self.rows = []

    def on_step(self, step, metrics):
        self.rows.append({"iteration": step, "reward": float(metrics["reward"]), "kl": float(metrics.get("kl", 0.0))})


def run(cfg: GRPOTransferConfig, run_pipeline=None) -> dict:
    models = models_template(cfg.models, cfg.out, cfg.quick)
    iterations = 4 if cfg.quick else cfg.iterations
    os.makedirs(cfg.out, exist_ok=True)
    save_config(cfg, os.path.join(cfg.out, "config.json"))
    folder = ensure_seed(models, cfg.seed, ("sft",), quick=cfg.quick, run_pipeline=run_pipeline)
    pcfg = pipeline_config(folder)
    mc, sft = load(folder, "sft")
    sampling = pcfg.sampling
    samples = 2 if cfg.quick else 4
    dev, dev_tasks = split_evaluator("dev", mc, sampling, samples)
    rl_tasks = recipes.rl_prompts(pcfg)                         # the main job's RL prompts
    gold_fn = recipes.gold_verifier(rl_tasks)
    seen = list({t.prompt: t for t in rl_tasks}.values())[:(24 if cfg.quick else cfg.train_prompts)]
    train = task_evaluator(seen, mc, sampling, samples)
    k_eval = jax.random.PRNGKey(7000 + cfg.seed)

    def evaluate(params):
        m, _ = dev(params, ref_params=sft, rng=k_eval)
        t, _ = train(params, ref_params=sft, rng=k_eval)
        return {"gold": m["gold_reward"], "skills": m["gold/skills"], "safety": m["gold/safety"],
                "kl_to_sft": m["kl_to_ref"], "train_gold": t["gold_reward"], "train_skills": t["gold/skills"],
                "train_safety": t["gold/safety"]}

    shape = recipes.with_options(pcfg, {                          # the main job's GRPO unless set here
        "grpo.num_steps": iterations, "grpo.batch_size": cfg.prompts_per_iteration or pcfg.grpo.batch_size,
        "grpo.num_generations": cfg.generations or pcfg.grpo.num_generations,
        "grpo.num_iterations": cfg.passes or pcfg.grpo.num_iterations,
        "grpo.num_minibatches": cfg.minibatches or pcfg.grpo.num_minibatches})
    P = shape.grpo.batch_size
    result = {"seed": cfg.seed, "dev_prompts": len(dev_tasks), "dev_samples": samples, "train_prompts": len(seen),
              "iterations": iterations, "prompts_per_iteration": P, "generations": shape.grpo.num_generations,
              "passes": shape.grpo.num_iterations, "minibatches": shape.grpo.num_minibatches, "sft": evaluate(sft),
              "variants": []}
    variants = [("fresh", lr) for lr in cfg.learning_rates] + ([("fixed", cfg.fixed_lr)] if cfg.fixed else [])
    for prompts, lr in variants:
        t = time.time()
        grpo_cfg = dataclasses.replace(recipes.grpo_config(recipes.with_options(shape, {"grpo.optim.learning_rate": lr}), sampling),
                                       log_every=5 if not cfg.quick else 1)
        data = Replayable(lambda fixed=prompts == "fixed": (prompt_batch(
            [rl_tasks[j % len(rl_tasks)] for j in range(0 if fixed else i * P, P if fixed else (i + 1) * P)])
            for i in range(iterations)))
        state = create_train_state(sft, grpo_cfg.optim, jax.random.fold_in(jax.random.PRNGKey(pcfg.seed), 8),
                                   total_steps=iterations * grpo_cfg.updates_per_iteration)
        hook = _Rewards()
        state, _ = stages.run_grpo(state, data, grpo_cfg, model_config=mc, host_reward_fn=gold_fn, tokenizer=TOK,
                                   ref_params=sft, hooks=hook)
        row = {"prompts": prompts, "lr": lr, "batch_reward": hook.rows, "dev": evaluate(state.params),
               "seconds": time.time() - t}
        result["variants"].append(row)
        first, last = hook.rows[0]["reward"], hook.rows[-1]["reward"]
        print(f"[grpo_transfer] {prompts} prompts, lr {lr:g}: batch reward {first:.3f} -> {last:.3f}; dev gold "
              f"{result['sft']['gold']:.3f} -> {row['dev']['gold']:.3f}; train-key gold "
              f"{result['sft']['train_gold']:.3f} -> {row['dev']['train_gold']:.3f} ({row['seconds']:.0f} s)",
              file=sys.stderr, flush=True)
    write_report(cfg.out, "grpo_transfer", result, _markdown(result))
    return result


def _markdown(r: dict) -> str:
    s = r["sft"]
    lines = [f"# GRPO against the gold reward: does it transfer to unseen keys? (seed {r['seed']}, dev split)", "",
             f"{r['iterations']} iterations per variant of {r['prompts_per_iteration']} prompts x {r['generations']} "
             f"answers, {r['passes']} pass(es) of {r['minibatches']} minibatch(es); dev: {r['dev_prompts']} distinct "
             f"prompts x {r['dev_samples']} answers; train keys: {r['train_prompts']} distinct prompts of the RL set x "
             f"{r['dev_samples']}. SFT on dev: gold {s['gold']:.3f} (skills {s['skills']:.3f}, safety "
             f"{s['safety']:.3f}); on the train keys {s['train_gold']:.3f}.", "",
             "| prompts | lr | batch reward: first logged -> last (mean of the last 3) | train-key gold | dev gold | "
             "dev skills | dev safety | KL to SFT |", "|---|---|---|---|---|---|---|---|"]
    for v in r["variants"]:
        rewards = [x["reward"] for x in v["batch_reward"]]
        tail = sum(rewards[-3:]) / len(rewards[-3:])
        d = v["dev"]
        lines.append(f"| {v['prompts']} | {v['lr']:g} | {rewards[0]:.3f} -> {rewards[-1]:.3f} ({tail:.3f}) | "
                     f"{d['train_gold']:.3f} ({d['train_gold'] - s['train_gold']:+.3f}) | "
                     f"{d['gold']:.3f} ({d['gold'] - s['gold']:+.3f}) | {d['skills']:.3f} | {d['safety']:.3f} | "
                     f"{d['kl_to_sft']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    return script_main(GRPOTransferConfig, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
