"""Command-line and JSON configuration for frozen keyword-only config dataclasses.

`parse_cli(Config, argv)` is what every `python -m experiments.<name>` calls:

1. `--config FILE.json` (optional, anywhere in argv) is read first: a JSON object of nested field values, e.g.
   `{"optim": {"learning_rate": 3e-4}, "sft": {"num_steps": 100}}`. It replaces the dataclass defaults; unknown
   keys and wrong types are errors naming the file, the key path and the valid keys / expected type.
2. The remaining flags are parsed by tyro (`--help` lists every option with its current default, including the
   values from the JSON): nested fields are dotted, with dashes, e.g. `--optim.learning-rate 3e-4`,
   `--sft.num-steps 100`, booleans as `--resume / --no-resume`.
3. Every config checks its own ranges in `__post_init__` (`check_ranges`, from `rlhf_jax.checks`, re-exported
   here): negative learning rates, `beta <= 0`, probabilities outside [0, 1], ... are errors naming the class and
   the field; tyro names the option group.

Errors are `ConfigError` (a ValueError); `parse_cli` prints them and exits with status 2, like argparse.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

from rlhf_jax.checks import (check_ranges, config_check, deferred_checks, get_option,  # noqa: F401  (re-exported)
                             load_object, with_options)


class ConfigError(ValueError):
    """A configuration problem; the message says where (file, key path) and what is expected."""


def field_docs(cls) -> dict[str, str]:
    """The docstrings written under a dataclass's fields (this project's convention), read from its source: help
    text where tyro cannot read it (generated dataclasses, the benchmark's argparse fallback)."""
    import ast
    import inspect

    docs, prev = {}, None
    for node in ast.parse(inspect.getsource(cls)).body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            prev = node.target.id
            continue
        if prev and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            docs[prev] = str(node.value.value).strip()
        prev = None
    return docs


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_tree(config: Any, prefix: str = "") -> None:
    """Run the `__post_init__` checks of `config` and of every nested config (innermost first); a failure becomes
    a ConfigError naming the flags of its option group."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            _check_tree(value, f"{prefix}{f.name}.")
    if hasattr(config, "__post_init__"):
        try:
            config.__post_init__()
        except ValueError as e:
            where = f"--{prefix.replace('_', '-')}*" if prefix else "options"
            raise ConfigError(f"{where}: {e}") from None


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str, where: str) -> Any:
    """`value` (from JSON) checked against annotation `tp`; ints are accepted for floats, lists for tuples."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    bad = ConfigError(f"{where}: key {key!r} = {value!r} has type {type(value).__name__}; "
                      f"expected {_type_name(tp)}")
    if tp is Any or tp is object:
        return value
    if origin in (typing.Union, types.UnionType):
        for a in args:
            try:
                return _coerce(value, a, key, where)
            except ConfigError:
                pass
        raise bad
    if origin is Literal:
        if value in args and not (isinstance(value, bool) and not any(isinstance(a, bool) for a in args)):
            return value
        raise ConfigError(f"{where}: key {key!r} = {value!r} is not one of {', '.join(map(repr, args))}")
    if origin is typing.Annotated:
        return _coerce(value, args[0], key, where)
    if tp is type(None):
        if value is None:
            return None
        raise bad
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if tp is float:
        if _is_number(value):
            return float(value)
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    if origin in (tuple, list, Sequence, typing.Sequence) or tp in (tuple, list):
        if not isinstance(value, list):
            raise bad
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise bad
            items = [_coerce(v, a, f"{key}[{i}]", where) for i, (v, a) in enumerate(zip(value, args))]
        else:
            items = [_coerce(v, args[0], f"{key}[{i}]", where) if args else v for i, v in enumerate(value)]
        return tuple(items) if (origin is tuple or tp is tuple) else items
    if origin in (dict, Mapping) or tp is dict:
        if isinstance(value, dict):
            return value
        raise bad
    return value  # an annotation we do not check (callables, custom classes): passed through


def config_from_dict(base: Any, data: Mapping[str, Any], *, source: str = "<dict>", prefix: str = "") -> Any:
    """A copy of the dataclass instance `base` with the (nested) values of `data` replaced and type-checked."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'the top level'} must be a JSON object, "
                          f"got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(base) if f.init}
    hints = typing.get_type_hints(type(base), include_extras=True)
    changes = {}
    for k, v in data.items():
        key = prefix + str(k)
        name = str(k).replace("-", "_")
        if name not in fields:
            raise ConfigError(f"{source}: unknown key {key!r}; valid keys"
                              f"{' under ' + repr(prefix.rstrip('.')) if prefix else ''}: {', '.join(sorted(fields))}")
        current = getattr(base, name)
        if dataclasses.is_dataclass(current) and isinstance(v, Mapping):
            changes[name] = config_from_dict(current, v, source=source, prefix=key + ".")
        elif dataclasses.is_dataclass(current):
            valid = ", ".join(f.name for f in dataclasses.fields(current))
            raise ConfigError(f"{source}: key {key!r} = {v!r}: expected {type(current).__name__}, a JSON object "
                              f"with keys among: {valid}")
        else:
            changes[name] = _coerce(v, hints.get(name, Any), key, source)
    try:
        return dataclasses.replace(base, **changes)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{source}: {prefix.rstrip('.') or type(base).__name__}: {e}") from e


def load_json_config(path: str | Path, base: Any) -> Any:
    """`base` (a dataclass instance) updated with the nested values of the JSON file at `path`."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"--config: file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}): {e.msg}") from None
    return config_from_dict(base, data, source=str(path))


def to_dict(config: Any) -> dict:
    """Nested plain dict of a config (JSON-serialisable for the usual field types)."""
    return dataclasses.asdict(config)


def save_config(config: Any, path: str | Path) -> None:
    """Write `config` as indented JSON (the file `--config` accepts back)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(to_dict(config), indent=2, default=str) + "\n")


def _pop_config_flag(argv: list[str]) -> tuple[str | None, list[str]]:
    rest, path, i = [], None, 0
    while i < len(argv):
        a = argv[i]
        if a == "--config":
            if i + 1 >= len(argv):
                raise ConfigError("--config needs a file path: --config FILE.json")
            path, i = argv[i + 1], i + 2
            continue
        if a.startswith("--config="):
            path = a.split("=", 1)[1]
        else:
            rest.append(a)
        i += 1
    return path, rest


CONFIG_HELP = ("Options: --config FILE.json loads a JSON object of nested field values as the defaults "
               "(default: none; flags given after it still win).")


def _prog() -> str | None:
    """`python -m package.module` for a script run as a module (argv[0] is then its file path), else None."""
    path = os.path.abspath(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    parent, name = os.path.split(path)
    if not name.endswith(".py") or not os.path.isfile(os.path.join(parent, "__init__.py")):
        return None
    return f"python -m {os.path.basename(parent)}.{name[:-3]}"


def parse_cli(cls: type, argv: Sequence[str] | None = None, *, description: str | None = None,
              default: Any = None, prog: str | None = None) -> Any:
    """Parse `argv` (default sys.argv[1:]) into a `cls` instance (its `__post_init__` checks run as it is built);
    exit(2) with a message on errors. `prog` names the command in `--help` (default: `python -m MODULE` for a
    script run as a module)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        json_path, rest = _pop_config_flag(argv)
        base = default if default is not None else cls()
        if json_path is not None:
            base = load_json_config(json_path, base)
        text = f"{description or (cls.__doc__ or '').strip()}\n\n{CONFIG_HELP}"
        import tyro  # imported here: the rest of this module (field_docs) serves scripts without tyro

        # While tyro builds the config the checks do not raise (tyro would draw a multi-line box around the
        # error); `_check_tree` runs every check again afterwards and reports the first failure as one line.
        with deferred_checks():
            config = tyro.cli(cls, args=rest, default=base, description=text, prog=prog or _prog(),
                              config=(tyro.conf.AvoidSubcommands,))
        _check_tree(config)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    return config
