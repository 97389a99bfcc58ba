"""The main job's --quick path end to end, run by tests/test_pipeline.py in a process of its own (XLA's CPU backend
at full optimisation: this test executes more than it compiles, unlike the rest of the suite, which compiles with
the backend's optimisations off). Every stage runs (the preference family too), the report has the contracted
keys and shapes, every stage's final params are saved, and a stopped run resumes to the same report."""
import json
import math
import os
import shutil
import signal


def pytest_approx(x):
    import pytest
    return pytest.approx(x, rel=1e-9, abs=1e-12)

from rlhf_jax import tasks as world
from rlhf_jax.recipes import CONTROLS, FAMILY, PipelineConfig
from rlhf_jax.recipes import run_pipeline as run

STAGE_KEYS = {"gold_reward", "gold_greedy", "kl_to_sft", "mean_length", "refusal_rate", "over_refusal_rate",
              "win_rate_vs_sft", "gold_skills", "gold_safety", "gold_greedy_skills", "gold_greedy_safety"}


def test_quick_pipeline_writes_report(tmp_path, monkeypatch, capsys):
    report = run(PipelineConfig(quick=True, out=str(tmp_path), preference_family=True, controls=True))
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk.keys() == report.keys()
    assert set(on_disk["provenance"]) == {"command", "commit", "packages", "machine", "date", "seeds"}
    assert on_disk["provenance"]["seeds"] == [0] and "jax" in on_disk["provenance"]["packages"]
    md = (tmp_path / "report.md").read_text()      # for a newcomer: a banner, intervals, a legend, every curve
    assert "Smoke test (`--quick`)" in md and "- **vs SFT best T**:" in md
    table = [line for line in md.splitlines() if line.startswith("| stage | gold |")] + [
        line for line in md.splitlines() if line.startswith("|---|")][:1]
    assert table[0].count("|") == table[1].count("|")                  # the header and its rule agree
    assert f"| ppo | {on_disk['ppo']['gold_reward']:.3f} | {on_disk['ppo']['gold_vs_sft']['all']['delta']:+.3f} [" in md
    for png in ("ppo_reward_vs_kl.png", "dpo_margins.png", "grpo_reward.png"):
        assert f"![{png}]({png})" in md and (tmp_path / png).stat().st_size > 0, png
    assert len((tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()) >= 10
    for stage in ("base", "sft", "sft_best_t", "ppo", "dpo", "grpo", *CONTROLS, *FAMILY):
        assert STAGE_KEYS <= on_disk[stage].keys(), stage
        assert 0.0 <= on_disk[stage]["gold_reward"] <= 1.0 and 0.0 <= on_disk[stage]["gold_greedy"] <= 1.0
        assert 0.0 <= on_disk[stage]["refusal_rate"] <= 1.0
        assert on_disk[stage]["mean_length"] >= 0.0
    assert on_disk["sft"]["kl_to_sft"] == 0.0 and on_disk["sft"]["win_rate_vs_sft"] == 0.5
    assert math.isfinite(on_disk["ppo"]["kl_to_sft"]) and math.isfinite(on_disk["dpo"]["kl_to_sft"])
    assert 0.0 <= on_disk["reward_model"]["accuracy"] <= 1.0
    assert on_disk["reward_model"]["test_pairs"] > 0 and on_disk["reward_model"]["train_pairs"] > 0
    bon = on_disk["reward_model"]["best_of_n"]  # the gold pick is the best any pick can do
    assert bon["gold_oracle_pick"] >= max(bon["gold_rm_pick"], bon["gold_random"]) - 1e-12
    for stage in ("base", "sft_best_t", "ppo", "dpo", "grpo", *CONTROLS, *FAMILY):
        comparisons = [on_disk[stage]["gold_vs_sft"]] + ([on_disk[stage]["gold_vs_sft_best_t"]]
                                                         if stage not in ("base", "sft_best_t") else [])
        for groups in comparisons:
            assert set(groups) == {"all", "skills", "safety"}
            for ci in groups.values():
                assert ci["low"] <= ci["delta"] <= ci["high"] and ci["level"] == 0.95
    # Evaluation by key: every distinct test prompt once; SFT's temperature chosen on dev among those swept.
    assert on_disk["evaluation"]["distinct_prompts"] == len(world.key_tasks("test"))
    sweep = on_disk["reward_model"]["sft_temperature_sweep_dev"]
    assert float(max(sweep, key=sweep.get)) == on_disk["sft_best_t"]["temperature"]
    ppo = on_disk["ppo"]  # the combined gold reward is the families' declared mix of the two groups
    share = sum(world.DEFAULT_MIX[f] for f in world.SKILL_FAMILIES) / sum(world.DEFAULT_MIX.values())
    assert ppo["gold_reward"] == pytest_approx(share * ppo["gold_skills"] + (1 - share) * ppo["gold_safety"])
    for stage in ("base", "sft", "ppo", "dpo"):
        fams = on_disk[stage]["gold_by_family"]
        assert fams and set(fams) <= set(world.FAMILIES) and all(0.0 <= v <= 1.0 for v in fams.values())
    # The PPO curve starts at the SFT policy and has one point per evaluation.
    assert on_disk["ppo_curve"][0]["iteration"] == 0 and len(on_disk["ppo_curve"]) >= 2
    for name in ("report.md", "ppo_reward_vs_kl.png", "dpo_margins.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    for stage in ("pretrain", "sft", "reward", "ppo", "dpo", "grpo", *FAMILY):
        lines = (tmp_path / stage / "metrics.jsonl").read_text().splitlines()
        assert lines and "step" in json.loads(lines[-1])
    ppo_last = json.loads((tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()[-1])
    assert ppo_last["loss/ptx"] > 0.0  # PPO-ptx on the demonstrations is on by default
    for stage in ("pretrain", "sft", "reward", "ppo", "dpo", "grpo"):
        assert (tmp_path / stage / "final" / "model_config.json").exists(), stage
    grpo_last = json.loads((tmp_path / "grpo" / "metrics.jsonl").read_text().splitlines()[-1])
    assert 0.0 <= grpo_last["reward"] <= 1.0 and "kl" in grpo_last     # the gold reward; KL to SFT in the loss
    online = [json.loads(x) for x in (tmp_path / "online_dpo" / "metrics.jsonl").read_text().splitlines()]
    zero = [json.loads(x) for x in (tmp_path / "ppo_zero_reward" / "metrics.jsonl").read_text().splitlines()]
    assert all(x["objective/scores"] <= 0.0 for x in zero) and zero[-1]["loss/ptx"] > 0.0  # 0, less EOS penalties
    assert sum(x["judge/gold_decided"] for x in online) > 0               # the annotators' labels vs the gold reward
    assert (tmp_path / "online_dpo" / "completions.jsonl").stat().st_size > 0
    assert "rewards/chosen" in json.loads((tmp_path / "kto" / "metrics.jsonl").read_text().splitlines()[-1])
    _stopped_and_resumed_gives_the_same_report(tmp_path / "resumed", on_disk, monkeypatch, capsys)
    _lecture_experiments_on_these_models(tmp_path)


def _lecture_experiments_on_these_models(models):
    """experiments.calibration, safety_data, grpo_transfer, hallucination and grpo_variants --quick on this run's
    models (read, not retrained: the folder is a finished seed-0 quick run), and midtraining --quick, which trains
    its own."""
    from experiments import calibration, grpo_transfer, grpo_variants, hallucination, midtraining, safety_data
    from rlhf_jax.recipes import calibration as cal_recipe
    from rlhf_jax.recipes import grpo_variants as gv_recipe
    from rlhf_jax.recipes import hallucination as hal_recipe
    from rlhf_jax.recipes import midtraining as mt_recipe
    before = sorted(os.listdir(models))
    cal = calibration.run(calibration.CalibrationConfig(quick=True, seeds=(0,), models=str(models),
                                                        out=str(models / "cal")))
    assert set(cal["across_seeds"]) == set(cal_recipe.STAGES)
    for stage, s in cal["per_seed"]["0"].items():
        assert 0.0 <= s["ece_low"] <= s["ece"] <= s["ece_high"] <= 1.0, stage
        assert sum(s["bins"]["count"]) == s["answers"] == 2 * cal["distinct_prompts"]
    assert (models / "cal" / "reliability.png").stat().st_size > 0
    sd = safety_data.run(safety_data.SafetyDataConfig(quick=True, seeds=(0,), models=str(models),
                                                     out=str(models / "sd"), counts=(0, 25)))
    rows = sd["per_seed"]["0"]
    assert [r["count"] for r in rows["refusals"]] == [0, 25] and rows["refusals"][0] == rows["refusals+lookalikes"][0]
    for r in rows["refusals"] + rows["refusals+lookalikes"]:
        assert 0.0 <= r["refusal_low"] <= r["refusal"] <= r["refusal_high"] <= 1.0
    assert (models / "sd" / "safety_data.png").stat().st_size > 0
    gt = grpo_transfer.run(grpo_transfer.GRPOTransferConfig(quick=True, models=str(models), out=str(models / "gt"),
                                                            learning_rates=(3e-5,)))
    assert [v["prompts"] for v in gt["variants"]] == ["fresh", "fixed"]
    assert all(len(v["batch_reward"]) == 4 and 0.0 <= v["dev"]["gold"] <= 1.0 for v in gt["variants"])
    assert gt["train_prompts"] == 24 and all(0.0 <= v["dev"]["train_gold"] <= 1.0 for v in gt["variants"])
    hal = hallucination.run(hallucination.HallucinationConfig(quick=True, seeds=(0,), models=str(models),
                                                              out=str(models / "hal")))
    rows = hal["per_seed"]["0"]
    assert list(rows) == list(hal_recipe.ARMS) and hal["prompts"] == {"held-out unknown": 20, "train unknown": 20,
                                                                        "known": 20}
    for arm in rows.values():
        for r in arm.values():
            assert sum(r[o] for o in hal_recipe.OUTCOMES) == pytest_approx(1.0)
    assert (models / "hal" / "hallucination.png").stat().st_size > 0
    gv = grpo_variants.run(grpo_variants.GRPOVariantsConfig(quick=True, models=str(models), out=str(models / "gv")))
    rows = gv["per_seed"]["0"]["rows"]
    assert list(rows) == ["sft", *gv_recipe.VARIANTS] and rows["sft"]["kl_to_ref"] == 0.0
    assert set(gv["per_seed"]["0"]["train"]) == set(gv_recipe.VARIANTS) - {"grpo"}     # grpo: the main job's
    assert 0.0 < gv["per_seed"]["0"]["train"]["dapo"]["informative_fraction"] <= 1.0
    assert (models / "gv" / "grpo_variants.png").stat().st_size > 0
    mt = midtraining.run(midtraining.MidtrainingConfig(quick=True, out=str(models / "mt")))   # trains its own
    seed0 = mt["per_seed"]["0"]
    assert list(seed0["arms"]) == ["pretrain", *mt_recipe.ARMS] and set(seed0["vs_pretrain_sft"]) == {
        "midtrain", "midtrain-sft"}
    assert all(0.0 <= r["gold_reward"] <= 1.0 for r in seed0["arms"].values())
    assert abs(seed0["arms"]["pretrain-sft"]["kl_to_ref"]) < 1e-6                   # the arms' reference
    assert (models / "mt" / "midtraining.png").stat().st_size > 0
    made = {"cal", "sd", "gt", "hal", "gv", "mt"}
    assert sorted(n for n in os.listdir(models) if n not in made) == before          # nothing retrained


def _stopped_and_resumed_gives_the_same_report(out, report, monkeypatch, capsys):
    """SIGTERM (sent to this process at the last stage's, GRPO's, iteration 2), then a run with --resume (finished
    stages reloaded from final/, GRPO from its checkpoint): the report equals the uninterrupted run's. In-process,
    so the compiled programs are reused (a subprocess pair took two minutes more); the last stage, so that the
    stages after the stopped one are not run twice. The stopped run starts from a copy of the uninterrupted run's
    finished stages before GRPO (with --resume, so that they are reloaded, not trained a second time)."""
    from rlhf_jax.cli import pipeline
    from rlhf_jax.recipes import stages
    from rlhf_jax.train.logging import StageHooks
    real_run_stage = stages.run_stage

    class Terminate(StageHooks):
        def on_state(self, step, state):
            if step == 2:
                os.kill(os.getpid(), signal.SIGTERM)

    def run_stage(stage, *args, extra_hooks=(), **kwargs):
        extra = [*extra_hooks, Terminate()] if stage == "grpo" else extra_hooks
        return real_run_stage(stage, *args, extra_hooks=extra, **kwargs)

    monkeypatch.setattr(stages, "run_stage", run_stage)
    done = out.parent
    shutil.copytree(done, out, ignore=lambda d, names: [n for n in names if n == out.name or
                                                        (n == "grpo" and d in (str(done), str(done / "checkpoints")))
                                                        or n.startswith("report")])
    assert pipeline.main(["--quick", "--out", str(out), "--resume", "--preference-family", "--controls"]) == 143
    assert "stopped during grpo; continue with: rlhf-jax pipeline --resume" in capsys.readouterr().err
    assert (out / "dpo" / "final").is_dir() and not (out / "grpo" / "final").exists()
    assert os.listdir(out / "checkpoints" / "grpo") == ["2"]             # the stopped stage's checkpoint
    monkeypatch.setattr(stages, "run_stage", real_run_stage)
    run(PipelineConfig(quick=True, out=str(out), resume=True, preference_family=True, controls=True))
    printed = capsys.readouterr().out
    assert "sft          loaded from" in printed and "ppo          loaded from" in printed
    again = json.loads((out / "report.json").read_text())
    for key in ("base", "sft", "sft_best_t", "ppo", "dpo", "grpo", *CONTROLS, *FAMILY, "reward_model", "ppo_curve"):   # NaN equals NaN
        assert json.dumps(again[key], sort_keys=True) == json.dumps(report[key], sort_keys=True), key
