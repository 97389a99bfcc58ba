"""The rule world's main job: its summary over seeds against hand-computed comparisons, and the command end to end
at --quick sizes on dev keys (a finished seed is read back, not run again), then experiments.distill_world --quick
with that run's GRPO policy as the teacher."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from rlhf_jax.cli import rule_world as command
from rlhf_jax.recipes import rule_world as rw
from rlhf_jax.recipes.cards import provenance, render_card


def _report(seed: int, lift: dict[str, float]) -> dict:
    rng = np.random.default_rng(seed)
    flaw = rng.random(40) < 0.4
    base = np.where(flaw, 0.0, 1.0)
    stages = {}
    for name, p in lift.items():          # each stage: the base answers, with a share p of the flaw keys fixed
        ex = np.where(flaw & (rng.random(40) < p), 1.0, base)
        stages[name] = {"exact": ex.tolist(), "mean": float(ex.mean()), "flaw_keys": float(ex[flaw].mean()),
                        "train_keys": float(ex.mean()), "temperature": 0.0}
    return {"seed": seed, "eval_split": "dev", "stages": stages, "wall_s": 60.0,
            "reward_model": {"eval_correct": (rng.random(50) < 0.9).astype(float).tolist()}}


def test_seed_summary_matches_hand_computed_comparisons():
    # SFT at its best temperature differs from the deployed SFT, so a gap measured from the wrong baseline shows.
    lift = {"sft": 0.0, "sft_t07": 0.0, "sft_best_t": 0.3, "oracle_sft": 1.0, "ppo": 0.6, "grpo": 0.9, "dpo": 0.45}
    reports = [_report(s, lift) for s in range(3)]
    summary = rw.seed_summary(reports, num_samples=500)
    ex = lambda stage: [np.asarray(r["stages"][stage]["exact"]) for r in reports]  # noqa: E731
    diff = lambda a, b: np.mean([(x - y).mean() for x, y in zip(ex(a), ex(b))])  # noqa: E731
    assert summary["primary"]["grpo - sft_best_t"]["delta"] == pytest.approx(diff("grpo", "sft_best_t"))
    assert summary["primary"]["dpo - sft_t07"]["delta"] == pytest.approx(diff("dpo", "sft_t07"))
    assert summary["primary"]["grpo - sft_best_t"]["low"] > 0            # a large fix holds on three seeds
    share = summary["gap_closed"]["ppo"]
    assert share["share"] == pytest.approx(diff("ppo", "sft_best_t") / diff("oracle_sft", "sft_best_t"))
    assert share["low"] <= share["share"] <= share["high"]
    assert "oracle_sft" not in summary["gap_closed"] and "sft_best_t" not in summary["vs_sft_best_t"]
    acc = np.mean([np.mean(r["reward_model"]["eval_correct"]) for r in reports])
    assert summary["reward_model"]["accuracy"] == pytest.approx(acc)
    text = rw.summary_markdown(summary, reports)
    assert "grpo - sft_best_t" in text and "(holds" in text
    summary["provenance"] = provenance("rlhf-jax rule-world --seeds 0 1 2", [0, 1, 2])
    card = render_card(rw.rule_world_card(summary, reports))
    assert "| grpo - sft_best_t | " in card and "| yes |" in card and "## Per seed" in card


def test_rule_world_command_quick_on_dev_keys(tmp_path, capsys):
    out = str(tmp_path / "rw")
    argv = ["--quick", "--out", out, "--world.eval-split", "dev", "--world.no-controls"]
    assert command.main(argv) == 0
    report = json.load(open(os.path.join(out, "seed0", "report.json")))
    assert report["eval_split"] == "dev" and report["provenance"]["seeds"] == [0]
    assert {"sft", "sft_best_t", "oracle_sft", "grpo"} <= set(report["stages"])
    assert len(report["stages"]["sft"]["exact"]) == 16
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["eval_split"] == "dev" and "grpo - sft_best_t" in summary["primary"]
    assert json.load(open(os.path.join(out, "card.json")))["provenance"]["seeds"] == [0]
    capsys.readouterr()
    assert command.main(argv) == 0                      # read back, not run again
    assert "read back" in capsys.readouterr().err
    # experiments.distill_world --quick on this run's GRPO policy as the teacher.
    from experiments import distill_world
    dw = str(tmp_path / "dw")
    distill_world.main(["--quick", "--teachers", out, "--seeds", "0", "--eval-split", "dev", "--out", dw])
    result = json.load(open(os.path.join(dw, "distill_world.json")))
    arms = result["per_seed"][0]["arms"]
    assert set(arms) == set(distill_world.ARMS) and all(len(a["exact"]) == 16 for a in arms.values())
    assert all(np.isfinite(a["kl_to_teacher"]) for a in arms.values())
    assert result["summary"]["on_policy"]["vs_student_sft"]["low"] <= result["summary"]["on_policy"]["vs_student_sft"]["high"]
    assert "on-policy student" in render_card(json.load(open(os.path.join(dw, "card.json"))))
