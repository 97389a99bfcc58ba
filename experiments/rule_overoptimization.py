"""Reward over-optimisation and the KL frontier in the rule world: best-of-n and PPO against the learned reward
model (the proxy), DPO at several betas, all scored by the exact-match verifier (gold) on held-out keys.

    rlhf-jax rule-world --seeds 0 1 2 --out runs/rule_world      # optional: its seed models are reused
    python -m experiments.rule_overoptimization --models runs/rule_world --seeds 0 1 2 --out runs/rule_oo
    python -m experiments.rule_overoptimization --quick --models /tmp/rule --seeds 0 --eval-split dev  # smoke

Per seed, from the main job's models of that seed (`recipes.rule_world.seed_models`, kept in
MODELS/seed<N>/models and trained there when missing: pretraining, the deployed SFT, the reward model):

* best of n: `pool` temperature-1 SFT answers to each of `prompts` eval-split keys (a fresh draw, not the main
  job's); for each n of `ns`, the gold and the proxy score of the proxy's pick among n, in expectation over every
  n-subset of the pool (`stats.best_of_n_expectation`), the gold pick's gold, and KL = log n - (n - 1)/n;
* PPO against the reward model, the main job's recipe at each KL coefficient of `ppo_kl_coefs`, for
  `ppo_iterations` iterations, read every `eval_every`;
* DPO on the reward model's pairs, the main job's recipe at each beta of `dpo_betas`, read at its end.

A read of a policy: greedy exact match on the eval keys (per prompt: the bootstrap's input) and on train keys of
the RL pool, the proxy's mean score of those greedy eval answers, and KL to SFT (`rule_world.kl_to`, `kl_samples`
temperature-1 answers per eval key). Writes OUT/seed<N>.json per seed (read back when its settings are the same),
OUT/rule_overoptimization.json, a markdown summary and OUT/card.json (a result card's JSON).
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Literal

import jax
import numpy as np

from rlhf_jax.checks import config_check
from rlhf_jax.config_cli import check_ranges, parse_cli
from rlhf_jax.recipes import rule_world as rw
from rlhf_jax.stats import best_of_n_expectation, bon_kl, rise_and_fall, seed_prompt_bootstrap
from rlhf_jax.tasks import skills


@dataclasses.dataclass(frozen=True, kw_only=True)
class RuleOveroptimizationConfig:
    """Best-of-n, PPO and DPO against the rule world's reward model (see the module docstring)."""

    models: str = "runs/rule_world"
    """A `rlhf-jax rule-world` output folder: seed N's models are MODELS/seed<N>/models (trained when missing)."""
    seeds: tuple[int, ...] = (0, 1, 2)
    """Seeds (each the rule world's seed)."""
    out: str = "runs/rule_overoptimization"
    """Output folder."""
    eval_split: Literal["test", "dev"] = "test"
    """Keys every policy is read on."""
    quick: bool = False
    """The rule world's --quick sizes and a few iterations (a smoke test)."""
    prompts: int = 256
    """Eval-split keys per seed (drawn fresh)."""
    pool: int = 32
    """SFT answers per prompt of the best-of-n pool."""
    ns: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    """Best-of-n sizes (each at most `pool`)."""
    ppo_kl_coefs: tuple[float, ...] = (0.0, 0.2, 1.0)
    """PPO's KL coefficients (0.2: the main job's)."""
    ppo_iterations: int = 100
    """PPO iterations of each run (the main job runs 40)."""
    eval_every: int = 20
    """PPO iterations between two reads."""
    dpo_betas: tuple[float, ...] = (0.1, 0.3, 1.0)
    """DPO's betas (0.3: the main job's)."""
    kl_samples: int = 2
    """Temperature-1 answers per eval key of the KL estimate."""
    ppo_minibatches: int = 4
    """Minibatches of PPO's 32 episodes per epoch (the main job's 4 of 8 rows; 1: one 32-row minibatch, as TRL's
    default, with larger matmuls and a quarter of the updates)."""

    def __post_init__(self):
        check_ranges(self, positive=("prompts", "pool", "ppo_iterations", "eval_every", "kl_samples",
                                     "ppo_minibatches"))
        config_check(self, 32 % self.ppo_minibatches == 0, f"ppo_minibatches = {self.ppo_minibatches} must divide "
                     "PPO's 32 episodes")
        config_check(self, self.ns and all(1 <= n <= self.pool for n in self.ns),
                     f"ns = {self.ns}: each in [1, pool = {self.pool}]")
        config_check(self, all(c >= 0 for c in self.ppo_kl_coefs) and all(b > 0 for b in self.dpo_betas),
                     "ppo_kl_coefs must be >= 0 and dpo_betas > 0")


def one_seed(cfg: RuleOveroptimizationConfig, seed: int) -> dict:
    world = rw.RuleWorldConfig(seed=seed, quick=cfg.quick, eval_split=cfg.eval_split).scaled()
    if cfg.quick:             # one PPO and one DPO run, a small pool: each run compiles its own steps
        cfg = dataclasses.replace(cfg, pool=4, ns=(1, 2, 4), ppo_kl_coefs=cfg.ppo_kl_coefs[:1],
                                  dpo_betas=cfg.dpo_betas[:1], kl_samples=1)
    models = rw.seed_models(world, os.path.join(cfg.models, f"seed{seed}", "models"))
    mc, sft, proxy = models.model_config, models.sft, models.reward
    sets = rw.draws(world)
    n_prompts = world.eval_prompts if cfg.quick else cfg.prompts
    evals = skills.skill_set(list(world.ops), n_prompts, 1000 * seed + 30, cfg.eval_split, skills.RULE_WORLD)
    train_keys, rl_tasks = sets["train_eval"], sets["rl"]
    gen = dict(max_new_tokens=world.max_new_tokens)
    rng = jax.random.PRNGKey(11000 + seed)
    t0 = time.time()

    def read(params) -> dict:
        texts = rw.answers(params, evals, mc, temperature=0.0, rng=rng, **gen)
        exact = rw.scores(evals, texts)[0]
        return {"exact": exact.tolist(), "mean": float(exact.mean()),
                "train_keys": float(rw.scores(train_keys, rw.answers(params, train_keys, mc, temperature=0.0,
                                                                     rng=rng, **gen))[0].mean()),
                "proxy": float(rw.rm_scores(proxy, evals, texts, mc).mean()),
                "kl": rw.kl_to(params, mc, sft, mc, evals, rng=jax.random.fold_in(rng, 1), samples=cfg.kl_samples,
                               **gen)}

    def log(msg):
        print(f"[rule_overoptimization] seed {seed} {msg} ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)

    out = {"seed": seed, "sft": read(sft), "pairs": len(models.pairs)}
    log(f"sft: {out['sft']['mean']:.3f}, proxy {out['sft']['proxy']:+.3f}")

    # Best of n from the SFT policy: a pool of temperature-1 answers, the proxy's pick in expectation.
    pool = [rw.answers(sft, evals, mc, temperature=1.0, rng=jax.random.fold_in(rng, 100 + i), **gen)
            for i in range(cfg.pool)]
    gold = np.stack([rw.scores(evals, p)[0] for p in pool], 1)                     # [P, pool]
    score = np.stack([rw.rm_scores(proxy, evals, p, mc) for p in pool], 1)
    ns = [n for n in cfg.ns if n <= gold.shape[1]]
    per_n = {}
    for n in ns:
        g = np.array([best_of_n_expectation(score[j], gold[j], n) for j in range(len(evals))])
        per_n[str(n)] = {"exact": g.tolist(), "mean": float(g.mean()), "kl": float(bon_kl(n)),
                         "proxy": float(np.mean([best_of_n_expectation(score[j], score[j], n)
                                                 for j in range(len(evals))])),
                         "gold_pick": float(np.mean([best_of_n_expectation(gold[j], gold[j], n)
                                                     for j in range(len(evals))]))}
    out["best_of_n"] = per_n
    log("best of n: " + ", ".join(f"{n}: {v['mean']:.3f}" for n, v in per_n.items()))

    # PPO against the proxy at each KL coefficient, read every eval_every iterations.
    iterations = 4 if cfg.quick else cfg.ppo_iterations
    every = 2 if cfg.quick else cfg.eval_every
    out["ppo"] = {}
    for coef in cfg.ppo_kl_coefs:
        curve = [{"iteration": 0, **{k: v for k, v in out["sft"].items()}}]

        def on_policy(step, params, curve=curve, coef=coef):
            if step % every == 0 or step == iterations:
                curve.append({"iteration": step, **read(params)})
                log(f"ppo kl {coef:g} iteration {step}: {curve[-1]['mean']:.3f}, proxy {curve[-1]['proxy']:+.3f}, "
                    f"KL {curve[-1]['kl']:.2f}")

        rw.ppo(sft, mc, rl_tasks, steps=iterations, lr=world.ppo_lr, kl=coef, seed=1000 * seed,
               reward_params=proxy, on_policy=on_policy, minibatches=cfg.ppo_minibatches, **gen)
        out["ppo"][f"{coef:g}"] = curve

    out["dpo"] = {}
    for beta in cfg.dpo_betas:
        params = rw.dpo(sft, mc, models.pairs, steps=world.dpo_steps, beta=beta, lr=world.dpo_lr, seed=1000 * seed)
        out["dpo"][f"{beta:g}"] = read(params)
        log(f"dpo beta {beta:g}: {out['dpo'][f'{beta:g}']['mean']:.3f}, KL {out['dpo'][f'{beta:g}']['kl']:.2f}")
    out["wall_s"] = round(time.time() - t0, 1)
    return out


def summarize(per_seed: list[dict]) -> dict:
    sft = [np.asarray(s["sft"]["exact"]) for s in per_seed]
    vs = lambda rows: seed_prompt_bootstrap([np.asarray(r["exact"]) for r in rows], sft, bounds=(-1.0, 1.0))  # noqa
    mean = lambda rows, key: float(np.mean([r[key] for r in rows]))  # noqa: E731
    out = {"sft": {k: mean([s["sft"] for s in per_seed], k) for k in ("mean", "train_keys", "proxy", "kl")}}
    out["best_of_n"] = {n: {"mean": mean([s["best_of_n"][n] for s in per_seed], "mean"),
                            "proxy": mean([s["best_of_n"][n] for s in per_seed], "proxy"),
                            "gold_pick": mean([s["best_of_n"][n] for s in per_seed], "gold_pick"),
                            "kl": per_seed[0]["best_of_n"][n]["kl"],
                            "vs_sft_greedy": vs([s["best_of_n"][n] for s in per_seed])}
                        for n in per_seed[0]["best_of_n"]}
    out["ppo"] = {}
    for coef, curve in per_seed[0]["ppo"].items():
        points = []
        for i, p in enumerate(curve):
            rows = [s["ppo"][coef][i] for s in per_seed]
            points.append({"iteration": p["iteration"], **{k: mean(rows, k) for k in ("mean", "train_keys", "proxy",
                                                                                       "kl")},
                           "vs_sft": vs(rows)})
        out["ppo"][coef] = {"points": points, "per_seed_shape": [rise_and_fall(s["ppo"][coef]) for s in per_seed]}
    out["dpo"] = {b: {**{k: mean([s["dpo"][b] for s in per_seed], k) for k in ("mean", "train_keys", "proxy", "kl")},
                      "vs_sft": vs([s["dpo"][b] for s in per_seed])} for b in per_seed[0]["dpo"]}
    return out


def markdown(result: dict) -> str:
    s = result["summary"]
    ci = lambda c: f"{c['delta']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}]"  # noqa: E731
    lines = [f"# Over-optimisation and the KL frontier in the rule world ({result['eval_split']} keys, seeds "
             f"{result['seeds']})", "", f"SFT greedy {s['sft']['mean']:.3f}, proxy {s['sft']['proxy']:+.3f}.", "",
             "| best of n | KL | gold of the proxy's pick | proxy | gold pick | vs SFT greedy |", "|---|---|---|---|---|---|"]
    for n, b in s["best_of_n"].items():
        lines.append(f"| {n} | {b['kl']:.2f} | {b['mean']:.3f} | {b['proxy']:+.3f} | {b['gold_pick']:.3f} | "
                     f"{ci(b['vs_sft_greedy'])} |")
    lines += ["", "| PPO KL coef | iteration | greedy gold | train keys | proxy | KL to SFT | vs SFT |",
              "|---|---|---|---|---|---|---|"]
    for coef, c in s["ppo"].items():
        for p in c["points"]:
            lines.append(f"| {coef} | {p['iteration']} | {p['mean']:.3f} | {p['train_keys']:.3f} | {p['proxy']:+.3f} "
                         f"| {p['kl']:.2f} | {ci(p['vs_sft'])} |")
        shapes = ", ".join(f"seed {sd}: {'rose then fell' if x['rose_then_fell'] else 'no'} (peak at "
                           f"{x['peak_iteration']})" for sd, x in zip(result["seeds"], c["per_seed_shape"]))
        lines.append(f"| {coef} | shape | {shapes} | | | | |")
    lines += ["", "| DPO beta | greedy gold | train keys | proxy | KL to SFT | vs SFT |", "|---|---|---|---|---|---|"]
    for b, d in s["dpo"].items():
        lines.append(f"| {b} | {d['mean']:.3f} | {d['train_keys']:.3f} | {d['proxy']:+.3f} | {d['kl']:.2f} | "
                     f"{ci(d['vs_sft'])} |")
    return "\n".join(lines)


def card(result: dict) -> dict:
    """A result card's JSON (`rlhf_jax.recipes.cards` layout)."""
    s, per = result["summary"], result["per_seed"]
    ci = lambda c: {"value": c["delta"], "ci": [c["low"], c["high"]], "signed": True}  # noqa: E731
    n_keys = len(per[0]["sft"]["exact"])
    rows_ppo = []
    for coef, c in s["ppo"].items():
        for p in c["points"]:
            rows_ppo.append([coef, p["iteration"], p["mean"], p["train_keys"], p["proxy"], p["kl"], ci(p["vs_sft"])])
    shape = lambda x: "one read" if x["peak_minus_start"] is None else (  # noqa: E731
        ("rose then fell" if x["rose_then_fell"] else "no") + f" (peak {x['peak_iteration']}, "
        f"{x['peak_minus_start']['delta']:+.3f} / {x['end_minus_peak']['delta']:+.3f})")
    shape_rows = [[coef, *[shape(x) for x in c["per_seed_shape"]]] for coef, c in s["ppo"].items()]
    return {
        "title": f"Over-optimisation and the KL frontier in the rule world ({result['eval_split']} keys, "
                 f"{len(per)} seeds)",
        "provenance": result["provenance"],
        "summary": [f"`experiments/rule_overoptimization.py`: from each seed's deployed SFT model and reward model "
                    f"(the rule world's main job, `recipes.rule_world.seed_models`), best-of-n by the reward model "
                    f"(the proxy), PPO against it at several KL coefficients, and DPO on its pairs at several betas, "
                    f"each scored by exact match (gold) on {n_keys} fresh {result['eval_split']} keys per seed. "
                    "Intervals: 95%, seeds and prompts resampled together, clipped to [-1, 1]."],
        "sections": [
            {"title": "Best of n against the reward model (from SFT at temperature 1)",
             "text": [f"{result['settings']['pool']} temperature-1 SFT answers per key; the proxy's pick among n in "
                      "expectation over every n-subset; KL = log n - (n - 1)/n; compared with SFT's greedy answer."],
             "tables": [{"columns": ["n", "KL", "gold of the proxy's pick", "proxy", "gold pick", "vs SFT greedy"],
                         "rows": [[n, b["kl"], b["mean"], b["proxy"], b["gold_pick"], ci(b["vs_sft_greedy"])]
                                  for n, b in s["best_of_n"].items()],
                         "formats": [None, ".2f", ".3f", "+.3f", ".3f", "+.3f"]}]},
            {"title": "PPO against the reward model",
             "text": ["Greedy gold on eval keys and on the RL pool's train keys, the proxy's score of the greedy "
                      "eval answers, KL to SFT from temperature-1 samples (nats per answer)."],
             "tables": [{"columns": ["KL coef", "iteration", "greedy gold", "train keys", "proxy", "KL to SFT",
                                     "vs SFT"], "rows": rows_ppo,
                         "formats": [None, None, ".3f", ".3f", "+.3f", ".2f", "+.3f"]},
                        {"columns": ["KL coef", *[f"seed {x['seed']}" for x in per]], "rows": shape_rows,
                         "formats": [None] * (1 + len(per))}]},
            {"title": "DPO on the reward model's pairs",
             "tables": [{"columns": ["beta", "greedy gold", "train keys", "proxy", "KL to SFT", "vs SFT"],
                         "rows": [[b, d["mean"], d["train_keys"], d["proxy"], d["kl"], ci(d["vs_sft"])]
                                  for b, d in s["dpo"].items()],
                         "formats": [None, ".3f", ".3f", "+.3f", ".2f", "+.3f"]}]}],
        "summary_data": s,
    }


def main(argv=None) -> None:
    rw.run_experiment("rule_overoptimization", parse_cli(RuleOveroptimizationConfig, argv), argv, one_seed,
                      summarize, markdown, card)


if __name__ == "__main__":
    main()
