"""Pilots of a world where post-training can win: rule-level skills over random keys (`rlhf_jax.tasks.skills`),
measured on dev keys only.

    python -m experiments.world_pilots --pilot curve            # (a) ~5 min on 2 busy CPU cores
    python -m experiments.world_pilots --pilot flawed           # (a) and (b) 7-9 min
    python -m experiments.world_pilots --pilot flawed --ops reverse --flaws reverse:truncate --max-len 6 \
        --p-correct 0.8 --no-prompt-loss --eval-prompts 128    # the pilot that learns the rule (docs/world.md)
    python -m experiments.world_pilots --pilot flawed --quick   # smoke test

Both pilots pretrain the main job's model (width 96, 3 layers, 4 heads, byte tokens) on a mixed corpus of packed
documents, the loss on every token as in the main job's pretraining: rule rows (a prompt of each op in `ops` on a
train key, answered right with probability `p_correct`, else a slip, a flawed answer or the answer in filler:
`skills.noisy_response`) and `web_fraction` of the main world's noisy web corpus. On dev keys:

* "curve" (a): greedy exact match and partial credit of each op every `eval_every` steps, against tokens seen.
* "flawed" (b), after the same pretraining (and its curve): SFT on `demos` train-key demonstrations of the
  flawed demonstrators in `flaws` ("op:demonstrator") gives greedy accuracy (R2), pass@1 and pass@`k` at
  temperature 1 (R3); the same SFT on as many perfect demonstrations of the same prompts gives R5's comparison.
  Accuracies are also split into the keys where the flawed demonstrator is wrong and those where it is right.

Writes OUT/<pilot>.json (settings, `provenance`, numbers) and prints a markdown table.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shlex
import sys
import time
import types
from typing import Literal

import jax
import numpy as np

from rlhf_jax import tasks as world
from rlhf_jax.config_cli import check_ranges, config_check, parse_cli
from rlhf_jax.data import Batches, SFTRecord, ShuffledIterator, collate_prompts
from rlhf_jax.data.batching import Example
from rlhf_jax.eval import sample_texts
from rlhf_jax.generation import SamplingConfig
from rlhf_jax.models import ModelConfig, init_params
from rlhf_jax.recipes import TOK, cosine_optim, packed_batches
from rlhf_jax.recipes.cards import provenance
from rlhf_jax.tasks import skills
from rlhf_jax.tokenizer import encode_chat, encode_prompt
from rlhf_jax.train import stages
from rlhf_jax.train.state import create_train_state

PILOTS = ("curve", "flawed")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PilotConfig:
    """World pilots on dev keys (see the module docstring)."""

    pilot: Literal["curve", "flawed"] = "flawed"
    """"curve": held-out accuracy against pretraining tokens; "flawed": the same, then SFT on flawed and on
    perfect demonstrations."""
    out: str = "runs/world_pilots"
    """Output folder (OUT/<pilot>.json)."""
    quick: bool = False
    """Tiny sizes (a smoke test, not a measurement)."""
    seed: int = 0
    """Model initialisation and data seed."""
    ops: tuple[str, ...] = ("reverse", "add")
    """Operations in the pretraining corpus (`skills.OPS`)."""
    digits: int = 2
    """Operand digits of add / addr."""
    max_len: int = 7
    """Longest random string of the string operations."""
    salt: str = "pilot-1"
    """Salt of the train/dev key split (a fresh partition)."""
    p_correct: float = 0.6
    """Probability that a rule row of the corpus is answered right."""
    prompt_loss: bool = True
    """Pretraining loss on the rule rows' prompts too (the main job's packed documents); --no-prompt-loss: on their
    answers only (instruction-formatted pretraining data)."""
    web_fraction: float = 0.1
    """Share of the corpus documents that come from the main world's web corpus (`tasks.web_corpus`)."""
    corpus_docs: int = 40_000
    """Documents in the pretraining corpus."""
    pretrain_steps: int = 800
    """Pretraining steps (AdamW 1e-3 cosine, weight decay 0.1)."""
    batch_size: int = 32
    """Packed rows per step, in pretraining and SFT."""
    seq_len: int = 96
    """Tokens per packed row."""
    eval_every: int = 200
    """Pretraining steps between two evaluations of the curve."""
    eval_prompts: int = 64
    """Dev prompts per op."""
    flaws: tuple[str, ...] = ("add:drop_carry", "reverse:truncate")
    """"flawed": "op:demonstrator" pairs of the SFT demonstrations (`skills.DEMONSTRATORS`)."""
    flaw_rate: float = 1.0
    """"flawed": probability that a demonstration carries its demonstrator's flaw (else it is right)."""
    demos: int = 300
    """"flawed": demonstrations per entry of `flaws` (train keys)."""
    sft_steps: int = 100
    """"flawed": SFT steps (AdamW 3e-4 cosine, the main job's SFT learning rate)."""
    k: int = 8
    """"flawed": samples per prompt at temperature 1 for pass@1 and pass@k."""
    max_new_tokens: int = 40
    """Response budget (the filler answers are up to ~40 bytes)."""

    def __post_init__(self):
        check_ranges(self, positive=("digits", "max_len", "corpus_docs", "pretrain_steps", "batch_size", "seq_len",
                                     "eval_every", "eval_prompts", "demos", "sft_steps", "k", "max_new_tokens"))
        config_check(self, all(op in skills.OPS for op in self.ops), f"ops = {self.ops}: choose from {skills.OPS}")
        config_check(self, 0 <= self.p_correct <= 1 and 0 <= self.web_fraction < 1 and 0 <= self.flaw_rate <= 1,
                     "p_correct and flaw_rate must be in [0, 1], web_fraction in [0, 1)")
        for f in self.flaws:
            op, _, name = f.partition(":")
            config_check(self, op in self.ops and name in skills.DEMONSTRATORS,
                         f"flaws entry {f!r}: write op:demonstrator, op in ops {self.ops}, demonstrator in "
                         f"{tuple(skills.DEMONSTRATORS)}")

    def scaled(self) -> "PilotConfig":
        if not self.quick:
            return self
        return dataclasses.replace(self, corpus_docs=3000, pretrain_steps=40, eval_every=20, eval_prompts=16,
                                   demos=16, sft_steps=10, k=2, batch_size=16)


def _log(msg: str) -> None:
    print(f"[world_pilots] {msg}", file=sys.stderr, flush=True)


def _example(messages, full_loss: bool) -> Example:
    ids, mask = encode_chat(TOK, messages)
    return Example(tuple(ids), tuple((1,) * len(ids) if full_loss else mask), 0)


def _messages(task: skills.SkillTask, response: str) -> list[dict]:
    return [{"role": "user", "content": task.prompt}, {"role": "assistant", "content": response}]


def corpus(cfg: PilotConfig, sk: skills.SkillConfig) -> list[Example]:
    """The pretraining documents: rule rows of every op on train keys, answered right with prob p_correct, and
    web_fraction of the main world's web corpus; the loss on every token."""
    rng = np.random.default_rng(cfg.seed)
    n_web = int(cfg.web_fraction * cfg.corpus_docs)
    n_rule = (cfg.corpus_docs - n_web) // len(cfg.ops)
    docs = [_example(d["messages"], True) for d in world.web_corpus(n_web, cfg.seed)]
    for op in cfg.ops:
        for _ in range(n_rule):
            t = skills.make_skill(op, rng, "train", sk)
            docs.append(_example(_messages(t, skills.noisy_response(t, rng, cfg.p_correct)), cfg.prompt_loss))
    return docs


def answers(params, tasks, mc: ModelConfig, cfg: PilotConfig, temperature: float, rng) -> list[str]:
    """One response to each task's prompt (temperature 0: greedy)."""
    batch = collate_prompts([encode_prompt(TOK, [{"role": "user", "content": t.prompt}]) for t in tasks],
                            buckets=(64,), pad_id=TOK.pad_id)
    sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=temperature, eos_id=TOK.eos_id,
                              pad_id=TOK.pad_id)
    return sample_texts(params, batch["prompts"], batch["prompt_mask"], rng, model_config=mc, sampling=sampling,
                        tokenizer=TOK, chunk=min(256, len(tasks)))


def score(tasks, responses) -> tuple[np.ndarray, np.ndarray]:
    s = [skills.gold_score(t, r) for t, r in zip(tasks, responses)]
    return np.array([x["exact"] for x in s]), np.array([x["partial"] for x in s])


def per_op(tasks, values: np.ndarray, mask: np.ndarray | None = None) -> dict[str, float]:
    """{op: mean of values over that op's tasks (within mask)}."""
    out = {}
    for op in dict.fromkeys(t.op for t in tasks):
        sel = np.array([t.op == op for t in tasks]) & (True if mask is None else mask)
        out[op] = float(values[sel].mean()) if sel.any() else float("nan")
    return out


def pretrain(cfg: PilotConfig, sk, mc, dev_tasks, rng):
    """(params, curve): the pretraining run, evaluated greedily on dev_tasks every eval_every steps."""
    docs = corpus(cfg, sk)
    pack = types.SimpleNamespace(seq_len=cfg.seq_len, batch_size=cfg.batch_size)
    batches = packed_batches(docs, pack, cfg.seed)
    k_init = jax.random.PRNGKey(cfg.seed)
    state = create_train_state(init_params(mc, k_init), cosine_optim(1e-3, cfg.pretrain_steps, weight_decay=0.1),
                               jax.random.fold_in(k_init, 1), total_steps=cfg.pretrain_steps)
    curve, done, t0 = [], 0, time.time()
    while done < cfg.pretrain_steps:
        n = min(cfg.eval_every, cfg.pretrain_steps - done)
        state, _ = stages.run_sft(state, batches, stages.SFTConfig(num_steps=n, log_every=n), model_config=mc)
        done += n
        responses = answers(state.params, dev_tasks, mc, cfg, 0.0, rng)
        exact, partial = score(dev_tasks, responses)
        point = {"step": done, "tokens": done * cfg.batch_size * cfg.seq_len, "exact": per_op(dev_tasks, exact),
                 "partial": per_op(dev_tasks, partial)}
        curve.append(point)
        for op in dict.fromkeys(t.op for t in dev_tasks):       # one example per op: what the errors look like
            i = next(j for j, t in enumerate(dev_tasks) if t.op == op)
            _log(f"  {dev_tasks[i].prompt!r} -> {responses[i]!r} (gold {dev_tasks[i].answer!r})")
        _log(f"step {done} ({time.time() - t0:.0f} s): " + " ".join(f"{k} {v:.2f}" for k, v in point["exact"].items()))
    return state.params, curve


def sft(cfg: PilotConfig, base_params, mc, demos: list[tuple[skills.SkillTask, str]]):
    """The main job's SFT recipe (packed rows, loss on the answers, AdamW 3e-4 cosine) on (task, response) pairs."""
    records = [SFTRecord(messages=tuple(_messages(t, r))) for t, r in demos]
    batches = Batches(ShuffledIterator(records, seed=cfg.seed), TOK, kind="sft", batch_size=cfg.batch_size,
                      buckets=(cfg.seq_len,), pack=True)
    state = create_train_state(base_params, cosine_optim(3e-4, cfg.sft_steps), jax.random.PRNGKey(cfg.seed + 1),
                               total_steps=cfg.sft_steps)
    state, _ = stages.run_sft(state, batches, stages.SFTConfig(num_steps=cfg.sft_steps, log_every=cfg.sft_steps),
                              model_config=mc)
    return state.params


def measure(params, tasks, flaw_mask, mc, cfg, rng) -> dict:
    """Greedy exact / partial, pass@1 and pass@k at temperature 1, per op; exact also on the keys where the
    flawed demonstrator is wrong ("flaw_keys") and right ("clean_keys")."""
    g_exact, g_partial = score(tasks, answers(params, tasks, mc, cfg, 0.0, rng))
    samples = np.stack([score(tasks, answers(params, tasks, mc, cfg, 1.0, jax.random.fold_in(rng, i + 1)))[0]
                        for i in range(cfg.k)])                                                   # [k, n]
    return {"greedy": per_op(tasks, g_exact), "greedy_partial": per_op(tasks, g_partial),
            "greedy_flaw_keys": per_op(tasks, g_exact, flaw_mask), "greedy_clean_keys": per_op(tasks, g_exact, ~flaw_mask),
            "pass@1": per_op(tasks, samples.mean(0)), f"pass@{cfg.k}": per_op(tasks, samples.max(0)),
            f"pass@{cfg.k}_flaw_keys": per_op(tasks, samples.max(0), flaw_mask)}


def flawed(cfg: PilotConfig, sk, mc, base_params, rng) -> dict:
    """Base, SFT on the flawed demonstrators and SFT on perfect demonstrations of the same prompts, on dev keys."""
    pairs = [f.partition(":")[::2] for f in cfg.flaws]
    ops = [op for op, _ in pairs]
    train = skills.skill_set(ops, cfg.demos, cfg.seed + 1, "train", sk)
    dev = skills.skill_set(ops, cfg.eval_prompts, cfg.seed + 2, "dev", sk)
    name_of = dict(pairs)
    flaw_mask = np.array([skills.demonstrate(name_of[t.op], t) != t.answer for t in dev])
    out = {"flaw_share_dev": per_op(dev, flaw_mask.astype(float)), "arms": {}}
    out["arms"]["base"] = measure(base_params, dev, flaw_mask, mc, cfg, rng)
    demo_rng = np.random.default_rng(cfg.seed + 4)
    for arm, demo_of in (("sft_flawed", lambda t: skills.demonstrate(name_of[t.op], t, demo_rng, cfg.flaw_rate)),
                         ("sft_perfect", lambda t: t.answer)):
        t0 = time.time()
        params = sft(cfg, base_params, mc, [(t, demo_of(t)) for t in train])
        out["arms"][arm] = measure(params, dev, flaw_mask, mc, cfg, rng)
        _log(f"{arm}: {time.time() - t0:.0f} s; greedy " +
             " ".join(f"{k} {v:.2f}" for k, v in out["arms"][arm]["greedy"].items()))
    return out


def markdown(result: dict) -> str:
    lines = [f"# world pilot: {result['pilot']} (dev keys, seed {result['settings']['seed']})", ""]
    curve = result["curve"]
    ops = list(curve[0]["exact"])
    lines += ["Greedy exact match on dev keys against pretraining tokens", "",
              "| step | tokens | " + " | ".join(ops) + " |", "|---|---|" + "---|" * len(ops)]
    lines += [f"| {p['step']} | {p['tokens']:,} | " + " | ".join(f"{p['exact'][o]:.2f}" for o in ops) + " |"
              for p in curve]
    if "flawed" in result:
        f = result["flawed"]
        k = result["settings"]["k"]
        cols = ("greedy", "greedy_flaw_keys", "greedy_clean_keys", "pass@1", f"pass@{k}", f"pass@{k}_flaw_keys")
        lines += ["", f"After SFT ({', '.join(result['settings']['flaws'])}); flaw keys: where the flawed "
                  "demonstrator is wrong (share: " + ", ".join(f"{o} {v:.2f}" for o, v in f["flaw_share_dev"].items())
                  + ")", "", "| arm | op | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
        for arm, m in f["arms"].items():
            for op in m["greedy"]:
                lines.append(f"| {arm} | {op} | " + " | ".join(f"{m[c][op]:.2f}" for c in cols) + " |")
    return "\n".join(lines)


def run(cfg: PilotConfig, command: str) -> dict:
    cfg = cfg.scaled()
    os.makedirs(cfg.out, exist_ok=True)
    sk = skills.SkillConfig(max_len=cfg.max_len, digits=cfg.digits, salt=cfg.salt)
    mc = ModelConfig(vocab_size=TOK.vocab_size, d_model=96, num_layers=3, num_heads=4, mlp_dim=384, max_seq_len=128)
    if cfg.quick:
        mc = dataclasses.replace(mc, d_model=32, num_layers=1, mlp_dim=64)
    rng = jax.random.PRNGKey(7000 + cfg.seed)
    t0 = time.time()
    dev = skills.skill_set(cfg.ops, cfg.eval_prompts, cfg.seed + 3, "dev", sk)
    base, curve = pretrain(cfg, sk, mc, dev, rng)
    result = {"pilot": cfg.pilot, "settings": dataclasses.asdict(cfg), "model": {"d_model": mc.d_model,
              "num_layers": mc.num_layers, "num_heads": mc.num_heads}, "curve": curve}
    if cfg.pilot == "flawed":
        result["flawed"] = flawed(cfg, sk, mc, base, rng)
    result["wall_s"] = round(time.time() - t0, 1)
    result["provenance"] = provenance(command, [cfg.seed])
    with open(os.path.join(cfg.out, f"{cfg.pilot}.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result


def main(argv=None) -> None:
    cfg = parse_cli(PilotConfig, argv)
    command = "python -m experiments.world_pilots " + shlex.join(sys.argv[1:] if argv is None else argv)
    print(markdown(run(cfg, command)))


if __name__ == "__main__":
    main()
