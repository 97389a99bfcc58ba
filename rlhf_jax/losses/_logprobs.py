"""Token log-probabilities and entropies from logits, computed stably in float32.

``log p(y_t | y_<t) = z_{t, y_t} - logsumexp_v z_{t, v}`` for logits ``z [B, T, V]``. The target logit is read with
``take_along_axis`` (never a ``[B, T, V]`` one-hot). With ``chunk_size`` the vocabulary is streamed in chunks with
an online (running max) logsumexp, as in memory-efficient cross-entropy kernels (Rabe & Staats 2021; Wijmans et
al. 2024, "Cut Your Losses in Large-Vocabulary Language Models"): only a ``[B, T, chunk]`` slice is upcast to
float32 at a time, and ``token_logprobs_from_hidden`` never builds the ``[B, T, V]`` logits at all
(``token_logprobs_and_argmax_from_hidden`` also returns the argmax, for the SFT accuracy metric).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from rlhf_jax.losses._common import masked_sum
from rlhf_jax.precision import head_matmul, head_matmul_grads

_F32 = jnp.float32


def _check_chunk(chunk_size, vocab: int) -> int:
    if not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}.")
    return min(chunk_size, vocab)


def _online_update(carry, chunk, valid, local_targets, in_chunk):
    """One step of the streaming logsumexp: carry = (stabiliser m, sum of exp(z - m), target logit)."""
    m, s, tgt = carry
    chunk = jnp.where(valid, chunk, -jnp.inf)
    # The stabiliser carries no gradient: m + log(sum exp(z - m)) equals logsumexp(z) for any m.
    m_new = jnp.maximum(m, lax.stop_gradient(jnp.max(chunk, axis=-1)))
    m_new = jnp.where(jnp.isneginf(m_new), 0.0, m_new)  # a chunk of all -inf logits must not give nan
    s = s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(chunk - m_new[..., None]), axis=-1)
    picked = jnp.take_along_axis(chunk, local_targets[..., None], axis=-1)[..., 0]
    tgt = tgt + jnp.where(in_chunk, picked, 0.0)
    return m_new, s, tgt


def _max_and_argmax(x):
    """(max, first argmax) over the last axis in one variadic reduction (`jnp.max` plus `jnp.argmax` would read x
    twice). Rows of -inf give (-inf, 0)."""
    idx = lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)

    def pick(a, b):
        (av, ai), (bv, bi) = a, b
        take_b = (bv > av) | ((bv == av) & (bi < ai))
        return jnp.where(take_b, bv, av), jnp.where(take_b, bi, ai)

    return lax.reduce((x, idx), (jnp.array(-jnp.inf, x.dtype), jnp.array(0, jnp.int32)), pick, (x.ndim - 1,))


def _init_carry(batch_shape):
    return (jnp.full(batch_shape, -jnp.inf, _F32), jnp.zeros(batch_shape, _F32), jnp.zeros(batch_shape, _F32))


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
    c = _check_chunk(chunk_size, vocab)
    n_chunks = -(-vocab // c)

    @jax.checkpoint  # recompute each chunk in the backward pass instead of storing [n, B, T, c] residuals
    def body(carry, i):
        lo = i * c
        start = jnp.minimum(lo, vocab - c)  # the last chunk is shifted left to stay in bounds ...
        chunk = lax.dynamic_slice_in_dim(logits, start, c, axis=-1).astype(_F32)
        valid = start + jnp.arange(c) >= lo  # ... and the columns already seen are dropped
        in_chunk = (targets >= lo) & (targets < start + c)
        local = jnp.clip(targets - start, 0, c - 1)
        return _online_update(carry, chunk, valid, local, in_chunk), None

    (m, s, tgt), _ = lax.scan(body, _init_carry(targets.shape), jnp.arange(n_chunks))
    return tgt - (m + jnp.log(s))


FUSED_CHUNK = 8192
"""Default vocabulary chunk of the fused LM-head paths used by the training steps (balanced over the chunks)."""
FULL_LOGITS_MAX_BYTES = 4 * 2**30
"""chunk_size="auto" builds the full float32 logits up to this size (one matmul, no recomputation), else chunks."""


def resolve_chunk(chunk_size, num_rows: int, vocab: int) -> int | None:
    """chunk_size "auto" -> None (full float32 logits) when num_rows * vocab * 4 bytes <= FULL_LOGITS_MAX_BYTES,
    else FUSED_CHUNK; an int or None is returned unchanged."""
    if chunk_size == "auto":
        return None if num_rows * vocab * 4 <= FULL_LOGITS_MAX_BYTES else FUSED_CHUNK
    return chunk_size


def _balanced_chunk(chunk_size, vocab: int) -> tuple[int, int]:
    """(number of chunks n, columns per chunk c) with n = ceil(V / chunk_size) and c >= V / n as small as
    possible (rounded up to a multiple of 128 above 128), so that zero padding stays under n * 128 columns."""
    c = _check_chunk(chunk_size, vocab)
    n = -(-vocab // c)
    c = -(-vocab // n)
    if c > 128:
        c = -(-c // 128) * 128
    return n, c


def _vocab_chunks(w, chunk_size) -> tuple[jax.Array, int]:
    """``[D, V] -> ([n, D, c], c)``: balanced vocabulary chunks, the last zero-padded. The scan slices w by its
    leading axis, so dw comes back stacked, not summed in a carry."""
    d, vocab = w.shape
    n_chunks, c = _balanced_chunk(chunk_size, vocab)
    return jnp.pad(w, ((0, 0), (0, n_chunks * c - vocab))).reshape(d, n_chunks, c).transpose(1, 0, 2), c


def _chunk_logits(hidden, w_c, lo, vocab: int, targets):
    """One chunk's float32 logits ``hidden @ w_c`` (columns lo..lo+c) with the masks `_online_update` needs:
    (chunk, valid columns, targets local to the chunk, whether each target falls in it)."""
    c = w_c.shape[-1]
    chunk = head_matmul(hidden, w_c)
    valid = lo + jnp.arange(c) < vocab  # zero-padded columns of the last chunk
    in_chunk = (targets >= lo) & (targets < lo + c)
    local = jnp.clip(targets - lo, 0, c - 1)
    return chunk, valid, local, in_chunk


def _pad_vocab(w):
    """w [D, V] zero-padded to a multiple of 128 columns (tensor-core friendly, as nanoGPT's 50304-column GPT-2
    head)."""
    vocab = w.shape[-1]
    padded = -(-vocab // 128) * 128
    return w if padded == vocab else jnp.pad(w, ((0, 0), (0, padded - vocab)))


def _head_forward(hidden, w_padded, targets, vocab):
    """float32 logits [..., Vp] of the padded head, masked to -inf past `vocab`; their (max, argmax), logsumexp and
    target logit. Two passes over the logits after the matmul: max and argmax together, then the sum of exps."""
    z = head_matmul(hidden, w_padded)
    if z.shape[-1] != vocab:
        z = jnp.where(lax.broadcasted_iota(jnp.int32, z.shape, z.ndim - 1) < vocab, z, -jnp.inf)
    m, arg = _max_and_argmax(z)
    lse = m + jnp.log(jnp.sum(jnp.exp(z - m[..., None]), axis=-1))
    picked = jnp.take_along_axis(z, targets[..., None], axis=-1)[..., 0]
    return z, lse, picked, arg


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _fused_head_logprobs(hidden, w_padded, targets, vocab):
    """(log p(targets) [...] float32, argmax [...] int32) of logits = hidden @ w_padded[:, :vocab].

    The backward pass forms d logits = g * (onehot(target) - softmax) in one elementwise pass over the stored
    float32 logits, written directly in the compute dtype, and feeds it to the two backward matmuls (automatic
    differentiation would write a float32 softmax gradient, then a padded copy, then cast it).
    """
    _, lse, picked, arg = _head_forward(hidden, w_padded, targets, vocab)
    return picked - lse, arg


def _fused_head_fwd(hidden, w_padded, targets, vocab):
    z, lse, picked, arg = _head_forward(hidden, w_padded, targets, vocab)
    return (picked - lse, arg), (hidden, w_padded, targets, z, lse)


def _fused_head_bwd(vocab, residuals, cotangents):
    hidden, w_padded, targets, z, lse = residuals
    g = cotangents[0]                                                          # [...]; the argmax has none
    cols = lax.broadcasted_iota(jnp.int32, z.shape, z.ndim - 1)
    dz = g[..., None] * ((cols == targets[..., None]).astype(z.dtype) - jnp.exp(z - lse[..., None]))  # 0 past V
    return (*head_matmul_grads(hidden, w_padded, dz), None)


_fused_head_logprobs.defvjp(_fused_head_fwd, _fused_head_bwd)


def _full_logprobs_and_argmax(hidden, w, targets):
    """Full-logits path of the fused LM head: (log p(targets), argmax), the gradient by `_fused_head_logprobs`."""
    return _fused_head_logprobs(hidden, _pad_vocab(w), targets, w.shape[-1])


def token_logprobs_from_hidden(hidden, w, targets, *, chunk_size: int | None = None):
    """Fused LM head + log-softmax: ``token_logprobs(hidden @ w, targets)`` without ``[B, T, V]`` logits.

    The vocabulary is processed in chunks by a ``lax.scan`` whose body is rematerialised (``jax.checkpoint``), so
    both the forward and the backward pass keep only ``[B, T, chunk_size]`` logits alive; gradients w.r.t.
    ``hidden`` and ``w`` are exact.

    Args:
      hidden: ``[B, T, D]`` final hidden states (after the final norm).
      w: ``[D, V]`` output projection (``lm_head`` kernel, or the transposed tied embedding).
      targets: ``[B, T]`` integer token ids.
      chunk_size: vocabulary columns per chunk; ``None`` computes the full logits (then calls ``token_logprobs``);
        ``"auto"``: see ``resolve_chunk``.

    Returns:
      ``[B, T]`` float32 log-probabilities of the targets.
    """
    hidden = jnp.asarray(hidden)
    w = jnp.asarray(w)
    targets = jnp.asarray(targets).astype(jnp.int32)
    chunk_size = resolve_chunk(chunk_size, targets.size, w.shape[-1])
    if chunk_size is None:
        return _full_logprobs_and_argmax(hidden, w, targets)[0]
    vocab = w.shape[-1]
    w_chunks, c = _vocab_chunks(w, chunk_size)

    @jax.checkpoint
    def body(carry, xs):
        w_c, i = xs
        lo = i * c
        chunk, valid, local, in_chunk = _chunk_logits(hidden, w_c, lo, vocab, targets)
        return _online_update(carry, chunk, valid, local, in_chunk), None

    (m, s, tgt), _ = lax.scan(body, _init_carry(targets.shape), (w_chunks, jnp.arange(w_chunks.shape[0])))
    return tgt - (m + jnp.log(s))


def token_logprobs_and_argmax_from_hidden(hidden, w, targets, *, chunk_size: int | None = FUSED_CHUNK):
    """Fused LM head + log-softmax + argmax, streaming the vocabulary: no ``[B, T, V]`` logits are built.

    Args:
      hidden: ``[B, T, D]`` final hidden states (after the final norm), e.g. bfloat16.
      w: ``[D, V]`` output projection, same dtype; the matmul accumulates in float32.
      targets: ``[B, T]`` integer token ids.
      chunk_size: at most this many vocabulary columns per chunk (balanced: ``ceil(V / chunk_size)`` chunks);
        ``None`` builds the full ``[B, T, V]`` float32 logits once (no recomputation in the backward pass);
        ``"auto"``: see ``resolve_chunk``.

    Returns:
      ``(logp [B, T] float32, argmax [B, T] int32)``: ``token_logprobs(hidden @ w, targets)`` and the (first)
      argmax of ``hidden @ w``, a running max over the chunks carrying no gradient.
    """
    hidden, w = jnp.asarray(hidden), jnp.asarray(w)
    targets = jnp.asarray(targets).astype(jnp.int32)
    chunk_size = resolve_chunk(chunk_size, targets.size, w.shape[-1])
    if chunk_size is None:
        return _full_logprobs_and_argmax(hidden, w, targets)
    vocab = w.shape[-1]
    w_chunks, c = _vocab_chunks(w, chunk_size)

    @jax.checkpoint  # recompute each chunk's logits in the backward pass instead of storing them
    def body(carry, xs):
        lse_carry, best, arg = carry
        w_c, i = xs
        lo = i * c
        chunk, valid, local, in_chunk = _chunk_logits(hidden, w_c, lo, vocab, targets)
        lse_carry = _online_update(lse_carry, chunk, valid, local, in_chunk)
        seen = jnp.where(valid, lax.stop_gradient(chunk), -jnp.inf)
        chunk_best = jnp.max(seen, axis=-1)
        better = chunk_best > best  # strict: ties keep the earlier chunk, as jnp.argmax keeps the first index
        arg = jnp.where(better, lo + jnp.argmax(seen, axis=-1).astype(jnp.int32), arg)
        return (lse_carry, jnp.where(better, chunk_best, best), arg), None

    init = (_init_carry(targets.shape), jnp.full(targets.shape, -jnp.inf, _F32), jnp.zeros(targets.shape, jnp.int32))
    ((m, s, tgt), _, arg), _ = lax.scan(body, init, (w_chunks, jnp.arange(w_chunks.shape[0])))
    return tgt - (m + jnp.log(s)), arg


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
