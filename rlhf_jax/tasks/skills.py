"""Rule-level skills over random keys: operations whose right answer follows from a rule, not from a table.

The default world (`rlhf_jax.tasks.world`) asks for answers recalled key by key (a 40-word table, operands 0..20,
facts), so what RL learns on training keys does not carry to held-out keys. Here every prompt applies one operation
to a freshly drawn random key (a string of letters, or a pair of numbers), so the key space is far too large to
memorise and the only way to be right on an unseen key is to do the operation right:

| op        | prompt               | answer   | partial credit aligned |
|-----------|----------------------|----------|------------------------|
| `copy`    | `copy kqzt`          | `kqzt`   | left                   |
| `upper`   | `upper kqzt`         | `KQZT`   | left                   |
| `reverse` | `reverse kqzt`       | `tzqk`   | left                   |
| `sort`    | `sort kqzt`          | `kqtz`   | left                   |
| `count`   | `count k in kqzkt`   | `2`      | right                  |
| `add`     | `add 47 85`          | `132`    | right                  |
| `addr`    | `addr 47 85`         | `231`    | left (digits reversed) |

`addr` is addition with the answer written least-significant digit first, which small transformers learn more
easily (each digit depends only on digits already seen; Lee et al. 2023, "Teaching arithmetic to small
transformers").

Keys are split into **train**, **dev** and (when `SkillConfig.test_fraction` > 0) **test** by a salted crc32 hash
(`key_split`), so the key spaces are disjoint by construction, whatever the draw. The default config has no test
split (pilots read dev keys only); a fresh salt with a test fraction draws a partition whose test keys nothing has
read.

Flawed demonstrators (`DEMONSTRATORS`) are fixed in advance, each with one systematic flaw that a rule can fix:
`drop_carry` adds digit by digit without carrying, `truncate` stops reversals (and copies, sorts) after 4
characters, `filler` wraps the right answer in chatter. SFT on them teaches the flaw; the gold scorer
(`gold_score`) sees it on every key, so a post-training stage that learns the rule should beat SFT on dev keys.
"""
from __future__ import annotations

import dataclasses
import zlib
from typing import Callable

import numpy as np

OPS = ("copy", "upper", "reverse", "sort", "count", "add", "addr")
"""Every operation, in table order."""
LETTERS = "abcdefghijklmnopqrstuvwxyz"
SPLITS = ("train", "dev", "test")
FILLER_PREFIX = "well, i think the answer is "
FILLER_SUFFIX = " ok"


@dataclasses.dataclass(frozen=True, kw_only=True)
class SkillConfig:
    """The key spaces of the skills."""

    min_len: int = 3
    """Shortest random string (letters) of the string operations."""
    max_len: int = 7
    """Longest random string (26**7 keys: far too many to memorise)."""
    digits: int = 2
    """Operands of `add` / `addr` have 1..`digits` digits (0 .. 10**digits - 1)."""
    dev_fraction: float = 0.2
    """Share of the key space (by hash) that is dev."""
    test_fraction: float = 0.0
    """Share of the key space (by hash) that is test (0: no test split)."""
    salt: str = "skills-v1"
    """Salt of the split hash: a fresh salt draws a fresh train/dev partition."""


RULE_WORLD = SkillConfig(max_len=6, salt="rule-world-1", test_fraction=0.2)
"""The key split of the rule world's main job (docs/world.md, "Design and hypotheses"): strings of 3-6 letters, a
salt no pilot used, 20% dev and 20% test keys. Its test keys are read once, by the main job's final evaluation."""


@dataclasses.dataclass(frozen=True)
class SkillTask:
    """One prompt: `op`, its `key` (the string, or the operands as text), `prompt`, gold `answer`."""
    op: str
    key: str
    prompt: str
    answer: str


def key_split(op: str, key: str, config: SkillConfig = SkillConfig()) -> str:
    """"dev", "test" or "train": the salted crc32 of (op, key) decides, so the splits are disjoint by
    construction."""
    h = zlib.crc32(f"{config.salt}|{op}|{key}".encode()) % 10_000
    if h < config.dev_fraction * 10_000:
        return "dev"
    return "test" if h < (config.dev_fraction + config.test_fraction) * 10_000 else "train"


def _add_answer(a: int, b: int, lsd_first: bool) -> str:
    s = str(a + b)
    return s[::-1] if lsd_first else s


def task_of(op: str, key: str) -> SkillTask:
    """The task of `op` on `key` (strings: the letters; count: "letter word"; add / addr: "a b")."""
    if op == "copy":
        return SkillTask(op, key, f"copy {key}", key)
    if op == "upper":
        return SkillTask(op, key, f"upper {key}", key.upper())
    if op == "reverse":
        return SkillTask(op, key, f"reverse {key}", key[::-1])
    if op == "sort":
        return SkillTask(op, key, f"sort {key}", "".join(sorted(key)))
    if op == "count":
        letter, word = key.split(" ")
        return SkillTask(op, key, f"count {letter} in {word}", str(word.count(letter)))
    if op in ("add", "addr"):
        a, b = (int(x) for x in key.split(" "))
        return SkillTask(op, key, f"{op} {a} {b}", _add_answer(a, b, op == "addr"))
    raise ValueError(f"unknown op {op!r}; choose from {OPS}")


def _draw_key(op: str, rng: np.random.Generator, config: SkillConfig) -> str:
    if op in ("add", "addr"):
        # Operand lengths uniform in 1..digits, so short and long sums are equally common.
        a, b = (int(rng.integers(0, 10 ** int(rng.integers(1, config.digits + 1)))) for _ in range(2))
        return f"{a} {b}"
    n = int(rng.integers(config.min_len, config.max_len + 1))
    word = "".join(rng.choice(list(LETTERS), size=n))
    if op == "count":
        # Half the time a letter of the word (counts >= 1), else any letter (often 0).
        letter = word[int(rng.integers(n))] if rng.random() < 0.5 else LETTERS[int(rng.integers(26))]
        return f"{letter} {word}"
    return word


def make_skill(op: str, rng: np.random.Generator, split: str, config: SkillConfig = SkillConfig()) -> SkillTask:
    """A random task of `op` whose key lies in `split` (keys are redrawn until the hash puts them there)."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: choose from {SPLITS}")
    if split == "test" and not config.test_fraction:
        raise ValueError("split 'test': this SkillConfig has no test split (test_fraction = 0)")
    while True:
        key = _draw_key(op, rng, config)
        if key_split(op, key, config) == split:
            return task_of(op, key)


def skill_set(ops, n_per_op: int, seed: int, split: str, config: SkillConfig = SkillConfig()) -> list[SkillTask]:
    """`n_per_op` tasks of each op in `ops` (op-major order), keys drawn with `seed` from `split`; within an op
    the keys are distinct where the key space allows."""
    rng = np.random.default_rng(seed)
    out = []
    for op in ops:
        seen: set[str] = set()
        for _ in range(n_per_op):
            for _try in range(20):
                t = make_skill(op, rng, split, config)
                if t.key not in seen:
                    break
            seen.add(t.key)
            out.append(t)
    return out


# ---------------------------------------------------------------------------------------------------- scoring
def _right_aligned(op: str) -> bool:
    return op in ("add", "count")


def partial_credit(op: str, answer: str, response: str) -> float:
    """Matching aligned characters / max(len(answer), len(response)), after stripping spaces: 1 only when exact;
    numbers in the usual order (`add`, `count`) are aligned on the right, everything else on the left."""
    r, a = response.strip(), answer
    if not r or not a:
        return float(r == a)
    if _right_aligned(op):
        r, a = r[::-1], a[::-1]
    return sum(x == y for x, y in zip(a, r)) / max(len(a), len(r))


def gold_score(task: SkillTask, response: str) -> dict[str, float]:
    """{"exact": 1.0 if the stripped response is the answer else 0.0, "partial": `partial_credit`}."""
    return {"exact": float(response.strip() == task.answer), "partial": partial_credit(task.op, task.answer, response)}


# ---------------------------------------------------------------------------------------------------- demonstrators
def add_without_carry(a: int, b: int) -> int:
    """a + b with every carry dropped: each digit is (digit of a + digit of b) mod 10."""
    out, place = 0, 1
    while a or b:
        out += ((a % 10 + b % 10) % 10) * place
        a, b, place = a // 10, b // 10, place * 10
    return out


def has_carry(a: int, b: int) -> bool:
    """Whether adding a and b carries at any digit (exactly when `add_without_carry` is wrong)."""
    return add_without_carry(a, b) != a + b


def _drop_carry(task: SkillTask) -> str:
    if task.op not in ("add", "addr"):
        return task.answer
    a, b = (int(x) for x in task.key.split(" "))
    s = str(add_without_carry(a, b))
    return s[::-1] if task.op == "addr" else s


TRUNCATE_AT = 4
"""`truncate` keeps this many characters of string answers."""


def _truncate(task: SkillTask) -> str:
    return task.answer[:TRUNCATE_AT] if task.op in ("copy", "upper", "reverse", "sort") else task.answer


def _filler(task: SkillTask) -> str:
    return f"{FILLER_PREFIX}{task.answer}{FILLER_SUFFIX}"


DEMONSTRATORS: dict[str, Callable[[SkillTask], str]] = {
    "perfect": lambda task: task.answer,
    "drop_carry": _drop_carry,
    "truncate": _truncate,
    "filler": _filler,
}
"""name -> demonstrator(task) -> response. "drop_carry" is wrong exactly on additions that carry (other ops:
right); "truncate" is wrong exactly on string answers longer than `TRUNCATE_AT`; "filler" is never exact (the
right answer inside chatter)."""


def demonstrate(name: str, task: SkillTask, rng: np.random.Generator | None = None, flaw_rate: float = 1.0) -> str:
    """The response of demonstrator `name` to `task`: its flawed answer with probability `flaw_rate` (drawn from
    `rng`; 1.0, the default, is deterministic), else the right one. A rate below 1 leaves the right answer in the
    SFT model's samples (pass@k above pass@1) while its greedy answer keeps the flaw when the rate is above 1/2."""
    if name not in DEMONSTRATORS:
        raise ValueError(f"unknown demonstrator {name!r}; choose from {tuple(DEMONSTRATORS)}")
    if flaw_rate < 1.0 and (rng is None or rng.random() >= flaw_rate):
        return task.answer
    return DEMONSTRATORS[name](task)


def noisy_response(task: SkillTask, rng: np.random.Generator, p_correct: float) -> str:
    """A "web" answer: right with probability `p_correct`, else one of a one-character slip, a flawed
    demonstrator's answer (carry dropped, truncated) or the right answer in filler, so the corpus shows the rule
    more often than any single error."""
    if rng.random() < p_correct:
        return task.answer
    kind = int(rng.integers(3))
    if kind == 0 and task.answer:
        i = int(rng.integers(len(task.answer)))
        pool = "0123456789" if task.answer[i].isdigit() else (LETTERS.upper() if task.answer[i].isupper() else LETTERS)
        return task.answer[:i] + pool[int(rng.integers(len(pool)))] + task.answer[i + 1:]
    if kind == 1:
        return _drop_carry(task) if task.op in ("add", "addr") else _truncate(task)
    return _filler(task)
