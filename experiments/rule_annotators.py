"""Annotators and AI feedback in the rule world: whose labels a reward model, PPO and DPO learn from.

    python -m experiments.rule_annotators --models runs/rule_world --seeds 0 1 2 --out runs/rule_annotators
    python -m experiments.rule_annotators --quick --models /tmp/rule --seeds 0 --eval-split dev    # smoke test

Every population of `POPULATIONS` labels the same pairs, each seed's reward-model pairs of the rule world's main
job (`recipes.rule_world.seed_models`: two temperature-1.5 SFT samples of a train key with different gold), so the
label counts are equal by construction; a population only decides which answer of a pair is chosen:

* careful: the gold order (the main job's labels and reward model);
* noisy: the gold order, reversed on a random `noise` share of pairs;
* length-loving: on a random `length_share` of pairs the longer answer (equal lengths: the gold order);
* ai-judge: the seed's oracle SFT model (perfect demonstrations) as the judge: the answer of higher
  log pi_judge(answer | prompt), end token included;
* ai-self: the same rule with the deployed SFT model judging its own samples.

For each: its labels' agreement with gold (all pairs, and the flaw pairs: the right answer against its truncation),
how often the longer answer wins; a reward model on the labels (the main job's recipe; careful: the main job's
own), read on gold pairs of SFT samples of eval-split keys; PPO on it and DPO on the labels (the main job's
recipes, from the deployed SFT model), read by greedy exact match and excess length (the answer's length
subtracted from the response's: negative when shorter) on `prompts` fresh eval-split keys per seed (`--quick`: the
rule world's quick count). The labelling functions are `rlhf_jax.recipes.rule_annotators`; the noisy and
length-loving populations draw from one generator per seed in population order, so a `--populations` subset
draws other labels than the full run. Design and hypotheses A1-A4: docs/world.md. Writes OUT/seed<N>.json (read
back when its settings are the same), OUT/rule_annotators.json, .md and OUT/card.json.
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
from rlhf_jax.recipes.rule_annotators import POPULATIONS, judge_prefers_first, population_keeps, relabel, verdicts
from rlhf_jax.stats import seed_prompt_bootstrap
from rlhf_jax.tasks import skills


@dataclasses.dataclass(frozen=True, kw_only=True)
class RuleAnnotatorsConfig:
    """Labeller populations and AI judges on the rule world (see the module docstring)."""

    models: str = "runs/rule_world"
    """A `rlhf-jax rule-world` output folder: seed N's models are MODELS/seed<N>/models (trained when missing)."""
    seeds: tuple[int, ...] = (0, 1, 2)
    """Seeds (each the rule world's seed)."""
    out: str = "runs/rule_annotators"
    """Output folder."""
    eval_split: Literal["test", "dev"] = "test"
    """Keys every policy and reward model is read on."""
    quick: bool = False
    """The rule world's --quick sizes (a smoke test)."""
    prompts: int = 256
    """Eval-split keys per seed (drawn fresh)."""
    populations: tuple[str, ...] = POPULATIONS
    """Populations to run (careful always runs: the comparisons are with it)."""
    noise: float = 0.25
    """Share of pairs whose gold order the noisy population reverses."""
    length_share: float = 0.5
    """Share of pairs the length-loving population decides by length."""

    def __post_init__(self):
        check_ranges(self, positive=("prompts",))
        config_check(self, set(self.populations) <= set(POPULATIONS),
                     f"populations = {self.populations}: choose from {POPULATIONS}")
        config_check(self, 0 <= self.noise <= 1 and 0 <= self.length_share <= 1,
                     f"noise = {self.noise} and length_share = {self.length_share} must be in [0, 1]")


def one_seed(cfg: RuleAnnotatorsConfig, seed: int) -> dict:
    world = rw.RuleWorldConfig(seed=seed, quick=cfg.quick, eval_split=cfg.eval_split).scaled()
    models = rw.seed_models(world, os.path.join(cfg.models, f"seed{seed}", "models"))
    mc, sft, pairs, sets = models.model_config, models.sft, models.pairs, rw.draws(world)
    n_prompts = world.eval_prompts if cfg.quick else cfg.prompts
    evals = skills.skill_set(list(world.ops), n_prompts, 1000 * seed + 51, cfg.eval_split, skills.RULE_WORLD)
    gen = dict(max_new_tokens=world.max_new_tokens)
    rng, t0 = jax.random.PRNGKey(13000 + seed), time.time()
    base = 1000 * seed

    def log(msg):
        print(f"[rule_annotators] seed {seed} {msg} ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)

    def read(params) -> dict:
        texts = rw.answers(params, evals, mc, temperature=0.0, rng=rng, **gen)
        exact = rw.scores(evals, texts)[0]
        excess = np.array([len(r.strip()) - len(t.answer) for t, r in zip(evals, texts)], np.float64)
        return {"exact": exact.tolist(), "mean": float(exact.mean()), "excess": excess.tolist(),
                "mean_excess": float(excess.mean())}

    task_of = {t.prompt: t for t in sets["rm_train"]}
    answer = [task_of[p.prompt[-1]["content"]].answer for p in pairs]
    flaw = np.array([p.chosen.strip() == a and p.rejected.strip() == a[:skills.TRUNCATE_AT] != a
                     for p, a in zip(pairs, answer)])
    judges = {}
    if "ai-judge" in cfg.populations:      # the oracle SFT model of the main job's recipe
        judges["ai-judge"] = judge_prefers_first(rw.sft(
            models.base, mc, [(t, t.answer) for t in sets["demo"]], steps=world.sft_steps,
            batch_size=world.batch_size, seq_len=world.seq_len, seed=base + 20), mc, pairs)
    if "ai-self" in cfg.populations:
        judges["ai-self"] = judge_prefers_first(sft, mc, pairs)
    eval_pairs, _ = rw.gold_pairs(sft, sets["rm_eval"], mc, samples=world.pair_samples,
                                  temperature=world.pair_temperature, rng=jax.random.fold_in(rw.sampling_key(world),
                                                                                             102), **gen)
    out = {"seed": seed, "pairs": len(pairs), "flaw_pairs": int(flaw.sum()), "eval_pairs": len(eval_pairs),
           "sft": read(sft), "populations": {}}
    log(f"sft: {out['sft']['mean']:.3f}; {len(pairs)} pairs ({int(flaw.sum())} flaw pairs)")
    label_rng = np.random.default_rng(base + 52)
    for name in dict.fromkeys(("careful", *cfg.populations)):
        keep = population_keeps(name, pairs, noise=cfg.noise, length_share=cfg.length_share, rng=label_rng,
                                judges=judges)
        labelled = relabel(pairs, keep)
        lengths = np.array([(len(p.chosen.strip()), len(p.rejected.strip())) for p in labelled])
        differ = lengths[:, 0] != lengths[:, 1]
        rm = models.reward if name == "careful" else rw.reward_model(sft, mc, labelled, steps=world.rm_steps,
                                                                      lr=world.rm_lr, seed=base)
        row = {"labels": {"gold_agreement": float(keep.mean()),
                          "flaw_agreement": float(keep[flaw].mean()) if flaw.any() else float("nan"),
                          "longer_wins": float((lengths[differ, 0] > lengths[differ, 1]).mean())
                          if differ.any() else float("nan")},
               "reward_model_accuracy": float(rw.pair_correct(rm, eval_pairs, mc).mean()) if eval_pairs
               else float("nan")}
        row["ppo"] = read(rw.ppo(sft, mc, sets["rl"], steps=world.ppo_steps, lr=world.ppo_lr, kl=world.ppo_kl,
                                 seed=base, reward_params=rm, **gen))
        row["dpo"] = read(rw.dpo(sft, mc, labelled, steps=world.dpo_steps, beta=world.dpo_beta, lr=world.dpo_lr,
                                 seed=base))
        out["populations"][name] = row
        log(f"{name}: labels {row['labels']['gold_agreement']:.3f} (flaw pairs "
            f"{row['labels']['flaw_agreement']:.3f}, longer wins {row['labels']['longer_wins']:.3f}), reward model "
            f"{row['reward_model_accuracy']:.3f}, ppo {row['ppo']['mean']:.3f} (excess "
            f"{row['ppo']['mean_excess']:+.2f}), dpo {row['dpo']['mean']:.3f} (excess "
            f"{row['dpo']['mean_excess']:+.2f})")
    out["wall_s"] = round(time.time() - t0, 1)
    return out


def summarize(per_seed: list[dict]) -> dict:
    names = [n for n in per_seed[0]["populations"] if all(n in s["populations"] for s in per_seed)]
    col = lambda name, stage, key: [np.asarray(s["populations"][name][stage][key]) for s in per_seed]  # noqa: E731
    sft = [np.asarray(s["sft"]["exact"]) for s in per_seed]
    mean = lambda xs: float(np.mean(xs))  # noqa: E731
    out = {"sft": mean([s["sft"]["mean"] for s in per_seed]), "populations": {}}
    for n in names:
        rows = [s["populations"][n] for s in per_seed]
        r = {k: mean([x["labels"][k] for x in rows]) for k in ("gold_agreement", "flaw_agreement", "longer_wins")}
        r["reward_model_accuracy"] = mean([x["reward_model_accuracy"] for x in rows])
        for stage in ("ppo", "dpo"):
            r[stage] = {"mean": mean([x[stage]["mean"] for x in rows]),
                        "mean_excess": mean([x[stage]["mean_excess"] for x in rows]),
                        "vs_sft": seed_prompt_bootstrap(col(n, stage, "exact"), sft, bounds=(-1.0, 1.0))}
            if n != "careful":
                r[stage]["vs_careful"] = seed_prompt_bootstrap(col(n, stage, "exact"), col("careful", stage, "exact"),
                                                               bounds=(-1.0, 1.0))
                r[stage]["excess_vs_careful"] = seed_prompt_bootstrap(col(n, stage, "excess"),
                                                                      col("careful", stage, "excess"))
        out["populations"][n] = r
    out["hypotheses"] = verdicts(out["populations"])
    return out


def _ci(c: dict) -> str:
    return f"{c['delta']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}]"


def markdown(result: dict) -> str:
    s = result["summary"]
    lines = [f"# Annotators and AI feedback in the rule world ({result['eval_split']} keys, seeds {result['seeds']})",
             "", f"Deployed SFT: {s['sft']:.3f} greedy exact match.", "",
             "| population | labels = gold | flaw pairs = gold | longer wins | reward model accuracy | PPO gold | "
             "PPO excess length | PPO vs careful | PPO excess vs careful | DPO gold | DPO vs SFT | DPO vs careful |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for n, r in s["populations"].items():
        vs = lambda st, k="vs_careful": _ci(r[st][k]) if k in r[st] else ""  # noqa: E731
        lines.append(f"| {n} | {r['gold_agreement']:.3f} | {r['flaw_agreement']:.3f} | {r['longer_wins']:.3f} | "
                     f"{r['reward_model_accuracy']:.3f} | {r['ppo']['mean']:.3f} | {r['ppo']['mean_excess']:+.2f} | "
                     f"{vs('ppo')} | {vs('ppo', 'excess_vs_careful')} | {r['dpo']['mean']:.3f} | "
                     f"{_ci(r['dpo']['vs_sft'])} | {vs('dpo')} |")
    lines += ["", "Hypotheses (docs/world.md): " + ", ".join(
        f"{k} {'holds' if v else 'fails'}" for k, v in s["hypotheses"].items())]
    return "\n".join(lines)


def card(result: dict) -> dict:
    """A result card's JSON (`rlhf_jax.recipes.cards` layout)."""
    s, per, cfg = result["summary"], result["per_seed"], result["settings"]
    c = lambda x: {"value": x["delta"], "ci": [x["low"], x["high"]], "signed": True} if x else None  # noqa: E731
    rows = [[n, r["gold_agreement"], r["flaw_agreement"], r["longer_wins"], r["reward_model_accuracy"],
             r["ppo"]["mean"], r["ppo"]["mean_excess"], c(r["ppo"].get("vs_careful")),
             c(r["ppo"].get("excess_vs_careful")), r["dpo"]["mean"], c(r["dpo"]["vs_sft"]),
             c(r["dpo"].get("vs_careful"))] for n, r in s["populations"].items()]
    return {
        "title": f"Annotators and AI feedback in the rule world ({result['eval_split']} keys, {len(per)} seeds)",
        "provenance": result["provenance"],
        "summary": [f"`experiments/rule_annotators.py`: every population relabels the same reward-model pairs of "
                    f"each seed's main job ({', '.join(s['populations'])}; careful = gold; noisy reverses "
                    f"{cfg['noise']:.0%} of the pairs; length-loving picks the longer answer on "
                    f"{cfg['length_share']:.0%}; ai-judge = the oracle SFT model's likelihood; ai-self = the deployed "
                    "model's own); a reward model, PPO on it and DPO on the labels, each by the main job's recipe "
                    "from the "
                    f"deployed SFT; greedy exact match on {len(per[0]['sft']['exact'])} fresh "
                    f"{result['eval_split']} keys per seed; intervals 95%, seeds and prompts resampled together. "
                    f"Flaw pairs: the right answer against its truncation to {skills.TRUNCATE_AT} letters. Excess "
                    "length: the response's length minus the answer's. Hypotheses A1-A4 (docs/world.md): " + ", ".join(
                        f"{k} {'holds' if v else 'fails'}" for k, v in s["hypotheses"].items()) + "."],
        "sections": [{"title": "Labels, reward models and policies by population",
                      "tables": [{"columns": ["population", "labels = gold", "flaw pairs = gold", "longer wins",
                                              "reward model accuracy", "PPO gold", "PPO excess length",
                                              "PPO vs careful", "PPO excess vs careful", "DPO gold", "DPO vs SFT",
                                              "DPO vs careful"],
                                  "rows": rows, "formats": [None, ".3f", ".3f", ".3f", ".3f", ".3f", "+.2f", "+.3f",
                                                            "+.2f", ".3f", "+.3f", "+.3f"]}]}],
        "summary_data": s,
    }


def main(argv=None) -> None:
    rw.run_experiment("rule_annotators", parse_cli(RuleAnnotatorsConfig, argv), argv, one_seed, summarize, markdown,
                      card)


if __name__ == "__main__":
    main()
