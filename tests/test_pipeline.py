"""The main job's --quick path end to end: every stage runs and the report has the contracted keys and shapes."""
import json
import math

from experiments.pipeline import PipelineConfig, run

STAGE_KEYS = {"gold_reward", "kl_to_sft", "mean_length", "refusal_rate", "over_refusal_rate", "win_rate_vs_sft"}


def test_quick_pipeline_writes_report(tmp_path):
    report = run(PipelineConfig(quick=True, out=str(tmp_path)))
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk.keys() == report.keys()
    for stage in ("base", "sft", "ppo", "dpo"):
        assert STAGE_KEYS <= on_disk[stage].keys(), stage
        assert 0.0 <= on_disk[stage]["gold_reward"] <= 1.0
        assert 0.0 <= on_disk[stage]["refusal_rate"] <= 1.0
        assert on_disk[stage]["mean_length"] >= 0.0
    assert on_disk["sft"]["kl_to_sft"] == 0.0 and on_disk["sft"]["win_rate_vs_sft"] == 0.5
    assert math.isfinite(on_disk["ppo"]["kl_to_sft"]) and math.isfinite(on_disk["dpo"]["kl_to_sft"])
    assert 0.0 <= on_disk["reward_model"]["accuracy"] <= 1.0
    # The PPO curve starts at the SFT policy and has one point per evaluation.
    assert on_disk["ppo_curve"][0]["iteration"] == 0 and len(on_disk["ppo_curve"]) >= 2
    for name in ("report.md", "ppo_reward_vs_kl.png", "dpo_margins.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    for stage in ("pretrain", "sft", "reward", "ppo", "dpo"):
        lines = (tmp_path / stage / "metrics.jsonl").read_text().splitlines()
        assert lines and "step" in json.loads(lines[-1])
