"""The rule world's main job: its summary over seeds against hand-computed comparisons, and the command end to end
at --quick sizes on dev keys (a finished seed is read back, not run again), then experiments.distill_world,
rule_overoptimization, label_cost, retry_world and rule_annotators --quick on that run's models; the experiments'
statistics against hand computations; the annotator populations' labels and judge."""
from __future__ import annotations

import dataclasses
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
    # experiments.rule_overoptimization and label_cost --quick on this run's seed models (read, not retrained).
    from experiments import label_cost, rule_overoptimization
    models = os.path.join(out, "seed0", "models")
    before = {n: os.path.getmtime(os.path.join(models, n)) for n in ("base", "sft", "reward")}
    oo = str(tmp_path / "oo")
    rule_overoptimization.main(["--quick", "--models", out, "--seeds", "0", "--eval-split", "dev", "--out", oo])
    seed0 = json.load(open(os.path.join(oo, "rule_overoptimization.json")))["per_seed"][0]
    assert list(seed0["best_of_n"]) == ["1", "2", "4"] and list(seed0["ppo"]) == ["0"] and list(seed0["dpo"]) == ["0.1"]
    for b in seed0["best_of_n"].values():    # the gold pick is the best any pick can do
        assert b["gold_pick"] >= b["mean"] - 1e-12 and len(b["exact"]) == 16
    assert [p["iteration"] for p in seed0["ppo"]["0"]] == [0, 2, 4] and seed0["ppo"]["0"][0]["kl"] == 0.0
    assert all(np.isfinite(p["kl"]) and np.isfinite(p["proxy"]) for p in seed0["ppo"]["0"])
    assert "## PPO against the reward model" in render_card(json.load(open(os.path.join(oo, "card.json"))))
    lc = str(tmp_path / "lc")
    label_cost.main(["--quick", "--models", out, "--seeds", "0", "--eval-split", "dev", "--out", lc])
    result = json.load(open(os.path.join(lc, "label_cost.json")))
    assert list(result["per_seed"][0]["demos"]) == ["4", "8"] and list(result["per_seed"][0]["pairs"]) == ["4"]
    assert "## Gold against labels" in render_card(json.load(open(os.path.join(lc, "card.json"))))
    rt = str(tmp_path / "rt")                  # experiments.retry_world --quick: GRPO over feedback episodes
    from experiments import retry_world
    retry_world.main(["--quick", "--models", out, "--seeds", "0", "--eval-split", "dev", "--out", rt,
                      "--trace-fraction", "0.5"])         # SFT again, on demonstrations that go on after feedback
    seed0 = json.load(open(os.path.join(rt, "retry_world.json")))["per_seed"][0]
    for arm in ("sft", "grpo"):                # solved within the tries includes solved at the first
        assert all(s >= f for s, f in zip(seed0[arm]["solved"], seed0[arm]["first_try"]))
        assert len(seed0[arm]["solved"]) == 16 and 1.0 <= seed0[arm]["turns"] <= 2.0
    assert len(seed0["train_reward"]) >= 1
    text = render_card(json.load(open(os.path.join(rt, "card.json"))))
    assert "GRPO - SFT, solved within two tries" in text and "feedback in the SFT demonstrations" in text
    ra = str(tmp_path / "ra")                  # experiments.rule_annotators --quick: two of the populations
    from experiments import rule_annotators
    rule_annotators.main(["--quick", "--models", out, "--seeds", "0", "--eval-split", "dev", "--out", ra,
                          "--populations", "ai-self"])
    result = json.load(open(os.path.join(ra, "rule_annotators.json")))
    pops = result["per_seed"][0]["populations"]
    assert list(pops) == ["careful", "ai-self"] and pops["careful"]["labels"]["gold_agreement"] == 1.0
    assert len(pops["ai-self"]["ppo"]["exact"]) == len(pops["ai-self"]["dpo"]["excess"]) == 16
    assert set(result["summary"]["hypotheses"]) == {"A4"}
    assert "## Labels, reward models and policies by population" in render_card(json.load(open(os.path.join(
        ra, "card.json"))))
    assert {n: os.path.getmtime(os.path.join(models, n)) for n in before} == before      # shared, not retrained


def test_seed_models_are_kept_and_read_back(tmp_path, monkeypatch):
    """The cache trains once; a call with the same settings reads the same params back (no stage runs), and a
    call with another setting that decides the models trains again. Stages faked: the cache logic is the test."""
    calls = []

    def fake(name, value):
        def stage(*a, **k):
            calls.append(name)
            return {"w": np.full(3, value, np.float32)}
        return stage
    monkeypatch.setattr(rw, "rule_corpus", lambda *a, **k: [])
    monkeypatch.setattr(rw, "gold_pairs", lambda *a, **k: (["a pair"], [0]))
    for name, value in (("pretrain", 1.0), ("sft", 2.0), ("reward_model", 3.0)):
        monkeypatch.setattr(rw, name, fake(name, value))
    cfg = rw.RuleWorldConfig(quick=True, eval_split="dev")
    first = rw.seed_models(cfg, str(tmp_path))
    assert calls == ["pretrain", "sft", "reward_model"] and set(first.seconds) == set(calls)
    again = rw.seed_models(cfg, str(tmp_path))
    assert calls == ["pretrain", "sft", "reward_model"] and again.seconds == {} and again.pairs == ["a pair"]
    assert [float(np.asarray(m["w"])[0]) for m in (again.base, again.sft, again.reward)] == [1.0, 2.0, 3.0]
    rw.seed_models(dataclasses.replace(cfg, flaw_rate=0.5), str(tmp_path))       # decides the SFT model
    assert calls[3:] == ["pretrain", "sft", "reward_model"]
    rw.seed_models(dataclasses.replace(cfg, flaw_rate=0.5, eval_prompts=8), str(tmp_path))       # does not
    assert len(calls) == 6


def test_rise_and_fall_and_break_even():
    from rlhf_jax.stats import break_even, rise_and_fall
    up, flat = np.r_[np.ones(30), np.zeros(10)], np.r_[np.ones(10), np.zeros(30)]
    rise_fall = [{"iteration": i, "exact": e.tolist(), "mean": float(e.mean())}
                 for i, e in enumerate([flat, up, flat])]
    shape = rise_and_fall(rise_fall)
    assert shape["rose_then_fell"] and shape["peak_iteration"] == 1
    assert shape["peak_minus_start"]["delta"] == pytest.approx(0.5)
    assert not rise_and_fall(rise_fall[:2])["rose_then_fell"]          # ends at its peak: no fall
    rising = [{**p, "iteration": i} for i, p in enumerate([rise_fall[0], rise_fall[0], rise_fall[1]])]
    assert not rise_and_fall(rising)["rose_then_fell"]
    # break even: 0.5 gold lies halfway (in log count) between 10 demonstrations (0.4) and 40 (0.6): m* = 20
    assert break_even(0.5, [10, 40, 100], [0.4, 0.6, 0.9]) == pytest.approx(20.0)
    assert break_even(0.95, [10, 40, 100], [0.4, 0.6, 0.9]) is None          # out of range


def test_rule_annotators_labels_and_judge():
    """The populations' labels of gold-ordered pairs, and the judge's log-probabilities against an unpadded
    forward pass, one pair at a time."""
    import jax

    from rlhf_jax.data import PreferenceRecord
    from rlhf_jax.recipes import rule_annotators as ra
    from rlhf_jax.models import forward, init_params
    from rlhf_jax.recipes.data import TOK
    from rlhf_jax.tokenizer import encode_prompt
    shares = dict(noise=0.25, length_share=0.5, judges={})
    prompt = ({"role": "user", "content": "reverse: abcdef"},)
    pairs = [PreferenceRecord(prompt=prompt, chosen=c, rejected=r)
             for c, r in [("fedcba", "fedc"), ("fedc", "fedcbaxx"), ("fed", "abc")] * 200]
    assert ra.population_keeps("careful", pairs, rng=np.random.default_rng(0), **shares).all()
    noisy = ra.population_keeps("noisy", pairs, rng=np.random.default_rng(0), **shares)
    assert 0.2 < 1 - noisy.mean() < 0.3
    keep = ra.population_keeps("length-loving", pairs, rng=np.random.default_rng(0), **shares)
    kinds = np.arange(len(pairs)) % 3
    assert keep[kinds == 0].all() and keep[kinds == 2].all()       # the longer one is right, or equal lengths
    assert 0.4 < 1 - keep[kinds == 1].mean() < 0.6                  # the longer one is wrong: half go by length
    swapped = ra.relabel(pairs[:2], np.array([True, False]))
    assert (swapped[0], (swapped[1].chosen, swapped[1].rejected)) == (pairs[0], ("fedcbaxx", "fedc"))
    mc = rw.RuleWorldConfig(quick=True).model_config()
    params = init_params(mc, jax.random.PRNGKey(3))

    def logp(text):
        ids = encode_prompt(TOK, list(prompt))
        answer = TOK.encode(text) + [TOK.eos_id]
        logits = np.asarray(forward(params, np.asarray([ids + answer]), config=mc), np.float64)[0]
        logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        return sum(logits[len(ids) - 1 + i, t] - logz[len(ids) - 1 + i] for i, t in enumerate(answer))
    few = pairs[:3]
    assert ra.judge_prefers_first(params, mc, few).tolist() == [logp(p.chosen) > logp(p.rejected) for p in few]


def test_rule_annotators_verdicts():
    from rlhf_jax.recipes import rule_annotators as ra
    c = lambda d, lo, hi: {"delta": d, "low": lo, "high": hi}  # noqa: E731
    careful = {"reward_model_accuracy": 0.80, "dpo": {"vs_sft": c(0.1, 0.05, 0.15)}}
    pops = {"careful": careful,
            "length-loving": {"ppo": {"excess_vs_careful": c(2.0, 1.0, 3.0), "vs_careful": c(-0.2, -0.3, -0.1)}},
            "noisy": {"reward_model_accuracy": 0.75},
            "ai-judge": {"flaw_agreement": 0.95, "dpo": {"vs_careful": c(0.0, -0.05, 0.05)}},
            "ai-self": {"flaw_agreement": 0.3, "dpo": {"vs_sft": c(0.0, -0.05, 0.05)}}}
    assert ra.verdicts(pops) == {"A1": True, "A2": True, "A3": True, "A4": True}
    pops["length-loving"]["ppo"]["vs_careful"] = c(-0.1, -0.2, 0.01)    # gold not reliably lower
    pops["ai-judge"]["dpo"]["vs_careful"] = c(-0.1, -0.15, -0.05)
    pops["ai-self"]["dpo"]["vs_sft"] = c(0.1, 0.02, 0.2)                # self-labels do improve SFT
    assert ra.verdicts(pops) == {"A1": False, "A2": True, "A3": False, "A4": False}
    assert ra.verdicts({"careful": careful}) == {}
