"""Optimizers: AdamW with a decoupled weight-decay mask, learning-rate schedules, clipping and accumulation.

AdamW: Loshchilov & Hutter 2019, "Decoupled Weight Decay Regularization". Weight decay is applied to matmul
kernels only (leaves named "kernel"; optionally the token embedding), never to biases or norm scales, as in
GPT-2/nanoGPT and Hugging Face's Trainer. Our layer parameters are stacked with a leading L axis, so a norm
scale is 2-D ([L,D]): the mask is by leaf name, not by rank.

Schedules (functions of the optimizer-update count, i.e. micro-steps // grad_accum):
  constant:  linear warmup 0 -> lr over `warmup_steps`, then lr.
  cosine:    linear warmup, then cosine decay to lr * min_lr_ratio at `total_steps` (Loshchilov & Hutter 2017).
  wsd:       warmup-stable-decay (Hu et al. 2024, MiniCPM): warmup, constant lr, then a linear decay to
             lr * min_lr_ratio over the last `decay_fraction` of `total_steps`.
Global-norm clipping (Pascanu et al. 2013) precedes Adam. Gradient accumulation wraps everything in
`optax.MultiSteps`: k micro-batch gradients are averaged and the inner optimizer runs once every k calls.
"""
from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
import optax

from rlhf_jax.checks import check_ranges


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """AdamW, schedule, clipping and accumulation settings."""

    learning_rate: float = 1e-5
    """Peak learning rate (after warmup)."""
    schedule: Literal["constant", "cosine", "wsd"] = "constant"
    """Learning-rate shape after warmup (see the module docstring)."""
    warmup_steps: int = 0
    """Optimizer updates of linear warmup from 0 to `learning_rate`."""
    min_lr_ratio: float = 0.1
    """Final learning rate of the cosine and WSD decays, as a fraction of `learning_rate`."""
    decay_fraction: float = 0.1
    """WSD only: fraction of `total_steps` spent in the final decay (MiniCPM uses about 10%)."""
    b1: float = 0.9
    """Adam first-moment decay."""
    b2: float = 0.95
    """Adam second-moment decay (0.95 is the common LLM choice; PyTorch's default is 0.999)."""
    eps: float = 1e-8
    """Adam denominator epsilon."""
    weight_decay: float = 0.0
    """Decoupled weight decay coefficient (applied to kernels only)."""
    decay_embeddings: bool = False
    """Also decay the token/position embedding tables (nanoGPT does; many LLM recipes do not)."""
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm to this value; None disables clipping."""
    grad_accum: int = 1
    """Micro-batches averaged per optimizer update (`optax.MultiSteps`)."""

    def __post_init__(self):
        check_ranges(self, positive=("learning_rate", "eps", "max_grad_norm", "grad_accum"),
                     non_negative=("warmup_steps", "weight_decay"), unit=("min_lr_ratio", "decay_fraction", "b1", "b2"))


def make_schedule(config: OptimConfig, *, total_steps: int | None = None) -> optax.Schedule:
    """The learning rate as a function of the optimizer-update count.

    `total_steps` (optimizer updates, not micro-steps) is required by "cosine" and "wsd".
    """
    lr, warmup = config.learning_rate, config.warmup_steps
    if config.schedule == "constant":
        if warmup == 0:
            return optax.constant_schedule(lr)
        return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)],
                                    [warmup])
    if total_steps is None or total_steps <= warmup:
        raise ValueError(f"OptimConfig.schedule={config.schedule!r} needs total_steps > warmup_steps={warmup} "
                         f"(got total_steps={total_steps}); pass make_optimizer(..., total_steps=num_updates)")
    end = lr * config.min_lr_ratio
    if config.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, total_steps, end_value=end)
    if config.schedule == "wsd":
        decay = max(1, int(round(config.decay_fraction * total_steps)))
        stable_end = max(warmup, total_steps - decay)
        return optax.join_schedules(
            [optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr),
             optax.linear_schedule(lr, end, total_steps - stable_end)],
            [warmup, stable_end])
    raise ValueError(f"unknown OptimConfig.schedule={config.schedule!r}; choose 'constant', 'cosine' or 'wsd'")


def decay_mask(params, *, decay_embeddings: bool = False):
    """Pytree of bools: True on leaves that get weight decay (matmul kernels, optionally embeddings)."""
    names = ("kernel", "embedding") if decay_embeddings else ("kernel",)

    def leaf(path, _):
        last = path[-1]
        return getattr(last, "key", getattr(last, "name", None)) in names

    return jax.tree_util.tree_map_with_path(leaf, params)


def make_optimizer(config: OptimConfig, *, total_steps: int | None = None) -> optax.GradientTransformation:
    """AdamW with clipping, the configured schedule and (if grad_accum > 1) gradient accumulation."""
    schedule = make_schedule(config, total_steps=total_steps)
    parts = []
    if config.max_grad_norm is not None:
        parts.append(optax.clip_by_global_norm(config.max_grad_norm))
    parts.append(optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=config.eps,
                             weight_decay=config.weight_decay,
                             mask=lambda p: decay_mask(p, decay_embeddings=config.decay_embeddings)))
    tx = optax.chain(*parts)
    if config.grad_accum > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=config.grad_accum).gradient_transformation()
    return tx


def optimizer_updates(opt_state, step) -> jax.Array:
    """Number of optimizer updates applied so far: MultiSteps' `gradient_step` if accumulating, else `step`."""
    if isinstance(opt_state, optax.MultiStepsState):
        return opt_state.gradient_step
    return jnp.asarray(step)
