"""Streaming (online) logsumexp over vocabulary chunks, shared by the log-softmax in `rlhf_jax.losses` and the
fused LM head in `rlhf_jax.models.head`.

Over chunks ``z_c [..., c]`` of the logits the carry ``(m, s, tgt)`` holds a running stabiliser ``m``, the sum
``s = sum_v exp(z_v - m)`` of the columns seen so far and the target logit, so that after the last chunk
``logsumexp(z) = m + log(s)`` and ``log p(target) = tgt - (m + log s)`` (the online softmax normaliser of Milakov
& Gimelshein 2018; Rabe & Staats 2021). Only one ``[..., c]`` chunk is live at a time.
"""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax

_F32 = jnp.float32


def check_chunk(chunk_size, vocab: int) -> int:
    """A positive int `chunk_size` capped at `vocab`; ValueError otherwise."""
    if not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}.")
    return min(chunk_size, vocab)


def init_carry(batch_shape):
    """The carry before the first chunk: (m = -inf, s = 0, tgt = 0), float32 of shape `batch_shape`."""
    return (jnp.full(batch_shape, -jnp.inf, _F32), jnp.zeros(batch_shape, _F32), jnp.zeros(batch_shape, _F32))


def online_update(carry, chunk, valid, local_targets, in_chunk):
    """One step of the streaming logsumexp: carry = (stabiliser m, sum of exp(z - m), target logit).

    Args:
      carry: ``(m, s, tgt)``, each ``[...]`` float32 (`init_carry` before the first chunk).
      chunk: ``[..., c]`` float32 logits of this chunk's columns.
      valid: ``[c]`` bool, the columns that count (False: padding, or columns already seen).
      local_targets: ``[...]`` int, the target's column within the chunk (clipped into ``[0, c)``).
      in_chunk: ``[...]`` bool, whether the target falls in this chunk.
    """
    m, s, tgt = carry
    chunk = jnp.where(valid, chunk, -jnp.inf)
    # The stabiliser carries no gradient: m + log(sum exp(z - m)) equals logsumexp(z) for any m.
    m_new = jnp.maximum(m, lax.stop_gradient(jnp.max(chunk, axis=-1)))
    m_new = jnp.where(jnp.isneginf(m_new), 0.0, m_new)  # a chunk of all -inf logits must not give nan
    s = s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(chunk - m_new[..., None]), axis=-1)
    picked = jnp.take_along_axis(chunk, local_targets[..., None], axis=-1)[..., 0]
    tgt = tgt + jnp.where(in_chunk, picked, 0.0)
    return m_new, s, tgt
