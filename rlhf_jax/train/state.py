"""Immutable training states: every transition is `(state, batch) -> (state, metrics)`.

A state is a `flax.struct.dataclass` (a pytree): arrays are leaves (donated to the jitted step, checkpointed by
orbax), the optax transformation and the learning-rate schedule are static fields (part of the tree structure,
never traced). The reference model and the reward model are not in any state: they are plain params pytrees
passed as arguments to the steps (not trained, not donated).
"""
from __future__ import annotations

import math
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax

from rlhf_jax.models.config import ModelConfig
from rlhf_jax.train.optim import OptimConfig, make_optimizer, make_schedule, optimizer_updates


def as_key(rng):
    """An int seed -> `jax.random.PRNGKey(seed)`; a key is returned as is."""
    if isinstance(rng, int):
        return jax.random.PRNGKey(rng)
    return rng


def compute_copy(params, dtype):
    """A copy of params with every floating leaf cast to `dtype`, except norm parameters (the model reads those in
    float32): the operands the forward pass would cast the float32 master weights to. Every leaf is a new buffer
    (a state holding both trees is donated whole)."""
    def cast(path, x):
        keep = any("norm" in str(getattr(k, "key", "")) for k in path)
        return jnp.array(x, dtype=x.dtype if keep or not jnp.issubdtype(x.dtype, jnp.floating) else dtype)

    return jax.tree_util.tree_map_with_path(cast, params)


@flax.struct.dataclass
class TrainState:
    """Params, optimizer state, micro-step counter and rng of one trained model; optionally a copy of the params
    in the compute dtype (`compute_params`) that the training steps differentiate instead of casting the float32
    params every step."""

    params: Any
    opt_state: Any
    step: jax.Array                      # [] int32: apply_gradients calls (micro-steps under accumulation)
    rng: jax.Array                       # PRNG key, split by steps that need randomness
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)
    lr_schedule: Callable | None = flax.struct.field(pytree_node=False, default=None)
    compute_params: Any = None           # `compute_copy` of params, refreshed by apply_gradients; None: no copy

    @classmethod
    def create(cls, params, tx: optax.GradientTransformation, rng, *, lr_schedule=None,
               compute_dtype=None) -> "TrainState":
        """A fresh state: `tx.init(params)`, step 0. `rng` is a PRNG key or an int seed.

        `params` and the rng key are copied: the state is donated to the jitted steps, and the caller's arrays
        (often the same SFT params that serve as the frozen reference, or one key seeding several states) must
        stay valid. compute_dtype (e.g. "bfloat16"; None: off) keeps `compute_params`, a copy of the params in
        that dtype which the steps differentiate (see `forward_params`): the forward pass then reads 16-bit
        weights instead of casting the float32 ones every step, at 2 bytes per parameter of memory.
        """
        params = jax.tree.map(jnp.copy, params)
        compute = None if compute_dtype is None else compute_copy(params, compute_dtype)
        return cls(params=params, opt_state=tx.init(params), step=jnp.zeros((), jnp.int32),
                   rng=jnp.copy(as_key(rng)), tx=tx, lr_schedule=lr_schedule, compute_params=compute)

    def forward_params(self):
        """The params the steps differentiate: `compute_params` when the state keeps them, else `params`."""
        return self.params if self.compute_params is None else self.compute_params

    def master_grads(self, grads):
        """Gradients with respect to `forward_params()` in the params' dtypes (the float32 of the master weights;
        the values are those of the cast inside the forward pass, whose backward pass converts them too)."""
        if self.compute_params is None:
            return grads
        return jax.tree.map(lambda g, p: g.astype(p.dtype), grads, self.params)

    def apply_gradients(self, grads) -> "TrainState":
        """One optimizer call (under `optax.MultiSteps` the params move only every k-th call); a kept
        `compute_params` copy is refreshed from the new params."""
        updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
        params = optax.apply_updates(self.params, updates)
        compute = None if self.compute_params is None else jax.tree.map(
            lambda p, c: jnp.array(p, dtype=c.dtype), params, self.compute_params)
        return self.replace(params=params, opt_state=opt_state, step=self.step + 1, compute_params=compute)

    def learning_rate(self) -> jax.Array:
        """Learning rate of the next optimizer update (NaN if the state was made without a schedule)."""
        if self.lr_schedule is None:
            return jnp.asarray(jnp.nan, jnp.float32)
        return jnp.asarray(self.lr_schedule(optimizer_updates(self.opt_state, self.step)), jnp.float32)


def create_train_state(params, optim: OptimConfig, rng, *, total_steps: int | None = None,
                       compute_dtype=None) -> TrainState:
    """`TrainState.create` with `make_optimizer(optim)`; `total_steps` counts micro-steps (stage num_steps);
    compute_dtype: keep a copy of the params in that dtype (see `TrainState.create`)."""
    updates = None if total_steps is None else max(1, total_steps // optim.grad_accum)
    return TrainState.create(params, make_optimizer(optim, total_steps=updates), rng,
                             lr_schedule=make_schedule(optim, total_steps=updates), compute_dtype=compute_dtype)


@flax.struct.dataclass
class PPOState:
    """Policy and value model states, the (adaptive) KL coefficient, and the rollout rng."""

    policy: TrainState
    value: TrainState
    kl_coef: jax.Array                   # [] float32: beta of the per-token KL penalty
    rng: jax.Array
    step: jax.Array                      # [] int32: PPO iterations (rollout + update) done


def with_score_head(params, config: ModelConfig, rng):
    """`params` plus a fresh scalar "score_head" (kernel [D,1] ~ N(0, 1/(D+1)), bias [1] = 0).

    The init of Stiennon et al. 2020 / lm-human-preferences; turns an LM (e.g. the SFT policy) into the trunk
    of a reward or value model for `scalar_forward`. An existing head is replaced.
    """
    D = config.d_model
    kernel = jax.random.normal(as_key(rng), (D, 1), jnp.float32) / math.sqrt(D + 1)
    head = {"kernel": kernel.astype(config.params_dtype), "bias": jnp.zeros((1,), config.params_dtype)}
    return {**params, "score_head": head}


def normalize_score_head(params, scores, *, mean: float = 0.0, std: float = 1.0, eps: float = 1e-8):
    """Rescale the scalar "score_head" so that `scores` (this model's scores of a reference sample) get the target
    `mean` and `std`: every score s becomes mean + std * (s - mean(scores)) / std(scores).

    The reward gain and bias of lm-human-preferences (Ziegler et al. 2019; Huang et al. 2024): fitted on the
    initial policy's samples, the reward has mean 0 and std 1 at the start of PPO, so the KL coefficient, the EOS
    penalty and the value clip mean the same whatever scale a reward model happened to learn. Scores are affine in
    the head (s = h . kernel + bias), so the rescaled model is exact. Pure: returns new params.
    """
    if "score_head" not in params:
        raise ValueError("normalize_score_head: params have no 'score_head' (see with_score_head)")
    scores = jnp.asarray(scores, jnp.float32)
    gain = std / jnp.maximum(jnp.std(scores), eps)
    head = params["score_head"]
    kernel = (head["kernel"].astype(jnp.float32) * gain).astype(head["kernel"].dtype)
    bias = ((head["bias"].astype(jnp.float32) - jnp.mean(scores)) * gain + mean).astype(head["bias"].dtype)
    return {**params, "score_head": {**head, "kernel": kernel, "bias": bias}}
