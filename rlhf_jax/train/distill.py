"""Distillation of a teacher into a student on the RL core: supervised KD, GKD and on-policy distillation.

One step on B prompts with their dataset responses (`sft_to_distill_batch` builds them from an SFT batch):

1. With probability `lmbda` the student samples its own responses to the prompts (`sample_episodes`), else the
   dataset's responses are used (GKD, Agarwal et al. 2024, "On-Policy Distillation of Language Models: Learning
   from Self-Generated Mistakes", Algorithm 1; TRL's `GKDConfig.lmbda`). `lmbda = 0` is supervised KD on fixed
   data, `lmbda = 1` fully on-policy distillation. The coin is drawn from the state's rng inside the step.
2. The teacher (any model config of the same vocabulary: another width or depth) scores those tokens in one
   forward pass, as a frozen reference model does (`episode_logits`, no gradient).
3. The student updates on the response tokens only, by `objective`:

   "divergence"  `losses.distill_loss` over the full next-token distributions at every response position:
                 forward KL (beta 0), reverse KL (beta 1) or GKD's generalised JSD (between); optionally against
                 the teacher's top-k log-probs and a tail outcome (`teacher_topk`).
   "kl_reward"   on-policy distillation as RL: the sampled tokens' per-token reward
                 r_t = -(log pi_s(y_t) - log pi_t(y_t)), a one-sample estimate of -KL(student || teacher) at that
                 position, is the advantage of a policy-gradient step (`losses.policy_gradient_loss`, token mean,
                 one pass so the ratio is 1: grad = -mean_t r_t grad log pi_s(y_t)); no discounting, the reward of
                 each token is its own (Lu & Thinking Machines Lab 2025, "On-Policy Distillation"; the token-level
                 reverse KL of Gu et al. 2024, "MiniLLM"). It needs samples from the student (`lmbda = 1`).

Both temperatures (sampling and loss) are `temperature` (GKD and TRL use one). With `lora`, the state holds the
adapters of the frozen `base_params`; the teacher is separate params with its own config.
"""
from __future__ import annotations

import dataclasses
from typing import Iterable, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import Mesh

from rlhf_jax import sharding as S
from rlhf_jax.checks import check_ranges, config_check
from rlhf_jax.generation import SamplingConfig
from rlhf_jax.lora import LoraConfig, lora_sharding
from rlhf_jax.losses import (distill_loss, distill_loss_from_topk, masked_mean, policy_gradient_loss,
                             teacher_topk_logprobs, token_logprobs)
from rlhf_jax.models.config import ModelConfig
from rlhf_jax.train.logging import StageHooks
from rlhf_jax.train.optim import OptimConfig
from rlhf_jax.train.rl import Episodes, episode_logits, sample_episodes
from rlhf_jax.train.stages import run_loop
from rlhf_jax.train.state import TrainState
from rlhf_jax.train.steps import compile_step, lora_params, on_adapters

Objective = Literal["divergence", "kl_reward"]
"""DistillConfig.objective: a divergence over the full distributions, or the per-token reverse-KL reward."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class DistillConfig:
    """Distillation of a teacher into a student (GKD and on-policy distillation; see the module docstring)."""

    num_steps: int = 1000
    """Training steps (one update each)."""
    log_every: int = 10
    """Host metric pull / hook period."""
    batch_size: int = 16
    """Prompts per step; the data must yield batches of this size."""
    lmbda: float = 0.5
    """GKD's lambda: probability that a step trains on the student's own samples (0: supervised KD on the dataset's
    responses, 1: fully on-policy). TRL's default 0.5."""
    beta: float = 0.5
    """Divergence: 0 forward KL(teacher || student), 1 reverse KL(student || teacher), between: generalised JSD
    (losses.distill_loss). TRL's default 0.5."""
    temperature: float = 0.9
    """Temperature of the student's sampling and of both models' distributions in the loss (TRL's default 0.9)."""
    objective: Objective = "divergence"
    """"divergence" (losses.distill_loss) or "kl_reward" (the per-token reward -(log pi_s - log pi_t) through a
    policy gradient; needs lmbda = 1)."""
    teacher_topk: int | None = None
    """Keep only the teacher's k most likely tokens per position and a tail outcome (losses.distill_loss_from_topk);
    None: the full vocabulary."""
    max_prompt_len: int = 64
    """P: prompts are left-padded (or cut from the left) to this many tokens (sft_to_distill_batch)."""
    sampling: SamplingConfig = SamplingConfig(max_new_tokens=128, temperature=0.9)
    """Response budget N (max_new_tokens: the dataset's responses are cut or padded to it too), top-k/top-p, EOS and
    PAD ids; its temperature is replaced by `temperature`."""
    optim: OptimConfig = OptimConfig(learning_rate=2e-5)
    """Optimizer (TRL's GKDConfig inherits SFTConfig's learning rate 2e-5)."""

    def __post_init__(self):
        check_ranges(self, positive=("num_steps", "log_every", "batch_size", "temperature", "teacher_topk",
                                     "max_prompt_len"))
        config_check(self, 0.0 <= self.lmbda <= 1.0, f"lmbda = {self.lmbda} must be in [0, 1]")
        config_check(self, 0.0 <= self.beta <= 1.0, f"beta = {self.beta} must be in [0, 1]")
        config_check(self, self.objective != "kl_reward" or self.lmbda == 1.0,
                     f"objective 'kl_reward' is a policy gradient: it needs the student's own samples, lmbda = 1 "
                     f"(got {self.lmbda})")
        config_check(self, self.objective != "kl_reward" or self.teacher_topk is None,
                     "teacher_topk belongs to the divergence objective; 'kl_reward' reads the teacher's log-prob of "
                     "each sampled token")

    @property
    def sample_config(self) -> SamplingConfig:
        """The student's sampling: `sampling` at `temperature`."""
        return dataclasses.replace(self.sampling, temperature=self.temperature)


def check_vocabularies(model_config: ModelConfig, teacher_config: ModelConfig):
    """Refuse a teacher whose vocabulary is not the student's (the divergence compares distributions over one
    vocabulary, token by token)."""
    if teacher_config.vocab_size != model_config.vocab_size:
        raise ValueError(f"the teacher's vocabulary has {teacher_config.vocab_size} tokens but the student's has "
                         f"{model_config.vocab_size}: distillation needs one vocabulary (the same tokenizer)")


def sft_to_distill_batch(batch: dict, *, max_prompt_len: int, max_new_tokens: int, pad_id: int) -> dict:
    """Host side: an SFT batch (one right-padded example per row) -> the prompts and dataset responses of a step.

    The response is the last run of loss-masked targets (the final assistant reply, its EOS included), cut or
    padded to `max_new_tokens`; the prompt is everything before it, its last `max_prompt_len` tokens, left padded.
    Returns {"prompts" [B,P], "prompt_mask" [B,P], "responses" [B,N], "response_mask" [B,N]} int32 numpy arrays.
    """
    if "segment_ids" in batch and np.max(batch["segment_ids"], initial=0) > 1:
        raise ValueError("sft_to_distill_batch: a packed SFT batch (several examples per row); collate one example "
                         "per row (no packing)")
    inputs, targets = np.asarray(batch["inputs"]), np.asarray(batch["targets"])
    loss = np.asarray(batch["loss_mask"]) > 0
    B, P, N = inputs.shape[0], max_prompt_len, max_new_tokens
    out = {"prompts": np.full((B, P), pad_id, np.int32), "prompt_mask": np.zeros((B, P), np.int32),
           "responses": np.full((B, N), pad_id, np.int32), "response_mask": np.zeros((B, N), np.int32)}
    for b in range(B):
        idx = np.flatnonzero(loss[b])
        if idx.size == 0:
            continue
        gaps = np.flatnonzero(np.diff(idx) > 1)
        start = idx[gaps[-1] + 1] if gaps.size else idx[0]                  # the last run of response tokens
        end = idx[-1] + 1
        prompt = inputs[b, :start + 1][-P:]                                 # ids before the response's first token
        response = targets[b, start:min(end, start + N)]
        out["prompts"][b, P - len(prompt):] = prompt
        out["prompt_mask"][b, P - len(prompt):] = 1
        out["responses"][b, :len(response)] = response
        out["response_mask"][b, :len(response)] = 1
    return out


def _dataset_episodes(batch: dict) -> Episodes:
    prompts, responses = jnp.asarray(batch["prompts"], jnp.int32), jnp.asarray(batch["responses"], jnp.int32)
    pm, rm = jnp.asarray(batch["prompt_mask"], jnp.int32), jnp.asarray(batch["response_mask"], jnp.int32)
    return Episodes(tokens=jnp.concatenate([prompts, responses], 1), mask=jnp.concatenate([pm, rm], 1),
                    response_mask=rm, sampler_logprobs=jnp.zeros(rm.shape, jnp.float32))


def _episodes(params, batch: dict, key, *, config: DistillConfig, model_config: ModelConfig):
    """(episodes, on-policy indicator): the student's samples with probability lmbda, else the dataset's."""
    data = _dataset_episodes(batch)
    if data.response_mask.shape[1] != config.sampling.max_new_tokens:
        raise ValueError(f"the batch's responses have {data.response_mask.shape[1]} tokens but "
                         f"sampling.max_new_tokens = {config.sampling.max_new_tokens} (sft_to_distill_batch)")
    k_coin, k_sample = jax.random.split(key)

    def sampled():
        return sample_episodes(params, batch["prompts"], batch["prompt_mask"], k_sample,
                               sampling=config.sample_config, model_config=model_config)

    if config.lmbda == 0.0:
        return data, jnp.zeros((), jnp.float32)
    if config.lmbda == 1.0:
        return sampled(), jnp.ones((), jnp.float32)
    on = jax.random.uniform(k_coin) < config.lmbda
    return lax.cond(on, sampled, lambda: data), on.astype(jnp.float32)


def _divergence_loss(params, ep: Episodes, teacher, *, config: DistillConfig, model_config: ModelConfig):
    logits = episode_logits(params, ep, model_config=model_config)                              # [B,N,V]
    if config.teacher_topk is not None:
        return distill_loss_from_topk(logits, *teacher, ep.response_mask, beta=config.beta,
                                      temperature=config.temperature)
    return distill_loss(logits, teacher, ep.response_mask, beta=config.beta, temperature=config.temperature)


def _kl_reward_loss(params, ep: Episodes, teacher_logits, *, config: DistillConfig, model_config: ModelConfig):
    mask, tau = ep.response_mask, config.temperature
    logits = episode_logits(params, ep, model_config=model_config)                              # [B,N,V]
    lp = token_logprobs(logits / tau, ep.responses)
    old = lax.stop_gradient(lp)
    teacher_lp = token_logprobs(teacher_logits / tau, ep.responses)
    reward = jnp.where(mask > 0, -(old - teacher_lp), 0.0)                   # -(log pi_s - log pi_t) per token
    loss, m = policy_gradient_loss(lp, old, reward, mask, loss_type="dapo")
    _, kls = distill_loss(lax.stop_gradient(logits), teacher_logits, mask, beta=1.0, temperature=tau)
    return loss, {**kls, "loss": loss, "reward": masked_mean(reward, mask)}


def distill_step(state: TrainState, batch: dict, teacher_params, base_params=None, *, config: DistillConfig,
                 model_config: ModelConfig, teacher_config: ModelConfig, lora: LoraConfig | None = None):
    """One distillation update on {"prompts" [B,P], "prompt_mask", "responses" [B,N], "response_mask"}.

    With `lora`, `state.params` are the adapters of the frozen `base_params` (the student's base).
    Metrics: "loss", "kl_forward", "kl_reverse" (masked token means over the trained responses, at `temperature`;
    of the k + 1 outcomes with `teacher_topk`), "on_policy" (1 when the student sampled), "completions/mean_length",
    "grad_norm", "learning_rate"; with "kl_reward" also "reward" (mean per-token reward).
    """
    check_vocabularies(model_config, teacher_config)
    length = batch["prompts"].shape[1] + batch["responses"].shape[1]
    for name, mc in (("student", model_config), ("teacher", teacher_config)):
        if length > mc.max_seq_len:
            raise ValueError(f"prompts + responses of {length} tokens exceed the {name}'s max_seq_len "
                             f"{mc.max_seq_len}")
    rng, key = jax.random.split(state.rng)
    student = state.params if lora is None else lora_params(base_params, state.params, lora)
    ep, on_policy = _episodes(lax.stop_gradient(student), batch, key, config=config, model_config=model_config)
    teacher = lax.stop_gradient(episode_logits(teacher_params, ep, model_config=teacher_config))   # [B,N,V]
    if config.objective == "kl_reward":
        loss_fn = _kl_reward_loss
    else:
        loss_fn = _divergence_loss
        if config.teacher_topk is not None:      # only k values per token live on into the student's backward
            teacher = teacher_topk_logprobs(teacher, config.teacher_topk, temperature=config.temperature)
    grad_fn = jax.value_and_grad(on_adapters(loss_fn, base_params, lora), has_aux=True)
    (_, metrics), grads = grad_fn(state.params, ep, teacher, config=config, model_config=model_config)
    state = state.apply_gradients(grads).replace(rng=rng)
    lengths = jnp.sum(ep.response_mask, axis=1).astype(jnp.float32)
    return state, {**metrics, "on_policy": on_policy, "completions/mean_length": jnp.mean(lengths),
                   "grad_norm": optax.tree.norm(grads), "learning_rate": state.learning_rate()}


def run_distill(state: TrainState, data: Iterable, config: DistillConfig, *, model_config: ModelConfig,
                teacher_params, teacher_config: ModelConfig, mesh: Mesh | None = None,
                hooks: StageHooks | None = None, lora: LoraConfig | None = None, base_params=None):
    """Distillation over batches of prompts and dataset responses (`sft_to_distill_batch`); see `distill_step`.

    `teacher_params` (frozen, with their own `teacher_config`) are placed on the `mesh` as a reference model (the
    rule table of their config); the state as any trained model, or with `lora` as adapters of `base_params`.
    Under a multi-host mesh each batch holds this process's batch_size / process_count rows.
    """
    check_vocabularies(model_config, teacher_config)
    if (lora is None) != (base_params is None):
        raise ValueError("run_distill: lora and base_params go together (the state holds the adapters of "
                         "base_params)")
    placed = {}
    if mesh is not None:
        student_sh = (S.params_sharding(model_config, mesh) if lora is None
                      else lora_sharding(state.params, model_config, mesh))
        state_sh = S.state_sharding(state, student_sh, mesh)
        teacher_sh = S.params_sharding(teacher_config, mesh)
        base_sh = None if base_params is None else S.params_sharding(model_config, mesh)
        state, teacher_params = S.shard(state, state_sh), S.shard(teacher_params, teacher_sh)
        base_params = None if base_params is None else S.shard(base_params, base_sh)
        placed = {"mesh": mesh, "state_sharding": state_sh, "extra_in_shardings": (teacher_sh, base_sh)}
    step = compile_step(distill_step, config=config, model_config=model_config, teacher_config=teacher_config,
                        lora=lora, **placed)
    processes = jax.process_count() if mesh is not None else 1

    def step_fn(state, batch):
        if batch["prompts"].shape[0] * processes != config.batch_size:
            raise ValueError(f"distillation batch has {batch['prompts'].shape[0]} rows (x {processes} processes) "
                             f"but DistillConfig.batch_size={config.batch_size}")
        batch = batch if mesh is None else S.shard_batch(batch, mesh)
        return step(state, batch, teacher_params, base_params)

    return run_loop(state, data, step_fn, num_steps=config.num_steps, log_every=config.log_every, hooks=hooks)
