"""One decoder-only transformer for the GPT-2 and Llama (Qwen2, Mistral) families, in Flax Linen.

GPT-2 (Radford et al. 2019): learned positions, pre-LayerNorm, GELU MLP (tanh approximation, "gelu_new"),
biases everywhere, LM head tied to the token embedding. Llama (Touvron et al. 2023): rotary positions
(Su et al. 2021, "rotate-half" layout as in Hugging Face), RMSNorm (Zhang & Sennrich 2019), SwiGLU MLP
(Shazeer 2020), grouped-query attention (Ainslie et al. 2023), optional q/k/v biases (Qwen2).
`ModelConfig` picks the variant; the parameter tree is the same for both apart from optional leaves.

Layers are stacked with `nn.scan` (every layer parameter has a leading L axis) and optionally rematerialised
with `nn.remat`. Attention is `jax.nn.dot_product_attention` (cuDNN flash attention on GPU when it can).
The same `Block` serves training (whole sequences, causal or segment-packed) and cached decoding
(`forward_cached`: new keys/values are written into a preallocated [L,B,S,K,H] cache at `index`).

Shapes: B batch, T time, S cache length, D model width, F MLP width, N heads, K kv heads, H head dim,
V vocab, L layers.
"""
from __future__ import annotations

import functools
import math

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from rlhf_jax.models.config import ModelConfig

_normal = nn.initializers.normal


class _Dense(nn.Module):
    """y = x W (+ b): contracts the trailing `n_in` axes of x with the leading `n_in` axes of W."""

    config: ModelConfig
    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    n_in: int = 1
    use_bias: bool = False
    std: float = 0.02
    f32_out: bool = False

    @nn.compact
    def __call__(self, x):
        cfg, n_in = self.config, self.n_in
        w = self.param("kernel", nn.with_logical_partitioning(_normal(self.std), self.axes), self.shape,
                       cfg.params_dtype)
        contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
        y = lax.dot_general(x.astype(cfg.compute_dtype), w.astype(cfg.compute_dtype), (contract, ((), ())),
                            preferred_element_type=jnp.float32 if self.f32_out else None)
        if self.use_bias:
            b = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, self.axes[n_in:]),
                           self.shape[n_in:], cfg.params_dtype)
            y = y + b.astype(cfg.compute_dtype)
        return y


class _Norm(nn.Module):
    """LayerNorm (scale and bias) or RMSNorm (scale only), computed in float32."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        D = x.shape[-1]
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)), (D,),
                           cfg.params_dtype)
        xf = x.astype(jnp.float32)
        if cfg.norm == "layernorm":
            xf = xf - xf.mean(-1, keepdims=True)
        y = xf * lax.rsqrt(jnp.mean(xf * xf, -1, keepdims=True) + cfg.norm_eps) * scale.astype(jnp.float32)
        if cfg.norm == "layernorm":
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)), (D,),
                              cfg.params_dtype)
            y = y + bias.astype(jnp.float32)
        return y.astype(cfg.compute_dtype)


class _Embed(nn.Module):
    config: ModelConfig
    shape: tuple[int, int]
    axes: tuple[str | None, ...]
    std: float

    @nn.compact
    def __call__(self, ids):
        table = self.param("embedding", nn.with_logical_partitioning(_normal(self.std), self.axes), self.shape,
                           self.config.params_dtype)
        return jnp.take(table, ids, axis=0).astype(self.config.compute_dtype)


def apply_rope(x, positions, theta: float):
    """Rotary embedding, rotate-half layout: x [B,T,N,H], positions [B,T] -> [B,T,N,H].

    out = x cos(p w) + rotate_half(x) sin(p w), w_i = theta^(-2i/H), with the frequency vector repeated twice
    (pairs are (i, i + H/2), as in Hugging Face Llama).
    """
    H = x.shape[-1]
    inv_freq = 1.0 / theta ** (jnp.arange(0, H, 2, dtype=jnp.float32) / H)            # [H/2]
    angles = positions.astype(jnp.float32)[..., None] * inv_freq                      # [B,T,H/2]
    angles = jnp.concatenate([angles, angles], -1)[:, :, None, :]                     # [B,T,1,H]
    xf = x.astype(jnp.float32)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], -1)
    return (xf * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x.dtype)


class Attention(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x, positions, mask, cache, index):
        """x [B,T,D]; mask [B,1,T,S] bool or None (plain causal); cache None or (k, v) [B,S,K,H]."""
        cfg = self.config
        D, N, K, H = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.head_size
        dense = functools.partial(_Dense, cfg)
        q = dense((D, N, H), ("embed", "heads", "head_dim"), use_bias=cfg.qkv_bias, name="q")(x)
        k = dense((D, K, H), ("embed", "kv_heads", "head_dim"), use_bias=cfg.qkv_bias, name="k")(x)
        v = dense((D, K, H), ("embed", "kv_heads", "head_dim"), use_bias=cfg.qkv_bias, name="v")(x)
        if cfg.positional == "rope":
            q, k = apply_rope(q, positions, cfg.rope_theta), apply_rope(k, positions, cfg.rope_theta)
        if cache is not None:
            ck, cv = cache
            k = lax.dynamic_update_slice(ck, k.astype(ck.dtype), (0, index, 0, 0))
            v = lax.dynamic_update_slice(cv, v.astype(cv.dtype), (0, index, 0, 0))
            cache = (k, v)
        out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=mask is None,
                                           implementation=cfg.attention_impl)      # [B,T,N,H]
        std = 0.02 / math.sqrt(2 * cfg.num_layers)                                 # GPT-2 residual scaling
        out = dense((N, H, D), ("heads", "head_dim", "embed"), n_in=2, use_bias=cfg.use_bias, std=std,
                    name="o")(out)
        return out, cache


class Mlp(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        D, F = cfg.d_model, cfg.mlp_dim
        dense = functools.partial(_Dense, cfg, use_bias=cfg.use_bias)
        up = dense((D, F), ("embed", "mlp"), name="up")(x)
        if cfg.mlp == "swiglu":
            h = nn.silu(dense((D, F), ("embed", "mlp"), name="gate")(x)) * up
        else:
            h = nn.gelu(up, approximate=True)
        return dense((F, D), ("mlp", "embed"), std=0.02 / math.sqrt(2 * cfg.num_layers), name="down")(h)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)). Signature fits `nn.scan`."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x, cache, positions, mask, index):
        cfg = self.config
        h, cache = Attention(cfg, name="attn")(_Norm(cfg, name="attn_norm")(x), positions, mask, cache, index)
        x = x + h
        x = x + Mlp(cfg, name="mlp")(_Norm(cfg, name="mlp_norm")(x))
        return x, cache


def _stacked_blocks(cfg: ModelConfig):
    block = Block
    if cfg.remat != "none":
        policy = jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims if cfg.remat == "dots" else None
        block = nn.remat(Block, policy=policy, prevent_cse=False)
    return nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                   in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast), length=cfg.num_layers,
                   metadata_params={nn.PARTITION_NAME: "layers"})


class Transformer(nn.Module):
    config: ModelConfig
    scalar_head: bool = False

    def setup(self):
        cfg = self.config
        V, D = cfg.vocab_size, cfg.d_model
        self.embed = _Embed(cfg, (V, D), ("vocab", "embed"), 0.02)
        if cfg.positional == "learned":
            self.pos_embed = _Embed(cfg, (cfg.max_seq_len, D), (None, "embed"), 0.01)
        self.layers = _stacked_blocks(cfg)(cfg)
        self.final_norm = _Norm(cfg)
        if not cfg.tie_embeddings:
            self.lm_head = _Dense(cfg, (D, V), ("embed", "vocab"), f32_out=True)
        if self.scalar_head:
            self.score_head = _Dense(cfg, (D, 1), ("embed", None), use_bias=True, std=1 / math.sqrt(D + 1))

    def hidden(self, tokens, positions, mask, cache=None, index=None):
        """tokens [B,T] -> (hidden [B,T,D] after the final norm, updated (k, v) cache or None)."""
        x = self.embed(tokens)
        if self.config.positional == "learned":
            x = x + self.pos_embed(positions)
        x, cache = self.layers(x, cache, positions, mask, index)
        return self.final_norm(x), cache

    def logits(self, hidden):
        """hidden [B,T,D] -> float32 logits [B,T,V], accumulated in float32 without a second f32 copy."""
        cfg = self.config
        if not cfg.tie_embeddings:
            return self.lm_head(hidden)
        w = nn.meta.unbox(self.embed.variables["params"]["embedding"]).astype(cfg.compute_dtype)   # [V,D]
        return jnp.einsum("btd,vd->btv", hidden.astype(cfg.compute_dtype), w, preferred_element_type=jnp.float32)

    def score(self, hidden):
        return self.score_head(hidden)[..., 0].astype(jnp.float32)                   # [B,T]

    def __call__(self, tokens):
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        h, _ = self.hidden(tokens, positions, None)
        return (self.logits(h), self.score(h)) if self.scalar_head else self.logits(h)


@flax.struct.dataclass
class KVCache:
    """Preallocated keys and values for every layer: k, v [L,B,S,K,H] in the compute dtype."""

    k: jax.Array
    v: jax.Array


# ----------------------------------------------------------------------------------------------- public API
def _module(config, params):
    return Transformer(config, scalar_head="score_head" in params)


def _default_positions(tokens, positions):
    if positions is None:
        return jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    return positions


def _check_len(config, T):
    if config.positional == "learned" and T > config.max_seq_len:
        raise ValueError(f"sequence length {T} exceeds ModelConfig.max_seq_len={config.max_seq_len} "
                         "(the learned position table); use shorter sequences or a larger max_seq_len")


def _segment_mask(segment_ids):
    """[B,T] -> [B,1,T,T]: causal, same nonzero segment; every token also sees itself (no empty rows)."""
    T = segment_ids.shape[1]
    same = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids[:, :, None] > 0)
    causal = jnp.tril(jnp.ones((T, T), bool))
    return ((same & causal) | jnp.eye(T, dtype=bool))[:, None]


@functools.partial(jax.jit, static_argnames=("config", "scalar_head"))
def init_params(config: ModelConfig, rng, *, scalar_head: bool = False):
    """Random parameters (GPT-2 initialisation), a plain nested dict of arrays (see the module docstring)."""
    variables = Transformer(config, scalar_head=scalar_head).init(rng, jnp.zeros((1, 1), jnp.int32))
    return nn.meta.unbox(variables["params"])


def param_logical_axes(config: ModelConfig, *, scalar_head: bool = False):
    """The params tree with each leaf replaced by its tuple of logical axis names (e.g. ("layers", "embed"))."""
    boxed = jax.eval_shape(lambda: Transformer(config, scalar_head=scalar_head).init(
        jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))["params"]
    specs = nn.get_partition_spec(boxed)
    return jax.tree.map(lambda s: tuple(s), specs, is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))


@functools.partial(jax.jit, static_argnames=("config",))
def forward_hidden(params, tokens, *, config: ModelConfig, positions=None, segment_ids=None):
    """tokens [B,T] int -> hidden [B,T,D] (compute dtype, after the final norm).

    positions [B,T] default to arange(T). segment_ids [B,T]: 0 = padding, tokens attend causally within their own
    nonzero segment only; None means one causal sequence per row (cuDNN's fast `is_causal` path).
    """
    _check_len(config, tokens.shape[1])
    mask = None if segment_ids is None else _segment_mask(segment_ids)
    h, _ = _module(config, params).apply({"params": params}, tokens, _default_positions(tokens, positions), mask,
                                         method=Transformer.hidden)
    return h


@functools.partial(jax.jit, static_argnames=("config",))
def lm_logits(params, hidden, *, config: ModelConfig):
    """hidden [B,T,D] -> logits [B,T,V] float32 (tied embedding or lm_head)."""
    return _module(config, params).apply({"params": params}, hidden, method=Transformer.logits)


@functools.partial(jax.jit, static_argnames=("config",))
def forward(params, tokens, *, config: ModelConfig, positions=None, segment_ids=None):
    """tokens [B,T] -> logits [B,T,V] float32. See `forward_hidden` for positions and segment_ids."""
    h = forward_hidden(params, tokens, config=config, positions=positions, segment_ids=segment_ids)
    return lm_logits(params, h, config=config)


@functools.partial(jax.jit, static_argnames=("config",))
def scalar_forward(params, tokens, *, config: ModelConfig, positions=None, segment_ids=None):
    """tokens [B,T] -> scalar head output [B,T] float32 (needs `init_params(..., scalar_head=True)`)."""
    if "score_head" not in params:
        raise ValueError("scalar_forward needs params with a 'score_head'; create them with "
                         "init_params(config, rng, scalar_head=True) or add one to pretrained params")
    h = forward_hidden(params, tokens, config=config, positions=positions, segment_ids=segment_ids)
    return _module(config, params).apply({"params": params}, h, method=Transformer.score)


def init_cache(config: ModelConfig, batch: int, max_len: int) -> KVCache:
    """Zeroed KV cache, k and v [L,B,S,K,H] with S = max_len, in the compute dtype."""
    shape = (config.num_layers, batch, max_len, config.kv_heads, config.head_size)
    return KVCache(k=jnp.zeros(shape, config.compute_dtype), v=jnp.zeros(shape, config.compute_dtype))


@functools.partial(jax.jit, static_argnames=("config",))
def forward_cached(params, tokens, *, config: ModelConfig, cache: KVCache, positions, key_mask, index):
    """Decode step: tokens [B,T] go to cache slots [index, index+T) -> (logits [B,T,V] float32, new cache).

    Query t attends to slots s with key_mask[b, s] and s <= index + t (key_mask [B,S] must also mark the new
    slots as valid). positions [B,T] give the RoPE / learned positions (so left-padded prompts start at 0).
    `index` may be a traced scalar.
    """
    T, S = tokens.shape[1], cache.k.shape[2]
    slot, query_slot = jnp.arange(S), index + jnp.arange(T)
    visible = key_mask.astype(bool)[:, None, :] & (slot[None, None, :] <= query_slot[None, :, None])
    mask = (visible | (slot[None, None, :] == query_slot[None, :, None]))[:, None]   # [B,1,T,S]
    module = _module(config, params)
    h, (k, v) = module.apply({"params": params}, tokens, positions, mask, (cache.k, cache.v),
                             jnp.asarray(index, jnp.int32), method=Transformer.hidden)
    logits = module.apply({"params": params}, h, method=Transformer.logits)
    return logits, KVCache(k=k, v=v)


def count_params(params) -> int:
    """Total number of scalars in a params pytree."""
    return sum(int(x.size) for x in jax.tree.leaves(params))
