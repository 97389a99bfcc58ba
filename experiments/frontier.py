"""The reward-KL frontier of DPO, PPO and GRPO (Rafailov et al. 2023, "Direct Preference Optimization", Fig. 2).

    python -m experiments.frontier                              # seed 0 of runs/seeds (18 min alone on 2 cores)
    python -m experiments.frontier --seeds 0 1 2                # 45 min a seed beside 2 other jobs
    python -m experiments.frontier --quick --out /tmp/frontier  # smoke test (trains quick models)

From each seed's main-job SFT policy (`rlhf_jax.recipes.models`; a missing seed is trained first), the main job's
DPO, PPO and GRPO stages, exactly as it runs them, with one setting swept: DPO's beta, PPO's KL coefficient
(k1 in the reward, PPO-ptx on as in the main job), GRPO's KL coefficient (k3 in the loss; GRPO optimises the gold
reward itself, a verifier, where DPO and PPO learn from the careful annotators' labels). The main job's own
setting of each is its finished stage, loaded, not retrained. Every policy is scored on every distinct test-key
prompt (4 answers at temperature 0.7: gold reward, skills and safety groups) and its KL to SFT (temperature-1
samples), so each method traces gold against KL as its coefficient moves; the plot shows every seed's points and
the mean over seeds.

Writes frontier.json, frontier.md and frontier.png to --out (policies are not kept).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import time

import jax
import numpy as np

from rlhf_jax import recipes
from rlhf_jax import tasks as world
from rlhf_jax.config_cli import check_ranges, config_check, save_config
from rlhf_jax.data.iterators import Together
from rlhf_jax.recipes import populations as pop
from rlhf_jax.recipes.models import (
    DEFAULT_MODELS,
    ensure_seed,
    load,
    models_template,
    pipeline_config,
    script_main,
    write_report,
)
from rlhf_jax.recipes.stats import t_interval
from rlhf_jax.train import stages
from rlhf_jax.train.ppo import init_ppo_state
from rlhf_jax.train.state import create_train_state

METHODS = ("dpo", "ppo", "grpo")
_MAIN = {"dpo": "dpo.beta", "ppo": "ppo.kl_coef", "grpo": "grpo.kl_coef"}
"""The main job's option that each method's sweep moves."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class FrontierConfig:
    """The main job's DPO, PPO and GRPO at several strengths of their KL control (see the module docstring)."""

    seeds: tuple[int, ...] = (0,)
    """Seeds of the main job."""
    models: str = DEFAULT_MODELS
    """Run folder of each seed's main job ({seed} is replaced); with --quick the default is OUT/models/seed{seed}."""
    out: str = "runs/frontier"
    """Output folder."""
    quick: bool = False
    """Quick models, one extra setting per method: a smoke test, not a measurement."""
    dpo_betas: tuple[float, ...] = (0.03, 0.1, 0.3, 1.0)
    """DPO's beta (the main job's: 0.1)."""
    ppo_kl_coefs: tuple[float, ...] = (0.02, 0.05, 0.2, 0.5)
    """PPO's KL coefficient (the main job's: 0.2)."""
    grpo_kl_coefs: tuple[float, ...] = (0.0, 0.04, 0.2, 1.0)
    """GRPO's KL coefficient (the main job's: 0.04; 0: no reference model)."""
    eval_samples: int = 4
    """Answers per distinct test-key prompt."""

    def __post_init__(self):
        check_ranges(self, positive=("eval_samples",))
        config_check(self, len(self.seeds) > 0 and len(set(self.seeds)) == len(self.seeds) and min(self.seeds) >= 0,
                     f"seeds = {self.seeds} must be distinct non-negative integers")
        config_check(self, all(b > 0 for b in self.dpo_betas), f"dpo_betas = {self.dpo_betas} must be > 0")
        config_check(self, all(c >= 0 for c in (*self.ppo_kl_coefs, *self.grpo_kl_coefs)),
                     "KL coefficients must be >= 0")

    def scaled(self) -> "FrontierConfig":
        if not self.quick:
            return self
        return dataclasses.replace(self, dpo_betas=(0.1, 1.0), ppo_kl_coefs=(0.5,), grpo_kl_coefs=(0.0,),
                                   eval_samples=1)

    def settings(self, method: str) -> tuple[float, ...]:
        return {"dpo": self.dpo_betas, "ppo": self.ppo_kl_coefs, "grpo": self.grpo_kl_coefs}[method]


def _train(method: str, coef: float, pcfg, mc, sft_params, reward_params, records):
    """The main job's stage `method` with its swept option set to `coef` -> policy params."""
    keys = jax.random.split(jax.random.PRNGKey(pcfg.seed), 7)
    sampling = pcfg.sampling
    cfg = recipes.with_options(pcfg, {_MAIN[method]: coef})
    if method == "dpo":
        state = create_train_state(sft_params, cfg.dpo.optim, keys[6], total_steps=cfg.dpo.num_steps)
        state, _ = stages.run_dpo(state, recipes.preference_batches(cfg, records, cfg.seed + 1), cfg.dpo,
                                  model_config=mc, ref_params=sft_params)
        return state.params
    if method == "ppo":
        ppo_cfg = recipes.ppo_config(cfg, sampling)
        ptx = recipes.ptx_batches_of(cfg, recipes.demonstration_records(cfg))
        data = Together(recipes.rl_prompt_batches(cfg, cfg.ppo.batch_size, cfg.ppo.num_steps),
                        **({"ptx": ptx} if ptx is not None else {}))
        state = init_ppo_state(sft_params, ppo_cfg, model_config=mc, rng=keys[3], reward_params=reward_params)
        state, _ = stages.run_ppo(state, data, ppo_cfg, model_config=mc, ref_params=sft_params,
                                  reward_params=reward_params, ptx_data=ptx)
        return state.policy.params
    return recipes.train_grpo(cfg, recipes.grpo_config(cfg, sampling), mc, sft_params)[0]


def run(cfg: FrontierConfig, run_pipeline=None) -> dict:
    cfg = cfg.scaled()
    models = models_template(cfg.models, cfg.out, cfg.quick)
    os.makedirs(cfg.out, exist_ok=True)
    save_config(cfg, os.path.join(cfg.out, "config.json"))
    result = {"seeds": list(cfg.seeds), "models": models, "eval_samples": cfg.eval_samples,
              "settings": {m: list(cfg.settings(m)) for m in METHODS}, "per_seed": {}}
    path = os.path.join(cfg.out, "frontier.json")
    if os.path.exists(path):                  # points measured before on the same models are kept
        with open(path) as f:
            saved = json.load(f)
        if (saved.get("models"), saved.get("eval_samples")) == (models, cfg.eval_samples):
            result["per_seed"] = saved.get("per_seed", {})
    for seed in cfg.seeds:
        t0 = time.time()
        folder = ensure_seed(models, seed, ("sft", "reward", "ppo", "dpo", "grpo"), quick=cfg.quick,
                             run_pipeline=run_pipeline)
        pcfg = pipeline_config(folder)
        mc, sft_params = load(folder, "sft")
        _, rm = load(folder, "reward")
        evaluator = pop.test_evaluator(mc, pcfg.sampling.max_new_tokens, cfg.eval_samples, temperature=pcfg.sampling.temperature)
        rng = jax.random.PRNGKey(8000 + seed)
        evaluate = functools.partial(evaluator, ref_params=sft_params, reward_params=rm, rng=rng)
        points = result["per_seed"].setdefault(str(seed), {})
        if "sft" not in points:
            points["sft"] = _point(evaluate(sft_params)[0], 0.0, "sft")
        records = None
        for method in METHODS:
            main = recipes.get_option(pcfg, _MAIN[method])
            for coef in cfg.settings(method):
                name = f"{method}_{coef:g}"
                if name in points:
                    continue
                t = time.time()
                if coef == main:
                    params = load(folder, method)[1]       # the main job's own stage
                else:
                    if method == "dpo" and records is None:
                        tasks, samples = pop.sft_samples(pcfg, sft_params, mc, folder)
                        prefs = pop.population_data(pcfg, tasks, samples, pcfg.annotator)
                        records = (prefs.train_pairs if pcfg.dpo_pairs == "all" else
                                   world.on_policy_records(prefs.on_policy, len(prefs.tasks)))
                    params = _train(method, coef, pcfg, mc, sft_params, rm, records)
                points[name] = _point(evaluate(params)[0], coef, method, main=coef == main)
                print(f"[frontier] seed {seed} {name}: gold {points[name]['gold']:.3f}, KL {points[name]['kl']:.2f}"
                      f" ({time.time() - t:.0f} s)", file=sys.stderr, flush=True)
                with open(path, "w") as f:            # after every point: a stopped run keeps what it measured
                    json.dump(result, f, indent=2)
        points["seconds"] = points.get("seconds", 0.0) + time.time() - t0
    result["mean"] = _means(result, cfg)
    write_report(cfg.out, "frontier", result, _markdown(result, cfg), lambda: _plot(result, cfg))
    return result


def _point(m: dict, coef: float, method: str, main: bool = False) -> dict:
    return {"method": method, "coef": coef, "main_job": main, "gold": m["gold_reward"],
            "gold_skills": m["gold/skills"], "gold_safety": m["gold/safety"], "kl": m["kl_to_ref"],
            "proxy": m["rm_score"], "length": m["mean_length"], "refusal": m["refusal_rate"],
            "over_refusal": m["over_refusal_rate"]}


def _means(result: dict, cfg: FrontierConfig) -> dict:
    """Per setting, the mean over the seeds that measured it and the t-interval of its gold minus SFT's."""
    out = {}
    seeds = [s for s in map(str, cfg.seeds) if s in result["per_seed"]]
    for method in METHODS:
        for coef in cfg.settings(method):
            name = f"{method}_{coef:g}"
            have = [s for s in seeds if name in result["per_seed"][s]]
            if not have:
                continue
            pts = [result["per_seed"][s][name] for s in have]
            ci = t_interval([p["gold"] - result["per_seed"][s]["sft"]["gold"] for p, s in zip(pts, have)])
            out[name] = {"method": method, "coef": coef, "seeds": len(have),
                         **{k: float(np.mean([p[k] for p in pts])) for k in ("gold", "gold_skills", "gold_safety",
                                                                             "kl", "length")},
                         "gain": ci["mean"], "gain_low": ci["low"], "gain_high": ci["high"]}
    return out


def _markdown(result: dict, cfg: FrontierConfig) -> str:
    n = len(result["per_seed"])
    sft = np.mean([result["per_seed"][s]["sft"]["gold"] for s in result["per_seed"]])
    lines = ["# Gold reward against KL to SFT: DPO, PPO, GRPO", "",
             f"Mean over {n} seed(s) ({', '.join(result['per_seed'])}); every distinct test-key prompt; SFT's gold "
             f"{sft:.3f}. Gain = gold - SFT's gold, with a t-interval across seeds (n/a for one seed). "
             "Main job's setting marked *.", "",
             "| method | coefficient | gold | gain vs SFT [95% CI] | skills | safety | KL to SFT | length |",
             "|---|---|---|---|---|---|---|---|"]
    main = {m: {p["coef"] for s in result["per_seed"].values() for p in s.values()
                if isinstance(p, dict) and p.get("method") == m and p.get("main_job")} for m in METHODS}
    for name, p in result["mean"].items():
        ci = f"[{p['gain_low']:+.3f}, {p['gain_high']:+.3f}]" if p["seeds"] > 1 else "[n/a]"
        star = "*" if p["coef"] in main[p["method"]] else ""
        lines.append(f"| {p['method']} | {p['coef']:g}{star} | {p['gold']:.3f} | {p['gain']:+.3f} {ci} | "
                     f"{p['gold_skills']:.3f} | {p['gold_safety']:.3f} | {p['kl']:.2f} | {p['length']:.1f} |")
    return "\n".join(lines) + "\n"


def _plot(result: dict, cfg: FrontierConfig) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8), sharey=False)
    colours = {"dpo": "tab:blue", "ppo": "tab:orange", "grpo": "tab:green"}
    for ax, key, title in zip(axes, ("gold", "gold_skills", "gold_safety"), ("gold reward", "skills", "safety")):
        for seed, pts in result["per_seed"].items():
            ax.scatter([0.0], [pts["sft"][key]], color="black", s=12, alpha=0.5)
            for method in METHODS:
                ps = sorted((p for p in pts.values() if isinstance(p, dict) and p.get("method") == method),
                            key=lambda p: p["kl"])
                ax.scatter([p["kl"] for p in ps], [p[key] for p in ps], color=colours[method], s=10, alpha=0.35)
        for method in METHODS:
            ms = sorted((p for p in result["mean"].values() if p["method"] == method), key=lambda p: p["kl"])
            ax.plot([p["kl"] for p in ms], [p[key] for p in ms], marker="o", color=colours[method],
                    label=f"{method} (mean of seeds)")
        ax.set_xlabel("KL to SFT (nats per answer)")
        ax.set_title(f"{title} on test keys", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("gold (black: SFT)")
    axes[0].legend(fontsize="x-small")
    fig.tight_layout()
    fig.savefig(os.path.join(cfg.out, "frontier.png"), dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    return script_main(FrontierConfig, run, argv)


if __name__ == "__main__":
    sys.exit(main())
