"""Pure training steps for SFT, reward modelling and DPO with their configs, and the one place they are jit-compiled.

Each step is `(state, batch, [frozen params], *, model_config, loss options) -> (state, metrics)`: the model is
applied here (losses only see arrays), gradients go through `TrainState.apply_gradients`, and the metrics are a
flat dict of scalars named as in TRL ("loss", "rewards/chosen", ...). `compile_step` wraps any of them in
`jax.jit` with static keyword options and the state donated; given a mesh it adds in/out shardings there
(through `sharding.jit_sharded`), the only place they are added.

- SFT: token-weighted mean NLL over response tokens (`losses.sft_loss`).
- Reward model (Ouyang et al. 2022, Stiennon et al. 2020): an LM trunk with a scalar head, reward read at the
  last real token of each whole sequence (`models.sequences`, the call that scores rollouts); chosen and
  rejected rows share one forward; Bradley-Terry loss, optional reward centering (Eisenstein et al. 2023)
  through `center_coef`.
- DPO (Rafailov et al. 2023): sequence log-probabilities of the response tokens under the policy and a frozen
  reference (computed here under `stop_gradient`, or precomputed into the batch as "ref_chosen_logps" /
  "ref_rejected_logps"). SimPO and ORPO go through the same step with `loss_type="simpo" | "orpo"`: reference-free
  by construction, they run no reference forward at all.
- KTO (Ethayarajh et al. 2024): unpaired batches ("completion", "kl" mismatched rows, "desirable", "valid"); the
  reference runs one forward over the completion and mismatched rows together, the policy a differentiated one
  over the completions and a forward-only one over the mismatched rows.

Every step that reads two sides at once (reward model, DPO family, KTO's reference) lays them out with
`models.sequences.concat_pair`: one [2B, T] batch, chosen (or completion) rows first.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from rlhf_jax import sharding as S
from rlhf_jax.checks import check_ranges, config_check
from rlhf_jax.lora import LoraConfig, merge_lora
from rlhf_jax.losses import (DPO_LOSS_TYPES, bradley_terry_loss, dpo_loss, kto_loss, masked_sum, orpo_loss, sft_loss,
                             simpo_loss)
from rlhf_jax.models.head import sft_loss_from_hidden, token_logprobs_from_hidden
from rlhf_jax.models import forward
from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.sequences import concat_pair, pair_sequences, sequence_scores
from rlhf_jax.models.transformer import forward_hidden, lm_head_kernel
from rlhf_jax.train.optim import OptimConfig
from rlhf_jax.train.state import TrainState

_BT_NAMES = {"reward_chosen": "rewards/chosen", "reward_rejected": "rewards/rejected",
             "reward_margin": "rewards/margins"}
_DPO_NAMES = {"rewards_chosen": "rewards/chosen", "rewards_rejected": "rewards/rejected",
              "rewards_margin": "rewards/margins", "rewards_accuracy": "rewards/accuracies",
              "logps_chosen": "logps/chosen", "logps_rejected": "logps/rejected", "nll": "nll_chosen"}
# Preference losses with no reference model: the step runs only the policy's forward.
REFERENCE_FREE_LOSSES = ("simpo", "orpo")
PreferenceLoss = Literal[DPO_LOSS_TYPES + REFERENCE_FREE_LOSSES]
"""DPOConfig.loss_type: the DPO family (`losses.DPO_LOSS_TYPES`) and the reference-free losses, one list."""


def compile_step(fn, *, donate: bool = True, mesh: Mesh | None = None, state_sharding=None,
                 extra_in_shardings: tuple = (), compiler_options: dict | None = None, **static):
    """`jax.jit(fn)` with the keyword options in `static` bound as compile-time constants and the state donated.

    Returns a callable `step(state, batch, *extra) -> (state, metrics)` (extra: frozen params etc., positional).
    The single jit call site of the training steps. With a `mesh`, it delegates to `sharding.jit_sharded`:
    the state keeps `state_sharding` in and out, the batch is split over ("data", "fsdp") and each extra
    positional argument gets its entry of `extra_in_shardings` (pass exactly that many extras, None for an
    absent one). `compiler_options` go to XLA unchanged.
    """
    if mesh is not None:
        if state_sharding is None:
            raise ValueError("compile_step: a mesh needs state_sharding (sharding.state_sharding(state, ...))")
        return S.jit_sharded(fn, mesh, state_sharding, S.batch_sharding(mesh), donate=donate,
                             extra_in_shardings=tuple(extra_in_shardings), compiler_options=compiler_options,
                             **static)
    jitted = jax.jit(fn, static_argnames=tuple(static), donate_argnums=(0,) if donate else (),
                     compiler_options=compiler_options)
    return functools.partial(jitted, **static)


def _rename(metrics, names):
    return {names.get(k, k): v for k, v in metrics.items()}


def _model_inputs(batch):
    """The model keyword inputs of an SFT-style batch (positions / segment_ids are optional)."""
    return dict(positions=batch.get("positions"), segment_ids=batch.get("segment_ids"))


def _split(x):
    half = x.shape[0] // 2
    return x[:half], x[half:]


def _grad_metrics(state: TrainState, grads) -> dict:
    return {"grad_norm": optax.tree.norm(grads), "learning_rate": state.learning_rate()}


# -------------------------------------------------------------------------------------------------------- SFT
@dataclasses.dataclass(frozen=True, kw_only=True)
class SFTConfig:
    """Supervised fine-tuning on chat transcripts (loss on assistant tokens)."""

    num_steps: int = 1000
    """Training steps (micro-batches; optimizer updates = num_steps // optim.grad_accum)."""
    log_every: int = 10
    """Pull metrics to the host, check the loss and call hooks every this many steps."""
    optim: OptimConfig = OptimConfig(learning_rate=2e-5, schedule="cosine")
    """Optimizer (TRL's SFT default learning rate 2e-5)."""

    def __post_init__(self):
        check_ranges(self, positive=("num_steps", "log_every"))


def sft_nll(params, batch: dict, *, model_config: ModelConfig):
    """(mean NLL over loss_mask tokens, SFT metrics) of an SFT-style batch: SFT's loss, and PPO-ptx's term.

    The LM head is fused with the loss over vocabulary chunks (model_config.logits_chunk; None: full [B,T,V]
    float32 logits).
    """
    h = forward_hidden(params, batch["inputs"], config=model_config, **_model_inputs(batch))       # [B,T,D]
    return sft_loss_from_hidden(h, lm_head_kernel(params, config=model_config), batch["targets"],
                                batch["loss_mask"], chunk_size=model_config.logits_chunk)


def on_adapters(loss_fn, base_params, lora: LoraConfig | None):
    """`loss_fn(params, ...)` as a function of the LoRA adapters of the frozen `base_params` (merge_lora); the
    loss itself when `lora` is None. Only the adapters get gradients; the base is read, never copied."""
    if lora is None:
        return loss_fn
    if base_params is None:
        raise ValueError("a LoRA step needs the frozen base params (the step's base_params argument)")

    def adapted(trainable, *args, **kwargs):
        return loss_fn(lora_params(base_params, trainable, lora, lazy=True), *args, **kwargs)

    return adapted


def lora_params(base_params, trainable: dict, lora: LoraConfig, *, lazy: bool = False):
    """The model params of a LoRA state's trainable tree: the adapters ("attn", "mlp") merged into the frozen base
    (no gradient into it), and any other entry (a reward model's "score_head") taken as is. `lazy`: over an NF4
    base, merged one layer at a time inside the model's layer scan (`merge_lora(..., lazy=True)`); the losses'
    steps use it, so that a QLoRA step with remat="full" never holds the whole dequantised base."""
    adapters = {k: v for k, v in trainable.items() if k in ("attn", "mlp")}
    rest = {k: v for k, v in trainable.items() if k not in ("attn", "mlp")}
    return {**merge_lora(jax.lax.stop_gradient(base_params), adapters, lora, lazy=lazy), **rest}


def sft_step(state: TrainState, batch: dict, base_params=None, *, model_config: ModelConfig,
             lora: LoraConfig | None = None):
    """One SFT update on {"inputs", "targets", "loss_mask" [B,T], "positions"?, "segment_ids"?}.

    With `lora`, `state.params` are the adapters (`rlhf_jax.lora`) of the frozen `base_params`.
    Metrics: "loss", "accuracy", "num_tokens", "perplexity", "grad_norm", "learning_rate".
    """
    grad_fn = jax.value_and_grad(on_adapters(sft_nll, base_params, lora), has_aux=True)
    (_, metrics), grads = grad_fn(state.forward_params(), batch, model_config=model_config)
    grads = state.master_grads(grads)
    return state.apply_gradients(grads), {**metrics, **_grad_metrics(state, grads)}


def sft_eval(params, batch: dict, *, model_config: ModelConfig) -> dict:
    """SFT loss metrics without an update."""
    logits = forward(params, batch["inputs"], config=model_config, **_model_inputs(batch))
    return sft_loss(logits, batch["targets"], batch["loss_mask"])[1]


# ------------------------------------------------------------------------------------------------ reward model
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

    def __post_init__(self):
        check_ranges(self, positive=("num_steps", "log_every"), non_negative=("center_coef",))


def pair_scores(params, batch: dict, *, model_config: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """Reward-model scores (chosen [B], rejected [B]) of a preference batch: both sides' whole sequences (final
    EOS included) in one forward through `models.sequences.sequence_scores`, the call that scores rollouts."""
    tokens, mask = pair_sequences(batch)
    return _split(sequence_scores(params, tokens, mask, model_config=model_config))


def _reward_loss(params, batch, *, model_config, center_coef):
    chosen, rejected = pair_scores(params, batch, model_config=model_config)
    loss, metrics = bradley_terry_loss(chosen, rejected, margin=batch.get("margin"), center_coef=center_coef)
    return loss, _rename(metrics, _BT_NAMES)


def reward_step(state: TrainState, batch: dict, base_params=None, *, model_config: ModelConfig,
                center_coef: float = 0.0, lora: LoraConfig | None = None):
    """One reward-model update on a preference batch {"chosen": SFT batch, "rejected": SFT batch, "margin"?}.

    With `lora`, `state.params` are {**adapters, "score_head": ...}: the adapters of the frozen `base_params` and
    the trained scalar head.
    Metrics: "loss", "accuracy", "rewards/chosen", "rewards/rejected", "rewards/margins", "grad_norm",
    "learning_rate".
    """
    grad_fn = jax.value_and_grad(on_adapters(_reward_loss, base_params, lora), has_aux=True)
    (_, metrics), grads = grad_fn(state.forward_params(), batch, model_config=model_config, center_coef=center_coef)
    grads = state.master_grads(grads)
    return state.apply_gradients(grads), {**metrics, **_grad_metrics(state, grads)}


def reward_eval(params, batch: dict, *, model_config: ModelConfig, center_coef: float = 0.0) -> dict:
    """Reward-model metrics on a preference batch without an update."""
    return _reward_loss(params, batch, model_config=model_config, center_coef=center_coef)[1]


# -------------------------------------------------------------------------------------------------------- DPO
@dataclasses.dataclass(frozen=True, kw_only=True)
class DPOConfig:
    """Direct preference optimisation (Rafailov et al. 2023) and its variants."""

    num_steps: int = 1000
    """Training steps."""
    log_every: int = 10
    """Host metric pull / hook period."""
    beta: float = 0.1
    """Inverse temperature of the implicit reward beta * log(pi / ref) (paper and TRL default 0.1)."""
    loss_type: PreferenceLoss = "sigmoid"
    """DPO (sigmoid), robust DPO, SLiC hinge or IPO (Azar et al. 2023), see losses.dpo_loss; or the
    reference-free SimPO (losses.simpo_loss, beta ~2) and ORPO (losses.orpo_loss), which run no reference forward."""
    label_smoothing: float = 0.0
    """Assumed label-flip probability (conservative DPO / robust DPO)."""
    reference_free: bool = False
    """Use a uniform reference (ref logps = 0)."""
    rpo_alpha: float = 0.0
    """Weight of the chosen responses' per-token NLL added to the loss (RPO, Pang et al. 2024; 0: plain DPO)."""
    simpo_gamma: float = 0.5
    """SimPO's target reward margin gamma (Meng et al. 2024; TRL default 0.5)."""
    orpo_lambda: float = 0.1
    """ORPO's weight of the odds-ratio term next to the chosen NLL (Hong et al. 2024 use 0.1)."""
    precompute_ref_logps: bool = False
    """Compute reference logps in a separate forward before each step, so the train step never holds the
    reference params (batches may also carry precomputed "ref_chosen_logps"/"ref_rejected_logps")."""
    optim: OptimConfig = OptimConfig(learning_rate=1e-6)
    """Optimizer (Rafailov et al. use 1e-6)."""

    def __post_init__(self):
        check_ranges(self, positive=("num_steps", "log_every", "beta"),
                     non_negative=("rpo_alpha", "simpo_gamma", "orpo_lambda"))
        config_check(self, 0 <= self.label_smoothing < 0.5,
                     f"label_smoothing = {self.label_smoothing} must be in [0, 0.5)")
        config_check(self, not (self.rpo_alpha and self.loss_type in REFERENCE_FREE_LOSSES),
                     f"rpo_alpha adds an NLL term to DPO losses; loss_type={self.loss_type!r} does not take it "
                     "(ORPO has its own NLL term)")

    @property
    def needs_reference(self) -> bool:
        """Whether the loss uses a reference model's log-probabilities."""
        return not self.reference_free and self.loss_type not in REFERENCE_FREE_LOSSES


def sequence_logps(params, batch: dict, *, model_config: ModelConfig) -> jax.Array:
    """Sum of log p(target) over loss_mask tokens of an SFT-style batch with one right-padded example per row
    (a preference batch side) -> [B] float32. Attention uses sequence lengths (cuDNN flash, no T x T mask), and
    the LM head is fused with the log-softmax over vocabulary chunks (`model_config.logits_chunk`)."""
    segment_ids = batch.get("segment_ids")
    lengths = None if segment_ids is None else jnp.sum(segment_ids > 0, axis=1)
    h = forward_hidden(params, batch["inputs"], config=model_config, positions=batch.get("positions"),
                       seq_lengths=lengths)
    logp = token_logprobs_from_hidden(h, lm_head_kernel(params, config=model_config), batch["targets"],
                                      chunk_size=model_config.logits_chunk)
    return masked_sum(logp, batch["loss_mask"], axis=-1)


def reference_logps(ref_params, batch: dict, *, model_config: ModelConfig) -> dict:
    """{"ref_chosen_logps" [B], "ref_rejected_logps" [B]} of a preference batch (for precomputation)."""
    pair = concat_pair(batch["chosen"], batch["rejected"])
    chosen, rejected = _split(sequence_logps(ref_params, pair, model_config=model_config))
    return {"ref_chosen_logps": chosen, "ref_rejected_logps": rejected}


def _reference_free_loss(params, pair, *, model_config, beta, loss_type, label_smoothing, simpo_gamma,
                         orpo_lambda):
    pol_c, pol_r = _split(sequence_logps(params, pair, model_config=model_config))
    len_c, len_r = _split(jnp.sum(pair["loss_mask"], axis=1).astype(jnp.float32))
    if loss_type == "simpo":
        loss, metrics = simpo_loss(pol_c, pol_r, len_c, len_r, beta=beta, gamma=simpo_gamma,
                                   label_smoothing=label_smoothing)
    else:
        nll = -jnp.sum(pol_c) / jnp.maximum(jnp.sum(len_c), 1.0)
        loss, metrics = orpo_loss(pol_c, pol_r, len_c, len_r, nll, lam=orpo_lambda)
    metrics = {**metrics, "logps_chosen": jnp.mean(pol_c), "logps_rejected": jnp.mean(pol_r)}
    return loss, _rename(metrics, _DPO_NAMES)


def _dpo_loss(params, batch, ref_params, *, model_config, beta, loss_type, label_smoothing, reference_free,
              rpo_alpha=0.0, simpo_gamma=0.5, orpo_lambda=0.1):
    pair = concat_pair(batch["chosen"], batch["rejected"])
    if loss_type in REFERENCE_FREE_LOSSES:
        return _reference_free_loss(params, pair, model_config=model_config, beta=beta, loss_type=loss_type,
                                    label_smoothing=label_smoothing, simpo_gamma=simpo_gamma,
                                    orpo_lambda=orpo_lambda)
    if "ref_chosen_logps" in batch:
        ref_c, ref_r = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
    elif reference_free:
        ref_c = ref_r = jnp.zeros((pair["inputs"].shape[0] // 2,), jnp.float32)
    elif ref_params is None:
        raise ValueError("dpo_step needs ref_params, precomputed 'ref_chosen_logps'/'ref_rejected_logps' in the "
                         "batch, or reference_free=True")
    else:
        # The reference is frozen: no gradient flows into it.
        ref = jax.lax.stop_gradient(sequence_logps(ref_params, pair, model_config=model_config))
        ref_c, ref_r = _split(ref)
    pol_c, pol_r = _split(sequence_logps(params, pair, model_config=model_config))
    len_c, len_r = _split(jnp.sum(pair["loss_mask"], axis=1).astype(jnp.float32))
    loss, metrics = dpo_loss(pol_c, pol_r, ref_c, ref_r, beta=beta, loss_type=loss_type,
                             label_smoothing=label_smoothing, chosen_lengths=len_c, rejected_lengths=len_r,
                             reference_free=reference_free, rpo_alpha=rpo_alpha)
    return loss, _rename(metrics, _DPO_NAMES)


def dpo_step(state: TrainState, batch: dict, ref_params=None, *, model_config: ModelConfig, beta: float = 0.1,
             loss_type: str = "sigmoid", label_smoothing: float = 0.0, reference_free: bool = False,
             rpo_alpha: float = 0.0, simpo_gamma: float = 0.5, orpo_lambda: float = 0.1,
             lora: LoraConfig | None = None):
    """One DPO-family update on a preference batch; reference logps from `ref_params` or from the batch.

    `loss_type` "simpo" or "orpo" uses no reference (pass `ref_params=None`; with `lora` they are the base only).

    With `lora`, `state.params` are the adapters of `ref_params`, which are both the frozen base of the policy and
    the reference (the base with the adapters off): one copy of the weights.
    Metrics: "loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
    "logps/chosen", "logps/rejected", "grad_norm", "learning_rate", and "nll_chosen" when rpo_alpha is set;
    ORPO: "loss", "nll_chosen", "or_loss", "log_odds_ratio", "rewards/accuracies", "logps/*", "grad_norm",
    "learning_rate".
    """
    grad_fn = jax.value_and_grad(on_adapters(_dpo_loss, ref_params, lora), has_aux=True)
    (_, metrics), grads = grad_fn(state.forward_params(), batch, ref_params, model_config=model_config, beta=beta,
                                  loss_type=loss_type, label_smoothing=label_smoothing,
                                  reference_free=reference_free, rpo_alpha=rpo_alpha, simpo_gamma=simpo_gamma,
                                  orpo_lambda=orpo_lambda)
    grads = state.master_grads(grads)
    return state.apply_gradients(grads), {**metrics, **_grad_metrics(state, grads)}


def dpo_eval(params, batch: dict, ref_params=None, *, model_config: ModelConfig, beta: float = 0.1,
             loss_type: str = "sigmoid", label_smoothing: float = 0.0, reference_free: bool = False,
             rpo_alpha: float = 0.0, simpo_gamma: float = 0.5, orpo_lambda: float = 0.1) -> dict:
    """DPO-family metrics on a preference batch without an update (`dpo_step`'s loss and rewards metrics)."""
    return _dpo_loss(params, batch, ref_params, model_config=model_config, beta=beta, loss_type=loss_type,
                     label_smoothing=label_smoothing, reference_free=reference_free, rpo_alpha=rpo_alpha,
                     simpo_gamma=simpo_gamma, orpo_lambda=orpo_lambda)[1]


# -------------------------------------------------------------------------------------------------------- KTO
@dataclasses.dataclass(frozen=True, kw_only=True)
class KTOConfig:
    """KTO on unpaired desirable / undesirable feedback (Ethayarajh et al. 2024), TRL's z0 estimator."""

    num_steps: int = 1000
    """Training steps."""
    log_every: int = 10
    """Host metric pull / hook period."""
    beta: float = 0.1
    """Inverse temperature of the implicit reward beta * log(pi / ref) (paper and TRL default 0.1)."""
    desirable_weight: float = 1.0
    """w_D. With n_D desirable and n_U undesirable examples the paper keeps w_D n_D / (w_U n_U) in [1, 4/3]."""
    undesirable_weight: float = 1.0
    """w_U."""
    optim: OptimConfig = OptimConfig(learning_rate=5e-7)
    """Optimizer (TRL's KTO default learning rate 5e-7 for 7B models)."""

    def __post_init__(self):
        check_ranges(self, positive=("num_steps", "log_every", "beta", "desirable_weight", "undesirable_weight"))


def _kto_loss(params, batch, ref_params, *, model_config, beta, desirable_weight, undesirable_weight):
    rows = concat_pair(batch["completion"], batch["kl"])
    pol = sequence_logps(params, batch["completion"], model_config=model_config)
    # The mismatched rows only estimate z0, a constant of the loss: their policy forward is separate, so that
    # no backward pass runs over them.
    pol_kl = sequence_logps(jax.lax.stop_gradient(params), batch["kl"], model_config=model_config)
    ref, ref_kl = _split(jax.lax.stop_gradient(sequence_logps(ref_params, rows, model_config=model_config)))
    loss, metrics = kto_loss(pol, ref, batch["desirable"], jax.lax.stop_gradient(pol_kl), ref_kl, beta=beta,
                             desirable_weight=desirable_weight, undesirable_weight=undesirable_weight,
                             valid=batch.get("valid"))
    return loss, _rename(metrics, {"rewards_desirable": "rewards/chosen", "rewards_undesirable": "rewards/rejected"})


def kto_step(state: TrainState, batch: dict, ref_params, *, model_config: ModelConfig, beta: float = 0.1,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0, lora: LoraConfig | None = None):
    """One KTO update on an unpaired batch (`rlhf_jax.data.collate_unpaired`) against the frozen `ref_params`.

    With `lora`, `state.params` are the adapters of `ref_params` (policy base and reference at once).
    Metrics (TRL's names): "loss", "kl" (z0), "rewards/chosen" and "rewards/rejected" (mean beta * log-ratio of
    the desirable and of the undesirable rows), "grad_norm", "learning_rate".
    """
    grad_fn = jax.value_and_grad(on_adapters(_kto_loss, ref_params, lora), has_aux=True)
    (_, metrics), grads = grad_fn(state.forward_params(), batch, ref_params, model_config=model_config, beta=beta,
                                  desirable_weight=desirable_weight, undesirable_weight=undesirable_weight)
    grads = state.master_grads(grads)
    return state.apply_gradients(grads), {**metrics, **_grad_metrics(state, grads)}


def kto_eval(params, batch: dict, ref_params, *, model_config: ModelConfig, beta: float = 0.1,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> dict:
    """KTO metrics on an unpaired batch without an update (`kto_step`'s loss, kl and rewards metrics)."""
    return _kto_loss(params, batch, ref_params, model_config=model_config, beta=beta,
                     desirable_weight=desirable_weight, undesirable_weight=undesirable_weight)[1]


def make_sft_step(model_config: ModelConfig):
    """Compiled `sft_step(state, batch)`."""
    return compile_step(sft_step, model_config=model_config)


def make_reward_step(model_config: ModelConfig, *, center_coef: float = 0.0):
    """Compiled `reward_step(state, batch)`."""
    return compile_step(reward_step, model_config=model_config, center_coef=center_coef)


def make_dpo_step(model_config: ModelConfig, **dpo_options):
    """Compiled `dpo_step(state, batch, ref_params)`; options: beta, loss_type, label_smoothing, reference_free,
    rpo_alpha."""
    return compile_step(dpo_step, model_config=model_config, **dpo_options)


def make_kto_step(model_config: ModelConfig, **kto_options):
    """Compiled `kto_step(state, batch, ref_params)`."""
    return compile_step(kto_step, model_config=model_config, **kto_options)
