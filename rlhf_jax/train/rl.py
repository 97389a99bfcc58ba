"""Building blocks of reinforcement learning on language models, each a pure function.

An algorithm is a composition of these, its advantage estimator (`rlhf_jax.losses`), its loss and its config
(see `rlhf_jax.train.ppo` and docs/extending.md):

  sample_episodes       prompts -> `Episodes` (G samples per prompt as G consecutive rows)
  episode_logprobs      log pi(y_t) of the response tokens under any params (policy, reference, trainer)
  episode_sequence_logps  log pi(y | x), their sum over each response (online DPO, the evaluator's KL)
  episode_values        a value model's V(s_t) at the response positions
  reward_model_scores   a reward model's score of each whole episode (the same call it was trained through)
  decode_responses      the response texts, for a host-side reward function of text (verifiable rewards)
  epochs_minibatches    `num_epochs` shuffled passes of `num_minibatches` updates, one `lax.scan`

Every model call goes through `rlhf_jax.models.sequences` (one sequence representation: `tokens` + `mask`).
Scores come from a reward model (`reward_model_scores`), a jittable `RewardFn`, or a host function of decoded
text; with the latter an iteration is a compiled sample, a host reward call, then a compiled update.
"""
from __future__ import annotations

from typing import Callable

import flax
import jax
import numpy as np
import jax.numpy as jnp
from jax import lax

from rlhf_jax.generation import SamplingConfig, sample
from rlhf_jax.losses import masked_mean, masked_sum, token_logprobs
from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.sequences import logits_at, response_index, sequence_scores, values_at

RewardFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
"""(prompts [B,P], responses [B,N], response_mask [B,N]) -> scores [B]; jittable. Replaces the reward model."""

HostRewardFn = Callable[[list, list], "np.ndarray"]
"""(prompt texts, completion texts) -> scores [B] float32, on the host (verifiable rewards; `rlhf_jax.rewards`)."""


@flax.struct.dataclass
class Episodes:
    """Sampled episodes; P prompt length, N max new tokens. Rows g*G .. g*G+G-1 answer the same prompt."""

    tokens: jax.Array           # [B,P+N] int32: left-padded prompt, response, PAD after EOS
    mask: jax.Array             # [B,P+N] int32: 1 on real tokens (prompt_mask ++ response_mask)
    response_mask: jax.Array    # [B,N] int32: 1 up to and including EOS
    sampler_logprobs: jax.Array  # [B,N] float32: log pi(y_t) of the distribution sampled from (0 where masked)

    @property
    def prompt_len(self) -> int:
        return self.tokens.shape[1] - self.response_mask.shape[1]

    @property
    def responses(self) -> jax.Array:
        """[B,N] the response tokens."""
        return self.tokens[:, self.prompt_len:]

    def ends_with_eos(self, eos_id: int) -> jax.Array:
        """[B] bool: the response stopped at EOS (not truncated at N tokens)."""
        return jnp.any((self.responses == eos_id) & (self.response_mask > 0), axis=1)


def sample_episodes(params, prompts, prompt_mask, rng, *, sampling: SamplingConfig, model_config: ModelConfig,
                    num_samples_per_prompt: int = 1) -> Episodes:
    """Sample `num_samples_per_prompt` responses to each left-padded prompt [B,P] -> Episodes of B*G rows."""
    G = num_samples_per_prompt
    if G < 1:
        raise ValueError(f"num_samples_per_prompt must be >= 1, got {G}")
    if G > 1:
        prompts, prompt_mask = jnp.repeat(prompts, G, axis=0), jnp.repeat(prompt_mask, G, axis=0)
    s = sample(params, prompts, prompt_mask, rng, config=model_config, **sampling.sample_kwargs())
    mask = jnp.concatenate([jnp.asarray(prompt_mask).astype(jnp.int32), s.response_mask], axis=1)
    return Episodes(tokens=s.tokens, mask=mask, response_mask=s.response_mask, sampler_logprobs=s.logprobs)


def _response_index(episodes: Episodes) -> jax.Array:
    return response_index(episodes.prompt_len, episodes.response_mask.shape[1])


def episode_logits(params, episodes: Episodes, *, model_config: ModelConfig, temperature: float = 1.0):
    """Logits / temperature [B,N,V] that predict the response tokens (the LM head at those positions only)."""
    return logits_at(params, episodes.tokens, episodes.mask, _response_index(episodes),
                     model_config=model_config) / temperature


def episode_logprobs(params, episodes: Episodes, *, model_config: ModelConfig, temperature: float = 1.0):
    """log pi(y_t) [B,N] float32 of the response tokens at `temperature` (as sampled); 0 where masked."""
    logits = episode_logits(params, episodes, model_config=model_config, temperature=temperature)
    return jnp.where(episodes.response_mask > 0, token_logprobs(logits, episodes.responses), 0.0)


def episode_sequence_logps(params, episodes: Episodes, *, model_config: ModelConfig):
    """log pi(y | x) [B] float32: `episode_logprobs` (temperature 1) summed over each response's tokens, as
    `losses.sequence_logprobs` sums token log-probs over a mask."""
    return masked_sum(episode_logprobs(params, episodes, model_config=model_config), episodes.response_mask, axis=1)


def episode_values(params, episodes: Episodes, *, model_config: ModelConfig):
    """Value-model outputs V(s_t) [B,N] at the positions that predict the response tokens; 0 where masked."""
    v = values_at(params, episodes.tokens, episodes.mask, _response_index(episodes), model_config=model_config)
    return jnp.where(episodes.response_mask > 0, v, 0.0)


def reward_model_scores(params, episodes: Episodes, *, model_config: ModelConfig):
    """A reward model's scores [B] float32 of whole episodes: its scalar head at the last real token (EOS)."""
    return sequence_scores(params, episodes.tokens, episodes.mask, model_config=model_config).astype(jnp.float32)


def decode_ids(tokenizer, ids) -> str:
    """The text of token ids as the RL stages decode prompts and responses: EOS ids dropped."""
    eos = getattr(tokenizer, "eos_id", None)
    return tokenizer.decode([int(t) for t in ids if t != eos])


def decode_masked(tokenizer, tokens, mask) -> list[str]:
    """Host-side texts of the tokens [B,T] where mask [B,T] is set (`decode_ids`: EOS dropped)."""
    tokens, mask = jax.device_get((tokens, mask))
    return [decode_ids(tokenizer, [t for t, m in zip(row, keep) if m]) for row, keep in zip(tokens, mask)]


def decode_responses(tokenizer, episodes: Episodes) -> list[str]:
    """The response texts (host side, EOS and padding dropped), for a reward function of text."""
    return decode_masked(tokenizer, episodes.responses, episodes.response_mask)


def host_scores(reward_fn: HostRewardFn, tokenizer, batch: dict, episodes: Episodes) -> np.ndarray:
    """Scores [B*G] float32 of episodes by a host function of text; `batch` holds their [B,P] prompts (each
    answered by G consecutive rows of `episodes`)."""
    prompts = decode_masked(tokenizer, batch["prompts"], batch["prompt_mask"])
    G = episodes.tokens.shape[0] // len(prompts)
    completions = decode_responses(tokenizer, episodes)
    scores = np.asarray(reward_fn([p for p in prompts for _ in range(G)], completions), np.float32)
    if scores.shape != (len(completions),) or not np.all(np.isfinite(scores)):
        raise ValueError(f"host reward function returned {scores.shape} scores (finite: "
                         f"{bool(np.all(np.isfinite(scores)))}); expected {len(completions)} finite floats")
    return scores


def epochs_minibatches(update: Callable, carry, data, rng, *, num_epochs: int, num_minibatches: int, extra=None):
    """`num_epochs` passes, each over `num_minibatches` minibatches of `data` shuffled anew, as one `lax.scan`.

    update(carry, minibatch, extra_minibatch) -> (carry, metrics). `data` is a pytree of [B, ...] arrays (B
    divisible by num_minibatches); `extra` (optional) a pytree of [M * rows, ...] arrays split in order, not
    shuffled, each epoch seeing the same M slices (e.g. PPO-ptx's SFT rows). Returns (carry, metrics averaged
    over all num_epochs * num_minibatches updates).
    """
    B = jax.tree.leaves(data)[0].shape[0]
    M = num_minibatches
    if B % M:
        raise ValueError(f"batch of {B} rows is not divisible into num_minibatches={M}")
    split = lambda x: jnp.reshape(x, (M, -1, *x.shape[1:]))  # noqa: E731
    extra = jnp.zeros((M,)) if extra is None else jax.tree.map(split, extra)

    def epoch(carry, key):
        perm = jax.random.permutation(key, B)
        shuffled = jax.tree.map(lambda x: split(x[perm]), data)
        return lax.scan(lambda c, xs: update(c, *xs), carry, (shuffled, extra))

    carry, metrics = lax.scan(epoch, carry, jax.random.split(rng, num_epochs))
    return carry, jax.tree.map(jnp.mean, metrics)


COMPLETIONS_TABLE = "completions/table"
"""The metrics entry (arrays, not a scalar) holding the sampled-completions table; `run_ppo` / `run_grpo` take it
out."""


def completions_table(episodes: Episodes, mask, rewards, advantages, rows: int) -> dict:
    """The first `rows` episodes (at most all) as the sampled-completions table (arrays, inside the step):
    prompt and completion tokens with their masks, each row's reward and its advantage ([B] or per token [B,N],
    then averaged over the completion)."""
    k, P = min(rows, episodes.responses.shape[0]), episodes.prompt_len
    seq_adv = advantages if advantages.ndim == 1 else masked_mean(advantages, mask, axis=1)
    return {"prompt": episodes.tokens[:k, :P], "prompt_mask": episodes.mask[:k, :P],
            "completion": episodes.responses[:k], "completion_mask": mask[:k], "reward": rewards[:k],
            "advantage": seq_adv[:k]}


def completion_rows(table: dict, tokenizer=None) -> list[dict]:
    """The sampled-completions table (host side): one {"prompt", "completion", "reward", "advantage"} per row,
    texts decoded with `tokenizer` (None: the token ids)."""
    table = jax.device_get(table)

    def texts(tokens, mask):
        if tokenizer is not None:
            return decode_masked(tokenizer, tokens, mask)
        return [[int(t) for t, m in zip(row, row_mask) if m] for row, row_mask in zip(tokens, mask)]

    prompts = texts(table["prompt"], table["prompt_mask"])
    completions = texts(table["completion"], table["completion_mask"])
    return [{"prompt": p, "completion": c, "reward": float(r), "advantage": float(a)}
            for p, c, r, a in zip(prompts, completions, table["reward"], table["advantage"])]
