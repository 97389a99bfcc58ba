"""Model calls on whole sequences: the one representation for scoring and log-probs of finished conversations.

A *sequence batch* is `tokens [B,S]` with `mask [B,S]` (1 on real tokens), the real tokens of each row one
contiguous run: a left-padded prompt followed by its sampled response and PAD after EOS (a rollout), or a
right-padded conversation ending with its reply's EOS (the rows of a preference batch: `concat_pair` lays out
its two sides, `pair_sequences` reads them as whole sequences). Every call that scores a sequence or reads
log-probs / values at chosen positions of a rollout goes through `hidden_at`, so a reward model is trained and
used on exactly the same computation (Bradley-Terry training, PPO/GRPO rollouts, best-of-n and evaluation).

`hidden_at` rotates each row to start at its first real token (a no-op for right-padded rows), runs the trunk
with `is_causal` + sequence lengths (cuDNN flash attention on GPU, no [B,1,S,S] mask) at positions 0, 1, ...,
and gathers the hidden states at the requested indices of the original layout only: the LM head and the scalar
head then run at those positions alone (the response, or the last token), never over the whole sequence.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.transformer import forward_hidden, lm_logits, scalar_head


def sequence_positions(mask) -> jax.Array:
    """mask [B,S] (a contiguous run of real tokens per row) -> positions [B,S]: 0 at the first real token."""
    return jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)


def last_index(mask) -> jax.Array:
    """mask [B,S] -> [B] int32: the index of each row's last real token (0 for an empty row)."""
    t = jnp.arange(mask.shape[1], dtype=jnp.int32)
    return jnp.max(jnp.where(mask > 0, t, 0), axis=1)


def response_index(prompt_len: int, num_new: int) -> jax.Array:
    """[N] int32: the indices P-1 .. P+N-2 whose outputs predict the N response tokens after a [B,P] prompt."""
    return jnp.arange(prompt_len - 1, prompt_len + num_new - 1, dtype=jnp.int32)


def hidden_at(params, tokens, mask, index, *, model_config: ModelConfig) -> jax.Array:
    """Hidden states [B,K,D] (after the final norm) at `index` ([K] or [B,K], indices of the original layout).

    Outputs at an index that is not a real token are finite but unspecified; mask them before use.
    """
    S = tokens.shape[1]
    mask = jnp.asarray(mask)
    shift = jnp.argmax(mask > 0, axis=1)                                                  # [B] leading pads
    rolled = jnp.take_along_axis(jnp.asarray(tokens), (jnp.arange(S)[None] + shift[:, None]) % S, axis=1)
    positions = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), rolled.shape)
    h = forward_hidden(params, rolled, config=model_config, positions=positions,
                       seq_lengths=jnp.sum(mask > 0, axis=1))                           # [B,S,D]
    index = jnp.broadcast_to(jnp.asarray(index, jnp.int32), (tokens.shape[0], jnp.shape(index)[-1]))
    idx = jnp.clip(index - shift[:, None], 0, S - 1)
    return jnp.take_along_axis(h, idx[..., None], axis=1)


def logits_at(params, tokens, mask, index, *, model_config: ModelConfig) -> jax.Array:
    """LM logits [B,K,V] float32 at `index` (see `hidden_at`)."""
    return lm_logits(params, hidden_at(params, tokens, mask, index, model_config=model_config), config=model_config)


def values_at(params, tokens, mask, index, *, model_config: ModelConfig) -> jax.Array:
    """Scalar-head outputs [B,K] float32 at `index` (a value model; see `hidden_at`)."""
    return scalar_head(params, hidden_at(params, tokens, mask, index, model_config=model_config), config=model_config)


def sequence_scores(params, tokens, mask, *, model_config: ModelConfig) -> jax.Array:
    """Reward-model scores [B]: the scalar head at each row's last real token (a reply's EOS, or the last
    token of a truncated one). `params` need a "score_head"."""
    if "score_head" not in params:
        raise ValueError("sequence_scores needs params with a 'score_head' (train.with_score_head, or "
                         "init_params(config, rng, scalar_head=True))")
    return values_at(params, tokens, mask, last_index(mask)[:, None], model_config=model_config)[:, 0]


PAIR_KEYS = ("inputs", "targets", "loss_mask", "positions", "segment_ids")
"""The keys of an SFT-style batch that `concat_pair` carries over (those present in the chosen side)."""


def concat_pair(chosen: dict, rejected: dict) -> dict:
    """The one layout of a preference batch: two SFT-style batches [B,Tc], [B,Tr] (one right-padded example per
    row) -> one [2B, max(Tc,Tr)] batch, chosen rows first. The DPO-family and KTO steps read its log-probs, the
    reward model its whole sequences (`pair_sequences`).

    The shorter side is right-padded with 0 (segment_ids 0, loss_mask 0), which no loss and no last-token read
    can see.
    """
    T = max(chosen["inputs"].shape[1], rejected["inputs"].shape[1])
    keys = [k for k in PAIR_KEYS if k in chosen]

    def pad(x):
        return jnp.pad(jnp.asarray(x), ((0, 0), (0, T - x.shape[1])))

    return {k: jnp.concatenate([pad(chosen[k]), pad(rejected[k])], axis=0) for k in keys}


def pair_sequences(batch: dict) -> tuple[jax.Array, jax.Array]:
    """A preference batch {"chosen", "rejected"} (SFT-style sides, one right-padded example per row) -> the whole
    sequences (tokens [2B,T+1], mask [2B,T+1]) of its `concat_pair` rows, chosen rows first, each ending with its
    reply's final target (EOS).

    A row's sequence is inputs[:, :1] followed by its targets; a side without "segment_ids" counts every one of
    its tokens as real.
    """
    sides = [{**side, "segment_ids": side.get("segment_ids", jnp.ones_like(jnp.asarray(side["inputs"])))}
             for side in (batch["chosen"], batch["rejected"])]
    rows = concat_pair(*sides)
    tokens = jnp.concatenate([rows["inputs"][:, :1], rows["targets"]], axis=1)
    seg = rows["segment_ids"]
    mask = (jnp.concatenate([seg[:, :1], seg], axis=1) > 0).astype(jnp.int32)
    return tokens, mask
