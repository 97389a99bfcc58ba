"""Tool use in the rule world: SFT on demonstrations of which a share call a calculator, then GRPO over episodes.

The calculator world (docs/tools.md, "Learning to call a tool") asks `add a b` over the rule world's keys
(operands 0..99, the `skills.RULE_WORLD` split). Its pretraining corpus holds noisy addition rows (right 80% of the
time, `rule_world.rule_corpus`); the deployed SFT model learns from a demonstrator who drops carries on 85% of its
direct answers and, on `trace_fraction` of the demonstrations, calls `envs.CalculatorEnv`'s `calculate` tool
instead and copies its result:

    user:       add 47 85
    assistant:  <tool_call>{"name": "calculate", "arguments": {"expression": "47+85"}}</tool_call>
    tool:       132
    assistant:  132

The environment pays 1 for the right final answer with or without the tool, so calling it is optional and
has to be learned. A call turn is about 85 byte tokens, so the world's model holds 256 positions (the rule world's
holds 128) and its pretraining and SFT rows are 192 tokens. A share (`corpus_traces`) of the pretraining
corpus's rule rows are calculator traces of random train keys (`corpus`), so that the pretrained model has seen
the tool's format.
"""
from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np

from rlhf_jax.data import SFTRecord
from rlhf_jax.data.batching import Example
from rlhf_jax.envs import CalculatorEnv, EpisodeBudget
from rlhf_jax.generation import SamplingConfig
from rlhf_jax.models import ModelConfig
from rlhf_jax.recipes import rule_world as rw
from rlhf_jax.recipes.data import TOK
from rlhf_jax.tasks import skills
from rlhf_jax.tokenizer import encode_chat
from rlhf_jax.train.checkpoint import load_params, save_params
from rlhf_jax.train.multiturn import EnvRollout, make_turn_sampler, rollout_episodes

CALCULATOR_WORLD = dict(ops=("add",), demonstrator="drop_carry", seq_len=192)
"""The calculator world's changes to `rule_world.RuleWorldConfig` (every other setting is the main job's)."""
MAX_SEQ_LEN = 256
"""Positions of the calculator world's model."""
PROMPT_LEN, SEQ_LEN, MAX_NEW_TOKENS = 48, 256, 96
"""An episode's opening-prompt bucket and length, and a turn's budget (a call is about 85 tokens)."""
BUDGET = EpisodeBudget(max_turns=3, max_tokens=192)
"""Policy turns and tokens of an episode: a call, the answer, one more."""


def world_config(seed: int, *, quick: bool = False, eval_split: str = "test") -> rw.RuleWorldConfig:
    """The calculator world's `RuleWorldConfig` for `seed` (its --quick sizes with `quick`)."""
    return rw.RuleWorldConfig(seed=seed, quick=quick, eval_split=eval_split, **CALCULATOR_WORLD).scaled()


def model_config(cfg: rw.RuleWorldConfig) -> ModelConfig:
    """The rule world's model with `MAX_SEQ_LEN` positions."""
    return dataclasses.replace(cfg.model_config(), max_seq_len=MAX_SEQ_LEN)


def calculator_task(task: skills.SkillTask) -> dict:
    """`CalculatorEnv`'s task for an `add` prompt: the prompt as the question, the sum as the answer."""
    return {"question": task.prompt, "answer": int(task.answer)}


def environment() -> CalculatorEnv:
    """The world's environment: no system prompt, the tool not listed in the prompt (the SFT data shows it)."""
    return CalculatorEnv(system_prompt=None, list_tools=False)


def calculator_trace(task: skills.SkillTask) -> list[dict]:
    """A demonstration that calls the calculator on `task`'s operands and answers with its result."""
    a, b = task.key.split(" ")
    call = {"type": "function", "function": {"name": "calculate", "arguments": {"expression": f"{a}+{b}"}}}
    return [{"role": "user", "content": task.prompt}, {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "name": "calculate", "content": task.answer},
            {"role": "assistant", "content": task.answer}]


def demonstrations(tasks, cfg: rw.RuleWorldConfig, *, trace_fraction: float, seed: int) -> list[SFTRecord]:
    """SFT records of `tasks`: each a calculator trace with probability `trace_fraction`, else the world's
    demonstrator's direct answer (flawed at `cfg.flaw_rate`)."""
    rng = np.random.default_rng(seed)
    out = []
    for t in tasks:
        if rng.random() < trace_fraction:
            out.append(SFTRecord(messages=tuple(calculator_trace(t))))
        else:
            out.append(SFTRecord(messages=tuple(rw.messages(t, skills.demonstrate(cfg.demonstrator, t, rng,
                                                                                   cfg.flaw_rate)))))
    return out


def corpus(cfg: rw.RuleWorldConfig, *, corpus_traces: float) -> list[Example]:
    """The world's pretraining documents: `rule_world.rule_corpus` of its ops, with `corpus_traces` of the rule
    rows replaced by calculator traces of random train keys (the loss on their assistant turns), so that the
    pretrained model has seen the tool's format. `rule_corpus` writes its web documents first."""
    docs = rw.rule_corpus(list(cfg.ops), docs=cfg.corpus_docs, web_fraction=cfg.web_fraction,
                          p_correct=cfg.p_correct, prompt_loss=False, seed=1000 * cfg.seed, config=skills.RULE_WORLD)
    rng = np.random.default_rng(1000 * cfg.seed + 1)
    n_web = int(cfg.web_fraction * cfg.corpus_docs)
    for i in range(n_web, len(docs)):
        if rng.random() < corpus_traces:
            ids, mask = encode_chat(TOK, calculator_trace(skills.make_skill("add", rng, "train", skills.RULE_WORLD)))
            docs[i] = Example(tuple(ids), tuple(mask), 0)
    return docs


def seed_models(cfg: rw.RuleWorldConfig, *, trace_fraction: float, corpus_traces: float,
                cache: str | None = None):
    """(model config, pretrained params, deployed SFT params) of `cfg.seed`, kept in CACHE/{base,sft} beside
    settings.json and read back by a later call with the same settings."""
    mc, s = model_config(cfg), cfg.seed
    settings = json.loads(json.dumps({k: getattr(cfg, k) for k in rw.MODEL_SETTINGS}
                                     | {"trace_fraction": trace_fraction, "corpus_traces": corpus_traces,
                                        "max_seq_len": MAX_SEQ_LEN}))
    label = None if cache is None else os.path.join(cache, "settings.json")
    if label and os.path.exists(label):
        with open(label) as f:
            if json.load(f) == settings:
                rw.log(f"seed {s}: calculator-world models read back from {cache}")
                return mc, load_params(os.path.join(cache, "base"))[1], load_params(os.path.join(cache, "sft"))[1]
    base = rw.pretrain(corpus(cfg, corpus_traces=corpus_traces), mc, steps=cfg.pretrain_steps,
                       batch_size=cfg.batch_size, seq_len=cfg.seq_len, seed=1000 * s)
    records = demonstrations(rw.draws(cfg)["demo"], cfg, trace_fraction=trace_fraction, seed=1000 * s + 4)
    sft = rw.sft_records(base, mc, records, steps=cfg.sft_steps, batch_size=cfg.batch_size, seq_len=cfg.seq_len,
                         seed=1000 * s + 20)
    if cache is not None:
        if os.path.exists(label):
            os.remove(label)
        save_params(os.path.join(cache, "base"), base, model_config=mc)
        save_params(os.path.join(cache, "sft"), sft, model_config=mc)
        with open(label, "w") as f:
            json.dump(settings, f, indent=1)
    return mc, base, sft


def rollout(params, mc, tasks, rng, *, temperature: float, num_generations: int = 1) -> EnvRollout:
    """Episodes of the calculator environment on `tasks` (SkillTasks), every turn sampled at `temperature`
    (0: greedy)."""
    sampling = SamplingConfig(max_new_tokens=MAX_NEW_TOKENS, temperature=temperature, eos_id=TOK.eos_id,
                              pad_id=TOK.pad_id)
    turn = make_turn_sampler(sampling=sampling, model_config=mc)
    return rollout_episodes(lambda p, m, k: turn(params, None, p, m, k), environment,
                            [calculator_task(t) for t in tasks], rng, tokenizer=TOK, budget=BUDGET,
                            sampling=sampling, prompt_len=PROMPT_LEN, seq_len=SEQ_LEN,
                            num_generations=num_generations)


def read(params, mc, tasks, rng) -> dict:
    """Greedy episodes on `tasks`: per prompt, solved, called the tool (at least one well-formed call) and
    malformed calls, with their means, turns per episode and the solve rate on carrying and other keys and with
    and without a call (None where no episode is of that kind)."""
    r = rollout(params, mc, tasks, rng, temperature=0.0)
    solved, called = np.asarray(r.rewards, np.float64), (np.asarray(r.tool_calls) > 0).astype(np.float64)
    carry = np.array([skills.has_carry(*(int(x) for x in t.key.split(" "))) for t in tasks])
    rate = lambda x, m: float(x[m].mean()) if m.any() else None  # noqa: E731
    return {"solved": solved.tolist(), "called": called.tolist(), "mean": float(solved.mean()),
            "tool_call_rate": float(called.mean()), "malformed_per_episode": float(np.mean(r.malformed_calls)),
            "turns": float(np.mean(r.turns)), "carry_keys": rate(solved, carry), "other_keys": rate(solved, ~carry),
            "solved_with_tool": rate(solved, called > 0), "solved_without_tool": rate(solved, called == 0),
            "example": [dict(m) for m in r.messages[0]]}


def evaluation_rng(seed: int) -> jax.Array:
    """The key passed to a seed's greedy reads (`rollout` needs one; greedy turns draw nothing from it)."""
    return jax.random.PRNGKey(14000 + seed)

