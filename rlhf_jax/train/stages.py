"""The four stages (SFT, reward model, PPO, DPO): one config each and a loop around a compiled step.

`run_<stage>(state, data, config, *, model_config, ..., mesh=None, hooks=None) -> (state, history)`: `data` is an
iterable of numpy batches (the `rlhf_jax.data` contract), the loop runs `config.num_steps` steps (fewer if `data`
ends or a hook asks to stop). Metrics stay on device and are pulled to the host every `log_every` steps (one sync per
window): every step's loss is checked for NaN/Inf (raising `NonFiniteLossError` naming the first bad step), the
window's mean goes to `hooks.on_step(step, metrics)` and to `history`. Hooks (see `StageHooks`; JSONL,
TensorBoard, progress and checkpoint hooks live in `rlhf_jax.train.logging` / `checkpoint`) may also define
`on_state(step, state)` (called after every step; a checkpoint hook saves only finite states there) and
`finalize(step, state)` (called once at the end).

With a `mesh` (`sharding.make_mesh`), the state (params and optimizer state by the rule table, the rest
replicated) and the frozen models are placed on it, every step is compiled with explicit shardings
(`compile_step(..., mesh=...)`) and each batch is split over ("data", "fsdp") by `sharding.shard_batch`. In a
multi-host run every process calls the stage with the same initial state and feeds only its own rows of each
global batch (the global batch size must divide by data * fsdp). The returned state stays on the mesh.

The pipeline threads states: SFT params become the PPO/DPO reference and initial policy, and the reward
model params score PPO rollouts (and may initialise the value model).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Iterable, Literal, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from rlhf_jax import sharding as S
from rlhf_jax.models.config import ModelConfig
from rlhf_jax.train.optim import OptimConfig
from rlhf_jax.train.ppo import RewardFn, ppo_step
from rlhf_jax.train.state import PPOState, TrainState, as_key, create_train_state, with_score_head
from rlhf_jax.train.steps import compile_step, dpo_step, reference_logps, reward_step, sft_step


class StageHooks(Protocol):
    """What a stage calls; `on_state(step, state)` and `finalize(step, state)` are optional."""

    def on_step(self, step: int, metrics: dict[str, float]) -> None: ...

    def should_stop(self) -> bool: ...


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or Inf at `step`; `metrics` are that step's host metrics."""

    def __init__(self, step: int, metrics: dict):
        self.step, self.metrics = step, metrics
        bad = {k: v for k, v in metrics.items() if not math.isfinite(v)}
        super().__init__(f"non-finite loss at step {step}: {bad}. Training stopped; the last checkpoint (if any) "
                         "holds the last finite state. Lower the learning rate, enable gradient clipping "
                         "(OptimConfig.max_grad_norm) or check the data of this step.")


# ---------------------------------------------------------------------------------------------------- configs
@dataclasses.dataclass(frozen=True, kw_only=True)
class SFTConfig:
    """Supervised fine-tuning on chat transcripts (loss on assistant tokens)."""

    num_steps: int = 1000
    """Training steps (micro-batches; optimizer updates = num_steps // optim.grad_accum)."""
    log_every: int = 10
    """Pull metrics to the host, check the loss and call hooks every this many steps."""
    optim: OptimConfig = OptimConfig(learning_rate=2e-5, schedule="cosine")
    """Optimizer (TRL's SFT default learning rate 2e-5)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class RewardConfig:
    """Reward model: Bradley-Terry on preference pairs (Ouyang et al. 2022)."""

    num_steps: int = 1000
    """Training steps."""
    log_every: int = 10
    """Host metric pull / hook period."""
    center_coef: float = 0.0
    """Reward centering coefficient: + c * mean((r_c + r_r)^2) (Eisenstein et al. 2023 use 0.01)."""
    optim: OptimConfig = OptimConfig(learning_rate=1e-5)
    """Optimizer."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class DPOConfig:
    """Direct preference optimisation (Rafailov et al. 2023) and its variants."""

    num_steps: int = 1000
    """Training steps."""
    log_every: int = 10
    """Host metric pull / hook period."""
    beta: float = 0.1
    """Inverse temperature of the implicit reward beta * log(pi / ref) (paper and TRL default 0.1)."""
    loss_type: Literal["sigmoid", "robust", "hinge", "ipo"] = "sigmoid"
    """DPO (sigmoid), robust DPO, SLiC hinge or IPO (Azar et al. 2023); see losses.dpo_loss."""
    label_smoothing: float = 0.0
    """Assumed label-flip probability (conservative DPO / robust DPO)."""
    reference_free: bool = False
    """Use a uniform reference (ref logps = 0)."""
    rpo_alpha: float = 0.0
    """Weight of the chosen responses' per-token NLL added to the loss (RPO, Pang et al. 2024; 0: plain DPO)."""
    precompute_ref_logps: bool = False
    """Compute reference logps in a separate forward before each step, so the train step never holds the
    reference params (batches may also carry precomputed "ref_chosen_logps"/"ref_rejected_logps")."""
    optim: OptimConfig = OptimConfig(learning_rate=1e-6)
    """Optimizer (Rafailov et al. use 1e-6)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class PPOConfig:
    """PPO with a learned reward and a KL penalty to the reference (Ouyang et al. 2022; Huang et al. 2024)."""

    num_steps: int = 1000
    """PPO iterations (each: one rollout batch, then num_epochs x num_minibatches updates)."""
    log_every: int = 1
    """Host metric pull / hook period."""
    batch_size: int = 64
    """Prompts per rollout batch; the prompt data must yield batches of this size."""
    max_new_tokens: int = 53
    """Response length N (TRL's TL;DR default 53)."""
    temperature: float = 0.7
    """Sampling temperature; the training forward divides logits by it too (Huang et al. detail)."""
    eos_id: int = 258
    """End-of-sequence id (ByteTokenizer's); responses stop there. Must differ from pad_id."""
    pad_id: int = 256
    """Padding id of prompts and of response tokens after EOS."""
    kl_coef: float = 0.05
    """Initial KL penalty coefficient beta (TRL default 0.05)."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    """Per-token KL estimator in the reward (k1 = log pi - log ref, as InstructGPT)."""
    kl_target: float | None = None
    """Adaptive KL (Ziegler et al. 2019): target per-sequence KL in nats (they use 6); None keeps beta fixed."""
    kl_horizon: float = 10000.0
    """Adaptive KL horizon in samples."""
    gamma: float = 1.0
    """Discount."""
    lam: float = 0.95
    """GAE lambda."""
    clip_eps: float = 0.2
    """Policy ratio clip."""
    vf_clip: float | None = 0.2
    """Value clip around the rollout values; None disables."""
    vf_coef: float = 0.1
    """Value loss coefficient."""
    num_epochs: int = 4
    """Passes over each rollout batch."""
    num_minibatches: int = 4
    """Minibatches per epoch (batch_size must be divisible by it)."""
    whiten_rewards: bool = False
    """Rescale per-token rewards to unit variance before GAE."""
    missing_eos_penalty: float | None = None
    """Subtract this from the score of responses without EOS (TRL's missing_eos_penalty; Huang et al. use 1)."""
    entropy_coef: float = 0.0
    """Entropy bonus coefficient (0 in InstructGPT and TRL)."""
    ptx_coef: float = 0.0
    """PPO-ptx: weight of the pretraining NLL mixed into the policy loss (InstructGPT gamma = 27.8); needs
    ptx_data."""
    value_init: Literal["reward", "policy"] = "reward"
    """Initialise the value model from the reward model, or from the policy with a fresh scalar head."""
    optim: OptimConfig = OptimConfig(learning_rate=3e-6, eps=1e-5)
    """Policy optimizer (TRL's PPO learning rate 3e-6; Adam eps 1e-5 as lm-human-preferences)."""
    value_optim: OptimConfig | None = None
    """Value optimizer; None uses `optim`."""

    def __post_init__(self):
        if self.eos_id == self.pad_id:
            raise ValueError("PPOConfig: eos_id and pad_id must differ (Huang et al.: a shared id hides EOS)")
        if self.temperature <= 0:
            raise ValueError(f"PPOConfig.temperature must be > 0 for PPO, got {self.temperature}")
        if self.batch_size % self.num_minibatches:
            raise ValueError(f"PPOConfig.batch_size={self.batch_size} is not divisible by "
                             f"num_minibatches={self.num_minibatches}")


# ------------------------------------------------------------------------------------------------- the loop
def _device_batch(batch):
    """Drop host-side entries (e.g. "meta" lists) from a possibly nested batch dict."""
    out = {}
    for k, v in batch.items():
        if isinstance(v, dict):
            out[k] = _device_batch(v)
        elif isinstance(v, (np.ndarray, jax.Array, np.generic)):
            out[k] = v
    return out


def _flush(pending, history, hooks, loss_keys):
    host = jax.device_get([m for _, m in pending])
    for (step, _), m in zip(pending, host):
        m = {k: float(v) for k, v in m.items()}
        if any(not math.isfinite(m[k]) for k in loss_keys if k in m):
            raise NonFiniteLossError(step, m)
    step = pending[-1][0]
    mean = {k: float(np.mean([m[k] for m in host])) for k in host[-1]}
    history.append({"step": step, **mean})
    if hooks is not None:
        hooks.on_step(step, mean)


def run_loop(state, data: Iterable, step_fn: Callable, *, num_steps: int, log_every: int = 1,
             hooks: StageHooks | None = None, loss_keys=("loss",)):
    """Run `state, metrics = step_fn(state, batch)` over `data` for `num_steps` steps -> (state, history)."""
    if log_every < 1:
        raise ValueError(f"log_every must be >= 1, got {log_every}")
    start = int(jax.device_get(state.step))
    history, pending, step = [], [], start
    batches = iter(data)
    for i in range(num_steps):
        if hooks is not None and hooks.should_stop():
            break
        try:
            batch = next(batches)
        except StopIteration:
            break
        state, metrics = step_fn(state, _device_batch(batch))
        step = start + i + 1
        pending.append((step, metrics))
        if step % log_every == 0 or i == num_steps - 1:
            _flush(pending, history, hooks, loss_keys)
            pending = []
        if hooks is not None and hasattr(hooks, "on_state"):
            hooks.on_state(step, state)
    if pending:
        _flush(pending, history, hooks, loss_keys)
    if hooks is not None and hasattr(hooks, "finalize"):
        hooks.finalize(step, state)
    return state, history


# ---------------------------------------------------------------------------------------------------- stages
def _on_mesh(state, mesh: Mesh | None, params_sh) -> tuple:
    """(state placed on `mesh`, compile_step's sharding options); (state, {}) without a mesh."""
    if mesh is None:
        return state, {}
    state_sh = S.state_sharding(state, params_sh, mesh)
    return S.shard(state, state_sh), {"mesh": mesh, "state_sharding": state_sh}


def _place_batch(batch, mesh: Mesh | None):
    """Process-local numpy rows -> global arrays split over ("data", "fsdp"); unchanged without a mesh."""
    return batch if mesh is None else S.shard_batch(batch, mesh)


def _params_sh(model_config, mesh, *, scalar_head=False):
    return None if mesh is None else S.params_sharding(model_config, mesh, scalar_head=scalar_head)


def run_sft(state: TrainState, data: Iterable, config: SFTConfig, *, model_config: ModelConfig,
            mesh: Mesh | None = None, hooks: StageHooks | None = None):
    """SFT over SFT batches; see `steps.sft_step`. `mesh`: run sharded (see the module docstring)."""
    state, placed = _on_mesh(state, mesh, _params_sh(model_config, mesh))
    step = compile_step(sft_step, model_config=model_config, **placed)
    return run_loop(state, data, lambda s, b: step(s, _place_batch(b, mesh)), num_steps=config.num_steps,
                    log_every=config.log_every, hooks=hooks)


def run_reward(state: TrainState, data: Iterable, config: RewardConfig, *, model_config: ModelConfig,
               mesh: Mesh | None = None, hooks: StageHooks | None = None):
    """Reward-model training over preference batches; `state.params` need a "score_head" (`with_score_head`)."""
    state, placed = _on_mesh(state, mesh, _params_sh(model_config, mesh, scalar_head=True))
    step = compile_step(reward_step, model_config=model_config, center_coef=config.center_coef, **placed)
    return run_loop(state, data, lambda s, b: step(s, _place_batch(b, mesh)), num_steps=config.num_steps,
                    log_every=config.log_every, hooks=hooks)


def run_dpo(state: TrainState, data: Iterable, config: DPOConfig, *, model_config: ModelConfig, ref_params=None,
            mesh: Mesh | None = None, hooks: StageHooks | None = None):
    """DPO over preference batches with a frozen reference (`ref_params`, e.g. the SFT params)."""
    if ref_params is None and not config.reference_free:
        raise ValueError("run_dpo needs ref_params (usually the SFT params) unless DPOConfig.reference_free")
    params_sh = _params_sh(model_config, mesh)
    state, placed = _on_mesh(state, mesh, params_sh)
    if mesh is not None and ref_params is not None:
        ref_params = S.shard(ref_params, params_sh)
    steps = {}

    def step_for(needs_ref: bool):
        """The compiled step taking the reference params, or None in their place (logps in the batch)."""
        if needs_ref not in steps:
            extra = {} if mesh is None else {"extra_in_shardings": (params_sh if needs_ref else None,)}
            steps[needs_ref] = compile_step(dpo_step, model_config=model_config, beta=config.beta,
                                            loss_type=config.loss_type, label_smoothing=config.label_smoothing,
                                            reference_free=config.reference_free, rpo_alpha=config.rpo_alpha,
                                            **placed, **extra)
        return steps[needs_ref]

    # Precomputed reference logps [B] are batch entries: under a mesh they get the batch's sharding.
    ref_fn = jax.jit(reference_logps, static_argnames=("model_config",),
                     **({} if mesh is None else {"out_shardings": S.batch_sharding(mesh)}))

    def step_fn(state, batch):
        batch = _place_batch(batch, mesh)
        if config.precompute_ref_logps and not config.reference_free and "ref_chosen_logps" not in batch:
            batch = {**batch, **ref_fn(ref_params, batch, model_config=model_config)}
        needs_ref = "ref_chosen_logps" not in batch and not config.reference_free
        return step_for(needs_ref)(state, batch, ref_params if needs_ref else None)

    return run_loop(state, data, step_fn, num_steps=config.num_steps, log_every=config.log_every, hooks=hooks)


def init_ppo_state(policy_params, config: PPOConfig, *, model_config: ModelConfig, rng, reward_params=None
                   ) -> PPOState:
    """Policy and value TrainStates (value from the reward model or the policy per `config.value_init`).

    Params are copied, so the caller's SFT / reward params stay valid as the frozen reference and reward model
    while the state is donated to the step.
    """
    k_policy, k_value, k_head, k_state = jax.random.split(as_key(rng), 4)
    if config.value_init == "reward":
        if reward_params is None:
            raise ValueError("PPOConfig.value_init='reward' needs reward_params (or use value_init='policy')")
        value_params = reward_params
    elif config.value_init == "policy":
        value_params = with_score_head(policy_params, model_config, k_head)
    else:
        raise ValueError(f"unknown PPOConfig.value_init={config.value_init!r}; choose 'reward' or 'policy'")
    updates = config.num_steps * config.num_epochs * config.num_minibatches
    return PPOState(
        policy=create_train_state(policy_params, config.optim, k_policy, total_steps=updates),
        value=create_train_state(value_params, config.value_optim or config.optim, k_value, total_steps=updates),
        kl_coef=jnp.asarray(config.kl_coef, jnp.float32), rng=k_state,
        step=jnp.zeros((), jnp.int32))


def run_ppo(state: PPOState, data: Iterable, config: PPOConfig, *, model_config: ModelConfig, ref_params,
            reward_params=None, reward_fn: RewardFn | None = None, ptx_data: Iterable | None = None,
            mesh: Mesh | None = None, hooks: StageHooks | None = None):
    """PPO over prompt batches {"prompts", "prompt_mask"}; scores from `reward_params` or `reward_fn`.

    `ptx_data` (SFT batches) feeds PPO-ptx when `config.ptx_coef > 0`. Under a multi-host `mesh` each prompt
    batch holds this process's batch_size / process_count rows.
    """
    if reward_params is None and reward_fn is None:
        raise ValueError("run_ppo needs reward_params (a reward model with a score_head) or a reward_fn")
    if config.ptx_coef > 0 and ptx_data is None:
        raise ValueError("PPOConfig.ptx_coef > 0 needs ptx_data (an iterable of SFT batches)")
    reward_params = reward_params if reward_fn is None else None
    policy_sh = _params_sh(model_config, mesh)
    value_sh = _params_sh(model_config, mesh, scalar_head=True)      # value and reward models: scalar heads
    state, placed = _on_mesh(state, mesh, [policy_sh, value_sh])
    if mesh is not None:
        # ref, reward model, ptx batch; an argument passed as None gets None
        placed["extra_in_shardings"] = (policy_sh, None if reward_params is None else value_sh,
                                        None if ptx_data is None or config.ptx_coef <= 0 else S.batch_sharding(mesh))
        ref_params = S.shard(ref_params, policy_sh)
        reward_params = None if reward_params is None else S.shard(reward_params, value_sh)
    step = compile_step(ppo_step, config=config, model_config=model_config, reward_fn=reward_fn, **placed)
    ptx_iter = iter(ptx_data) if ptx_data is not None and config.ptx_coef > 0 else None
    processes = jax.process_count() if mesh is not None else 1

    def step_fn(state, batch):
        if batch["prompts"].shape[0] * processes != config.batch_size:
            per = f" in each of {processes} processes" if processes > 1 else ""
            raise ValueError(f"prompt batch has {batch['prompts'].shape[0]} rows{per} but PPOConfig.batch_size="
                             f"{config.batch_size}")
        ptx = _place_batch(_device_batch(next(ptx_iter)), mesh) if ptx_iter is not None else None
        return step(state, _place_batch(batch, mesh), ref_params, reward_params, ptx)

    return run_loop(state, data, step_fn, num_steps=config.num_steps, log_every=config.log_every, hooks=hooks,
                    loss_keys=("loss/policy", "loss/value"))
