"""Advantage estimators, together: GAE for a learned value function, and the value-free group estimators.

* GAE — Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage Estimation", eq. 16,
  computed as a reverse ``lax.scan`` over time (one compiled loop, as purejaxrl); ``whiten`` normalises over valid
  tokens (TRL's ``masked_whiten``).
* Group estimators over G answers to one prompt (rows ``g*G .. g*G+G-1``): GRPO's group-normalised reward (Shao
  et al. 2024, "DeepSeekMath", sec. 4.1.2; the "batch" and "none" scales of Liu et al. 2025, "Understanding
  R1-Zero-Like Training", Dr. GRPO) and RLOO's leave-one-out baseline (Ahmadian et al. 2024, "Back to Basics",
  eq. 4; Kool et al. 2019).
* ``discounted_returns``: reward-to-go over a row's valid tokens (REINFORCE++, Hu 2025, uses gamma 1).
* ``overlong_penalty``: DAPO's length shaping of the reward near the response budget (Yu et al. 2025).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from rlhf_jax.losses._common import masked_mean, masked_var

_WHITEN_EPS = 1e-8
GROUP_SCALES = ("group", "batch", "none")


def gae(rewards, values, mask, *, gamma: float = 1.0, lam: float = 0.95):
    """Generalised advantage estimation over right-padded token sequences.

    ``delta_t = r_t + gamma * V_{t+1} * m_{t+1} - V_t``
    ``A_t = m_t * (delta_t + gamma * lam * A_{t+1})``, with ``A_T = 0``
    ``R_t = A_t + V_t`` (the lambda-return, the value-function target)

    The value after the last valid token is 0 (the episode ends there); entries with ``m_t = 0`` are 0 in both
    outputs, whatever ``rewards``/``values`` hold there. ``lam = 0`` gives one-step TD errors, ``lam = 1`` Monte-Carlo
    returns minus the baseline.

    The valid tokens need not be contiguous: in a multi-turn episode the policy's turns are separated by
    environment tokens (tool results, user turns) with ``m = 0``. There ``t + 1`` above reads as the *next valid*
    token: the environment's tokens are part of the transition between two policy states, so the value and the
    advantage flow from one turn to the previous one (each row's valid tokens are gathered to the front, in order,
    the recursion runs there, and the results go back to their positions; for a contiguous mask this is the
    formula as written).

    Args:
      rewards: ``[B, T]`` per-token rewards (e.g. from ``shape_rewards``).
      values: ``[B, T]`` value estimates ``V(s_t)``.
      mask: ``[B, T]``, 1 on valid (policy) tokens: a run from t = 0, or runs separated by environment tokens.
      gamma: discount factor (may be a traced scalar).
      lam: GAE lambda (may be a traced scalar).

    Returns:
      ``(advantages [B, T], returns [B, T])`` float32.
    """
    m = jnp.asarray(mask) > 0
    # Valid tokens first, in order (a stable sort), and the permutation back.
    order = jnp.argsort(jnp.where(m, 0, 1), axis=1, stable=True)
    back = jnp.argsort(order, axis=1)
    take = lambda x, idx: jnp.take_along_axis(x, idx, axis=1)  # noqa: E731
    m_c = take(m, order)
    mf = m_c.astype(jnp.float32)
    r = jnp.where(m_c, take(jnp.asarray(rewards, jnp.float32), order), 0.0)
    v = jnp.where(m_c, take(jnp.asarray(values, jnp.float32), order), 0.0)
    next_v = jnp.pad(v[:, 1:], ((0, 0), (0, 1)))  # already 0 where m_{t+1} = 0
    deltas = r + gamma * next_v - v

    def step(next_adv, xs):
        delta_t, m_t = xs
        adv = m_t * (delta_t + gamma * lam * next_adv)
        return adv, adv

    _, adv_t = lax.scan(step, jnp.zeros(r.shape[:1], jnp.float32), (deltas.T, mf.T), reverse=True)
    advantages = adv_t.T
    returns = jnp.where(m_c, advantages + v, 0.0)
    return take(advantages, back), take(returns, back)


def whiten(x, mask, *, shift_mean: bool = True):
    """Normalise ``x`` to zero mean and unit variance over its valid entries.

    ``y = (x - mean) / sqrt(var + 1e-8)`` with ``mean``/``var`` the masked mean and *unbiased* (Bessel-corrected)
    variance over all valid entries of the batch, as TRL's ``masked_whiten``. With ``shift_mean=False`` the mean is
    added back (rescale only; TRL does this for rewards). Masked entries of the output are 0.

    Args:
      x: ``[B, T]`` values (advantages, rewards).
      mask: ``[B, T]`` valid-entry mask.
      shift_mean: subtract the mean (True) or only divide by the standard deviation (False).

    Returns:
      ``[B, T]`` float32.
    """
    x = jnp.asarray(x, jnp.float32)
    mean = masked_mean(x, mask)
    var = masked_var(x, mask, unbiased=True)
    y = (x - mean) * lax.rsqrt(var + _WHITEN_EPS)
    if not shift_mean:
        y = y + mean
    return jnp.where(jnp.asarray(mask) > 0, y, 0.0)


def _groups(rewards, group_size: int):
    r = jnp.asarray(rewards, jnp.float32)
    if r.ndim != 1 or group_size < 1 or r.shape[0] % group_size:
        raise ValueError(f"rewards [B] must split into groups of group_size={group_size}, got shape {r.shape}")
    return r.reshape(-1, group_size)


def group_advantages(rewards, *, group_size: int, scale: str = "group", eps: float = 1e-4):
    """GRPO's outcome advantages ``[B]``: each reward minus its group's mean, scaled.

    ``scale="group"``: ``(r_i - mean_g) / (std_g + eps)``, ``std_g`` the unbiased (n - 1) std of the group (Shao et
    al. 2024, eq. 3's normalised reward); ``"batch"``: divided by the unbiased std of all rewards instead;
    ``"none"``: ``r_i - mean_g`` (Dr. GRPO, Liu et al. 2025, which drops the std as a difficulty bias). A group of
    equal rewards gets advantage 0 under every scale.
    """
    if scale not in GROUP_SCALES:
        raise ValueError(f"group_advantages: scale must be one of {GROUP_SCALES}, got {scale!r}")
    r = _groups(rewards, group_size)
    centred = r - jnp.mean(r, axis=1, keepdims=True)
    if scale == "none":
        return centred.reshape(-1)
    if scale == "group":
        std = jnp.std(r, axis=1, keepdims=True, ddof=1) if group_size > 1 else jnp.zeros_like(r[:, :1])
    else:
        std = jnp.std(r, ddof=1) if r.size > 1 else jnp.zeros(())
    return (centred / (std + eps)).reshape(-1)


def rloo_advantages(rewards, *, group_size: int):
    """RLOO's advantages ``[B]``: ``A_i = r_i - mean_{j != i in group} r_j`` (Ahmadian et al. 2024, eq. 4), i.e.
    ``G / (G - 1) * (r_i - mean_g)``. Needs ``group_size >= 2``."""
    if group_size < 2:
        raise ValueError(f"rloo_advantages needs group_size >= 2 (a leave-one-out baseline), got {group_size}")
    r = _groups(rewards, group_size)
    baseline = (jnp.sum(r, axis=1, keepdims=True) - r) / (group_size - 1)
    return (r - baseline).reshape(-1)


def discounted_returns(rewards, mask, *, gamma: float = 1.0):
    """Reward-to-go ``R_t = sum_{k >= t} gamma^(k - t) r_k`` over each row's valid tokens ``[B, T]``; 0 where
    ``mask == 0`` (whatever ``rewards`` hold there). A reverse ``lax.scan`` over time."""
    m = jnp.asarray(mask) > 0
    r = jnp.where(m, jnp.asarray(rewards, jnp.float32), 0.0)

    def step(next_ret, r_t):
        ret = r_t + gamma * next_ret
        return ret, ret

    _, ret = lax.scan(step, jnp.zeros(r.shape[:1], jnp.float32), r.T, reverse=True)
    return jnp.where(m, ret.T, 0.0)


def overlong_penalty(lengths, *, max_len: int, cache_len: int):
    """DAPO's soft overlong punishment ``[B]`` (Yu et al. 2025, eq. 13), added to the reward: 0 for
    ``L <= max_len - cache_len``, ``((max_len - cache_len) - L) / cache_len`` (falling linearly to -1) up to
    ``max_len``, and -1 beyond."""
    if not 0 < cache_len <= max_len:
        raise ValueError(f"overlong_penalty needs 0 < cache_len <= max_len, got cache_len={cache_len}, "
                         f"max_len={max_len}")
    L = jnp.asarray(lengths, jnp.float32)
    soft = (max_len - cache_len - L) / cache_len
    return jnp.where(L <= max_len - cache_len, 0.0, jnp.where(L <= max_len, soft, -1.0))
