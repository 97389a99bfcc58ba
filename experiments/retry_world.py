"""A multi-turn feedback task in the rule world: GRPO over episodes of `envs.SkillRetryEnv`, on held-out keys.

    python -m experiments.retry_world --models runs/rule_world --seeds 0 1 2 --out runs/retry_world
    python -m experiments.retry_world --models runs/rule_world --seeds 0 1 2 --trace-fraction 0.5 --eval-offset 35 \
        --out runs/retry_world_feedback          # the SFT model first sees feedback in its demonstrations
    python -m experiments.retry_world --quick --models /tmp/rule --seeds 0 --eval-split dev      # smoke test

The policy reverses a random string; a wrong answer gets the user's reply "wrong, try again" and a second try;
the reward is 1 for a right answer at either try (`envs.SkillRetryEnv`, tries 2). From each seed's deployed SFT
model of the rule world's main job (`recipes.rule_world.seed_models`, kept in MODELS/seed<N>/models and trained
there when missing), GRPO on episodes of the RL pool's train keys (`stages.run_grpo_env`: 16 tasks x 8 episodes an
iteration, the main job's GRPO settings, the loss only on the policy's own tokens). Both are read on `prompts`
fresh eval-split keys per seed by greedy episodes (each turn greedy): solved at the first try, solved within the
two tries, and the second try's success where the first failed. Writes OUT/seed<N>.json (read back when its
settings are the same), OUT/retry_world.json, a markdown summary and OUT/card.json.
"""
from __future__ import annotations

import dataclasses
import itertools
import os
import sys
import time
from typing import Literal

import jax
import numpy as np

from rlhf_jax.config_cli import check_ranges, parse_cli
from rlhf_jax.envs import EpisodeBudget, SkillRetryEnv
from rlhf_jax.generation import SamplingConfig
from rlhf_jax.recipes import TOK, rule_world as rw
from rlhf_jax.stats import seed_prompt_bootstrap
from rlhf_jax.tasks import skills
from rlhf_jax.train import stages
from rlhf_jax.train.grpo import GRPOConfig
from rlhf_jax.train.multiturn import make_turn_sampler, rollout_episodes
from rlhf_jax.train.optim import OptimConfig
from rlhf_jax.train.state import create_train_state

PROMPT_LEN, SEQ_LEN = 48, 128
"""Tokens of the opening prompt's bucket and of a whole episode (the rule world's model holds 128 positions)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class RetryWorldConfig:
    """GRPO on the rule world's feedback task (see the module docstring)."""

    models: str = "runs/rule_world"
    """A `rlhf-jax rule-world` output folder: seed N's models are MODELS/seed<N>/models (trained when missing)."""
    seeds: tuple[int, ...] = (0, 1, 2)
    """Seeds (each the rule world's seed)."""
    out: str = "runs/retry_world"
    """Output folder."""
    eval_split: Literal["test", "dev"] = "test"
    """Keys the policies are read on."""
    quick: bool = False
    """The rule world's --quick sizes and two iterations (a smoke test)."""
    prompts: int = 256
    """Eval-split keys per seed (drawn fresh)."""
    tries: int = 2
    """Answers per episode (the first, then one after each "wrong, try again")."""
    iterations: int = 80
    """GRPO iterations (the main job's single-turn GRPO runs 80)."""
    lr: float = 1e-4
    """GRPO's learning rate (the main job's)."""
    trace_fraction: float = 0.0
    """Above 0: the SFT model is fine-tuned again from the seed's pretrained model on the main job's demonstration
    prompts and demonstrator, of which this share, when wrong, go on with "wrong, try again" and the right answer
    (`recipes.rule_world.retry_demonstrations`); 0: the main job's deployed SFT model."""
    eval_offset: int = 33
    """Seed offset of the eval-split keys (their seed is 1000 * seed + eval_offset; 9..999, clear of the main
    job's draws)."""

    def __post_init__(self):
        check_ranges(self, positive=("prompts", "tries", "iterations", "lr"), unit=("trace_fraction",))
        rw.check_eval_offset(self)


def episodes(params, mc, tasks, *, tries: int, max_new_tokens: int, temperature: float, rng,
             num_generations: int = 1):
    """Rollouts of `tasks` (SkillTasks) with `SkillRetryEnv`, every turn sampled at `temperature` (0: greedy)."""
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, eos_id=TOK.eos_id,
                              pad_id=TOK.pad_id)
    turn = make_turn_sampler(sampling=sampling, model_config=mc)
    return rollout_episodes(lambda p, m, k: turn(params, None, p, m, k), lambda: SkillRetryEnv(tries=tries),
                            [{"op": t.op, "key": t.key} for t in tasks], rng, tokenizer=TOK,
                            budget=EpisodeBudget(max_turns=tries, max_tokens=SEQ_LEN), sampling=sampling,
                            prompt_len=PROMPT_LEN, seq_len=SEQ_LEN, num_generations=num_generations)


def read(params, mc, tasks, *, tries: int, max_new_tokens: int, rng) -> dict:
    """Greedy episodes: solved (either try) and solved at the first try, per prompt, and the rates."""
    r = episodes(params, mc, tasks, tries=tries, max_new_tokens=max_new_tokens, temperature=0.0, rng=rng)
    solved = np.asarray(r.rewards, np.float64)
    first = np.array([skills.gold_score(t, next((m["content"] for m in msgs if m["role"] == "assistant"), ""))["exact"]
                      for t, msgs in zip(tasks, r.messages)])
    retried = first == 0
    return {"solved": solved.tolist(), "first_try": first.tolist(), "mean": float(solved.mean()),
            "first_try_rate": float(first.mean()),
            "second_try_fixes": float(solved[retried].mean()) if retried.any() else float("nan"),
            "turns": float(np.mean(r.turns))}


def one_seed(cfg: RetryWorldConfig, seed: int) -> dict:
    world = rw.RuleWorldConfig(seed=seed, quick=cfg.quick, eval_split=cfg.eval_split).scaled()
    models = rw.seed_models(world, os.path.join(cfg.models, f"seed{seed}", "models"))
    mc, sft = models.model_config, models.sft
    if cfg.trace_fraction > 0:
        records = rw.retry_demonstrations(rw.draws(world)["demo"], world, trace_fraction=cfg.trace_fraction,
                                          seed=1000 * seed + 4)
        sft = rw.sft_records(models.base, mc, records, steps=world.sft_steps, batch_size=world.batch_size,
                             seq_len=world.seq_len, seed=1000 * seed + 20)
    n = world.eval_prompts if cfg.quick else cfg.prompts
    evals = skills.skill_set(list(world.ops), n, 1000 * seed + cfg.eval_offset, cfg.eval_split, skills.RULE_WORLD)
    pool = rw.draws(world)["rl"]
    kw = dict(tries=cfg.tries, max_new_tokens=world.max_new_tokens, rng=jax.random.PRNGKey(13000 + seed))
    steps = 2 if cfg.quick else cfg.iterations
    t0 = time.time()
    out = {"seed": seed, "sft": read(sft, mc, evals, **kw)}
    out["sft"]["train_keys"] = read(sft, mc, rw.draws(world)["train_eval"], **kw)["mean"]
    sampling = SamplingConfig(max_new_tokens=world.max_new_tokens, temperature=1.0, eos_id=TOK.eos_id,
                              pad_id=TOK.pad_id)
    gcfg = GRPOConfig(num_steps=steps, batch_size=16, num_generations=8, loss_type="dapo", sampling=sampling,
                      optim=OptimConfig(learning_rate=cfg.lr), log_every=max(1, steps // 4))
    state = create_train_state(sft, gcfg.optim, jax.random.PRNGKey(1000 * seed + 12), total_steps=steps)
    rng = np.random.default_rng(1000 * seed + 11)
    tasks = ([{"op": pool[i].op, "key": pool[i].key} for i in rng.choice(len(pool), 16, replace=False)]
             for _ in itertools.repeat(None))
    state, hist = stages.run_grpo_env(state, tasks, gcfg, model_config=mc, env_factory=lambda: SkillRetryEnv(
        tries=cfg.tries), tokenizer=TOK, budget=EpisodeBudget(max_turns=cfg.tries, max_tokens=SEQ_LEN),
        prompt_len=PROMPT_LEN, seq_len=SEQ_LEN)
    out["grpo"] = read(state.params, mc, evals, **kw)
    out["grpo"]["train_keys"] = read(state.params, mc, rw.draws(world)["train_eval"], **kw)["mean"]
    out["train_reward"] = [float(h["reward"]) for h in hist]
    out["turns_per_episode"] = [float(h.get("turns/mean", float("nan"))) for h in hist]
    out["wall_s"] = round(time.time() - t0, 1)
    print(f"[retry_world] seed {seed}: SFT {out['sft']['mean']:.3f} (first try {out['sft']['first_try_rate']:.3f}) "
          f"-> GRPO {out['grpo']['mean']:.3f} (first try {out['grpo']['first_try_rate']:.3f}); train keys "
          f"{out['sft']['train_keys']:.3f} -> {out['grpo']['train_keys']:.3f} ({out['wall_s']:.0f} s)",
          file=sys.stderr, flush=True)
    return out


def summarize(per_seed: list[dict]) -> dict:
    vs = lambda key: seed_prompt_bootstrap([np.asarray(s["grpo"][key]) for s in per_seed],  # noqa: E731
                                           [np.asarray(s["sft"][key]) for s in per_seed], bounds=(-1.0, 1.0))
    mean = lambda arm, key: float(np.nanmean([s[arm][key] for s in per_seed]))  # noqa: E731
    return {arm: {k: mean(arm, k) for k in ("mean", "first_try_rate", "second_try_fixes", "turns", "train_keys")}
            for arm in ("sft", "grpo")} | {"grpo_vs_sft": vs("solved"), "grpo_vs_sft_first_try": vs("first_try")}


def markdown(result: dict) -> str:
    s = result["summary"]
    ci = lambda c: f"{c['delta']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}]"  # noqa: E731
    lines = [f"# GRPO on the rule world's feedback task ({result['eval_split']} keys, seeds {result['seeds']})", "",
             "| policy | solved in 2 tries | first try | second try fixes | turns | train keys |",
             "|---|---|---|---|---|---|"]
    for arm in ("sft", "grpo"):
        a = s[arm]
        lines.append(f"| {arm} | {a['mean']:.3f} | {a['first_try_rate']:.3f} | {a['second_try_fixes']:.3f} | "
                     f"{a['turns']:.2f} | {a['train_keys']:.3f} |")
    lines += ["", f"GRPO - SFT, solved: {ci(s['grpo_vs_sft'])}; first try: {ci(s['grpo_vs_sft_first_try'])}"]
    return "\n".join(lines)


def sft_text(result: dict) -> str:
    """What the SFT model of `result` is, in words."""
    share = result["settings"].get("trace_fraction", 0.0)
    if not share:
        return "deployed SFT model of the rule world"
    return (f"SFT model fine-tuned from the rule world's pretrained model on the main job's demonstration prompts "
            f"and demonstrator, {share:.0%} of the demonstrations, when wrong, going on with \"wrong, try again\" "
            "and the right answer")


def card(result: dict) -> dict:
    """A result card's JSON (`rlhf_jax.recipes.cards` layout)."""
    s, per = result["summary"], result["per_seed"]
    ci = lambda c: {"value": c["delta"], "ci": [c["low"], c["high"]], "signed": True}  # noqa: E731
    primary = s["grpo_vs_sft"]
    return {
        "title": "GRPO on a multi-turn feedback task in the rule world"
                 f"{', feedback in the SFT demonstrations' if result['settings'].get('trace_fraction') else ''} "
                 f"({result['eval_split']} keys, {len(per)} seeds)",
        "provenance": result["provenance"],
        "summary": [f"`experiments/retry_world.py` (docs/tools.md): from each seed's {sft_text(result)}, GRPO over "
                    "episodes of `envs.SkillRetryEnv` (reverse a string; after a wrong answer the "
                    "user says \"wrong, try again\" and the policy answers once more; reward 1 for a right answer "
                    f"at either try) on train keys, {result['settings']['iterations']} iterations of 16 tasks x 8 "
                    f"episodes. Greedy episodes on {len(per[0]['sft']['solved'])} fresh {result['eval_split']} "
                    "keys per seed; intervals: 95%, seeds and prompts resampled together, clipped to [-1, 1]."],
        "sections": [{"title": "Primary comparison",
                      "tables": [{"columns": ["comparison", "estimate [95%]", "holds"],
                                  "rows": [["GRPO - SFT, solved within two tries", ci(primary),
                                            primary["low"] > 0]], "formats": [None, "+.3f", None]}]},
                     {"title": "Both policies",
                      "tables": [{"columns": ["policy", "solved in 2 tries", "first try", "second try fixes",
                                              "turns per episode", "train keys"],
                                  "rows": [[arm, s[arm]["mean"], s[arm]["first_try_rate"], s[arm]["second_try_fixes"],
                                            s[arm]["turns"], s[arm]["train_keys"]] for arm in ("sft", "grpo")],
                                  "formats": [None, ".3f", ".3f", ".3f", ".2f", ".3f"]},
                                 {"columns": ["comparison", "estimate [95%]"],
                                  "rows": [["GRPO - SFT, first try", ci(s["grpo_vs_sft_first_try"])]],
                                  "formats": [None, "+.3f"]}]},
                     {"title": "Per seed",
                      "tables": [{"columns": ["seed", "SFT", "GRPO", "GRPO train reward, first -> last"],
                                  "rows": [[x["seed"], x["sft"]["mean"], x["grpo"]["mean"],
                                            f"{x['train_reward'][0]:.3f} -> {x['train_reward'][-1]:.3f}"]
                                           for x in per], "formats": [None, ".3f", ".3f", None]}]}],
        "summary_data": s,
    }


def main(argv=None) -> None:
    rw.run_experiment("retry_world", parse_cli(RetryWorldConfig, argv), argv, one_seed, summarize, markdown, card)


if __name__ == "__main__":
    main()
