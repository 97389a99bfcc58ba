"""Performance paths against the paths they replace: the Pallas kernels (interpret mode on CPU) against the
reference attention of rlhf_jax.models.transformer, logits_chunk="auto"'s memory budget, and training from a
compute-dtype copy of the params against casting the float32 params every step."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlhf_jax.generation import sample
from rlhf_jax.models import init_params
from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.kernels import decode_attention, segment_attention
from rlhf_jax.models.transformer import (cached_attention, decode_attention_impl, dense_mask, forward,
                                         segment_attention_impl, self_attention)
from rlhf_jax.train.state import TrainState, compute_copy
from rlhf_jax.train.steps import sft_step

B, S, N, K, H = 2, 32, 4, 2, 16
TINY_LLAMA = ModelConfig.preset("tiny-llama", max_seq_len=64)   # N = 4, K = 2 (grouped-query), H = 16


def _decode_inputs(dtype, seed=0):
    ks = jax.random.split(jax.random.key(seed), 6)
    q = jax.random.normal(ks[0], (B, 1, N, H)).astype(dtype)
    k, v = (jax.random.normal(key, (B, 1, K, H)).astype(dtype) for key in ks[1:3])
    cache_k, cache_v = (jax.random.normal(key, (B, S, K, H)).astype(dtype) for key in ks[3:5])
    visible = jax.random.bernoulli(ks[5], 0.6, (B, S))
    visible = visible.at[:, 8:16].set(False).at[1, :].set(jnp.arange(S) >= 20)   # a fully masked block; left pad
    # Masked slots hold large values that must not leak into the output.
    cache_k = jnp.where(visible[:, :, None, None], cache_k, 100.0)
    cache_v = jnp.where(visible[:, :, None, None], cache_v, -1e4)
    return q, k, v, cache_k, cache_v, visible, jnp.ones((B, 1, 1), bool)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_decode_attention_matches_cached_attention(dtype, tol, softcap):
    q, k, v, ck, cv, visible, new_visible = _decode_inputs(dtype)
    ref = cached_attention(q, k, v, ck, cv, visible, new_visible, softcap=softcap, fused_reads=True)
    out = decode_attention(q, k, v, ck, cv, visible, new_visible, softcap=softcap, block_s=8, interpret=True)
    assert out.shape == ref.shape and out.dtype == dtype
    assert bool(jnp.all(jnp.isfinite(out.astype(jnp.float32))))
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=tol, rtol=tol)


def test_decode_attention_sliding_window_and_odd_length():
    """A per-query [B,1,S] window mask, and a cache length (S = 27) that no block of 8 divides (padded)."""
    q, k, v, ck, cv, visible, new_visible = _decode_inputs(jnp.float32, seed=1)
    ck, cv = (c[:, :27] for c in (ck, cv))
    window = (visible[:, :27] & (jnp.arange(27) > 14))[:, None, :]
    ref = cached_attention(q, k, v, ck, cv, window, new_visible)
    out = decode_attention(q, k, v, ck, cv, window, new_visible, block_s=8, interpret=True)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=1e-5)


def test_decode_attention_reads_one_layer_of_the_stacked_cache():
    """The sampler's form: the whole [L,B,S,K,H] cache, a layer index and the first R = 20 slots; what lies in
    other layers and in unread slots (NaN here) never reaches the output."""
    q, k, v, ck, cv, visible, new_visible = _decode_inputs(jnp.float32, seed=2)
    R = 20
    stacked = [jnp.stack([jnp.full_like(c, jnp.nan), c.at[:, R:].set(jnp.nan)]) for c in (ck, cv)]
    ref = cached_attention(q, k, v, ck[:, :R], cv[:, :R], visible[:, :R], new_visible)
    out = decode_attention(q, k, v, *stacked, visible[:, :R], new_visible, layer=1, block_s=8, interpret=True)
    assert bool(jnp.all(jnp.isfinite(out)))
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("changes", [{}, {"sliding_window": 5, "sliding_layers": (True, False), "attn_softcap": 0.1}],
                         ids=["llama", "window-softcap"])
def test_greedy_sampling_with_decode_kernel_matches_reference(changes):
    config = TINY_LLAMA.replace(**changes)
    params = init_params(config, jax.random.key(3))
    prompts = jax.random.randint(jax.random.key(4), (2, 8), 0, 256)
    prompt_mask = jnp.ones((2, 8), jnp.int32).at[1, :3].set(0)                     # a left-padded row
    kwargs = dict(max_new_tokens=8, temperature=0.0, eos_id=None, stages=2)
    ref = sample(params, prompts, prompt_mask, jax.random.key(0),
                 config=config.replace(decode_attention="reference"), **kwargs)
    out = sample(params, prompts, prompt_mask, jax.random.key(0),
                 config=config.replace(decode_attention="pallas"), **kwargs)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))
    np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(ref.logprobs), atol=1e-4)


def test_attention_impl_defaults(monkeypatch):
    assert decode_attention_impl(TINY_LLAMA) == "reference"                         # CPU
    assert decode_attention_impl(TINY_LLAMA.replace(decode_attention="pallas")) == "pallas"
    assert segment_attention_impl(TINY_LLAMA) == "dense"
    assert segment_attention_impl(TINY_LLAMA.replace(segment_attention="pallas")) == "pallas"
    assert segment_attention_impl(TINY_LLAMA.replace(segment_attention="pallas", attn_softcap=30.0)) == "dense"
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(jax, "device_count", lambda: 1)
    assert decode_attention_impl(TINY_LLAMA) == "reference"                         # opt-in until timed on a GPU
    pallas = TINY_LLAMA.replace(decode_attention="pallas")
    assert decode_attention_impl(pallas) == "pallas"                                # H = 16, G = 2
    assert decode_attention_impl(pallas.replace(num_kv_heads=None, num_heads=6, d_model=96)) == "pallas"
    with pytest.raises(ValueError, match="power-of-two head dim"):
        decode_attention_impl(pallas.replace(d_model=96))                           # H = 24: no Triton block
    monkeypatch.setattr(jax, "device_count", lambda: 2)
    with pytest.raises(ValueError, match="one device"):
        decode_attention_impl(pallas)
    assert segment_attention_impl(TINY_LLAMA) == "dense"


SEGMENTS = jnp.array([[1] * 10 + [2] * 12 + [3] * 6 + [0] * 4,      # packed, then right padding
                      [0] * 5 + [1] * 20 + [2] * 7])                 # left padding, then packed


def test_segment_attention_values_and_gradients_match_dense_mask():
    T = SEGMENTS.shape[1]
    ks = jax.random.split(jax.random.key(5), 4)
    q = jax.random.normal(ks[0], (B, T, N, H))
    k, v = (jax.random.normal(key, (B, T, K, H)) for key in ks[1:3])
    g = jax.random.normal(ks[3], (B, T, N, H))

    def dense(q, k, v):
        return self_attention(q, k, v, dense_mask(SEGMENTS, SEGMENTS.shape[1]), implementation="xla")

    def kernel(q, k, v):
        return segment_attention(q, k, v, SEGMENTS, block=8, interpret=True)

    np.testing.assert_allclose(np.asarray(kernel(q, k, v)), np.asarray(dense(q, k, v)), atol=1e-5)
    grads = [jax.grad(lambda *x, f=f: jnp.sum(f(*x) * g), argnums=(0, 1, 2))(q, k, v) for f in (dense, kernel)]
    for ref, out in zip(*grads):
        assert bool(jnp.all(jnp.isfinite(out)))
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5)


def test_model_with_segment_kernel_matches_dense_mask():
    """Logits and parameter gradients of a grouped-query model (through the layer scan and rematerialisation)."""
    config = TINY_LLAMA.replace(remat="full")
    params = init_params(config, jax.random.key(6))
    tokens = jax.random.randint(jax.random.key(7), SEGMENTS.shape, 0, 256)
    g = jax.random.normal(jax.random.key(8), (*SEGMENTS.shape, config.vocab_size))

    def loss(params, config):
        logits = forward(params, tokens, config=config, segment_ids=SEGMENTS)
        return jnp.sum(logits * g), logits

    (_, ref), ref_grads = jax.value_and_grad(loss, has_aux=True)(params, config)
    (_, out), grads = jax.value_and_grad(loss, has_aux=True)(params, config.replace(segment_attention="pallas"))
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-4)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        assert bool(jnp.all(jnp.isfinite(a)))
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-3, rtol=1e-3)


def test_auto_logits_chunk_reads_free_device_memory(capsys):
    from rlhf_jax.models import head
    rows, vocab = 8 * 1024, 50257                                        # GPT-2 SFT 8x1024: 1.53 GiB of logits
    nbytes = rows * vocab * 4
    roomy = {"bytes_limit": 80 * 2**30, "bytes_in_use": 10 * 2**30}      # a quarter of 70 GiB free: 17.5 GiB
    tight = {"bytes_limit": 80 * 2**30, "bytes_in_use": 80 * 2**30 - 4 * nbytes + 4}
    assert head.resolve_chunk("auto", rows, vocab, memory_stats=roomy) is None
    assert head.resolve_chunk("auto", rows, vocab, memory_stats=tight) == head.FUSED_CHUNK
    assert head.resolve_chunk("auto", 10 * rows, vocab, memory_stats=roomy) is None      # 15.3 GiB > 4 GiB
    assert head.full_logits_budget(roomy)[0] == int(70 * 2**30 * head.FULL_LOGITS_FREE_FRACTION)
    assert head.full_logits_budget(None)[0] == head.FULL_LOGITS_MAX_BYTES          # CPU: the fixed threshold
    assert head.resolve_chunk(16, rows, vocab, memory_stats=tight) == 16
    # The device's own statistics (None on CPU): the decision is printed once per process, with its inputs.
    head.AUTO_DECISIONS.clear()
    assert head.resolve_chunk("auto", rows, vocab) is None
    head.resolve_chunk("auto", rows, vocab)
    err = capsys.readouterr().err
    assert err.count("logits_chunk='auto'") == 1 and "budget of 4.00 GiB" in err


def test_kernels_lower_to_triton_for_cuda():
    """Lowering for a CUDA device works on CPU: both kernels become Triton custom calls (the Triton compiler itself
    runs only on a GPU)."""
    bf16 = jnp.bfloat16

    def spec(*shape, dtype=bf16):
        return jax.ShapeDtypeStruct(shape, dtype)

    def triton_calls(f, *args):
        return jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text().count("xla.gpu.triton")

    decode = functools.partial(decode_attention, layer=1, softcap=50.0, interpret=False)
    assert triton_calls(decode, spec(2, 1, 8, 64), spec(2, 1, 2, 64), spec(2, 1, 2, 64), spec(2, 2, 96, 2, 64),
                        spec(2, 2, 96, 2, 64), spec(2, 80, dtype=bool), spec(2, 1, 1, dtype=bool)) == 1

    def loss(q, k, v, ids):
        return segment_attention(q, k, v, ids, interpret=False).astype(jnp.float32).sum()

    grads = jax.grad(loss, argnums=(0, 1, 2))
    assert triton_calls(grads, spec(2, 64, 4, 64), spec(2, 64, 2, 64), spec(2, 64, 2, 64),
                        spec(2, 64, dtype=jnp.int32)) == 3          # forward, backward preprocess, backward


def test_sft_step_from_a_compute_dtype_copy_matches_casting_every_step():
    config = ModelConfig.preset("tiny", dtype="bfloat16")         # tied embedding, biases, LayerNorm
    params = init_params(config, jax.random.key(8))
    ids = jax.random.randint(jax.random.key(9), (2, 17), 0, 256)
    batch = {"inputs": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": jnp.ones((2, 16), jnp.float32)}
    step = jax.jit(functools.partial(sft_step, model_config=config), donate_argnums=0)   # as the stages do
    (ref, ref_metrics), (out, metrics) = (step(TrainState.create(params, optax.sgd(1.0), 0, compute_dtype=d), batch)
                                          for d in (None, "bfloat16"))
    assert ref.compute_params is None
    assert float(metrics["loss"]) == float(ref_metrics["loss"])                       # the same forward pass
    np.testing.assert_allclose(float(metrics["grad_norm"]), float(ref_metrics["grad_norm"]), rtol=1e-3)
    for a, b in zip(jax.tree.leaves(out.params), jax.tree.leaves(ref.params)):       # f32 masters, SGD(1): p - g
        assert a.dtype == b.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-3, rtol=1e-2)
    copy = out.compute_params                                                         # refreshed from the masters
    assert copy["final_norm"]["scale"].dtype == jnp.float32 and copy["embed"]["embedding"].dtype == jnp.bfloat16
    for a, b in zip(jax.tree.leaves(copy), jax.tree.leaves(compute_copy(out.params, "bfloat16"))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
