"""Learning to call a tool: GRPO over calculator episodes in the rule world, read on held-out keys.

    python -m experiments.calculator_world --models runs/calculator_world --seeds 0 1 2 --out runs/calculator_world
    python -m experiments.calculator_world --quick --models /tmp/calc --seeds 0 --eval-split dev     # smoke test

Each seed pretrains the calculator world's model and fine-tunes it on demonstrations that drop carries and, on a
quarter of them, call the calculator (`recipes.tool_world`; kept in MODELS/seed<N>/calculator and read back). From
that SFT model, GRPO over episodes of `envs.CalculatorEnv` on train keys (`stages.run_grpo_env`: 16 tasks x 8
episodes an iteration, the rule world's GRPO settings, the loss only on the policy's own tokens). Both policies are
read by greedy episodes on `prompts` fresh eval-split keys per seed: solved, the share of episodes that call the
tool, malformed calls. Writes OUT/seed<N>.json (read back when its settings are the same),
OUT/calculator_world.json, a markdown summary and OUT/card.json.
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

from rlhf_jax.checks import config_check
from rlhf_jax.config_cli import check_ranges, parse_cli
from rlhf_jax.losses import PG_LOSS_TYPES
from rlhf_jax.generation import SamplingConfig
from rlhf_jax.recipes import TOK, rule_world as rw, tool_world as tw
from rlhf_jax.stats import seed_prompt_bootstrap
from rlhf_jax.tasks import skills
from rlhf_jax.train import stages
from rlhf_jax.train.grpo import GRPOConfig
from rlhf_jax.train.optim import OptimConfig
from rlhf_jax.train.state import create_train_state


@dataclasses.dataclass(frozen=True, kw_only=True)
class CalculatorWorldConfig:
    """GRPO on the calculator world (see the module docstring)."""

    models: str = "runs/calculator_world"
    """Seed N's models are MODELS/seed<N>/calculator (trained when missing)."""
    seeds: tuple[int, ...] = (0, 1, 2)
    """Seeds (each the world's seed)."""
    out: str = "runs/calculator_world"
    """Output folder."""
    eval_split: Literal["test", "dev"] = "test"
    """Keys the policies are read on."""
    quick: bool = False
    """The rule world's --quick sizes and two iterations (a smoke test)."""
    prompts: int = 256
    """Eval-split keys per seed (drawn fresh)."""
    trace_fraction: float = 0.25
    """Share of the SFT demonstrations that call the calculator."""
    corpus_traces: float = 0.5
    """Share of the pretraining corpus's rule rows replaced by calculator traces (the tool's format)."""
    iterations: int = 80
    """GRPO iterations (the rule world's GRPO runs 80)."""
    lr: float = 1e-4
    """GRPO's learning rate (the rule world's)."""
    loss_type: str = "dapo"
    """GRPO's loss (`losses.PG_LOSS_TYPES`; the rule world's is DAPO's token-level mean)."""
    temperature: float = 1.0
    """GRPO's sampling temperature (its loss divides the logits by it too; the rule world's is 1)."""
    eval_offset: int = 34
    """Seed offset of the eval-split keys (their seed is 1000 * seed + eval_offset; 9..999, clear of the main
    job's draws)."""

    def __post_init__(self):
        check_ranges(self, positive=("prompts", "iterations", "lr", "temperature"),
                     unit=("trace_fraction", "corpus_traces"))
        config_check(self, self.loss_type in PG_LOSS_TYPES,
                     f"loss_type = {self.loss_type!r}: choose from {PG_LOSS_TYPES}")
        rw.check_eval_offset(self)


def one_seed(cfg: CalculatorWorldConfig, seed: int) -> dict:
    """One seed: its models, both policies' reads on eval-split and train keys, GRPO's training curve."""
    world = tw.world_config(seed, quick=cfg.quick, eval_split=cfg.eval_split)
    t0 = time.time()
    mc, _, sft = tw.seed_models(world, trace_fraction=cfg.trace_fraction, corpus_traces=cfg.corpus_traces,
                                cache=os.path.join(cfg.models, f"seed{seed}", "calculator"))
    models_s = round(time.time() - t0, 1)
    n = world.eval_prompts if cfg.quick else cfg.prompts
    evals = skills.skill_set(list(world.ops), n, 1000 * seed + cfg.eval_offset, cfg.eval_split, skills.RULE_WORLD)
    sets = rw.draws(world)
    train_eval, pool = sets["train_eval"], sets["rl"]
    steps = 2 if cfg.quick else cfg.iterations
    out = {"seed": seed, "sft": tw.read(sft, mc, evals, tw.evaluation_rng(seed))}
    out["sft"]["train_keys"] = tw.read(sft, mc, train_eval, tw.evaluation_rng(seed))["mean"]
    sampling = SamplingConfig(max_new_tokens=tw.MAX_NEW_TOKENS, temperature=cfg.temperature, eos_id=TOK.eos_id,
                              pad_id=TOK.pad_id)
    gcfg = GRPOConfig(num_steps=steps, batch_size=16, num_generations=8, loss_type=cfg.loss_type, sampling=sampling,
                      optim=OptimConfig(learning_rate=cfg.lr), log_every=max(1, steps // 8))
    state = create_train_state(sft, gcfg.optim, jax.random.PRNGKey(1000 * seed + 12), total_steps=steps)
    rng = np.random.default_rng(1000 * seed + 11)
    tasks = ([tw.calculator_task(pool[i]) for i in rng.choice(len(pool), gcfg.batch_size, replace=False)]
             for _ in itertools.repeat(None))
    t1 = time.time()
    state, hist = stages.run_grpo_env(state, tasks, gcfg, model_config=mc, env_factory=tw.environment,
                                      tokenizer=TOK, budget=tw.BUDGET, prompt_len=tw.PROMPT_LEN, seq_len=tw.SEQ_LEN)
    grpo_s = round(time.time() - t1, 1)
    out["grpo"] = tw.read(state.params, mc, evals, tw.evaluation_rng(seed))
    out["grpo"]["train_keys"] = tw.read(state.params, mc, train_eval, tw.evaluation_rng(seed))["mean"]
    out["train"] = {k: [float(h.get(k, float("nan"))) for h in hist]
                    for k in ("reward", "tools/calls", "tools/malformed_calls", "turns/mean", "episodes/max_len")}
    out["seconds"] = {"models": models_s, "grpo": grpo_s, "total": round(time.time() - t0, 1)}
    print(f"[calculator_world] seed {seed}: SFT {out['sft']['mean']:.3f} (tool {out['sft']['tool_call_rate']:.3f}) "
          f"-> GRPO {out['grpo']['mean']:.3f} (tool {out['grpo']['tool_call_rate']:.3f}); train keys "
          f"{out['sft']['train_keys']:.3f} -> {out['grpo']['train_keys']:.3f}; train reward "
          f"{out['train']['reward'][0]:.3f} -> {out['train']['reward'][-1]:.3f} ({out['seconds']['total']:.0f} s)",
          file=sys.stderr, flush=True)
    return out


ROWS = ("mean", "tool_call_rate", "malformed_per_episode", "turns", "carry_keys", "other_keys", "solved_with_tool",
        "solved_without_tool", "train_keys")


def defined(value) -> bool:
    """Whether a read's value exists (a rate over no episode is None)."""
    return value is not None and not (isinstance(value, float) and np.isnan(value))


def summarize(per_seed: list[dict]) -> dict:
    """Each policy's reads averaged over the seeds where they are defined, and the two primary comparisons."""
    vs = lambda key: seed_prompt_bootstrap([np.asarray(s["grpo"][key]) for s in per_seed],  # noqa: E731
                                           [np.asarray(s["sft"][key]) for s in per_seed], bounds=(-1.0, 1.0))

    def mean(arm, key):
        values = [s[arm][key] for s in per_seed if defined(s[arm][key])]
        return float(np.mean(values)) if values else None

    return {arm: {k: mean(arm, k) for k in ROWS} for arm in ("sft", "grpo")} | {
        "grpo_vs_sft": vs("solved"), "tool_calls_grpo_vs_sft": vs("called")}


def ci_text(c: dict) -> str:
    """An estimate with its interval, as text."""
    return f"{c['delta']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}]"


def markdown(result: dict) -> str:
    """The seeds' summary as a markdown table."""
    s = result["summary"]
    lines = [f"# GRPO on the calculator world ({result['eval_split']} keys, seeds {result['seeds']})", "",
             "| policy | " + " | ".join(ROWS) + " |", "|---" * (len(ROWS) + 1) + "|"]
    for arm in ("sft", "grpo"):
        lines.append(f"| {arm} | " + " | ".join(f"{s[arm][k]:.3f}" if defined(s[arm][k]) else "" for k in ROWS)
                     + " |")
    lines += ["", f"GRPO - SFT, solved: {ci_text(s['grpo_vs_sft'])}; episodes calling the tool: "
              f"{ci_text(s['tool_calls_grpo_vs_sft'])}"]
    return "\n".join(lines)


def card(result: dict) -> dict:
    """A result card's JSON (`rlhf_jax.recipes.cards` layout)."""
    s, per = result["summary"], result["per_seed"]
    ci = lambda c: {"value": c["delta"], "ci": [c["low"], c["high"]], "signed": True}  # noqa: E731
    solved, tools = s["grpo_vs_sft"], s["tool_calls_grpo_vs_sft"]
    labels = {"mean": "solved", "tool_call_rate": "episodes calling the tool", "malformed_per_episode":
              "malformed calls per episode", "turns": "turns per episode", "carry_keys": "solved, carrying keys",
              "other_keys": "solved, other keys", "solved_with_tool": "solved when calling",
              "solved_without_tool": "solved without calling", "train_keys": "solved, train keys"}
    return {
        "title": f"Learning to call a calculator: GRPO in the rule world's calculator world ({result['eval_split']} "
                 f"keys, {len(per)} seeds)",
        "provenance": result["provenance"],
        "summary": ["`experiments/calculator_world.py` (docs/tools.md): `add a b` over the rule world's keys; the "
                    "deployed SFT model learned from a demonstrator who drops carries on 85% of its direct answers "
                    f"and calls `envs.CalculatorEnv`'s `calculate` tool on {result['settings']['trace_fraction']:.0%} "
                    "of its demonstrations; the environment pays 1 for the right final answer, with or without the "
                    f"tool. GRPO from that model over episodes of train keys, {result['settings']['iterations']} "
                    "iterations of 16 tasks x 8 episodes sampled at temperature "
                    f"{result['settings'].get('temperature', 1.0):g}. Greedy episodes on "
                    f"{len(per[0]['sft']['solved'])} fresh {result['eval_split']} keys per seed; intervals: 95%, "
                    "seeds and prompts resampled together, clipped to [-1, 1]."],
        "sections": [{"title": "Primary comparisons",
                      "tables": [{"columns": ["comparison", "estimate [95%]", "holds"],
                                  "rows": [["GRPO - SFT, solved", ci(solved), solved["low"] > 0],
                                           ["GRPO - SFT, episodes calling the tool", ci(tools), tools["low"] > 0]],
                                  "formats": [None, "+.3f", None]}]},
                     {"title": "Both policies",
                      "tables": [{"columns": ["", "SFT", "GRPO"],
                                  "rows": [[labels[k], *(s[arm][k] if defined(s[arm][k]) else None
                                                         for arm in ("sft", "grpo"))] for k in ROWS],
                                  "formats": [None, ".3f", ".3f"]}]},
                     {"title": "Per seed",
                      "tables": [{"columns": ["seed", "SFT solved", "GRPO solved", "SFT calls", "GRPO calls",
                                              "train reward, first -> last", "seconds"],
                                  "rows": [[x["seed"], x["sft"]["mean"], x["grpo"]["mean"], x["sft"]["tool_call_rate"],
                                            x["grpo"]["tool_call_rate"],
                                            f"{x['train']['reward'][0]:.3f} -> {x['train']['reward'][-1]:.3f}",
                                            x["seconds"]["total"]] for x in per],
                                  "formats": [None, ".3f", ".3f", ".3f", ".3f", None, ".0f"]}]}],
        "summary_data": s,
    }


def main(argv=None) -> None:
    rw.run_experiment("calculator_world", parse_cli(CalculatorWorldConfig, argv), argv, one_seed, summarize, markdown,
                      card)


if __name__ == "__main__":
    main()
