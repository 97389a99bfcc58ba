"""Reward functions on decoded text (host side), for RL with verifiable rewards.

A `RewardFunction` takes the prompt texts and the completion texts of a batch (as the RL stages decode them, the
prompt with its chat template) and returns float32 scores [B]. `combine` weights several of them.

* `gsm8k_reward`: 1 when the completion's final number equals the reference answer (GSM8K's "#### 72" format, or
  the last number of the completion), else 0 (Cobbe et al. 2021).
* `format_reward`: 1 when the completion matches a regular expression (e.g. an answer line), else 0.
* `world_reward(tasks, prompt_text)`: the exact gold reward of the synthetic world (`rlhf_jax.tasks`).
"""
from __future__ import annotations

import re
from typing import Callable, Sequence

import numpy as np

RewardFunction = Callable[[Sequence[str], Sequence[str]], np.ndarray]

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _number(text: str) -> float | None:
    """The number after "####" if there is one, else the last number in `text` (commas dropped)."""
    tail = text.split("####")[-1] if "####" in text else text
    found = _NUMBER.findall(tail)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def gsm8k_answer(solution: str) -> str:
    """The reference answer of a GSM8K solution ("... #### 72" -> "72")."""
    if "####" not in solution:
        raise ValueError("a GSM8K solution ends with '#### <answer>'")
    return solution.split("####")[-1].strip().replace(",", "")


def gsm8k_reward(prompts: Sequence[str], completions: Sequence[str], *, answers: Sequence[str]) -> np.ndarray:
    """1.0 where the completion's final number equals the reference answer (as numbers), else 0.0."""
    if len(completions) != len(answers):
        raise ValueError(f"gsm8k_reward: {len(completions)} completions but {len(answers)} answers")
    out = []
    for completion, answer in zip(completions, answers):
        got, want = _number(completion), _number(str(answer))
        out.append(float(got is not None and want is not None and abs(got - want) < 1e-6))
    return np.asarray(out, np.float32)


def format_reward(pattern: str) -> RewardFunction:
    """1.0 for completions in which `pattern` (a regular expression) matches, else 0.0."""
    compiled = re.compile(pattern, re.S)
    return lambda prompts, completions: np.asarray([float(bool(compiled.search(c))) for c in completions], np.float32)


def combine(*weighted: tuple[float, RewardFunction]) -> RewardFunction:
    """sum_k w_k * f_k(prompts, completions)."""
    def reward(prompts, completions):
        return np.sum([w * np.asarray(f(prompts, completions), np.float32) for w, f in weighted], axis=0,
                      dtype=np.float32)
    return reward


def chat_prompt_text(tokenizer) -> Callable:
    """task -> the prompt text a stage decodes for it: the task's messages through `tokenizer`'s chat template
    (`encode_prompt`), decoded. The key by which `world_reward` and `annotator_judge` look tasks up."""
    from rlhf_jax.tasks import messages_for
    from rlhf_jax.tokenizer import encode_prompt

    return lambda task: tokenizer.decode(encode_prompt(tokenizer, messages_for(task)))


def world_reward(tasks, prompt_text: Callable) -> RewardFunction:
    """The world's gold reward, each prompt text looked up among `tasks` by `prompt_text(task)` (the text the
    stage decodes: the prompt with its chat template). An unknown prompt is an error, not a 0."""
    from rlhf_jax.tasks import gold_reward

    by_text = {prompt_text(t): t for t in tasks}

    def reward(prompts, completions):
        missing = [p for p in prompts if p not in by_text]
        if missing:
            raise KeyError(f"world_reward: prompt {missing[0]!r} is not among the {len(by_text)} distinct task "
                           "prompts given")
        return np.asarray([gold_reward(by_text[p], c) for p, c in zip(prompts, completions)], np.float32)

    return reward


def annotator_judge(tasks, prompt_text: Callable, annotator, rng) -> RewardFunction:
    """The world's simulated annotators as a judge of sampled answers (online DPO's labels): each run of
    consecutive rows with the same prompt is one group, ranked by one annotator drawn from `annotator`
    (`rlhf_jax.tasks.rank_responses`: Plackett-Luce with the annotator's biases and lapses); a completion scores
    minus its rank (0 for the best). Identical completions share a score; a group with one distinct completion
    scores all 0 (no preference). `rng` (a numpy Generator) is consumed in call order."""
    from rlhf_jax.tasks import get_annotator, rank_responses
    from rlhf_jax.tasks.annotators import _draw_member

    by_text = {prompt_text(t): t for t in tasks}
    population = get_annotator(annotator)

    def judge(prompts, completions):
        missing = [p for p in prompts if p not in by_text]
        if missing:
            raise KeyError(f"annotator_judge: prompt {missing[0]!r} is not among the {len(by_text)} task prompts")
        scores = np.zeros(len(completions), np.float32)
        start = 0
        while start < len(prompts):
            end = start
            while end < len(prompts) and prompts[end] == prompts[start]:
                end += 1
            cands = list(dict.fromkeys(completions[start:end]))
            if len(cands) > 1:
                order = rank_responses(by_text[prompts[start]], cands, _draw_member(population, rng), rng)
                rank = {cands[i]: r for r, i in enumerate(order)}
                scores[start:end] = [-rank[c] for c in completions[start:end]]
            start = end
        return scores

    return judge
