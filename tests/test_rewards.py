"""Host-side reward functions: GSM8K final answers on the real test sample, formats, the world's gold reward."""
import json
import os

import numpy as np
import pytest

from rlhf_jax import tasks as world
from rlhf_jax.rewards import combine, format_reward, gsm8k_answer, gsm8k_reward, world_reward

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")


def test_gsm8k_reward_on_the_real_sample():
    records = [json.loads(line) for line in open(os.path.join(FIXTURES, "gsm8k-test-10.jsonl"))]
    answers = [gsm8k_answer(r["answer"]) for r in records]
    assert answers[0] == "18" and all(a.lstrip("-").replace(".", "").isdigit() for a in answers)
    prompts = [r["question"] for r in records]
    # the reference solutions themselves score 1; a solution with its final number changed scores 0
    np.testing.assert_array_equal(gsm8k_reward(prompts, [r["answer"] for r in records], answers=answers), 1.0)
    wrong = [r["answer"].rsplit("####", 1)[0] + "#### " + str(int(float(a)) + 1) for r, a in zip(records, answers)]
    np.testing.assert_array_equal(gsm8k_reward(prompts, wrong, answers=answers), 0.0)
    got = gsm8k_reward(["q"] * 4, ["so she makes $18.", "The answer is 1,234", "no number", "18.0 then 7"],
                       answers=["18", "1234", "3", "18"])
    np.testing.assert_array_equal(got, [1.0, 1.0, 0.0, 0.0])            # the *final* number counts
    with pytest.raises(ValueError, match="2 completions but 1 answers"):
        gsm8k_reward(["a", "b"], ["1", "2"], answers=["1"])


def test_format_and_combined_rewards():
    fmt = format_reward(r"#### -?\d+\s*$")
    np.testing.assert_array_equal(fmt(["q", "q"], ["work... #### 12", "12"]), [1.0, 0.0])
    both = combine((1.0, lambda p, c: gsm8k_reward(p, c, answers=["12", "12"])), (0.5, fmt))
    np.testing.assert_allclose(both(["q", "q"], ["work... #### 12", "12"]), [1.5, 1.0])


def test_world_reward_is_the_gold_reward_looked_up_by_prompt_text():
    tasks = world.prompt_set(20, 0, split="eval")
    text = lambda t: "<user>" + t.prompt + "<assistant>"  # noqa: E731  (a stand-in for the chat template)
    reward = world_reward(tasks, text)
    completions = [t.answer for t in tasks[:5]] + ["no idea"] * 5
    got = reward([text(t) for t in tasks[:10]], completions)
    np.testing.assert_allclose(got, world.gold_rewards(tasks[:10], completions))
    assert got[:5].min() == 1.0
    with pytest.raises(KeyError, match="not among the 18 distinct task prompts"):
        reward(["<user>unknown<assistant>"], ["x"])
