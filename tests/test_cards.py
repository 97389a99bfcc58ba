"""Result cards (rlhf_jax.recipes.cards, python -m experiments.cards): tables come from the JSON, provenance is
complete, and the repository's cards match their JSON, so text and numbers cannot drift."""
import json
import re
import shutil
from pathlib import Path

import pytest

from experiments import cards as cards_script
from rlhf_jax.recipes import cards

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"


def _card():
    return {
        "title": "A toy result",
        "provenance": {"command": "python -m experiments.toy --seeds 0 1", "commit": "abc1234",
                       "packages": {"jax": "0.0.1"}, "machine": "2-core CPU", "date": "2026-01-01", "seeds": [0, 1]},
        "summary": ["Gain over SFT: {{gains.ppo:+.3f}} on {{prompts}} prompts."],
        "sections": [{"title": "Gold", "tables": [{
            "columns": ["stage", "gold", "gain", "length"],
            "formats": [None, ".3f", None, ".1f"],
            "rows": [["sft", 0.3691, None, 5.25],
                     ["ppo", {"ref": "per_seed.0.ppo"}, {"value": -0.0114, "ci": [-0.037, 0.0152], "signed": True},
                      5.0]],
        }]}],
        "does_not_show": ["One toy seed."],
        "gains": {"ppo": {"mean": -0.0114, "low": -0.037, "high": 0.0152, "n": 2}},
        "prompts": 241,
        "per_seed": {"0": {"ppo": 0.3272}},
    }


def test_tables_and_cited_numbers_come_from_the_json():
    data = _card()
    md = cards.render_card(data)
    assert "| sft | 0.369 |  | 5.2 |" in md
    assert "| ppo | 0.327 | -0.011 [-0.037, +0.015] | 5.0 |" in md    # a reference and a signed interval
    assert "Gain over SFT: -0.011 [-0.037, +0.015] on 241 prompts." in md
    assert "python -m experiments.toy --seeds 0 1" in md and "abc1234" in md

    data["sections"][0]["tables"][0]["rows"][0][1] = 0.4    # a table number changes -> the card changes
    data["per_seed"]["0"]["ppo"] = 0.5                      # ... and a referenced raw number too
    data["gains"]["ppo"]["mean"] = 0.02
    changed = cards.render_card(data)
    assert "| sft | 0.400 |  | 5.2 |" in changed
    assert "| ppo | 0.500 |" in changed
    assert "Gain over SFT: +0.020 [-0.037, +0.015]" in changed


def test_intervals_are_written_one_way():
    assert cards.format_interval(0.412, 0.3981, 0.4254) == "0.412 [0.398, 0.425]"
    assert cards.format_interval(-0.0114, -0.037, 0.0152, signed=True) == "-0.011 [-0.037, +0.015]"
    assert cards.format_cell({"value": 0.015, "ci": [0.002, 0.031], "signed": True, "level": "99.3%"}) == \
        "+0.015 [+0.002, +0.031] (99.3%)"
    assert cards.format_cell({"delta": 0.01, "low": -0.0, "high": 0.02, "level": 0.95}, "+.2f") == \
        "+0.01 [-0.00, +0.02]"


def test_a_bad_reference_or_row_names_the_card():
    data = _card()
    data["summary"] = ["{{gains.dpo}}"]
    with pytest.raises(cards.CardError, match="A toy result.*gains.dpo"):
        cards.render_card(data)
    data = _card()
    data["sections"][0]["tables"][0]["rows"][0].append(1.0)
    with pytest.raises(cards.CardError, match="row 0 has 5 cells for 4 columns"):
        cards.render_card(data)


def test_provenance_has_every_key(tmp_path):
    prov = cards.provenance("python -m experiments.toy", [0, 1])
    assert tuple(prov) == cards.PROVENANCE_KEYS
    assert prov["command"] == "python -m experiments.toy" and prov["seeds"] == [0, 1]
    assert set(prov["packages"]) == set(cards.PACKAGES)
    assert prov["commit"] != "unknown"       # the tests run from the git checkout
    assert "CPU cores" in prov["machine"] and prov["date"].endswith("+00:00")
    assert cards.provenance("x", 3, repo=tmp_path)["commit"] == "unknown"    # outside a checkout: no exception
    assert "python -m experiments.toy" in cards.render_card({"title": "t", "provenance": prov})


def test_every_repository_card_has_provenance_and_matches_its_json():
    paths = sorted(RESULTS.glob("*.json"))
    assert paths, "docs/results has no cards"
    for p in paths:
        prov = json.loads(p.read_text())["provenance"]
        assert set(cards.PROVENANCE_KEYS) <= set(prov), p.name
    assert cards_script.main(["--check"]) == 0


def test_check_fails_on_a_tampered_copy(tmp_path, capsys):
    for name in ("calibration.json", "calibration.md", "label_cost.json", "label_cost.md"):
        shutil.copy(RESULTS / name, tmp_path / name)
    files = [str(tmp_path / "calibration.json"), str(tmp_path / "label_cost.json")]
    assert cards_script.main(["--check", *files]) == 0

    data = json.loads((tmp_path / "calibration.json").read_text())     # a number in the JSON, not in the .md
    data["sections"][0]["tables"][0]["rows"][0][1]["value"] = 0.5
    (tmp_path / "calibration.json").write_text(json.dumps(data))
    md = (tmp_path / "label_cost.md").read_text()                         # a number in the .md, not in the JSON
    cell = re.search(r"\| (0\.\d{3}) \|", md).group(1)
    (tmp_path / "label_cost.md").write_text(md.replace(f"| {cell} |", f"| {float(cell) + 0.1:.3f} |", 1))
    capsys.readouterr()
    assert cards_script.main(["--check", *files]) == 1
    err = capsys.readouterr().err
    assert "calibration.md" in err and "label_cost.md" in err

    assert cards_script.main(files) == 0                                  # regenerate: the check passes again
    assert cards_script.main(["--check", *files]) == 0



def test_an_experiments_json_records_its_provenance(tmp_path, monkeypatch):
    """Every experiment's OUT/<name>.json (rlhf_jax.recipes.models.write_report) carries the command as the user
    typed it, the commit, package versions, machine, date and seeds."""
    import json
    import sys

    from rlhf_jax.recipes import models
    monkeypatch.setattr(sys, "argv", ["/repo/experiments/label_cost.py", "--seeds", "0", "1"])
    models.write_report(str(tmp_path), "annotators", {"seeds": [0, 1], "gain": 0.1}, "text\n")
    saved = json.loads((tmp_path / "annotators.json").read_text())
    assert saved["gain"] == 0.1 and saved["provenance"]["seeds"] == [0, 1]
    assert saved["provenance"]["command"] == "python -m experiments.label_cost --seeds 0 1"
    assert set(saved["provenance"]) == set(cards.PROVENANCE_KEYS)
