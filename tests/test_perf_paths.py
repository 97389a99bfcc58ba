"""The fast paths equal the plain ones: length-based attention, in-place cached decoding, bf16 decode
params, response-only PPO heads, and the fused (chunked) LM head + SFT loss with its running argmax."""
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.losses import sft_loss, token_logprobs
from rlhf_jax.models.head import (FULL_LOGITS_MAX_BYTES, FUSED_CHUNK, resolve_chunk, sft_loss_from_hidden,
                                  token_logprobs_and_argmax_from_hidden, token_logprobs_from_hidden)
from rlhf_jax.models import (forward, forward_cached, forward_hidden, init_cache, init_params,
                             scalar_forward)
from rlhf_jax.models.transformer import KVCache, attention_impl, decode_params, lm_head_kernel, prefill, scan_unroll
from rlhf_jax.models.sequences import last_index, logits_at, response_index, sequence_positions, sequence_scores
from rlhf_jax.models.sequences import values_at

from _tiny_models import CONFIGS, GPT, LLAMA, _tokens, params  # noqa: F401 (params is a fixture)


def test_attention_impl_default_is_xla_on_cpu():
    assert attention_impl(GPT) == "xla"
    assert attention_impl(GPT.replace(dtype="bfloat16")) == "xla"   # cuDNN only on GPU
    assert attention_impl(GPT.replace(attention_impl="cudnn")) == "cudnn"


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_seq_lengths_equal_segment_mask(params, name):
    cfg, p = CONFIGS[name], params[name]
    B, T = 3, 9
    tokens = _tokens(B, T, seed=2)
    lengths = jnp.array([9, 5, 1], jnp.int32)
    segment_ids = (jnp.arange(T)[None] < lengths[:, None]).astype(jnp.int32)
    fast = forward_hidden(p, tokens, config=cfg, seq_lengths=lengths)
    dense = forward_hidden(p, tokens, config=cfg, segment_ids=segment_ids)
    assert np.isfinite(np.asarray(fast)).all()
    real = np.asarray(segment_ids, bool)
    np.testing.assert_allclose(np.asarray(fast)[real], np.asarray(dense)[real], atol=1e-5)
    # and the real tokens do not see the padding at all
    junk = tokens.at[1, 5:].set(7)
    np.testing.assert_allclose(forward_hidden(p, junk, config=cfg, seq_lengths=lengths)[1, :5], fast[1, :5],
                               atol=1e-6)
    with pytest.raises(ValueError, match="not both"):
        forward_hidden(p, tokens, config=cfg, seq_lengths=lengths, segment_ids=segment_ids)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_cached_chunks_ignore_unwritten_slots(params, name):
    """Prefill 3, a 3-token chunk, then 1 token, into a cache whose unwritten slots hold garbage (never read),
    with left padding in the key mask: equals the uncached masked forward."""
    cfg, p = CONFIGS[name], params[name]
    B, T, S = 2, 7, 10
    tokens = _tokens(B, T, seed=4)
    mask = jnp.array([[1] * T, [0, 0] + [1] * (T - 2)], jnp.int32)
    positions = sequence_positions(mask)
    full = forward(p, tokens, config=cfg, positions=positions, segment_ids=mask)
    key_mask = jnp.concatenate([mask, jnp.ones((B, S - T), jnp.int32)], 1)
    zeros = init_cache(cfg, B, S)
    cache = KVCache(k=zeros.k + 100.0, v=zeros.v - 50.0)
    step = jax.jit(forward_cached, static_argnames="config")
    real = np.asarray(mask, bool)
    for lo, hi in [(0, 3), (3, 6), (6, 7)]:
        logits, cache = step(p, tokens[:, lo:hi], config=cfg, cache=cache, positions=positions[:, lo:hi],
                             key_mask=key_mask, index=jnp.int32(lo))
        np.testing.assert_allclose(np.asarray(logits)[real[:, lo:hi]], np.asarray(full[:, lo:hi])[real[:, lo:hi]],
                                   atol=1e-5)
    # slots past the written ones are untouched
    np.testing.assert_array_equal(cache.k[:, :, T:], zeros.k[:, :, T:] + 100.0)
    # the prefill (which never reads the cache) equals forward_cached at index 0
    kw = dict(config=cfg, positions=positions[:, :4], key_mask=key_mask)
    a_logits, a_cache = prefill(p, tokens[:, :4], cache=zeros, **kw)
    b_logits, b_cache = step(p, tokens[:, :4], cache=zeros, index=0, **kw)
    np.testing.assert_allclose(a_logits, b_logits, atol=1e-6)
    np.testing.assert_allclose(a_cache.v, b_cache.v, atol=1e-6)


def test_decode_params_cast_once_same_forward(params):
    cfg = LLAMA.replace(dtype="bfloat16")
    p = params["llama"]
    cast = decode_params(p, cfg)
    assert cast["layers"]["attn_norm"]["scale"].dtype == jnp.float32          # norms keep float32
    assert cast["final_norm"]["scale"].dtype == jnp.float32
    assert cast["layers"]["attn"]["q"]["kernel"].dtype == jnp.bfloat16
    assert cast["embed"]["embedding"].dtype == jnp.bfloat16
    tokens = _tokens(2, 6)
    np.testing.assert_array_equal(forward(cast, tokens, config=cfg), forward(p, tokens, config=cfg))


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_response_only_heads_equal_sliced_full(params, name):
    cfg, p = CONFIGS[name], params[name]
    P, N = 4, 5
    tokens = _tokens(2, P + N, seed=5)
    mask = jnp.array([[0, 1, 1, 1] + [1] * N, [1, 1, 1, 1] + [1, 1, 1, 0, 0]], jnp.int32)
    kw = dict(positions=sequence_positions(mask), segment_ids=mask)
    full = forward(p, tokens, config=cfg, **kw)[:, P - 1:-1] / 0.7
    got = logits_at(p, tokens, mask, response_index(P, N), model_config=cfg) / 0.7
    # Rows are rotated to one right-padded example (sequence-length attention): outputs that predict a padding
    # token are unspecified, every other one must equal the dense segment-mask forward.
    real = np.asarray(mask[:, P:], bool)
    assert real.sum() == 8
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(full)[real], atol=1e-5)
    values = scalar_forward(p, tokens, config=cfg, **kw)
    got_v = values_at(p, tokens, mask, response_index(P, N), model_config=cfg)
    np.testing.assert_allclose(np.asarray(got_v)[real], np.asarray(values[:, P - 1:-1])[real], atol=1e-5)
    # A score at each row's last real token (left- or right-padded rows alike) is the dense forward's there.
    with_head = {**p, "score_head": {"kernel": jnp.ones((cfg.d_model, 1)) / cfg.d_model, "bias": jnp.zeros((1,))}}
    dense = scalar_forward(with_head, tokens, config=cfg, **kw)
    last = np.asarray(last_index(mask))
    assert list(last) == [P + N - 1, P + 2]
    np.testing.assert_allclose(sequence_scores(with_head, tokens, mask, model_config=cfg),
                               np.asarray(dense)[np.arange(2), last], atol=1e-5)


def _np_logsoftmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


@pytest.mark.parametrize("chunk", [7, 16, 61, 200, None, "auto"])
def test_fused_logprobs_and_argmax_against_numpy(chunk):
    rng = np.random.default_rng(chunk if isinstance(chunk, int) else 0)
    D, V = 8, 61
    h = rng.standard_normal((2, 5, D)).astype(np.float32)
    w = rng.standard_normal((D, V)).astype(np.float32)
    w[:, 3] = w[:, 50] = 3.0                 # a tie across chunks: argmax must keep the first index
    h[0, 0] = 1.0                            # ... in a row where columns 3 and 50 are the clear maximum
    y = rng.integers(0, V, (2, 5))
    logp, arg = jax.jit(lambda h, w: token_logprobs_and_argmax_from_hidden(h, w, y, chunk_size=chunk))(h, w)
    z = h.astype(np.float64) @ w
    np.testing.assert_allclose(logp, np.take_along_axis(_np_logsoftmax(z), y[..., None], -1)[..., 0], atol=1e-5)
    np.testing.assert_array_equal(arg, z.argmax(-1))
    assert int(arg[0, 0]) == 3


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_fused_sft_loss_equals_unfused_with_grads(params, name):
    cfg = CONFIGS[name]
    p = {k: v for k, v in params[name].items() if k != "score_head"}
    tokens = _tokens(2, 9, seed=6)
    targets = _tokens(2, 9, seed=7)
    loss_mask = jnp.array([[0, 0, 1, 1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 0, 0, 0, 0]], jnp.float32)

    def plain(p):
        return sft_loss(forward(p, tokens, config=cfg), targets, loss_mask)

    def fused(p):
        h = forward_hidden(p, tokens, config=cfg)
        return sft_loss_from_hidden(h, lm_head_kernel(p, config=cfg), targets, loss_mask, chunk_size=16)

    (l1, m1), g1 = jax.jit(jax.value_and_grad(plain, has_aux=True))(p)
    (l2, m2), g2 = jax.jit(jax.value_and_grad(fused, has_aux=True))(p)
    np.testing.assert_allclose(l2, l1, rtol=1e-6)
    assert set(m1) == set(m2)
    for k in m1:
        np.testing.assert_allclose(m2[k], m1[k], rtol=1e-5, err_msg=k)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g2, g1)


def test_resolve_chunk_auto_threshold():
    rows = FULL_LOGITS_MAX_BYTES // (4 * 50257)
    assert resolve_chunk("auto", rows, 50257) is None                 # GPT-2 SFT 8x1024 fits: full logits
    assert resolve_chunk("auto", rows + 1, 50257) == FUSED_CHUNK
    assert resolve_chunk(16, 10**9, 50257) == 16 and resolve_chunk(None, 10**9, 50257) is None
    with pytest.raises(ValueError, match="logits_chunk"):
        GPT.replace(logits_chunk=0)
    with pytest.raises(ValueError, match="scan_unroll"):
        GPT.replace(scan_unroll=0)
    assert scan_unroll(GPT) == 1 and scan_unroll(GPT.replace(scan_unroll=5)) == GPT.num_layers   # CPU default


def test_full_logits_pad_vocab_gradients_match_chunked():
    rng = np.random.default_rng(3)
    h = jnp.asarray(rng.standard_normal((2, 3, 8)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((8, 130)), jnp.float32)        # V = 130: padded to 256 columns
    y = jnp.asarray(rng.integers(0, 130, (2, 3)))
    f = lambda chunk: jax.grad(lambda h, w: token_logprobs_from_hidden(h, w, y, chunk_size=chunk).sum(),  # noqa
                               argnums=(0, 1))(h, w)
    for a, b in zip(f(None), f(32)):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_unrolled_layers_equal_scanned(name):
    """scan_unroll changes the compiled loop, not the parameters, the logits or the gradients."""
    cfg = CONFIGS[name].replace(num_layers=3)
    p = init_params(cfg, jax.random.key(2))
    p_unrolled = init_params(cfg.replace(scan_unroll=3), jax.random.key(2))
    jax.tree.map(np.testing.assert_array_equal, p_unrolled, p)
    tokens, targets = _tokens(2, 7, seed=8), _tokens(2, 7, seed=9)
    segment_ids = jnp.array([[1, 1, 1, 2, 2, 2, 0], [1] * 7], jnp.int32)

    def loss(p, c):
        logits = forward(p, tokens, config=c, segment_ids=segment_ids)
        return sft_loss(logits, targets, (segment_ids > 0).astype(jnp.float32))[0], logits

    results = [jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)(p, cfg.replace(scan_unroll=u))
               for u in (1, 2, 3)]
    (l1, z1), g1 = results[0]
    for (lu, zu), gu in results[1:]:
        np.testing.assert_allclose(zu, z1, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(lu, l1, rtol=1e-6)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), gu, g1)


def test_cached_attention_forms_agree():
    """The GPU form (multiply-reduces over the cache) and the einsum form of a one-token decode step agree."""
    from rlhf_jax.models.transformer import cached_attention
    rng = np.random.default_rng(0)
    B, S, N, K, H = 3, 7, 4, 2, 8
    q = rng.normal(size=(B, 1, N, H)).astype(np.float32)
    k, v = (rng.normal(size=(B, 1, K, H)).astype(np.float32) for _ in range(2))
    ck, cv = (rng.normal(size=(B, S, K, H)).astype(np.float32) for _ in range(2))
    old_visible = rng.random((B, S)) < 0.7
    new_visible = np.ones((B, 1, 1), bool)
    fused = cached_attention(q, k, v, ck, cv, old_visible, new_visible, fused_reads=True)
    einsum = cached_attention(q, k, v, ck, cv, old_visible, new_visible, fused_reads=False)
    np.testing.assert_allclose(fused, einsum, rtol=1e-5, atol=1e-6)
    # independent reference: one softmax over the visible cached keys and the new key
    for b in range(B):
        for n in range(N):
            keys = np.concatenate([ck[b, old_visible[b], n // (N // K)], k[b, :, n // (N // K)]])
            vals = np.concatenate([cv[b, old_visible[b], n // (N // K)], v[b, :, n // (N // K)]])
            w = np.exp(keys @ q[b, 0, n] / np.sqrt(H) - (keys @ q[b, 0, n] / np.sqrt(H)).max())
            np.testing.assert_allclose(fused[b, 0, n], (w / w.sum()) @ vals, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mask_kind", ["causal", "lengths", "dense"])
@pytest.mark.parametrize("multiple", [2, 8])
def test_self_attention_time_padding_changes_nothing(mask_kind, multiple):
    """cuDNN's training kernels need an even length, so `self_attention` pads T at the end; the real rows of the
    output, and the gradients, equal those of the unpadded attention (checked on the XLA implementation)."""
    from rlhf_jax.models.transformer import _segment_mask, self_attention
    rng = np.random.default_rng(1)
    B, T, N, K, H = 3, 7, 4, 2, 8
    q = jnp.asarray(rng.normal(size=(B, T, N, H)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(B, T, K, H)), jnp.float32) for _ in range(2))
    lengths = jnp.array([7, 4, 1], jnp.int32)
    segments = jnp.array([[1, 1, 1, 2, 2, 2, 2], [1, 1, 1, 1, 0, 0, 0], [1, 2, 3, 0, 0, 0, 0]], jnp.int32)
    mask = {"causal": None, "lengths": lengths, "dense": _segment_mask(segments)}[mask_kind]
    real = np.ones((B, T), bool) if mask_kind == "causal" else np.asarray(
        (jnp.arange(T)[None] < lengths[:, None]) if mask_kind == "lengths" else segments > 0)

    def attend(q, k, v, m):
        out = self_attention(q, k, v, mask, implementation="xla", time_multiple=m)
        return out, jnp.sum(jnp.where(real[..., None, None], out, 0.0) ** 2)

    out_pad, loss_pad = attend(q, k, v, multiple)
    out_ref, loss_ref = attend(q, k, v, 1)
    assert out_pad.shape == out_ref.shape == (B, T, N, H)
    np.testing.assert_allclose(np.asarray(out_pad)[real], np.asarray(out_ref)[real], rtol=1e-6, atol=1e-6)
    g_pad = jax.grad(lambda *a: attend(*a, multiple)[1], argnums=(0, 1, 2))(q, k, v)
    g_ref = jax.grad(lambda *a: attend(*a, 1)[1], argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g_pad, g_ref):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def _dot_operand_dtypes(jaxpr):
    """Operand dtypes of every dot_general in a (closed) jaxpr, sub-jaxprs (custom_vjp, pjit) included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.append(tuple(str(v.aval.dtype) for v in eqn.invars))
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            found += _dot_operand_dtypes(sub)
    return found


def test_head_matmul_backward_runs_in_the_operand_dtype():
    """The LM head's backward matmuls take 16-bit operands (a plain einsum with a float32 output would give them a
    float32 cotangent: float32 products of the largest matrices); the values match a float32 reference."""
    from rlhf_jax.models.head import head_matmul
    rng = np.random.default_rng(0)
    x32 = jnp.asarray(rng.normal(size=(2, 5, 16)), jnp.float32)
    w32 = jnp.asarray(rng.normal(size=(16, 24)) * 0.2, jnp.float32)
    t = jnp.asarray(rng.integers(0, 24, (2, 5)))

    def loss(x, w, mm):
        return -jnp.sum(token_logprobs(mm(x, w), t))

    def plain(x, w):
        return jnp.einsum("...d,dv->...v", x, w, preferred_element_type=jnp.float32)

    x16, w16 = x32.astype(jnp.bfloat16), w32.astype(jnp.bfloat16)
    grad = jax.grad(loss, argnums=(0, 1))
    dots = _dot_operand_dtypes(jax.make_jaxpr(lambda x, w: grad(x, w, head_matmul))(x16, w16).jaxpr)
    assert len(dots) == 3 and all(d == ("bfloat16", "bfloat16") for d in dots), dots
    plain_dots = _dot_operand_dtypes(jax.make_jaxpr(lambda x, w: grad(x, w, plain))(x16, w16).jaxpr)
    assert any("float32" in d for d in plain_dots), plain_dots   # what head_matmul avoids
    assert head_matmul(x16, w16).dtype == jnp.float32
    # float32 operands: exactly the plain einsum's gradient; bfloat16: within bfloat16 rounding of it
    for a, b in zip(grad(x32, w32, head_matmul), grad(x32, w32, plain)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    for a, b in zip(grad(x16, w16, head_matmul), grad(x32, w32, plain)):
        assert a.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(a, np.float32), b, rtol=0.05, atol=0.03)


def test_max_and_argmax_one_pass_equals_jnp():
    from rlhf_jax.models.head import _max_and_argmax
    rng = np.random.default_rng(3)
    x = rng.integers(-3, 3, (4, 6, 11)).astype(np.float32)    # many ties: the first index must win
    x[0, 0] = -np.inf
    m, a = _max_and_argmax(jnp.asarray(x))
    np.testing.assert_array_equal(m, x.max(-1))
    np.testing.assert_array_equal(a, x.argmax(-1))


def test_fused_head_gradient_equals_autodiff_of_plain_logprobs():
    """The full-logits head's hand-written backward (one pass: g * (onehot - softmax), in the compute dtype) equals
    automatic differentiation of log_softmax(h @ w)[target], for any cotangent; bf16 within bf16 rounding."""
    rng = np.random.default_rng(4)
    h = jnp.asarray(rng.standard_normal((2, 5, 16)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((16, 130)) * 0.3, jnp.float32)     # V = 130: padded to 256 columns
    y = jnp.asarray(rng.integers(0, 130, (2, 5)))
    g = jnp.asarray(rng.standard_normal((2, 5)), jnp.float32)

    def plain(h, w):
        z = jnp.einsum("btd,dv->btv", h.astype(jnp.float32), w.astype(jnp.float32))
        return jnp.sum(g * (jnp.take_along_axis(jax.nn.log_softmax(z), y[..., None], -1)[..., 0]))

    def fused(h, w):
        return jnp.sum(g * token_logprobs_from_hidden(h, w, y, chunk_size=None))

    np.testing.assert_allclose(fused(h, w), plain(h, w), rtol=1e-6)
    for a, b in zip(jax.grad(fused, (0, 1))(h, w), jax.grad(plain, (0, 1))(h, w)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    h16, w16 = h.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    for a, b in zip(jax.grad(fused, (0, 1))(h16, w16), jax.grad(plain, (0, 1))(h16, w16)):
        assert a.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=0.05, atol=0.02)
