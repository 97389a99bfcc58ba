"""Result cards: one JSON per experiment holds every number and its provenance; the markdown card is rendered from it.

A card is `docs/results/<experiment>.json` with the `.md` beside it. Nothing in the `.md` is written by hand:
`render_card` builds it from the JSON, so text and numbers cannot drift (`python -m experiments.cards --check`
fails when a `.md` differs from what its JSON renders).

Layout of a card's JSON (every key but "title" and "provenance" optional; other keys hold the experiment's raw
numbers, which the card's tables and prose may reference):

    {
      "title": "Reward over-optimisation: gold against proxy",
      "provenance": {"command": ..., "commit": ..., "packages": {...}, "machine": ..., "date": ..., "seeds": [...]},
      "summary": ["paragraph", ...],          # what was run and what it found
      "decided_on_dev": ["paragraph", ...],   # what was fixed before the test split was read
      "sections": [{"title": ..., "text": [...], "tables": [TABLE, ...], "notes": [...]}, ...],
      "tables": [TABLE, ...],                 # tables outside any section
      "does_not_show": ["paragraph", ...],    # the limits of the result
      ...raw numbers...
    }

    TABLE = {"title": str, "text": [...], "columns": [str, ...], "rows": [[CELL, ...], ...],
             "formats": [FORMAT | null, ...], "notes": [...]}

A CELL is a string (written as is), a number (written with its column's FORMAT, a Python format spec such as
".3f" or "+.3f"; without one, floats get ".3f"), a bool ("yes" / "no"), null (empty), a reference
`{"ref": "dotted.path"}` to a raw number of the card (written with the column's FORMAT), or an interval
`{"value": x, "ci": [low, high], "signed": bool, "digits": 3, "level": "95%"}`, always written
`value [low, high]` with the same digits and sign style for all three numbers (`signed`: differences, "+0.012
[-0.003, +0.027]"; otherwise levels, "0.412 [0.398, 0.425]"), followed by "(level)" when one is given. A
reference may point at an experiment's own interval (`{"mean" | "delta", "low", "high", ...}`); the column's FORMAT
(".3f" or "+.3f") then sets the digits and the sign style of all three numbers.

Prose may cite numbers instead of restating them: `{{dotted.path}}` is replaced by the value at that path of the
card's JSON (formatted as a cell), `{{dotted.path:+.3f}}` with a format spec. A path that does not exist is an error
naming the card and the path. Integer path parts index lists (`{{per_seed.0.gold}}`); a key that itself holds dots
(`{{mean.dpo_0.1.gold}}`) is matched whole.

`provenance(command, seeds)` gives the "provenance" object of a new result; an experiment stores it in its JSON.
"""
from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterable

PACKAGES = ("jax", "jaxlib", "flax", "optax", "numpy")
"""The packages whose versions a result records."""

PROVENANCE_KEYS = ("command", "commit", "packages", "machine", "date", "seeds")
"""The keys of a card's "provenance" object, in the order the card shows them."""

_ESTIMATES = ("mean", "delta", "value")
_PLACEHOLDER = re.compile(r"\{\{\s*([^}:]+?)\s*(?::([^}]*))?\}\}")


def _git_commit(repo: str | os.PathLike | None) -> str:
    """The short commit of the checkout holding `repo` (default: this package's folder), or "unknown"."""
    folder = Path(repo) if repo is not None else Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=folder, capture_output=True, text=True,
                             timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and commit else "unknown"


def _package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def _cpu_model() -> str | None:
    """The CPU's model name from /proc/cpuinfo (Linux), or None. It matters: XLA's CPU code rounds floats
    differently on different processors, and a long RL run turns that into other per-seed numbers."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip() or None
    except OSError:
        pass
    return None


def _machine() -> str:
    """Processor (its model name where the OS gives it, else the architecture), CPU count and, when jax can be
    imported, its devices' kind and count."""
    cpu = _cpu_model() or platform.processor() or platform.machine() or "unknown processor"
    parts = [cpu, f"{os.cpu_count()} CPU cores"]
    try:
        import jax

        devices = jax.devices()
        parts.append(f"jax devices: {len(devices)} x {devices[0].device_kind}")
    except Exception:  # noqa: BLE001 - jax missing or no backend: the machine is still described
        parts.append("jax devices: not available")
    return ", ".join(parts)


def provenance(command: str, seeds: Any, *, repo: str | os.PathLike | None = None) -> dict:
    """What a result needs to be reproduced: the command, git commit, package versions, machine, date and seeds.

    Args:
      command: the command line that produced the result, as a user would type it.
      seeds: one seed or an iterable of seeds.
      repo: a folder inside the git checkout to read the commit from (default: this package's folder); outside a
        checkout the commit is "unknown" (no exception).

    Returns:
      {"command", "commit", "packages": {name: version}, "machine", "date" (UTC, ISO 8601), "seeds": [int]}.
    """
    seed_list = [int(seeds)] if isinstance(seeds, int) else [int(s) for s in seeds]
    return {
        "command": command,
        "commit": _git_commit(repo),
        "packages": _package_versions(),
        "machine": _machine(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "seeds": seed_list,
    }


def command_line(argv: list[str] | None = None) -> str:
    """The command that is running, as a user would type it: `rlhf-jax pipeline --quick ...` for the console
    command, `python -m experiments.NAME ...` for a script run as a module."""
    argv = list(sys.argv if argv is None else argv)
    if not argv:
        return ""
    head = os.path.basename(argv[0])
    if head.endswith(".py"):
        head = f"python -m {os.path.basename(os.path.dirname(os.path.abspath(argv[0])))}.{head[:-3]}"
    return " ".join([head, *map(shlex.quote, argv[1:])])


# --- rendering -------------------------------------------------------------------------------------------------


class CardError(ValueError):
    """A card's JSON does not follow the layout in this module's docstring."""


def _lookup(data: dict, path: str, title: str) -> Any:
    """The value at a dotted path; a key that itself holds dots ("dpo_0.1") is matched whole, longest first."""
    node: Any = data
    parts = path.split(".")
    i = 0
    while i < len(parts):
        if isinstance(node, dict):
            for j in range(len(parts), i, -1):
                key = ".".join(parts[i:j])
                if key in node:
                    node, i = node[key], j
                    break
            else:
                node = None
        elif isinstance(node, list) and re.fullmatch(r"-?\d+", parts[i]) and -len(node) <= int(parts[i]) < len(node):
            node, i = node[int(parts[i])], i + 1
        else:
            node = None
        if node is None:
            raise CardError(f"card {title!r}: no value at {path!r} (failed at {parts[min(i, len(parts) - 1)]!r}); "
                            "cite a path that exists in the card's JSON")
    return node


def _fmt_number(x: float, spec: str | None) -> str:
    if spec:
        return format(x, spec)
    if isinstance(x, int):
        return str(x)
    return format(x, ".3f")


def format_interval(value: float, low: float, high: float, *, signed: bool = False, digits: int = 3,
                    level: str | None = None) -> str:
    """`value [low, high]`, the three numbers with the same digits and sign style; "(level)" after when given."""
    spec = f"{'+' if signed else ''}.{digits}f"
    text = f"{value:{spec}} [{low:{spec}}, {high:{spec}}]"
    return f"{text} ({level})" if level else text


def format_cell(cell: Any, spec: str | None = None, *, data: dict | None = None, title: str = "") -> str:
    """One table cell or cited value as text (see the module docstring for the kinds of cell)."""
    if cell is None:
        return ""
    if isinstance(cell, bool):
        return "yes" if cell else "no"
    if isinstance(cell, (int, float)):
        return _fmt_number(cell, spec)
    if isinstance(cell, str):
        return cell
    if isinstance(cell, dict) and "ref" in cell:
        return format_cell(_lookup(data or {}, cell["ref"], title), cell.get("format", spec), data=data, title=title)
    if isinstance(cell, dict) and "ci" in cell:
        low, high = cell["ci"]
        return format_interval(cell["value"], low, high, signed=bool(cell.get("signed", False)),
                               digits=int(cell.get("digits", 3)), level=cell.get("level"))
    estimate = next((k for k in _ESTIMATES if isinstance(cell, dict) and k in cell), None)
    if estimate and "low" in cell and "high" in cell:
        # a raw interval of an experiment ({"mean" | "delta" | "value", "low", "high", ...}): the spec's sign and
        # digits ("+.3f") apply to all three numbers
        m = re.fullmatch(r"(\+?)\.(\d+)f", spec or ".3f")
        if not m:
            raise CardError(f"card {title!r}: an interval takes a format like '.3f' or '+.3f', not {spec!r}")
        return format_interval(cell[estimate], cell["low"], cell["high"], signed=bool(m.group(1)),
                               digits=int(m.group(2)))
    if isinstance(cell, list):
        return ", ".join(format_cell(c, spec, data=data, title=title) for c in cell)
    raise CardError(f"card {title!r}: cannot write {cell!r} in a table; use a string, a number, null, "
                    "{'ref': path} or {'value', 'ci'}")


def _prose(text: str, data: dict, title: str) -> str:
    def cite(match: re.Match) -> str:
        return format_cell(_lookup(data, match.group(1), title), match.group(2) or None, data=data, title=title)

    return _PLACEHOLDER.sub(cite, text)


def _paragraphs(items: Any, data: dict, title: str) -> list[str]:
    if items is None:
        return []
    if isinstance(items, str):
        items = [items]
    return [_prose(p, data, title) for p in items]


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_table(table: dict, data: dict | None = None, *, title: str = "") -> list[str]:
    """A table of a card as markdown lines: its title and text, the table, its notes."""
    data = data or {}
    columns = table.get("columns")
    rows = table.get("rows")
    if not columns or rows is None:
        raise CardError(f"card {title!r}: a table needs 'columns' and 'rows' (table {table.get('title')!r})")
    formats = table.get("formats") or [None] * len(columns)
    if len(formats) != len(columns):
        raise CardError(f"card {title!r}: table {table.get('title')!r} has {len(columns)} columns but "
                        f"{len(formats)} formats")
    lines: list[str] = []
    if table.get("title"):
        lines += [f"### {table['title']}", ""]
    for p in _paragraphs(table.get("text"), data, title):
        lines += [p, ""]
    lines.append("| " + " | ".join(_escape(str(c)) for c in columns) + " |")
    lines.append("|" + "---|" * len(columns))
    for i, row in enumerate(rows):
        if len(row) != len(columns):
            raise CardError(f"card {title!r}: table {table.get('title')!r} row {i} has {len(row)} cells for "
                            f"{len(columns)} columns")
        cells = [_escape(format_cell(c, f, data=data, title=title)) for c, f in zip(row, formats)]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for p in _paragraphs(table.get("notes"), data, title):
        lines += [p, ""]
    return lines


def _provenance_lines(prov: dict, title: str) -> list[str]:
    missing = [k for k in PROVENANCE_KEYS if k not in prov]
    if missing:
        raise CardError(f"card {title!r}: provenance lacks {', '.join(missing)} "
                        f"(it needs {', '.join(PROVENANCE_KEYS)}; rlhf_jax.recipes.cards.provenance gives them)")
    commands = prov["command"] if isinstance(prov["command"], list) else [prov["command"]]
    lines = ["## Provenance", "", "```bash", *commands, "```", ""]
    for key in ("commit", "date", "machine"):
        value = prov[key]
        value = ", ".join(map(str, value)) if isinstance(value, list) else str(value)
        lines.append(f"- {key}: {value}")
    packages = prov["packages"]
    if isinstance(packages, dict):
        packages = ", ".join(f"{name} {version}" for name, version in packages.items()) or "not recorded"
    lines.append(f"- packages: {packages}")
    seeds = prov["seeds"]
    seeds = ", ".join(map(str, seeds)) if isinstance(seeds, list) else str(seeds)
    lines += [f"- seeds: {seeds}", ""]
    return lines


def render_card(data: dict) -> str:
    """The markdown card of a result JSON: title, provenance, summary, what was fixed on dev, sections and tables,
    what the result does not show. Every table comes from the JSON."""
    if not isinstance(data, dict) or "title" not in data or "provenance" not in data:
        raise CardError("a card's JSON is an object with at least 'title' and 'provenance' "
                        "(see rlhf_jax.recipes.cards)")
    title = data["title"]
    lines = [f"# {title}", "", "Rendered from the JSON beside this file by `python -m experiments.cards`; "
             "edit the JSON, not this file.", ""]
    lines += _provenance_lines(data["provenance"], title)
    summary = _paragraphs(data.get("summary"), data, title)
    if summary:
        lines += ["## Summary", ""]
        for p in summary:
            lines += [p, ""]
    decided = _paragraphs(data.get("decided_on_dev"), data, title)
    if decided:
        lines += ["## Fixed before the test split was read", ""]
        for p in decided:
            lines += [p, ""]
    for section in data.get("sections", []):
        lines += [f"## {section['title']}", ""]
        for p in _paragraphs(section.get("text"), data, title):
            lines += [p, ""]
        for table in section.get("tables", []):
            lines += render_table(table, data, title=title)
        for p in _paragraphs(section.get("notes"), data, title):
            lines += [p, ""]
    if data.get("tables"):
        lines += ["## Tables", ""]
        for table in data["tables"]:
            lines += render_table(table, data, title=title)
    limits = _paragraphs(data.get("does_not_show"), data, title)
    if limits:
        lines += ["## What it does not show", ""]
        for p in limits:
            lines += [p, ""]
    while lines and lines[-1] == "":
        lines.pop()
    return "\n".join(lines) + "\n"


def card_path(json_path: str | os.PathLike) -> Path:
    """The markdown card beside a result JSON."""
    return Path(json_path).with_suffix(".md")


def read_card_json(json_path: str | os.PathLike) -> dict:
    with open(json_path, encoding="utf-8") as f:
        return json.load(f)


def write_card(json_path: str | os.PathLike) -> str:
    """Render the card of `json_path` and write it beside it (`x.json` -> `x.md`); returns the markdown's path."""
    out = card_path(json_path)
    out.write_text(render_card(read_card_json(json_path)), encoding="utf-8")
    return str(out)


def stale_cards(json_paths: Iterable[str | os.PathLike]) -> list[str]:
    """The markdown cards (paths) that are missing or differ from what their JSON renders."""
    stale = []
    for path in json_paths:
        md, text = card_path(path), render_card(read_card_json(path))
        if not md.exists() or md.read_text(encoding="utf-8") != text:
            stale.append(str(md))
    return stale
