"""Labeller populations of the rule world's pairs and their hypotheses (`experiments/rule_annotators.py`;
design and hypotheses A1-A4 in docs/world.md, "Annotators and AI feedback").

Every population relabels the same gold-ordered pairs (chosen = the gold-preferred answer): it keeps or swaps
each pair's order. careful keeps every pair; noisy swaps a random `noise` share; length-loving puts the longer
answer first on a random `length_share` of pairs; the AI judges keep the pair where the judge model gives the
chosen answer the higher log-probability.
"""
from __future__ import annotations

import dataclasses

import jax
import numpy as np

from rlhf_jax.data import PreferenceRecord
from rlhf_jax.recipes.rule_world import pair_batch
from rlhf_jax.train.steps import reference_logps

POPULATIONS = ("careful", "noisy", "length-loving", "ai-judge", "ai-self")
"""Every labeller population, in report order (careful first: the others are compared with it)."""
PAIR_LOGPS = jax.jit(reference_logps, static_argnames=("model_config",))


def judge_prefers_first(params, mc, records: list[PreferenceRecord]) -> np.ndarray:
    """[N] True where log pi(chosen | prompt) > log pi(rejected | prompt) under `params` (answers with their end
    token)."""
    out = []
    for i in range(0, len(records), 256):
        lp = PAIR_LOGPS(params, pair_batch(records[i:i + 256]), model_config=mc)
        out.append(np.asarray(lp["ref_chosen_logps"]) > np.asarray(lp["ref_rejected_logps"]))
    return np.concatenate(out) if out else np.zeros(0, bool)


def relabel(pairs: list[PreferenceRecord], keep: np.ndarray) -> list[PreferenceRecord]:
    """The pairs with chosen and rejected swapped where `keep` is False."""
    return [p if k else dataclasses.replace(p, chosen=p.rejected, rejected=p.chosen) for p, k in zip(pairs, keep)]


def population_keeps(name: str, pairs: list[PreferenceRecord], *, noise: float, length_share: float,
                     rng: np.random.Generator, judges: dict[str, np.ndarray]) -> np.ndarray:
    """[N] True where population `name` keeps the gold order of each pair (gold-chosen first); `judges` holds the
    AI judges' `judge_prefers_first` by population name."""
    n = len(pairs)
    if name == "careful":
        return np.ones(n, bool)
    if name == "noisy":
        return rng.random(n) >= noise
    if name == "length-loving":
        by_length = rng.random(n) < length_share
        longer_first = np.array([len(p.chosen.strip()) > len(p.rejected.strip()) for p in pairs])
        equal = np.array([len(p.chosen.strip()) == len(p.rejected.strip()) for p in pairs])
        return np.where(by_length & ~equal, longer_first, True)
    return judges[name]


def verdicts(pops: dict) -> dict:
    """A1-A4 of docs/world.md over `summarize`'s populations: True (holds) or False (fails; a NaN agreement, from
    seeds without flaw pairs, fails); a hypothesis whose population did not run is left out."""
    p = pops.get
    out = {}
    if p("length-loving"):
        ppo = p("length-loving")["ppo"]
        out["A1"] = ppo["excess_vs_careful"]["low"] > 0 and ppo["vs_careful"]["high"] < 0
    if p("noisy"):
        out["A2"] = abs(p("noisy")["reward_model_accuracy"] - p("careful")["reward_model_accuracy"]) < 0.1
    if p("ai-judge"):
        out["A3"] = p("ai-judge")["flaw_agreement"] >= 0.9 and p("ai-judge")["dpo"]["vs_careful"]["low"] > -0.1
    if p("ai-self"):
        out["A4"] = (p("ai-self")["flaw_agreement"] < 0.5 and not p("ai-self")["dpo"]["vs_sft"]["low"] > 0
                     and p("careful")["dpo"]["vs_sft"]["low"] > 0)
    return {k: bool(v) for k, v in out.items()}
