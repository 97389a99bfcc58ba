"""The generator-verifier gap in the rule world: gold reached per label, demonstrations against comparisons.

    python -m experiments.label_cost --models runs/rule_world --seeds 0 1 2 --out runs/label_cost
    python -m experiments.label_cost --quick --models /tmp/rule --seeds 0 --eval-split dev      # smoke test

Lecture 15's argument for preference data: judging an answer is easier than writing one, so a budget buys more
comparisons than demonstrations. Here both kinds of label improve the same seed's deployed SFT model (the rule
world's main job, `recipes.rule_world.seed_models`, whose demonstrations truncate long reversals):

* demonstrations: `demos` counts of perfect demonstrations of fresh train keys, each count SFT'd from the
  deployed model by the SFT recipe (100 steps, AdamW 3e-4 cosine);
* comparisons: `pairs` counts of the reward model's gold-labelled pairs (SFT samples, the right one chosen), each
  count DPO'd from the deployed model by the main job's DPO recipe (beta 0.3, lr 3e-5, 150 steps).

Each is read by greedy exact match on `prompts` fresh eval-split keys per seed. The break-even cost ratio of a
comparison count k is k / m*, where m* demonstrations reach the same mean gold (log-linear interpolation between
the measured counts): comparisons are the cheaper way to that gold when one demonstration costs more than k / m*
comparisons. Writes OUT/seed<N>.json (read back when its settings are the same), OUT/label_cost.json, a markdown
summary and OUT/card.json.
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
from rlhf_jax.stats import break_even, seed_prompt_bootstrap
from rlhf_jax.tasks import skills


@dataclasses.dataclass(frozen=True, kw_only=True)
class LabelCostConfig:
    """Demonstrations against comparisons from the deployed SFT model (see the module docstring)."""

    models: str = "runs/rule_world"
    """A `rlhf-jax rule-world` output folder: seed N's models are MODELS/seed<N>/models (trained when missing)."""
    seeds: tuple[int, ...] = (0, 1, 2)
    """Seeds (each the rule world's seed)."""
    out: str = "runs/label_cost"
    """Output folder."""
    eval_split: Literal["test", "dev"] = "test"
    """Keys every policy is read on."""
    quick: bool = False
    """The rule world's --quick sizes (a smoke test)."""
    prompts: int = 256
    """Eval-split keys per seed (drawn fresh)."""
    demos: tuple[int, ...] = (10, 30, 100, 300)
    """Counts of perfect demonstrations."""
    pairs: tuple[int, ...] = (100, 300, 1000)
    """Counts of gold-labelled comparisons (at most the seed's pairs)."""

    def __post_init__(self):
        check_ranges(self, positive=("prompts",))
        config_check(self, self.demos and self.pairs and min(self.demos + self.pairs) > 0,
                     f"demos = {self.demos} and pairs = {self.pairs}: at least one count each, every count > 0")


def one_seed(cfg: LabelCostConfig, seed: int) -> dict:
    world = rw.RuleWorldConfig(seed=seed, quick=cfg.quick, eval_split=cfg.eval_split).scaled()
    if cfg.quick:                             # a tiny world has a few pairs
        cfg = dataclasses.replace(cfg, demos=(4, 8), pairs=(4,))
    models = rw.seed_models(world, os.path.join(cfg.models, f"seed{seed}", "models"))
    mc, sft = models.model_config, models.sft
    n_prompts = world.eval_prompts if cfg.quick else cfg.prompts
    evals = skills.skill_set(list(world.ops), n_prompts, 1000 * seed + 31, cfg.eval_split, skills.RULE_WORLD)
    fresh = skills.skill_set(list(world.ops), max(cfg.demos), 1000 * seed + 32, "train", skills.RULE_WORLD)
    train_keys = rw.draws(world)["train_eval"]
    gen = dict(max_new_tokens=world.max_new_tokens)
    rng = jax.random.PRNGKey(12000 + seed)
    sft_kw = dict(steps=world.sft_steps, batch_size=world.batch_size, seq_len=world.seq_len, seed=1000 * seed + 40)
    order = np.random.default_rng(1000 * seed + 41).permutation(len(models.pairs))
    t0 = time.time()

    def read(params) -> dict:
        exact = rw.scores(evals, rw.answers(params, evals, mc, temperature=0.0, rng=rng, **gen))[0]
        return {"exact": exact.tolist(), "mean": float(exact.mean()),
                "train_keys": float(rw.scores(train_keys, rw.answers(params, train_keys, mc, temperature=0.0,
                                                                     rng=rng, **gen))[0].mean())}

    def log(msg):
        print(f"[label_cost] seed {seed} {msg} ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)

    out = {"seed": seed, "sft": read(sft), "available_pairs": len(models.pairs), "demos": {}, "pairs": {}}
    log(f"sft: {out['sft']['mean']:.3f}")
    for m in cfg.demos:
        out["demos"][str(m)] = read(rw.sft(sft, mc, [(t, t.answer) for t in fresh[:m]], **sft_kw))
        log(f"{m} demonstrations: {out['demos'][str(m)]['mean']:.3f}")
    for k in cfg.pairs:
        if k > len(models.pairs):
            log(f"{k} comparisons: skipped, the seed has {len(models.pairs)} pairs")
            continue
        chosen = [models.pairs[i] for i in order[:k]]
        out["pairs"][str(k)] = read(rw.dpo(sft, mc, chosen, steps=world.dpo_steps, beta=world.dpo_beta,
                                           lr=world.dpo_lr, seed=1000 * seed))
        log(f"{k} comparisons: {out['pairs'][str(k)]['mean']:.3f}")
    out["wall_s"] = round(time.time() - t0, 1)
    return out


def summarize(per_seed: list[dict]) -> dict:
    sft = [np.asarray(s["sft"]["exact"]) for s in per_seed]
    out = {"sft": float(np.mean([s["sft"]["mean"] for s in per_seed])), "demos": {}, "pairs": {}}
    for kind in ("demos", "pairs"):
        counts = [c for c in per_seed[0][kind] if all(c in s[kind] for s in per_seed)]
        for c in counts:
            rows = [s[kind][c] for s in per_seed]
            out[kind][c] = {"mean": float(np.mean([r["mean"] for r in rows])),
                            "train_keys": float(np.mean([r["train_keys"] for r in rows])),
                            "vs_sft": seed_prompt_bootstrap([np.asarray(r["exact"]) for r in rows], sft,
                                                            bounds=(-1.0, 1.0))}
    d_counts = sorted(int(c) for c in out["demos"])
    d_gold = [out["demos"][str(c)]["mean"] for c in d_counts]
    for c, p in out["pairs"].items():
        m = break_even(p["mean"], d_counts, d_gold)
        p["demos_for_same_gold"] = m
        p["break_even_cost_ratio"] = None if m is None else int(c) / m
    return out


def markdown(result: dict) -> str:
    s = result["summary"]
    ci = lambda c: f"{c['delta']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}]"  # noqa: E731
    lines = [f"# Demonstrations against comparisons in the rule world ({result['eval_split']} keys, seeds "
             f"{result['seeds']})", "", f"Deployed SFT: {s['sft']:.3f} greedy exact match.", "",
             "| labels | count | greedy gold | train keys | vs deployed SFT | demonstrations for the same gold | "
             "break-even cost ratio |", "|---|---|---|---|---|---|---|"]
    for kind in ("demos", "pairs"):
        for c, r in s[kind].items():
            m, ratio = r.get("demos_for_same_gold"), r.get("break_even_cost_ratio")
            lines.append(f"| {'demonstrations' if kind == 'demos' else 'comparisons'} | {c} | {r['mean']:.3f} | "
                         f"{r['train_keys']:.3f} | {ci(r['vs_sft'])} | {'' if m is None else f'{m:.0f}'} | "
                         f"{'' if ratio is None else f'{ratio:.1f}'} |")
    return "\n".join(lines)


def card(result: dict) -> dict:
    """A result card's JSON (`rlhf_jax.recipes.cards` layout)."""
    s, per = result["summary"], result["per_seed"]
    ci = lambda c: {"value": c["delta"], "ci": [c["low"], c["high"]], "signed": True}  # noqa: E731
    rows = [["demonstrations" if kind == "demos" else "comparisons", c, r["mean"], r["train_keys"], ci(r["vs_sft"]),
             r.get("demos_for_same_gold"), r.get("break_even_cost_ratio")]
            for kind in ("demos", "pairs") for c, r in s[kind].items()]
    return {
        "title": f"Demonstrations against comparisons in the rule world ({result['eval_split']} keys, {len(per)} "
                 "seeds)",
        "provenance": result["provenance"],
        "summary": [f"`experiments/label_cost.py`: from each seed's deployed SFT model (the rule world's main job), "
                    "SFT on perfect demonstrations of fresh train keys, or DPO on the reward model's gold-labelled "
                    f"comparisons, at several label counts; greedy exact match on {len(per[0]['sft']['exact'])} "
                    f"fresh {result['eval_split']} keys per seed; intervals 95%, seeds and prompts resampled "
                    "together. Break-even cost ratio: comparisons reach that gold for less when one demonstration "
                    "costs more than this many comparisons."],
        "sections": [{"title": "Gold against labels",
                      "tables": [{"columns": ["labels", "count", "greedy gold", "train keys", "vs deployed SFT",
                                              "demonstrations for the same gold", "break-even cost ratio"],
                                  "rows": rows, "formats": [None, None, ".3f", ".3f", "+.3f", ".0f", ".1f"]}]}],
        "summary_data": s,
    }


def main(argv=None) -> None:
    rw.run_experiment("label_cost", parse_cli(LabelCostConfig, argv), argv, one_seed, summarize, markdown, card)


if __name__ == "__main__":
    main()
