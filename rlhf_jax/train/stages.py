"""The stages (SFT, reward model, DPO and the preference family, KTO, online DPO, PPO, GRPO): a loop around a compiled step (configs live beside the steps).

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

`run_grpo_env` is GRPO on multi-turn episodes with environments (tools, users; `train/multiturn.py`): its data are
batches of tasks, not prompts.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Iterable

import jax
import numpy as np
from jax.sharding import Mesh

from rlhf_jax import sharding as S
from rlhf_jax.envs import EpisodeBudget
from rlhf_jax.lora import lora_sharding
from rlhf_jax.models.config import ModelConfig
from rlhf_jax.train.logging import StageHooks
from rlhf_jax.train.grpo import (COMPLETIONS_TABLE, GRPOConfig, completion_rows, grpo_sample, grpo_step,
                                 grpo_update)
from rlhf_jax.train.multiturn import conversation_slots, make_turn_sampler, rollout_episodes, rollout_metrics
from rlhf_jax.train.online_dpo import (OnlineDPOConfig, judge_agreement, online_dpo_sample, online_dpo_update,
                                      pair_rows)
from rlhf_jax.train.ppo import PPOConfig, init_ppo_state, ppo_sample, ppo_step, ppo_update_scored
from rlhf_jax.train.rl import HostRewardFn, RewardFn, host_scores, reward_model_scores
from rlhf_jax.train.state import PPOState, TrainState
from rlhf_jax.train.steps import (DPOConfig, KTOConfig, RewardConfig, SFTConfig, compile_step, dpo_step, kto_step,
                                  reference_logps, reward_step, sft_step)


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or Inf at `step`; `metrics` are that step's host metrics."""

    def __init__(self, step: int, metrics: dict):
        self.step, self.metrics = step, metrics
        bad = {k: v for k, v in metrics.items() if not math.isfinite(v)}
        super().__init__(f"non-finite loss at step {step}: {bad}. Training stopped; the last checkpoint (if any) "
                         "holds the last finite state. Lower the learning rate, enable gradient clipping "
                         "(OptimConfig.max_grad_norm) or check the data of this step.")


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
    hooks.on_step(step, mean)


def run_loop(state, data: Iterable, step_fn: Callable, *, num_steps: int, log_every: int = 1,
             hooks: StageHooks | None = None, loss_keys=("loss",), updates_per_step: int = 1):
    """Run `state, metrics = step_fn(state, batch)` over `data` for `num_steps` steps -> (state, history).

    Steps are numbered on from `state.step // updates_per_step` (a GRPO iteration makes several updates)."""
    if log_every < 1:
        raise ValueError(f"log_every must be >= 1, got {log_every}")
    hooks = StageHooks() if hooks is None else hooks
    start = int(jax.device_get(state.step)) // updates_per_step
    history, pending, step = [], [], start
    batches = iter(data)
    for i in range(num_steps):
        if hooks.should_stop():
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
        hooks.on_state(step, state)
    if pending:
        _flush(pending, history, hooks, loss_keys)
    hooks.finalize(step, state)
    return state, history


# ---------------------------------------------------------------------------------------------------- stages
def _place_batch(batch, mesh: Mesh | None):
    """Process-local numpy rows -> global arrays split over ("data", "fsdp"); unchanged without a mesh."""
    return batch if mesh is None else S.shard_batch(batch, mesh)


def _place_models(state, mesh: Mesh | None, model_config, state_heads, frozen=(), frozen_heads=(), *,
                  batch_args=()):
    """The sharding prologue of every stage: (state, compile_step's options, frozen params) placed on `mesh`.

    `state_heads`: for the state's params (one bool, or one per model of a multi-model state), whether they carry
    a scalar head. `frozen`: params passed to the step as extra positional arguments (reference, reward model;
    None for an absent one), with `frozen_heads` likewise; `batch_args`: one bool per extra argument after them,
    batch-sharded when True, absent (None) when False.
    Without a mesh everything is returned as is, with no options.
    """
    if mesh is None:
        return state, {}, list(frozen)
    sh = lambda head: S.params_sharding(model_config, mesh, scalar_head=head)  # noqa: E731
    params_sh = [sh(h) for h in state_heads] if isinstance(state_heads, (list, tuple)) else sh(state_heads)
    state_sh = S.state_sharding(state, params_sh, mesh)
    frozen_sh = [None if p is None else sh(h) for p, h in zip(frozen, frozen_heads)]
    extra = tuple(frozen_sh) + tuple(S.batch_sharding(mesh) if b else None for b in batch_args)
    placed = {"mesh": mesh, "state_sharding": state_sh, "extra_in_shardings": extra}
    return (S.shard(state, state_sh), placed,
            [None if p is None else S.shard(p, s) for p, s in zip(frozen, frozen_sh)])


def _lora_state(state, lora, base_params, mesh, model_config, stage):
    """LoRA's prologue: check the pairing of `lora` and `base_params`; under a mesh the adapters are split like
    their kernels' input and output axes (`lora.lora_sharding`) and the frozen base like any params.
    -> (state, compile options, base)."""
    if (lora is None) != (base_params is None):
        raise ValueError(f"{stage}: lora and base_params go together (the state holds the adapters of base_params)")
    if mesh is None:
        return state, {}, base_params
    adapters_sh = lora_sharding(state.params, model_config, mesh)
    state_sh = S.state_sharding(state, adapters_sh, mesh)
    base_sh = S.params_sharding(model_config, mesh, scalar_head="score_head" in base_params)
    placed = {"mesh": mesh, "state_sharding": state_sh, "extra_in_shardings": (base_sh,)}
    return S.shard(state, state_sh), placed, S.shard(base_params, base_sh)


def run_sft(state: TrainState, data: Iterable, config: SFTConfig, *, model_config: ModelConfig,
            mesh: Mesh | None = None, hooks: StageHooks | None = None, lora=None, base_params=None):
    """SFT over SFT batches; see `steps.sft_step`. `mesh`: run sharded (see the module docstring).

    LoRA: `lora` (a `rlhf_jax.lora.LoraConfig`) with `state` made from the adapters (`init_lora`) and the frozen
    `base_params`: the optimizer state holds the adapters only, the base is neither donated nor copied."""
    if lora is not None or base_params is not None:
        state, placed, base = _lora_state(state, lora, base_params, mesh, model_config, "run_sft")
        step = compile_step(sft_step, model_config=model_config, lora=lora, **placed)
        return run_loop(state, data, lambda s, b: step(s, _place_batch(b, mesh), base),
                        num_steps=config.num_steps, log_every=config.log_every, hooks=hooks)
    state, placed, _ = _place_models(state, mesh, model_config, False)
    step = compile_step(sft_step, model_config=model_config, **placed)
    return run_loop(state, data, lambda s, b: step(s, _place_batch(b, mesh)), num_steps=config.num_steps,
                    log_every=config.log_every, hooks=hooks)


def run_reward(state: TrainState, data: Iterable, config: RewardConfig, *, model_config: ModelConfig,
               mesh: Mesh | None = None, hooks: StageHooks | None = None, lora=None, base_params=None):
    """Reward-model training over preference batches; `state.params` need a "score_head" (`with_score_head`).

    LoRA: `state` made from {**init_lora(...), "score_head": ...} with `lora` and the frozen `base_params`."""
    if lora is not None or base_params is not None:
        state, placed, base = _lora_state(state, lora, base_params, mesh, model_config, "run_reward")
        step = compile_step(reward_step, model_config=model_config, center_coef=config.center_coef, lora=lora,
                            **placed)
        return run_loop(state, data, lambda s, b: step(s, _place_batch(b, mesh), base),
                        num_steps=config.num_steps, log_every=config.log_every, hooks=hooks)
    state, placed, _ = _place_models(state, mesh, model_config, True)
    step = compile_step(reward_step, model_config=model_config, center_coef=config.center_coef, **placed)
    return run_loop(state, data, lambda s, b: step(s, _place_batch(b, mesh)), num_steps=config.num_steps,
                    log_every=config.log_every, hooks=hooks)


def run_dpo(state: TrainState, data: Iterable, config: DPOConfig, *, model_config: ModelConfig, ref_params=None,
            mesh: Mesh | None = None, hooks: StageHooks | None = None, lora=None):
    """DPO-family preference optimisation with a frozen reference (`ref_params`, e.g. the SFT params).

    SimPO and ORPO (`config.loss_type`) and `reference_free` need no reference: `ref_params` may be None and no
    reference forward runs. LoRA: with `lora`, `state` holds the adapters of `ref_params`, which serve as the
    policy's frozen base and as the reference (the base with the adapters off): no second copy of the weights."""
    if ref_params is None and (config.needs_reference or lora is not None):
        raise ValueError("run_dpo needs ref_params (usually the SFT params) unless the loss is reference-free "
                         "(DPOConfig.reference_free, or loss_type 'simpo'/'orpo'); with lora always: they are the "
                         "adapters' base")
    if lora is not None:
        state, placed, ref_params = _lora_state(state, lora, ref_params, mesh, model_config, "run_dpo")
    else:
        ref_params = ref_params if config.needs_reference else None
        state, placed, (ref_params,) = _place_models(state, mesh, model_config, False, [ref_params], [False])
    steps = {}

    def step_for(needs_ref: bool):
        """The compiled step taking the reference params, or None in their place (logps in the batch)."""
        if needs_ref not in steps:
            opts = placed if needs_ref or mesh is None else {**placed, "extra_in_shardings": (None,)}
            steps[needs_ref] = compile_step(dpo_step, model_config=model_config, beta=config.beta,
                                            loss_type=config.loss_type, label_smoothing=config.label_smoothing,
                                            reference_free=config.reference_free, rpo_alpha=config.rpo_alpha,
                                            simpo_gamma=config.simpo_gamma, orpo_lambda=config.orpo_lambda,
                                            lora=lora, **opts)
        return steps[needs_ref]

    # Precomputed reference logps [B] are batch entries: under a mesh they get the batch's sharding.
    ref_fn = jax.jit(reference_logps, static_argnames=("model_config",),
                     **({} if mesh is None else {"out_shardings": S.batch_sharding(mesh)}))

    def step_fn(state, batch):
        batch = _place_batch(batch, mesh)
        if config.precompute_ref_logps and config.needs_reference and "ref_chosen_logps" not in batch:
            batch = {**batch, **ref_fn(ref_params, batch, model_config=model_config)}
        needs_ref = lora is not None or ("ref_chosen_logps" not in batch and config.needs_reference)
        return step_for(needs_ref)(state, batch, ref_params if needs_ref else None)

    return run_loop(state, data, step_fn, num_steps=config.num_steps, log_every=config.log_every, hooks=hooks)


def run_kto(state: TrainState, data: Iterable, config: KTOConfig, *, model_config: ModelConfig, ref_params,
            mesh: Mesh | None = None, hooks: StageHooks | None = None, lora=None):
    """KTO over unpaired batches (`rlhf_jax.data.Batches(kind="unpaired")`) with a frozen reference (`ref_params`,
    usually the SFT params; with `lora`, also the adapters' base)."""
    if ref_params is None:
        raise ValueError("run_kto needs ref_params (usually the SFT params): KTO's implicit reward is "
                         "log pi - log ref")
    if lora is not None:
        state, placed, ref_params = _lora_state(state, lora, ref_params, mesh, model_config, "run_kto")
    else:
        state, placed, (ref_params,) = _place_models(state, mesh, model_config, False, [ref_params], [False])
    step = compile_step(kto_step, model_config=model_config, beta=config.beta,
                        desirable_weight=config.desirable_weight, undesirable_weight=config.undesirable_weight,
                        lora=lora, **placed)
    return run_loop(state, data, lambda s, b: step(s, _place_batch(b, mesh), ref_params),
                    num_steps=config.num_steps, log_every=config.log_every, hooks=hooks)


def _log_samples(metrics: dict, iteration: list[int], every: int, hooks, tokenizer, conversations=None) -> dict:
    """Counts one iteration; takes the completions table (if the step made one) out of `metrics` and, every
    `every` iterations, hands its rows to the hooks' `on_samples`; with `conversations` (an environment
    rollout's messages, row by row) each row also gets its whole "conversation" (the completion holds the
    policy's tokens only). Returns the scalar metrics."""
    table = metrics.pop(COMPLETIONS_TABLE, None)
    iteration[0] += 1
    if table is not None and hooks is not None and iteration[0] % every == 0:
        rows = completion_rows(table, tokenizer)
        if conversations is not None:
            rows = [row | {"conversation": [dict(m) for m in chat]} for row, chat in zip(rows, conversations)]
        hooks.on_samples(iteration[0], rows)
    return metrics


def _reward_source(reward_params, reward_fn, host_reward_fn, tokenizer, mesh, stage: str):
    """Check that exactly one reward source is given; -> the reward-model params (None unless they score)."""
    given = [reward_params is not None and reward_fn is None and host_reward_fn is None, reward_fn is not None,
             host_reward_fn is not None]
    if sum(given) != 1:
        raise ValueError(f"{stage} needs exactly one reward source: reward_params (a reward model with a "
                         "score_head), reward_fn (jittable) or host_reward_fn (with tokenizer)")
    if host_reward_fn is not None and (tokenizer is None or mesh is not None):
        raise ValueError(f"{stage}: host_reward_fn needs a tokenizer (to decode the texts) and runs without a mesh")
    return reward_params if given[0] else None


def _host_scored(sample_fn, update_fn, host_reward_fn, tokenizer, opts, *, sample_with_ref: bool = False):
    """An iteration scored on the host: a compiled sample, the reward function on the decoded texts, a compiled
    update; called like the one-program step, (state, batch, *frozen, ...) with the reward model's slot unused.
    `sample_with_ref`: the sample also takes the reference params (LoRA: they are the adapters' base)."""
    sample_step = jax.jit(sample_fn, static_argnames=tuple(opts))
    update_step = compile_step(update_fn, **opts)

    def step(state, batch, ref_params, _reward_params, *extra):
        frozen = (ref_params,) if sample_with_ref else ()
        state, episodes, key = sample_step(state, batch, *frozen, **opts)
        return update_step(state, episodes, host_scores(host_reward_fn, tokenizer, batch, episodes), key,
                           ref_params, *extra)

    return step


def _check_rows(batch, expected: int, processes: int, name: str):
    if batch["prompts"].shape[0] * processes != expected:
        per = f" in each of {processes} processes" if processes > 1 else ""
        raise ValueError(f"prompt batch has {batch['prompts'].shape[0]} rows{per} but {name}.batch_size={expected}")


def run_ppo(state: PPOState, data: Iterable, config: PPOConfig, *, model_config: ModelConfig, ref_params,
            reward_params=None, reward_fn: RewardFn | None = None, host_reward_fn: HostRewardFn | None = None,
            tokenizer=None, ptx_data: Iterable | None = None, mesh: Mesh | None = None,
            hooks: StageHooks | None = None, lora=None):
    """PPO over prompt batches {"prompts", "prompt_mask"}; scores from exactly one of `reward_params` (a reward
    model), `reward_fn` (jittable) or `host_reward_fn` (a function of decoded prompt and response texts, with
    `tokenizer`: each iteration is then a compiled sample, the host call, and a compiled update).

    `ptx_data` (SFT batches) feeds PPO-ptx when `config.ptx_coef > 0`. Under a multi-host `mesh` each prompt
    batch holds this process's batch_size / process_count rows. With `lora` (`init_ppo_state(..., lora=)`), the
    states hold adapters of `ref_params` (and of the reward model for the value); one device only for now.
    """
    reward_params = _reward_source(reward_params, reward_fn, host_reward_fn, tokenizer, mesh, "run_ppo")
    if lora is not None and mesh is not None:
        raise ValueError("run_ppo: lora with a mesh is not supported yet; run LoRA PPO without --mesh")
    if lora is not None and host_reward_fn is not None and config.value_init == "reward":
        raise ValueError("run_ppo: a host reward has no reward model to initialise the value from; use "
                         "PPOConfig(value_init='policy')")
    if config.ptx_coef > 0 and ptx_data is None:
        raise ValueError("PPOConfig.ptx_coef > 0 needs ptx_data (an iterable of SFT batches)")
    use_ptx = config.ptx_coef > 0
    state, placed, (ref_params, reward_params) = _place_models(
        state, mesh, model_config, [False, True], [ref_params, reward_params], [False, True],
        batch_args=(use_ptx,))
    ptx_iter = iter(ptx_data) if use_ptx else None
    processes = jax.process_count() if mesh is not None else 1
    opts = dict(config=config, model_config=model_config, lora=lora)
    step = (compile_step(ppo_step, reward_fn=reward_fn, **opts, **placed) if host_reward_fn is None
            else _host_scored(ppo_sample, ppo_update_scored, host_reward_fn, tokenizer, opts,
                              sample_with_ref=lora is not None))

    iteration = [int(jax.device_get(state.step))]

    def step_fn(state, batch):
        _check_rows(batch, config.batch_size, processes, "PPOConfig")
        ptx = _place_batch(_device_batch(next(ptx_iter)), mesh) if ptx_iter is not None else None
        state, metrics = step(state, _place_batch(batch, mesh), ref_params, reward_params, ptx)
        return state, _log_samples(metrics, iteration, config.completions_every, hooks, tokenizer)

    return run_loop(state, data, step_fn, num_steps=config.num_steps, log_every=config.log_every, hooks=hooks,
                    loss_keys=("loss/policy", "loss/value"))


def run_grpo(state: TrainState, data: Iterable, config: GRPOConfig, *, model_config: ModelConfig, ref_params=None,
             reward_params=None, reward_fn: RewardFn | None = None, host_reward_fn: HostRewardFn | None = None,
             tokenizer=None, mesh: Mesh | None = None, hooks: StageHooks | None = None, lora=None):
    """The GRPO family over prompt batches {"prompts", "prompt_mask"} (`train/grpo.py`); rewards as `run_ppo`.

    `ref_params` (the frozen reference, usually the SFT params) are needed only when `config.kl_coef > 0`; with
    0 they are not read, not placed and not passed. With `lora`, `state` holds adapters of `ref_params`, which
    are then always needed: the policy's frozen base and, with the adapters off, the reference (one copy).
    """
    reward_params = _reward_source(reward_params, reward_fn, host_reward_fn, tokenizer, mesh, "run_grpo")
    if (config.uses_reference or lora is not None) and ref_params is None:
        raise ValueError("run_grpo: GRPOConfig.kl_coef > 0 (or lora) needs ref_params (usually the SFT params)")
    if lora is not None and mesh is not None:
        raise ValueError("run_grpo: lora with a mesh is not supported yet; run LoRA GRPO without --mesh")
    ref_params = ref_params if config.uses_reference or lora is not None else None
    state, placed, (ref_params, reward_params) = _place_models(
        state, mesh, model_config, False, [ref_params, reward_params], [False, True])
    processes = jax.process_count() if mesh is not None else 1
    opts = dict(config=config, model_config=model_config, lora=lora)
    step = (compile_step(grpo_step, reward_fn=reward_fn, **opts, **placed) if host_reward_fn is None
            else _host_scored(grpo_sample, grpo_update, host_reward_fn, tokenizer, opts,
                              sample_with_ref=lora is not None))

    updates = config.updates_per_iteration
    iteration = [int(jax.device_get(state.step)) // updates]

    def step_fn(state, batch):
        _check_rows(batch, config.batch_size, processes, "GRPOConfig")
        state, metrics = step(state, _place_batch(batch, mesh), ref_params, reward_params)
        return state, _log_samples(metrics, iteration, config.completions_every, hooks, tokenizer)

    return run_loop(state, data, step_fn, num_steps=config.num_steps, log_every=config.log_every, hooks=hooks,
                    updates_per_step=updates)


class _TaskFeed:
    """Task batches beside `run_loop`'s device batches: each step takes `current` (the loop sees an empty dict)."""

    def __init__(self, tasks: Iterable):
        self.tasks, self.current = iter(tasks), None

    def __iter__(self):
        return self

    def __next__(self):
        self.current = list(next(self.tasks))
        return {}


def _turn_sampler(sampling, model_config, lora, budget, prompt_len, suffix_len):
    """(params, base_params) -> a rollout's `sample_fn`: re-prefilling each turn, or with `suffix_len` keeping the
    conversation's KV cache (`rollout_episodes`)."""
    slots = None if suffix_len is None else conversation_slots(
        prompt_len=prompt_len, max_new_tokens=sampling.max_new_tokens, max_turns=budget.max_turns,
        suffix_len=suffix_len)
    turn = make_turn_sampler(sampling=sampling, model_config=model_config, lora=lora, conversation_slots=slots)
    return lambda params, base: functools.partial(turn, params, base)


def run_grpo_env(state: TrainState, tasks: Iterable, config: GRPOConfig, *, model_config: ModelConfig,
                 env_factory: Callable, tokenizer, budget: EpisodeBudget, prompt_len: int, seq_len: int,
                 ref_params=None, chat_format=None, hooks: StageHooks | None = None, lora=None,
                 suffix_len: int | None = None):
    """The GRPO family on multi-turn episodes with environments (`train/multiturn.py`): each iteration runs
    `config.num_generations` episodes of each task of a batch (`tasks` yields lists of `config.batch_size`
    tasks; `env_factory()` makes one environment per episode) and passes them, with each episode's summed
    environment reward as its score, to the same compiled `grpo_update` as `run_grpo`: group advantages over a
    task's episodes, the loss only on the policy's tokens. Episodes hold `seq_len` tokens, the first
    `prompt_len` for the opening prompt; the update's token budget (Dr. GRPO's constant) is `seq_len -
    prompt_len`. The rollout metrics ("tools/calls", "tools/malformed_calls", "turns/mean", ...) join the
    update's. One device; `ref_params` and `lora` as in `run_grpo`. `suffix_len`: keep the KV cache across
    turns (`rollout_episodes`' suffix_len); None re-prefills each turn.
    """
    if (config.uses_reference or lora is not None) and ref_params is None:
        raise ValueError("run_grpo_env: GRPOConfig.kl_coef > 0 (or lora) needs ref_params (usually the SFT params)")
    if config.overlong_buffer is not None:
        raise ValueError("run_grpo_env: overlong_buffer (DAPO's length penalty of one response) is not defined on "
                         "multi-turn episodes; use the EpisodeBudget's max_tokens")
    ref_params = ref_params if config.uses_reference or lora is not None else None
    update_config = dataclasses.replace(
        config, sampling=dataclasses.replace(config.sampling, max_new_tokens=seq_len - prompt_len))
    sampler = _turn_sampler(config.sampling, model_config, lora, budget, prompt_len, suffix_len)
    update = compile_step(grpo_update, config=update_config, model_config=model_config, lora=lora)
    iteration = [int(jax.device_get(state.step)) // config.updates_per_iteration]
    feed = _TaskFeed(tasks)

    def step_fn(state, _):
        batch = feed.current
        if len(batch) != config.batch_size:
            raise ValueError(f"task batch has {len(batch)} tasks but GRPOConfig.batch_size={config.batch_size}")
        rng, k_sample, k_update = jax.random.split(state.rng, 3)
        state = state.replace(rng=rng)
        rollout = rollout_episodes(sampler(state.params, ref_params), env_factory, batch,
                                   k_sample, tokenizer=tokenizer, budget=budget, sampling=config.sampling,
                                   prompt_len=prompt_len, seq_len=seq_len, num_generations=config.num_generations,
                                   chat_format=chat_format, suffix_len=suffix_len)
        state, metrics = update(state, rollout.episodes, jax.numpy.asarray(rollout.rewards), k_update, ref_params)
        conversations = rollout.messages if config.dynamic_sampling_groups is None else None  # rows reordered
        metrics = _log_samples(metrics, iteration, config.completions_every, hooks, tokenizer, conversations)
        return state, {**metrics, **rollout_metrics(rollout)}

    return run_loop(state, feed, step_fn, num_steps=config.num_steps, log_every=config.log_every, hooks=hooks,
                    updates_per_step=config.updates_per_iteration)


def run_ppo_env(state: PPOState, tasks: Iterable, config: PPOConfig, *, model_config: ModelConfig,
                env_factory: Callable, tokenizer, budget: EpisodeBudget, prompt_len: int, seq_len: int, ref_params,
                chat_format=None, hooks: StageHooks | None = None, lora=None, suffix_len: int | None = None):
    """PPO on multi-turn episodes with environments (`train/multiturn.py`): each iteration runs one episode of
    each task of a batch (`tasks` yields lists of `config.batch_size` tasks) and passes them, with each episode's
    summed environment reward as its score, to the same compiled `ppo_update_scored` as a host-scored `run_ppo`.
    Log-probs, values, the KL penalty and the loss are read on the policy's tokens only (`response_mask`); GAE
    (`losses.gae`) takes the next policy token as the next state, so the score at the episode's last policy token
    reaches every earlier turn through the environment's tokens. The value model starts from the policy
    (`PPOConfig.value_init="policy"`: there is no reward model); `ref_params` is the KL reference (and, with
    `lora`, the adapters' base). Episodes hold `seq_len` tokens, the first `prompt_len` for the opening prompt.
    The rollout metrics join the update's. One device; no PPO-ptx. `suffix_len` as in `run_grpo_env`.
    """
    if config.value_init != "policy":
        raise ValueError("run_ppo_env: environments give host rewards, no reward model to initialise the value "
                         "from; use PPOConfig(value_init='policy') (and init_ppo_state without reward_params)")
    if config.ptx_coef > 0:
        raise ValueError("run_ppo_env: PPO-ptx (ptx_coef > 0) is not supported with environments; set ptx_coef=0")
    update_config = dataclasses.replace(
        config, sampling=dataclasses.replace(config.sampling, max_new_tokens=seq_len - prompt_len))
    sampler = _turn_sampler(config.sampling, model_config, lora, budget, prompt_len, suffix_len)
    update = compile_step(ppo_update_scored, config=update_config, model_config=model_config, lora=lora)
    iteration = [int(jax.device_get(state.step))]
    feed = _TaskFeed(tasks)

    def step_fn(state, _):
        batch = feed.current
        if len(batch) != config.batch_size:
            raise ValueError(f"task batch has {len(batch)} tasks but PPOConfig.batch_size={config.batch_size}")
        rng, k_sample, k_update = jax.random.split(state.rng, 3)
        state = state.replace(rng=rng)
        base = ref_params if lora is not None else None
        rollout = rollout_episodes(sampler(state.policy.params, base), env_factory, batch,
                                   k_sample, tokenizer=tokenizer, budget=budget, sampling=config.sampling,
                                   prompt_len=prompt_len, seq_len=seq_len, num_generations=1,
                                   chat_format=chat_format, suffix_len=suffix_len)
        state, metrics = update(state, rollout.episodes, jax.numpy.asarray(rollout.rewards), k_update, ref_params)
        metrics = _log_samples(metrics, iteration, config.completions_every, hooks, tokenizer, rollout.messages)
        return state, {**metrics, **rollout_metrics(rollout)}

    return run_loop(state, feed, step_fn, num_steps=config.num_steps, log_every=config.log_every, hooks=hooks,
                    loss_keys=("loss/policy", "loss/value"))


def run_online_dpo(state: TrainState, data: Iterable, config: OnlineDPOConfig, *, model_config: ModelConfig,
                   ref_params, reward_params=None, reward_fn: RewardFn | None = None,
                   host_reward_fn: HostRewardFn | None = None, tokenizer=None,
                   gold_reward_fn: HostRewardFn | None = None, mesh: Mesh | None = None,
                   hooks: StageHooks | None = None, lora=None):
    """Online DPO over prompt batches {"prompts", "prompt_mask"} (`train/online_dpo.py`): each iteration samples
    k completions per prompt, the judge (exactly one of `reward_params`, `reward_fn`, `host_reward_fn` with
    `tokenizer`) picks best and worst, and DPO steps follow against `ref_params` (the SFT model; refreshed to the
    policy every `config.ref_refresh_every` iterations when set).

    `gold_reward_fn` (host, with `tokenizer`): the true reward where the world has one; each iteration then logs
    the judge's agreement with it ("judge/gold_agree" / "judge/gold_decided"), and logged pairs carry its scores.
    Runs on one device (no `mesh` yet); with `lora` the state holds adapters of `ref_params`.
    """
    reward_params = _reward_source(reward_params, reward_fn, host_reward_fn, tokenizer, mesh, "run_online_dpo")
    if mesh is not None:
        raise ValueError("run_online_dpo runs on one device for now; drop the mesh (--mesh)")
    if ref_params is None:
        raise ValueError("run_online_dpo needs ref_params (usually the SFT params)")
    if gold_reward_fn is not None and tokenizer is None:
        raise ValueError("run_online_dpo: gold_reward_fn needs a tokenizer (to decode the texts)")
    if lora is not None and config.ref_refresh_every:
        raise ValueError("run_online_dpo: ref_refresh_every with lora would need a second copy of the weights; "
                         "use one of them")
    opts = dict(config=config, model_config=model_config, lora=lora)
    sample_step = jax.jit(online_dpo_sample, static_argnames=tuple(opts))
    update_step = compile_step(online_dpo_update, **opts)
    score_model = jax.jit(reward_model_scores, static_argnames=("model_config",))
    score_fn = None if reward_fn is None else jax.jit(reward_fn)
    G = config.num_generations
    iteration = [int(jax.device_get(state.step)) // config.num_updates]
    ref = [ref_params]

    def step_fn(state, batch):
        _check_rows(batch, config.batch_size, 1, "OnlineDPOConfig")
        state, ep = sample_step(state, batch, ref_params if lora is not None else None, **opts)
        if host_reward_fn is not None:
            scores = host_scores(host_reward_fn, tokenizer, batch, ep)
        elif score_fn is not None:
            scores = score_fn(jax.numpy.repeat(batch["prompts"], G, axis=0), ep.responses, ep.response_mask)
        else:
            scores = score_model(reward_params, ep, model_config=model_config)
        gold = None if gold_reward_fn is None else host_scores(gold_reward_fn, tokenizer, batch, ep)
        iteration[0] += 1
        if hooks is not None and config.pairs_every and iteration[0] % config.pairs_every == 0:
            hooks.on_samples(iteration[0], pair_rows(ep, jax.device_get(scores), config, tokenizer, gold))
        state, metrics = update_step(state, ep, scores, ref[0])
        if gold is not None:
            metrics = {**metrics, **judge_agreement(scores, gold, G)}
        if config.ref_refresh_every and iteration[0] % config.ref_refresh_every == 0:
            ref[0] = jax.tree.map(jax.numpy.copy, state.params)     # the next update donates the state
        return state, metrics

    return run_loop(state, data, step_fn, num_steps=config.num_steps, log_every=config.log_every, hooks=hooks,
                    updates_per_step=config.num_updates)
