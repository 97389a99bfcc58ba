"""Token log-probabilities and entropies from logits, computed stably in float32.

``log p(y_t | y_<t) = z_{t, y_t} - logsumexp_v z_{t, v}`` for logits ``z [B, T, V]``. The target logit is read with
``take_along_axis`` (never a ``[B, T, V]`` one-hot). With ``chunk_size`` the vocabulary is streamed in chunks with
an online (running max) logsumexp (``rlhf_jax.logsumexp``), as in memory-efficient cross-entropy kernels (Rabe &
Staats 2021; Wijmans et al. 2024, "Cut Your Losses in Large-Vocabulary Language Models"), so that only a
``[B, T, chunk]`` slice is upcast to float32 at a time. The LM head fused with this log-softmax (never building
the ``[B, T, V]`` logits) is a model kernel: ``rlhf_jax.models.head``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from rlhf_jax.logsumexp import check_chunk, init_carry, online_update
from rlhf_jax.losses._common import masked_sum

_F32 = jnp.float32


def token_logprobs(logits, targets, *, chunk_size: int | None = None):
    """Log-probability of each target token under the logits.

    Args:
      logits: ``[B, T, V]`` (any float dtype; the log-softmax is computed in float32).
      targets: ``[B, T]`` integer token ids in ``[0, V)``.
      chunk_size: if set, stream the vocabulary in chunks of this many columns (a ``lax.scan`` with a running
        max/logsumexp) so that only ``[B, T, chunk_size]`` float32 values are live at a time; same result.

    Returns:
      ``[B, T]`` float32, ``logits[b, t, targets[b, t]] - logsumexp(logits[b, t])``.
    """
    logits = jnp.asarray(logits)
    targets = jnp.asarray(targets).astype(jnp.int32)
    if chunk_size is None:
        logits = logits.astype(_F32)
        picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
        return picked - jax.nn.logsumexp(logits, axis=-1)
    vocab = logits.shape[-1]
    c = check_chunk(chunk_size, vocab)
    n_chunks = -(-vocab // c)

    @jax.checkpoint  # recompute each chunk in the backward pass instead of storing [n, B, T, c] residuals
    def body(carry, i):
        lo = i * c
        start = jnp.minimum(lo, vocab - c)  # the last chunk is shifted left to stay in bounds ...
        chunk = lax.dynamic_slice_in_dim(logits, start, c, axis=-1).astype(_F32)
        valid = start + jnp.arange(c) >= lo  # ... and the columns already seen are dropped
        in_chunk = (targets >= lo) & (targets < start + c)
        local = jnp.clip(targets - start, 0, c - 1)
        return online_update(carry, chunk, valid, local, in_chunk), None

    (m, s, tgt), _ = lax.scan(body, init_carry(targets.shape), jnp.arange(n_chunks))
    return tgt - (m + jnp.log(s))


def sequence_logprobs(logits, targets, mask):
    """Sum of token log-probabilities over the masked (response) tokens of each row.

    Args:
      logits: ``[B, T, V]``.
      targets: ``[B, T]`` integer ids.
      mask: ``[B, T]``, 1 on tokens that count (e.g. the response), 0 on prompt/padding.

    Returns:
      ``[B]`` float32, ``sum_t mask[b, t] * log p(targets[b, t])`` (the ``log pi(y | x)`` used by DPO).
    """
    return masked_sum(token_logprobs(logits, targets), mask, axis=-1)


def entropy_from_logits(logits):
    """Entropy of the categorical distribution at each position, ``H = -sum_v p_v log p_v``.

    Args:
      logits: ``[B, T, V]``.

    Returns:
      ``[B, T]`` float32 entropies (nats).
    """
    logp = jax.nn.log_softmax(jnp.asarray(logits).astype(_F32), axis=-1)
    return -jnp.sum(jnp.exp(logp) * logp, axis=-1)
