"""Per-run report: `report.json` + `report.md` (Markdown tables) and matplotlib PNG plots of the curves.

`write_report(run_dir, summary, tables)` writes both files; `plot_curves` draws metrics.jsonl curves against the
step; `plot_xy` draws several y series against one x (e.g. gold and proxy reward against KL, Gao et al. 2022,
"Scaling Laws for Reward Model Overoptimization", Fig. 1). Plots use the non-interactive Agg backend.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from rlhf_jax.train.logging import read_jsonl  # noqa: E402


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return str(v).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """A GitHub Markdown table; columns are the union of the rows' keys in first-seen order, blanks where absent."""
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    if not cols:
        return "_(empty)_\n"
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(_cell(r[c]) if c in r else "" for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _json_safe(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if hasattr(x, "item") and getattr(x, "ndim", 1) == 0:  # numpy / jax scalars
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)


def write_report(run_dir: str | os.PathLike, summary: Mapping[str, Any],
                 tables: Mapping[str, Sequence[Mapping[str, Any]]] | None = None, *,
                 title: str = "Run report", images: Sequence[str] = ()) -> tuple[str, str]:
    """Write `run_dir/report.json` ({"summary", "tables"}) and `run_dir/report.md`; returns both paths.

    `images` are PNG paths (relative to run_dir preferred) embedded at the end of the Markdown.
    """
    run_dir = os.fspath(run_dir)
    os.makedirs(run_dir, exist_ok=True)
    tables = dict(tables or {})
    payload = {"summary": _json_safe(dict(summary)), "tables": _json_safe(tables)}
    json_path, md_path = os.path.join(run_dir, "report.json"), os.path.join(run_dir, "report.md")
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2)
    md = [f"# {title}\n", "## Summary\n", markdown_table([{"key": k, "value": v} for k, v in summary.items()])]
    for name, rows in tables.items():
        md += [f"\n## {name}\n", markdown_table(rows)]
    for img in images:
        rel = os.path.relpath(img, run_dir) if os.path.isabs(img) else img
        md.append(f"\n![{os.path.basename(img)}]({rel})\n")
    with open(md_path, "w", encoding="utf-8") as f:
        f.write("\n".join(md))
    return json_path, md_path


def plot_curves(jsonl_paths: Mapping[str, str | os.PathLike] | Sequence[str | os.PathLike],
                keys: Sequence[str], out_png: str | os.PathLike, *, x: str = "step",
                title: str | None = None) -> str:
    """One subplot per metric in `keys`, one line per JSONL file (legend = mapping key or file's parent folder).

    Records without the key (or with null) are skipped; for a step logged twice (resumed run) the last wins.
    """
    if not isinstance(jsonl_paths, Mapping):
        jsonl_paths = {os.path.basename(os.path.dirname(os.fspath(p))) or os.fspath(p): p for p in jsonl_paths}
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.5), squeeze=False)
    for label, path in jsonl_paths.items():
        records = {r[x]: r for r in read_jsonl(path) if x in r}  # later records replace earlier ones
        for ax, key in zip(axes[0], keys):
            pts = sorted((xv, r[key]) for xv, r in records.items() if r.get(key) is not None)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], label=str(label))
    for ax, key in zip(axes[0], keys):
        ax.set_xlabel(x)
        ax.set_title(key)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    return _save(fig, out_png)


def plot_xy(xs: Sequence[float], ys: Mapping[str, Sequence[float]], xlabel: str, ylabel: str,
            out_png: str | os.PathLike, *, title: str | None = None, scatter: bool = False) -> str:
    """Several y series against one x, e.g. `plot_xy(kl, {"gold": g, "proxy": p}, "KL", "reward", path)`."""
    fig, ax = plt.subplots(figsize=(5, 3.8))
    for name, y in ys.items():
        if len(y) != len(xs):
            raise ValueError(f"plot_xy: series {name!r} has {len(y)} points but xs has {len(xs)}")
        if scatter:
            ax.scatter(xs, y, label=name, s=14)
        else:
            order = sorted(range(len(xs)), key=lambda i: xs[i])
            ax.plot([xs[i] for i in order], [y[i] for i in order], marker="o", ms=3, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    if title:
        ax.set_title(title)
    return _save(fig, out_png)


def _save(fig, out_png) -> str:
    out_png = os.fspath(out_png)
    os.makedirs(os.path.dirname(out_png) or ".", exist_ok=True)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png
