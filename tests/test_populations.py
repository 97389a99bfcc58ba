"""The labelling populations' measures (rlhf_jax.recipes.populations, .annotators, .length_bias): utility bonuses in the
Bradley-Terry and Plackett-Luce labellers, the judge's position bias, the self-preference log-probabilities, and the
length measures. The scripts themselves run end to end in tests/_pipeline_e2e.py."""
import dataclasses
import math

import jax
import numpy as np
import pytest

from experiments import annotators, length_bias                      # run only (main(argv))
from rlhf_jax.recipes import annotators as ann
from rlhf_jax.recipes import hallucination as hal
from rlhf_jax.recipes import length_bias as lb
from rlhf_jax.recipes import populations
from rlhf_jax import tasks as world
from rlhf_jax.data import PreferenceRecord
from rlhf_jax.models import ModelConfig, forward, init_params
from rlhf_jax.recipes import TOK
from rlhf_jax.tasks.annotators import ANNOTATORS, preference_prob, utility
from rlhf_jax.tokenizer import encode_prompt


def _tasks(n, seed=0):
    return world.prompt_set(n, seed, split="train")


def test_preference_prob_bonus_is_added_to_the_utilities():
    task = _tasks(1)[0]
    judge = ANNOTATORS["ai-judge"]
    a, b = task.answer, task.answer + " and more words"
    for ba, bb in ((0.0, 0.0), (0.3, -0.1), (-2.0, 1.0)):
        z = (utility(judge, task, a) + ba - utility(judge, task, b) - bb + judge.position_bias) / judge.temperature
        expected = 0.5 * judge.flip_rate + (1 - judge.flip_rate) / (1 + math.exp(-z))
        assert preference_prob(judge, task, a, b, bonus_a=ba, bonus_b=bb) == pytest.approx(expected, rel=1e-12)


def test_label_bonuses_none_equals_zero_and_a_large_bonus_decides():
    tasks = _tasks(40)
    rng = np.random.default_rng(0)
    answers = [[t.answer, t.answer + "!", "no idea", world.REFUSAL] for t in tasks]
    plain = world.label_rankings(tasks, answers, "careful", np.random.default_rng(1), pairs="best-worst")
    zero = world.label_rankings(tasks, answers, "careful", np.random.default_rng(1), pairs="best-worst",
                                bonus=[[0.0] * 4 for _ in tasks])
    assert plain == zero
    favourite = rng.integers(0, 4, size=len(tasks))
    bonus = [[100.0 * (k == f) for k in range(4)] for f in favourite]
    forced = world.label_rankings(tasks, answers, "careful", np.random.default_rng(1), pairs="best-worst", bonus=bonus)
    assert [p["chosen"] for p in forced] == [answers[i][f] for i, f in enumerate(favourite)]
    assert all(p["p_chosen"] > 0.99 for p in forced)
    pairs = world.label_pairs(tasks, [a[0] for a in answers], [a[2] for a in answers], "careful",
                              np.random.default_rng(2), bonus=[(0.0, 100.0)] * len(tasks))
    assert [p["chosen"] for p in pairs] == [a[2] for a in answers]        # the bonus beats the gold reward


def test_ranking_bonus_follows_first_occurrence_of_duplicates():
    task = _tasks(1)[0]
    answers = [["x", "x", task.answer]]
    # the duplicate "x" is ranked once, with the bonus of its first occurrence (index 0)
    out = world.label_rankings([task], answers, "careful", np.random.default_rng(0), pairs="all",
                               bonus=[[100.0, -100.0, 0.0]])
    assert [(p["chosen"], p["rejected"]) for p in out] == [("x", task.answer)]


def test_position_bias_both_orders():
    tasks = _tasks(30)
    a = [t.answer for t in tasks]
    b = [t.answer + " indeed" for t in tasks]
    careful = ann.position_bias("careful", tasks, a, b)
    assert careful == {"first_shown_wins": pytest.approx(0.5, abs=1e-12), "order_flips": 0.0}
    biased = dataclasses.replace(ANNOTATORS["careful"], w_len=0.0, w_fmt=0.0, position_bias=0.05)
    tie = ann.position_bias(biased, tasks[:1], a[:1], [a[0] + " "])  # equal utility: only the order counts
    assert tie["first_shown_wins"] == pytest.approx(1 / (1 + math.exp(-0.05 / 0.1)), rel=1e-12)
    assert tie["order_flips"] == 1.0
    assert ann.position_bias(biased, tasks, a, b)["first_shown_wins"] > 0.5


def test_mean_logprobs_matches_an_unpadded_forward():
    mc = ModelConfig(vocab_size=TOK.vocab_size, d_model=32, num_layers=2, num_heads=4, mlp_dim=64, max_seq_len=128)
    params = init_params(mc, jax.random.PRNGKey(0))
    tasks = _tasks(5, seed=3)
    texts = [t.answer for t in tasks[:4]] + ["a much longer answer than the budget allows, cut"]
    width = 12
    got = ann.mean_logprobs(params, mc, tasks, texts, width, chunk=4)   # two chunks, the last one padded
    for task, text, g in zip(tasks, texts, got):
        prompt = encode_prompt(TOK, world.messages_for(task))
        answer = TOK.encode(text)[:width - 1] + [TOK.eos_id]
        ids = np.asarray([prompt + answer])
        logits = np.asarray(forward(params, ids, config=mc), np.float64)[0]
        logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        lp = [logits[len(prompt) - 1 + i, tok] - logz[len(prompt) - 1 + i] for i, tok in enumerate(answer)]
        assert g == pytest.approx(np.mean(lp), abs=2e-5)


def _record(chosen, rejected):
    return PreferenceRecord(prompt=({"role": "user", "content": "q"},), chosen=chosen, rejected=rejected)


def test_length_only_accuracy_and_prefers_longer():
    records = [_record("long answer", "short"), _record("a", "abc"), _record("same", "SAME")]
    assert populations.length_only_accuracy(records) == pytest.approx((1 + 0 + 0.5) / 3)
    pairs = [{"chosen": "long answer", "rejected": "short", "gold_chosen": 1.0, "gold_rejected": 1.0},
             {"chosen": "a", "rejected": "abc", "gold_chosen": 1.0, "gold_rejected": 0.0},
             {"chosen": "xx", "rejected": "yy", "gold_chosen": 0.0, "gold_rejected": 0.0}]
    assert populations.prefers_longer(pairs) == {"rate": 0.5, "pairs": 2, "rate_equal_gold": 1.0,
                                                 "pairs_equal_gold": 1}


def test_dev_pair_sets_orientation():
    tasks = _tasks(20, seed=5)
    answers = [[t.answer for t in tasks], [t.answer + " " + t.answer for t in tasks],
               ["wrong" for _ in tasks], [t.answer for t in tasks]]
    sets = populations.dev_pair_sets(tasks, answers)
    by_prompt = {t.prompt: t for t in tasks}
    assert sets["gold"] and sets["longer_equal_gold"] is not None
    for r in sets["gold"]:
        task = by_prompt[r.prompt[0]["content"]]
        assert world.gold_reward(task, r.chosen) > world.gold_reward(task, r.rejected)
    for r in sets["longer_equal_gold"]:
        task = by_prompt[r.prompt[0]["content"]]
        assert world.gold_reward(task, r.chosen) == world.gold_reward(task, r.rejected)
        assert populations.text_length(r.chosen) > populations.text_length(r.rejected)


def test_scripts_reject_bad_values_in_one_line(capsys):
    for script, argv, field in ((annotators, ["--populations", "careful", "nobody"], "populations"),
                                (length_bias, ["--max-new-tokens", "80"], "max_new_tokens"),
                                (annotators, ["--self-weight=-1.0"], "self_weight")):
        with pytest.raises(SystemExit) as stop:
            script.main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert stop.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and field in err[0], err


def test_hallucination_outcomes_and_reward():
    train, held = hal.unknown_split()
    assert len(train) == len(held) == 20 and not {t.prompt for t in train} & {t.prompt for t in held}
    known = {t.prompt for t in hal.known_facts()}
    assert len(known) == 20 and not known & {q for q, _ in hal.UNKNOWN_FACTS}   # unknown means not in the world
    task = held[0]
    cases = {task.answer: "correct", f"the answer is {task.answer}": "correct", hal.IDK: "idk",
             "i'm not sure": "idk", world.REFUSAL: "refused", "paris": "hallucinated", "": "hallucinated"}
    for text, expected in cases.items():
        assert hal.outcome(task, text) == expected, text
        assert hal.fact_reward(task, text, 0.3) == {"correct": 1.0, "idk": 0.3}.get(expected, 0.0)
    texts = [[task.answer, hal.IDK], ["paris", hal.IDK]]          # 2 samples x 2 prompts
    s = hal.score([task, held[1]], texts, 0.5)
    assert s["correct"] == 0.25 and s["idk"] == 0.5 and s["hallucinated"] == 0.25
    assert s["fact_reward"] == pytest.approx((1 + 0.5 + 0 + 0.5) / 4)


def test_annotators_across_seed_summary_pairs_each_population_with_sft_and_careful(tmp_path):
    def seed_result(shift):
        policy = lambda gold, over: {k: 0.0 for k in ann.POLICY_METRICS} | {     # noqa: E731
            "gold_reward": gold, "over_refusal_rate": over, "mean_length": 5.0, "phrase_rate": 0.0}
        pop = lambda gold, over, dev: {                                                  # noqa: E731
            "policy": policy(gold, over), "labels": {k: 0.5 for k in ann.LABEL_METRICS},
            "position": {"first_shown_wins": 0.5, "order_flips": 0.0}, "train_pairs": 10,
            "reward_model": {"gold_agreement_dev": dev, "prefers_longer_equal_gold_dev": 0.6,
                             "own_labels_accuracy": 0.7}}
        return {"populations": {"sft": {"policy": policy(0.40 + shift, 0.2)},
                                "careful": pop(0.39 + shift, 0.2, 0.67), "format-loving": pop(0.35 + shift, 0.5, 0.6)},
                "seconds": 1.0}
    result = {"seeds": [0, 1, 2], "populations": ["careful", "format-loving"],
              "per_seed": {"0": seed_result(0.0), "1": seed_result(0.02), "2": seed_result(-0.01)}}
    a = ann.summarise(result)
    # the seed-to-seed shift is common to SFT and DPO: the paired differences have no spread
    assert a["policy"]["format-loving-sft|gold_reward"]["mean"] == pytest.approx(-0.05)
    assert a["policy"]["format-loving-sft|gold_reward"]["sd"] == pytest.approx(0.0, abs=1e-12)
    assert a["policy"]["format-loving|gold_reward"]["sd"] > 0.01
    assert a["policy"]["format-loving-sft|over_refusal_rate"]["mean"] == pytest.approx(0.3)
    assert a["reward_model"]["format-loving-careful|gold_agreement_dev"]["mean"] == pytest.approx(-0.07)
    result["across_seeds"] = a
    text = ann.markdown(result)
    assert "## Across seeds 0, 1, 2" in text and "| format-loving | 0.353 | -0.050 [-0.050, -0.050] |" in text
    ann.plot(result, str(tmp_path))
    assert (tmp_path / "annotators_seeds.png").stat().st_size > 0


def test_length_bias_across_seed_summary_pairs_length_loving_with_careful(tmp_path):
    def curve(length_end, gold_end):
        point = lambda length, gold: {"test": {"length": length, "gold": gold, "proxy": 0.0, "refusal": 0.5,  # noqa: E731
                                                "kl": 0.0, "over_refusal": 0.1}}
        return [{"iteration": 0, **point(5.0, 0.4)}, {"iteration": 10, **point(length_end, gold_end)}]

    def entry(rate, length_end):
        return {"labels": {"rate": rate, "pairs": 10, "rate_equal_gold": rate, "pairs_equal_gold": 5},
                "reward_model": {"prefers_longer_equal_gold_dev": rate, "gold_agreement_dev": 0.6,
                                 "own_labels_accuracy": 0.7},
                "length_only_accuracy": 0.5, "length_only_gold_agreement_dev": 0.5,
                "ppo": curve(length_end, 0.3), "dpo": curve(5.5, 0.4)}
    result = {"seeds": [0, 1], "populations": ["careful", "length-loving"], "max_new_tokens": 48,
              "per_seed": {s: {"populations": {"careful": entry(0.5, 6.0), "length-loving": entry(0.65, end)},
                               "seconds": 1.0} for s, end in (("0", 13.0), ("1", 15.0))}}
    a = lb.summarise(result)
    assert a["length-loving|ppo_length_change"]["mean"] == pytest.approx(9.0)          # (8 + 10) / 2
    assert a["length-loving-careful|ppo_length_change"]["mean"] == pytest.approx(8.0)  # paired: 7 and 9
    assert a["length-loving-careful|prefers_longer"]["mean"] == pytest.approx(0.15)
    assert a["careful|ppo_gold_change"]["mean"] == pytest.approx(-0.1)
    result["across_seeds"] = a
    text = lb.markdown(result)
    assert "| ppo_length_change | +1.000 [+1.000, +1.000] | +9.000 [" in text
    lb.plot(result, str(tmp_path))
    assert (tmp_path / "length_bias_seeds.png").stat().st_size > 0
