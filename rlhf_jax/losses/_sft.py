"""Supervised fine-tuning loss: token-weighted negative log-likelihood (cross-entropy).

``L = -sum_{b,t} m_{b,t} log p(y_{b,t} | y_{b,<t}) / sum_{b,t} m_{b,t}`` — every unmasked token in the batch counts
once, so long and short sequences are weighted by their token counts (as in nanoGPT/MaxText, not a per-sequence
mean). ``sft_loss_sums`` returns the numerator and denominator separately (tunix style), so that a mean over
several shards or micro-batches is ``sum(nll_sum) / sum(num_tokens)`` and stays exact.
"""

from __future__ import annotations

import jax.numpy as jnp

from rlhf_jax.losses._common import masked_count, masked_sum
from rlhf_jax.losses._logprobs import token_logprobs


def sft_loss_sums(logits, targets, loss_mask, *, chunk_size: int | None = None):
    """Sums behind ``sft_loss``, to be added across shards/micro-batches before dividing.

    Args:
      logits: ``[B, T, V]``.
      targets: ``[B, T]`` integer ids (inputs shifted by one).
      loss_mask: ``[B, T]``, 1 on tokens that are trained on.
      chunk_size: passed to ``token_logprobs`` (vocabulary chunking).

    Returns:
      dict of float32 scalars: ``"nll_sum"`` (sum of -log p over masked tokens), ``"num_tokens"`` (sum of the mask),
      ``"num_correct"`` (masked count of argmax == target).
    """
    # Padded positions' logits and targets are replaced before the log-softmax: NaN/Inf logits or out-of-range
    # targets there reach neither the value nor the gradient.
    valid = jnp.asarray(loss_mask) > 0
    logits = jnp.where(valid[..., None], logits, jnp.zeros((), jnp.asarray(logits).dtype))
    targets = jnp.where(valid, jnp.asarray(targets), 0)
    logp = token_logprobs(logits, targets, chunk_size=chunk_size)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return {
        "nll_sum": masked_sum(-logp, loss_mask),
        "num_tokens": masked_count(loss_mask),
        "num_correct": masked_sum(correct, loss_mask),
    }


def sft_loss(logits, targets, loss_mask, *, chunk_size: int | None = None):
    """Mean next-token negative log-likelihood over all unmasked tokens of the batch.

    Args:
      logits: ``[B, T, V]`` model outputs.
      targets: ``[B, T]`` integer target ids.
      loss_mask: ``[B, T]``, 1 where the token is trained on (e.g. assistant turns), 0 on prompt and padding.
      chunk_size: optional vocabulary chunk for ``token_logprobs``.

    Returns:
      ``(loss, metrics)``: loss is a float32 scalar (0 when the mask is empty); metrics has ``"loss"``,
      ``"num_tokens"``, ``"accuracy"`` (argmax == target on unmasked tokens), ``"perplexity"`` (``exp(loss)``),
      plus the raw sums ``"nll_sum"`` and ``"num_correct"`` for exact aggregation across shards.
    """
    return sft_loss_from_sums(sft_loss_sums(logits, targets, loss_mask, chunk_size=chunk_size))


def sft_loss_from_sums(sums):
    """``(loss, metrics)`` of ``sft_loss`` from its sums: those of ``sft_loss_sums``, sums added across shards or
    micro-batches, or the fused LM head's (``rlhf_jax.models.head.sft_loss_from_hidden``).

    Args:
      sums: dict with float32 scalars ``"nll_sum"``, ``"num_tokens"``, ``"num_correct"``.

    Returns:
      ``(loss, metrics)`` as ``sft_loss``: loss = nll_sum / num_tokens (0 when num_tokens is 0).
    """
    denom = jnp.where(sums["num_tokens"] > 0, sums["num_tokens"], 1.0)
    loss = sums["nll_sum"] / denom
    metrics = {
        "loss": loss,
        "num_tokens": sums["num_tokens"],
        "accuracy": sums["num_correct"] / denom,
        "perplexity": jnp.exp(loss),
        "nll_sum": sums["nll_sum"],
        "num_correct": sums["num_correct"],
    }
    return loss, metrics
