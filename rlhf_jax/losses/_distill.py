"""Distillation losses: forward KL, reverse KL and the generalised Jensen-Shannon divergence of GKD, per token.

With ``s = log_softmax(student_logits / tau)`` and ``t = log_softmax(teacher_logits / tau)`` over the vocabulary,
per token (Agarwal et al. 2024, "On-Policy Distillation of Language Models: Learning from Self-Generated
Mistakes" (GKD), eq. 1; the same convention as TRL's ``GKDTrainer.generalized_jsd_loss``):

    beta = 0:      D = KL(t || s) = sum_v e^t (t - s)                  forward KL (supervised KD, Hinton et al. 2015)
    beta = 1:      D = KL(s || t) = sum_v e^s (s - t)                  reverse KL (on-policy distillation, MiniLLM)
    0 < beta < 1:  m = log((1 - beta) e^s + beta e^t)
                   D = beta KL(t || m) + (1 - beta) KL(s || m)         generalised JSD

``loss = sum_{b,t} mask D / max(sum mask, 1)`` (every response token counts once, as ``sft_loss``). The temperature
divides both models' logits and the loss is not rescaled by ``tau^2`` (as TRL). The teacher is a constant
(``stop_gradient``). The JSD is not continuous at the ends: it tends to 0, not to a KL, as beta -> 0 or 1; the ends
are the KLs by definition (as TRL).

Top-k teacher (``distill_loss_from_topk``, or ``distill_loss(..., teacher_topk=k)``): the teacher keeps only its
k most likely tokens per position (log-probs ``[B, T, k]`` and their ids), so a stored or transferred teacher costs
``k`` values per token instead of ``V``. The rest of the vocabulary becomes one "tail" outcome: the divergence is
the same formula over the k + 1 outcomes ``(top-k tokens, tail)``, with the teacher's tail mass
``1 - sum_k e^t`` (floored at ``TAIL_FLOOR``) and the student's tail mass its exact log-sum-exp over the tokens
outside the teacher's top k. These are both distributions coarsened onto the same partition, so the loss is a
divergence of two normalised distributions, 0 only when they agree on the partition, a lower bound of the full one
(data-processing inequality), and equal to it when k = V (no tail then). The tail bucket is the one of the top-k
self-distillation losses of SDPO (lasgroup/SDPO, ``add_tail``); renormalising the top k alone (dropping the tail)
would let the student put any mass outside them at no cost.

Masked slots are replaced by zeros before any arithmetic, so NaN/Inf there reach no value or gradient.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from rlhf_jax.losses._common import masked_count, masked_sum

_F32 = jnp.float32
TAIL_FLOOR = 1e-8
"""Smallest teacher tail mass in the top-k loss (1 - sum of float32 top-k probabilities is rounding noise below)."""


def _check(beta, temperature, name: str):
    if isinstance(beta, (int, float)) and not 0.0 <= beta <= 1.0:
        raise ValueError(f"{name}: beta must be in [0, 1] (0 forward KL, 1 reverse KL, between: JSD), got {beta}")
    if isinstance(temperature, (int, float)) and not temperature > 0:
        raise ValueError(f"{name}: temperature must be > 0, got {temperature}")


def _kl(p, q):
    """KL(p || q) over the last axis of log-probs."""
    return jnp.sum(jnp.exp(p) * (p - q), axis=-1)


def _divergence(s, t, beta: float):
    """Per-token D [B, T] of student and teacher log-probs [B, T, n] (see the module docstring)."""
    if beta == 0:
        return _kl(t, s)
    if beta == 1:
        return _kl(s, t)
    m = jnp.logaddexp(s + math.log(1.0 - beta), t + math.log(beta))
    return beta * _kl(t, m) + (1.0 - beta) * _kl(s, m)


def _reduce(s, t, mask, beta: float):
    valid = jnp.asarray(mask) > 0
    d = jnp.where(valid, _divergence(s, t, beta), 0.0)
    denom = jnp.maximum(masked_count(mask), 1.0)
    loss = masked_sum(d, mask) / denom
    metrics = {"loss": loss,
               "kl_forward": lax.stop_gradient(masked_sum(jnp.where(valid, _kl(t, s), 0.0), mask) / denom),
               "kl_reverse": lax.stop_gradient(masked_sum(jnp.where(valid, _kl(s, t), 0.0), mask) / denom)}
    return loss, metrics


def _log_probs(logits, valid, temperature):
    logits = jnp.where(valid[..., None], jnp.asarray(logits).astype(_F32), 0.0)
    return jax.nn.log_softmax(logits / temperature, axis=-1)


def distill_loss(student_logits, teacher_logits, mask, *, beta: float = 0.5, temperature: float = 1.0,
                 teacher_topk: int | None = None):
    """Token-mean distillation divergence between student and teacher (see the module docstring).

    Args:
      student_logits: ``[B, T, V]`` (differentiated; any float dtype, the log-softmax is float32).
      teacher_logits: ``[B, T, V]`` the teacher's logits at the same positions (no gradient reaches them).
      mask: ``[B, T]``, 1 on the tokens that count (the response), 0 on prompt and padding.
      beta: 0 forward KL(teacher || student), 1 reverse KL(student || teacher), between: the generalised JSD.
      temperature: ``tau``, dividing both models' logits.
      teacher_topk: keep only the teacher's k most likely tokens and a tail outcome (``distill_loss_from_topk``);
        None: the full vocabulary.

    Returns:
      ``(loss, metrics)``: ``"loss"``, ``"kl_forward"`` (masked token mean of KL(teacher || student)) and
      ``"kl_reverse"`` (of KL(student || teacher)), float32 scalars; with ``teacher_topk`` the KLs are those of the
      distributions over the k + 1 outcomes.
    """
    _check(beta, temperature, "distill_loss")
    if teacher_topk is not None:
        valid = jnp.asarray(mask) > 0
        logp, ids = teacher_topk_logprobs(jnp.where(valid[..., None], teacher_logits, 0.0), teacher_topk,
                                          temperature=temperature)
        return distill_loss_from_topk(student_logits, logp, ids, mask, beta=beta, temperature=temperature)
    valid = jnp.asarray(mask) > 0
    s = _log_probs(student_logits, valid, temperature)
    t = lax.stop_gradient(_log_probs(teacher_logits, valid, temperature))
    return _reduce(s, t, mask, beta)


def teacher_topk_logprobs(teacher_logits, k: int, *, temperature: float = 1.0):
    """The teacher's k most likely tokens per position: ``(log-probs [B, T, k] float32, ids [B, T, k] int32)``,
    log-probs of ``log_softmax(teacher_logits / temperature)`` over the full vocabulary, in descending order."""
    V = jnp.shape(teacher_logits)[-1]
    if not 1 <= k <= V:
        raise ValueError(f"teacher_topk_logprobs: k must be in [1, V = {V}], got {k}")
    logp = jax.nn.log_softmax(jnp.asarray(teacher_logits).astype(_F32) / temperature, axis=-1)
    values, ids = lax.top_k(logp, k)
    return lax.stop_gradient(values), ids.astype(jnp.int32)


def distill_loss_from_topk(student_logits, teacher_topk_logp, teacher_topk_ids, mask, *, beta: float = 0.5,
                           temperature: float = 1.0):
    """``distill_loss`` against a teacher known by its top-k log-probs only (k + 1 outcomes, module docstring).

    Args:
      student_logits: ``[B, T, V]``.
      teacher_topk_logp: ``[B, T, k]`` the teacher's log-probs (at ``temperature``) of its k tokens
        (``teacher_topk_logprobs``); constants.
      teacher_topk_ids: ``[B, T, k]`` their token ids, distinct within a position.
      mask, beta, temperature: as ``distill_loss``.

    Returns:
      ``(loss, metrics)`` as ``distill_loss``; with k = V it equals ``distill_loss`` (no tail outcome).
    """
    _check(beta, temperature, "distill_loss_from_topk")
    valid = jnp.asarray(mask) > 0
    V, k = jnp.shape(student_logits)[-1], jnp.shape(teacher_topk_ids)[-1]
    if k > V:
        raise ValueError(f"distill_loss_from_topk: {k} teacher tokens per position but a vocabulary of {V}")
    s_full = _log_probs(student_logits, valid, temperature)                                      # [B, T, V]
    ids = jnp.where(valid[..., None], jnp.asarray(teacher_topk_ids), jnp.arange(k)).astype(jnp.int32)
    t = lax.stop_gradient(jnp.where(valid[..., None], jnp.asarray(teacher_topk_logp, _F32), -math.log(k)))
    s = jnp.take_along_axis(s_full, ids, axis=-1)                                                # [B, T, k]
    if k < V:
        in_topk = jnp.put_along_axis(jnp.zeros(s_full.shape, bool), ids, True, axis=-1, inplace=False)
        s_tail = jax.nn.logsumexp(jnp.where(in_topk, -jnp.inf, s_full), axis=-1)                # exact, [B, T]
        t_mass = -jnp.expm1(jnp.minimum(jax.nn.logsumexp(t, axis=-1), 0.0))
        t_tail = jnp.log(jnp.maximum(t_mass, TAIL_FLOOR))
        s, t = jnp.concatenate([s, s_tail[..., None]], -1), jnp.concatenate([t, t_tail[..., None]], -1)
    return _reduce(s, t, mask, beta)
