"""The ring KV cache of sliding-window layers: W slots instead of P + N, and the same logits, samples and
log-probs as the full cache, the uncached forward and (a Mistral-style model) transformers. Prompts of 12 tokens
with a window of 8 (the prefill keeps only its last 8 keys) and 20 new tokens (the ring wraps several times)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.generation import sample
from rlhf_jax.models import ModelConfig, forward, forward_cached, init_cache, init_params, prefill
from rlhf_jax.models.sequences import sequence_positions
from rlhf_jax.models.transformer import ring_layers, ring_slots

W, P, N = 8, 12, 20
MISTRAL = ModelConfig(vocab_size=61, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=48,
                      max_seq_len=64, mlp="swiglu", norm="rmsnorm", positional="rope", use_bias=False,
                      qkv_bias=False, tie_embeddings=False, sliding_window=W)
GEMMA = MISTRAL.replace(sliding_layers=(True, False), rope_theta_sliding=100.0)   # one windowed, one global layer


def _params(cfg, seed=7):
    """Random params filled from numpy (no compile of the initialisers), larger than at init so that greedy
    choices are unambiguous."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))

    def fill(path, x):
        base = 1.0 if path[-1].key == "scale" else 0.0
        return jnp.asarray(base + (0.3 if len(x.shape) > 1 else 0.02) * rng.standard_normal(x.shape), x.dtype)
    return jax.tree_util.tree_map_with_path(fill, shapes)


def _prompts(vocab, seed=0):
    """[2,P] prompts, the second row left-padded by 3."""
    prompts = np.random.default_rng(seed).integers(1, vocab, (2, P)).astype(np.int32)
    mask = np.ones((2, P), np.int32)
    mask[1, :3], prompts[1, :3] = 0, 0
    return jnp.asarray(prompts), jnp.asarray(mask)


def test_ring_sizes_and_slots():
    S = P + N
    cache = init_cache(GEMMA, 2, S)
    assert cache.ring_k.shape == (1, 2, W, 2, 8) and cache.k.shape == (1, 2, S, 2, 8)     # windowed, global
    cache = init_cache(MISTRAL, 2, S)
    assert cache.ring_v.shape == (2, 2, W, 2, 8) and cache.k.shape == (0, 2, S, 2, 8)
    for cfg, max_len, ring in [(MISTRAL, S, False), (MISTRAL, W, True), (MISTRAL.replace(sliding_window=None), S,
                                                                           True)]:
        cache = init_cache(cfg, 2, max_len, ring=ring)                        # no ring: the full [L,B,S,K,H]
        assert cache.ring_k is None and cache.k.shape == (2, 2, max_len, 2, 8)
    assert ring_layers(GEMMA, S) == (True, False) and ring_layers(GEMMA, W) == (False, False)
    # after slots [0, 12) are written, ring slot j holds the last s < 12 with s = j mod 8
    np.testing.assert_array_equal(ring_slots(12, W), [8, 9, 10, 11, 4, 5, 6, 7])
    assert (np.asarray(ring_slots(3, W))[3:] < 0).all() and (np.asarray(ring_slots(0, W)) < 0).all()


def test_ring_chunks_equal_uncached_forward():
    """Prefill 12 into a ring of 8, a 3-token chunk (written across the ring's end), then single steps: the logits
    of every real token equal the uncached windowed forward over the whole sequence."""
    cfg, p = GEMMA, _params(GEMMA)
    prompts, mask = _prompts(cfg.vocab_size)
    T = P + 3 + 5
    tokens = jnp.concatenate([prompts, jnp.asarray(np.random.default_rng(1).integers(1, 61, (2, T - P)),
                                                   jnp.int32)], 1)
    full_mask = jnp.concatenate([mask, jnp.ones((2, T - P), jnp.int32)], 1)
    positions = sequence_positions(full_mask)
    want = np.asarray(forward(p, tokens, config=cfg, positions=positions, segment_ids=full_mask))
    real = np.asarray(full_mask, bool)
    kw = dict(config=cfg, key_mask=full_mask)
    logits, cache = prefill(p, tokens[:, :P], cache=init_cache(cfg, 2, T), positions=positions[:, :P], **kw)
    got = [logits]
    for lo, hi in [(P, P + 3)] + [(s, s + 1) for s in range(P + 3, T)]:
        logits, cache = forward_cached(p, tokens[:, lo:hi], cache=cache, positions=positions[:, lo:hi],
                                       index=jnp.int32(lo), **kw)
        got.append(logits)
    np.testing.assert_allclose(np.concatenate(got, 1)[real], want[real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_sample_with_ring_equals_full_cache(temperature):
    """Greedy tokens, and sampled tokens and log-probs (the rng stream must line up), with a ring for the windowed
    layer and the full cache for the global one, equal the full cache on both; two decode stages with the ring."""
    cfg, p = GEMMA, _params(GEMMA)
    prompts, mask = _prompts(cfg.vocab_size)
    kw = dict(config=cfg, max_new_tokens=N, temperature=temperature, pad_id=0)
    full = sample(p, prompts, mask, jax.random.key(2), ring_cache=False, stages=1, **kw)
    ring = sample(p, prompts, mask, jax.random.key(2), stages=2, **kw)
    np.testing.assert_array_equal(np.asarray(ring.tokens), np.asarray(full.tokens))
    np.testing.assert_allclose(np.asarray(ring.logprobs), np.asarray(full.logprobs), atol=1e-5, rtol=1e-5)
    assert len(set(np.asarray(full.tokens[0, P:]).tolist())) > 3                 # not a degenerate repeat


def test_mistral_ring_greedy_matches_transformers(tmp_path):
    """A tiny Mistral with a window of 8 (every layer windowed, so the cache is rings only): our greedy decode of a
    left-padded batch equals transformers re-run on the whole sequence at every step."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from rlhf_jax.models.hf import load_pretrained
    hf = transformers.MistralConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                    sliding_window=W, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(hf, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, w in model.named_parameters():
            w.copy_((1.0 if "norm" in name else 0.0) + 0.3 * torch.randn_like(w))
    model.save_pretrained(tmp_path)
    config, params = load_pretrained(tmp_path)                        # the import reads Mistral's window
    assert config.sliding_window == W and config.sliding_layers is None
    assert init_cache(config, 2, P + N).ring_k.shape[2] == W
    prompts, mask = _prompts(config.vocab_size, seed=3)
    ids, m = torch.from_numpy(np.array(prompts)).long(), torch.from_numpy(np.array(mask)).long()
    with torch.no_grad():
        for _ in range(N):
            positions = (m.cumsum(-1) - 1).clamp(min=0)
            nxt = model(input_ids=ids, attention_mask=m, position_ids=positions).logits[:, -1].argmax(-1)
            ids, m = torch.cat([ids, nxt[:, None]], 1), torch.cat([m, torch.ones_like(m[:, :1])], 1)
    out = sample(params, prompts, mask, jax.random.key(0), config=config, max_new_tokens=N, temperature=0.0,
                 pad_id=0)
    np.testing.assert_array_equal(np.asarray(out.tokens[:, P:]), ids[:, P:].numpy())
