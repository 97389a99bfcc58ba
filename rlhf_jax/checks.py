"""Range checks for the frozen config dataclasses, called in their `__post_init__` (no command-line dependency).

`check_ranges(self, positive=(...), non_negative=(...), unit=(...))` and `config_check(self, ok, message)` raise a
ValueError naming the class and the field. `rlhf_jax.config_cli.parse_cli` builds a config inside
`deferred_checks()` (so tyro does not wrap a failure in a box) and then runs every check again itself.
`with_options` / `get_option` set and read dotted options of nested configs; `load_object` finds a user's
`MODULE:NAME` or `FILE.py:NAME` with one-line errors.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
import os
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


# ------------------------------------------------------------------------ options and names a user gives
def with_options(config, changes: dict):
    """`config` (a frozen dataclass) with `changes` applied, keys dotted through nested configs:
    `with_options(cfg, {"dpo.beta": 0.2, "grpo.num_steps": 20, "seed": 1})`."""
    nested, here = {}, {}
    for key, value in changes.items():
        head, _, rest = key.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            here[key] = value
    for head, sub in nested.items():
        here[head] = with_options(getattr(config, head), sub)
    return dataclasses.replace(config, **here)


def get_option(config, key: str):
    """The value of a dotted option, `get_option(cfg, "dpo.beta")`."""
    for part in key.split("."):
        config = getattr(config, part)
    return config


def load_object(spec: str, prefix: str, expected: str) -> Any:
    """The object a user names as `MODULE:NAME` (an importable module) or `FILE.py:NAME`, or None when the module
    has no such name; a one-line ValueError starting with `prefix` when the spec is malformed (`expected` says what
    it should look like) or its module cannot be found or imported."""
    import importlib
    import importlib.util

    module_name, sep, name = spec.rpartition(":")
    if not sep or not module_name or not name:
        raise ValueError(f"{prefix}: expected {expected}")
    try:
        if module_name.endswith(".py"):
            if not os.path.isfile(module_name):
                raise ValueError(f"{prefix}: no file {module_name}")
            loader_spec = importlib.util.spec_from_file_location(os.path.basename(module_name)[:-3], module_name)
            module = importlib.util.module_from_spec(loader_spec)
            loader_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"{prefix}: cannot import {module_name} ({e})") from None
    return getattr(module, name, None)
