"""Render every result card (docs/results/<experiment>.md) from its JSON; `--check` fails on a card that drifted.

    python -m experiments.cards                  # rewrite every docs/results/*.md from its .json
    python -m experiments.cards --check          # exit 1 naming each card whose .md differs from its JSON
    python -m experiments.cards docs/results/label_cost.json   # only these cards (.json or .md paths)

The layout of a card's JSON and the rendering are in `rlhf_jax.recipes.cards`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rlhf_jax.recipes.cards import CardError, stale_cards, write_card

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"
"""The repository's result cards."""


def _json_paths(files: list[str]) -> list[Path]:
    if not files:
        return sorted(RESULTS.glob("*.json"))
    return [Path(f).with_suffix(".json") for f in files]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.cards", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 naming every card whose .md is not what its JSON renders")
    parser.add_argument("files", nargs="*", help=f"card .json (or .md) files; default: every card in {RESULTS}")
    args = parser.parse_args(argv)
    paths = _json_paths(args.files)
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        print(f"error: no such card JSON: {', '.join(missing)}", file=sys.stderr)
        return 2
    stale, failed = [], False
    for p in paths:
        try:
            if args.check:
                stale += stale_cards([p])
            else:
                print(write_card(p))
        except (CardError, ValueError) as e:     # ValueError: the JSON does not parse
            print(f"error: {p}: {e}", file=sys.stderr)
            failed = True
    for md in stale:
        print(f"stale card: {md} differs from what {Path(md).with_suffix('.json').name} renders; "
              "run python -m experiments.cards", file=sys.stderr)
    if failed:
        return 2
    if args.check and not stale:
        print(f"{len(paths)} cards match their JSON")
    return 1 if stale else 0

if __name__ == "__main__":
    sys.exit(main())
