"""The main job's --quick path end to end (every stage runs, the report has the contracted keys and shapes, every
stage's final params are saved, --resume reloads them), and the world's pair helpers it uses."""
import json
import math
import os
import shutil
import signal

import numpy as np

from experiments.pipeline import PipelineConfig, run
from rlhf_jax import tasks as world
from rlhf_jax.tasks import on_policy_records, split_pairs

STAGE_KEYS = {"gold_reward", "gold_greedy", "kl_to_sft", "mean_length", "refusal_rate", "over_refusal_rate",
              "win_rate_vs_sft"}


def test_quick_pipeline_writes_report(tmp_path, monkeypatch, capsys):
    report = run(PipelineConfig(quick=True, out=str(tmp_path)))
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk.keys() == report.keys()
    for stage in ("base", "sft", "ppo", "dpo", "grpo"):
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
    for stage in ("base", "ppo", "dpo", "grpo"):
        ci = on_disk[stage]["gold_vs_sft"]
        assert ci["low"] <= ci["delta"] <= ci["high"] and ci["level"] == 0.95
    for stage in ("base", "sft", "ppo", "dpo"):
        fams = on_disk[stage]["gold_by_family"]
        assert fams and set(fams) <= set(world.FAMILIES) and all(0.0 <= v <= 1.0 for v in fams.values())
    # The PPO curve starts at the SFT policy and has one point per evaluation.
    assert on_disk["ppo_curve"][0]["iteration"] == 0 and len(on_disk["ppo_curve"]) >= 2
    for name in ("report.md", "ppo_reward_vs_kl.png", "dpo_margins.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    for stage in ("pretrain", "sft", "reward", "ppo", "dpo", "grpo"):
        lines = (tmp_path / stage / "metrics.jsonl").read_text().splitlines()
        assert lines and "step" in json.loads(lines[-1])
    ppo_last = json.loads((tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()[-1])
    assert ppo_last["loss/ptx"] > 0.0  # PPO-ptx on the demonstrations is on by default
    for stage in ("pretrain", "sft", "reward", "ppo", "dpo", "grpo"):
        assert (tmp_path / stage / "final" / "model_config.json").exists(), stage
    grpo_last = json.loads((tmp_path / "grpo" / "metrics.jsonl").read_text().splitlines()[-1])
    assert 0.0 <= grpo_last["reward"] <= 1.0 and "kl" in grpo_last     # the gold reward; KL to SFT in the loss
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
    assert pipeline.main(["--quick", "--out", str(out), "--resume"]) == 143
    assert "stopped during grpo; continue with: python -m experiments.pipeline --resume" in capsys.readouterr().err
    assert (out / "dpo" / "final").is_dir() and not (out / "grpo" / "final").exists()
    assert os.listdir(out / "checkpoints" / "grpo") == ["2"]             # the stopped stage's checkpoint
    monkeypatch.setattr(pipeline, "run_stage", real_run_stage)
    run(PipelineConfig(quick=True, out=str(out), resume=True))
    printed = capsys.readouterr().out
    assert "sft          loaded from" in printed and "ppo          loaded from" in printed
    again = json.loads((out / "report.json").read_text())
    for key in ("base", "sft", "ppo", "dpo", "grpo", "reward_model", "ppo_curve"):   # as JSON: NaN equals NaN
        assert json.dumps(again[key], sort_keys=True) == json.dumps(report[key], sort_keys=True), key


def test_split_pairs_holds_out_whole_prompts():
    # 40 distinct prompts with 4 distinct responses each: 6 pairs per ranking
    tasks = list({t.prompt: t for t in world.make_tasks(200, 3, mix={"add": 1.0})}.values())[:40]
    resp = [[t.answer, t.answer + "x", "no", "I can't help with that."] for t in tasks]
    ranked = world.label_rankings(tasks, resp, "careful", np.random.default_rng(0))
    off_tasks = list({t.prompt: t for t in world.make_tasks(200, 4, mix={"add": 1.0})
                      if t.prompt not in {u.prompt for u in tasks}}.values())[:30]
    off = world.synthetic_pairs(off_tasks, "careful", np.random.default_rng(1))
    pairs, train, test = split_pairs(ranked, off, len(tasks), len(off_tasks), np.random.default_rng(2))
    assert len(pairs) == len(ranked) + len(off) == len(train) + len(test)
    key = lambda prompt, chosen, rejected: (prompt, chosen, rejected)  # noqa: E731
    test_keys = {key(r.prompt[0]["content"], r.chosen, r.rejected) for r in test}
    train_keys = {key(r.prompt[0]["content"], r.chosen, r.rejected) for r in train}
    # the first 4 of 40 ranked prompts keep all 6 pairs of their ranking out of training (and no other ranked
    # prompt is held out); likewise the first 3 of 30 synthetic prompts
    for p, n_held in [(p, 4) for p in ranked] + [(p, 3) for p in off]:
        k = key(p["prompt"], p["chosen"], p["rejected"])
        assert (k in test_keys, k in train_keys) == ((True, False) if p["group"] < n_held else (False, True))
    assert sum(p["group"] < 4 for p in ranked) == 4 * 6


def test_evaluator_sampled_gold_is_the_mean_over_samples():
    """At temperature 0 every sample is the greedy answer: gold_reward must equal gold_greedy; at temperature 1
    the per-prompt gold is the mean over the samples (recomputed here from the same draws)."""
    import jax
    from rlhf_jax.data import collate_prompts
    from rlhf_jax.eval import PolicyEvaluator
    from rlhf_jax.generation import SamplingConfig
    from rlhf_jax.models import ModelConfig, init_params
    from rlhf_jax.tokenizer import ByteTokenizer, encode_prompt
    tok = ByteTokenizer()
    mc = ModelConfig(vocab_size=tok.vocab_size, d_model=32, num_layers=1, num_heads=2, mlp_dim=64, max_seq_len=128)
    params = init_params(mc, jax.random.PRNGKey(0))
    tasks = world.prompt_set(16, 0, split="eval")
    batch = collate_prompts([encode_prompt(tok, world.messages_for(t)) for t in tasks], buckets=(64,),
                            pad_id=tok.pad_id)
    rng = jax.random.PRNGKey(1)

    def evaluator(temperature, samples):
        return PolicyEvaluator(batch["prompts"], batch["prompt_mask"], model_config=mc, tokenizer=tok,
                               sampling=SamplingConfig(max_new_tokens=8, temperature=temperature),
                               gold_fn=lambda texts: world.gold_rewards(tasks, texts), samples=samples)

    m, gold = evaluator(0.0, 2)(params, ref_params=params, rng=rng)
    assert m["gold_reward"] == m["gold_greedy"] and gold.shape == (16,)
    ev = evaluator(1.0, 3)
    m, gold = ev(params, ref_params=params, rng=rng)
    draws = [world.gold_rewards(tasks, ev.texts(ev.generate(params, jax.random.fold_in(rng, 2 + i), 1.0)))
             for i in range(3)]
    np.testing.assert_allclose(gold, np.mean(draws, axis=0))
    assert m["gold_reward"] == np.mean(gold) and m["kl_to_ref"] == 0.0 and np.isnan(m["rm_score"])


def test_on_policy_records_are_the_training_prompts_pairs():
    """DPO's pairs: the annotated on-policy pairs of the training prompts, in order; the reward model's held-out
    10% of prompts are left out."""
    tasks = world.prompt_set(20, 0, split="train")
    answers = [[t.answer, t.answer + " x", "no", "I can't help with that."] for t in tasks]
    pairs = world.label_rankings(tasks, answers, "careful", np.random.default_rng(0), pairs="best-worst")
    records = on_policy_records(pairs, len(tasks))
    kept = [p for p in pairs if p["group"] >= 2]
    assert len(kept) == 18 and [(r.chosen, r.rejected) for r in records] == [(p["chosen"], p["rejected"]) for p in kept]
    assert [r.prompt[0]["content"] for r in records] == [p["prompt"] for p in kept]
