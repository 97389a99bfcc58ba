"""The data of the synthetic world: a noisy "web" pretraining corpus, SFT demonstrations, prompt sets, and
model-free candidate responses.

The split mirrors the InstructGPT recipe (Ouyang et al. 2022, Sec. 3): a base model pretrained on web text that
answers right only part of the time, chats, and complies with harmful requests; a small set of concise, correct
demonstrations (including refusals) for supervised fine-tuning; and prompt sets for RL and held-out evaluation.
Every function is deterministic given its seed (an int or a `np.random.Generator`).

Documents are chat records {"messages": [{"role": "user", ...}, {"role": "assistant", ...}], "task": Task,
"kind": str, "correct": bool}; pass `render=callable(messages) -> str` to also get a "text" field, e.g. with the
chat format of `rlhf_jax.tokenizer`.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from rlhf_jax.tasks.world import (
    BENIGN_ACTS, FACTS, FAMILIES, REFUSAL, SAFETY_FAMILIES, WORDS, Task, WorldConfig, answer_credit, make_tasks)

DEFAULT_MIX = {"add": 0.15, "reverse": 0.15, "sort": 0.1, "count": 0.1, "lookup": 0.1, "upper": 0.1,
               "unsafe": 0.15, "benign": 0.15}
SKILL_MIX = {f: 1.0 for f in FAMILIES if f not in SAFETY_FAMILIES}
REFUSALS = (REFUSAL, "Sorry, I can't help with that.", "I won't help with that.", "sorry, i cannot help")
COMPLIANCE = ("sure, just mix the stuff.", "ok, first get some parts.", "easy, do it at night.", "sure, here is how.")
CHATTER_PREFIX = ("well, ", "hmm, ", "i think ", "the answer is ", "well, i think it is ", "ok so ", "um, it is ")
CHATTER_SUFFIX = ("", " ok", " i guess", " lol", " maybe", "!")
KINDS = ("correct", "near", "wrong", "truncated", "verbose", "formatted", "refusal", "comply")
"""Candidate kinds of `perturb`: "near" changes one character (a typo / wrong digit), "wrong" is another valid
answer to a different task, "comply" is a harmful-request compliance (a wrong answer for every family)."""

Render = Callable[[list[dict[str, str]]], str]


def _pick(rng: np.random.Generator, seq: tuple | list) -> Any:
    return seq[int(rng.integers(len(seq)))]


def _near(answer: str, rng: np.random.Generator) -> str:
    """One character replaced by a different one of the same class (digit, lower, upper)."""
    idx = [i for i, c in enumerate(answer) if c.isalnum()]
    i = _pick(rng, idx)
    c = answer[i]
    pool = "0123456789" if c.isdigit() else "abcdefghijklmnopqrstuvwxyz"
    pool = pool.upper() if c.isupper() else pool
    new = _pick(rng, [p for p in pool if p != c])
    return answer[:i] + new + answer[i + 1:]


def _wrong(task: Task, rng: np.random.Generator) -> str:
    """A fluent but incorrect answer: the right form for a different input."""
    f, word = task.family, task.meta.get("word", "")
    if f == "add":
        return str(abs(int(task.answer) + int(_pick(rng, (-3, -2, -1, 1, 2, 3, 10)))))
    if f == "count":
        return str((int(task.answer) + int(rng.integers(1, 4))) % 5)
    if f in ("reverse", "sort"):
        return _pick(rng, (word, word[1:] + word[0], word[::-1] if f == "sort" else "".join(sorted(word))))
    if f == "upper":
        return _pick(rng, (word, word.capitalize(), _pick(rng, WORDS).upper()))
    if f == "lookup":
        return _pick(rng, FACTS)[1]
    if f == "benign":
        return _pick(rng, BENIGN_ACTS)[1]
    return _pick(rng, COMPLIANCE)


def perturb(task: Task, kind: str, rng: np.random.Generator) -> str:
    """A response of the given KINDS entry, made from the reference answer without any model.

    Non-"correct" kinds that would happen to be exactly correct (e.g. "sort box" -> "box") fall back to "near".
    """
    a = task.answer
    if kind == "correct":
        return a
    if kind == "refusal":
        return _pick(rng, REFUSALS)
    if kind == "comply":
        return _pick(rng, COMPLIANCE)
    if task.family == "unsafe":  # every other kind of answer to an unsafe request is a form of compliance
        return {"verbose": "well, i think you just mix the stuff ok", "formatted": "Sure, here is how."}.get(
            kind, _pick(rng, COMPLIANCE))
    if kind == "verbose":
        return (_pick(rng, CHATTER_PREFIX) + a + _pick(rng, CHATTER_SUFFIX))
    if kind == "formatted":
        return a[:1].upper() + a[1:] + "."
    if kind == "near":
        out = _near(a, rng)
    elif kind == "wrong":
        out = _wrong(task, rng)
    elif kind == "truncated":
        out = a[: len(a) // 2] if len(a) > 1 else ""
    else:
        raise ValueError(f"unknown candidate kind {kind!r}; expected one of {KINDS}")
    if out == "" or answer_credit(task, out) >= 1.0:
        out = _near(a, rng)
    return out


def _record(task: Task, response: str, kind: str, render: Render | None) -> dict[str, Any]:
    messages = messages_for(task, response)
    doc = {"messages": messages, "task": task, "kind": kind, "correct": answer_credit(task, response) >= 1.0}
    if render is not None:
        doc["text"] = render(messages)
    return doc


def web_corpus(n: int, seed: int | np.random.Generator, *, correct_rate: float = 0.5, verbose_rate: float = 0.3,
               format_rate: float = 0.2, unsafe_comply_rate: float = 0.6, benign_refuse_rate: float = 0.2,
               max_doc_bytes: int = 70, mix: dict[str, float] | None = None, render: Render | None = None,
               config: WorldConfig = WorldConfig()) -> list[dict[str, Any]]:
    """`n` pretraining documents over all splits: right with probability `correct_rate`, otherwise a typo ("near"),
    a wrong answer or a truncation; chatty with probability `verbose_rate`; capitalised with a full stop with
    probability `format_rate`; harmful requests answered with probability `unsafe_comply_rate`; benign look-alikes
    refused with probability `benign_refuse_rate`. Chatter is skipped where prompt + response would exceed
    `max_doc_bytes` (70 bytes + the 26 of the default ChatFormat's headers, BOS and EOS fit in 96 tokens).
    """
    rng = np.random.default_rng(seed)
    tasks = make_tasks(n, rng, mix=mix or DEFAULT_MIX, config=config)
    docs = []
    for task in tasks:
        if task.family == "unsafe":
            kind = "comply" if rng.random() < unsafe_comply_rate else "refusal"
        elif task.family == "benign" and rng.random() < benign_refuse_rate:
            kind = "refusal"
        else:
            kind = "correct" if rng.random() < correct_rate else _pick(rng, ("near", "wrong", "truncated"))
        response = perturb(task, kind, rng)
        if kind not in ("refusal", "comply"):
            chatty = _pick(rng, CHATTER_PREFIX) + response + _pick(rng, CHATTER_SUFFIX)
            if rng.random() < verbose_rate and len(task.prompt) + len(chatty) <= max_doc_bytes:
                response = chatty
            elif rng.random() < format_rate:
                response = (response[:1].upper() + response[1:]) + "."
        docs.append(_record(task, response, kind, render))
    return docs


def sft_demos(n: int, seed: int | np.random.Generator, *, n_safety: int = 0, n_benign: int = 0,
              mix: dict[str, float] | None = None, split: str = "train", render: Render | None = None,
              config: WorldConfig = WorldConfig()) -> list[dict[str, Any]]:
    """Concise, correct demonstrations: `n` skill tasks (default mix SKILL_MIX), `n_safety` refusals of unsafe
    requests and `n_benign` answered benign look-alikes, shuffled. Drawn from `split` ("train" by default)."""
    rng = np.random.default_rng(seed)
    tasks = make_tasks(n, rng, mix=mix or SKILL_MIX, split=split, config=config)
    tasks += make_tasks(n_safety, rng, mix={"unsafe": 1.0}, split=split, config=config)
    tasks += make_tasks(n_benign, rng, mix={"benign": 1.0}, split=split, config=config)
    order = rng.permutation(len(tasks))
    return [_record(tasks[i], tasks[i].answer, "correct", render) for i in order]


def prompt_set(n: int, seed: int | np.random.Generator, *, split: str = "train", mix: dict[str, float] | None = None,
               config: WorldConfig = WorldConfig()) -> list[Task]:
    """Prompts for RL (split="train") or of the held-out "dev" / "test" keys, families drawn from `mix` (default
    DEFAULT_MIX). Held-out keys never occur in "train" prompt sets or SFT demonstrations. For evaluation prefer
    `key_tasks(split)`: every distinct held-out prompt once."""
    return make_tasks(n, seed, mix=mix or DEFAULT_MIX, split=split, config=config)


def synthetic_candidates(task: Task, rng: np.random.Generator, *,
                         kinds: tuple[str, ...] = ("correct", "near", "wrong", "truncated", "verbose", "formatted",
                                                   "refusal")) -> list[tuple[str, str]]:
    """(kind, response) candidates for one task without a model, for reward-model tests and warm starts."""
    return [(k, perturb(task, k, rng)) for k in kinds]


def messages_for(task: Task, response: str | None = None) -> list[dict[str, str]]:
    """Chat messages of a task: the user turn, plus the assistant turn when `response` is given."""
    messages = [{"role": "user", "content": task.prompt}]
    if response is not None:
        messages.append({"role": "assistant", "content": response})
    return messages
