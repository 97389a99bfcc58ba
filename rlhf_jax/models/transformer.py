"""One decoder-only transformer for the GPT-2 and Llama (Qwen2, Mistral) families, in Flax Linen.

GPT-2 (Radford et al. 2019): learned positions, pre-LayerNorm, GELU MLP (tanh approximation, "gelu_new"),
biases everywhere, LM head tied to the token embedding. Llama (Touvron et al. 2023): rotary positions
(Su et al. 2021, "rotate-half" layout as in Hugging Face), RMSNorm (Zhang & Sennrich 2019), SwiGLU MLP
(Shazeer 2020), grouped-query attention (Ainslie et al. 2023), optional q/k/v biases (Qwen2).
`ModelConfig` picks the variant; the parameter tree is the same for both apart from optional leaves.
Later families switch on more of it, all off by default: q/k RMSNorm (Qwen3, Gemma 3 per head; OLMo 2 over the
projection; Dehghani et al. 2023), norms after the sublayers (OLMo 2) or on both sides (Gemma 2/3, Team Gemma
2024), Gemma's (1 + w) norm scales, sqrt(D) embedding scale and GeGLU, partial rotary (Phi-3), per-layer RoPE
on/off (SmolLM3), sliding-window attention on chosen layers with their own RoPE base (Beltagy et al. 2020;
Gemma), rotary scaling (`rope_frequencies`), and tanh soft-capping of attention and output logits (Gemma 2).
Per-layer choices inside the `nn.scan` read the layer index, which the scan carries as an input.

Layers are stacked with `nn.scan` (every layer parameter has a leading L axis), optionally unrolled
(`ModelConfig.scan_unroll`: same parameters, straight-line code) and rematerialised with `nn.remat`. Attention is `jax.nn.dot_product_attention`: cuDNN flash attention on GPU in bf16/fp16
(`attention_impl=None`), given `is_causal` plus `seq_lengths` for right-padded rows, or a dense mask for packed
or left-padded rows. The same `Block` serves training and cached decoding. `forward_cached` loops over the
layers in Python and reads each layer's cache slice only: attention is one softmax over the cached keys
(slots < index) and the T new keys, and the [L,B,T,K,H] new keys/values are written into the preallocated
[L,B,S,K,H] cache with one `dynamic_update_slice`, which XLA performs in place inside a decode `while_loop`
(a scan over layers would instead write a whole new cache every step). Layers with a sliding window W shorter
than the cache keep a ring of W slots instead (slot s in ring slot s % W; `init_cache`, `KVCache`), so their
memory is bounded by the window; global layers keep the full cache. `ModelConfig.decode_attention` and
`segment_attention` switch one-token decode steps and packed training rows to the Pallas kernels of
`models.kernels`.

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
from rlhf_jax.models.head import head_matmul
from rlhf_jax.models.kernels import decode_attention, decode_kernel_supported, segment_attention
from rlhf_jax.quant import dequantize_params

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
        if self.f32_out:   # float32 output, backward in the compute dtype (rlhf_jax.models.head)
            assert n_in == 1, "f32_out is for the LM head ([D, V] kernel)"
            y = head_matmul(x.astype(cfg.compute_dtype), w.astype(cfg.compute_dtype))
        else:
            contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
            y = lax.dot_general(x.astype(cfg.compute_dtype), w.astype(cfg.compute_dtype), (contract, ((), ())))
        if self.use_bias:
            b = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, self.axes[n_in:]),
                           self.shape[n_in:], cfg.params_dtype)
            y = y + b.astype(cfg.compute_dtype)
        return y


class _Norm(nn.Module):
    """LayerNorm (scale and bias) or RMSNorm (scale only), computed in float32 over the trailing len(axes) axes.

    RMSNorm multiplies by (norm_offset + scale), so Gemma's zero-centred scales (1 + w) need no conversion.
    """

    config: ModelConfig
    axes: tuple[str, ...] = ("embed",)

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        shape, red = x.shape[x.ndim - len(self.axes):], tuple(range(-len(self.axes), 0))
        init = nn.initializers.zeros if cfg.norm_offset else nn.initializers.ones
        scale = self.param("scale", nn.with_logical_partitioning(init, self.axes), shape, cfg.params_dtype)
        xf = x.astype(jnp.float32)
        if cfg.norm == "layernorm":
            xf = xf - xf.mean(red, keepdims=True)
        scale = scale.astype(jnp.float32) + cfg.norm_offset if cfg.norm_offset else scale.astype(jnp.float32)
        y = xf * lax.rsqrt(jnp.mean(xf * xf, red, keepdims=True) + cfg.norm_eps) * scale
        if cfg.norm == "layernorm":
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, self.axes), shape,
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


def rope_frequencies(config: ModelConfig):
    """(inv_freq [R/2], attention factor, long inv_freq [R/2] or None) of `config.rope_type`, float32 numpy,
    computed as Hugging Face's `modeling_rope_utils` does (R = config.rotary_dim, w_i = theta^(-2i/R)):

      linear:   w_i / factor.
      llama3:   wavelength l_i = 2 pi / w_i; l_i < L/high kept, l_i > L/low divided by the factor, between them
                (1 - s) w_i / factor + s w_i with s = (L / l_i - low) / (high - low)   (L: original length).
      yarn:     w_i ((1 - e_i) / factor + e_i), e_i = 1 - ramp between the dims where a frequency turns
                beta_fast and beta_slow times over L; cos and sin times 0.1 ln(factor) + 1 (Peng et al. 2023).
      longrope: w_i / short_i, or w_i / long_i once a forward call's longest position reaches L; cos and sin
                times sqrt(1 + ln(max_seq_len / L) / ln L) (Ding et al. 2024).
    """
    import numpy as np

    c, R = config, config.rotary_dim
    exponent = np.arange(0, R, 2, dtype=np.int64).astype(np.float32) / np.float32(R)
    base = np.float32(c.rope_theta) ** exponent
    inv = (np.float32(1.0) / base).astype(np.float32)
    kind, factor, L = c.rope_type, c.rope_factor, c.rope_original_max_len
    if kind == "linear":
        return inv / np.float32(factor), 1.0, None
    if kind == "llama3":
        low, high = c.rope_low_freq_factor, c.rope_high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > L / low, inv / factor, inv)
        smooth = (L / wavelen - low) / (high - low)
        medium = ~(wavelen < L / high) & ~(wavelen > L / low)
        return np.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled).astype(np.float32), 1.0, None
    if kind == "yarn":
        def correction_dim(rotations):
            return R * math.log(L / (rotations * 2 * math.pi)) / (2 * math.log(c.rope_theta))
        lo, hi = max(math.floor(correction_dim(c.rope_beta_fast)), 0), min(math.ceil(correction_dim(c.rope_beta_slow)),
                                                                           R - 1)
        hi = hi + 0.001 if lo == hi else hi
        ramp = np.clip((np.arange(R // 2, dtype=np.float32) - lo) / (hi - lo), 0, 1)
        keep = 1 - ramp
        inv = (np.float32(1.0) / (np.float32(factor) * base)) * (1 - keep) + inv * keep
        attention = c.rope_attention_factor or (0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0)
        return inv.astype(np.float32), attention, None
    if kind == "longrope":
        scale = c.max_seq_len / L
        attention = c.rope_attention_factor or (math.sqrt(1 + math.log(scale) / math.log(L)) if scale > 1 else 1.0)
        short = np.float32(1.0) / (np.asarray(c.rope_short_factor, np.float32) * base)
        long = np.float32(1.0) / (np.asarray(c.rope_long_factor, np.float32) * base)
        return short.astype(np.float32), attention, long.astype(np.float32)
    return inv, 1.0, None


def apply_rope(x, positions, theta, *, rotary_dim: int | None = None, inv_freq=None, attention_factor=1.0):
    """Rotary embedding, rotate-half layout: x [B,T,N,H], positions [B,T] -> [B,T,N,H].

    out = x cos(p w) + rotate_half(x) sin(p w), w_i = theta^(-2i/R), with the frequency vector repeated twice
    (pairs are (i, i + R/2), as in Hugging Face Llama), over the first R = rotary_dim features (None: all H);
    features R.. pass through (partial rotary, as in Phi-3 and GPT-NeoX). theta may be a traced scalar. inv_freq
    [R/2] replaces theta's frequencies (a scaled RoPE, `rope_frequencies`); cos and sin are multiplied by
    attention_factor.
    """
    H = x.shape[-1]
    R = rotary_dim or H
    if inv_freq is None:
        inv_freq = 1.0 / theta ** (jnp.arange(0, R, 2, dtype=jnp.float32) / R)        # [R/2]
    angles = positions.astype(jnp.float32)[..., None] * inv_freq                      # [B,T,R/2]
    angles = jnp.concatenate([angles, angles], -1)[:, :, None, :]                     # [B,T,1,R]
    xf = x.astype(jnp.float32)
    xr, rest = xf[..., :R], xf[..., R:]
    x1, x2 = jnp.split(xr, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], -1)
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    if attention_factor is not None and not (isinstance(attention_factor, float) and attention_factor == 1.0):
        cos, sin = cos * attention_factor, sin * attention_factor
    out = xr * cos + rotated * sin
    return (out if R == H else jnp.concatenate([out, rest], -1)).astype(x.dtype)


def attention_impl(config: ModelConfig) -> str:
    """The `jax.nn.dot_product_attention` implementation: `config.attention_impl`, or for None cuDNN on GPU
    with a 16-bit compute dtype (what cuDNN flash attention supports) and XLA otherwise."""
    if config.attention_impl is not None:
        return config.attention_impl
    sixteen_bit = config.compute_dtype in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    return "cudnn" if sixteen_bit and jax.default_backend() == "gpu" else "xla"


def decode_attention_impl(config: ModelConfig) -> str:
    """"pallas" or "reference" for one-token decode steps: `config.decode_attention` (None: the reference softmax
    until the kernel has been compiled and timed on a GPU; "pallas" where `kernels.decode_kernel_supported`). The
    kernel is a custom call, which XLA's partitioner does not split: over several devices it would gather the whole
    cache onto each, so "pallas" is refused on more than one device."""
    if config.decode_attention != "pallas":
        return "reference"
    if not decode_kernel_supported(config.num_heads, config.kv_heads, config.head_size):
        raise ValueError(f"ModelConfig.decode_attention='pallas': the flash-decoding kernel needs a power-of-two "
                         f"head dim and query-per-kv-head group (head_dim {config.head_size}, "
                         f"{config.num_heads // config.kv_heads} queries per kv head); use 'reference'")
    if jax.device_count() > 1 and jax.default_backend() == "gpu":
        raise ValueError("ModelConfig.decode_attention='pallas' runs on one device (XLA does not partition a "
                         "Pallas call); use 'reference' on a mesh")
    return "pallas"


def segment_attention_impl(config: ModelConfig) -> str:
    """"pallas" or "dense" for training rows given segment_ids: `config.segment_attention` (None: dense), dense
    whenever a sliding window or attention soft-capping needs the mask."""
    if config.sliding_window is not None or config.attn_softcap is not None:
        return "dense"
    return config.segment_attention or "dense"


def cached_attention(q, k, v, cache_k, cache_v, old_visible, new_visible, *, fused_reads: bool | None = None,
                     scale: float | None = None, softcap: float | None = None, kernel: bool = False,
                     layer: int | None = None):
    """One softmax over cached keys and new keys, without writing the new keys into the cache first.

    q [B,T,N,H]; k, v [B,T,K,H] (the T new tokens); cache_k, cache_v [B,S,K,H] (read only);
    old_visible [B,S] bool (cached slot s is seen by every query) or [B,T,S] (per query: a sliding window);
    new_visible [B,T,T] bool (query t sees new key t'). cache_k None: attend to the new keys only (a prefill).
    scale: logit scale (None: 1/sqrt(H)); softcap c: logits become c * tanh(logits / c) (Gemma 2). Returns
    [B,T,N,H]. For T == 1 on GPU the
    scores are multiply-reduces, which XLA fuses into a single read of the cache (a batched matmul would first
    copy the [B,S,K,H] cache into a [B,K,S,H] layout); on CPU that fusion is 10-20x slower than the batched
    matmul (measured at B=256, S=92: 37 ms against 2.4 ms per layer), so other backends use einsums.
    `fused_reads` forces one form (None: multiply-reduces for T == 1 on GPU, einsums otherwise). kernel: for
    T == 1 with a cache, the flash-decoding kernel `kernels.decode_attention` instead (same values); it may be
    given the stacked [L,B,S',K,H] cache and this `layer` (it reads slots < S of that layer, no slice copied).
    """
    B, T, N, H = q.shape
    if kernel and T == 1 and cache_k is not None:
        return decode_attention(q, k, v, cache_k, cache_v, old_visible, new_visible, scale=scale, softcap=softcap,
                                layer=layer if cache_k.ndim == 5 else None)
    K = k.shape[2]
    f32 = jnp.float32
    qg = q.reshape(B, T, K, N // K, H).astype(f32) * (scale or 1.0 / math.sqrt(H))      # [B,T,K,G,H]
    neg = jnp.finfo(f32).min
    cap = (lambda s: softcap * jnp.tanh(s / softcap)) if softcap else (lambda s: s)
    new = cap(jnp.einsum("btkgh,bukh->btkgu", qg.astype(q.dtype), k, preferred_element_type=f32))  # [B,T,K,G,T]
    new = jnp.where(new_visible[:, :, None, None, :], new, neg)
    if cache_k is None:
        p_new = jax.nn.softmax(new, axis=-1).astype(q.dtype)
        out = jnp.einsum("btkgu,bukh->btkgh", p_new, v, preferred_element_type=f32)
        return out.reshape(B, T, N, H).astype(q.dtype)
    if fused_reads is None:
        fused_reads = jax.default_backend() == "gpu"
    fused_reads = fused_reads and T == 1
    if fused_reads:
        old = jnp.sum(qg[:, :, None] * cache_k[:, None, :, :, None, :].astype(f32), -1)   # [B,T,S,K,G]
        old = jnp.moveaxis(old, 2, -1)                                                    # [B,T,K,G,S]
    else:
        old = jnp.einsum("btkgh,bskh->btkgs", qg.astype(q.dtype), cache_k, preferred_element_type=f32)
    old_visible = old_visible[:, :, None, None, :] if old_visible.ndim == 3 else old_visible[:, None, None, None, :]
    old = jnp.where(old_visible, cap(old), neg)
    m = jnp.maximum(old.max(-1, keepdims=True), new.max(-1, keepdims=True))
    p_old, p_new = jnp.exp(old - m), jnp.exp(new - m)
    denom = p_old.sum(-1, keepdims=True) + p_new.sum(-1, keepdims=True)
    p_old, p_new = p_old / denom, p_new / denom
    if fused_reads:
        out = jnp.sum(jnp.moveaxis(p_old, -1, 2)[..., None] * cache_v[:, None, :, :, None, :].astype(f32), 2)
    else:
        out = jnp.einsum("btkgs,bskh->btkgh", p_old.astype(q.dtype), cache_v, preferred_element_type=f32)
    out = out + jnp.einsum("btkgu,bukh->btkgh", p_new.astype(q.dtype), v, preferred_element_type=f32)
    return out.reshape(B, T, N, H).astype(q.dtype)


def self_attention(q, k, v, mask, *, implementation: str, time_multiple: int | None = None,
                   scale: float | None = None):
    """Causal self-attention through `jax.nn.dot_product_attention`: q [B,T,N,H], k, v [B,T,K,H] -> [B,T,N,H].

    mask: None (plain causal), [B] int32 lengths (right-padded rows: `is_causal` + sequence lengths, cuDNN's flash
    path), or a [B,1,T,T] bool mask. cuDNN's training kernels need an even T (seen on an H100 with cuDNN 9:
    "Unsupported sequence length Q 513"), so T is padded at the end to a multiple of `time_multiple` (None: 2 for
    cuDNN, 1 otherwise). A padded key comes after every real query, so causality hides it; a padded query sees
    itself only; the padded rows are dropped from the output. scale: logit scale (None: 1/sqrt(H)).
    """
    T = q.shape[1]
    multiple = time_multiple or (2 if implementation == "cudnn" else 1)
    pad = -T % multiple
    if pad:
        q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
        if mask is not None and mask.ndim == 4:
            eye = jnp.eye(T + pad, dtype=bool)[None, None]
            mask = jnp.pad(mask, ((0, 0), (0, 0), (0, pad), (0, pad))) | (eye & (jnp.arange(T + pad) >= T))
    if mask is not None and mask.ndim == 1:
        out = jax.nn.dot_product_attention(q, k, v, is_causal=True, query_seq_lengths=mask,
                                           key_value_seq_lengths=mask, implementation=implementation, scale=scale)
    else:
        out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=mask is None, implementation=implementation,
                                           scale=scale)
    return out[:, :T]


def layer_flag(flags: tuple[bool, ...], layer):
    """flags[layer] for a Python int layer (cached decoding) or a traced one (inside `nn.scan`); a Python bool
    whenever every layer agrees, so uniform models trace no per-layer select."""
    if isinstance(layer, int) or len(set(flags)) == 1:
        return flags[layer if isinstance(layer, int) else 0]
    return jnp.asarray(flags)[layer]


def dense_mask(mask, T: int):
    """A training mask (None: causal; [B] lengths: causal over the first lengths[b] tokens, every token seeing
    itself; [B,T] int segment ids, see `forward_hidden`; [B,1,T,T] bool) as a [B or 1,1,T,T] bool mask."""
    causal = jnp.tril(jnp.ones((T, T), bool))
    if mask is not None and mask.ndim == 2:
        return _segment_mask(mask)
    if mask is None:
        return causal[None, None]
    if mask.ndim == 1:
        valid = jnp.arange(T)[None, :] < mask[:, None]                                    # [B,T]
        return ((causal & valid[:, None, :] & valid[:, :, None]) | jnp.eye(T, dtype=bool))[:, None]
    return mask


def window_mask(T: int, window: int, offset=0, S: int | None = None):
    """[T, S] bool: query t (at slot offset + t) sees key slot s only if offset + t - s < window (Hugging Face's
    sliding window: the query and the window - 1 keys before it); S defaults to T. offset may be traced."""
    q = offset + jnp.arange(T)[:, None]
    return q - jnp.arange(T if S is None else S)[None, :] < window


class Attention(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x, positions, mask, cache, layer=0):
        """x [B,T,D] -> (out [B,T,D], new (k, v) [B,T,K,H] if cache else None).

        mask: None (plain causal), [B] int32 lengths (one right-padded example per row: causal + padding,
        cuDNN's flash path), [B,T] int32 segment ids (`kernels.segment_attention`), or a [B,1,T,T] bool mask.
        With a cache (k, v) [B,S,K,H] (read only; the flash-decoding kernel is given a stacked [L',B,S',K,H]
        cache and this layer's index in it, (k, v, index), and reads that layer's slots < S), mask is the pair
        (old_visible [B,S] or [B,T,S], new_visible [B,T,T]) of `cached_attention`, with any sliding window already
        applied; cache (None, None) is a prefill. layer: this block's index (an int, or traced inside
        `nn.scan`), for per-layer RoPE and sliding windows.
        """
        cfg = self.config
        D, N, K, H = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.head_size
        T = x.shape[1]
        dense = functools.partial(_Dense, cfg)
        q = dense((D, N, H), ("embed", "heads", "head_dim"), use_bias=cfg.qkv_bias, name="q")(x)
        k = dense((D, K, H), ("embed", "kv_heads", "head_dim"), use_bias=cfg.qkv_bias, name="k")(x)
        v = dense((D, K, H), ("embed", "kv_heads", "head_dim"), use_bias=cfg.qkv_bias, name="v")(x)
        if cfg.qk_norm != "none":   # Qwen3 / Gemma 3: per head; OLMo 2: over the whole projection
            q_axes, k_axes = (("head_dim",), ("head_dim",)) if cfg.qk_norm == "head" else (
                ("heads", "head_dim"), ("kv_heads", "head_dim"))
            q = _Norm(cfg, q_axes, name="q_norm")(q)
            k = _Norm(cfg, k_axes, name="k_norm")(k)
        sliding = layer_flag(cfg.layer_flags("sliding_layers"), layer)
        if cfg.positional == "rope":
            theta, inv_freq, factor = cfg.rope_theta, None, 1.0
            if cfg.rope_type != "default":
                inv_freq, factor, long = rope_frequencies(cfg)
                if long is not None:   # Hugging Face: the long factors once the call's longest position passes L
                    inv_freq = jnp.where(jnp.max(positions) + 1 > cfg.rope_original_max_len, long, inv_freq)
            if cfg.rope_theta_sliding is not None:   # the sliding layers: plain RoPE with their own base
                if inv_freq is None:
                    theta = jnp.where(sliding, cfg.rope_theta_sliding, theta)
                else:
                    R = cfg.rotary_dim
                    local = 1.0 / cfg.rope_theta_sliding ** (jnp.arange(0, R, 2, dtype=jnp.float32) / R)
                    inv_freq = jnp.where(sliding, local, inv_freq)
                    factor = jnp.where(sliding, 1.0, factor)
            rotated = [apply_rope(a, positions, theta, rotary_dim=cfg.rotary_dim, inv_freq=inv_freq,
                                  attention_factor=factor) for a in (q, k)]
            use_rope = layer_flag(cfg.layer_flags("rope_layers"), layer)
            q, k = rotated if use_rope is True else (jnp.where(use_rope, r, a) for r, a in zip(rotated, (q, k)))
        scale = cfg.attn_scale
        if cache is not None:
            cache_k, cache_v, *slot = cache   # slot: this layer's index in a stacked cache given whole
            out = cached_attention(q, k, v, cache_k, cache_v, *mask, scale=scale, softcap=cfg.attn_softcap,
                                   kernel=decode_attention_impl(cfg) == "pallas", layer=slot[0] if slot else layer)
            cache = (k, v)
        elif mask is not None and mask.ndim == 2:   # [B,T] segment ids (`segment_attention_impl` is pallas)
            out = segment_attention(q, k, v, mask, scale=scale)
        else:
            if cfg.sliding_window is not None and sliding is not False:
                mask = dense_mask(mask, T) & (window_mask(T, cfg.sliding_window) | ~jnp.asarray(sliding))
            if cfg.attn_softcap is not None:   # not in jax.nn.dot_product_attention: the einsum softmax
                visible = jnp.broadcast_to(dense_mask(mask, T)[:, 0], (x.shape[0], T, T))
                out = cached_attention(q, k, v, None, None, None, visible, scale=scale, softcap=cfg.attn_softcap)
            else:
                out = self_attention(q, k, v, mask, implementation=attention_impl(cfg), scale=scale)  # [B,T,N,H]
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
        elif cfg.mlp == "geglu":
            h = nn.gelu(dense((D, F), ("embed", "mlp"), name="gate")(x), approximate=True) * up
        else:
            h = nn.gelu(up, approximate=True)
        return dense((F, D), ("mlp", "embed"), std=0.02 / math.sqrt(2 * cfg.num_layers), name="down")(h)


class Block(nn.Module):
    """Residual block: x + post(attn(pre(x))), then x + post(mlp(pre(x))), where pre is a norm when
    `config.pre_norm` (GPT-2, Llama) and post one when `config.post_norm` (OLMo 2: post only; Gemma 2/3: both).
    Signature fits `nn.scan`; layer is the block's index (scanned, or an int in cached decoding)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x, cache, positions, mask, layer=0):
        cfg = self.config

        def sublayer(f, name, y):
            y = _Norm(cfg, name=f"{name}_norm")(y) if cfg.pre_norm else y
            y, extra = f(y)
            return (_Norm(cfg, name=f"{name}_post_norm")(y) if cfg.post_norm else y), extra

        h, cache = sublayer(lambda y: Attention(cfg, name="attn")(y, positions, mask, cache, layer), "attn", x)
        x = x + h
        h, _ = sublayer(lambda y: (Mlp(cfg, name="mlp")(y), None), "mlp", x)
        return x + h, cache


def scan_unroll(config: ModelConfig) -> int:
    """Blocks per scan iteration: `config.scan_unroll`, or for None all layers on GPU/TPU and 1 on CPU."""
    unroll = config.scan_unroll
    if unroll is None:
        unroll = 1 if jax.default_backend() == "cpu" else config.num_layers
    return max(1, min(unroll, config.num_layers))


def _stacked_blocks(cfg: ModelConfig):
    # Each layer's params are unpacked inside the scan (`quant.dequantize_params`: an NF4 kernel dequantised, a
    # lazily merged LoRA kernel merged), so a QLoRA step holds one dequantised layer at a time; plain arrays pass
    # through untouched.
    block = nn.map_variables(Block, "params", trans_in_fn=dequantize_params, init=True)
    if cfg.remat != "none":
        policy = jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims if cfg.remat == "dots" else None
        block = nn.remat(block, policy=policy, prevent_cse=False)
    return nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                   in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0), length=cfg.num_layers,
                   unroll=scan_unroll(cfg),
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

    def embed_tokens(self, tokens, positions):
        """tokens [B,T] -> input embeddings [B,T,D] (token + learned position embeddings; Gemma: times sqrt(D),
        rounded to the compute dtype as Hugging Face does)."""
        x = self.embed(tokens)
        if self.config.embed_scale:
            x = x * jnp.asarray(math.sqrt(self.config.d_model), x.dtype)
        if self.config.positional == "learned":
            x = x + self.pos_embed(positions)
        return x

    def hidden(self, tokens, positions, mask):
        """tokens [B,T] -> hidden [B,T,D] after the final norm (mask: see `Attention`)."""
        layer_ids = jnp.arange(self.config.num_layers, dtype=jnp.int32)
        x, _ = self.layers(self.embed_tokens(tokens, positions), None, positions, mask, layer_ids)
        return self.final_norm(x)

    def normed(self, x):
        """x [B,T,D] -> final_norm(x)."""
        return self.final_norm(x)

    def logits(self, hidden):
        """hidden [B,T,D] -> float32 logits [B,T,V], accumulated in float32 without a second f32 copy."""
        cfg = self.config
        if not cfg.tie_embeddings:
            logits = self.lm_head(hidden)
        else:
            w = nn.meta.unbox(self.embed.variables["params"]["embedding"]).astype(cfg.compute_dtype)   # [V,D]
            logits = head_matmul(hidden.astype(cfg.compute_dtype), w.T)
        if cfg.final_softcap is not None:   # Gemma 2: c * tanh(logits / c)
            logits = cfg.final_softcap * jnp.tanh(logits / cfg.final_softcap)
        return logits

    def score(self, hidden):
        return self.score_head(hidden)[..., 0].astype(jnp.float32)                   # [B,T]

    def __call__(self, tokens):
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        h = self.hidden(tokens, positions, None)
        return (self.logits(h), self.score(h)) if self.scalar_head else self.logits(h)


@flax.struct.dataclass
class KVCache:
    """Preallocated keys and values in the compute dtype: k, v [L,B,S,K,H] for every layer, or, with a ring
    (`init_cache` for a sliding window W < S), k, v [Lg,B,S,K,H] for the Lg global layers and ring_k, ring_v
    [Lw,B,W,K,H] for the Lw windowed ones, each stack in layer order. Cache slot s of a windowed layer lives in
    ring slot s % W; after slots [0, index) are written, ring slot j holds the last s < index with s = j mod W
    (`ring_slots`), so a query at slot index + t, which sees s > index + t - W, finds every key it sees there."""

    k: jax.Array
    v: jax.Array
    ring_k: jax.Array | None = None
    ring_v: jax.Array | None = None


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
    # A rolled scan gives the same parameters as an unrolled one and compiles faster.
    variables = Transformer(config.replace(scan_unroll=1), scalar_head=scalar_head).init(
        rng, jnp.zeros((1, 1), jnp.int32))
    return nn.meta.unbox(variables["params"])


def param_logical_axes(config: ModelConfig, *, scalar_head: bool = False):
    """The params tree with each leaf replaced by its tuple of logical axis names (e.g. ("layers", "embed"))."""
    boxed = jax.eval_shape(lambda: Transformer(config.replace(scan_unroll=1), scalar_head=scalar_head).init(
        jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))["params"]
    specs = nn.get_partition_spec(boxed)
    return jax.tree.map(lambda s: tuple(s), specs, is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))


def _attention_mask(segment_ids, seq_lengths, config):
    if seq_lengths is not None:
        if segment_ids is not None:
            raise ValueError("forward: pass segment_ids (packed or left-padded rows) or seq_lengths (one "
                             "right-padded example per row), not both")
        return jnp.asarray(seq_lengths).astype(jnp.int32)
    if segment_ids is not None and segment_attention_impl(config) == "pallas":
        return jnp.asarray(segment_ids).astype(jnp.int32)                    # [B,T] for kernels.segment_attention
    return None if segment_ids is None else _segment_mask(segment_ids)


@functools.partial(jax.jit, static_argnames=("config",))
def forward_hidden(params, tokens, *, config: ModelConfig, positions=None, segment_ids=None, seq_lengths=None):
    """tokens [B,T] int -> hidden [B,T,D] (compute dtype, after the final norm).

    positions [B,T] default to arange(T). segment_ids [B,T]: 0 = padding, tokens attend causally within their own
    nonzero segment only (a dense [B,1,T,T] mask, or [B,T] ids for `segment_attention_impl` "pallas").
    seq_lengths [B] int: one right-padded example per row, its first seq_lengths[b] tokens real; the same
    attention as segment_ids = (t < seq_lengths) on those tokens, but through `is_causal` + sequence lengths
    (cuDNN flash attention, no T x T mask); outputs at padding positions are finite but unspecified. Neither: one
    causal sequence per row.
    """
    _check_len(config, tokens.shape[1])
    mask = _attention_mask(segment_ids, seq_lengths, config)
    return _module(config, params).apply({"params": params}, tokens, _default_positions(tokens, positions), mask,
                                         method=Transformer.hidden)          # the layer scan unpacks each layer


@functools.partial(jax.jit, static_argnames=("config",))
def lm_logits(params, hidden, *, config: ModelConfig):
    """hidden [B,T,D] -> logits [B,T,V] float32 (tied embedding or lm_head)."""
    return _module(config, params).apply({"params": dequantize_params(params)}, hidden, method=Transformer.logits)


@functools.partial(jax.jit, static_argnames=("config",))
def lm_head_kernel(params, *, config: ModelConfig):
    """The LM head as a [D,V] matrix in the compute dtype (the transposed tied embedding, or lm_head)."""
    w = params["embed"]["embedding"].T if config.tie_embeddings else params["lm_head"]["kernel"]
    return w.astype(config.compute_dtype)


@functools.partial(jax.jit, static_argnames=("config",))
def forward(params, tokens, *, config: ModelConfig, positions=None, segment_ids=None, seq_lengths=None):
    """tokens [B,T] -> logits [B,T,V] float32. See `forward_hidden` for positions, segment_ids, seq_lengths."""
    h = forward_hidden(params, tokens, config=config, positions=positions, segment_ids=segment_ids,
                       seq_lengths=seq_lengths)
    return lm_logits(params, h, config=config)


@functools.partial(jax.jit, static_argnames=("config",))
def scalar_forward(params, tokens, *, config: ModelConfig, positions=None, segment_ids=None, seq_lengths=None):
    """tokens [B,T] -> scalar head output [B,T] float32 (needs `init_params(..., scalar_head=True)`)."""
    if "score_head" not in params:
        raise ValueError("scalar_forward needs params with a 'score_head'; create them with "
                         "init_params(config, rng, scalar_head=True) or add one to pretrained params")
    h = forward_hidden(params, tokens, config=config, positions=positions, segment_ids=segment_ids,
                       seq_lengths=seq_lengths)
    return scalar_head(params, h, config=config)


@functools.partial(jax.jit, static_argnames=("config",))
def scalar_head(params, hidden, *, config: ModelConfig):
    """hidden [B,T,D] -> scalar head output [B,T] float32 (e.g. values at chosen positions only)."""
    return _module(config, params).apply({"params": dequantize_params(params)}, hidden, method=Transformer.score)


def init_cache(config: ModelConfig, batch: int, max_len: int, *, ring: bool = True) -> KVCache:
    """Zeroed KV cache for S = max_len slots, in the compute dtype: k and v [L,B,S,K,H]; or, when the model has a
    sliding window W < S and `ring`, a ring of W slots for each windowed layer (ring_k, ring_v [Lw,B,W,K,H]) and
    k, v [Lg,B,S,K,H] for the global ones (see `KVCache`). `ring=False` keeps all S slots on every layer (the same
    outputs, more memory)."""
    L, K, H, dtype = config.num_layers, config.kv_heads, config.head_size, config.compute_dtype
    if not (ring and any(ring_layers(config, max_len))):
        shape = (L, batch, max_len, K, H)
        return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))
    windowed = sum(ring_layers(config, max_len))
    full, rings = (L - windowed, batch, max_len, K, H), (windowed, batch, config.sliding_window, K, H)
    return KVCache(k=jnp.zeros(full, dtype), v=jnp.zeros(full, dtype), ring_k=jnp.zeros(rings, dtype),
                   ring_v=jnp.zeros(rings, dtype))


def ring_layers(config: ModelConfig, max_len: int) -> tuple[bool, ...]:
    """Per layer: whether `init_cache` gives it a ring of sliding_window slots for a max_len-slot cache (a windowed
    layer, when the window is shorter than the cache; otherwise the ring would be no smaller)."""
    W = config.sliding_window
    if W is None or W >= max_len:
        return (False,) * config.num_layers
    return config.layer_flags("sliding_layers")


def ring_slots(index, window: int):
    """[W] int32: the cache slot each ring slot j holds once slots [0, index) are written, the last s < index with
    s = j (mod W); negative where none has been written yet. index may be traced."""
    j = jnp.arange(window, dtype=jnp.int32)
    last = jnp.asarray(index, jnp.int32) - 1
    return last - (last - j) % window


@functools.partial(jax.jit, static_argnames=("config", "read_len"))
def forward_cached(params, tokens, *, config: ModelConfig, cache: KVCache, positions, key_mask, index,
                   read_len: int | None = None):
    """Decode step: tokens [B,T] go to cache slots [index, index+T) -> (logits [B,T,V] float32, new cache).

    Query t attends to slots s with key_mask[b, s] and s <= index + t (key_mask [B,S] must also mark the new
    slots as valid). positions [B,T] give the RoPE / learned positions (so left-padded prompts start at 0).
    `index` may be a traced scalar. Slots >= index of the incoming cache are never read. `read_len` (static):
    read only cache slots [0, read_len); the caller guarantees index <= read_len (a decode loop whose steps all
    satisfy it then moves fewer bytes per step). params may be `split_layers`'s. A cache with a ring (`init_cache`)
    gives the same outputs: its windowed layers read their W ring slots whole (read_len does not apply) and keep
    the last W of the slots written (a chunk of T > W tokens still attends within itself through its own keys).
    """
    return _forward_cached(params, tokens, config, cache, positions, key_mask, index, read_cache=True,
                           read_len=read_len)


def split_layers(params):
    """params with the stacked "layers" tree replaced by a tuple of per-layer trees. A decode loop given these
    (made once, before the loop) slices no stacked weights inside its body."""
    return {**params, "layers": tuple(jax.tree.map(lambda a, i=i: a[i], params["layers"])
                                      for i in range(jax.tree.leaves(params["layers"])[0].shape[0]))}


@functools.partial(jax.jit, static_argnames=("config",))
def prefill(params, tokens, *, config: ModelConfig, cache: KVCache, positions, key_mask):
    """`forward_cached` at index 0 without reading the (empty) cache: tokens [B,T] fill slots [0, T) (a ring
    keeps the last W of them)."""
    return _forward_cached(params, tokens, config, cache, positions, key_mask, 0, read_cache=False)


def _forward_cached(params, tokens, config, cache, positions, key_mask, index, *, read_cache: bool,
                    read_len: int | None = None):
    T, S = tokens.shape[1], cache.k.shape[2]
    R = S if read_len is None else max(1, min(read_len, S))                              # slots read
    index = jnp.asarray(index, jnp.int32)
    key_mask = key_mask.astype(bool)
    old_visible = key_mask[:, :R] & (jnp.arange(R) < index)[None, :]                      # [B,R]
    new_keys = lax.dynamic_slice_in_dim(key_mask, index, T, axis=1)                       # [B,T]
    t = jnp.arange(T)
    new_visible = (new_keys[:, None, :] & (t[None, None, :] <= t[None, :, None])) | jnp.eye(T, dtype=bool)
    params = dequantize_params(params)
    layers = params["layers"]
    if not isinstance(layers, tuple):
        layers = split_layers(params)["layers"]
    top = {k: v for k, v in params.items() if k != "layers"}
    module = _module(config, top)
    x = module.apply({"params": top}, tokens, positions, method=Transformer.embed_tokens)
    masks = (old_visible, new_visible)
    in_ring = (False,) * config.num_layers if cache.ring_k is None else config.layer_flags("sliding_layers")
    if config.sliding_window is not None:   # query t (slot index + t) sees slots > index + t - W
        W = config.sliding_window
        sliding_masks = (old_visible[:, None, :] & window_mask(T, W, index, R)[None],           # [B,T,R]
                         new_visible & window_mask(T, W)[None])                                 # [B,T,T]
        if any(in_ring):   # ring slot j holds cache slot held[j] (< index; negative: not written yet)
            held = ring_slots(index, W)                                                         # [W]
            seen = (held >= 0)[None, :] & jnp.take(key_mask, jnp.maximum(held, 0), axis=1)       # [B,W]
            ring_masks = (seen[:, None, :] & (index + t[:, None] - held[None, :] < W)[None],     # [B,T,W]
                          sliding_masks[1])
    block = Block(config)
    sliding = config.layer_flags("sliding_layers")
    # The flash-decoding kernel reads its layer of the stacked cache itself (a custom call cannot fuse a slice).
    whole_cache = read_cache and T == 1 and decode_attention_impl(config) == "pallas"
    new_k, new_v, ring_k, ring_v = [], [], [], []
    for layer, layer_params in enumerate(layers):   # unrolled: static cache slices, no per-layer cache copies
        ring = in_ring[layer]
        stack_k, stack_v = (cache.ring_k, cache.ring_v) if ring else (cache.k, cache.v)
        slot = sum(in_ring[:layer]) if ring else layer - sum(in_ring[:layer])           # index in its stack
        layer_cache = (None, None)
        if whole_cache:
            layer_cache = (stack_k, stack_v, slot)
        elif read_cache:
            layer_cache = (stack_k[slot], stack_v[slot]) if ring else (stack_k[slot, :, :R], stack_v[slot, :, :R])
        mask = ring_masks if ring else sliding_masks if sliding[layer] else masks
        x, (k, v) = block.apply({"params": layer_params}, x, layer_cache, positions, mask, layer)
        (ring_k if ring else new_k).append(k)
        (ring_v if ring else new_v).append(v)
    h = module.apply({"params": top}, x, method=Transformer.normed)
    logits = module.apply({"params": top}, h, method=Transformer.logits)
    if cache.ring_k is None:
        start = (0, 0, index, 0, 0)
        return logits, KVCache(k=lax.dynamic_update_slice(cache.k, jnp.stack(new_k).astype(cache.k.dtype), start),
                               v=lax.dynamic_update_slice(cache.v, jnp.stack(new_v).astype(cache.v.dtype), start))
    full_k, full_v = cache.k, cache.v
    if new_k:
        start = (0, 0, index, 0, 0)
        full_k = lax.dynamic_update_slice(full_k, jnp.stack(new_k).astype(full_k.dtype), start)
        full_v = lax.dynamic_update_slice(full_v, jnp.stack(new_v).astype(full_v.dtype), start)
    return logits, KVCache(k=full_k, v=full_v, ring_k=_write_ring(cache.ring_k, ring_k, index),
                           ring_v=_write_ring(cache.ring_v, ring_v, index))


def _write_ring(ring, new, index):
    """Write the new keys (or values) of slots [index, index + T) into ring slots s % W: the last min(T, W) of
    them, which land on distinct ring slots (a prefill longer than the window keeps only its last W)."""
    W, T = ring.shape[2], new[0].shape[1]
    new = jnp.stack(new).astype(ring.dtype)                                              # [Lw,B,T,K,H]
    if T == 1:
        return lax.dynamic_update_slice(ring, new, (0, 0, index % W, 0, 0))
    keep = min(T, W)
    slots = (index + T - keep + jnp.arange(keep)) % W
    return ring.at[:, :, slots].set(new[:, :, T - keep:], unique_indices=True)


def decode_params(params, config: ModelConfig):
    """params with every matrix, embedding and bias cast once to the compute dtype (norm parameters, which
    `_Norm` reads in float32, are kept): a decode loop then reads 16-bit weights instead of re-casting float32
    ones every step. The forward pass computes the same values either way."""
    dtype = config.compute_dtype
    params = dequantize_params(params)

    def cast(path, x):
        keep = any("norm" in str(getattr(k, "key", "")) for k in path)
        return x if keep or not jnp.issubdtype(x.dtype, jnp.floating) else x.astype(dtype)

    return jax.tree_util.tree_map_with_path(cast, params)


def count_params(params) -> int:
    """Total number of scalars in a params pytree."""
    return sum(int(x.size) for x in jax.tree.leaves(params))
