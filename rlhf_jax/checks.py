"""Range checks for the frozen config dataclasses, called in their `__post_init__` (no command-line dependency).

`check_ranges(self, positive=(...), non_negative=(...), unit=(...))` and `config_check(self, ok, message)` raise a
ValueError naming the class and the field. `rlhf_jax.config_cli.parse_cli` builds a config inside
`deferred_checks()` (so tyro does not wrap a failure in a box) and then runs every check again itself.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, Iterator

_DEFER_CHECKS: contextvars.ContextVar[bool] = contextvars.ContextVar("rlhf_jax_defer_config_checks", default=False)


@contextlib.contextmanager
def deferred_checks() -> Iterator[None]:
    """Within this block `config_check` and `check_ranges` do not raise (the caller re-runs them afterwards)."""
    token = _DEFER_CHECKS.set(True)
    try:
        yield
    finally:
        _DEFER_CHECKS.reset(token)


def config_check(config: Any, ok: bool, message: str) -> None:
    """In a config's `__post_init__`: raise ValueError("<Class>: <message>") unless `ok`."""
    if not ok and not _DEFER_CHECKS.get():
        raise ValueError(f"{type(config).__name__}: {message}")


def check_ranges(config: Any, *, positive=(), non_negative=(), unit=()) -> None:
    """Range checks a config's `__post_init__` asks for, by its own field names (None values are skipped): raise
    one ValueError naming the class and every bad field, e.g. "OptimConfig: learning_rate = -1 must be > 0"."""
    problems = []
    for names, ok, rule in ((positive, lambda v: v > 0, "> 0"), (non_negative, lambda v: v >= 0, ">= 0"),
                            (unit, lambda v: 0 <= v <= 1, "in [0, 1]")):
        for name in names:
            v = getattr(config, name)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                problems.append(f"{name} = {v!r} must be a finite number")
            elif not ok(v):
                problems.append(f"{name} = {v} must be {rule}")
    config_check(config, not problems, "; ".join(problems))
