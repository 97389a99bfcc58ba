"""Multi-turn environments, host side: what answers the policy between its turns, and when an episode ends.

An environment is any object with two methods (the `Environment` protocol; one instance per running episode):

    reset(task) -> messages            # the opening conversation, e.g. [system, user]
    step(messages) -> (new_messages, reward, done)
        # messages: the conversation so far, ending with the policy's turn; new_messages (tool results, a user's
        # follow-up) are appended before the policy's next turn; reward is added to the episode's return

`run_episode(env, task, policy, budget=...)` is the reference loop over one episode: the policy writes a turn, the
environment answers, until it says done or the episode's budget of policy turns or policy tokens is spent (then
the episode ends with the rewards given so far: a truncated episode earns nothing more). It needs no model: any
`policy(messages) -> (reply text, token count)` drives it, which is how the tests drive it; a batched rollout keeps
one environment per sequence and the same `EpisodeBudget`.

Two optional attributes serve rollouts and commands: `schemas` (the JSON schemas of the environment's tools,
given to the chat template as its `tools`) and `tasks(n, *, seed)` (n tasks of the environment's own, what
`rlhf-jax grpo --env` trains on without --data.path).

Environments are found by name (`make_environment("calculator")`, names registered with
`@register_environment`) or by import path (`"MODULE:CLASS"` or `"FILE.py:CLASS"`, what `rlhf-jax grpo --env`
takes), with keyword arguments passed to the class.

`CalculatorEnv` is the example: the task is an arithmetic question, the policy may call a `calculate` tool that
evaluates + - * and parentheses on integers, and the reward is 1 when the last integer of its final answer (a turn
without tool calls) is the right one, else 0. As in tool-use RL work (ReTool, Feng et al. 2025; ToolRL, Qian et al.
2025) only the outcome is rewarded; malformed calls are answered with an error message, not punished directly.
"""
from __future__ import annotations

import ast
import dataclasses
import random
import re
from typing import Any, Callable, Protocol, runtime_checkable

from rlhf_jax.checks import load_object
from rlhf_jax.tools import (
    execute_tool_call,
    make_tool,
    malformed_call_message,
    parse_tool_calls_report,
    tool_message,
)

__all__ = ["Environment", "EpisodeBudget", "Episode", "run_episode", "ENVIRONMENTS", "register_environment",
           "make_environment", "CalculatorEnv", "calculate", "calculator_tasks", "SkillRetryEnv", "RETRY_FEEDBACK"]


@runtime_checkable
class Environment(Protocol):
    """What a multi-turn environment provides (see the module docstring)."""

    def reset(self, task: Any) -> list[dict]: ...

    def step(self, messages: list[dict]) -> tuple[list[dict], float, bool]: ...


@dataclasses.dataclass(frozen=True, kw_only=True)
class EpisodeBudget:
    """How much of the policy one episode may use; the episode ends when either runs out."""

    max_turns: int = 8
    """Policy turns (assistant messages) per episode."""
    max_tokens: int = 2048
    """Policy tokens per episode, all its turns together (what the loss is computed on)."""

    def __post_init__(self):
        for name in ("max_turns", "max_tokens"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"EpisodeBudget.{name} must be a positive integer, got {getattr(self, name)!r}")

    def spent(self, *, turns: int, tokens: int) -> str | None:
        """"max_turns" or "max_tokens" when that budget is used up after `turns` turns of `tokens` tokens, else
        None."""
        if turns >= self.max_turns:
            return "max_turns"
        if tokens >= self.max_tokens:
            return "max_tokens"
        return None


@dataclasses.dataclass(frozen=True, kw_only=True)
class Episode:
    """One finished episode."""

    messages: tuple[dict, ...]
    """The whole conversation: the opening messages, then policy turns and the environment's answers."""
    rewards: tuple[float, ...]
    """The reward of each environment step (one per policy turn)."""
    tokens: int
    """Policy tokens used."""
    finish: str
    """"done" (the environment ended it), "max_turns" or "max_tokens" (the budget did)."""

    @property
    def reward(self) -> float:
        """The episode's return: the sum of its step rewards."""
        return float(sum(self.rewards))

    @property
    def turns(self) -> int:
        return len(self.rewards)


def run_episode(env: Environment, task: Any, policy: Callable[[list[dict]], tuple[str, int]], *,
                budget: EpisodeBudget = EpisodeBudget()) -> Episode:
    """Runs one episode: `policy(messages) -> (reply, n_tokens)` writes each assistant turn, `env.step` answers.
    The environment sees every turn, the last one too (so that it can score a final answer); the budget is checked
    after its answer."""
    messages = list(env.reset(task))
    rewards: list[float] = []
    tokens = 0
    while True:
        reply, n = policy(list(messages))
        messages.append({"role": "assistant", "content": reply})
        tokens += int(n)
        new, reward, done = env.step(list(messages))
        rewards.append(float(reward))
        messages.extend(new)
        finish = "done" if done else budget.spent(turns=len(rewards), tokens=tokens)
        if finish is not None:
            return Episode(messages=tuple(messages), rewards=tuple(rewards), tokens=tokens, finish=finish)


# --------------------------------------------------------------------------------------------------- registry
ENVIRONMENTS: dict[str, Callable[..., Environment]] = {}
"""Environment classes by name (`register_environment`)."""


def register_environment(name: str):
    """Class decorator: `@register_environment("calculator")` makes `make_environment("calculator")` build it."""
    def add(cls):
        if name in ENVIRONMENTS and ENVIRONMENTS[name] is not cls:
            raise ValueError(f"environment {name!r} is already registered ({ENVIRONMENTS[name].__name__})")
        ENVIRONMENTS[name] = cls
        return cls
    return add


def _import_class(spec: str):
    cls = load_object(spec, f"environment {spec!r}", f"a registered name ({', '.join(sorted(ENVIRONMENTS))}), "
                      "MODULE:CLASS or FILE.py:CLASS")
    if cls is None:
        module_name, _, name = spec.rpartition(":")
        raise ValueError(f"environment {spec!r}: {module_name} has no {name}")
    return cls


def make_environment(spec: str, **kwargs: Any) -> Environment:
    """A new environment from a registered name, `MODULE:CLASS` or `FILE.py:CLASS`, built with `kwargs`; a
    one-line ValueError naming `spec` when it cannot be found or built, or lacks `reset` / `step`."""
    cls = ENVIRONMENTS[spec] if spec in ENVIRONMENTS else _import_class(spec)
    if not callable(cls):
        raise ValueError(f"environment {spec!r}: {cls!r} is not a class")
    try:
        env = cls(**kwargs)
    except TypeError as e:
        raise ValueError(f"environment {spec!r}: cannot build it with {sorted(kwargs)} ({e})") from None
    if not isinstance(env, Environment):
        raise ValueError(f"environment {spec!r}: {type(env).__name__} needs reset(task) and step(messages) methods")
    return env


# ------------------------------------------------------------------------------------------------ calculator
_OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b}
_MAX_EXPRESSION = 200
_MAX_DIGITS = 100


def calculate(expression: str) -> int:
    """Evaluates an arithmetic expression of integers with +, -, * and parentheses.

    Args:
        expression: The expression, for example (12 - 5) * 3.
    """
    if len(expression) > _MAX_EXPRESSION:
        raise ValueError(f"expression longer than {_MAX_EXPRESSION} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        raise ValueError(f"not an arithmetic expression: {expression!r}") from None

    def value(node) -> int:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            v = value(node.operand)
            return -v if isinstance(node.op, ast.USub) else v
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            out = _OPS[type(node.op)](value(node.left), value(node.right))
            if len(str(abs(out))) > _MAX_DIGITS:
                raise ValueError(f"result longer than {_MAX_DIGITS} digits")
            return out
        raise ValueError(f"only integers, + - * and parentheses are allowed, got {ast.unparse(node)!r}")

    return value(tree.body)


_INTEGER = re.compile(r"-?\d+")


@register_environment("calculator")
class CalculatorEnv:
    """An arithmetic question and a `calculate` tool; reward 1 for the right final integer (module docstring).

    A task is {"question": str, "answer": int} or {"expression": str} (asked as "What is {expression}?", the
    answer computed). A policy turn with tool calls (Hermes or Llama-3 text, or a message's `tool_calls`) gets one
    `tool` message per call (the result or an error) and one per malformed call; a turn without calls is the final
    answer.
    """

    def __init__(self, *, system_prompt: str | None = "Use the calculate tool for arithmetic, then give the answer.",
                 style: str = "auto", list_tools: bool = True):
        self.tools = [make_tool(calculate)]
        self.system_prompt, self.style, self.list_tools = system_prompt, style, list_tools
        self.answer: int | None = None

    @property
    def schemas(self) -> list[dict]:
        """The tools' JSON schemas, for the chat template's `tools`; none with `list_tools=False` (the prompt does
        not describe the tool: a model fine-tuned on its calls knows it, and a small model has no room for it)."""
        return [t.schema for t in self.tools] if self.list_tools else []

    @staticmethod
    def tasks(n: int, *, seed: int = 0) -> list[dict]:
        """`calculator_tasks(n, seed=seed)`."""
        return calculator_tasks(n, seed=seed)

    def reset(self, task: Any) -> list[dict]:
        if isinstance(task, dict) and "expression" in task:
            question, answer = f"What is {task['expression']}?", calculate(task["expression"])
        elif isinstance(task, dict) and isinstance(task.get("question"), str) and type(task.get("answer")) is int:
            question, answer = task["question"], task["answer"]
        else:
            raise ValueError(f"calculator task must be {{'question': str, 'answer': int}} or {{'expression': str}}, "
                             f"got {task!r}")
        self.answer = answer
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return system + [{"role": "user", "content": question}]

    def step(self, messages: list[dict]) -> tuple[list[dict], float, bool]:
        if self.answer is None:
            raise RuntimeError("CalculatorEnv.step before reset")
        turn = messages[-1]
        text = turn.get("content") or ""
        if turn.get("tool_calls"):
            calls = [c.get("function", c) for c in turn["tool_calls"]]
            malformed = []
        else:
            calls, malformed = parse_tool_calls_report(text, style=self.style)
        if calls or malformed:
            results = [tool_message(execute_tool_call(self.tools, c), name=c.get("name")) for c in calls]
            return results + [malformed_call_message(m) for m in malformed], 0.0, False
        numbers = _INTEGER.findall(text.replace(",", ""))
        correct = bool(numbers) and int(numbers[-1]) == self.answer
        return [], float(correct), True


def calculator_tasks(n: int, *, seed: int = 0, max_value: int = 99) -> list[dict]:
    """`n` random {"expression": "a op (b op c)"}-style tasks with integers in [1, max_value], seeded."""
    rng = random.Random(seed)
    ops = ["+", "-", "*"]
    tasks = []
    for _ in range(n):
        a, b, c = (rng.randint(1, max_value) for _ in range(3))
        o1, o2 = rng.choice(ops), rng.choice(ops)
        expression = f"{a} {o1} ({b} {o2} {c})" if rng.random() < 0.5 else f"{a} {o1} {b} {o2} {c}"
        tasks.append({"expression": expression})
    return tasks


RETRY_FEEDBACK = "wrong, try again"
"""`SkillRetryEnv`'s reply to a wrong answer."""


@register_environment("skills_retry")
class SkillRetryEnv:
    """A rule-world task with feedback (`rlhf_jax.tasks.skills`): the policy answers a skill prompt ("reverse
    kqzt"); a wrong answer gets the user's reply `feedback` until `tries` answers are spent. Reward 1 for the
    first right answer, at any try, else 0: a second try after the verifier says wrong.

    A task is {"op": str, "key": str} (`skills.task_of`); `tasks(n, seed=)` draws reversals of train keys of the
    rule world's split (`skills.RULE_WORLD`).
    """

    def __init__(self, *, tries: int = 2, feedback: str = RETRY_FEEDBACK):
        if tries < 1:
            raise ValueError(f"SkillRetryEnv: tries must be >= 1, got {tries}")
        self.tries, self.feedback = tries, feedback
        self.task, self.left = None, 0

    @staticmethod
    def tasks(n: int, *, seed: int = 0) -> list[dict]:
        """`n` reversal tasks of distinct train keys of the rule world."""
        from rlhf_jax.tasks import skills

        return [{"op": t.op, "key": t.key} for t in skills.skill_set(["reverse"], n, seed, "train", skills.RULE_WORLD)]

    def reset(self, task: Any) -> list[dict]:
        from rlhf_jax.tasks import skills

        if not (isinstance(task, dict) and task.get("op") in skills.OPS and isinstance(task.get("key"), str)):
            raise ValueError(f"skills_retry task must be {{'op': one of {skills.OPS}, 'key': str}}, got {task!r}")
        self.task, self.left = skills.task_of(task["op"], task["key"]), self.tries
        return [{"role": "user", "content": self.task.prompt}]

    def step(self, messages: list[dict]) -> tuple[list[dict], float, bool]:
        from rlhf_jax.tasks import skills

        if self.task is None:
            raise RuntimeError("SkillRetryEnv.step before reset")
        self.left -= 1
        if skills.gold_score(self.task, messages[-1].get("content") or "")["exact"] == 1.0:
            return [], 1.0, True
        if self.left:
            return [{"role": "user", "content": self.feedback}], 0.0, False
        return [], 0.0, True
