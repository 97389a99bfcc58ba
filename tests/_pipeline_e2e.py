"""The main job's --quick path end to end, run by tests/test_pipeline.py in a process of its own (XLA's CPU backend
at full optimisation: this test executes more than it compiles, unlike the rest of the suite, which compiles with
the backend's optimisations off). Every stage runs (the preference family too), the report has the contracted
keys and shapes, every stage's final params are saved, and a stopped run resumes to the same report."""
import json
import math
import os
import shutil
import signal

from experiments.pipeline import FAMILY, PipelineConfig, run
from rlhf_jax import tasks as world

STAGE_KEYS = {"gold_reward", "gold_greedy", "kl_to_sft", "mean_length", "refusal_rate", "over_refusal_rate",
              "win_rate_vs_sft"}


def test_quick_pipeline_writes_report(tmp_path, monkeypatch, capsys):
    report = run(PipelineConfig(quick=True, out=str(tmp_path), preference_family=True))
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk.keys() == report.keys()
    for stage in ("base", "sft", "ppo", "dpo", "grpo", *FAMILY):
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
    for stage in ("base", "ppo", "dpo", "grpo", *FAMILY):
        ci = on_disk[stage]["gold_vs_sft"]
        assert ci["low"] <= ci["delta"] <= ci["high"] and ci["level"] == 0.95
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
    assert sum(x["judge/gold_decided"] for x in online) > 0               # the annotators' labels vs the gold reward
    assert (tmp_path / "online_dpo" / "completions.jsonl").stat().st_size > 0
    assert "rewards/chosen" in json.loads((tmp_path / "kto" / "metrics.jsonl").read_text().splitlines()[-1])
    _stopped_and_resumed_gives_the_same_report(tmp_path / "resumed", on_disk, monkeypatch, capsys)


def _stopped_and_resumed_gives_the_same_report(out, report, monkeypatch, capsys):
    """SIGTERM (sent to this process at the last stage's, GRPO's, iteration 2), then a run with --resume (finished
    stages reloaded from final/, GRPO from its checkpoint): the report equals the uninterrupted run's. In-process,
    so the compiled programs are reused (a subprocess pair took two minutes more); the last stage, so that the
    stages after the stopped one are not run twice. The stopped run starts from a copy of the uninterrupted run's
    finished stages before GRPO (with --resume, so that they are reloaded, not trained a second time)."""
    import experiments.pipeline as pipeline
    from rlhf_jax.train.logging import StageHooks
    real_run_stage = pipeline.run_stage

    class Terminate(StageHooks):
        def on_state(self, step, state):
            if step == 2:
                os.kill(os.getpid(), signal.SIGTERM)

    def run_stage(stage, *args, extra_hooks=(), **kwargs):
        extra = [*extra_hooks, Terminate()] if stage == "grpo" else extra_hooks
        return real_run_stage(stage, *args, extra_hooks=extra, **kwargs)

    monkeypatch.setattr(pipeline, "run_stage", run_stage)
    done = out.parent
    shutil.copytree(done, out, ignore=lambda d, names: [n for n in names if n == out.name or
                                                        (n == "grpo" and d in (str(done), str(done / "checkpoints")))
                                                        or n.startswith("report")])
    assert pipeline.main(["--quick", "--out", str(out), "--resume", "--preference-family"]) == 143
    assert "stopped during grpo; continue with: python -m experiments.pipeline --resume" in capsys.readouterr().err
    assert (out / "dpo" / "final").is_dir() and not (out / "grpo" / "final").exists()
    assert os.listdir(out / "checkpoints" / "grpo") == ["2"]             # the stopped stage's checkpoint
    monkeypatch.setattr(pipeline, "run_stage", real_run_stage)
    run(PipelineConfig(quick=True, out=str(out), resume=True, preference_family=True))
    printed = capsys.readouterr().out
    assert "sft          loaded from" in printed and "ppo          loaded from" in printed
    again = json.loads((out / "report.json").read_text())
    for key in ("base", "sft", "ppo", "dpo", "grpo", *FAMILY, "reward_model", "ppo_curve"):   # NaN equals NaN
        assert json.dumps(again[key], sort_keys=True) == json.dumps(report[key], sort_keys=True), key
