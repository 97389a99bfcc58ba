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
import functools
import hashlib
import json
import os
import shlex
import sys
import time
import types
from typing import Literal

import jax
import numpy as np

from rlhf_jax.config_cli import check_ranges, config_check, parse_cli
from rlhf_jax.data import Batches, PreferenceRecord, ShuffledIterator
from rlhf_jax.data.batching import Example
from rlhf_jax.generation import SamplingConfig
from rlhf_jax.models import ModelConfig, init_params
from rlhf_jax.recipes import TOK, cosine_optim, packed_batches, rule_world
from rlhf_jax.recipes.cards import provenance
from rlhf_jax.tasks import skills
from rlhf_jax.train import stages
from rlhf_jax.train.checkpoint import load_params, save_params
from rlhf_jax.train.grpo import GRPOConfig
from rlhf_jax.train.optim import OptimConfig
from rlhf_jax.train.ppo import PPOConfig, init_ppo_state
from rlhf_jax.train.state import create_train_state, with_score_head
from rlhf_jax.train.steps import pair_scores

PILOTS = ("curve", "flawed", "rl")
ARMS = ("grpo_verifier", "grpo_rm", "ppo_rm", "dpo", "rft_verifier", "rft_rm")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PilotConfig:
    """World pilots on dev keys (see the module docstring)."""

    pilot: Literal["curve", "flawed", "rl"] = "flawed"
    """"curve": held-out accuracy against pretraining tokens; "flawed": the same, then SFT on flawed and on
    perfect demonstrations; "rl": the same pretraining, SFT on the flawed demonstrators only, then a reward model
    on SFT-sample pairs of train keys and GRPO with the verifier on train keys, both judged on dev keys."""
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
    rm_prompts: int = 512
    """"rl": train-key prompts per op whose two SFT samples (temperature 1) give the reward model's pairs (pairs
    with equal gold scores are dropped); as many dev-key prompts give its held-out pairs."""
    rm_steps: int = 300
    """"rl": reward-model steps (Bradley-Terry, batch 32, AdamW `rm_lr` cosine, from `rm_init`)."""
    rm_lr: float = 1e-4
    """"rl": reward-model peak learning rate."""
    rm_init: Literal["sft", "base"] = "sft"
    """"rl": the reward model's trunk: the SFT model or the pretrained base."""
    pair_temperature: float = 1.0
    """"rl": sampling temperature of the SFT samples that make the reward model's (and DPO's) pairs."""
    best_of: int = 4
    """"rl": n of the best-of-n picks on dev keys (reward model, random, gold)."""
    grpo_steps: int = 120
    """"rl": GRPO iterations (verifier reward: exact match; 16 train-key prompts x 8 samples, DAPO loss)."""
    grpo_lr: float = 1e-4
    """"rl": GRPO learning rate (constant)."""
    pair_samples: int = 2
    """"rl": SFT samples per reward-model prompt; every two of them with different gold scores make a pair."""
    arms: tuple[str, ...] = ("grpo_verifier",)
    """"rl": stages after the reward model: grpo_verifier (GRPO, exact-match verifier), grpo_rm (GRPO on the
    reward model's scores), ppo_rm (PPO on the reward model's scores, the main job's PPO recipe), dpo (DPO on the gold-labelled train-key pairs), rft_verifier / rft_rm (rejection-
    sampling fine-tuning: `rft_samples` SFT samples of each of 512 train-key prompts, the verifier's right ones or
    the reward model's best one, then the SFT recipe on them)."""
    rft_samples: int = 8
    """"rl": samples per prompt of the rft arms (GRPO's group size)."""
    dpo_steps: int = 150
    """"rl": DPO steps (batch 32)."""
    dpo_beta: float = 0.1
    """"rl": DPO's beta."""
    dpo_lr: float = 1e-4
    """"rl": DPO learning rate (constant)."""
    grpo_kl: float = 0.0
    """"rl": GRPO's KL coefficient towards the SFT model (k3 estimator, in the loss)."""
    ppo_steps: int = 60
    """"rl": PPO iterations (32 train-key prompts, temperature 1, 4 epochs x 4 minibatches)."""
    ppo_lr: float = 1.5e-5
    """"rl": PPO policy learning rate (value: 1e-4)."""
    ppo_kl: float = 0.2
    """"rl": PPO's KL coefficient towards the SFT model (k1, in the reward)."""
    cache: str | None = None
    """Folder of pretrained models keyed by the pretraining settings (reused when present)."""

    def __post_init__(self):
        check_ranges(self, positive=("digits", "max_len", "corpus_docs", "pretrain_steps", "batch_size", "seq_len",
                                     "eval_every", "eval_prompts", "demos", "sft_steps", "k", "max_new_tokens",
                                     "rm_prompts", "rm_steps", "best_of", "grpo_steps", "grpo_lr", "pair_samples",
                                     "dpo_steps", "dpo_beta", "dpo_lr", "rft_samples", "rm_lr", "pair_temperature",
                                     "ppo_steps", "ppo_lr"), non_negative=("grpo_kl", "ppo_kl"))
        config_check(self, set(self.arms) <= set(ARMS), f"arms = {self.arms}: choose from {', '.join(ARMS)}")
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
                                   demos=16, sft_steps=10, k=2, batch_size=16, rm_prompts=16, rm_steps=4,
                                   grpo_steps=2, dpo_steps=2, ppo_steps=2)


def _log(msg: str) -> None:
    print(f"[world_pilots] {msg}", file=sys.stderr, flush=True)


def corpus(cfg: PilotConfig, sk: skills.SkillConfig) -> list[Example]:
    """The pretraining documents (`rule_world.rule_corpus`)."""
    return rule_world.rule_corpus(cfg.ops, docs=cfg.corpus_docs, web_fraction=cfg.web_fraction,
                                  p_correct=cfg.p_correct, prompt_loss=cfg.prompt_loss, seed=cfg.seed, config=sk)


def answers(params, tasks, mc: ModelConfig, cfg: PilotConfig, temperature: float, rng) -> list[str]:
    """One response to each task's prompt (temperature 0: greedy)."""
    return rule_world.answers(params, tasks, mc, max_new_tokens=cfg.max_new_tokens, temperature=temperature, rng=rng)


score = rule_world.scores


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


PRETRAIN_FIELDS = ("seed", "ops", "digits", "max_len", "salt", "p_correct", "prompt_loss", "web_fraction",
                   "corpus_docs", "pretrain_steps", "batch_size", "seq_len", "eval_every", "eval_prompts", "quick")


def cached_pretrain(cfg: PilotConfig, sk, mc, dev_tasks, rng):
    """`pretrain`, or its params and curve from `cfg.cache` when a run with the same pretraining settings saved
    them there."""
    if cfg.cache is None:
        return pretrain(cfg, sk, mc, dev_tasks, rng)
    key = hashlib.sha1(json.dumps({f: getattr(cfg, f) for f in PRETRAIN_FIELDS}, sort_keys=True,
                                  default=list).encode()).hexdigest()[:12]
    folder = os.path.join(cfg.cache, f"pretrained-{key}")
    if os.path.exists(os.path.join(folder, "curve.json")):
        _log(f"pretrained model from {folder}")
        _, params = load_params(folder)
        with open(os.path.join(folder, "curve.json")) as f:
            return jax.tree.map(np.asarray, params), json.load(f)
    params, curve = pretrain(cfg, sk, mc, dev_tasks, rng)
    save_params(folder, params, model_config=mc)
    with open(os.path.join(folder, "curve.json"), "w") as f:
        json.dump(curve, f)
    return params, curve


def sft(cfg: PilotConfig, base_params, mc, demos: list[tuple[skills.SkillTask, str]]):
    """The main job's SFT recipe (`rule_world.sft`) on (task, response) pairs."""
    return rule_world.sft(base_params, mc, demos, steps=cfg.sft_steps, batch_size=cfg.batch_size,
                          seq_len=cfg.seq_len, seed=cfg.seed)


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


def sample_pairs(params, tasks, mc, cfg, rng) -> list[PreferenceRecord]:
    """`rule_world.gold_pairs` of `pair_samples` samples at `pair_temperature` per task."""
    return rule_world.gold_pairs(params, tasks, mc, samples=cfg.pair_samples, temperature=cfg.pair_temperature,
                                 max_new_tokens=cfg.max_new_tokens, rng=rng)[0]


pair_batch, rm_scores, prompt_batches = rule_world.pair_batch, rule_world.rm_scores, rule_world.prompt_batches


def reward_model(cfg, sft_params, mc, train, dev, rng, base_params=None) -> tuple[dict, dict]:
    """R4: a Bradley-Terry reward model on SFT-sample pairs of train keys; its accuracy on dev-key pairs (by op
    and on flaw keys) and its best-of-n pick on dev keys against a random pick and the gold pick."""
    train_pairs = sample_pairs(sft_params, train, mc, cfg, jax.random.fold_in(rng, 101))
    dev_pairs = sample_pairs(sft_params, dev, mc, cfg, jax.random.fold_in(rng, 102))
    if not train_pairs:      # every pair tied (e.g. --quick): nothing to learn from
        _log("reward model: no train-key pair with different gold scores; not trained")
        return {"accuracy": {"train": float("nan"), "train_pairs": 0, "dev": float("nan"),
                             "dev_pairs": len(dev_pairs)}, f"best_of_{cfg.best_of}": None}, None, train_pairs
    batches = Batches(ShuffledIterator(train_pairs, seed=cfg.seed), TOK, kind="preference", batch_size=32,
                      buckets=(64,))
    trunk = base_params if cfg.rm_init == "base" else sft_params
    params = with_score_head(trunk, mc, jax.random.PRNGKey(cfg.seed + 9))
    state = create_train_state(params, cosine_optim(cfg.rm_lr, cfg.rm_steps), jax.random.PRNGKey(cfg.seed + 10),
                               total_steps=cfg.rm_steps)
    state, hist = stages.run_reward(state, batches, stages.RewardConfig(num_steps=cfg.rm_steps,
                                                                        log_every=cfg.rm_steps), model_config=mc)
    rp = state.params
    acc = {}
    for name, pairs in (("train", train_pairs), ("dev", dev_pairs)):
        c, r = pair_scores(rp, pair_batch(pairs), model_config=mc) if pairs else (np.zeros(0), np.zeros(0))
        acc[name] = float(np.mean(np.asarray(c) > np.asarray(r))) if pairs else float("nan")
        acc[f"{name}_pairs"] = len(pairs)
    # best-of-n on dev keys: n samples per prompt; picks by the reward model, at random, and by the gold score
    n = cfg.best_of
    samples = [answers(sft_params, dev, mc, cfg, 1.0, jax.random.fold_in(rng, 200 + i)) for i in range(n)]
    exact = np.array([[skills.gold_score(t, s[j])["exact"] for s in samples] for j, t in enumerate(dev)])  # [P, n]
    scores = np.stack([rm_scores(rp, dev, s, mc) for s in samples], 1)                                     # [P, n]
    bon = {"rm": per_op(dev, exact[np.arange(len(dev)), scores.argmax(1)]), "random": per_op(dev, exact.mean(1)),
           "gold": per_op(dev, exact.max(1))}
    _log(f"reward model: train acc {acc['train']:.3f} ({acc['train_pairs']} pairs), dev acc {acc['dev']:.3f} "
         f"({acc['dev_pairs']} pairs); best-of-{n} exact rm {bon['rm']} random {bon['random']} gold {bon['gold']}")
    return {"accuracy": acc, f"best_of_{n}": bon, "final_loss": hist[-1]["loss"] if hist else None}, rp, train_pairs


def grpo(cfg, sft_params, mc, rl_tasks, train_eval, dev, flaw_mask, rng, reward_params=None) -> dict:
    """GRPO on train-key prompts with the verifier (exact match), or with `reward_params` (a reward model's
    scores); greedy exact match on the train-key evaluation prompts (in distribution) and on dev keys (transfer,
    with the flaw keys apart) every third of the run."""
    reward = {"host_reward_fn": rule_world.exact_verifier([*rl_tasks, *train_eval]), "tokenizer": TOK} if reward_params is None else {
        "reward_params": reward_params}
    sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=1.0, eos_id=TOK.eos_id,
                              pad_id=TOK.pad_id)
    gcfg = GRPOConfig(num_steps=1, batch_size=16, num_generations=8, loss_type="dapo", sampling=sampling,
                      optim=OptimConfig(learning_rate=cfg.grpo_lr), log_every=1, kl_coef=cfg.grpo_kl)
    state = create_train_state(sft_params, gcfg.optim, jax.random.PRNGKey(cfg.seed + 12), total_steps=cfg.grpo_steps)
    point = functools.partial(curve_point, cfg=cfg, mc=mc, train_eval=train_eval, dev=dev, flaw_mask=flaw_mask,
                              rng=rng, stage="grpo")
    curve, rewards, done, data = [point(sft_params, 0)], [], 0, prompt_batches(rl_tasks, 16, cfg.seed + 11)
    third = max(1, cfg.grpo_steps // 3)
    while done < cfg.grpo_steps:
        n = min(third, cfg.grpo_steps - done)
        state, hist = stages.run_grpo(state, data, dataclasses.replace(gcfg, num_steps=n), model_config=mc,
                                      ref_params=sft_params if cfg.grpo_kl else None, **reward)
        done += n
        rewards += [h["reward"] for h in hist]
        curve.append(point(state.params, done))
    return {"curve": curve, "train_reward": rewards}


def curve_point(params, step, *, cfg, mc, train_eval, dev, flaw_mask, rng, stage) -> dict:
    """Greedy exact match on the train-key evaluation prompts and on dev keys (flaw keys apart), with examples."""
    tr = score(train_eval, answers(params, train_eval, mc, cfg, 0.0, rng))[0]
    dv = score(dev, answers(params, dev, mc, cfg, 0.0, rng))[0]
    responses = answers(params, dev[:4], mc, cfg, 0.0, rng)
    p = {"step": step, "train_greedy": per_op(train_eval, tr), "dev_greedy": per_op(dev, dv),
         "dev_greedy_flaw_keys": per_op(dev, dv, flaw_mask),
         "examples": [[t.prompt, r, t.answer] for t, r in zip(dev[:4], responses)]}
    _log(f"{stage} step {step}: train {p['train_greedy']} dev {p['dev_greedy']} dev flaw keys "
         f"{p['dev_greedy_flaw_keys']}; {responses}")
    return p


def ppo(cfg, sft_params, mc, rl_tasks, train_eval, dev, flaw_mask, rng, reward_params) -> dict:
    """PPO on train-key prompts against the reward model (the main job's recipe: k1 KL `ppo_kl` in the reward,
    32 prompts an iteration at temperature 1, 4 epochs x 4 minibatches, value from the reward model), read as
    `grpo` is, every sixth of the run."""
    sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=1.0, eos_id=TOK.eos_id,
                              pad_id=TOK.pad_id)
    pcfg = PPOConfig(num_steps=1, batch_size=32, kl_coef=cfg.ppo_kl, missing_eos_penalty=1.0, sampling=sampling,
                     optim=OptimConfig(learning_rate=cfg.ppo_lr, eps=1e-5, max_grad_norm=1.0),
                     value_optim=OptimConfig(learning_rate=1e-4, eps=1e-5, max_grad_norm=1.0), log_every=1)
    state = init_ppo_state(sft_params, pcfg, model_config=mc, rng=jax.random.PRNGKey(cfg.seed + 15),
                           reward_params=reward_params)
    point = functools.partial(curve_point, cfg=cfg, mc=mc, train_eval=train_eval, dev=dev, flaw_mask=flaw_mask,
                              rng=rng, stage="ppo")
    curve, rewards, done, data = [point(sft_params, 0)], [], 0, prompt_batches(rl_tasks, 32, cfg.seed + 16)
    sixth = max(1, cfg.ppo_steps // 6)
    while done < cfg.ppo_steps:
        n = min(sixth, cfg.ppo_steps - done)
        state, hist = stages.run_ppo(state, data, dataclasses.replace(pcfg, num_steps=n), model_config=mc,
                                     ref_params=sft_params, reward_params=reward_params)
        done += n
        rewards += [h["objective/scores"] for h in hist]
        curve.append(point(state.policy.params, done))
    return {"curve": curve, "train_reward": rewards}


def dpo(cfg, sft_params, mc, pairs, train_eval, dev, flaw_mask, rng) -> dict:
    """DPO (dpo_beta, AdamW dpo_lr constant, batch 32) on the gold-labelled pairs of SFT samples on train keys."""
    batches = Batches(ShuffledIterator(pairs, seed=cfg.seed + 13), TOK, kind="preference", batch_size=32,
                      buckets=(64,))
    dcfg = stages.DPOConfig(num_steps=cfg.dpo_steps, log_every=cfg.dpo_steps, beta=cfg.dpo_beta,
                            optim=OptimConfig(learning_rate=cfg.dpo_lr))
    state = create_train_state(sft_params, dcfg.optim, jax.random.PRNGKey(cfg.seed + 14), total_steps=cfg.dpo_steps)
    state, _ = stages.run_dpo(state, batches, dcfg, model_config=mc, ref_params=sft_params)
    tr = score(train_eval, answers(state.params, train_eval, mc, cfg, 0.0, rng))[0]
    dv = score(dev, answers(state.params, dev, mc, cfg, 0.0, rng))[0]
    out = {"train_greedy": per_op(train_eval, tr), "dev_greedy": per_op(dev, dv),
           "dev_greedy_flaw_keys": per_op(dev, dv, flaw_mask), "pairs": len(pairs),
           "examples": [[t.prompt, r, t.answer] for t, r in zip(dev[:4], answers(state.params, dev[:4], mc, cfg, 0.0,
                                                                                rng))]}
    _log(f"dpo: train {out['train_greedy']} dev {out['dev_greedy']} dev flaw keys {out['dev_greedy_flaw_keys']}")
    return out


def rft(cfg, sft_params, mc, rl_tasks, train_eval, dev, flaw_mask, rng, reward_params=None) -> dict:
    """Rejection-sampling fine-tuning: `rft_samples` SFT samples (temperature 1) per train-key prompt; with the
    verifier each distinct right one is kept, with the reward model the best-scored one; then `sft` on them."""
    samples = [answers(sft_params, rl_tasks, mc, cfg, 1.0, jax.random.fold_in(rng, 300 + i))
               for i in range(cfg.rft_samples)]
    if reward_params is None:
        demos = [(t, r) for j, t in enumerate(rl_tasks) for r in dict.fromkeys(s[j] for s in samples)
                 if skills.gold_score(t, r)["exact"] == 1.0]
    else:
        scores = np.stack([rm_scores(reward_params, rl_tasks, s, mc) for s in samples], 1)       # [P, n]
        demos = [(t, samples[int(scores[j].argmax())][j]) for j, t in enumerate(rl_tasks)]
    if not demos:                      # no sample right (e.g. --quick): nothing to fine-tune on
        _log("rft: no sample the verifier accepts; not trained")
        return None
    params = sft(cfg, sft_params, mc, demos)
    tr = score(train_eval, answers(params, train_eval, mc, cfg, 0.0, rng))[0]
    dv = score(dev, answers(params, dev, mc, cfg, 0.0, rng))[0]
    out = {"train_greedy": per_op(train_eval, tr), "dev_greedy": per_op(dev, dv),
           "dev_greedy_flaw_keys": per_op(dev, dv, flaw_mask), "demos": len(demos),
           "demos_right": float(np.mean([skills.gold_score(t, r)["exact"] for t, r in demos])) if demos else None,
           "samples": cfg.rft_samples * len(rl_tasks)}
    _log(f"rft ({'verifier' if reward_params is None else 'reward model'}): {len(demos)} demos; train "
         f"{out['train_greedy']} dev {out['dev_greedy']} dev flaw keys {out['dev_greedy_flaw_keys']}")
    return out


def rl(cfg: PilotConfig, sk, mc, base_params, rng) -> dict:
    """SFT on the flawed demonstrators, then R4 (a reward model on SFT pairs) and GRPO with the verifier."""
    pairs = [f.partition(":")[::2] for f in cfg.flaws]
    ops, name_of = [op for op, _ in pairs], dict(pairs)
    train = skills.skill_set(ops, cfg.demos, cfg.seed + 1, "train", sk)
    dev = skills.skill_set(ops, cfg.eval_prompts, cfg.seed + 2, "dev", sk)
    flaw_mask = np.array([skills.demonstrate(name_of[t.op], t) != t.answer for t in dev])
    demo_rng = np.random.default_rng(cfg.seed + 4)
    t0 = time.time()
    sft_params = sft(cfg, base_params, mc, [(t, skills.demonstrate(name_of[t.op], t, demo_rng, cfg.flaw_rate))
                                            for t in train])
    out = {"flaw_share_dev": per_op(dev, flaw_mask.astype(float)),
           "sft": measure(sft_params, dev, flaw_mask, mc, cfg, rng)}
    _log(f"sft: {time.time() - t0:.0f} s; greedy {out['sft']['greedy']}")
    rm_train = skills.skill_set(ops, cfg.rm_prompts, cfg.seed + 5, "train", sk)
    rm_dev = skills.skill_set(ops, cfg.rm_prompts, cfg.seed + 6, "dev", sk)
    t0 = time.time()
    out["reward_model"], rm_params, pairs = reward_model(cfg, sft_params, mc, rm_train, rm_dev, rng, base_params)
    out["reward_model"]["wall_s"] = round(time.time() - t0, 1)
    rl_tasks = skills.skill_set(ops, 512, cfg.seed + 7, "train", sk)
    train_eval = skills.skill_set(ops, cfg.eval_prompts, cfg.seed + 8, "train", sk)
    for arm in cfg.arms:
        t0 = time.time()
        if arm == "dpo":
            out[arm] = dpo(cfg, sft_params, mc, pairs, train_eval, dev, flaw_mask, rng) if pairs else None
        elif arm.startswith("rft"):
            out[arm] = None if arm == "rft_rm" and rm_params is None else rft(
                cfg, sft_params, mc, rl_tasks, train_eval, dev, flaw_mask, rng,
                reward_params=rm_params if arm == "rft_rm" else None)
        elif arm in ("grpo_rm", "ppo_rm") and rm_params is None:
            out[arm] = None
        elif arm == "ppo_rm":
            out[arm] = ppo(cfg, sft_params, mc, rl_tasks, train_eval, dev, flaw_mask, rng, rm_params)
        else:
            out[arm] = grpo(cfg, sft_params, mc, rl_tasks, train_eval, dev, flaw_mask, rng,
                            reward_params=rm_params if arm == "grpo_rm" else None)
        if out[arm] is not None:
            out[arm]["wall_s"] = round(time.time() - t0, 1)
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
    if "rl" in result:
        r, k = result["rl"], result["settings"]["k"]
        m = r["sft"]
        lines += ["", "SFT on the flawed demonstrators (dev keys): " + ", ".join(
            f"{op}: greedy {m['greedy'][op]:.2f}, flaw keys {m['greedy_flaw_keys'][op]:.2f}, pass@{k} flaw keys "
            f"{m[f'pass@{k}_flaw_keys'][op]:.2f}" for op in m["greedy"])]
        rm = r["reward_model"]
        bon = rm[f"best_of_{result['settings']['best_of']}"] or {"rm": {}}
        lines += ["", f"Reward model: accuracy {rm['accuracy']['train']:.3f} on {rm['accuracy']['train_pairs']} train-key "
                  f"pairs, {rm['accuracy']['dev']:.3f} on {rm['accuracy']['dev_pairs']} dev-key pairs; best-of-"
                  f"{result['settings']['best_of']} exact on dev keys: " + ", ".join(
                      f"{op}: rm {bon['rm'][op]:.2f}, random {bon['random'][op]:.2f}, gold {bon['gold'][op]:.2f}"
                      for op in bon["rm"])]
        lines += ["", "After SFT: each stage on train keys (greedy exact match)", "",
                  "| stage | step | op | train keys | dev keys | dev flaw keys |", "|---|---|---|---|---|---|"]
        for arm in result["settings"]["arms"]:
            points = (r.get(arm) or {}).get("curve") or ([{**r[arm], "step": "end"}] if r.get(arm) else [])
            for p in points:
                for op in p["dev_greedy"]:
                    lines.append(f"| {arm} | {p['step']} | {op} | {p['train_greedy'][op]:.2f} | "
                                 f"{p['dev_greedy'][op]:.2f} | {p['dev_greedy_flaw_keys'][op]:.2f} |")
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
    base, curve = cached_pretrain(cfg, sk, mc, dev, rng)
    result = {"pilot": cfg.pilot, "settings": dataclasses.asdict(cfg), "model": {"d_model": mc.d_model,
              "num_layers": mc.num_layers, "num_heads": mc.num_heads}, "curve": curve}
    if cfg.pilot == "flawed":
        result["flawed"] = flawed(cfg, sk, mc, base, rng)
    if cfg.pilot == "rl":
        result["rl"] = rl(cfg, sk, mc, base, rng)
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
