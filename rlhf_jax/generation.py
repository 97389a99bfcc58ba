"""Compiled autoregressive sampling with a KV cache: temperature, top-k and nucleus (top-p) sampling.

Nucleus sampling: Holtzman et al. 2020, "The Curious Case of Neural Text Degeneration". The whole decode is
one jitted program per (shape, sampling setting): the left-padded prompt is prefilled in one cached forward
pass, then a `lax.while_loop` samples one token per step until every row has emitted `eos_id` or
`max_new_tokens` tokens exist. Rows stop independently; after its EOS a row is filled with `pad_id`.
The KV cache is carried by the loop and updated in place (see `models.forward_cached`); layers with a sliding
window shorter than the sequence keep only a ring of window-many slots (`models.init_cache`). The weights are cast
to the compute dtype once before the loop. Each step's attention over the cache is the reference softmax or, by
default on one GPU, a Pallas flash-decoding kernel (`ModelConfig.decode_attention`, `models.kernels`).

Returned logprobs are log pi(token) under the distribution that was actually sampled from: log_softmax of
logits / temperature, after top-k / top-p filtering and renormalisation. They are therefore exact
`old_logprobs` for PPO. With temperature == 0 (greedy) that distribution is a point mass, so the logprobs of
the unscaled distribution (temperature 1, no filtering) are returned instead.
"""
from __future__ import annotations

import dataclasses
import functools

import flax
import jax
import jax.numpy as jnp
from jax import lax

from rlhf_jax.checks import check_ranges, config_check
from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.sequences import sequence_positions
from rlhf_jax.models.transformer import KVCache, decode_params, forward_cached, init_cache, prefill, split_layers


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    """How responses are sampled: one config for RL rollouts, evaluation and the generate command."""

    max_new_tokens: int = 53
    """Response budget N in tokens (TRL's TL;DR PPO default 53)."""
    temperature: float = 0.7
    """Sampling temperature (0: greedy). RL losses divide the training logits by it too (Huang et al.)."""
    top_k: int = 0
    """Keep the k most likely tokens (0: off)."""
    top_p: float = 1.0
    """Nucleus sampling mass (1: off)."""
    eos_id: int = 258
    """End-of-sequence id (ByteTokenizer's); a response stops after it."""
    pad_id: int = 256
    """Padding id of prompts and of response tokens after EOS. It may equal eos_id (GPT-2 has no pad token): the
    sampler returns `response_mask` (1 up to and including EOS) and every consumer tells padding from a real EOS
    by the masks, never by the id (Huang et al. 2024's shared-id pitfall is reading EOS back from the ids)."""

    def __post_init__(self):
        check_ranges(self, positive=("max_new_tokens",), non_negative=("temperature", "top_k"))
        config_check(self, 0.0 < self.top_p <= 1.0, f"top_p = {self.top_p} must be in (0, 1]")

    def sample_kwargs(self) -> dict:
        """The keyword arguments of `sample`."""
        return dict(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_k=self.top_k,
                    top_p=self.top_p, eos_id=self.eos_id, pad_id=self.pad_id)


@flax.struct.dataclass
class Samples:
    tokens: jax.Array          # [B,P+N] int32: prompt (left-padded, as given) then the response
    logprobs: jax.Array        # [B,N] float32: log pi(token) of the sampling distribution; 0 where masked
    response_mask: jax.Array   # [B,N] int32: 1 up to and including EOS, 0 after


@flax.struct.dataclass
class DecodeState:
    cache: KVCache
    step: jax.Array            # [] int32: tokens generated so far
    logits: jax.Array          # [B,V] float32: next-token logits
    tokens: jax.Array          # [B,P+N] int32
    done: jax.Array            # [B] bool: row has emitted EOS
    rng: jax.Array
    logprobs: jax.Array        # [B,N] float32
    response_mask: jax.Array   # [B,N] int32


# ------------------------------------------------------------------------------------- sampling strategies
def apply_temperature(logits, temperature: float):
    """logits [B,V] -> logits / temperature."""
    return logits / temperature


def top_k_filter(logits, k: int):
    """Keep the k largest logits of each row (ties with the k-th are kept), set the rest to -inf."""
    kth = lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits < kth, -jnp.inf, logits)


def top_p_filter(logits, p: float):
    """Keep the smallest set of most likely tokens whose total probability is >= p (always the top one)."""
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    cutoff = jnp.min(jnp.where(mass_before < p, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits < cutoff, -jnp.inf, logits)


def greedy(logits, rng):
    """(logits [B,V], rng) -> argmax tokens [B]."""
    del rng
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def categorical(logits, rng):
    """(logits [B,V], rng) -> tokens [B] drawn from softmax(logits)."""
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def sampling_logits(logits, *, temperature: float, top_k: int, top_p: float):
    """The (unnormalised) log-probabilities that are sampled from: temperature, then top-k, then top-p."""
    if temperature == 0:
        return logits
    logits = apply_temperature(logits, temperature)
    if top_k:
        logits = top_k_filter(logits, top_k)
    if top_p < 1.0:
        logits = top_p_filter(logits, top_p)
    return logits


# -------------------------------------------------------------------------------------------------- sample
def decode_stages(max_new_tokens: int, stages: int | None = None) -> list[int]:
    """The step counts at which `sample`'s decode loops end: `stages` loops of near-equal length (None: 4 on
    GPU, where a step's time is mostly reading the KV cache, and 1 elsewhere)."""
    if stages is None:
        stages = 4 if jax.default_backend() == "gpu" else 1
    if not isinstance(stages, int) or stages < 1:
        raise ValueError(f"decode_stages must be a positive int or None, got {stages!r}")
    stages = min(stages, max(1, max_new_tokens))
    return sorted({-(-max_new_tokens * (j + 1) // stages) for j in range(stages)})


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "temperature", "top_k", "top_p",
                                             "eos_id", "pad_id", "stages", "ring_cache"))
def sample(params, prompts, prompt_mask, rng, *, config: ModelConfig, max_new_tokens: int,
           temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, eos_id: int | None = None,
           pad_id: int = 0, stages: int | None = None, ring_cache: bool = True) -> Samples:
    """Sample N = max_new_tokens tokens after left-padded prompts [B,P] (prompt_mask [B,P], 1 = real token).

    temperature == 0 is greedy decoding; top_k = 0 and top_p = 1 disable those filters. All sampling settings
    are static: each distinct setting compiles once. `stages` splits the decode into that many loops (see
    `decode_stages`), loop j reading only the cache slots its last step can need (P + its last step), so the
    cache bytes read per token fall from P + N to about P + N/2 as stages grow, for one compiled loop body per
    stage; the samples are the same for any number of stages. `ring_cache` (static): layers with a sliding
    window W < P + N keep a ring of W cache slots (`models.init_cache`); False gives them all P + N slots, for the
    same samples. Returns `Samples` (see the module docstring).
    """
    B, P = prompts.shape
    N, S = max_new_tokens, prompts.shape[1] + max_new_tokens
    if config.positional == "learned" and S > config.max_seq_len:
        raise ValueError(f"prompt length {P} + max_new_tokens {N} exceeds ModelConfig.max_seq_len="
                         f"{config.max_seq_len}; shorten the prompts or generate fewer tokens")
    # Cast the weights once and split the layer stack, outside the loop (each step then reads 16-bit weights
    # and slices nothing).
    params = split_layers(decode_params(params, config))
    prompt_mask = prompt_mask.astype(jnp.int32)
    key_mask = jnp.concatenate([prompt_mask, jnp.ones((B, N), jnp.int32)], axis=1)        # [B,S]
    positions = sequence_positions(prompt_mask)                                          # [B,P]
    cache = init_cache(config, B, S, ring=ring_cache)
    logits, cache = prefill(params, prompts.astype(jnp.int32), config=config, cache=cache, positions=positions,
                            key_mask=key_mask)
    state = _decode(params, cache, logits[:, -1], prompts, key_mask, prompt_mask.sum(axis=1), P, rng,
                    config=config, max_new_tokens=N, temperature=temperature, top_k=top_k, top_p=top_p,
                    eos_id=eos_id, pad_id=pad_id,
                    loops=[(end, P + end) for end in decode_stages(N, stages)])   # steps i < end read < P + end
    return Samples(tokens=state.tokens, logprobs=state.logprobs, response_mask=state.response_mask)


def _decode(params, cache, logits, prompts, key_mask, next_position, index, rng, *, config, max_new_tokens,
            temperature, top_k, top_p, eos_id, pad_id, loops, done=None) -> DecodeState:
    """The decode loops of `sample` and `sample_after`: step i samples from `logits` (then from its own),
    writes its token to cache slot index + i (index may be traced) at position next_position + i and to column
    P + i of [B, P + N] tokens after `prompts` [B,P]. `loops`: (end, read_len) of each `lax.while_loop`. Rows
    `done` [B] (none when None) sample nothing; a finished row's padding is fed at position next_position
    (bounded, whatever the step)."""
    B, P = prompts.shape
    N = max_new_tokens
    pick = greedy if temperature == 0 else categorical

    def body(state: DecodeState, read_len: int | None) -> DecodeState:
        rng, sub = jax.random.split(state.rng)
        dist = sampling_logits(state.logits, temperature=temperature, top_k=top_k, top_p=top_p)
        token = pick(dist, sub)
        logprob = jnp.take_along_axis(jax.nn.log_softmax(dist, axis=-1), token[:, None], axis=-1)[:, 0]
        alive = ~state.done
        token = jnp.where(alive, token, pad_id)
        done = state.done | (token == eos_id) if eos_id is not None else state.done
        i = state.step
        step_logits, cache = forward_cached(params, token[:, None], config=config, cache=state.cache,
                                            positions=(next_position + jnp.where(alive, i, 0))[:, None],
                                            key_mask=key_mask, index=index + i, read_len=read_len)
        return DecodeState(
            cache=cache, step=i + 1, logits=step_logits[:, 0], rng=rng, done=done,
            tokens=lax.dynamic_update_slice(state.tokens, token[:, None], (0, P + i)),
            logprobs=lax.dynamic_update_slice(state.logprobs, jnp.where(alive, logprob, 0.0)[:, None], (0, i)),
            response_mask=lax.dynamic_update_slice(state.response_mask, alive.astype(jnp.int32)[:, None],
                                                   (0, i)))

    def cond(state: DecodeState, end: int):
        return (state.step < end) & ~jnp.all(state.done)

    state = DecodeState(
        cache=cache, step=jnp.zeros((), jnp.int32), logits=logits, rng=rng,
        tokens=jnp.concatenate([prompts.astype(jnp.int32), jnp.full((B, N), pad_id, jnp.int32)], axis=1),
        done=jnp.zeros((B,), bool) if done is None else done, logprobs=jnp.zeros((B, N), jnp.float32),
        response_mask=jnp.zeros((B, N), jnp.int32))
    for end, read_len in loops:
        state = lax.while_loop(functools.partial(cond, end=end), functools.partial(body, read_len=read_len), state)
    return state


@flax.struct.dataclass
class Conversation:
    """A KV cache that a conversation's turns extend (`sample_after`): slots [0, index) hold the turns so far,
    `key_mask` [B,S] marks the real ones (the rest are padding between chunks and tokens after a turn's EOS)."""

    cache: KVCache
    key_mask: jax.Array        # [B,S] int32
    index: jax.Array           # [] int32: the next slot to write


def start_conversation(config: ModelConfig, batch: int, slots: int) -> Conversation:
    """An empty `Conversation` of `slots` cache slots (every turn's new tokens and decode budget must fit)."""
    if config.sliding_window is not None:
        raise ValueError("start_conversation: a sliding-window model cannot keep a conversation's cache (its window "
                         "is counted in cache slots, and the padding between turns would shift it); re-prefill "
                         "each turn instead")
    return Conversation(cache=init_cache(config, batch, slots, ring=False),
                        key_mask=jnp.zeros((batch, slots), jnp.int32), index=jnp.zeros((), jnp.int32))


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "temperature", "top_k", "top_p",
                                             "eos_id", "pad_id"))
def sample_after(params, conversation: Conversation, tokens, token_mask, rng, *, config: ModelConfig,
                 max_new_tokens: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 eos_id: int | None = None, pad_id: int = 0) -> tuple[Samples, Conversation]:
    """Sample N = max_new_tokens tokens after a conversation's cached turns and new left-padded tokens [B,Q]
    (token_mask [B,Q]: the environment's answer and the template's tokens since the last turn; the opening
    prompt on an empty conversation) -> (`Samples` of [B, Q + N] tokens, the conversation extended by them).

    The new tokens fill slots [index, index + Q) in one cached forward pass that reads the earlier slots, and
    the decode writes [index + Q, index + Q + N); positions continue from each row's real tokens, so padding
    between chunks changes nothing but the slots read. Sampled tokens after a row's EOS are masked out of the
    returned conversation. A row with no new tokens samples nothing (an episode that has ended). For rows with
    new tokens, the same samples as `sample` on the whole context, up to float rounding (the cache is in the
    compute dtype either way; RoPE's long factors, where the model has them, are chosen per call from the
    positions of that call). Each decode step reads all S slots (index is traced: one program for every turn of
    a given Q); the caller keeps index + Q + N <= S (a write past the end would land on earlier slots).
    """
    B, Q = tokens.shape
    N = max_new_tokens
    if Q + N > conversation.key_mask.shape[1]:
        raise ValueError(f"sample_after: {Q} new tokens + max_new_tokens {N} exceed the conversation's "
                         f"{conversation.key_mask.shape[1]} slots")
    params = split_layers(decode_params(params, config))
    token_mask = token_mask.astype(jnp.int32)
    index = conversation.index
    key_mask = lax.dynamic_update_slice(conversation.key_mask, jnp.concatenate(
        [token_mask, jnp.ones((B, N), jnp.int32)], axis=1), (0, index))
    before = conversation.key_mask.sum(axis=1, keepdims=True)                              # [B,1]
    positions = before + sequence_positions(token_mask)
    logits, cache = forward_cached(params, tokens.astype(jnp.int32), config=config, cache=conversation.cache,
                                   positions=positions, key_mask=key_mask, index=index)
    state = _decode(params, cache, logits[:, -1], tokens, key_mask, before[:, 0] + token_mask.sum(axis=1),
                    index + Q, rng, config=config, max_new_tokens=N, temperature=temperature, top_k=top_k,
                    top_p=top_p, eos_id=eos_id, pad_id=pad_id, loops=[(N, None)], done=token_mask.sum(axis=1) == 0)
    key_mask = lax.dynamic_update_slice(key_mask, state.response_mask, (0, index + Q))
    samples = Samples(tokens=state.tokens, logprobs=state.logprobs, response_mask=state.response_mask)
    return samples, Conversation(cache=state.cache, key_mask=key_mask, index=index + Q + N)
