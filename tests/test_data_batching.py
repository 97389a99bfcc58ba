"""Batching: shifting, loss masks, buckets, truncation policy, packing equivalence, preference and prompt batches."""
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhf_jax.data import (Batches, Example, ShuffledIterator, collate_preference, collate_prompts, collate_sft,
                           load_records, new_stats, pack_sft, tokenize_preference, tokenize_prompt, tokenize_sft,
                           truncate, truncate_pair, unpair)
from rlhf_jax.tokenizer import ByteTokenizer

FIX = Path(__file__).parent / "fixtures"
TOK = ByteTokenizer()


def _examples(n=8, max_len=65):
    recs = load_records(FIX / "alpaca-seed-tasks-20.jsonl", "sft")[:n]
    return [truncate(tokenize_sft(TOK, r), max_len) for r in recs]


def test_truncation_keeps_prompt_end_and_response_start():
    ex = Example(tuple(range(10)) + tuple(range(100, 120)), (0,) * 10 + (1,) * 20, 10)
    stats = new_stats()
    out = truncate(ex, 16, stats=stats)  # prompt budget 8: keep prompt[2:], response[:8]
    assert out.ids == tuple(range(2, 10)) + tuple(range(100, 108)) and out.prompt_len == 8
    assert out.mask == (0,) * 8 + (1,) * 8
    assert (stats["truncated"], stats["prompt_tokens_cut"], stats["response_tokens_cut"]) == (1, 2, 12)
    short = Example((1, 2, 3), (0, 1, 1), 1)
    assert truncate(short, 16, stats=stats) is short and stats["examples"] == 2
    # a short response leaves the rest of the budget to the prompt
    out = truncate(Example(tuple(range(30)) + (100, 101), (0,) * 30 + (1, 1), 30), 16)
    assert out.ids == tuple(range(16, 30)) + (100, 101)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 40), st.integers(1, 40), st.integers(2, 30), st.data())
def test_truncation_properties(n_p, n_r, max_len, data):
    budget = data.draw(st.integers(0, max_len - 1))
    ex = Example(tuple(range(n_p)) + tuple(range(1000, 1000 + n_r)), (0,) * n_p + (1,) * n_r, n_p)
    stats = new_stats()
    out = truncate(ex, max_len, max_prompt_len=budget, stats=stats)
    p, r = out.ids[: out.prompt_len], out.ids[out.prompt_len:]
    assert len(out.ids) == min(n_p + n_r, max_len)
    assert p == tuple(range(n_p - len(p), n_p)) and r == tuple(range(1000, 1000 + len(r)))  # prompt end, resp start
    assert len(r) >= min(n_r, max_len - budget)
    assert stats["prompt_tokens_cut"] + stats["response_tokens_cut"] == n_p + n_r - len(out.ids)


def test_collate_sft_shift_mask_bucket():
    exs = _examples()
    b = collate_sft(exs, buckets=(16, 32, 64), pad_id=TOK.pad_id, rows=10)
    assert b["inputs"].shape == (10, 64) and b["inputs"].dtype == np.int32 and b["loss_mask"].dtype == np.float32
    for r, ex in enumerate(exs):
        n = len(ex.ids) - 1
        assert list(b["inputs"][r, :n]) == list(ex.ids[:-1]) and list(b["targets"][r, :n]) == list(ex.ids[1:])
        assert list(b["loss_mask"][r, :n]) == list(ex.mask[1:]) and list(b["positions"][r, :n]) == list(range(n))
        assert (b["segment_ids"][r, :n] == 1).all() and (b["segment_ids"][r, n:] == 0).all()
        assert (b["loss_mask"][r, n:] == 0).all() and (b["inputs"][r, n:] == TOK.pad_id).all()
    assert (b["segment_ids"][8:] == 0).all()
    # loss only on response bytes and EOS: masked targets decode to the assistant reply
    rec = load_records(FIX / "alpaca-seed-tasks-20.jsonl", "sft")[1]
    one = collate_sft([tokenize_sft(TOK, rec)], buckets=(512,), pad_id=TOK.pad_id)
    tgt = one["targets"][0][one["loss_mask"][0] > 0]
    assert tgt[-1] == TOK.eos_id and TOK.decode(tgt) == rec.messages[-1]["content"]
    assert collate_sft(exs[:1], buckets=(16, 32, 64, 128), pad_id=0)["inputs"].shape[1] == \
        min(b for b in (16, 32, 64, 128) if b >= len(exs[0].ids) - 1)


def _pack_rows(exs, seq_len):
    rows, col = [[]], 0
    for ex in exs:
        n = len(ex.ids) - 1
        if col + n > seq_len:
            rows.append([])
            col = 0
        rows[-1].append(ex)
        col += n
    return rows


def _triples(b):
    keep = b["segment_ids"] > 0
    return Counter(zip(b["inputs"][keep].tolist(), b["targets"][keep].tolist(), b["positions"][keep].tolist(),
                       b["loss_mask"][keep].tolist()))


def test_packing_equals_unpacked_by_construction():
    exs = [truncate(e, 41) for e in _examples(12, 200)]
    packed = pack_sft(_pack_rows(exs, 128), seq_len=128, pad_id=TOK.pad_id)
    plain = collate_sft(exs, buckets=(128,), pad_id=TOK.pad_id)
    assert packed["inputs"].shape[0] < len(exs)
    assert _triples(packed) == _triples(plain)
    assert packed["loss_mask"].sum() == plain["loss_mask"].sum()
    for row, row_exs in enumerate(_pack_rows(exs, 128)):  # each segment is its own example, shifted on its own
        seg = packed["segment_ids"][row]
        assert sorted(set(seg.tolist()) - {0}) == list(range(1, len(row_exs) + 1))
        for s, ex in enumerate(row_exs, start=1):
            idx = np.flatnonzero(seg == s)
            assert (np.diff(idx) == 1).all() and list(packed["positions"][row, idx]) == list(range(len(idx)))
            assert list(packed["inputs"][row, idx]) == list(ex.ids[:-1])
            assert list(packed["targets"][row, idx]) == list(ex.ids[1:])  # last target: its own last token
    with pytest.raises(ValueError, match="more than seq_len"):
        pack_sft([exs], seq_len=64, pad_id=0)


def test_packed_logits_equal_unpacked_logits():
    models = pytest.importorskip("rlhf_jax.models")
    if not hasattr(models, "forward"):
        pytest.skip("rlhf_jax.models.forward not available yet")
    import jax

    config = models.ModelConfig.preset("tiny")
    import dataclasses
    config = dataclasses.replace(config, vocab_size=TOK.vocab_size, max_seq_len=64)
    params = models.init_params(config, jax.random.PRNGKey(0))
    exs = [truncate(e, 21) for e in _examples(6, 200)]
    packed = pack_sft(_pack_rows(exs, 64), seq_len=64, pad_id=TOK.pad_id)
    plain = collate_sft(exs, buckets=(32,), pad_id=TOK.pad_id)
    lp = np.asarray(models.forward(params, packed["inputs"], config=config, positions=packed["positions"],
                                   segment_ids=packed["segment_ids"]))
    lu = np.asarray(models.forward(params, plain["inputs"], config=config, positions=plain["positions"],
                                   segment_ids=plain["segment_ids"]))
    i = 0
    for row in range(packed["inputs"].shape[0]):
        for s in sorted(set(packed["segment_ids"][row].tolist()) - {0}):
            idx = np.flatnonzero(packed["segment_ids"][row] == s)
            np.testing.assert_allclose(lp[row, idx], lu[i, : len(idx)], atol=2e-5, rtol=1e-5)
            i += 1
    assert i == len(exs)


def test_preference_batch():
    recs = load_records(FIX / "hh-rlhf-helpful-base-20.jsonl.gz", "preference")[:4]
    stats = new_stats()
    pairs = [truncate_pair(*tokenize_preference(TOK, r), 257, stats=stats) for r in recs]
    assert stats["truncated"] > 0 and stats["prompt_tokens_cut"] > 0  # the shared prompt is cut the same way
    b = collate_preference(pairs, buckets=(128, 256), pad_id=TOK.pad_id)
    assert b["chosen"]["inputs"].shape == b["rejected"]["inputs"].shape == (4, 256)
    for i, r in enumerate(recs):
        c, j = b["chosen"], b["rejected"]
        for batch, reply, ex in ((c, r.chosen, pairs[i][0]), (j, r.rejected, pairs[i][1])):
            tgt = batch["targets"][i][batch["loss_mask"][i] > 0]
            assert tgt[-1] == TOK.eos_id or len(ex.ids) == 257
            assert TOK.decode(tgt) == reply.encode()[: len(tgt) - (tgt[-1] == TOK.eos_id)].decode("utf-8", "replace")
            last = np.flatnonzero(batch["segment_ids"][i] > 0)[-1]
            assert last == len(ex.ids) - 2  # the reward model reads here
        # same prompt in both rows
        lp = pairs[i][0].prompt_len
        assert (c["inputs"][i, : lp - 1] == j["inputs"][i, : lp - 1]).all()


def test_unpaired_batch_pairs_each_prompt_with_the_previous_reply():
    pairs = load_records(FIX / "hh-rlhf-helpful-base-20.jsonl.gz", "preference")[:3]
    recs = unpair(pairs)                                                  # 6 rows: chosen True, rejected False
    it = Batches(ShuffledIterator(recs, shuffle=False, num_epochs=1), TOK, kind="unpaired", batch_size=8, buckets=(128, 256))
    b = next(it)
    comp, kl = b["completion"], b["kl"]
    assert comp["inputs"].shape == kl["inputs"].shape == (8, 256)
    assert b["desirable"].tolist() == [True, False] * 3 + [False, False]
    assert b["valid"].tolist() == [True] * 6 + [False, False]
    assert comp["loss_mask"][6:].sum() == kl["loss_mask"][6:].sum() == 0

    def text(batch, i, masked):
        keep = (batch["loss_mask"][i] > 0) if masked else (batch["segment_ids"][i] > 0) & (batch["loss_mask"][i] == 0)
        return TOK.decode(batch["targets"][i][keep])

    for i in range(6):
        j = (i - 1) % 6
        own, mine = text(kl, i, masked=False), text(comp, i, masked=False)
        assert own.endswith(mine) or mine.endswith(own)                   # row i's own prompt (its end) ...
        reply = text(kl, i, masked=True)                                  # ... with the previous row's reply
        assert reply and text(comp, j, masked=True).startswith(reply)     # (its start, where the prompt is longer)
        assert text(comp, i, masked=True).startswith((recs[i].completion[:20]))


def test_prompt_batch_left_padded():
    recs = load_records(FIX / "oasst-prompts-10.jsonl", "prompt")
    ids = [tokenize_prompt(TOK, r) for r in recs[:5]]
    stats = new_stats()
    b = collate_prompts(ids, buckets=(32, 64), pad_id=TOK.pad_id, meta=[r.meta for r in recs[:5]], rows=6,
                        stats=stats)
    assert b["prompts"].shape == (6, 64) and b["prompt_mask"].dtype == np.int32 and len(b["meta"]) == 5
    for i, p in enumerate(ids):
        k = min(len(p), 64)
        assert list(b["prompts"][i, 64 - k:]) == p[-k:] and b["prompt_mask"][i].sum() == k
        assert (b["prompts"][i, : 64 - k] == TOK.pad_id).all()
        assert TOK.decode(b["prompts"][i]).endswith("<|assistant|>\n")  # the end is kept
    assert stats["prompt_tokens_cut"] == sum(max(len(p) - 64, 0) for p in ids) and b["prompt_mask"][5].sum() == 0
