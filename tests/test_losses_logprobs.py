"""token_logprobs (plain, chunked, fused from hidden), sequence_logprobs, entropy vs numpy."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.losses import entropy_from_logits, sequence_logprobs, token_logprobs
from rlhf_jax.models.head import token_logprobs_from_hidden


def ragged(rng, b, t, min_len=0):
    lengths = rng.integers(min_len, t + 1, size=b)
    return (np.arange(t)[None, :] < lengths[:, None]).astype(np.float32)


def np_logprob(logits, targets):
    out = np.zeros(targets.shape)
    for b in range(targets.shape[0]):
        for t in range(targets.shape[1]):
            z = logits[b, t].astype(np.float64)
            out[b, t] = z[targets[b, t]] - (z.max() + np.log(np.exp(z - z.max()).sum()))
    return out


@pytest.mark.parametrize("b,t,v", [(1, 1, 2), (2, 5, 7), (3, 4, 33)])
def test_token_logprobs_vs_numpy(b, t, v):
    rng = np.random.default_rng(b * t * v)
    logits = (rng.normal(size=(b, t, v)) * 5).astype(np.float32)
    targets = rng.integers(0, v, size=(b, t)).astype(np.int32)
    ref = np_logprob(logits, targets)
    np.testing.assert_allclose(jax.jit(token_logprobs)(logits, targets), ref, rtol=1e-5, atol=1e-5)
    for chunk in (1, 3, 4, v, v + 5):
        got = jax.jit(lambda z, y: token_logprobs(z, y, chunk_size=chunk))(logits, targets)
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    mask = ragged(rng, b, t)
    np.testing.assert_allclose(jax.jit(sequence_logprobs)(logits, targets, mask), (ref * mask).sum(-1),
                               rtol=1e-5, atol=1e-5)


def test_token_logprobs_bf16_and_large_logits():
    rng = np.random.default_rng(0)
    logits = (rng.normal(size=(2, 3, 10)) * 1e4).astype(np.float32)
    targets = rng.integers(0, 10, size=(2, 3))
    ref = np_logprob(logits, targets)
    np.testing.assert_allclose(token_logprobs(logits, targets, chunk_size=3), ref, rtol=1e-5, atol=1e-2)
    bf = jnp.asarray(logits / 1e4, jnp.bfloat16)
    out = token_logprobs(bf, targets, chunk_size=4)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, np_logprob(np.asarray(bf.astype(jnp.float32)), targets), rtol=1e-5, atol=1e-5)


def test_chunked_gradient_matches():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 3, 11)).astype(np.float32)
    targets = rng.integers(0, 11, size=(2, 3))
    w = rng.normal(size=(2, 3)).astype(np.float32)
    g_ref = jax.grad(lambda z: jnp.sum(w * token_logprobs(z, targets)))(logits)
    g_chunk = jax.jit(jax.grad(lambda z: jnp.sum(w * token_logprobs(z, targets, chunk_size=4))))(logits)
    np.testing.assert_allclose(g_chunk, g_ref, rtol=1e-5, atol=1e-6)
    # Analytic gradient: w * (onehot - softmax).
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    expected = -w[..., None] * p
    for b in range(2):
        for t in range(3):
            expected[b, t, targets[b, t]] += w[b, t]
    np.testing.assert_allclose(g_ref, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk", [1, 4, 5, 64])
def test_from_hidden_value_and_grads(chunk):
    rng = np.random.default_rng(chunk)
    b, t, d, v = 2, 3, 6, 13
    hidden = rng.normal(size=(b, t, d)).astype(np.float32)
    w = rng.normal(size=(d, v)).astype(np.float32)
    targets = rng.integers(0, v, size=(b, t))
    cot = rng.normal(size=(b, t)).astype(np.float32)

    def ref_fn(h, w):
        return jnp.sum(cot * token_logprobs(jnp.einsum("btd,dv->btv", h, w), targets))

    def fused_fn(h, w):
        return jnp.sum(cot * token_logprobs_from_hidden(h, w, targets, chunk_size=chunk))

    np.testing.assert_allclose(jax.jit(lambda h, w: token_logprobs_from_hidden(h, w, targets, chunk_size=chunk))(
        hidden, w), np_logprob(hidden @ w, targets), rtol=1e-5, atol=1e-5)
    g_ref = jax.grad(ref_fn, argnums=(0, 1))(hidden, w)
    g_fused = jax.jit(jax.grad(fused_fn, argnums=(0, 1)))(hidden, w)
    for a, r in zip(g_fused, g_ref):
        np.testing.assert_allclose(a, r, rtol=1e-5, atol=1e-5)


def test_entropy_vs_numpy():
    rng = np.random.default_rng(3)
    logits = (rng.normal(size=(2, 4, 9)) * 3).astype(np.float32)
    ref = np.zeros((2, 4))
    for b in range(2):
        for t in range(4):
            p = np.exp(logits[b, t].astype(np.float64))
            p /= p.sum()
            ref[b, t] = -(p * np.log(p)).sum()
    np.testing.assert_allclose(jax.jit(entropy_from_logits)(logits), ref, rtol=1e-5, atol=1e-6)
    uniform = entropy_from_logits(np.zeros((1, 1, 9), np.float32))
    np.testing.assert_allclose(uniform, [[np.log(9)]], rtol=1e-6)


def test_vmap_and_no_retrace():
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(3, 2, 4, 7)).astype(np.float32)
    targets = rng.integers(0, 7, size=(3, 2, 4))
    batched = jax.vmap(lambda z, y: token_logprobs(z, y, chunk_size=3))(logits, targets)
    np.testing.assert_allclose(batched, np_logprob(logits.reshape(6, 4, 7), targets.reshape(6, 4)).reshape(3, 2, 4),
                               rtol=1e-5, atol=1e-5)
    traces = [0]

    @jax.jit
    def f(z, y, m):
        traces[0] += 1
        return sequence_logprobs(z, y, m), entropy_from_logits(z), token_logprobs(z, y, chunk_size=3)

    f(logits[0], targets[0], np.ones((2, 4), np.float32))
    f(logits[1], targets[1], ragged(rng, 2, 4))
    assert traces[0] == 1
