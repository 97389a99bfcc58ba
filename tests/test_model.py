"""Transformer tests: param contract, a numpy re-derivation of the forward pass, masking, GQA, remat."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.models import (count_params, forward, forward_hidden, init_params, lm_logits,
                             param_logical_axes, scalar_forward)

from _tiny_models import CONFIGS, GPT, LLAMA, _tokens, params  # noqa: F401 (params is a fixture)


def _perturbed(params, seed=3):
    """Random norm scales/biases too, so that a missing bias or scale would show (numpy: no compile)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(x + 0.05 * rng.standard_normal(x.shape), x.dtype), params)


# ------------------------------------------------------------------------------- numpy reference forward
def _np_forward(p, tokens, cfg, positions):
    p = jax.tree.map(lambda x: np.asarray(x, np.float64), p)
    B, T = tokens.shape
    N, K, H = cfg.num_heads, cfg.kv_heads, cfg.head_size

    def norm(x, q):
        if cfg.norm == "layernorm":
            x = x - x.mean(-1, keepdims=True)
        y = x / np.sqrt((x * x).mean(-1, keepdims=True) + cfg.norm_eps) * q["scale"]
        return y + q["bias"] if "bias" in q else y

    def lin(x, q, eq):
        y = np.einsum(eq, x, q["kernel"])
        return y + q["bias"] if "bias" in q else y

    def rope(x):  # x [B,T,n,H]; pairs (i, i + H/2)
        inv = cfg.rope_theta ** (-np.arange(0, H, 2) / H)
        ang = positions[:, :, None, None] * np.concatenate([inv, inv])
        rot = np.concatenate([-x[..., H // 2:], x[..., :H // 2]], -1)
        return x * np.cos(ang) + rot * np.sin(ang)

    x = p["embed"]["embedding"][tokens]
    if cfg.positional == "learned":
        x = x + p["pos_embed"]["embedding"][positions]
    for layer in range(cfg.num_layers):
        q_l = jax.tree.map(lambda a: a[layer], p["layers"])
        h = norm(x, q_l["attn_norm"])
        q, k, v = (lin(h, q_l["attn"][n], "btd,dnh->btnh") for n in "qkv")
        if cfg.positional == "rope":
            q, k = rope(q), rope(k)
        k, v = np.repeat(k, N // K, axis=2), np.repeat(v, N // K, axis=2)
        s = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(H) + np.where(np.tril(np.ones((T, T))), 0, -np.inf)
        a = np.exp(s - s.max(-1, keepdims=True))
        a = a / a.sum(-1, keepdims=True)
        x = x + lin(np.einsum("bnts,bsnh->btnh", a, v), q_l["attn"]["o"], "btnh,nhd->btd")
        h = norm(x, q_l["mlp_norm"])
        if cfg.mlp == "swiglu":
            g = lin(h, q_l["mlp"]["gate"], "btd,df->btf")
            m = g / (1 + np.exp(-g)) * lin(h, q_l["mlp"]["up"], "btd,df->btf")
        else:
            u = lin(h, q_l["mlp"]["up"], "btd,df->btf")
            m = 0.5 * u * (1 + np.tanh(np.sqrt(2 / np.pi) * (u + 0.044715 * u ** 3)))
        x = x + lin(m, q_l["mlp"]["down"], "btf,fd->btd")
    h = norm(x, p["final_norm"])
    head = p["embed"]["embedding"].T if cfg.tie_embeddings else p["lm_head"]["kernel"]
    return h @ head, h @ p["score_head"]["kernel"][:, 0] + p["score_head"]["bias"][0]


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_matches_numpy_reference(params, name):
    cfg, p = CONFIGS[name], _perturbed(params[name])
    tokens = _tokens(2, 7)
    positions = np.array([np.arange(7), np.arange(3, 10)])
    ref_logits, ref_score = _np_forward(p, np.asarray(tokens), cfg, positions)
    np.testing.assert_allclose(forward(p, tokens, config=cfg, positions=positions), ref_logits, atol=2e-5)
    np.testing.assert_allclose(scalar_forward(p, tokens, config=cfg, positions=positions), ref_score, atol=2e-5)


def test_param_tree_contract():
    def shapes(cfg, **kw):
        return jax.tree.map(lambda x: x.shape, jax.eval_shape(lambda: init_params(cfg, jax.random.key(0), **kw)))

    L, D, N, H, F, V, S = 2, 32, 4, 8, 64, 61, 32
    ln = {"scale": (L, D), "bias": (L, D)}
    expected = {
        "embed": {"embedding": (V, D)}, "pos_embed": {"embedding": (S, D)},
        "layers": {"attn_norm": ln, "mlp_norm": ln,
                   "attn": {"q": {"kernel": (L, D, N, H), "bias": (L, N, H)},
                            "k": {"kernel": (L, D, N, H), "bias": (L, N, H)},
                            "v": {"kernel": (L, D, N, H), "bias": (L, N, H)},
                            "o": {"kernel": (L, N, H, D), "bias": (L, D)}},
                   "mlp": {"up": {"kernel": (L, D, F), "bias": (L, F)}, "down": {"kernel": (L, F, D), "bias": (L, D)}}},
        "final_norm": {"scale": (D,), "bias": (D,)}}
    assert shapes(GPT) == expected
    K, F = 2, 48
    expected = {
        "embed": {"embedding": (V, D)}, "lm_head": {"kernel": (D, V)},
        "layers": {"attn_norm": {"scale": (L, D)}, "mlp_norm": {"scale": (L, D)},
                   "attn": {"q": {"kernel": (L, D, N, H), "bias": (L, N, H)},
                            "k": {"kernel": (L, D, K, H), "bias": (L, K, H)},
                            "v": {"kernel": (L, D, K, H), "bias": (L, K, H)}, "o": {"kernel": (L, N, H, D)}},
                   "mlp": {"gate": {"kernel": (L, D, F)}, "up": {"kernel": (L, D, F)}, "down": {"kernel": (L, F, D)}}},
        "final_norm": {"scale": (D,)},
        "score_head": {"kernel": (D, 1), "bias": (1,)}}
    assert shapes(LLAMA, scalar_head=True) == expected

    for cfg in (GPT, LLAMA):
        axes = param_logical_axes(cfg, scalar_head=True)
        is_axes = lambda t: isinstance(t, tuple)  # noqa: E731
        shaped = shapes(cfg, scalar_head=True)
        assert jax.tree.structure(axes, is_leaf=is_axes) == jax.tree.structure(shaped, is_leaf=is_axes)
        for ax, shape in zip(jax.tree.leaves(axes, is_leaf=is_axes), jax.tree.leaves(shaped, is_leaf=is_axes)):
            assert len(ax) == len(shape)
        assert axes["layers"]["attn"]["k"]["kernel"] == ("layers", "embed", "kv_heads", "head_dim")
        assert axes["embed"]["embedding"] == ("vocab", "embed")


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_shapes_dtypes_bf16(params, name):
    cfg = CONFIGS[name].replace(dtype="bfloat16")
    p, tokens = params[name], _tokens(2, 9)
    hidden = forward_hidden(p, tokens, config=cfg)
    assert hidden.shape == (2, 9, 32) and hidden.dtype == jnp.bfloat16
    logits = lm_logits(p, hidden, config=cfg)
    assert logits.shape == (2, 9, 61) and logits.dtype == jnp.float32
    ref = forward(p, tokens, config=CONFIGS[name])
    np.testing.assert_allclose(logits, ref, atol=0.1)  # bf16 is close to f32, not equal
    assert scalar_forward(p, tokens, config=cfg).dtype == jnp.float32
    assert count_params(p) == sum(np.prod(x.shape) for x in jax.tree.leaves(p))


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_causal(params, name):
    cfg, p = CONFIGS[name], params[name]
    a = _tokens(2, 9)
    b = a.at[:, 5].set((a[:, 5] + 1) % 61)
    la, lb = forward(p, a, config=cfg), forward(p, b, config=cfg)
    np.testing.assert_allclose(la[:, :5], lb[:, :5], atol=1e-6)
    assert not np.allclose(la[:, 5:], lb[:, 5:], atol=1e-3)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_segment_packing(params, name):
    cfg, p = CONFIGS[name], params[name]
    a, b, junk = _tokens(1, 3, seed=1), _tokens(1, 4, seed=2), _tokens(1, 9, seed=3)
    packed = jnp.concatenate([jnp.concatenate([a, b, junk[:, :2]], 1), jnp.concatenate([b, a, junk[:, :2]], 1)])
    segments = jnp.array([[1, 1, 1, 2, 2, 2, 2, 0, 0], [1, 1, 1, 1, 2, 2, 2, 3, 3]])
    positions = jnp.array([[0, 1, 2, 0, 1, 2, 3, 0, 0], [0, 1, 2, 3, 0, 1, 2, 0, 1]])
    logits = forward(p, packed, config=cfg, positions=positions, segment_ids=segments)
    assert np.isfinite(np.asarray(logits)).all()  # padding rows attend to themselves only: no NaN
    # each segment alone from position 0 (followed by junk, which causality makes irrelevant)
    alone = forward(p, jnp.concatenate([jnp.concatenate([a, junk[:, 3:]], 1), jnp.concatenate([b, junk[:, 4:]], 1)]),
                    config=cfg)
    for row, start, ref, n in [(0, 0, 0, 3), (0, 3, 1, 4), (1, 0, 1, 4), (1, 4, 0, 3)]:
        np.testing.assert_allclose(logits[row, start:start + n], alone[ref, :n], atol=1e-5)


def test_gqa_equals_mha_with_repeated_kv_heads(params):
    p = params["llama"]
    mha_cfg = LLAMA.replace(num_kv_heads=4)
    mha = jax.tree.map(lambda x: x, p)
    for n in "kv":  # head n of MHA uses kv head n // (N / K)
        mha["layers"]["attn"][n] = {"kernel": jnp.repeat(p["layers"]["attn"][n]["kernel"], 2, axis=2),
                                    "bias": jnp.repeat(p["layers"]["attn"][n]["bias"], 2, axis=1)}
    tokens = _tokens(2, 6)
    np.testing.assert_allclose(forward(p, tokens, config=LLAMA), forward(mha, tokens, config=mha_cfg), atol=1e-5)


@pytest.mark.parametrize("name,remat", [("gpt2", "dots"), ("llama", "full")])
def test_remat_same_loss_and_grads(params, name, remat):
    tokens = _tokens(2, 6)
    w = jax.random.normal(jax.random.key(4), (2, 6, 61))

    def loss_and_grads(remat):
        cfg = CONFIGS[name].replace(remat=remat)
        return jax.jit(jax.value_and_grad(lambda p: jnp.sum(forward(p, tokens, config=cfg) * w)))(params[name])

    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6),
                 loss_and_grads(remat), loss_and_grads("none"))


def test_errors_speak(params):
    with pytest.raises(ValueError, match="max_seq_len"):
        forward(params["gpt2"], jnp.zeros((1, 40), jnp.int32), config=GPT)
    with pytest.raises(ValueError, match="score_head"):
        no_head = {k: v for k, v in params["gpt2"].items() if k != "score_head"}
        scalar_forward(no_head, jnp.zeros((1, 4), jnp.int32), config=GPT)
