"""Deterministic shuffling, exact save/restore of batch iterators, scheduled mixtures."""
import json
from pathlib import Path

import numpy as np
import pytest

from rlhf_jax.data import Batches, Mixture, ShuffledIterator, TextRecord, load_records, piecewise_linear_weights
from rlhf_jax.tokenizer import ByteTokenizer

FIX = Path(__file__).parent / "fixtures"
TOK = ByteTokenizer()


def test_epoch_permutations():
    src = list(range(7))
    it = ShuffledIterator(src, seed=3, num_epochs=3)
    got = list(it)
    want = [int(i) for e in range(3) for i in np.random.default_rng([3, e]).permutation(7)]
    assert got == want and sorted(got[:7]) == src and got[:7] != got[7:14]
    assert list(ShuffledIterator(src, seed=4, num_epochs=1)) != got[:7]
    assert list(ShuffledIterator(src, shuffle=False, num_epochs=1)) == src


def _same(a, b):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, np.ndarray):
        return np.array_equal(a, b)
    return a == b


def _resume_check(make, k=3, m=4):
    it = make()
    for _ in range(k):
        next(it)
    state = json.loads(json.dumps(it.state()))  # small and JSON-able
    want = [next(it) for _ in range(m)]
    fresh = make()
    fresh.restore(state)
    got = [next(fresh) for _ in range(m)]
    assert all(_same(a, b) for a, b in zip(want, got))
    assert fresh.state() == it.state()
    return want


@pytest.mark.parametrize("kind,name,pack", [("sft", "alpaca-seed-tasks-20.jsonl", True),
                                            ("sft", "oasst-en-3-trees.jsonl", False),
                                            ("preference", "hh-rlhf-helpful-base-20.jsonl.gz", False),
                                            ("prompt", "oasst-prompts-10.jsonl", False)])
def test_batches_save_restore(kind, name, pack):
    recs = load_records(FIX / name, "oasst" if "trees" in name else kind)

    def make():
        return Batches(ShuffledIterator(recs, seed=7), TOK, kind=kind, batch_size=2,
                       buckets=(64, 512) if pack else (64, 128), pack=pack)

    batches = _resume_check(make)
    if kind == "sft":
        assert all(b["inputs"].shape in (((2, 512),) if pack else ((2, 64), (2, 128))) for b in batches)
        if pack:
            first = make()
            assert max(next(first)["segment_ids"].max() for _ in range(3)) > 1


def test_finite_iterator_pads_last_batch():
    recs = load_records(FIX / "flan-commonsense-qa-10.jsonl", "sft")
    out = list(Batches(ShuffledIterator(recs, seed=0, num_epochs=1), TOK, batch_size=4, buckets=(128, 256)))
    assert len(out) == 3 and (out[-1]["segment_ids"][2:] == 0).all() and out[-1]["inputs"].shape[0] == 4
    packed = list(Batches(ShuffledIterator(recs, seed=0, num_epochs=1), TOK, batch_size=2, buckets=(256,), pack=True))
    assert sum(len(set(b["segment_ids"][r].tolist()) - {0}) for b in packed for r in range(2)) == 10


def test_piecewise_linear_weights():
    w = piecewise_linear_weights([(0, {"text": 1.0}), (10, {"text": 1.0}), (20, {"text": 0.2, "sft": 0.8})])
    assert w(-5) == {"sft": 0.0, "text": 1.0} and w(10) == {"sft": 0.0, "text": 1.0}
    assert w(15) == pytest.approx({"sft": 0.4, "text": 0.6}) and w(99) == pytest.approx({"sft": 0.8, "text": 0.2})


def test_mixture_schedule_deterministic_and_resumable():
    text = [TextRecord(text=f"doc {i}") for i in range(5)]
    sft = load_records(FIX / "alpaca-seed-tasks-20.jsonl", "sft")
    schedule = piecewise_linear_weights([(0, {"text": 1.0, "sft": 0.0}), (50, {"text": 1.0, "sft": 0.0}),
                                         (60, {"text": 0.25, "sft": 0.75})])

    def make_mix():
        return Mixture({"text": ShuffledIterator(text, seed=1), "sft": ShuffledIterator(sft, seed=2)}, schedule,
                       seed=5, draws_per_step=2)

    mix = make_mix()
    draws = [next(mix) for _ in range(400)]
    kinds = ["text" if isinstance(d, TextRecord) else "sft" for d in draws]
    assert set(kinds[:100]) == {"text"}  # steps 0..49: text only
    frac = kinds[120:].count("sft") / len(kinds[120:])
    assert 0.65 < frac < 0.85  # after the decay point: 75 % SFT
    assert [next(make_mix()) for _ in range(1)] == draws[:1]
    _resume_check(make_mix, k=105, m=20)

    def make_batches():
        return Batches(make_mix(), TOK, batch_size=2, buckets=(64, 128), pack=True)

    _resume_check(make_batches, k=30, m=5)


def test_replayable_and_together_resume_where_they_stopped():
    from rlhf_jax.data.iterators import Replayable, Together

    def make():
        return iter(range(100))

    a, b = Replayable(make), Replayable(lambda: iter(range(1000, 1100)))
    both = Together(a, side=b)
    taken = [(next(both), next(b)) for _ in range(3)]
    assert taken == [(0, 1000), (1, 1001), (2, 1002)]
    saved = both.state()
    assert saved == {"main": {"taken": 3}, "side": {"taken": 3}}
    later = [(next(both), next(b)) for _ in range(2)]
    again_a, again_b = Replayable(make), Replayable(lambda: iter(range(1000, 1100)))
    again = Together(again_a, side=again_b)
    again.restore(saved)
    assert [(next(again), next(again_b)) for _ in range(2)] == later == [(3, 1003), (4, 1004)]
