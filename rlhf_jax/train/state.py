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


@flax.struct.dataclass
class TrainState:
    """Params, optimizer state, micro-step counter and rng of one trained model."""

    params: Any
    opt_state: Any
    step: jax.Array                      # [] int32: apply_gradients calls (micro-steps under accumulation)
    rng: jax.Array                       # PRNG key, split by steps that need randomness
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)
    lr_schedule: Callable | None = flax.struct.field(pytree_node=False, default=None)

    @classmethod
    def create(cls, params, tx: optax.GradientTransformation, rng, *, lr_schedule=None) -> "TrainState":
        """A fresh state: `tx.init(params)`, step 0. `rng` is a PRNG key or an int seed.

        `params` and the rng key are copied: the state is donated to the jitted steps, and the caller's arrays
        (often the same SFT params that serve as the frozen reference, or one key seeding several states) must
        stay valid.
        """
        params = jax.tree.map(jnp.copy, params)
        return cls(params=params, opt_state=tx.init(params), step=jnp.zeros((), jnp.int32),
                   rng=jnp.copy(as_key(rng)), tx=tx, lr_schedule=lr_schedule)

    def apply_gradients(self, grads) -> "TrainState":
        """One optimizer call (under `optax.MultiSteps` the params move only every k-th call)."""
        updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
        return self.replace(params=optax.apply_updates(self.params, updates), opt_state=opt_state,
                            step=self.step + 1)

    def learning_rate(self) -> jax.Array:
        """Learning rate of the next optimizer update (NaN if the state was made without a schedule)."""
        if self.lr_schedule is None:
            return jnp.asarray(jnp.nan, jnp.float32)
        return jnp.asarray(self.lr_schedule(optimizer_updates(self.opt_state, self.step)), jnp.float32)


def create_train_state(params, optim: OptimConfig, rng, *, total_steps: int | None = None) -> TrainState:
    """`TrainState.create` with `make_optimizer(optim)`; `total_steps` counts micro-steps (stage num_steps)."""
    updates = None if total_steps is None else max(1, total_steps // optim.grad_accum)
    return TrainState.create(params, make_optimizer(optim, total_steps=updates), rng,
                             lr_schedule=make_schedule(optim, total_steps=updates))


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
