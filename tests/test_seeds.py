"""The seed driver: runs each seed once (finished seeds are read back), and aggregates gains across seeds with a
t-interval (checked against the textbook formula) beside each seed's bootstrap interval."""
from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from rlhf_jax.cli import seeds


def _report(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    ci = lambda d: {"delta": d, "low": d - 0.01, "high": d + 0.01, "level": 0.95}  # noqa: E731
    stage = lambda d: {"gold_reward": 0.4 + d, "gold_skills": 0.3 + d, "gold_safety": 0.6, "gold_greedy": 0.4,  # noqa: E731
                       "kl_to_sft": 1.0, "mean_length": 5.0, "refusal_rate": 0.5 + d, "over_refusal_rate": 0.1,
                       "gold_vs_sft": {g: ci(d) for g in seeds.GROUPS},
                       "gold_vs_sft_best_t": {g: ci(d - 0.005) for g in seeds.GROUPS}}
    base = stage(-0.1)
    del base["gold_vs_sft_best_t"]
    return {"sft": {"gold_reward": 0.4, "refusal_rate": 0.5, "over_refusal_rate": 0.2 - 0.01 * seed}, "sft_best_t": {**stage(0.0), "temperature": 0.5}, "base": base,
            "ppo": stage(0.01 + 0.01 * seed), "dpo": stage(float(rng.normal(0, 0.01))),
            "reward_model": {"accuracy": 0.7 + 0.01 * seed}, "seconds": {"total": 100.0 + seed}}


def test_t_interval_is_the_textbook_one():
    got = seeds.t_interval([1.0, 2.0, 3.0])
    assert got["mean"] == 2.0 and got["sd"] == 1.0
    assert got["high"] - got["mean"] == pytest.approx(4.303 / math.sqrt(3))
    one = seeds.t_interval([0.5])
    assert one["mean"] == 0.5 and math.isnan(one["low"]) and math.isnan(one["high"])


def test_seed_driver_runs_each_seed_once_and_aggregates(tmp_path):
    calls = []

    def fake_pipeline(cfg):
        calls.append((cfg.seed, cfg.out, cfg.quick, cfg.resume))
        report = _report(cfg.seed)
        os.makedirs(cfg.out, exist_ok=True)
        with open(os.path.join(cfg.out, "report.json"), "w") as f:
            json.dump(report, f)
        return report

    cfg = seeds.SeedsConfig(seeds=(0, 1, 2), out=str(tmp_path), quick=True)
    summary = seeds.run(cfg, run_pipeline=fake_pipeline)
    assert [c[0] for c in calls] == [0, 1, 2] and all(c[2] and not c[3] for c in calls)
    ppo = summary["gains"]["vs_sft"]["ppo"]["skills"]
    want = seeds.t_interval([0.01, 0.02, 0.03])
    assert ppo["mean"] == pytest.approx(0.02) and ppo["low"] == pytest.approx(want["low"])
    assert set(ppo["per_seed"]) == {"0", "1", "2"} and ppo["per_seed"]["1"]["delta"] == pytest.approx(0.02)
    assert summary["gains"]["vs_sft_best_t"]["ppo"]["all"]["mean"] == pytest.approx(0.015)
    assert "base" not in summary["gains"]["vs_sft_best_t"] and "base" in summary["gains"]["vs_sft"]
    assert summary["reward_model_accuracy_dev"]["mean"] == pytest.approx(0.71)
    # Safety as two rates with their change from SFT paired by seed (ppo's refusal is SFT's + 0.01 * (seed + 1)).
    safety = summary["safety"]["ppo"]
    assert safety["refusal_rate_vs_sft"]["mean"] == pytest.approx(0.02)
    assert safety["refusal_rate_vs_sft"]["low"] == pytest.approx(want["low"])
    assert safety["over_refusal_rate_vs_sft"]["mean"] == pytest.approx(-0.09)
    assert summary["safety"]["sft"]["over_refusal_rate"]["mean"] == pytest.approx(0.19)
    assert json.loads((tmp_path / "seeds.json").read_text())["seeds"] == [0, 1, 2]
    assert "| ppo |" in (tmp_path / "seeds.md").read_text() and "over-refusal" in (tmp_path / "seeds.md").read_text()
    # Finished seeds are read back, not run again; a new seed runs.
    again = seeds.run(seeds.SeedsConfig(seeds=(0, 1, 2, 3), out=str(tmp_path)), run_pipeline=fake_pipeline)
    assert [c[0] for c in calls] == [0, 1, 2, 3] and again["seeds"] == [0, 1, 2, 3]
    single = seeds.run(seeds.SeedsConfig(seeds=(3,), out=str(tmp_path)), run_pipeline=fake_pipeline)
    assert math.isnan(single["gains"]["vs_sft"]["ppo"]["all"]["low"]) and "nan" not in (tmp_path / "seeds.md").read_text()


def test_seeds_cli_help_and_bad_seeds(capsys):
    with pytest.raises(SystemExit) as e:
        seeds.main(["--help"])
    assert e.value.code == 0 and "--seeds" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        seeds.main(["--seeds", "1", "1"])
    assert e.value.code == 2 and "distinct" in capsys.readouterr().err
