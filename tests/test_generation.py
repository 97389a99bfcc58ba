"""KV-cache decoding and sampling tests: cached == uncached, greedy == argmax, logprobs, EOS, filters."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.generation import (categorical, greedy, sample, sample_after, sampling_logits, start_conversation,
                                 top_k_filter, top_p_filter)
from rlhf_jax.models import ModelConfig, forward, forward_cached, init_cache, init_params

GPT = ModelConfig(vocab_size=61, d_model=32, num_layers=2, num_heads=4, mlp_dim=64, max_seq_len=32)
LLAMA = ModelConfig(vocab_size=61, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=48,
                    max_seq_len=32, mlp="swiglu", norm="rmsnorm", positional="rope", use_bias=False,
                    qkv_bias=True, tie_embeddings=False)
CONFIGS = {"gpt2": GPT, "llama": LLAMA}
PAD = 0


def _random_params(cfg, seed):
    """Params of the contracted tree filled from numpy (no compile of the random initialisers). Weights are
    larger than at init so that distributions are peaked and greedy choices unambiguous."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))

    def fill(path, x):
        base = 1.0 if path[-1].key == "scale" else 0.0
        return jnp.asarray(base + (0.06 if len(x.shape) > 1 else 0.02) * rng.standard_normal(x.shape), x.dtype)
    return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.fixture(scope="module")
def params():
    return {name: _random_params(cfg, seed=7) for name, cfg in CONFIGS.items()}


def _left_pad(rows, P):
    """list of token lists -> prompts [B,P] (left-padded with PAD), prompt_mask [B,P]."""
    prompts = np.full((len(rows), P), PAD, np.int32)
    mask = np.zeros((len(rows), P), np.int32)
    for i, r in enumerate(rows):
        prompts[i, P - len(r):], mask[i, P - len(r):] = r, 1
    return jnp.asarray(prompts), jnp.asarray(mask)


def _recompute_logits(params, cfg, tokens, prompt_mask):
    """Uncached forward over prompt + response with left padding masked out: logits predicting tokens[:, P:]."""
    B, P = prompt_mask.shape
    full_mask = jnp.concatenate([prompt_mask, jnp.ones((B, tokens.shape[1] - P), jnp.int32)], 1)
    positions = jnp.maximum(jnp.cumsum(full_mask, 1) - 1, 0)
    logits = forward(params, tokens, config=cfg, positions=positions, segment_ids=full_mask)
    return logits[:, P - 1:-1]


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_cached_decode_equals_uncached_forward(params, name):
    cfg, p = CONFIGS[name], params[name]
    B, P, T = 2, 4, 9
    tokens = jnp.asarray(np.random.default_rng(0).integers(1, 61, (B, T)), jnp.int32)
    full = forward(p, tokens, config=cfg)
    positions = jnp.broadcast_to(jnp.arange(T), (B, T))
    key_mask = jnp.ones((B, T + 3), bool)  # cache longer than needed: unused slots must not matter
    step = jax.jit(forward_cached, static_argnames="config")
    logits, cache = step(p, tokens[:, :P], config=cfg, cache=init_cache(cfg, B, T + 3),
                         positions=positions[:, :P], key_mask=key_mask, index=0)
    np.testing.assert_allclose(logits, full[:, :P], atol=1e-5)
    for t in range(P, T):
        logits, cache = step(p, tokens[:, t:t + 1], config=cfg, cache=cache, positions=positions[:, t:t + 1],
                             key_mask=key_mask, index=jnp.int32(t))
        np.testing.assert_allclose(logits[:, 0], full[:, t], atol=1e-5)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_greedy_is_argmax_and_independent_of_padding(params, name):
    cfg, p, N = CONFIGS[name], params[name], 6
    prompt, other = [5, 9, 2], [7, 1, 1, 3, 8]
    kw = dict(config=cfg, max_new_tokens=N, temperature=0.0, pad_id=PAD)
    alone = sample(p, *_left_pad([prompt], 3), jax.random.key(0), **kw)
    # greedy == argmax of an uncached forward pass over its own output, step by step
    logits = forward(p, alone.tokens[:, :-1], config=cfg)[:, 2:]
    np.testing.assert_array_equal(alone.tokens[:, 3:], jnp.argmax(logits, -1))
    np.testing.assert_array_equal(alone.response_mask, np.ones((1, N)))
    # deterministic, and unaffected by left padding and by batch companions
    again = sample(p, *_left_pad([prompt], 3), jax.random.key(1), **kw)
    np.testing.assert_array_equal(again.tokens, alone.tokens)
    batch = sample(p, *_left_pad([other, prompt, prompt], 7), jax.random.key(0), **kw)
    np.testing.assert_array_equal(batch.tokens[1:, 7:], np.repeat(alone.tokens[:, 3:], 2, 0))
    np.testing.assert_allclose(batch.logprobs[1:], np.repeat(alone.logprobs, 2, 0), atol=1e-5)
    # greedy logprobs are those of the unscaled distribution
    np.testing.assert_allclose(alone.logprobs[0], jax.nn.log_softmax(logits[0])[np.arange(N), alone.tokens[0, 3:]],
                               atol=1e-5)


@pytest.mark.parametrize("name,temperature,top_k", [("gpt2", 1.0, 0), ("llama", 0.7, 0), ("gpt2", 1.3, 5)])
def test_logprobs_match_recomputed_forward(params, name, temperature, top_k):
    cfg, p, N = CONFIGS[name], params[name], 5
    prompts, mask = _left_pad([[3, 4], [10, 11, 12, 13], [6]], 4)
    out = sample(p, prompts, mask, jax.random.key(3), config=cfg, max_new_tokens=N, temperature=temperature,
                 top_k=top_k, pad_id=PAD)
    assert out.tokens.shape == (3, 4 + N) and out.logprobs.shape == (3, N) and out.response_mask.shape == (3, N)
    assert out.logprobs.dtype == jnp.float32 and out.response_mask.dtype == jnp.int32
    np.testing.assert_array_equal(out.tokens[:, :4], prompts)
    logits = np.asarray(_recompute_logits(p, cfg, out.tokens, mask), np.float64) / temperature
    if top_k:  # numpy re-derivation of the filter: keep the k largest per row
        kth = -np.sort(-logits, -1)[..., top_k - 1:top_k]
        logits = np.where(logits >= kth, logits, -np.inf)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    expected = np.take_along_axis(logp, np.asarray(out.tokens[:, 4:])[..., None], -1)[..., 0]
    np.testing.assert_allclose(out.logprobs, expected, atol=1e-4)
    assert np.isfinite(np.asarray(out.logprobs)).all()


def test_eos_stops_and_pads(params):
    p, N = params["gpt2"], 6
    prompts, mask = _left_pad([[5, 9, 2], [7, 1]], 3)
    free = sample(p, prompts, mask, jax.random.key(0), config=GPT, max_new_tokens=N, temperature=0.0, pad_id=PAD)
    eos = int(free.tokens[0, 3 + 2])  # row 0 emits this at step 2 (maybe earlier too)
    first = int(np.argmax(np.asarray(free.tokens[0, 3:]) == eos))
    out = sample(p, prompts, mask, jax.random.key(0), config=GPT, max_new_tokens=N, temperature=0.0, eos_id=eos,
                 pad_id=PAD)
    for row in range(2):
        gen = np.asarray(free.tokens[row, 3:])
        stop = int(np.argmax(gen == eos)) + 1 if (gen == eos).any() else N  # tokens kept, EOS included
        np.testing.assert_array_equal(out.tokens[row, 3:3 + stop], gen[:stop])
        np.testing.assert_array_equal(out.tokens[row, 3 + stop:], PAD)
        np.testing.assert_array_equal(out.response_mask[row], np.arange(N) < stop)
        np.testing.assert_allclose(out.logprobs[row, :stop], free.logprobs[row, :stop], atol=1e-5)
        np.testing.assert_array_equal(out.logprobs[row, stop:], 0.0)
    assert out.response_mask[0].sum() == first + 1


def test_pad_id_equal_to_eos_id_changes_only_the_padding(params):
    """GPT-2 pads with its EOS: the same samples, masks and log-probs as with a distinct pad id; only the ids after
    EOS differ, and the masks (not the ids) say where a response ends."""
    p, N = params["gpt2"], 6
    prompts, mask = _left_pad([[5, 9, 2], [7, 1]], 3)
    free = sample(p, prompts, mask, jax.random.key(0), config=GPT, max_new_tokens=N, temperature=0.0, pad_id=PAD)
    eos = int(free.tokens[0, 3 + 1])
    apart = sample(p, prompts, mask, jax.random.key(0), config=GPT, max_new_tokens=N, temperature=0.0, eos_id=eos,
                   pad_id=PAD)
    shared = sample(p, prompts, mask, jax.random.key(0), config=GPT, max_new_tokens=N, temperature=0.0, eos_id=eos,
                    pad_id=eos)
    np.testing.assert_array_equal(shared.response_mask, apart.response_mask)
    np.testing.assert_array_equal(shared.logprobs, apart.logprobs)
    keep = np.asarray(apart.response_mask) > 0
    np.testing.assert_array_equal(np.asarray(shared.tokens[:, 3:])[keep], np.asarray(apart.tokens[:, 3:])[keep])
    assert (np.asarray(shared.tokens[:, 3:])[~keep] == eos).all() and (~keep).any()


def test_top_k_one_is_greedy(params):
    p = params["llama"]
    prompts, mask = _left_pad([[5, 9, 2], [7, 1]], 3)
    kw = dict(config=LLAMA, max_new_tokens=4, pad_id=PAD)
    ref = sample(p, prompts, mask, jax.random.key(0), temperature=0.0, **kw)
    out = sample(p, prompts, mask, jax.random.key(5), temperature=1.0, top_k=1, **kw)
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    np.testing.assert_allclose(out.logprobs, 0.0, atol=1e-6)  # a point mass after filtering


def test_filters_against_numpy():
    logits = jnp.log(jnp.array([[0.1, 0.4, 0.2, 0.3], [0.25, 0.25, 0.4, 0.1]]))
    # top-p 0.6: row 0 keeps 0.4 + 0.3 (0.7 >= 0.6); row 1 keeps 0.4 + both 0.25 ties at the cutoff
    kept = np.isfinite(np.asarray(top_p_filter(logits, 0.6)))
    np.testing.assert_array_equal(kept, [[False, True, False, True], [True, True, True, False]])
    kept = np.isfinite(np.asarray(top_p_filter(logits, 0.35)))
    np.testing.assert_array_equal(kept, [[False, True, False, False], [False, False, True, False]])
    kept = np.isfinite(np.asarray(top_k_filter(logits, 2)))
    np.testing.assert_array_equal(kept, [[False, True, False, True], [True, True, True, False]])
    # a tiny top_p leaves only the argmax: sampling from it is greedy
    random_logits = jax.random.normal(jax.random.key(0), (64, 50))
    tiny = sampling_logits(random_logits, temperature=1.0, top_k=0, top_p=1e-6)
    np.testing.assert_array_equal(categorical(tiny, jax.random.key(1)), greedy(random_logits, None))


def test_sampling_frequencies():
    """Empirical token frequencies follow softmax(filtered logits / temperature)."""
    logits = jnp.tile(jnp.array([[2.0, 1.0, 0.5, -1.0, 0.0]]), (20000, 1))
    for temperature, top_k, top_p in [(0.8, 0, 1.0), (1.5, 3, 1.0), (1.0, 0, 0.75)]:
        dist = sampling_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)
        tokens = categorical(dist, jax.random.key(top_k))
        x = np.array([2.0, 1.0, 0.5, -1.0, 0.0]) / temperature
        keep = np.ones(5, bool) if top_k == 0 else x >= np.sort(x)[-top_k]
        if top_p < 1.0:  # probs ~ [.56 .21 .13 .03 .08]: the top two reach 0.77 >= 0.75
            keep = np.array([True, True, False, False, False])
        probs = np.where(keep, np.exp(x), 0.0) / np.where(keep, np.exp(x), 0.0).sum()
        np.testing.assert_allclose(np.bincount(np.asarray(tokens), minlength=5) / 20000, probs, atol=0.015)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_decode_stages_change_nothing(params, name):
    """Splitting the decode into loops that read only the cache prefix they can need gives the same samples and
    logprobs (sampled, so the rng stream must line up too), with and without an EOS stopping rows early."""
    from rlhf_jax.generation import decode_stages
    assert decode_stages(10, 1) == [10] and decode_stages(10, 3) == [4, 7, 10] and decode_stages(2, 5) == [1, 2]
    with pytest.raises(ValueError, match="decode_stages"):
        decode_stages(10, 0)
    cfg, p = CONFIGS[name], params[name]
    prompts, mask = _left_pad([[5, 9, 2], [7, 1], [3]], 3)
    for eos in (None, 4):
        one = sample(p, prompts, mask, jax.random.key(1), config=cfg, max_new_tokens=9, temperature=1.0,
                     eos_id=eos, stages=1)
        for stages in (4,):                        # uneven loops (3, 5, 7, 9 tokens): each stage its own prefix
            many = sample(p, prompts, mask, jax.random.key(1), config=cfg, max_new_tokens=9, temperature=1.0,
                          eos_id=eos, stages=stages)
            np.testing.assert_array_equal(many.tokens, one.tokens)
            np.testing.assert_array_equal(many.response_mask, one.response_mask)
            np.testing.assert_allclose(many.logprobs, one.logprobs, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_sample_after_continues_a_conversation_as_sample_does_on_its_whole_context(params, name):
    # Turn 1 on an empty conversation, then new tokens of another length and a second turn: each turn equals
    # `sample` on the row's whole real context so far, though the cache holds padding between the chunks and
    # the first turn's tokens after an EOS (row 0 stops early; row 1 runs to N).
    p, cfg, N = params[name], CONFIGS[name], 4
    prompts, mask = _left_pad([[12, 9, 2], [7, 1]], 3)
    free = sample(p, prompts, mask, jax.random.key(0), config=cfg, max_new_tokens=N, temperature=0.0, pad_id=PAD)
    row0, row1 = np.asarray(free.tokens[0, 3:]).tolist(), np.asarray(free.tokens[1, 3:]).tolist()
    stop = next(j for j in range(N - 1) if row0[j] not in row1 + row0[:j])     # row 0's EOS: one row 1 never writes
    eos = row0[stop]
    kw = dict(config=cfg, max_new_tokens=N, temperature=0.0, eos_id=eos, pad_id=PAD)
    conv = start_conversation(cfg, 2, 3 + N + 5 + N)
    first, conv = sample_after(p, conv, prompts, mask, jax.random.key(0), **kw)
    suffix = [[11, 12, 13], [14, 15, 16, 17, 18]]
    second, conv = sample_after(p, conv, *_left_pad(suffix, 5), jax.random.key(0), **kw)
    assert int(conv.index) == 3 + N + 5 + N
    contexts = []
    for row, opening in enumerate([[12, 9, 2], [7, 1]]):
        turn1 = np.asarray(first.tokens[row, 3:])[np.asarray(first.response_mask[row]) > 0].tolist()
        assert len(turn1) == (stop + 1 if row == 0 else N)
        contexts.append(opening + turn1 + suffix[row])
    L = max(map(len, contexts))          # greedy decoding does not depend on the left padding
    ref = sample(p, *_left_pad(contexts, L), jax.random.key(0), **kw)
    np.testing.assert_array_equal(second.tokens[:, 5:], ref.tokens[:, L:])
    np.testing.assert_array_equal(second.response_mask, ref.response_mask)
    np.testing.assert_allclose(second.logprobs, ref.logprobs, atol=1e-5)
    # A row with no new tokens (an ended episode) samples nothing; a chunk and turn past the slots are refused.
    third, _ = sample_after(p, start_conversation(cfg, 2, 3 + N + 5 + N), *_left_pad([[3], []], 3),
                            jax.random.key(0), **kw)
    assert int(third.response_mask[0].sum()) > 0 and int(third.response_mask[1].sum()) == 0
    with pytest.raises(ValueError, match="exceed the conversation's 5 slots"):
        sample_after(p, start_conversation(cfg, 2, 5), prompts, mask, jax.random.key(0), **kw)


def test_a_sliding_window_model_keeps_no_conversation():
    with pytest.raises(ValueError, match="sliding-window"):
        start_conversation(dataclasses.replace(LLAMA, sliding_window=4), 2, 16)
