"""The LM head as kernels: its matmul in mixed precision, and its product fused with the log-softmax.

* `head_matmul`: 16-bit operands, float32 output (the logits feed a float32 log-softmax), and a backward pass
  whose two matmuls run in the operands' dtype. Differentiating a plain `einsum(..., preferred_element_type=
  float32)` instead gives a float32 cotangent to both backward matmuls, which XLA then runs as float32 (TF32 on
  Hopper) products of the largest matrices in the model: measured on an H100 for GPT-2 124M at 8 x 1024 tokens,
  4.0 ms of a 25 ms SFT step against about 1.9 ms in bf16. Casting the logits' cotangent to the compute dtype is
  what bf16 autocast training does; with float32 operands nothing is cast and the gradient is exact.
* `token_logprobs_from_hidden` / `token_logprobs_and_argmax_from_hidden` / `sft_loss_from_hidden`: the head's
  product fused with the log-softmax over vocabulary chunks (a custom VJP with one-pass softmax gradients,
  optimisation barriers that keep elementwise work out of the products), so the ``[B, T, V]`` logits are never
  built. The formulas they compute are `rlhf_jax.losses.token_logprobs` and `sft_loss`.
"""
from __future__ import annotations

import functools
import sys

import jax
import jax.numpy as jnp
from jax import lax

from rlhf_jax.logsumexp import check_chunk, init_carry, online_update
from rlhf_jax.losses import masked_count, masked_sum, sft_loss_from_sums

_F32 = jnp.float32

@jax.custom_vjp
def head_matmul(x, w):
    """x [..., D] @ w [D, V] -> [..., V] float32 (accumulated in float32, never rounded to x.dtype).

    Backward: the cotangent g [..., V] is cast to x.dtype, then dx = g w^T and dw = sum x^T g are computed with
    float32 accumulation and returned in x.dtype and w.dtype.
    """
    return _product(x, w)


def _product(x, w):
    # The barriers keep XLA from fusing neighbouring elementwise work (the softmax gradient, a temperature
    # scale) into the product as a Triton gemm fusion. Measured on an H100, PPO update of GPT-2 124M: one head
    # product went from 1.12 to 0.67 ms and the update from 492.7 to 480.7 ms. XLA may still choose Triton for
    # the product itself (two of PPO's three head products stay Triton fusions at about 1.4 ms; the update takes
    # 450 ms with --xla_gpu_enable_triton_gemm=false, which slows decoding).
    x, w = jax.lax.optimization_barrier((x, w))
    return jax.lax.optimization_barrier(jnp.einsum("...d,dv->...v", x, w, preferred_element_type=jnp.float32))


def _head_matmul_fwd(x, w):
    return head_matmul(x, w), (x, w)


def head_matmul_grads(x, w, g):
    """(dx, dw) of `head_matmul(x, w)` for the logits' cotangent g [..., V]: g is cast to x.dtype (kept apart from
    its producer by a barrier, see `_product`), then dx = g w^T and dw = sum x^T g with float32 accumulation, in
    x.dtype and w.dtype. Also the tail of hand-written backward passes that form g themselves."""
    g = jax.lax.optimization_barrier(g.astype(x.dtype))
    dx = jnp.einsum("...v,dv->...d", g, w, preferred_element_type=jnp.float32).astype(x.dtype)
    rows = x.reshape(-1, x.shape[-1])
    dw = jnp.einsum("nd,nv->dv", rows, g.reshape(-1, g.shape[-1]), preferred_element_type=jnp.float32)
    return dx, dw.astype(w.dtype)


def _head_matmul_bwd(residuals, g):
    return head_matmul_grads(*residuals, g)


head_matmul.defvjp(_head_matmul_fwd, _head_matmul_bwd)


def _max_and_argmax(x):
    """(max, first argmax) over the last axis in one variadic reduction (`jnp.max` plus `jnp.argmax` would read x
    twice). Rows of -inf give (-inf, 0)."""
    idx = lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)

    def pick(a, b):
        (av, ai), (bv, bi) = a, b
        take_b = (bv > av) | ((bv == av) & (bi < ai))
        return jnp.where(take_b, bv, av), jnp.where(take_b, bi, ai)

    return lax.reduce((x, idx), (jnp.array(-jnp.inf, x.dtype), jnp.array(0, jnp.int32)), pick, (x.ndim - 1,))


FUSED_CHUNK = 8192
"""Default vocabulary chunk of the fused LM-head paths used by the training steps (balanced over the chunks)."""
FULL_LOGITS_MAX_BYTES = 4 * 2**30
"""chunk_size="auto" on a backend that reports no memory (CPU): the full float32 logits up to this size (one
matmul, no recomputation), else chunks."""
FULL_LOGITS_FREE_FRACTION = 0.25
"""chunk_size="auto" on a backend that reports its memory (GPU, TPU): the full float32 logits while they take at
most this share of the device's free memory (bytes_limit - bytes_in_use when the step is traced). The margin
leaves room for the logits' gradient, the activations and XLA's temporaries, which are not in use yet then."""
AUTO_DECISIONS: list[str] = []
"""The logits_chunk="auto" decision this process printed to stderr (at most one; clear it to print again)."""


def device_memory_stats() -> dict | None:
    """`memory_stats()` of the first local device (None where the backend reports none, as on CPU)."""
    try:
        return jax.local_devices()[0].memory_stats()
    except Exception:   # a backend without the call
        return None


def full_logits_budget(memory_stats: dict | None) -> tuple[int, str]:
    """(bytes the full float32 logits may take under chunk_size "auto", how that was decided):
    FULL_LOGITS_FREE_FRACTION of bytes_limit - bytes_in_use when memory_stats has both, else
    FULL_LOGITS_MAX_BYTES."""
    if memory_stats and "bytes_limit" in memory_stats and "bytes_in_use" in memory_stats:
        free = max(0, int(memory_stats["bytes_limit"]) - int(memory_stats["bytes_in_use"]))
        return int(free * FULL_LOGITS_FREE_FRACTION), (
            f"{FULL_LOGITS_FREE_FRACTION:g} of free device memory {free / 2**30:.2f} GiB "
            f"(bytes_limit {int(memory_stats['bytes_limit']) / 2**30:.2f} GiB - bytes_in_use "
            f"{int(memory_stats['bytes_in_use']) / 2**30:.2f} GiB)")
    return FULL_LOGITS_MAX_BYTES, "no device memory statistics: the fixed models.head.FULL_LOGITS_MAX_BYTES"


def resolve_chunk(chunk_size, num_rows: int, vocab: int, *,
                  memory_stats: dict | None | str = "device") -> int | None:
    """chunk_size "auto" -> None (full float32 logits) when num_rows * vocab * 4 bytes fit `full_logits_budget`
    of `memory_stats` ("device": `device_memory_stats()`), else FUSED_CHUNK; an int or None is returned unchanged.

    The first "auto" decision with the device's statistics is printed to stderr with its inputs (once per
    process). It is taken when the step is traced, so a program compiled with less memory in use may chunk where
    another builds the full logits; both give the same values up to float32 rounding.
    """
    if chunk_size != "auto":
        return chunk_size
    from_device = memory_stats == "device"
    stats = device_memory_stats() if from_device else memory_stats
    budget, why = full_logits_budget(stats)
    nbytes = num_rows * vocab * 4
    chunk = None if nbytes <= budget else FUSED_CHUNK
    if from_device and not AUTO_DECISIONS:
        AUTO_DECISIONS.append(
            f"rlhf_jax: logits_chunk='auto': {'full float32 logits' if chunk is None else f'chunks of {chunk}'} "
            f"for {num_rows} rows x {vocab} vocab = {nbytes / 2**30:.2f} GiB against a budget of "
            f"{budget / 2**30:.2f} GiB ({why}); printed once per process")
        print(AUTO_DECISIONS[0], file=sys.stderr, flush=True)
    return chunk


def _balanced_chunk(chunk_size, vocab: int) -> tuple[int, int]:
    """(number of chunks n, columns per chunk c) with n = ceil(V / chunk_size) and c >= V / n as small as
    possible (rounded up to a multiple of 128 above 128), so that zero padding stays under n * 128 columns."""
    c = check_chunk(chunk_size, vocab)
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
    """One chunk's float32 logits ``hidden @ w_c`` (columns lo..lo+c) with the masks `online_update` needs:
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
        return online_update(carry, chunk, valid, local, in_chunk), None

    (m, s, tgt), _ = lax.scan(body, init_carry(targets.shape), (w_chunks, jnp.arange(w_chunks.shape[0])))
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
        lse_carry = online_update(lse_carry, chunk, valid, local, in_chunk)
        seen = jnp.where(valid, lax.stop_gradient(chunk), -jnp.inf)
        chunk_best = jnp.max(seen, axis=-1)
        better = chunk_best > best  # strict: ties keep the earlier chunk, as jnp.argmax keeps the first index
        arg = jnp.where(better, lo + jnp.argmax(seen, axis=-1).astype(jnp.int32), arg)
        return (lse_carry, jnp.where(better, chunk_best, best), arg), None

    init = (init_carry(targets.shape), jnp.full(targets.shape, -jnp.inf, _F32), jnp.zeros(targets.shape, jnp.int32))
    ((m, s, tgt), _, arg), _ = lax.scan(body, init, (w_chunks, jnp.arange(w_chunks.shape[0])))
    return tgt - (m + jnp.log(s)), arg


def sft_loss_from_hidden(hidden, w, targets, loss_mask, *, chunk_size: int | str | None = FUSED_CHUNK):
    """``sft_loss(hidden @ w, targets, loss_mask)`` without building the ``[B, T, V]`` logits.

    Args:
      hidden: ``[B, T, D]`` final hidden states; w: ``[D, V]`` LM head (same dtype, float32 accumulation).
      targets, loss_mask: as in ``sft_loss``.
      chunk_size: vocabulary columns per chunk (see ``token_logprobs_and_argmax_from_hidden``); ``None``: full
        float32 logits; ``"auto"``: see ``resolve_chunk``.

    Returns:
      ``(loss, metrics)`` exactly as ``sft_loss`` (accuracy from a running argmax over the chunks).
    """
    logp, argmax = token_logprobs_and_argmax_from_hidden(hidden, w, targets, chunk_size=chunk_size)
    correct = (argmax == jnp.asarray(targets)).astype(jnp.float32)
    return sft_loss_from_sums({"nll_sum": masked_sum(-logp, loss_mask), "num_tokens": masked_count(loss_mask),
                              "num_correct": masked_sum(correct, loss_mask)})
