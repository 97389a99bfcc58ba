"""Simulated preference labellers: human annotator populations and an AI-feedback judge.

Each annotator scores a response with a utility that mixes the gold reward with known human-label biases,

    u(x, y) = w_gold * gold(x, y) + w_len * len(y) / (len(y) + len_scale) + w_fmt * format(y) + w_phrase * [phrase in y]

(format(y) = 0.5 * [starts with a capital] + 0.5 * [ends with "." or "!"]; lengths in bytes), and picks between two
responses a (shown first) and b by a Bradley-Terry choice (Bradley & Terry 1952; Christiano et al. 2017, Eq. 1),

    P(a > b) = eps / 2 + (1 - eps) * sigmoid((u(a) - u(b) + position_bias) / temperature),

i.e. utilities perturbed by Gumbel noise of scale `temperature`, plus lapses (a coin flip with probability
eps = `flip_rate`). The length and format terms reproduce the biases reported for human and model raters
(Singhal et al. 2023, "A Long Way to Go: Investigating Length Correlations in RLHF"); the "ai-judge" follows RLAIF
(Bai et al. 2022, "Constitutional AI"; Lee et al. 2023) with a verbosity preference, a pet phrase and a small
position bias (Zheng et al. 2023, "Judging LLM-as-a-Judge").
"""
from __future__ import annotations

import dataclasses
from typing import Any, Union

import numpy as np

from rlhf_jax.tasks.corpus import synthetic_candidates
from rlhf_jax.tasks.world import Task, WorldConfig, gold_reward


@dataclasses.dataclass(frozen=True, kw_only=True)
class Annotator:
    """One labeller population: utility weights, choice temperature and biases."""

    name: str
    """Written into each labelled pair's "annotator" field."""
    w_gold: float = 1.0
    """Weight of the gold reward (what the labeller is supposed to judge)."""
    w_len: float = 0.0
    """Weight of the length bias len / (len + len_scale)."""
    w_fmt: float = 0.0
    """Weight of the formatting bias (capitalised start, full stop at the end)."""
    w_phrase: float = 0.0
    """Weight of the pet-phrase bias: 1 when `phrase` occurs in the response (case-insensitive)."""
    phrase: str = ""
    """The pet phrase (empty: none)."""
    len_scale: float = 16.0
    """Bytes at which the length bias reaches 1/2."""
    temperature: float = 0.1
    """Bradley-Terry temperature: larger means noisier choices."""
    position_bias: float = 0.0
    """Utility bonus of the response shown first (a)."""
    flip_rate: float = 0.0
    """Probability of a lapse, where the choice is a fair coin flip."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Mixture:
    """A crowd of populations: each pair is labelled by one member drawn with probability proportional to weight."""

    name: str
    members: tuple[tuple[Annotator, float], ...]
    """(annotator, weight) pairs."""


AnnotatorLike = Union[Annotator, Mixture, str]

_CAREFUL = Annotator(name="careful", w_gold=1.0, w_len=0.05, w_fmt=0.05, temperature=0.1)
_LENGTH = Annotator(name="length-loving", w_gold=0.3, w_len=1.0, temperature=0.1)
_FORMAT = Annotator(name="format-loving", w_gold=0.5, w_fmt=0.6, temperature=0.1)
ANNOTATORS: dict[str, Annotator | Mixture] = {
    "careful": _CAREFUL,
    "length-loving": _LENGTH,
    "format-loving": _FORMAT,
    "noisy": Annotator(name="noisy", w_gold=1.0, temperature=0.5, flip_rate=0.2),
    "ai-judge": Annotator(name="ai-judge", w_gold=0.8, w_len=0.3, w_phrase=0.2, phrase="the answer is",
                          temperature=0.1, position_bias=0.05),
    "mixture": Mixture(name="mixture", members=((_CAREFUL, 0.6), (_LENGTH, 0.2), (_FORMAT, 0.2))),
}
"""Named populations. "careful" tracks gold closely; "length-loving" and "format-loving" are biased crowds;
"noisy" is careful but inattentive; "ai-judge" is the RLAIF labeller; "mixture" is 60/20/20 careful/length/format."""


def get_annotator(annotator: AnnotatorLike) -> Annotator | Mixture:
    """Looks a name up in ANNOTATORS; passes Annotator and Mixture objects through."""
    if isinstance(annotator, str):
        if annotator not in ANNOTATORS:
            raise ValueError(f"unknown annotator {annotator!r}; expected one of {sorted(ANNOTATORS)}")
        return ANNOTATORS[annotator]
    return annotator


def _draw_member(annotator: Annotator | Mixture, rng: np.random.Generator) -> Annotator:
    """The annotator itself, or for a Mixture one member drawn with probability proportional to its weight."""
    if not isinstance(annotator, Mixture):
        return annotator
    w = np.asarray([m[1] for m in annotator.members], dtype=np.float64)
    return annotator.members[int(rng.choice(len(w), p=w / w.sum()))][0]


def length_bias(text: str, scale: float) -> float:
    """len / (len + scale) in bytes: grows with length, saturates at 1."""
    n = len(text.strip().encode())
    return n / (n + scale)


def format_bias(text: str) -> float:
    """0.5 * [first character is a capital letter] + 0.5 * [ends with "." or "!"]."""
    t = text.strip()
    return 0.5 * float(t[:1].isupper()) + 0.5 * float(t.endswith((".", "!")))


def utility(annotator: Annotator, task: Task, response: str, config: WorldConfig = WorldConfig()) -> float:
    """The annotator's (noise-free) utility of a response; see the module docstring."""
    u = annotator.w_gold * gold_reward(task, response, config)
    u += annotator.w_len * length_bias(response, annotator.len_scale)
    u += annotator.w_fmt * format_bias(response)
    if annotator.phrase:
        u += annotator.w_phrase * float(annotator.phrase.lower() in response.lower())
    return u


def preference_prob(annotator: Annotator, task: Task, response_a: str, response_b: str,
                    config: WorldConfig = WorldConfig(), *, bonus_a: float = 0.0, bonus_b: float = 0.0) -> float:
    """P(the annotator prefers a, shown first, over b) under Bradley-Terry with lapses. `bonus_a` / `bonus_b` are
    added to the two utilities: what a text-only utility cannot know, e.g. an AI judge's own log-probability of the
    answer (self-preference)."""
    z = (utility(annotator, task, response_a, config) + bonus_a - utility(annotator, task, response_b, config)
         - bonus_b + annotator.position_bias) / annotator.temperature
    p = 0.5 * (1.0 + np.tanh(0.5 * z))  # sigmoid, overflow-free
    return float(0.5 * annotator.flip_rate + (1.0 - annotator.flip_rate) * p)


def label_pairs(tasks: list[Task], responses_a: list[str], responses_b: list[str], annotator: AnnotatorLike,
                rng: np.random.Generator, *, drop_identical: bool = True, bonus: list[tuple[float, float]] | None = None,
                config: WorldConfig = WorldConfig()) -> list[dict[str, Any]]:
    """Labels each (task, a, b) triple; a is the response shown first (position bias applies to it). `bonus[i]`:
    (bonus_a, bonus_b) added to the utilities of pair i (see `preference_prob`).

    Returns dicts {"prompt", "chosen", "rejected", "annotator" (the member that labelled, for a Mixture),
    "p_chosen" (the probability of the choice that was made), "family", "gold_chosen", "gold_rejected",
    "group" (the task's index)}.
    Pairs with identical responses carry no preference and are dropped unless `drop_identical=False`.
    """
    if not len(tasks) == len(responses_a) == len(responses_b):
        raise ValueError(f"lengths differ: {len(tasks)} tasks, {len(responses_a)} a, {len(responses_b)} b")
    ann = get_annotator(annotator)
    pairs = []
    for group, (task, a, b) in enumerate(zip(tasks, responses_a, responses_b)):
        if drop_identical and a == b:
            continue
        member = _draw_member(ann, rng)
        bonus_a, bonus_b = (0.0, 0.0) if bonus is None else bonus[group]
        p = preference_prob(member, task, a, b, config, bonus_a=bonus_a, bonus_b=bonus_b)
        a_wins = rng.random() < p
        chosen, rejected = (a, b) if a_wins else (b, a)
        pairs.append({"prompt": task.prompt, "chosen": chosen, "rejected": rejected, "annotator": member.name,
                      "p_chosen": p if a_wins else 1.0 - p, "family": task.family,
                      "gold_chosen": gold_reward(task, chosen, config),
                      "gold_rejected": gold_reward(task, rejected, config), "group": group})
    return pairs


def synthetic_pairs(tasks: list[Task], annotator: AnnotatorLike, rng: np.random.Generator, *,
                    kinds: tuple[str, ...] = ("correct", "near", "wrong", "truncated", "verbose", "formatted",
                                              "refusal"),
                    config: WorldConfig = WorldConfig()) -> list[dict[str, Any]]:
    """Preference pairs without a model: two distinct `perturb` candidates per task (random order), labelled."""
    a_list, b_list = [], []
    for task in tasks:
        cands = synthetic_candidates(task, rng, kinds=kinds)
        i, j = rng.choice(len(cands), size=2, replace=False)
        a_list.append(cands[int(i)][1])
        b_list.append(cands[int(j)][1])
    return label_pairs(tasks, a_list, b_list, annotator, rng, config=config)


def rank_responses(task: Task, responses: list[str], annotator: Annotator, rng: np.random.Generator, *,
                   bonus: list[float] | None = None, config: WorldConfig = WorldConfig()) -> list[int]:
    """One annotator's ranking of K responses to one prompt, best first (indices into `responses`).

    Plackett-Luce with Gumbel noise, the ranking model whose pairwise marginals are exactly the Bradley-Terry
    choices of `preference_prob` (Luce 1959; InstructGPT's labellers rank K = 4..9 responses per prompt, Ouyang et
    al. 2022, Sec. 3.5): sort by u_i + position_bias * [i == 0] + temperature * Gumbel_i. With probability
    `flip_rate` the annotator lapses and the ranking is a uniformly random permutation. `bonus[i]` is added to
    u_i (see `preference_prob`).
    """
    if rng.random() < annotator.flip_rate:
        return [int(i) for i in rng.permutation(len(responses))]
    u = np.asarray([utility(annotator, task, r, config) for r in responses], dtype=np.float64)
    if bonus is not None:
        u += np.asarray(bonus, dtype=np.float64)
    u[0] += annotator.position_bias
    noisy = u + annotator.temperature * rng.gumbel(size=len(responses))
    return [int(i) for i in np.argsort(-noisy, kind="stable")]


def label_rankings(tasks: list[Task], responses: list[list[str]], annotator: AnnotatorLike,
                   rng: np.random.Generator, *, pairs: str = "all", bonus: list[list[float]] | None = None,
                   config: WorldConfig = WorldConfig()) -> list[dict[str, Any]]:
    """Ranks the K responses of each task (`rank_responses`) and turns each ranking into preference pairs.

    pairs="all": every (better, worse) pair of distinct responses, up to K(K-1)/2 per prompt (InstructGPT's reward
    model trains on all of them); pairs="best-worst": the top- against the bottom-ranked distinct response, one pair
    per prompt (the choice for DPO-style training on the most decisive comparison). Duplicate responses are ranked
    once. Each dict has the fields of `label_pairs` plus "rank_chosen"/"rank_rejected" (0 = best) and "group"
    (the task's index, to keep a prompt's pairs on one side of a train/test split); "p_chosen" is the
    Bradley-Terry probability of that pairwise choice. `bonus[t][k]` is added to the utility of
    `responses[t][k]` (see `preference_prob`).
    """
    if len(tasks) != len(responses):
        raise ValueError(f"lengths differ: {len(tasks)} tasks, {len(responses)} response lists")
    if pairs not in ("all", "best-worst"):
        raise ValueError(f"pairs must be 'all' or 'best-worst', got {pairs!r}")
    ann = get_annotator(annotator)
    out = []
    for group, (task, cands) in enumerate(zip(tasks, responses)):
        first = {}
        for k, c in enumerate(cands):
            first.setdefault(c, k)                 # distinct, first-shown order kept
        extra = None if bonus is None else [float(bonus[group][k]) for k in first.values()]
        cands = list(first)
        if len(cands) < 2:
            continue
        member = _draw_member(ann, rng)
        order = rank_responses(task, cands, member, rng, bonus=extra, config=config)
        ranked = [(order[0], order[-1])] if pairs == "best-worst" else [
            (order[i], order[j]) for i in range(len(order)) for j in range(i + 1, len(order))]
        for i, j in ranked:
            chosen, rejected = cands[i], cands[j]
            out.append({"prompt": task.prompt, "chosen": chosen, "rejected": rejected, "annotator": member.name,
                        "p_chosen": _pair_prob(member, task, cands, i, j, config, extra),
                        "family": task.family, "gold_chosen": gold_reward(task, chosen, config),
                        "gold_rejected": gold_reward(task, rejected, config),
                        "rank_chosen": order.index(i), "rank_rejected": order.index(j), "group": group})
    return out


def _pair_prob(annotator: Annotator, task: Task, cands: list[str], i: int, j: int, config: WorldConfig,
               bonus: list[float] | None = None) -> float:
    """P(cands[i] beats cands[j]) under Bradley-Terry; the position bias counts only for cands[0], shown first."""
    b = [0.0] * len(cands) if bonus is None else bonus
    if j == 0:
        return 1.0 - preference_prob(annotator, task, cands[j], cands[i], config, bonus_a=b[j], bonus_b=b[i])
    if i != 0:
        annotator = dataclasses.replace(annotator, position_bias=0.0)
    return preference_prob(annotator, task, cands[i], cands[j], config, bonus_a=b[i], bonus_b=b[j])
