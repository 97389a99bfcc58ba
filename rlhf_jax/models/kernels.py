"""Pallas attention kernels: flash-decoding over the KV cache, and segment-aware causal attention for packed rows.

* `decode_attention`: one decode step (T = 1) of `transformer.cached_attention`, split over the cache length in
  blocks (Flash-Decoding, Dao, Haziza, Massa and Sizov 2023): a Pallas program per (row, kv head, block of slots)
  reads its block of the [B,S,K,H] cache once and writes a partial softmax (unnormalised output o_j, max m_j, sum
  l_j); the combine over blocks and the one new key is

      m = max(max_j m_j, s_new),   out = (sum_j e^(m_j - m) o_j + e^(s_new - m) v_new)
                                          / (sum_j e^(m_j - m) l_j + e^(s_new - m)).

  The G = N / K query heads of a kv head share the block's read (grouped-query attention). Key masks (padding,
  slots not yet written, a sliding window) arrive as the [B,S] visibility of `cached_attention`; a masked slot
  adds exactly 0, so a block with no visible slot has l_j = 0 and weight 0 in the combine. Soft-capping
  (Gemma 2) is applied to each score before masking. The sampler passes the stacked [L,B,S,K,H] cache and a
  layer index: a Pallas call is a custom call, which would get a copy of a sliced cache as its operand.
* `segment_attention`: causal attention within segments of packed rows from [B,T] segment ids, without a
  [B,1,T,T] mask, through the Pallas flash-attention kernel that ships with JAX
  (`jax.experimental.pallas.ops.gpu.attention.mha`: forward and backward kernels under a custom VJP, causal
  blocks above the diagonal skipped). Padding tokens (segment id 0) get a distinct negative id each, so each sees
  itself only, as in `transformer.dense_mask`; kv heads are repeated to N for grouped-query attention.

Both run in Pallas interpret mode off GPU (`interpret=None`), which is how the CPU tests check them against the
reference paths.

Shapes: B batch, T time, S cache length, N heads, K kv heads, G = N / K, H head dim.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

_F32 = jnp.float32
_NEG = float(jnp.finfo(jnp.float32).min)


def _interpret(interpret: bool | None) -> bool:
    return jax.default_backend() != "gpu" if interpret is None else interpret


def _block_size(length: int, largest: int, smallest: int = 16) -> int:
    """The largest power of two <= `largest` that divides `length`; 0 when it would be below `smallest` (and
    below `largest` and `length`), i.e. when `length` should be padded first."""
    b = 1 << max(0, int(largest).bit_length() - 1)
    while b > 1 and length % b:
        b //= 2
    return b if b >= min(smallest, largest, length) else 0


def decode_kernel_supported(num_heads: int, num_kv_heads: int, head_dim: int) -> bool:
    """Whether `decode_attention` compiles for these heads on GPU: Triton blocks need power-of-two sizes, so the
    head dim H and the group size G = N / K must be powers of two."""
    def pow2(n):
        return n > 0 and n & (n - 1) == 0
    return pow2(head_dim) and pow2(num_heads // num_kv_heads)


def _decode_block_kernel(q_ref, k_ref, v_ref, visible_ref, o_ref, m_ref, l_ref, *, softcap):
    # q [G,H] (scaled, float32); k, v [bs,H]; visible [bs] int32 -> o [G,H], m [G], l [G]
    q = q_ref[...].astype(_F32)
    k = k_ref[...].astype(_F32)
    visible = visible_ref[...] > 0
    v = jnp.where(visible[:, None], v_ref[...].astype(_F32), 0.0)                       # unread slots: anything
    s = jnp.sum(q[:, None, :] * k[None, :, :], axis=-1)                                  # [G,bs]
    if softcap:
        s = softcap * jnp.tanh(s / softcap)
    s = jnp.where(visible[None, :], s, _NEG)
    m = jnp.max(s, axis=-1)                                                              # [G]
    p = jnp.where(visible[None, :], jnp.exp(s - m[:, None]), 0.0)                        # masked slots add 0
    o_ref[...] = jnp.sum(p[:, :, None] * v[None, :, :], axis=1)                          # [G,H]
    m_ref[...] = m
    l_ref[...] = jnp.sum(p, axis=-1)


def _decode_block(R: int, S: int, block_s: int) -> int:
    """Slots per block for reading slots [0, R) of an S-slot cache: the largest power of two <= block_s whose
    ceil(R / bs) blocks end within the cache and read at most R / 8 slots past R (else the smallest that ends
    within it; blocks below min(16, block_s) are not tried). 0 when none ends within the cache."""
    bs = 1 << (int(block_s).bit_length() - 1)
    fits = []
    while bs >= min(16, block_s):
        if -(-R // bs) * bs <= S:
            fits.append(bs)
        bs //= 2
    return next((b for b in fits if -(-R // b) * b - R <= R // 8), fits[-1] if fits else 0)


def decode_partials(q, cache_k, cache_v, visible, *, layer: int | None = None, softcap: float | None = None,
                    block_s: int = 256, interpret: bool | None = None):
    """Partial softmaxes of scaled queries over blocks of cached slots.

    Args:
      q: [B,K,G,H] float32 queries, already multiplied by the logit scale.
      cache_k, cache_v: [B,S,K,H] cache (any float dtype; read in blocks, computed in float32), or the stacked
        [L,B,S,K,H] cache of every layer with `layer` the one to read (no per-layer copy for the kernel).
      visible: [B,R] bool, R <= S: slot s < R seen by row b's query; slots >= R are not read (but for the end of
        the last block, masked).
      softcap: c: scores become c * tanh(score / c) before masking (None: off).
      block_s: at most this many slots per block (see `_decode_block`; the cache is zero-padded, a copy, only
        when no block of at least min(16, block_s) slots fits it).
      interpret: Pallas interpret mode (None: off on GPU, on elsewhere).

    Returns:
      (o [B,K,n,G,H], m [B,K,n,G], l [B,K,n,G]) float32 for n blocks: o_j = sum_s e^(s - m_j) v_s and
      l_j = sum_s e^(s - m_j) over block j's visible slots, m_j their max score (float32 min if none).
    """
    if layer is None:
        cache_k, cache_v, layer = cache_k[None], cache_v[None], 0
    _, B, S, K, H = cache_k.shape
    G, R = q.shape[2], visible.shape[1]
    bs = _decode_block(R, S, block_s)
    if not bs:   # a copy of the cache: only for caches of fewer than 16 slots or not a multiple of 16
        pad = -S % min(16, block_s)
        cache_k, cache_v = (jnp.pad(c, ((0, 0), (0, 0), (0, pad), (0, 0), (0, 0))) for c in (cache_k, cache_v))
        S += pad
        bs = _decode_block(R, S, block_s)
    n = -(-R // bs)
    visible = jnp.pad(visible.astype(jnp.int32), ((0, 0), (0, n * bs - R)))
    kernel = functools.partial(_decode_block_kernel, softcap=softcap)
    cache_spec = pl.BlockSpec((None, None, bs, None, H), lambda b, h, j: (layer, b, j, h, 0))
    return pl.pallas_call(
        kernel,
        grid=(B, K, n),
        in_specs=[pl.BlockSpec((None, None, G, H), lambda b, h, j: (b, h, 0, 0)), cache_spec, cache_spec,
                  pl.BlockSpec((None, bs), lambda b, h, j: (b, j))],
        out_specs=[pl.BlockSpec((None, None, None, G, H), lambda b, h, j: (b, h, j, 0, 0)),
                   pl.BlockSpec((None, None, None, G), lambda b, h, j: (b, h, j, 0)),
                   pl.BlockSpec((None, None, None, G), lambda b, h, j: (b, h, j, 0))],
        out_shape=[jax.ShapeDtypeStruct((B, K, n, G, H), _F32),
                   jax.ShapeDtypeStruct((B, K, n, G), _F32),
                   jax.ShapeDtypeStruct((B, K, n, G), _F32)],
        compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=2),   # Triton, not Mosaic GPU
        interpret=_interpret(interpret),
        name="flash_decoding",
    )(q.astype(_F32), cache_k, cache_v, visible)


def decode_attention(q, k, v, cache_k, cache_v, old_visible, new_visible, *, layer: int | None = None,
                     scale: float | None = None, softcap: float | None = None, block_s: int = 256,
                     interpret: bool | None = None):
    """`transformer.cached_attention` for one new token (T = 1), by flash-decoding (see the module docstring).

    Args:
      q: [B,1,N,H]; k, v: [B,1,K,H] the new token's key and value.
      cache_k, cache_v: [B,S,K,H] (read only), or [L,B,S,K,H] with `layer` (see `decode_partials`).
      old_visible: [B,R] or [B,1,R] bool, R <= S (cached slot s < R seen by the query; slots >= R not read).
      new_visible: [B,1,1] bool (the query sees its own key).
      scale: logit scale (None: 1/sqrt(H)); softcap: c * tanh(logits / c) (None: off).
      block_s, interpret: see `decode_partials`.

    Returns:
      [B,1,N,H] in q's dtype.
    """
    B, T, N, H = q.shape
    if T != 1:
        raise ValueError(f"decode_attention takes one new token per row (T = 1), got T = {T}; use "
                         "transformer.cached_attention for prefills and multi-token steps")
    K = k.shape[2]
    qg = q.reshape(B, K, N // K, H).astype(_F32) * (scale or 1.0 / math.sqrt(H))          # [B,K,G,H]
    visible = old_visible.reshape(B, old_visible.shape[-1]).astype(bool)
    o, m, l = decode_partials(qg, cache_k, cache_v, visible, layer=layer, softcap=softcap, block_s=block_s,
                              interpret=interpret)
    s_new = jnp.einsum("bkgh,bkh->bkg", qg, k[:, 0].astype(_F32))                          # [B,K,G]
    if softcap:
        s_new = softcap * jnp.tanh(s_new / softcap)
    s_new = jnp.where(new_visible.reshape(B, 1, 1), s_new, _NEG)
    m_all = jnp.maximum(m.max(axis=2), s_new)                                              # [B,K,G]
    w = jnp.exp(m - m_all[:, :, None])                                                     # [B,K,n,G]
    w_new = jnp.exp(s_new - m_all)
    num = jnp.einsum("bkng,bkngh->bkgh", w, o) + w_new[..., None] * v[:, 0, :, None, :].astype(_F32)
    den = jnp.einsum("bkng,bkng->bkg", w, l) + w_new
    return (num / den[..., None]).reshape(B, 1, N, H).astype(q.dtype)


def segment_attention(q, k, v, segment_ids, *, scale: float | None = None, block: int = 128,
                      interpret: bool | None = None):
    """Causal attention within segments: q [B,T,N,H], k, v [B,T,K,H], segment_ids [B,T] int -> [B,T,N,H].

    Query t sees key u <= t of the same nonzero segment; a padding token (id 0) sees itself only: the values of
    `transformer.self_attention` under `transformer.dense_mask` of the same ids, without the [B,1,T,T] mask.
    Differentiable (the kernel's custom VJP). T is padded at the end to a multiple of 16 when no power-of-two
    block of at least 16 divides it (the padding tokens see themselves only, and are dropped).

    Args:
      scale: logit scale (None: 1/sqrt(H)).
      block: at most this many queries and keys per block (a power of two dividing T is chosen).
      interpret: Pallas interpret mode (None: off on GPU, on elsewhere).
    """
    from jax.experimental.pallas.ops.gpu.attention import BlockSizes, mha

    B, T, N, H = q.shape
    K = k.shape[2]
    ids = jnp.asarray(segment_ids).astype(jnp.int32)
    ids = jnp.where(ids > 0, ids, -1 - jnp.arange(T, dtype=jnp.int32)[None, :])   # padding: one segment each
    b = _block_size(T, block)
    pad = 0 if b else -T % min(16, block)
    if pad:
        q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
        ids = jnp.concatenate([ids, -1 - T - jnp.arange(pad, dtype=jnp.int32)[None, :].repeat(B, 0)], 1)
        b = _block_size(T + pad, block)
    if K != N:   # grouped-query attention: query head n reads kv head n // (N / K); the VJP sums the copies
        k, v = (jnp.repeat(x, N // K, axis=2) for x in (k, v))
    bb = min(b, 32)   # backward blocks: JAX's defaults for this kernel (fewer registers per program)
    sizes = BlockSizes(block_q=b, block_k=b, block_q_dkv=bb, block_kv_dkv=bb, block_q_dq=bb, block_kv_dq=bb)
    out = mha(q, k, v, ids, sm_scale=scale or 1.0 / math.sqrt(H), causal=True, block_sizes=sizes,
              interpret=_interpret(interpret))
    return out[:, :T]
