"""The world's preference pairs as training records, and which of them are held out.

A labelled pair is a dict from `label_pairs` / `label_rankings` / `synthetic_pairs` ("prompt", "chosen",
"rejected", "group": the index of its prompt in the prompt set it came from, ...). The pairs of the first 10% of
each prompt set are held out to score the reward model; holding out whole prompts (by "group") keeps every pair
of a held-out ranking out of training.
"""
from __future__ import annotations

import numpy as np

from rlhf_jax.data import PreferenceRecord


def held_out(pair: dict, n_prompts: int) -> bool:
    """Whether a pair's prompt (its "group", an index into a prompt set of n_prompts) is among the first 10%."""
    return pair["group"] < n_prompts // 10


def pair_record(pair: dict) -> PreferenceRecord:
    """A labelled pair dict as a single-turn PreferenceRecord."""
    return PreferenceRecord(prompt=({"role": "user", "content": pair["prompt"]},), chosen=pair["chosen"],
                            rejected=pair["rejected"])


def split_pairs(on_policy: list[dict], off_policy: list[dict], n_prompts: int, n_off_prompts: int,
                rng: np.random.Generator) -> tuple[list[dict], list[PreferenceRecord], list[PreferenceRecord]]:
    """(all pairs shuffled, train records, test records): the pairs of the first 10% of each prompt set (of
    n_prompts and n_off_prompts prompts) are the test records. Prompt sets are i.i.d., so that is a random 10%."""
    is_test = [held_out(p, n_prompts) for p in on_policy] + [held_out(p, n_off_prompts) for p in off_policy]
    pairs = on_policy + off_policy
    order = rng.permutation(len(pairs))
    pairs, is_test = [pairs[i] for i in order], [is_test[i] for i in order]
    records = [pair_record(p) for p in pairs]
    return (pairs, [r for r, test in zip(records, is_test) if not test],
            [r for r, test in zip(records, is_test) if test])


def on_policy_records(on_policy: list[dict], n_prompts: int) -> list[PreferenceRecord]:
    """The pairs of the training prompts (not among the held-out 10%, see `split_pairs`), in prompt order."""
    return [pair_record(p) for p in on_policy if not held_out(p, n_prompts)]
