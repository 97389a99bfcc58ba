"""rlhf_jax.tasks.skills: disjoint key spaces, the gold scorer on hand examples, each flawed demonstrator's flaw
exactly where designed; and experiments.world_pilots --help."""
import numpy as np
import pytest

from rlhf_jax.tasks import skills


def test_key_spaces_are_disjoint_and_split_by_hash():
    rng = np.random.default_rng(0)
    for op in skills.OPS:
        train = {skills.make_skill(op, rng, "train").key for _ in range(150)}
        dev = {skills.make_skill(op, rng, "dev").key for _ in range(150)}
        assert not train & dev, op
        assert all(skills.key_split(op, k) == "dev" for k in dev)
    with pytest.raises(ValueError, match="no test split"):
        skills.make_skill("add", rng, "test")
    # With a test fraction, three disjoint key spaces in the stated shares.
    three = skills.SkillConfig(salt="three", test_fraction=0.2)
    split = [skills.key_split("reverse", f"{a}{b}{c}", three) for a in "abcdefghij" for b in "abcdefghij"
             for c in "abcdefghij"]
    shares = {s: split.count(s) / len(split) for s in skills.SPLITS}
    assert abs(shares["dev"] - 0.2) < 0.04 and abs(shares["test"] - 0.2) < 0.04, shares
    test = {skills.make_skill("reverse", rng, "test", three).key for _ in range(50)}
    assert all(skills.key_split("reverse", k, three) == "test" for k in test)
    # A fresh salt gives another partition.
    keys = [f"{a} {b}" for a in range(30) for b in range(30)]
    fresh = skills.SkillConfig(salt="other")
    assert [skills.key_split("add", k) for k in keys] != [skills.key_split("add", k, fresh) for k in keys]


def test_tasks_and_gold_scorer_by_hand():
    assert skills.task_of("reverse", "kqzt").answer == "tzqk"
    assert skills.task_of("sort", "kqzt").answer == "kqtz"
    assert skills.task_of("upper", "kqzt").answer == "KQZT"
    assert skills.task_of("count", "k kqzkt").prompt == "count k in kqzkt"
    assert skills.task_of("count", "k kqzkt").answer == "2"
    assert skills.task_of("add", "47 85").answer == "132"
    assert skills.task_of("addr", "47 85").answer == "231"
    t = skills.task_of("add", "47 85")
    assert skills.gold_score(t, " 132 ") == {"exact": 1.0, "partial": 1.0}
    assert skills.gold_score(t, "32") == {"exact": 0.0, "partial": pytest.approx(2 / 3)}     # right-aligned
    assert skills.gold_score(t, "122")["partial"] == pytest.approx(2 / 3)
    r = skills.task_of("reverse", "abcdef")
    assert skills.gold_score(r, "fedc") == {"exact": 0.0, "partial": pytest.approx(4 / 6)}     # left-aligned
    assert skills.gold_score(r, "")["partial"] == 0.0
    assert skills.gold_score(skills.task_of("addr", "47 85"), "23")["partial"] == pytest.approx(2 / 3)


def test_drop_carry_is_wrong_exactly_when_a_carry_occurs():
    for a in range(0, 100, 3):
        for b in range(100):
            for op in ("add", "addr"):
                t = skills.task_of(op, f"{a} {b}")
                carry = any((a // 10 ** i) % 10 + (b // 10 ** i) % 10 + 0 >= 10 for i in range(3))
                assert (skills.demonstrate("drop_carry", t) == t.answer) == (not carry), (op, a, b)
    assert skills.add_without_carry(47, 85) == 22 and skills.has_carry(47, 85) and not skills.has_carry(12, 34)


def test_truncate_and_filler_flaws():
    rng = np.random.default_rng(1)
    for op in ("copy", "upper", "reverse", "sort"):
        for _ in range(50):
            t = skills.make_skill(op, rng, "train")
            demo = skills.demonstrate("truncate", t)
            assert (demo == t.answer) == (len(t.answer) <= skills.TRUNCATE_AT)
            assert demo == t.answer[:skills.TRUNCATE_AT]
    for op in skills.OPS:
        t = skills.make_skill(op, rng, "dev")
        filler = skills.demonstrate("filler", t)
        assert filler != t.answer and t.answer in filler
        assert skills.demonstrate("perfect", t) == t.answer
        if op not in ("add", "addr"):
            assert skills.demonstrate("drop_carry", t) == t.answer
        if op in ("count", "add", "addr"):
            assert skills.demonstrate("truncate", t) == t.answer


def test_world_pilots_help_exits_zero():
    from experiments import world_pilots
    with pytest.raises(SystemExit) as e:
        world_pilots.main(["--help"])
    assert e.value.code == 0


def test_flaw_rate_flaws_that_share_of_demonstrations():
    rng = np.random.default_rng(2)
    t = skills.task_of("reverse", "abcdefg")
    flawed = [skills.demonstrate("truncate", t, rng, 0.7) != t.answer for _ in range(2000)]
    assert abs(np.mean(flawed) - 0.7) < 0.04
    assert all(skills.demonstrate("truncate", t, rng, 0.0) == t.answer for _ in range(20))
    assert skills.demonstrate("truncate", t) == "gfed"
