"""The labelling populations of the first world (rlhf_jax.tasks.annotators): utility bonuses in the Bradley-Terry and
Plackett-Luce labellers; the hallucination experiment's outcomes; the rule world's annotators script's one-line
refusals. The scripts themselves run end to end in tests/_pipeline_e2e.py and tests/test_rule_world.py."""
import math

import numpy as np
import pytest

from experiments import rule_annotators                                # run only (main(argv))
from rlhf_jax.recipes import hallucination as hal
from rlhf_jax import tasks as world
from rlhf_jax.tasks.annotators import ANNOTATORS, preference_prob, utility


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


def test_scripts_reject_bad_values_in_one_line(capsys):
    for script, argv, field in ((rule_annotators, ["--populations", "careful", "nobody"], "populations"),
                                (rule_annotators, ["--noise", "2"], "noise")):
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
