"""Reward over-optimisation (Gao, Schulman and Hilton 2022): optimise a learned reward model hard enough and the
gold reward rises, peaks and falls while the proxy keeps rising.

    python -m experiments.overoptimization                    # seed 0 of runs/seeds (12 min alone on 2 cores)
    python -m experiments.overoptimization --quick --out /tmp/oo   # smoke test (trains quick models)

From the main job's SFT policy (`rlhf_jax.recipes.models`; a missing seed is trained first):

* Proxies: reward models trained on `fractions` of the main job's preference pairs, each for the same number of
  epochs (fraction 1 is the main job's reward model itself: same pairs, same steps, same key).
* Best-of-n: a pool of `pool` temperature-1 SFT answers per prompt, scored by every proxy and by the gold reward;
  for n = 1 ... pool the expected gold and proxy score of the proxy's pick among n (`eval.best_of_n_expectation`,
  exact over all n-subsets of the pool) against d = sqrt(KL), KL = log n - (n - 1) / n (the analytic KL of
  best-of-n), with Gao's fit gold(d) - gold(0) = d (alpha - beta d).
* RL: GRPO (and PPO) from SFT against the main job's reward model at several KL coefficients, 0 included, sampling
  at temperature 1, evaluated every `eval_every` iterations: gold and proxy against d = sqrt(KL(pi || SFT)) (a
  sample estimate), with Gao's RL fit gold(d) - gold(0) = d (alpha - beta log d). A run "rose then fell" when
  the paired bootstrap over prompts of gold(peak) - gold(0), at a Bonferroni level over its evaluations (the peak
  is picked after the fact), and that of gold(end) - gold(peak) both exclude 0.

Two prompt sets, `prompts` distinct prompts each: "train" keys (the distribution the reward model and RL were
trained on; fresh prompts, as Gao's held-out prompts of the same distribution) and "test" keys (never in any
training data). `--families skills` keeps every prompt to the six checkable families (no unsafe requests or
look-alikes). Writes overoptimization.json, overoptimization.md, best_of_n.png and rl.png (with several seeds one
of each per seed, and rl_seeds.png: every seed's RL curves beside its best-of-n curve).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import time
from typing import Literal

import jax
import numpy as np

from rlhf_jax import recipes
from rlhf_jax import tasks as world
from rlhf_jax.config_cli import check_ranges, config_check, save_config
from rlhf_jax.data.iterators import Replayable
from rlhf_jax.eval import (
    PolicyEvaluator,
    best_of_n_expectation,
    pairwise_accuracy,
    reward_model_scores_jit,
    sample_episodes_jit,
)
from rlhf_jax.generation import SamplingConfig
from rlhf_jax.recipes import TOK, cosine_optim, prompt_batch
from rlhf_jax.recipes import overoptimization as oo
from rlhf_jax.recipes.models import (
    DEFAULT_MODELS,
    ensure_seed,
    load,
    models_template,
    pipeline_config,
    script_main,
    write_report,
)
from rlhf_jax.recipes.stages import EvalCurve
from rlhf_jax.train import checkpoint as ckpt
from rlhf_jax.train import stages
from rlhf_jax.train.optim import OptimConfig
from rlhf_jax.train.ppo import PPOConfig, init_ppo_state
from rlhf_jax.train.rl import decode_responses
from rlhf_jax.train.state import create_train_state, with_score_head


@dataclasses.dataclass(frozen=True, kw_only=True)
class OveroptimizationConfig:
    """Best-of-n and RL against learned reward models, gold against proxy (see the module docstring)."""

    seeds: tuple[int, ...] = (0,)
    """Seeds of the main job (each: its SFT policy, its pairs, its reward models)."""
    models: str = DEFAULT_MODELS
    """Run folder of each seed's main job ({seed} is replaced); with --quick the default is OUT/models/seed{seed}."""
    out: str = "runs/overoptimization"
    """Output folder (the extra reward models are kept in OUT/seed<N>/reward_<fraction>/final)."""
    quick: bool = False
    """Quick models, small pools and a few RL iterations: a smoke test, not a measurement."""
    fractions: tuple[float, ...] = (0.25, 0.5, 1.0)
    """Shares of the main job's preference pairs behind each proxy (1.0: the main job's reward model)."""
    pool: int = 256
    """SFT answers per prompt behind the best-of-n estimates (n goes up to it)."""
    prompts: int = 48
    """Distinct prompts per key set."""
    grpo_kl_coefs: tuple[float, ...] = (0.0, 0.2)
    """KL coefficients (in the loss, k3) of the GRPO runs against the main job's reward model."""
    ppo_kl_coefs: tuple[float, ...] = (0.0,)
    """KL coefficients (k1 in the reward) of the PPO runs; () for none."""
    grpo_iterations: int = 20
    """GRPO iterations, each in the main job's shape (its prompts x answers, passes and minibatches: by default
    32 x 8 answers in one update)."""
    ppo_iterations: int = 40
    """PPO iterations (64 rollouts each)."""
    rl_prompts: Literal["main", "evaluated"] = "evaluated"
    """The RL runs' prompts: "main" = the main job's RL prompts (fresh train-key prompts every iteration: Gao's
    held-out prompts of the training distribution); "evaluated" = the "train" key set's own prompts, cycled, so
    that RL, like best-of-n, optimises the answers to the prompts it is judged on (in this world a step on one key
    barely transfers to other keys: see experiments.grpo_transfer). The "test" keys stay unseen either way."""
    rl_lr: float = 3e-5
    """Learning rate of GRPO (PPO: half of it, as the main job's ratio)."""
    eval_every: int = 5
    """RL iterations between evaluations (`eval_samples` answers per prompt of each key set), besides iterations 1,
    2, 4 and 8 (a gold peak can come early)."""
    eval_samples: int = 32
    """Temperature-1 answers per prompt in each RL evaluation (more resolve a smaller rise of the gold reward)."""
    families: Literal["all", "skills"] = "skills"
    """The families of every prompt here (key sets, best-of-n, RL): "all" = the world's mix; "skills" = the six
    checkable families only, without the unsafe requests and their look-alikes, so that refusing less is not a
    way for RL to please the reward model."""

    def __post_init__(self):
        check_ranges(self, positive=("pool", "prompts", "grpo_iterations", "ppo_iterations", "rl_lr", "eval_every",
                                     "eval_samples"))
        config_check(self, len(self.seeds) > 0 and len(set(self.seeds)) == len(self.seeds) and min(self.seeds) >= 0,
                     f"seeds = {self.seeds} must be distinct non-negative integers")
        config_check(self, len(self.fractions) > 0 and all(0 < f <= 1 for f in self.fractions) and
                     1.0 in self.fractions, f"fractions = {self.fractions} must lie in (0, 1] and include 1.0 "
                                            "(the main job's reward model, which RL optimises)")
        config_check(self, all(c >= 0 for c in (*self.grpo_kl_coefs, *self.ppo_kl_coefs)),
                     "KL coefficients must be >= 0")

    def scaled(self) -> "OveroptimizationConfig":
        if not self.quick:
            return self
        default = OveroptimizationConfig()
        return dataclasses.replace(                  # RL runs asked for explicitly are kept
            self, fractions=(0.5, 1.0), pool=8, prompts=8, grpo_iterations=4, ppo_iterations=2, eval_every=2,
            eval_samples=2,
            grpo_kl_coefs=(0.0,) if self.grpo_kl_coefs == default.grpo_kl_coefs else self.grpo_kl_coefs)


def _proxies(cfg, pcfg, folder, out_dir, sft_params, mc, seed) -> dict[float, object]:
    """{fraction: reward-model params}; fraction 1.0 is the main job's; others trained here once and kept."""
    _, main_rm = load(folder, "reward")
    rms = {1.0: main_rm}
    todo = [f for f in cfg.fractions if f != 1.0 and not os.path.isdir(os.path.join(
        out_dir, f"reward_{f:g}", "final", "params"))]
    if todo:
        keys = jax.random.split(jax.random.PRNGKey(pcfg.seed), 7)
        sampling = pcfg.sampling
        t = time.time()
        prefs = recipes.preference_data(pcfg, sft_params, mc, sampling, keys[5])
        print(f"[overoptimization] seed {seed}: {len(prefs.train_pairs)} preference pairs rebuilt in "
              f"{time.time() - t:.0f} s", file=sys.stderr, flush=True)
        order = np.random.default_rng(seed).permutation(len(prefs.train_pairs))
        for frac in todo:
            records = [prefs.train_pairs[i] for i in order[:max(1, int(round(frac * len(order))))]]
            steps = max(1, int(round(frac * pcfg.reward.num_steps)))          # the same number of epochs
            state = create_train_state(with_score_head(sft_params, mc, keys[2]), cosine_optim(pcfg.reward.optim.learning_rate, steps), keys[2],
                                       total_steps=steps)
            state, _ = stages.run_reward(state, recipes.preference_batches(pcfg, records, pcfg.seed),
                                         stages.RewardConfig(num_steps=steps, log_every=10), model_config=mc)
            ckpt.save_params(os.path.join(out_dir, f"reward_{frac:g}", "final"), state.params, model_config=mc)
            acc = pairwise_accuracy(state.params, recipes.preference_batches(pcfg, prefs.test_pairs, 0, epochs=1),
                                    model_config=mc)
            print(f"[overoptimization] seed {seed}: reward model on {frac:g} of the pairs ({len(records)}, {steps} "
                  f"steps): held-out accuracy {acc:.3f}", file=sys.stderr, flush=True)
    for frac in cfg.fractions:
        if frac != 1.0:
            rms[frac] = ckpt.load_params(os.path.join(out_dir, f"reward_{frac:g}", "final"))[1]
    return rms


def best_of_n(cfg, sft_params, mc, rms, tasks, rng) -> dict:
    """Per proxy: n, KL, d, expected gold and proxy score of the proxy's pick (weighted as the families)."""
    batch = prompt_batch(tasks)
    sampling = SamplingConfig(max_new_tokens=28, temperature=1.0, eos_id=TOK.eos_id, pad_id=TOK.pad_id)
    golds, scores = [], {f: [] for f in rms}
    for i in range(cfg.pool):
        ep = sample_episodes_jit(sft_params, batch["prompts"], batch["prompt_mask"], jax.random.fold_in(rng, i),
                     sampling=sampling, model_config=mc)
        golds.append(world.gold_rewards(tasks, decode_responses(TOK, ep)))
        for f, rm in rms.items():
            scores[f].append(np.asarray(reward_model_scores_jit(rm, ep, model_config=mc), np.float64))
    golds = np.stack(golds, axis=1)                                       # [B, pool]
    weights = world.family_weights(tasks, world.DEFAULT_MIX)
    ns = [n for n in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024) if n <= cfg.pool]
    out = {}
    for f, s in scores.items():
        s = np.stack(s, axis=1)
        gold = [float(np.average([best_of_n_expectation(s[b], golds[b], n) for b in range(len(tasks))],
                                 weights=weights)) for n in ns]
        proxy = [float(np.average([best_of_n_expectation(s[b], s[b], n) for b in range(len(tasks))],
                                  weights=weights)) for n in ns]
        kl = oo.bon_kl(ns)
        d = np.sqrt(kl)
        gain = np.asarray(gold) - gold[0]
        out[f"{f:g}"] = {"n": ns, "kl": kl.tolist(), "d": d.tolist(), "gold": gold, "proxy": proxy,
                         "gold_oracle": float(np.average(golds.max(axis=1), weights=weights)),
                         "fit": oo.fit_gao(d, gain, "bon"), **oo.peak(ns, gold)}
    return out


def _cached(path: str, key: dict, compute):
    """`compute()`, or its result saved at `path` by an earlier run with the same `key` (the options it depends on)."""
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        if saved.get("key") == key:
            return saved["value"]
    value = compute()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"key": key, "value": value}, f)
    return value


def rl_runs(cfg, pcfg, sft_params, mc, rm, key_sets, seed) -> dict:
    sampling = dataclasses.replace(pcfg.sampling, temperature=1.0)
    evaluators = {}
    for name, tasks in key_sets.items():
        batch = prompt_batch(tasks)
        evaluators[name] = PolicyEvaluator(batch["prompts"], batch["prompt_mask"], model_config=mc, tokenizer=TOK,
                                           sampling=sampling, samples=cfg.eval_samples,
                                           gold_fn=functools.partial(world.gold_rewards, tasks),
                                           metrics_fn=lambda idx, texts, tasks=tasks: world.compute_metrics(
                                               [tasks[i] for i in idx], texts),
                                           weights=world.family_weights(tasks, world.DEFAULT_MIX))
    rl_tasks = oo.rl_tasks(pcfg, key_sets, rl_prompts=cfg.rl_prompts, families=cfg.families)
    kwargs = dict(ref_params=sft_params, reward_params=rm, rng=jax.random.PRNGKey(2000 + seed))
    out = {}
    runs = [("grpo", c) for c in cfg.grpo_kl_coefs] + [("ppo", c) for c in cfg.ppo_kl_coefs]
    for algo, coef in runs:
        t = time.time()
        if algo == "grpo":
            P, n = pcfg.grpo.batch_size, cfg.grpo_iterations
            rl_cfg = recipes.grpo_config(recipes.with_options(pcfg, {"grpo.num_steps": n, "grpo.kl_coef": coef,
                                                                     "grpo.optim.learning_rate": cfg.rl_lr}), sampling)
            state = create_train_state(sft_params, rl_cfg.optim, jax.random.PRNGKey(3000 + seed),
                                       total_steps=n * rl_cfg.updates_per_iteration)
            run = functools.partial(stages.run_grpo, model_config=mc, reward_params=rm,
                                    ref_params=sft_params if coef > 0 else None)
            params_of = lambda s: s.params  # noqa: E731
        else:
            P, n = pcfg.ppo.batch_size, cfg.ppo_iterations
            rl_cfg = PPOConfig(num_steps=n, batch_size=P, sampling=sampling, kl_coef=coef, missing_eos_penalty=1.0,
                               ptx_coef=0.0, log_every=5,
                               optim=OptimConfig(learning_rate=cfg.rl_lr / 2, eps=1e-5, max_grad_norm=1.0),
                               value_optim=OptimConfig(learning_rate=1e-4, eps=1e-5, max_grad_norm=1.0))
            state = init_ppo_state(sft_params, rl_cfg, model_config=mc, rng=jax.random.PRNGKey(4000 + seed),
                                   reward_params=rm)
            run = functools.partial(stages.run_ppo, model_config=mc, ref_params=sft_params, reward_params=rm)
            params_of = lambda s: s.policy.params  # noqa: E731
        data = Replayable(lambda P=P, n=n: (prompt_batch([rl_tasks[j % len(rl_tasks)] for j in range(
            i * P, (i + 1) * P)]) for i in range(n)))
        curve = EvalCurve(evaluators, cfg.eval_every, params_of, **kwargs)
        curve.record(0, sft_params)
        run(state, data, rl_cfg, hooks=curve)
        name = f"{algo}_kl{coef:g}"
        out[name] = {"algo": algo, "kl_coef": coef, "points": curve.points}
        for key in key_sets:
            d = oo.rl_d(curve.points, key)
            gold = [p[key]["gold"] for p in curve.points]
            peak = oo.peak([p["iteration"] for p in curve.points], gold)
            out[name][key] = {"fit": oo.fit_gao(d, np.asarray(gold) - gold[0], "rl"), **peak,
                              **oo.rise([p[key]["gold_per_prompt"] for p in curve.points], int(np.argmax(gold)),
                                      evaluators[key].weights)}
        print(f"[overoptimization] seed {seed}: {name} in {time.time() - t:.0f} s; " + "; ".join(
            f"{k}: gold {out[name][k]['peak_gold']:.3f} at iteration {out[name][k]['peak_at']}, final "
            f"{out[name][k]['final_gold']:.3f}" for k in key_sets), file=sys.stderr, flush=True)
    return out


def run(cfg: OveroptimizationConfig, run_pipeline=None) -> dict:
    cfg = cfg.scaled()
    models = models_template(cfg.models, cfg.out, cfg.quick)
    os.makedirs(cfg.out, exist_ok=True)
    save_config(cfg, os.path.join(cfg.out, "config.json"))
    result = {"seeds": list(cfg.seeds), "rl_prompts": cfg.rl_prompts, "families": cfg.families, "per_seed": {}}
    for seed in cfg.seeds:
        t0 = time.time()
        folder = ensure_seed(models, seed, ("sft", "reward"), quick=cfg.quick, run_pipeline=run_pipeline)
        pcfg = pipeline_config(folder)
        mc, sft_params = load(folder, "sft")
        out_dir = os.path.join(cfg.out, f"seed{seed}")
        rms = _proxies(cfg, pcfg, folder, out_dir, sft_params, mc, seed)
        key_sets = {k: oo.key_set(k, cfg.prompts, seed, cfg.families) for k in oo.KEY_SETS}
        t = time.time()
        bon = _cached(os.path.join(out_dir, "best_of_n.json"), {"pool": cfg.pool, "prompts": cfg.prompts,
                                                                "fractions": list(cfg.fractions),
                                                                **({"families": cfg.families}      # older caches:
                                                                   if cfg.families != "all" else {})},  # all
                      lambda: {k: best_of_n(cfg, sft_params, mc, rms, tasks, jax.random.PRNGKey(5000 + seed))
                               for k, tasks in key_sets.items()})
        print(f"[overoptimization] seed {seed}: best-of-n in {time.time() - t:.0f} s", file=sys.stderr)
        rl = rl_runs(cfg, pcfg, sft_params, mc, rms[1.0], key_sets, seed)
        result["per_seed"][str(seed)] = {"best_of_n": bon, "rl": rl, "seconds": time.time() - t0}
    write_report(cfg.out, "overoptimization", result, oo.markdown(result), lambda: oo.plots(result, cfg.out))
    return result


def main(argv=None) -> int:
    return script_main(OveroptimizationConfig, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
