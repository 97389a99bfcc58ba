"""Batched multi-turn rollouts: the policy talks with environments (tools, users) for several turns, and each
episode becomes one `Episodes` row whose loss mask covers exactly the tokens the policy sampled.

One rollout over B tasks with G episodes each (a GRPO group: rows g*G .. g*G+G-1 share task g):

  1. one environment per row (`env_factory()`); `env.reset(task)` gives the opening messages; the first prompt is
     `encode_prompt(tokenizer, messages, tools=env.schemas)` (the env's tool schemas, when it has any), at most
     `prompt_len` tokens;
  2. each turn, every unfinished row's context is left-padded to one fixed prompt bucket of
     C = seq_len - max_new_tokens tokens and the compiled sampler writes one assistant turn (at most
     `sampling.max_new_tokens` tokens, up to and including its end-of-turn id `sampling.eos_id`); the text is
     appended as an assistant message and `env.step(messages)` answers (tool results, a user's follow-up, a
     reward, done);
  3. a row stops when the environment says done, when its `EpisodeBudget` (policy turns, policy tokens) is
     spent, or when the next turn would not fit in `seq_len` (finish "max_len"); as in `envs.run_episode`, the
     budget is checked after the environment's answer, so a truncated episode keeps the rewards given so far.

Token in, token out: a row's context is its first prompt, then for each turn the sampled ids exactly as sampled,
then the ids the chat template writes after the turn's end-of-turn token up to the next generation prompt
(`turn_suffix_ids`: the environment's messages and the template's headers; a turn cut at max_new_tokens gets its
end-of-turn id here, unsampled). The next turn is sampled on that same context, so the update sees the policy's
tokens in the context they were sampled in and the sampler's log-probs are the trainer's up to float noise
(re-encoding the decoded text could tokenise a reply differently from how it was sampled). By default every
turn re-prefills the whole context (one compile for all turns: the bucket C and the row count never change;
finished rows are re-sampled on their first prompt and ignored). With `suffix_len` the KV cache is kept across
turns instead (`generation.sample_after`): one cache of `conversation_slots` slots per row holds the opening
prompt, each turn, and between turns only what the environment and the template added, left-padded to a
fixed bucket of `suffix_len` tokens; the padding is masked and positions count real tokens, so the samples are
the same up to float rounding, for a forward over suffix_len tokens instead of C per turn and decode steps
that read every slot of the longer cache (docs/tools.md measures both).

The result is `Episodes` of B*G rows, [prompt_len + N] tokens with N = seq_len - prompt_len: `prompt` is the first
prompt (left-padded), `response` everything after it (right-padded), `mask` 1 on every real token and
`response_mask` 1 exactly on the policy's sampled tokens (assistant turns with their end-of-turn id) and 0 on
tool results, user turns and template tokens; `sampler_logprobs` are the sampler's log-probs there (for TIS).
The episode's reward is the sum of its environment rewards. Tool calls are counted by parsing each turn as the
environment would (`tools.parse_tool_calls_report`); a malformed call is the environment's to answer (an error
message), never an exception, and is counted.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.envs import Environment, EpisodeBudget
from rlhf_jax.generation import Conversation, SamplingConfig, sample, sample_after, start_conversation
from rlhf_jax.lora import LoraConfig
from rlhf_jax.models.config import ModelConfig
from rlhf_jax.tokenizer import ChatFormat, encode_chat_split, encode_prompt
from rlhf_jax.tools import parse_tool_calls_report
from rlhf_jax.train.rl import Episodes, decode_ids
from rlhf_jax.train.steps import lora_params

__all__ = ["EnvRollout", "TaskBatches", "conversation_slots", "make_turn_sampler", "rollout_episodes",
           "rollout_metrics", "sample_turn", "sample_turn_cached", "turn_suffix_ids"]

TurnSampler = Callable[[jax.Array, jax.Array, jax.Array], Any]
"""(prompts [R,C] int32 left-padded, prompt_mask [R,C], rng) -> `generation.Samples` of [R, C + max_new_tokens]."""
CachedTurnSampler = Callable[[Conversation | None, jax.Array, jax.Array, jax.Array], tuple[Any, Conversation]]
"""(conversation, tokens [R,Q] left-padded, token_mask [R,Q], rng) -> (`generation.Samples` of [R, Q +
max_new_tokens], the conversation extended); the conversation is None on the first turn."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class EnvRollout:
    """A batch of finished episodes (host side, besides `episodes`)."""

    episodes: Episodes
    """[R, prompt_len + N] tokens, policy mask and sampler log-probs (module docstring); R = tasks x G."""
    rewards: np.ndarray
    """[R] float32: each episode's return (the sum of its environment rewards)."""
    messages: tuple[tuple[dict, ...], ...]
    """Each row's whole conversation (the environment's last answer included)."""
    turns: np.ndarray
    """[R] int: policy turns per episode."""
    tool_calls: np.ndarray
    """[R] int: well-formed tool calls the policy wrote."""
    malformed_calls: np.ndarray
    """[R] int: tool calls it wrote wrongly (the environment answered them with an error)."""
    finish: tuple[str, ...]
    """Per row: "done", "max_turns", "max_tokens" or "max_len"."""
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    """Wall time of the rollout's parts: "gen" (the compiled sampler, to its results on the host) and "env" (the
    environments' steps, with decoding and parsing the turns and encoding what the environments answered)."""


@functools.partial(jax.jit, static_argnames=("sampling", "model_config", "lora"))
def sample_turn(params, base_params, prompts, prompt_mask, rng, *, sampling: SamplingConfig,
                model_config: ModelConfig, lora: LoraConfig | None = None):
    """One assistant turn after left-padded prompts [R,C] -> `Samples` (`generation.sample` with `sampling`);
    with `lora`, `params` are adapters of `base_params`. Compiled once per (shape, settings): every turn of every
    rollout of a run reuses one program."""
    policy = params if lora is None else lora_params(base_params, params, lora)
    return sample(policy, prompts, prompt_mask, rng, config=model_config, **sampling.sample_kwargs())


@functools.partial(jax.jit, static_argnames=("sampling", "model_config", "lora"), donate_argnames=("conversation",))
def sample_turn_cached(params, base_params, conversation: Conversation, tokens, token_mask, rng, *,
                       sampling: SamplingConfig, model_config: ModelConfig, lora: LoraConfig | None = None):
    """One assistant turn after a conversation's KV cache and its new left-padded tokens [R,Q] -> (`Samples` of
    [R, Q + max_new_tokens], the conversation extended): `generation.sample_after`; `lora` as in `sample_turn`.
    The conversation's buffers are donated (each turn's cache takes the place of the last)."""
    policy = params if lora is None else lora_params(base_params, params, lora)
    return sample_after(policy, conversation, tokens, token_mask, rng, config=model_config,
                        **sampling.sample_kwargs())


def conversation_slots(*, prompt_len: int, max_new_tokens: int, max_turns: int, suffix_len: int) -> int:
    """Cache slots of a conversation kept across turns: the opening prompt and its turn, then for each later
    turn a suffix bucket and the turn (`rollout_episodes` with `suffix_len`)."""
    return prompt_len + max_new_tokens + (max_turns - 1) * (suffix_len + max_new_tokens)


def make_turn_sampler(*, sampling: SamplingConfig, model_config: ModelConfig, lora: LoraConfig | None = None,
                      conversation_slots: int | None = None):
    """`sample_turn` with its settings bound: `turn(params, base_params, prompts, prompt_mask, rng)`. With
    `conversation_slots`, `sample_turn_cached` instead: `turn(params, base_params, conversation, tokens, mask,
    rng) -> (samples, conversation)`, where a None conversation starts an empty one of that many slots (the
    KV cache kept across turns; see `rollout_episodes`' `suffix_len`)."""
    if conversation_slots is None:
        return functools.partial(sample_turn, sampling=sampling, model_config=model_config, lora=lora)

    def turn(params, base_params, conversation, tokens, token_mask, rng):
        if conversation is None:
            conversation = start_conversation(model_config, tokens.shape[0], conversation_slots)
        return sample_turn_cached(params, base_params, conversation, tokens, token_mask, rng, sampling=sampling,
                                  model_config=model_config, lora=lora)

    return turn


def turn_suffix_ids(tokenizer, messages: Sequence[dict], new_messages: Sequence[dict], *, eos_id: int,
                    tools: Sequence[dict] | None = None, chat_format: ChatFormat | None = None) -> list[int]:
    """The ids the chat template puts after the last assistant turn's end-of-turn id (`eos_id`) of `messages`
    up to and including the generation prompt that follows `new_messages`: what a rollout appends to a context
    ending with the policy's sampled turn. A ValueError when the template renders the earlier conversation
    differently once the new messages follow (the context could then not be extended token by token)."""
    ids, _, first = encode_chat_split(tokenizer, list(messages), chat_format, tools=tools)
    nxt = encode_prompt(tokenizer, list(messages) + list(new_messages), chat_format, tools=tools)
    tail = ids[first:]
    end = first + tail.index(eos_id) + 1 if eos_id in tail else len(ids)
    if nxt[:end] != ids[:end]:
        raise ValueError("chat template: the conversation renders differently once the environment's messages "
                         "follow (e.g. a template that drops earlier reasoning); multi-turn rollouts need a template "
                         "under which each turn extends the previous text")
    return nxt[end:]


def _tools_of(env) -> list[dict] | None:
    schemas = getattr(env, "schemas", None)
    return list(schemas) if schemas else None


def rollout_episodes(sample_fn: TurnSampler | CachedTurnSampler, env_factory: Callable[[], Environment],
                     tasks: Sequence[Any], rng, *, tokenizer, budget: EpisodeBudget, sampling: SamplingConfig,
                     prompt_len: int, seq_len: int, num_generations: int = 1,
                     chat_format: ChatFormat | None = None, suffix_len: int | None = None) -> EnvRollout:
    """Runs `num_generations` episodes of each task to their end (module docstring) -> `EnvRollout`.

    `sample_fn(prompts, prompt_mask, rng)` samples one turn (`make_turn_sampler` with the params bound);
    `sampling` must be the settings it samples with (its max_new_tokens, eos_id and pad_id shape the layout).
    With `suffix_len`, the KV cache is kept across turns instead: `sample_fn(conversation, tokens, mask, rng)
    -> (samples, conversation)` (`make_turn_sampler` with `conversation_slots(prompt_len=, max_new_tokens=,
    max_turns=budget.max_turns, suffix_len=)`) gets None and the opening prompts, then each turn its last
    conversation and only what followed the last turn (the closing id of a cut turn, the environment's messages
    and the template's tokens), left-padded to `suffix_len` tokens; an episode whose next suffix is longer ends
    with finish "max_len". The episodes are the same (up to float rounding in the sampler). A ValueError when an
    opening prompt is longer than `prompt_len`, or when the conversation has fewer slots than the rollout needs.
    """
    G, K, eos, pad = num_generations, sampling.max_new_tokens, sampling.eos_id, sampling.pad_id
    P, N = prompt_len, seq_len - prompt_len
    C = seq_len - K                                             # the per-turn prompt bucket
    if P < 1 or C < P:
        raise ValueError(f"rollout: seq_len {seq_len} must be at least prompt_len {prompt_len} + max_new_tokens {K}")
    R = len(tasks) * G
    envs = [env_factory() for _ in range(R)]
    messages = [list(envs[r].reset(tasks[r // G])) for r in range(R)]
    tools = [_tools_of(e) for e in envs]
    first = [encode_prompt(tokenizer, messages[r], chat_format, tools=tools[r]) for r in range(R)]
    for r, ids in enumerate(first):
        if len(ids) > P:
            raise ValueError(f"task {r // G}: its opening prompt is {len(ids)} tokens with the chat template, longer "
                             f"than the prompt bucket of {P}; raise the prompt length (--data.seq-len)")
    ctx = [list(ids) for ids in first]
    policy = [[0] * len(ids) for ids in first]
    logps = [[0.0] * len(ids) for ids in first]
    rewards, turns, tokens = np.zeros(R, np.float32), np.zeros(R, np.int64), np.zeros(R, np.int64)
    calls, malformed = np.zeros(R, np.int64), np.zeros(R, np.int64)
    finish: list[str | None] = [None] * R
    seconds = {"gen": 0.0, "env": 0.0}
    conversation, pending = None, [[] for _ in range(R)]     # with suffix_len: the cache, each row's new tokens
    need = None if suffix_len is None else conversation_slots(prompt_len=P, max_new_tokens=K,
                                                              max_turns=budget.max_turns, suffix_len=suffix_len)
    for key in jax.random.split(rng, budget.max_turns):
        live = [r for r in range(R) if finish[r] is None]
        if not live:
            break
        if suffix_len is None:           # the whole context again (finished rows: their first prompt)
            width, rows = C, [ctx[r] if finish[r] is None else first[r] for r in range(R)]
        elif conversation is None:       # the opening prompts
            width, rows = P, first
        else:                            # what followed each row's last turn
            width, rows = max(suffix_len, 1), [pending[r] if finish[r] is None else [] for r in range(R)]
        prompts, prompt_mask = np.full((R, width), pad, np.int32), np.zeros((R, width), np.int32)
        for r, ids in enumerate(rows):
            prompts[r, width - len(ids):], prompt_mask[r, width - len(ids):] = ids, 1
        t0 = time.perf_counter()
        if suffix_len is None:
            s = jax.device_get(sample_fn(jnp.asarray(prompts), jnp.asarray(prompt_mask), key))
        else:
            s, conversation = sample_fn(conversation, jnp.asarray(prompts), jnp.asarray(prompt_mask), key)
            s = jax.device_get(s)
            if conversation.key_mask.shape[1] < need:
                raise ValueError(f"rollout: the conversation has {conversation.key_mask.shape[1]} slots, fewer than "
                                 f"the {need} of conversation_slots(prompt_len={P}, max_new_tokens={K}, max_turns="
                                 f"{budget.max_turns}, suffix_len={suffix_len})")
        t1 = time.perf_counter()
        seconds["gen"] += t1 - t0
        for r in live:
            n = int(s.response_mask[r].sum())
            new = [int(t) for t in s.tokens[r, width:width + n]]
            ctx[r] += new
            policy[r] += [1] * n
            logps[r] += [float(x) for x in s.logprobs[r, :n]]
            text = decode_ids(tokenizer, new)
            messages[r].append({"role": "assistant", "content": text})
            ok, bad = parse_tool_calls_report(text, style=getattr(envs[r], "style", "auto"))
            calls[r] += len(ok)
            malformed[r] += len(bad)
            answer, reward, done = envs[r].step(list(messages[r]))
            rewards[r] += float(reward)
            turns[r] += 1
            tokens[r] += n
            before = list(messages[r])
            messages[r] += list(answer)
            finish[r] = "done" if done else budget.spent(turns=int(turns[r]), tokens=int(tokens[r]))
            if finish[r] is not None:
                continue
            closing = [] if new and new[-1] == eos else [eos]   # a turn cut at max_new_tokens: close it
            suffix = closing + turn_suffix_ids(tokenizer, before, answer, eos_id=eos, tools=tools[r],
                                               chat_format=chat_format)
            if len(ctx[r]) + len(suffix) - len(first[r]) + K > N or (suffix_len is not None
                                                                    and len(suffix) > suffix_len):
                finish[r] = "max_len"
                continue
            pending[r] = suffix
            ctx[r] += suffix
            policy[r] += [0] * len(suffix)
            logps[r] += [0.0] * len(suffix)
        seconds["env"] += time.perf_counter() - t1
    finish = [f or "max_turns" for f in finish]
    T = P + N
    tok = np.full((R, T), pad, np.int32)
    mask, resp, lp = np.zeros((R, T), np.int32), np.zeros((R, N), np.int32), np.zeros((R, N), np.float32)
    for r in range(R):
        L = len(first[r])
        rest = ctx[r][L:]
        tok[r, P - L:P], mask[r, P - L:P] = first[r], 1
        tok[r, P:P + len(rest)], mask[r, P:P + len(rest)] = rest, 1
        resp[r, :len(rest)], lp[r, :len(rest)] = policy[r][L:], logps[r][L:]
    episodes = Episodes(tokens=jnp.asarray(tok), mask=jnp.asarray(mask), response_mask=jnp.asarray(resp),
                        sampler_logprobs=jnp.asarray(lp))
    return EnvRollout(episodes=episodes, rewards=rewards, messages=tuple(tuple(m) for m in messages), turns=turns,
                   tool_calls=calls, malformed_calls=malformed, finish=tuple(finish), seconds=seconds)


def rollout_metrics(rollout: EnvRollout) -> dict[str, float]:
    """Per-episode means of a rollout: "tools/calls", "tools/malformed_calls", "turns/mean", the fractions of
    episodes the environment ended ("episodes/done") and that ran out of sequence length ("episodes/max_len"),
    and the seconds spent sampling and in the environments ("timing_s/gen", "timing_s/env", verl's names)."""
    finish = np.asarray(rollout.finish)
    timing = {f"timing_s/{k}": float(v) for k, v in rollout.seconds.items()}
    return timing | {"tools/calls": float(np.mean(rollout.tool_calls)),
                     "tools/malformed_calls": float(np.mean(rollout.malformed_calls)),
                     "turns/mean": float(np.mean(rollout.turns)),
                     "episodes/done": float(np.mean(finish == "done")),
                     "episodes/max_len": float(np.mean(finish == "max_len"))}


class TaskBatches:
    """Lists of `batch_size` tasks, in an order reshuffled every epoch by (seed, epoch) (`ShuffledIterator`);
    `state()` / `restore()` keep the position in checkpoints, so that a resumed run sees the same tasks."""

    def __init__(self, tasks: Sequence[Any], *, batch_size: int, seed: int = 0):
        # Imported here: rlhf_jax.data loads tensorflow_datasets, which the stages (and the GPU benchmark) do not need.
        from rlhf_jax.data.iterators import ShuffledIterator

        self.items, self.batch_size = ShuffledIterator(list(tasks), seed=seed), batch_size

    def __iter__(self):
        return self

    def __next__(self) -> list:
        return [next(self.items) for _ in range(self.batch_size)]

    def state(self) -> dict:
        return self.items.state()

    def restore(self, state) -> None:
        self.items.restore(state)
