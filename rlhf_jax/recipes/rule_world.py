"""The rule world's main job: post-training measured where it can win (docs/world.md, "Design and hypotheses").

One seed of `run_rule_world` builds its own world and models on `skills.RULE_WORLD` keys (reversal of random
3-6 letter strings), then:

1. pretraining on a corpus of noisy rule rows (right 80% of the time) plus web documents;
2. SFT on a demonstrator that truncates long reversals 85% of the time (the deployed model), and oracle SFT on
   perfect demonstrations of the same prompts (the ceiling);
3. SFT at its best temperature, picked on dev keys;
4. a Bradley-Terry reward model on gold-labelled pairs of SFT samples of train keys;
5. from the SFT model: PPO on the reward model, GRPO on the exact-match verifier, DPO on the reward model's
   pairs, rejection-sampling fine-tuning by the verifier and by the reward model, and two zero-signal controls.

The GRPO policy's params are kept in OUT/grpo (a post-trained teacher for distillation). Every stage is read on
`eval_split` keys (test, or dev while choosing) drawn per seed, greedily (the primary metric) and at temperature
0.7, on the flaw keys apart, and on train keys of the RL stages' pool (learning in distribution). `seed_summary`
turns the seeds' reports into the primary comparisons with a seeds-and-prompts bootstrap
(`stats.seed_prompt_bootstrap`). The stage helpers are also the pilots' (`experiments/world_pilots.py`).
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
from rlhf_jax.checks import check_ranges, config_check
from rlhf_jax.data import Batches, PreferenceRecord, SFTRecord, ShuffledIterator, collate_prompts
from rlhf_jax.data.batching import Example, collate_preference, tokenize_preference, truncate
from rlhf_jax.envs import RETRY_FEEDBACK
from rlhf_jax.eval import sample_episodes_jit, sample_texts
from rlhf_jax.generation import SamplingConfig
from rlhf_jax.models import ModelConfig, init_params
from rlhf_jax.recipes.cards import provenance
from rlhf_jax.recipes.data import TOK, cosine_optim, document_example, packed_batches
from rlhf_jax.recipes.stages import zero_reward
from rlhf_jax.stats import seed_prompt_bootstrap, seed_prompt_replicates
from rlhf_jax.tasks import skills
from rlhf_jax.tokenizer import encode_chat, encode_prompt
from rlhf_jax.train import stages
from rlhf_jax.train.grpo import GRPOConfig
from rlhf_jax.train.optim import OptimConfig
from rlhf_jax.train.ppo import PPOConfig, init_ppo_state
from rlhf_jax.train.checkpoint import load_params, save_params
from rlhf_jax.train.logging import StageHooks
from rlhf_jax.train.rl import decode_ids, episode_sequence_logps
from rlhf_jax.train.state import create_train_state, with_score_head
from rlhf_jax.train.steps import pair_scores

STAGES = ("sft", "sft_t07", "sft_best_t", "oracle_sft", "ppo", "grpo", "dpo", "rft_verifier", "rft_rm",
          "ppo_zero_reward", "dpo_beta0")
"""Rows of a seed's table, in order."""
PRIMARY = (("grpo", "sft_best_t"), ("ppo", "sft_best_t"), ("dpo", "sft_t07"))
"""The primary comparisons named in the design (stage, baseline), greedy stage against the baseline's metric."""
RM_THRESHOLD = 0.75
"""The reward model's accuracy on unseen-key pairs that the design asks for."""
SEQ_LOGPS = jax.jit(episode_sequence_logps, static_argnames=("model_config",))
"""log pi(y|x) of episodes, compiled once per model config."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class RuleWorldConfig:
    """One seed of the rule world's main job (docs/world.md, "Design and hypotheses"); the defaults are the design."""

    out: str = "runs/rule_world"
    """Output folder of this seed (report.json)."""
    seed: int = 0
    """Initialisation, corpus, demonstrations, pairs, RL prompts and evaluation keys."""
    eval_split: Literal["test", "dev"] = "test"
    """Keys every stage is read on: test, or dev (while choosing)."""
    quick: bool = False
    """Tiny sizes (a smoke test, not a measurement)."""
    ops: tuple[str, ...] = ("reverse",)
    """Operations (`skills.OPS`)."""
    demonstrator: str = "truncate"
    """The flawed demonstrator of the deployed SFT (`skills.DEMONSTRATORS`)."""
    flaw_rate: float = 0.85
    """Probability that a demonstration carries the flaw."""
    p_correct: float = 0.8
    """Probability that a rule row of the pretraining corpus is right."""
    web_fraction: float = 0.1
    """Share of corpus documents from the main world's web corpus."""
    corpus_docs: int = 40_000
    """Pretraining documents."""
    pretrain_steps: int = 600
    """Pretraining steps (32 x 96 packed tokens, AdamW 1e-3 cosine, weight decay 0.1; loss on the rule rows'
    answers and on every web token)."""
    batch_size: int = 32
    """Packed rows per step of pretraining and SFT."""
    seq_len: int = 96
    """Tokens per packed row."""
    demos: int = 300
    """SFT demonstrations (train keys)."""
    sft_steps: int = 100
    """SFT steps (AdamW 3e-4 cosine), also of oracle SFT and rejection sampling."""
    temperatures: tuple[float, ...] = (0.0, 0.3, 0.7, 1.0)
    """SFT's temperature sweep on dev keys (0 = greedy)."""
    eval_prompts: int = 256
    """Keys per evaluation set (eval split, dev sweep, train keys)."""
    eval_samples: int = 4
    """Samples per prompt of a temperature > 0 evaluation (its per-prompt value is their mean)."""
    max_new_tokens: int = 16
    """Response budget."""
    rm_prompts: int = 1024
    """Train-key prompts whose SFT samples make the reward model's pairs."""
    rm_eval_prompts: int = 512
    """Eval-split prompts whose SFT samples make the pairs its accuracy is read on."""
    pair_samples: int = 4
    """SFT samples per pair prompt; every two with different gold scores make a pair."""
    pair_temperature: float = 1.5
    """Temperature of the pairs' samples."""
    rm_steps: int = 500
    """Reward-model steps (batch 32, AdamW `rm_lr` cosine, from the SFT model)."""
    rm_lr: float = 3e-4
    """Reward-model peak learning rate."""
    rl_prompts: int = 512
    """Train-key prompt pool of the RL stages and rejection sampling."""
    ppo_steps: int = 40
    """PPO iterations (32 prompts at temperature 1, 4 epochs x 4 minibatches)."""
    ppo_lr: float = 1.5e-5
    """PPO's policy learning rate (value: 1e-4)."""
    ppo_kl: float = 0.2
    """PPO's KL coefficient (k1, in the reward)."""
    grpo_steps: int = 80
    """GRPO iterations (16 prompts x 8 samples, DAPO loss, no KL)."""
    grpo_lr: float = 1e-4
    """GRPO's learning rate (constant)."""
    dpo_steps: int = 150
    """DPO steps (batch 32)."""
    dpo_beta: float = 0.3
    """DPO's beta."""
    dpo_lr: float = 3e-5
    """DPO's learning rate (constant)."""
    rft_samples: int = 8
    """Samples per prompt of rejection sampling."""
    controls: bool = True
    """Also run the zero-signal controls (PPO with reward 0, DPO with beta 1e-3)."""

    def __post_init__(self):
        check_ranges(self, positive=("corpus_docs", "pretrain_steps", "batch_size", "seq_len", "demos", "sft_steps",
                                     "eval_prompts", "eval_samples", "max_new_tokens", "rm_prompts",
                                     "rm_eval_prompts", "pair_samples", "pair_temperature", "rm_steps", "rm_lr",
                                     "rl_prompts", "ppo_steps", "ppo_lr", "grpo_steps", "grpo_lr", "dpo_steps",
                                     "dpo_beta", "dpo_lr", "rft_samples"), non_negative=("ppo_kl",))
        config_check(self, all(op in skills.OPS for op in self.ops), f"ops = {self.ops}: choose from {skills.OPS}")
        config_check(self, self.demonstrator in skills.DEMONSTRATORS,
                     f"demonstrator = {self.demonstrator!r}: choose from {tuple(skills.DEMONSTRATORS)}")
        config_check(self, 0 <= self.flaw_rate <= 1 and 0 <= self.p_correct <= 1 and 0 <= self.web_fraction < 1,
                     "flaw_rate and p_correct must be in [0, 1], web_fraction in [0, 1)")
        config_check(self, all(t >= 0 for t in self.temperatures) and self.temperatures,
                     f"temperatures = {self.temperatures}: at least one, each >= 0")

    def scaled(self) -> "RuleWorldConfig":
        """The config itself, or its --quick sizes."""
        if not self.quick:
            return self
        return dataclasses.replace(self, corpus_docs=2000, pretrain_steps=30, batch_size=16, demos=32, sft_steps=6,
                                   temperatures=(0.0, 1.0), eval_prompts=16, eval_samples=2, rm_prompts=32,
                                   rm_eval_prompts=16, pair_samples=3, rm_steps=4, rl_prompts=32, ppo_steps=2,
                                   grpo_steps=2, dpo_steps=2, rft_samples=2)

    def model_config(self) -> ModelConfig:
        """The main job's model (width 96, 3 layers, 4 heads, byte tokens); --quick: width 32, 1 layer."""
        if self.quick:
            return ModelConfig(vocab_size=TOK.vocab_size, d_model=32, num_layers=1, num_heads=2, mlp_dim=64,
                               max_seq_len=128)
        return ModelConfig(vocab_size=TOK.vocab_size, d_model=96, num_layers=3, num_heads=4, mlp_dim=384,
                           max_seq_len=128)


def log(msg: str) -> None:
    print(f"[rule-world] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------- data
def messages(task: skills.SkillTask, response: str | None = None) -> list[dict]:
    """The chat of a task: its prompt as the user, and `response` as the assistant when given."""
    out = [{"role": "user", "content": task.prompt}]
    return out if response is None else out + [{"role": "assistant", "content": response}]


def check_eval_offset(config) -> None:
    """An experiment config's `eval_offset` (its eval keys' seed is 1000 * seed + eval_offset) in 9..999, clear
    of the main job's draws and of the next seed's; else `checks.config_check`'s one-line error."""
    config_check(config, 9 <= config.eval_offset <= 999,
                 f"eval_offset = {config.eval_offset}: choose 9..999 (1..8 are the main job's draws, 1000 and more "
                 "the next seed's)")


def retry_trace(task: skills.SkillTask, first: str, *, feedback: str = RETRY_FEEDBACK) -> list[dict]:
    """A feedback demonstration: `first` as the first answer; when it is wrong, the user's `feedback` and the
    right answer (`envs.SkillRetryEnv`'s conversation with a demonstrator who corrects itself)."""
    out = messages(task, first)
    if first == task.answer:
        return out
    return out + [{"role": "user", "content": feedback}, {"role": "assistant", "content": task.answer}]


def retry_demonstrations(tasks, cfg: RuleWorldConfig, *, trace_fraction: float, seed: int) -> list[SFTRecord]:
    """SFT records of `tasks`: the world's demonstrator's answer (flawed at `cfg.flaw_rate`), followed on
    `trace_fraction` of them, when it is wrong, by the feedback and the right answer (`retry_trace`). One random
    stream draws each task's flaw and then its trace coin, so with the main job's seed the flaws fall on other
    tasks than in the main job's demonstrations (the same prompts and demonstrator)."""
    rng = np.random.default_rng(seed)
    out = []
    for t in tasks:
        first = skills.demonstrate(cfg.demonstrator, t, rng, cfg.flaw_rate)
        chat = retry_trace(t, first) if rng.random() < trace_fraction else messages(t, first)
        out.append(SFTRecord(messages=tuple(chat)))
    return out


def rule_corpus(ops, *, docs: int, web_fraction: float, p_correct: float, prompt_loss: bool, seed: int,
                config: skills.SkillConfig) -> list[Example]:
    """Pretraining documents: `web_fraction` of the main world's web corpus (loss on every token), the rest rule
    rows of each op on train keys answered by `skills.noisy_response` (loss on the answers, or on every token with
    `prompt_loss`)."""
    rng = np.random.default_rng(seed)
    n_web = int(web_fraction * docs)
    n_rule = (docs - n_web) // len(ops)

    out = [document_example(d) for d in world.web_corpus(n_web, seed)]
    for op in ops:
        for _ in range(n_rule):
            t = skills.make_skill(op, rng, "train", config)
            chat = {"messages": messages(t, skills.noisy_response(t, rng, p_correct))}
            if prompt_loss:
                out.append(document_example(chat))
            else:
                ids, mask = encode_chat(TOK, chat["messages"])
                out.append(Example(tuple(ids), tuple(mask), 0))
    return out


def prompt_batch(tasks) -> dict:
    """Left-padded prompts of `tasks` in one 64-token bucket."""
    return collate_prompts([encode_prompt(TOK, messages(t)) for t in tasks], buckets=(64,), pad_id=TOK.pad_id)


def prompt_batches(tasks, size: int, seed: int):
    """Endless prompt batches of `size` tasks drawn without replacement within a batch."""
    rng = np.random.default_rng(seed)
    while True:
        yield prompt_batch([tasks[i] for i in rng.choice(len(tasks), size, replace=False)])


def prompt_key(task: skills.SkillTask) -> str:
    """A task's prompt as the RL stages decode it (a host reward finds its task by it)."""
    return decode_ids(TOK, encode_prompt(TOK, messages(task)))


def answers(params, tasks, mc: ModelConfig, *, max_new_tokens: int, temperature: float, rng) -> list[str]:
    """One response to each task (temperature 0: greedy)."""
    batch = prompt_batch(tasks)
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, eos_id=TOK.eos_id,
                              pad_id=TOK.pad_id)
    return sample_texts(params, batch["prompts"], batch["prompt_mask"], rng, model_config=mc, sampling=sampling,
                        tokenizer=TOK, chunk=min(256, len(tasks)))


def scores(tasks, responses) -> tuple[np.ndarray, np.ndarray]:
    """(exact [N], partial [N]) gold scores."""
    s = [skills.gold_score(t, r) for t, r in zip(tasks, responses)]
    return np.array([x["exact"] for x in s]), np.array([x["partial"] for x in s])


def gold_pairs(params, tasks, mc, *, samples: int, temperature: float, max_new_tokens: int, rng
               ) -> tuple[list[PreferenceRecord], list[int]]:
    """`samples` responses per task; every two distinct ones with different gold scores (exact, then partial)
    make a pair, the higher one chosen. Returns (pairs, the index of each pair's task)."""
    drawn = [answers(params, tasks, mc, max_new_tokens=max_new_tokens, temperature=temperature,
                     rng=jax.random.fold_in(rng, i + 1)) for i in range(samples)]
    out, owner = [], []
    for j, t in enumerate(tasks):
        texts = list(dict.fromkeys(s[j] for s in drawn))
        keyed = [((g := skills.gold_score(t, r))["exact"], g["partial"], r) for r in texts]
        for a in range(len(keyed)):
            for b in range(a + 1, len(keyed)):
                (ea, pa, ra), (eb, pb, rb) = keyed[a], keyed[b]
                if (ea, pa) != (eb, pb):
                    chosen, rejected = (ra, rb) if (ea, pa) > (eb, pb) else (rb, ra)
                    out.append(PreferenceRecord(prompt=tuple(messages(t)), chosen=chosen, rejected=rejected))
                    owner.append(j)
    return out, owner


def pair_batch(records) -> dict:
    """Preference rows of `records` in one 96-token bucket (longer rows cut)."""
    pairs = [tuple(truncate(e, 97) for e in tokenize_preference(TOK, r)) for r in records]
    return collate_preference(pairs, buckets=(96,), pad_id=TOK.pad_id)


def pair_correct(reward_params, pairs, mc) -> np.ndarray:
    """[N] 1.0 where the reward model scores the chosen answer above the rejected one."""
    out = []
    for i in range(0, len(pairs), 256):
        c, r = pair_scores(reward_params, pair_batch(pairs[i:i + 256]), model_config=mc)
        out.append((np.asarray(c) > np.asarray(r)).astype(np.float64))
    return np.concatenate(out) if out else np.zeros(0)


def rm_scores(reward_params, tasks, responses, mc) -> np.ndarray:
    """The reward model's score of each (task, response)."""
    recs = [PreferenceRecord(prompt=tuple(messages(t)), chosen=r, rejected=r) for t, r in zip(tasks, responses)]
    out = []
    for i in range(0, len(recs), 256):
        c, _ = pair_scores(reward_params, pair_batch(recs[i:i + 256]), model_config=mc)
        out.append(np.asarray(c))
    return np.concatenate(out)


def kl_to(params, mc, ref_params, ref_mc, tasks, *, max_new_tokens: int, rng, samples: int = 1) -> float:
    """Mean over prompts and `samples` temperature-1 answers of `params` of log pi(y|x) - log pi_ref(y|x): a
    sampled estimate of KL(pi || pi_ref) per answer (nats). The first sample uses `rng`, the i-th fold_in(rng, i)."""
    b = prompt_batch(tasks)
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=1.0, eos_id=TOK.eos_id, pad_id=TOK.pad_id)
    out = []
    for i in range(samples):
        ep = sample_episodes_jit(params, b["prompts"], b["prompt_mask"],
                                 rng if i == 0 else jax.random.fold_in(rng, i), model_config=mc, sampling=sampling)
        out.append(np.asarray(SEQ_LOGPS(params, ep, model_config=mc))
                   - np.asarray(SEQ_LOGPS(ref_params, ep, model_config=ref_mc)))
    return float(np.mean(out))


def exact_verifier(tasks):
    """A host reward: exact match of the task found by its decoded prompt."""
    table = {prompt_key(t): t for t in tasks}
    return lambda prompts, completions: np.array(
        [skills.gold_score(table[p], c)["exact"] for p, c in zip(prompts, completions)], np.float32)


# ---------------------------------------------------------------------------------------------------- stages
def pretrain(docs, mc, *, steps: int, batch_size: int, seq_len: int, seed: int):
    """Next-token pretraining from scratch on packed `docs` (AdamW 1e-3 cosine, weight decay 0.1)."""
    pack = types.SimpleNamespace(seq_len=seq_len, batch_size=batch_size)
    key = jax.random.PRNGKey(seed)
    state = create_train_state(init_params(mc, key), cosine_optim(1e-3, steps, weight_decay=0.1),
                               jax.random.fold_in(key, 1), total_steps=steps)
    state, _ = stages.run_sft(state, packed_batches(docs, pack, seed), stages.SFTConfig(num_steps=steps,
                              log_every=steps), model_config=mc)
    return state.params


def sft(base_params, mc, demos, *, steps: int, batch_size: int, seq_len: int, seed: int):
    """SFT (packed rows, loss on the answers, AdamW 3e-4 cosine) on (task, response) pairs."""
    return sft_records(base_params, mc, [SFTRecord(messages=tuple(messages(t, r))) for t, r in demos], steps=steps,
                       batch_size=batch_size, seq_len=seq_len, seed=seed)


def sft_records(base_params, mc, records, *, steps: int, batch_size: int, seq_len: int, seed: int):
    """`sft` on `SFTRecord`s (multi-turn conversations: the loss on every assistant turn)."""
    batches = Batches(ShuffledIterator(records, seed=seed), TOK, kind="sft", batch_size=batch_size,
                      buckets=(seq_len,), pack=True)
    state = create_train_state(base_params, cosine_optim(3e-4, steps), jax.random.PRNGKey(seed + 1),
                               total_steps=steps)
    state, _ = stages.run_sft(state, batches, stages.SFTConfig(num_steps=steps, log_every=steps), model_config=mc)
    return state.params


def reward_model(sft_params, mc, pairs, *, steps: int, lr: float, seed: int):
    """Bradley-Terry (batch 32, AdamW `lr` cosine) from the SFT trunk plus a scalar head."""
    batches = Batches(ShuffledIterator(pairs, seed=seed), TOK, kind="preference", batch_size=32, buckets=(64,))
    state = create_train_state(with_score_head(sft_params, mc, jax.random.PRNGKey(seed + 9)), cosine_optim(lr, steps),
                               jax.random.PRNGKey(seed + 10), total_steps=steps)
    state, _ = stages.run_reward(state, batches, stages.RewardConfig(num_steps=steps, log_every=steps),
                                 model_config=mc)
    return state.params


def ppo(sft_params, mc, rl_tasks, *, steps: int, lr: float, kl: float, max_new_tokens: int, seed: int,
        reward_params=None, reward_fn=None, on_policy=None, minibatches: int = 4):
    """PPO from SFT (k1 KL in the reward, 32 prompts at temperature 1, 4 epochs x `minibatches` minibatches, value
    from the reward model) against `reward_params`, or a jittable `reward_fn` with the value from the policy.
    `on_policy(iteration, params)`, when given, sees the policy after every iteration (a curve's reads)."""
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=1.0, eos_id=TOK.eos_id, pad_id=TOK.pad_id)
    pcfg = PPOConfig(num_steps=steps, batch_size=32, num_minibatches=minibatches, kl_coef=kl, missing_eos_penalty=1.0,
                     sampling=sampling,
                     optim=OptimConfig(learning_rate=lr, eps=1e-5, max_grad_norm=1.0),
                     value_optim=OptimConfig(learning_rate=1e-4, eps=1e-5, max_grad_norm=1.0), log_every=steps,
                     value_init="reward" if reward_params is not None else "policy")
    state = init_ppo_state(sft_params, pcfg, model_config=mc, rng=jax.random.PRNGKey(seed + 15),
                           reward_params=reward_params)
    hooks = None
    if on_policy is not None:
        class Reads(StageHooks):
            def on_state(self, step, state):
                on_policy(step, state.policy.params)
        hooks = Reads()
    state, hist = stages.run_ppo(state, prompt_batches(rl_tasks, 32, seed + 16), pcfg, model_config=mc,
                                 ref_params=sft_params, reward_params=reward_params, reward_fn=reward_fn, hooks=hooks)
    return state.policy.params


def grpo(sft_params, mc, rl_tasks, *, steps: int, lr: float, max_new_tokens: int, seed: int):
    """GRPO from SFT with the exact-match verifier (16 prompts x 8 samples at temperature 1, DAPO loss, no KL)."""
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=1.0, eos_id=TOK.eos_id, pad_id=TOK.pad_id)
    gcfg = GRPOConfig(num_steps=steps, batch_size=16, num_generations=8, loss_type="dapo", sampling=sampling,
                      optim=OptimConfig(learning_rate=lr), log_every=steps)
    state = create_train_state(sft_params, gcfg.optim, jax.random.PRNGKey(seed + 12), total_steps=steps)
    state, _ = stages.run_grpo(state, prompt_batches(rl_tasks, 16, seed + 11), gcfg, model_config=mc,
                               host_reward_fn=exact_verifier(rl_tasks), tokenizer=TOK)
    return state.params


def dpo(sft_params, mc, pairs, *, steps: int, beta: float, lr: float, seed: int):
    """DPO from SFT (AdamW `lr` constant, batch 32), the SFT model as reference."""
    batches = Batches(ShuffledIterator(pairs, seed=seed + 13), TOK, kind="preference", batch_size=32, buckets=(64,))
    dcfg = stages.DPOConfig(num_steps=steps, log_every=steps, beta=beta, optim=OptimConfig(learning_rate=lr))
    state = create_train_state(sft_params, dcfg.optim, jax.random.PRNGKey(seed + 14), total_steps=steps)
    state, _ = stages.run_dpo(state, batches, dcfg, model_config=mc, ref_params=sft_params)
    return state.params


def rejection_sampling(sft_params, mc, rl_tasks, samples, *, reward_params=None, **sft_kw):
    """SFT from the SFT model on its own samples ([n][P] texts of `rl_tasks`): each distinct right one (the
    verifier), or each prompt's best-scored one (`reward_params`). Returns (params or None, kept demonstrations)."""
    if reward_params is None:
        demos = [(t, r) for j, t in enumerate(rl_tasks) for r in dict.fromkeys(s[j] for s in samples)
                 if skills.gold_score(t, r)["exact"] == 1.0]
    else:
        best = np.stack([rm_scores(reward_params, rl_tasks, s, mc) for s in samples], 1).argmax(1)
        demos = [(t, samples[int(best[j])][j]) for j, t in enumerate(rl_tasks)]
    return (sft(sft_params, mc, demos, **sft_kw) if demos else None), demos


# ---------------------------------------------------------------------------------------------------- one seed
@dataclasses.dataclass(frozen=True)
class SeedModels:
    """A seed's shared models of the main job's recipe (`seed_models`)."""

    model_config: ModelConfig
    base: object
    """The pretrained params."""
    sft: object
    """The deployed SFT params (flawed demonstrations)."""
    reward: object | None
    """The reward model's params (None when the seed's samples gave no pair)."""
    pairs: list[PreferenceRecord]
    """Its gold-labelled train-key pairs (also DPO's)."""
    seconds: dict[str, float]
    """Time of each stage trained here: pretrain, sft, reward_model (none when read back)."""


def draws(cfg: RuleWorldConfig) -> dict[str, list[skills.SkillTask]]:
    """A seed's task sets: demo, dev, eval (the eval split), rm_train, rm_eval, rl (the RL pool), train_eval."""
    sk, ops, base = skills.RULE_WORLD, list(cfg.ops), 1000 * cfg.seed
    draw = lambda n, k, split: skills.skill_set(ops, n, base + k, split, sk)  # noqa: E731
    return {"demo": draw(cfg.demos, 1, "train"), "dev": draw(cfg.eval_prompts, 2, "dev"),
            "eval": draw(cfg.eval_prompts, 3, cfg.eval_split), "rm_train": draw(cfg.rm_prompts, 5, "train"),
            "rm_eval": draw(cfg.rm_eval_prompts, 6, cfg.eval_split), "rl": draw(cfg.rl_prompts, 7, "train"),
            "train_eval": draw(cfg.eval_prompts, 8, "train")}


def sampling_key(cfg: RuleWorldConfig) -> jax.Array:
    """The seed's root key of every sampled evaluation and pair."""
    return jax.random.PRNGKey(7000 + cfg.seed)


MODEL_SETTINGS = ("seed", "quick", "ops", "demonstrator", "flaw_rate", "p_correct", "web_fraction", "corpus_docs",
                  "pretrain_steps", "batch_size", "seq_len", "demos", "sft_steps", "max_new_tokens", "rm_prompts",
                  "pair_samples", "pair_temperature", "rm_steps", "rm_lr")
"""The settings that decide `seed_models`' models (a cache with other values is trained again)."""


def seed_models(cfg: RuleWorldConfig, cache: str | None = None) -> SeedModels:
    """The pretrained, deployed-SFT and reward models of `cfg.seed` by the main job's recipe, and the reward
    model's pairs. With `cache`, the params are kept in CACHE/{base,sft,reward} beside settings.json and read
    back by a later call with the same `MODEL_SETTINGS` (the pairs are re-drawn: they are a function of the SFT
    params and the seed), so that every experiment on a seed shares one set of models."""
    cfg = cfg.scaled()
    settings = {k: getattr(cfg, k) for k in MODEL_SETTINGS}
    settings = json.loads(json.dumps(settings))
    mc, s, sets = cfg.model_config(), cfg.seed, draws(cfg)
    names = ("base", "sft", "reward")
    loaded = {}
    if cache is not None and os.path.exists(os.path.join(cache, "settings.json")):
        with open(os.path.join(cache, "settings.json")) as f:
            if json.load(f) == settings:
                loaded = {n: load_params(os.path.join(cache, n))[1] for n in names
                          if os.path.isdir(os.path.join(cache, n))}
                log(f"seed {s}: models read back from {cache} ({', '.join(loaded)})")
    seconds = {}

    def timed(name, fn, *a, **kw):
        if name in loaded:
            return loaded[name]
        t, stage = time.time(), {"base": "pretrain", "reward": "reward_model"}.get(name, name)
        out = fn(*a, **kw)
        seconds[stage] = round(time.time() - t, 1)
        log(f"{stage}: {seconds[stage]:.0f} s")
        return out

    docs = None if "base" in loaded else rule_corpus(
        list(cfg.ops), docs=cfg.corpus_docs, web_fraction=cfg.web_fraction, p_correct=cfg.p_correct,
        prompt_loss=False, seed=1000 * s, config=skills.RULE_WORLD)
    base = timed("base", pretrain, docs, mc, steps=cfg.pretrain_steps, batch_size=cfg.batch_size,
                 seq_len=cfg.seq_len, seed=1000 * s)
    demo_rng = np.random.default_rng(1000 * s + 4)
    demos = [(t, skills.demonstrate(cfg.demonstrator, t, demo_rng, cfg.flaw_rate)) for t in sets["demo"]]
    sft_params = timed("sft", sft, base, mc, demos, steps=cfg.sft_steps, batch_size=cfg.batch_size,
                       seq_len=cfg.seq_len, seed=1000 * s + 20)
    pairs, _ = gold_pairs(sft_params, sets["rm_train"], mc, samples=cfg.pair_samples,
                          temperature=cfg.pair_temperature, max_new_tokens=cfg.max_new_tokens,
                          rng=jax.random.fold_in(sampling_key(cfg), 101))
    reward = (timed("reward", reward_model, sft_params, mc, pairs, steps=cfg.rm_steps, lr=cfg.rm_lr, seed=1000 * s)
              if pairs else None)
    if cache is not None and seconds:
        if os.path.exists(os.path.join(cache, "settings.json")):     # a crash while saving leaves no stale label
            os.remove(os.path.join(cache, "settings.json"))
        for name, params in zip(names, (base, sft_params, reward)):
            if params is not None and name not in loaded:
                save_params(os.path.join(cache, name), params, model_config=mc)
        with open(os.path.join(cache, "settings.json"), "w") as f:
            json.dump(settings, f, indent=1)
    return SeedModels(model_config=mc, base=base, sft=sft_params, reward=reward, pairs=pairs, seconds=seconds)


def run_rule_world(cfg: RuleWorldConfig, command: str, provenance_fn=None) -> dict:
    """One seed: every stage, read on `cfg.eval_split` keys; writes and returns OUT/report.json's content."""
    cfg = cfg.scaled()
    os.makedirs(cfg.out, exist_ok=True)
    mc, s, sets = cfg.model_config(), cfg.seed, draws(cfg)
    base = 1000 * s
    demo_tasks, dev, evals, rm_eval = sets["demo"], sets["dev"], sets["eval"], sets["rm_eval"]
    rl_tasks, train_eval = sets["rl"], sets["train_eval"]
    flawed = np.array([skills.demonstrate(cfg.demonstrator, t) != t.answer for t in evals])
    rng = sampling_key(cfg)
    sft_kw = dict(steps=cfg.sft_steps, batch_size=cfg.batch_size, seq_len=cfg.seq_len, seed=base + 20)
    gen = dict(max_new_tokens=cfg.max_new_tokens)
    timings, table, t0 = {}, {}, time.time()
    prov = provenance_fn(command, [s]) if provenance_fn is not None else None     # the commit the seed starts on

    def timed(name, fn, *a, **kw):
        t = time.time()
        out = fn(*a, **kw)
        timings[name] = round(time.time() - t, 1)
        log(f"{name}: {timings[name]:.0f} s")
        return out

    def sampled(params, tasks, temperature, salt):
        """Per-prompt exact match: greedy, or the mean over eval_samples samples."""
        if temperature == 0:
            return scores(tasks, answers(params, tasks, mc, temperature=0.0, rng=rng, **gen))[0]
        return np.mean([scores(tasks, answers(params, tasks, mc, temperature=temperature,
                                              rng=jax.random.fold_in(rng, salt + i), **gen))[0]
                        for i in range(cfg.eval_samples)], axis=0)

    def read(name, params, temperature=0.0):
        g = sampled(params, evals, temperature, 100)
        row = {"exact": g.tolist(), "mean": float(g.mean()), "flaw_keys": float(g[flawed].mean()) if flawed.any()
               else float("nan"), "other_keys": float(g[~flawed].mean()) if (~flawed).any() else float("nan"),
               "temperature": temperature}
        if name not in ("sft_t07", "sft_best_t"):
            row["train_keys"] = float(sampled(params, train_eval, 0.0, 0).mean())
            row["t07"] = float(sampled(params, evals, 0.7, 200).mean())
        table[name] = row
        log(f"{name}: {cfg.eval_split} {row['mean']:.3f} (flaw keys {row['flaw_keys']:.3f})"
            + (f", train keys {row['train_keys']:.3f}" if "train_keys" in row else ""))

    models = seed_models(cfg, os.path.join(cfg.out, "models"))
    base_params, sft_params, rm_params, pairs = models.base, models.sft, models.reward, models.pairs
    timings.update(models.seconds)
    read("sft", sft_params)
    read("sft_t07", sft_params, 0.7)
    sweep = {str(t): float(sampled(sft_params, dev, t, 300).mean()) for t in cfg.temperatures}
    best_t = float(max(cfg.temperatures, key=lambda t: sweep[str(t)]))
    read("sft_best_t", sft_params, best_t)
    table["sft_best_t"]["sweep_dev"] = sweep
    read("oracle_sft", timed("oracle_sft", sft, base_params, mc, [(t, t.answer) for t in demo_tasks], **sft_kw))

    pair_kw = dict(samples=cfg.pair_samples, temperature=cfg.pair_temperature, **gen)
    eval_pairs, _ = gold_pairs(sft_params, rm_eval, mc, rng=jax.random.fold_in(rng, 102), **pair_kw)
    rm = {"train_pairs": len(pairs), "eval_pairs": len(eval_pairs)}
    if rm_params is not None:
        rm["eval_correct"] = pair_correct(rm_params, eval_pairs, mc).tolist()
        rm["accuracy"] = float(np.mean(rm["eval_correct"])) if eval_pairs else float("nan")
        rm["train_accuracy"] = float(pair_correct(rm_params, pairs, mc).mean())
        log(f"reward model: {cfg.eval_split}-key pairs {rm['accuracy']:.3f} ({len(eval_pairs)}), train pairs "
            f"{rm['train_accuracy']:.3f} ({len(pairs)})")
        read("ppo", timed("ppo", ppo, sft_params, mc, rl_tasks, steps=cfg.ppo_steps, lr=cfg.ppo_lr, kl=cfg.ppo_kl,
                          seed=base, reward_params=rm_params, **gen))
        read("dpo", timed("dpo", dpo, sft_params, mc, pairs, steps=cfg.dpo_steps, beta=cfg.dpo_beta, lr=cfg.dpo_lr,
                          seed=base))
    grpo_params = timed("grpo", grpo, sft_params, mc, rl_tasks, steps=cfg.grpo_steps, lr=cfg.grpo_lr, seed=base,
                        **gen)
    read("grpo", grpo_params)
    save_params(os.path.join(cfg.out, "grpo"), grpo_params, model_config=mc)      # a post-trained teacher
    samples = [answers(sft_params, rl_tasks, mc, temperature=1.0, rng=jax.random.fold_in(rng, 300 + i), **gen)
               for i in range(cfg.rft_samples)]
    for name, rp in (("rft_verifier", None), ("rft_rm", rm_params)):
        if name == "rft_rm" and rp is None:
            continue
        params, kept = timed(name, rejection_sampling, sft_params, mc, rl_tasks, samples, reward_params=rp, **sft_kw)
        if params is not None:
            read(name, params)
            table[name].update(kept=len(kept), kept_right=float(np.mean([skills.gold_score(t, r)["exact"]
                                                                         for t, r in kept])))
    if cfg.controls:
        read("ppo_zero_reward", timed("ppo_zero_reward", ppo, sft_params, mc, rl_tasks, steps=cfg.ppo_steps,
                                      lr=cfg.ppo_lr, kl=cfg.ppo_kl, seed=base, reward_fn=zero_reward, **gen))
        if pairs:
            read("dpo_beta0", timed("dpo_beta0", dpo, sft_params, mc, pairs, steps=cfg.dpo_steps, beta=1e-3,
                                    lr=cfg.dpo_lr, seed=base))
    report = {"settings": dataclasses.asdict(cfg), "eval_split": cfg.eval_split, "seed": s,
              "flaw_share": float(flawed.mean()), "stages": table, "reward_model": rm, "timings": timings,
              "wall_s": round(time.time() - t0, 1)}
    if prov is not None:
        report["provenance"] = prov
    with open(os.path.join(cfg.out, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    return report


# ---------------------------------------------------------------------------------------------------- seeds
def per_seed_results(out: str, settings: dict, seeds, run_seed, *, ignore=("seeds",)) -> list[dict]:
    """`run_seed(seed)` for each seed into OUT/seed<N>.json beside `settings`; a seed whose file holds the same
    settings (but for the `ignore` fields) is read back, not run again (an experiment over seeds resumes). Two
    processes must not share OUT or a seed-model cache: nothing here locks."""
    os.makedirs(out, exist_ok=True)
    settings = json.loads(json.dumps(settings))
    same = lambda d: {k: v for k, v in d.items() if k not in ignore}  # noqa: E731
    results = []
    for s in seeds:
        path = os.path.join(out, f"seed{s}.json")
        if os.path.exists(path):
            with open(path) as f:
                done = json.load(f)
            if same(done["settings"]) == same(settings):
                log(f"seed {s}: read back from {path}")
                results.append(done["result"])
                continue
        results.append(json.loads(json.dumps(run_seed(s))))      # as a read-back seed will be
        jax.clear_caches()    # kept over seeds, compiled programs exhausted the CPU backend's memory maps
        with open(path + ".tmp", "w") as f:
            json.dump({"settings": settings, "result": results[-1]}, f)
        os.replace(path + ".tmp", path)                              # a crash mid-write leaves no torn file
    return results


def run_experiment(name: str, cfg, argv, one_seed, summarize, markdown, card, *,
                   ignore=("seeds", "out", "models")) -> dict:
    """An experiment script's main over `cfg.seeds` (its config has `seeds` and `out`): each seed by
    `one_seed(cfg, seed)` through `per_seed_results`, then OUT/NAME.json (eval split, seeds, settings, per seed,
    `summarize(per_seed)`, provenance of `python -m experiments.NAME ARGV`), OUT/NAME.md (`markdown(result)`, also
    printed) and OUT/card.json (`card(result)`). Returns the result."""
    command = f"python -m experiments.{name} " + shlex.join(sys.argv[1:] if argv is None else argv)
    settings = dataclasses.asdict(cfg)
    per_seed = per_seed_results(cfg.out, settings, cfg.seeds, lambda s: one_seed(cfg, s), ignore=ignore)
    result = {"eval_split": cfg.eval_split, "seeds": list(cfg.seeds), "settings": settings, "per_seed": per_seed,
              "summary": summarize(per_seed), "provenance": provenance(command, cfg.seeds)}
    text = markdown(result)
    for path, content in ((f"{name}.json", json.dumps(result, indent=1)), (f"{name}.md", text + "\n"),
                          ("card.json", json.dumps(card(result), indent=1))):
        with open(os.path.join(cfg.out, path), "w") as f:
            f.write(content)
    print(text)
    return result


def seed_summary(reports: list[dict], *, num_samples: int = 2000) -> dict:
    """The design's primary comparisons over `reports` (one per seed, the same eval split), each a mean paired
    difference with its seeds-and-prompts interval; each stage's difference from SFT at its best temperature and
    its share of the SFT-to-oracle gap (exploratory); the reward model's accuracy against `RM_THRESHOLD`."""
    stages_run = [s for s in STAGES if all(s in r["stages"] for r in reports)]
    per = {s: [np.asarray(r["stages"][s]["exact"]) for r in reports] for s in stages_run}
    clip = dict(num_samples=num_samples, bounds=(-1.0, 1.0))
    out = {"seeds": [r["seed"] for r in reports], "eval_split": reports[0]["eval_split"],
           "means": {s: float(np.mean([r["stages"][s]["mean"] for r in reports])) for s in stages_run},
           "flaw_keys": {s: float(np.mean([r["stages"][s]["flaw_keys"] for r in reports])) for s in stages_run},
           "train_keys": {s: float(np.mean([r["stages"][s]["train_keys"] for r in reports]))
                          for s in stages_run if all("train_keys" in r["stages"][s] for r in reports)},
           "primary": {}, "vs_sft_best_t": {}, "gap_closed": {}}
    for stage, baseline in PRIMARY:
        if stage in per and baseline in per:
            out["primary"][f"{stage} - {baseline}"] = seed_prompt_bootstrap(per[stage], per[baseline], **clip)
    if "sft_best_t" in per and "oracle_sft" in per:
        gap = seed_prompt_replicates(per["oracle_sft"], per["sft_best_t"], num_samples=num_samples)
        gap_delta = float(np.mean([(o - b).mean() for o, b in zip(per["oracle_sft"], per["sft_best_t"])]))
        for s in stages_run:
            if s in ("sft_best_t",):
                continue
            out["vs_sft_best_t"][s] = seed_prompt_bootstrap(per[s], per["sft_best_t"], **clip)
            if s != "oracle_sft" and gap_delta > 0:
                reps = seed_prompt_replicates(per[s], per["sft_best_t"], num_samples=num_samples) / np.where(
                    gap == 0, np.nan, gap)
                out["gap_closed"][s] = {"share": out["vs_sft_best_t"][s]["delta"] / gap_delta,
                                        "low": float(np.nanquantile(reps, 0.025)),
                                        "high": float(np.nanquantile(reps, 0.975))}
    correct = [np.asarray(r["reward_model"].get("eval_correct", [])) for r in reports]
    if all(c.size for c in correct):
        acc = seed_prompt_bootstrap(correct, [np.full(c.size, RM_THRESHOLD) for c in correct], **clip)
        out["reward_model"] = {"accuracy": acc["delta"] + RM_THRESHOLD, "low": acc["low"] + RM_THRESHOLD,
                               "high": acc["high"] + RM_THRESHOLD, "pairs": [int(c.size) for c in correct]}
    return out


def summary_markdown(summary: dict, reports: list[dict]) -> str:
    """The seeds' table and the primary comparisons, as markdown."""
    num = lambda x: "" if x is None else f"{x:.3f}"  # noqa: E731
    fmt = lambda ci: f"{ci['delta']:+.3f} [{ci['low']:+.3f}, {ci['high']:+.3f}]"  # noqa: E731
    split, n = summary["eval_split"], len(summary["seeds"])
    lines = [f"# The rule world: {n} seed(s) {summary['seeds']}, {split} keys", "",
             f"Greedy exact match on {split} keys (mean over seeds); flaw keys: those the demonstrator truncates; "
             "train keys: the RL stages' pool (learning in distribution). Intervals: 95%, seeds and prompts "
             "resampled together (`stats.seed_prompt_bootstrap`).", "",
             "| stage | greedy | flaw keys | train keys | vs SFT at best T | share of the SFT-to-oracle gap |",
             "|---|---|---|---|---|---|"]
    for s, m in summary["means"].items():
        vs = summary["vs_sft_best_t"].get(s)
        gap = summary["gap_closed"].get(s)
        lines.append(f"| {s} | {m:.3f} | {summary['flaw_keys'][s]:.3f} | "
                     f"{num(summary['train_keys'].get(s))} | {fmt(vs) if vs else ''} | "
                     + (f"{gap['share']:.2f} [{gap['low']:.2f}, {gap['high']:.2f}]" if gap else "") + " |")
    lines += ["", "Primary comparisons (named before the test keys were read):", ""]
    lines += [f"- {k}: {fmt(v)}" + (" (holds: the interval excludes 0)" if v["low"] > 0 or v["high"] < 0 else
                                   " (does not hold: the interval includes 0)")
              for k, v in summary["primary"].items()]
    if "reward_model" in summary:
        r = summary["reward_model"]
        lines.append(f"- reward model accuracy on {split}-key pairs: {r['accuracy']:.3f} [{r['low']:.3f}, "
                     f"{r['high']:.3f}] against {RM_THRESHOLD} (pairs per seed {r['pairs']})")
    temps = [r["stages"]["sft_best_t"]["temperature"] for r in reports]
    lines += ["", f"SFT's best dev temperature per seed: {temps}; wall per seed: "
              f"{[round(r['wall_s'] / 60, 1) for r in reports]} min."]
    return "\n".join(lines)


def rule_world_card(summary: dict, reports: list[dict]) -> dict:
    """A result card's JSON (`recipes.cards` layout) of the seeds' summary: the primary comparisons, every stage
    against SFT at its best temperature with its share of the gap, and one row per seed. The reading of the
    result is the card's "summary" prose, added by whoever reads it."""
    ci = lambda c: {"value": c["delta"], "ci": [c["low"], c["high"]], "signed": True}  # noqa: E731
    split, seeds = summary["eval_split"], summary["seeds"]
    primary = [[k, ci(v), v["low"] > 0 or v["high"] < 0] for k, v in summary["primary"].items()]
    if "reward_model" in summary:
        r = summary["reward_model"]
        primary.append([f"reward model accuracy on {split}-key pairs (threshold {RM_THRESHOLD})",
                        {"value": r["accuracy"], "ci": [r["low"], r["high"]]}, r["low"] > RM_THRESHOLD])
    stages_rows = []
    for s, m in summary["means"].items():
        vs, gap = summary["vs_sft_best_t"].get(s), summary["gap_closed"].get(s)
        stages_rows.append([s, m, summary["flaw_keys"][s], summary["train_keys"].get(s), ci(vs) if vs else None,
                            {"value": gap["share"], "ci": [gap["low"], gap["high"]], "digits": 2} if gap else None])
    shown = [s for s in ("sft", "sft_best_t", "oracle_sft", "ppo", "grpo", "dpo", "rft_verifier", "rft_rm",
                         "ppo_zero_reward", "dpo_beta0") if s in summary["means"]]
    per_seed = [[r["seed"], r["stages"]["sft_best_t"]["temperature"],
                 *[r["stages"][s]["mean"] if s in r["stages"] else None for s in shown],
                 r["reward_model"].get("accuracy"), r["wall_s"] / 60] for r in reports]
    n_prompts = len(reports[0]["stages"]["sft"]["exact"])
    return {
        "title": f"The rule world: post-training against SFT on {split} keys, {len(seeds)} seed(s)",
        "provenance": summary["provenance"],
        "summary": [f"`rlhf-jax rule-world` (docs/world.md, \"Design and hypotheses\"): reversal of random 3-6 "
                    f"letter strings, SFT on a demonstrator that truncates answers longer than 4 letters 85% of "
                    f"the time, then each stage from that SFT model; every stage is read greedily on {n_prompts} "
                    f"{split} keys drawn per seed, never seen in pretraining or post-training. Intervals: 95%, "
                    f"seeds and prompts resampled together (`stats.seed_prompt_bootstrap`), clipped to [-1, 1]."],
        "sections": [
            {"title": "Primary comparisons (named before the test keys were read)",
             "tables": [{"columns": ["comparison", "estimate [95%]", "holds"], "rows": primary,
                         "formats": [None, "+.3f", None]}]},
            {"title": "Every stage (exploratory beyond the primary rows)",
             "text": ["Greedy exact match, mean over seeds; flaw keys: the keys the demonstrator truncates; train "
                      "keys: the RL stages' prompt pool (learning in distribution); gap share: (stage - SFT at its "
                      "best dev temperature) / (oracle SFT - SFT at its best dev temperature)."],
             "tables": [{"columns": ["stage", "greedy", "flaw keys", "train keys", "vs SFT at best T",
                                     "share of the gap"], "rows": stages_rows,
                         "formats": [None, ".3f", ".3f", ".3f", "+.3f", ".2f"]}]},
            {"title": "Per seed",
             "tables": [{"columns": ["seed", "SFT's best dev T", *shown, "RM accuracy", "minutes"],
                         "rows": per_seed, "formats": [None, ".1f", *[".3f"] * len(shown), ".3f", ".1f"]}]}],
        "summary_data": {k: summary[k] for k in ("means", "flaw_keys", "train_keys", "primary", "vs_sft_best_t",
                                                 "gap_closed")},
    }
