"""Masked reductions shared by every loss.

Padding is excluded with ``jnp.where`` rather than a multiply, so garbage (even ``inf``/``nan``) in padded
positions never leaks into a loss or its gradient. ``mask`` may be boolean, integer or float; float masks act as
per-token weights (the count is then the sum of the weights). Empty masks give 0, not ``nan``.
"""

from __future__ import annotations

import jax.numpy as jnp


def _weights(x, mask):
    return jnp.broadcast_to(jnp.asarray(mask).astype(jnp.float32), jnp.shape(x))


def masked_sum(x, mask, axis=None):
    """Sum of ``x`` over positions where ``mask`` is nonzero, weighted by ``mask``.

    Args:
      x: array, e.g. ``[B, T]``.
      mask: array broadcastable to ``x`` (bool, int or float weights).
      axis: axis or axes to reduce; ``None`` reduces everything.

    Returns:
      ``sum(x * mask)`` over ``axis`` (float32 at least), with padded entries contributing exactly 0.
    """
    x = jnp.asarray(x)
    w = _weights(x, mask)
    return jnp.sum(jnp.where(w != 0, x * w, 0.0), axis=axis)


def masked_count(mask, axis=None):
    """Sum of the mask weights (the number of valid tokens for a 0/1 mask)."""
    return jnp.sum(jnp.asarray(mask).astype(jnp.float32), axis=axis)


def masked_mean(x, mask, axis=None):
    """Mean of ``x`` over valid positions: ``masked_sum(x, mask) / sum(mask)``; 0 where the mask is empty.

    Args:
      x: array, e.g. ``[B, T]``.
      mask: array broadcastable to ``x``.
      axis: axis or axes to reduce; ``None`` reduces everything (token-weighted mean over the batch).

    Returns:
      The masked mean, shape of ``x`` with ``axis`` removed.
    """
    x = jnp.asarray(x)
    total = masked_sum(x, mask, axis=axis)
    count = jnp.sum(_weights(x, mask), axis=axis)
    return total / jnp.where(count > 0, count, 1.0)


def masked_var(x, mask, axis=None, *, unbiased: bool = True):
    """Variance of ``x`` over valid positions.

    ``var = masked_mean((x - masked_mean(x))^2)``, times the Bessel correction ``n / (n - 1)`` when ``unbiased``
    (as TRL's ``masked_var``; ``n`` is the mask weight sum; no correction when ``n <= 1``).

    Args:
      x: array, e.g. ``[B, T]``.
      mask: array broadcastable to ``x``.
      axis: axis or axes to reduce; ``None`` reduces everything.
      unbiased: apply Bessel's correction.

    Returns:
      The masked variance, shape of ``x`` with ``axis`` removed.
    """
    x = jnp.asarray(x)
    mean = masked_mean(x, mask, axis=axis)
    mean_b = mean if axis is None else jnp.expand_dims(mean, axis)
    var = masked_mean(jnp.square(x - mean_b), mask, axis=axis)
    if unbiased:
        n = jnp.sum(_weights(x, mask), axis=axis)
        var = var * jnp.where(n > 1, n / jnp.where(n > 1, n - 1, 1.0), 1.0)
    return var
