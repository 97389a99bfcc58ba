"""The main job: the whole post-training pipeline on the gold-reward instruction world, end to end on a CPU.

    pretrain (web corpus) -> SFT (demonstrations) -> reward model (annotated pairs of SFT samples) -> PPO
                                                 \\-> DPO (the same pairs)

The world (`rlhf_jax.tasks`) knows the true reward of every answer, so each stage is judged by the gold reward
rather than by its own proxy. Simplifications against InstructGPT, chosen to fit ~13 minutes on 2 CPU cores:
a byte-level transformer of ~0.4M parameters, ~100-token conversations, one reward model for both the labels'
noise and PPO. The table scores 4 samples per held-out prompt at PPO's rollout temperature (the policy PPO
optimises), the greedy answer on the side, and temperature-1 samples for the KL column.

    python -m experiments.pipeline --out runs/demo            # the default, ~13 minutes on 2 cores
    python -m experiments.pipeline --out runs/quick --quick   # the same code path in under 2 minutes
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import tyro

from rlhf_jax import tasks as world
from rlhf_jax.data import Batches, PreferenceRecord, SFTRecord, ShuffledIterator, collate_prompts, pack_sft
from rlhf_jax.data.batching import Example
from rlhf_jax.generation import sample
from rlhf_jax.models import ModelConfig, init_params
from rlhf_jax.tokenizer import ByteTokenizer, encode_chat, encode_prompt
from rlhf_jax.train import stages
from rlhf_jax.train.logging import make_stage_hooks
from rlhf_jax.train.optim import OptimConfig
from rlhf_jax.train.ppo import response_logits, sequence_positions
from rlhf_jax.train.report import plot_curves, plot_xy, write_report
from rlhf_jax.train.state import create_train_state, with_score_head
from rlhf_jax.train.steps import reward_scores
from rlhf_jax.losses import token_logprobs


@dataclasses.dataclass(frozen=True, kw_only=True)
class PipelineConfig:
    """The embedded default: ~13 minutes on 2 CPU cores, 2-3 of them spent evaluating."""

    out: str = "runs/pipeline"
    """Run directory: report.json, report.md, plots, per-stage metrics (JSONL, TensorBoard)."""
    seed: int = 0
    """One seed for the world, the initialisations, the sampling and the annotators."""
    quick: bool = False
    """Same code path, every count cut down (CI: under 2 minutes). Numbers from it are not meaningful."""
    d_model: int = 96
    """Model width D (the byte-level model: vocab 259)."""
    num_layers: int = 3
    """Transformer blocks L."""
    num_heads: int = 4
    """Attention heads N."""
    seq_len: int = 96
    """Packed row length T for pretraining and SFT; every conversation of the world fits in it."""
    batch_size: int = 32
    """Rows per pretraining / SFT / preference batch."""
    pretrain_docs: int = 30_000
    """Documents in the noisy web corpus (answers right only part of the time)."""
    pretrain_steps: int = 600
    """Next-token steps on the web corpus (packed rows)."""
    sft_demos: int = 3000
    """Concise, correct skill demonstrations."""
    sft_safety: int = 300
    """Refusals of unsafe requests among the demonstrations."""
    sft_benign: int = 300
    """Answered benign look-alikes ("kill a python process") among the demonstrations."""
    sft_steps: int = 200
    """SFT steps."""
    pref_prompts: int = 3072
    """Prompts whose SFT samples are labelled by the annotators (10% held out to score the reward model)."""
    pref_samples: int = 4
    """Temperature-1 SFT samples per preference prompt: 2 gives one Bradley-Terry choice per prompt; K > 2 has the
    annotator rank all K (Plackett-Luce), turned into pairs by `pref_pairs`."""
    pref_pairs: Literal["best-worst", "all"] = "best-worst"
    """Pairs from a K > 2 ranking: "best-worst" = its top against its bottom answer, one decisive pair per prompt;
    "all" = every pair of the ranking, as InstructGPT's reward model trains on (close pairs included, so a lower
    held-out accuracy)."""
    synthetic_pairs: int = 1536
    """Off-policy pairs of edited reference answers added to the SFT-sample pairs."""
    lookalike_pairs: int = 512
    """Off-policy pairs on benign look-alike prompts, their reference answer against a refusal (labelled by the same
    annotators; HH-RLHF likewise collects helpfulness comparisons beside harmlessness ones). The SFT samples hold
    ~3x more refusal-vs-compliance pairs on harmful requests than answer-vs-refusal pairs on look-alikes, and
    without these the reward model preferred refusing a third of the look-alikes it was trained on."""
    annotator: str = "careful"
    """Annotator population (see rlhf_jax.tasks.ANNOTATORS)."""
    rm_steps: int = 400
    """Reward-model steps."""
    rm_lr: float = 3e-4
    """Reward-model learning rate (peak of a warmup-cosine schedule)."""
    ppo_iterations: int = 40
    """PPO iterations (rollout + 4 epochs x 4 minibatches)."""
    ppo_batch: int = 64
    """Prompts per PPO rollout."""
    ppo_kl_coef: float = 0.2
    """Initial KL penalty coefficient beta."""
    ppo_lr: float = 1.5e-5
    """PPO policy learning rate (the value model uses 1e-4)."""
    ppo_ptx_coef: float = 1.0
    """PPO-ptx (InstructGPT eq. 2): weight of the SFT demonstrations' NLL mixed into the policy loss, 16 packed rows
    per iteration. InstructGPT mixes pretraining data; the web corpus here is wrong half of the time, so the
    demonstrations stand in. Without it PPO's noisy updates erode memorised skills ("capital of france", sorting a
    trained word), even against the gold reward itself; 0 turns it off."""
    dpo_steps: int = 150
    """DPO steps over the preference pairs."""
    dpo_beta: float = 0.1
    """DPO beta."""
    dpo_lr: float = 3e-5
    """DPO learning rate (peak of a warmup-cosine schedule)."""
    dpo_pairs: Literal["on-policy", "all"] = "on-policy"
    """DPO's pairs: "on-policy" = the annotated SFT-sample pairs of the training prompts (DPO's setting: pairs
    from the policy it starts from); "all" = the reward model's training pairs, the off-policy ones included."""
    dpo_rpo_alpha: float = 1.0
    """Weight of the chosen answers' per-token NLL in the DPO loss (RPO; 0 = plain DPO). Plain DPO unlearns
    refusals in this world (likelihood displacement: the chosen refusals lose probability with the rejected
    answers), as Razin et al. 2024 report for real models."""
    max_new_tokens: int = 28
    """Response budget in bytes; every reference answer fits with its EOS."""
    eval_prompts: int = 512
    """Held-out prompts (unseen keys) scored for the table."""
    temperature: float = 0.7
    """Sampling temperature of PPO's rollouts, of the table's answers and of the best-of-n check: `gold_reward` is
    then the gold version of the objective PPO maximises, E_{y ~ pi}[r(x, y)] (the greedy answer's is
    `gold_greedy`)."""
    eval_samples: int = 4
    """Answers sampled per held-out prompt for the table (their mean is each prompt's gold reward)."""
    best_of_n: int = 4
    """Samples per held-out prompt for the reward model's best-of-n check (its pick against random and gold picks)."""
    eval_every: int = 10
    """PPO iterations between gold/proxy/KL evaluations for the reward-vs-KL plot."""

    def scaled(self) -> "PipelineConfig":
        if not self.quick:
            return self
        return dataclasses.replace(self, d_model=64, num_layers=2, pretrain_docs=4000, pretrain_steps=60,
                                   sft_demos=400, sft_safety=40, sft_benign=40, sft_steps=30, pref_prompts=256,
                                   synthetic_pairs=256, lookalike_pairs=64, rm_steps=30, ppo_iterations=4, ppo_batch=32,
                                   dpo_steps=20, eval_prompts=64, eval_every=2, batch_size=16)


TOK = ByteTokenizer()
PROMPT_WIDTH = 64  # bytes: BOS + headers + the longest prompt (40) fit


# ---------------------------------------------------------------------------------------------------- data
def _packed_batches(examples: list[Example], cfg: PipelineConfig, seed: int):
    """Endless packed SFT-style batches [batch_size, seq_len] from a shuffled stream of examples."""
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(len(examples))
        rows, row, col = [], [], 0
        for i in order:
            ex = examples[i]
            n = len(ex.ids) - 1
            if col + n > cfg.seq_len:
                rows.append(row)
                row, col = [], 0
                if len(rows) == cfg.batch_size:
                    yield pack_sft(rows, seq_len=cfg.seq_len, pad_id=TOK.pad_id)
                    rows = []
            row.append(ex)
            col += n


def _pretrain_examples(docs) -> list[Example]:
    """Web documents with the loss on every token: pretraining sees prompts and answers alike."""
    out = []
    for d in docs:
        ids, _ = encode_chat(TOK, d["messages"])
        out.append(Example(tuple(ids), (1,) * len(ids), 0))
    return out


def _prompt_batch(task_list):
    prompts = [encode_prompt(TOK, world.messages_for(t)) for t in task_list]
    return collate_prompts(prompts, buckets=(PROMPT_WIDTH,), pad_id=TOK.pad_id)


def _decode(tokens, response_mask) -> list[str]:
    return [TOK.decode([int(t) for t, m in zip(row, mask) if m and t != TOK.eos_id])
            for row, mask in zip(np.asarray(tokens), np.asarray(response_mask))]


_SAMPLE = jax.jit(sample, static_argnames=("config", "max_new_tokens", "temperature", "eos_id", "pad_id"))


def sample_texts(params, task_list, rng, *, model_config, max_new_tokens, temperature, chunk) -> list[str]:
    """Responses to `task_list`, sampled `chunk` prompts at a time (one fixed shape: one compiled program)."""
    texts = []
    for i in range(0, len(task_list), chunk):
        part = task_list[i:i + chunk]
        batch = _prompt_batch(part + [part[-1]] * (chunk - len(part)))
        s = _SAMPLE(params, batch["prompts"], batch["prompt_mask"], jax.random.fold_in(rng, i), config=model_config,
                    max_new_tokens=max_new_tokens, temperature=temperature, eos_id=TOK.eos_id, pad_id=TOK.pad_id)
        texts += _decode(s.tokens[:, -max_new_tokens:], s.response_mask)[:len(part)]
    return texts


# ----------------------------------------------------------------------------------------------- evaluation
class Evaluator:
    """Sampled and greedy answers to held-out prompts -> gold metrics; temperature-1 samples -> KL to the SFT policy."""

    def __init__(self, tasks, model_config: ModelConfig, max_new_tokens: int, *, temperature: float = 0.7,
                 samples: int = 4):
        self.tasks, self.mc, self.n = tasks, model_config, max_new_tokens
        self.temperature, self.samples = temperature, samples
        self.batch = _prompt_batch(tasks)
        self._seq_logps = jax.jit(self._seq_logps_fn)
        self._score = jax.jit(lambda p, b: reward_scores(p, b, model_config=model_config))

    def _seq_logps_fn(self, params, tokens, mask):
        logits = response_logits(params, tokens, mask, model_config=self.mc, num_new=self.n, temperature=1.0)
        lp = token_logprobs(logits, tokens[:, -self.n:])
        return jnp.sum(jnp.where(mask[:, -self.n:] > 0, lp, 0.0), axis=1)

    def generate(self, params, rng, temperature: float):
        return _SAMPLE(params, self.batch["prompts"], self.batch["prompt_mask"], rng, config=self.mc,
                       max_new_tokens=self.n, temperature=temperature, eos_id=TOK.eos_id, pad_id=TOK.pad_id)

    def _texts(self, s) -> list[str]:
        return _decode(s.tokens[:, -self.n:], s.response_mask)

    def _rm_scores(self, reward_params, s) -> jax.Array:
        """Reward-model score of each sampled (left-padded prompt, response) row -> [B]."""
        mask = jnp.concatenate([self.batch["prompt_mask"], s.response_mask], axis=1)
        return self._score(reward_params, {"inputs": s.tokens, "positions": sequence_positions(mask),
                                           "segment_ids": mask})

    def __call__(self, params, *, sft_params, reward_params, rng, sft_gold=None) -> tuple[dict, np.ndarray]:
        """Metrics of the policy as PPO optimises it: `samples` answers per prompt at `temperature` (gold reward,
        reward-model score, length, refusals), its greedy answer (`gold_greedy`), and the KL to the SFT policy
        on temperature-1 samples. Returns (metrics, per-prompt mean gold reward [B]). Every stage is evaluated
        with the same `rng`, so the stages' samples share their random numbers."""
        draws = [self.generate(params, jax.random.fold_in(rng, 2 + i), self.temperature) for i in range(self.samples)]
        texts = [self._texts(s) for s in draws]
        metrics = world.compute_metrics(self.tasks * self.samples, [r for t in texts for r in t])
        gold = np.mean([world.gold_rewards(self.tasks, t) for t in texts], axis=0)
        greedy = world.gold_rewards(self.tasks, self._texts(self.generate(params, rng, 0.0)))
        scores = (float(np.mean([np.asarray(self._rm_scores(reward_params, s)) for s in draws]))
                  if reward_params is not None else float("nan"))
        samples = self.generate(params, jax.random.fold_in(rng, 1), 1.0)
        mask = jnp.concatenate([self.batch["prompt_mask"], samples.response_mask], axis=1)
        kl = self._seq_logps(params, samples.tokens, mask) - self._seq_logps(sft_params, samples.tokens, mask)
        out = {"gold_reward": float(np.mean(gold)), "gold_greedy": float(np.mean(greedy)), "rm_score": scores,
               "kl_to_sft": float(jnp.mean(kl)),
               "mean_length": metrics["mean_length"], "refusal_rate": metrics["refusal_rate"],
               "over_refusal_rate": metrics["over_refusal_rate"],
               "win_rate_vs_sft": world.win_rate(gold, sft_gold) if sft_gold is not None else 0.5}
        out.update({k: v for k, v in metrics.items() if k.startswith("gold/")})  # per-family diagnostics
        return out, gold

    def best_of_n(self, params, reward_params, rng, *, n: int, temperature: float) -> dict:
        """How well the reward model ranks the policy's own samples: gold reward of n samples per prompt, taken at
        random (the mean), picked by the reward model, and picked by the gold reward itself (the ceiling). A reward
        model worth optimising picks better than random; PPO can at best climb towards its best-of-n pick."""
        golds, scores = [], []
        for i in range(n):
            s = self.generate(params, jax.random.fold_in(rng, i), temperature)
            golds.append(world.gold_rewards(self.tasks, self._texts(s)))
            scores.append(np.asarray(self._rm_scores(reward_params, s)))
        golds, scores = np.stack(golds), np.stack(scores)
        picked = golds[np.argmax(scores, axis=0), np.arange(golds.shape[1])]
        return {"n": n, "temperature": temperature, "gold_random": float(golds.mean()),
                "gold_rm_pick": float(picked.mean()), "gold_oracle_pick": float(golds.max(axis=0).mean())}


class PPOEvalHook:
    """Every `every` PPO iterations: gold reward, reward-model score and KL of the current policy (the plot)."""

    def __init__(self, evaluate, every, **kwargs):
        self.evaluate, self.every, self.kwargs, self.points = evaluate, every, kwargs, []
        self.last = None  # (iteration, (metrics, per-prompt gold)) of the latest evaluation

    def on_step(self, step, metrics):
        pass

    def should_stop(self):
        return False

    def on_state(self, step, state):
        if step % self.every == 0:
            m, gold = self.evaluate(state.policy.params, **self.kwargs)
            self.points.append({"iteration": step, **m})
            self.last = (step, (m, gold))


# ------------------------------------------------------------------------------------------------- pipeline
def _optim(lr, steps, warmup_frac=0.05, **kw) -> OptimConfig:
    return OptimConfig(learning_rate=lr, schedule="cosine", warmup_steps=max(1, int(warmup_frac * steps)), **kw)


def run(cfg: PipelineConfig) -> dict:
    cfg = cfg.scaled()
    t0 = time.time()
    os.makedirs(cfg.out, exist_ok=True)
    mc = ModelConfig(vocab_size=TOK.vocab_size, d_model=cfg.d_model, num_layers=cfg.num_layers,
                     num_heads=cfg.num_heads, mlp_dim=4 * cfg.d_model, max_seq_len=128)
    rng = jax.random.PRNGKey(cfg.seed)
    k_init, k_sft, k_rm, k_ppo, k_eval, k_pref, k_dpo = jax.random.split(rng, 7)
    timings = {}

    def hooks(stage, steps, log_every=10):
        return make_stage_hooks(cfg.out, stage, total_steps=steps, log_every=1,
                                tokens_per_step=cfg.batch_size * cfg.seq_len)

    # World data.
    docs = world.web_corpus(cfg.pretrain_docs, cfg.seed)
    demos = world.sft_demos(cfg.sft_demos, cfg.seed + 1, n_safety=cfg.sft_safety, n_benign=cfg.sft_benign)
    eval_tasks = world.prompt_set(cfg.eval_prompts, cfg.seed + 2, split="eval")
    evaluate = Evaluator(eval_tasks, mc, cfg.max_new_tokens, temperature=cfg.temperature,
                         samples=cfg.eval_samples)

    # 1. Pretraining on the web corpus.
    t = time.time()
    state = create_train_state(init_params(mc, k_init), _optim(1e-3, cfg.pretrain_steps, weight_decay=0.01),
                               jax.random.fold_in(k_init, 1), total_steps=cfg.pretrain_steps)
    state, _ = stages.run_sft(state, _packed_batches(_pretrain_examples(docs), cfg, cfg.seed),
                              stages.SFTConfig(num_steps=cfg.pretrain_steps, log_every=10, optim=OptimConfig()),
                              model_config=mc, hooks=hooks("pretrain", cfg.pretrain_steps))
    base_params = state.params
    _done(timings, "pretrain", t)

    # 2. SFT on concise, correct demonstrations (loss on the answers only).
    t = time.time()
    sft_records = [SFTRecord(messages=tuple(d["messages"])) for d in demos]
    sft_batches = Batches(ShuffledIterator(sft_records, seed=cfg.seed), TOK, kind="sft",
                          batch_size=cfg.batch_size, buckets=(cfg.seq_len,), pack=True)
    state = create_train_state(base_params, _optim(3e-4, cfg.sft_steps), k_sft, total_steps=cfg.sft_steps)
    state, _ = stages.run_sft(state, sft_batches, stages.SFTConfig(num_steps=cfg.sft_steps, log_every=10),
                              model_config=mc, hooks=hooks("sft", cfg.sft_steps))
    sft_params = state.params
    _done(timings, "sft", t)

    # 3. Preference pairs: temperature-1 SFT samples, compared (K = 2) or ranked (K > 2) by simulated annotators.
    t = time.time()
    pref_tasks = world.prompt_set(cfg.pref_prompts, cfg.seed + 3, split="train")
    samples = [sample_texts(sft_params, pref_tasks, jax.random.fold_in(k_pref, i), model_config=mc,
                            max_new_tokens=cfg.max_new_tokens, temperature=1.0, chunk=cfg.eval_prompts)
               for i in range(cfg.pref_samples)]
    label_rng = np.random.default_rng(cfg.seed)
    if cfg.pref_samples == 2:
        pairs = world.label_pairs(pref_tasks, samples[0], samples[1], cfg.annotator, label_rng)
    else:
        pairs = world.label_rankings(pref_tasks, [list(r) for r in zip(*samples)], cfg.annotator, label_rng,
                                     pairs=cfg.pref_pairs)
    # Off-policy pairs (edited reference answers: typos, wrong, truncated, verbose, refusals), labelled by the
    # same annotators, widen the comparisons beyond what the SFT policy samples (as HH-RLHF mixes sources).
    off_tasks = world.prompt_set(cfg.synthetic_pairs, cfg.seed + 5, split="train")
    off_pairs = world.synthetic_pairs(off_tasks, cfg.annotator, label_rng)
    on_policy = pairs
    pairs, train_pairs, test_pairs = split_pairs(pairs, off_pairs, len(pref_tasks), len(off_tasks), label_rng)
    # Look-alike prompts answered vs refused: training pairs only (the held-out set stays the SFT samples' and
    # edits' comparisons).
    lookalikes = world.prompt_set(cfg.lookalike_pairs, cfg.seed + 6, split="train", mix={"benign": 1.0})
    lookalike_pairs = world.synthetic_pairs(lookalikes, cfg.annotator, label_rng, kinds=("correct", "refusal"))
    pairs += lookalike_pairs
    train_pairs += [_record(p) for p in lookalike_pairs]
    pref_batches = lambda recs, seed, epochs=None: Batches(  # noqa: E731
        ShuffledIterator(recs, seed=seed, num_epochs=epochs), TOK, kind="preference",
        batch_size=cfg.batch_size, buckets=(cfg.seq_len,))
    _done(timings, "preferences", t)

    # 4. Reward model: the SFT trunk plus a scalar head, Bradley-Terry on the annotated pairs.
    t = time.time()
    rm_state = create_train_state(with_score_head(sft_params, mc, k_rm), _optim(cfg.rm_lr, cfg.rm_steps), k_rm,
                                  total_steps=cfg.rm_steps)
    rm_state, _ = stages.run_reward(rm_state, pref_batches(train_pairs, cfg.seed),
                                    stages.RewardConfig(num_steps=cfg.rm_steps, log_every=10), model_config=mc,
                                    hooks=hooks("reward", cfg.rm_steps))
    reward_params = rm_state.params
    rm_report = {"accuracy": _pairwise_accuracy(reward_params, pref_batches(test_pairs, 0, epochs=1), mc),
                 "train_pairs": len(train_pairs), "test_pairs": len(test_pairs),
                 "label_gold_agreement": world.gold_agreement(pairs),
                 "best_of_n": evaluate.best_of_n(sft_params, reward_params, jax.random.fold_in(k_eval, 7),
                                                 n=cfg.best_of_n, temperature=cfg.temperature)}
    _done(timings, "reward", t)

    # Table rows for base and SFT.
    t = time.time()
    table = {}
    sft_metrics, sft_gold = evaluate(sft_params, sft_params=sft_params, reward_params=reward_params, rng=k_eval)
    base_metrics, base_gold = evaluate(base_params, sft_params=sft_params, reward_params=reward_params,
                                       rng=k_eval, sft_gold=sft_gold)
    table["base"], table["sft"] = base_metrics, sft_metrics
    _done(timings, "eval", t)
    eval_kwargs = dict(sft_params=sft_params, reward_params=reward_params, rng=k_eval, sft_gold=sft_gold)

    # 5. PPO from the SFT policy against the reward model, KL-penalised towards the SFT policy.
    t = time.time()
    ppo_cfg = stages.PPOConfig(num_steps=cfg.ppo_iterations, batch_size=cfg.ppo_batch,
                               max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                               kl_coef=cfg.ppo_kl_coef,
                               eos_id=TOK.eos_id, pad_id=TOK.pad_id, missing_eos_penalty=1.0,
                               ptx_coef=cfg.ppo_ptx_coef,
                               optim=OptimConfig(learning_rate=cfg.ppo_lr, eps=1e-5, max_grad_norm=1.0),
                               value_optim=OptimConfig(learning_rate=1e-4, eps=1e-5, max_grad_norm=1.0))
    ppo_state = stages.init_ppo_state(sft_params, ppo_cfg, model_config=mc, rng=k_ppo, reward_params=reward_params)
    rl_tasks = world.prompt_set(cfg.ppo_batch * 64, cfg.seed + 4, split="train")
    prompt_batches = (_prompt_batch([rl_tasks[j % len(rl_tasks)] for j in range(i * cfg.ppo_batch,
                                                                              (i + 1) * cfg.ppo_batch)])
                      for i in range(cfg.ppo_iterations))
    curve = PPOEvalHook(evaluate, cfg.eval_every, **eval_kwargs)
    curve.points.append({"iteration": 0, **sft_metrics})
    ppo_hooks = hooks("ppo", cfg.ppo_iterations)
    ppo_hooks.hooks.append(curve)
    ptx_batches = (Batches(ShuffledIterator(sft_records, seed=cfg.seed + 7), TOK, kind="sft", batch_size=16,
                           buckets=(cfg.seq_len,), pack=True)  # PPO-ptx: the demonstrations, 16 packed rows
                   if cfg.ppo_ptx_coef > 0 else None)
    ppo_state, _ = stages.run_ppo(ppo_state, prompt_batches, ppo_cfg, model_config=mc, ref_params=sft_params,
                                  reward_params=reward_params, hooks=ppo_hooks,
                                  ptx_data=ptx_batches)
    # The final policy's row; when the curve just evaluated it (same prompts, same rng), that evaluation is reused.
    done = curve.last is not None and curve.last[0] == cfg.ppo_iterations
    table["ppo"], ppo_gold = curve.last[1] if done else evaluate(ppo_state.policy.params, **eval_kwargs)
    _done(timings, "ppo", t)

    # 6. DPO from the SFT policy on the same pairs (no reward model, no rollouts).
    t = time.time()
    dpo_train = train_pairs if cfg.dpo_pairs == "all" else on_policy_records(on_policy, len(pref_tasks))
    dpo_state = create_train_state(sft_params, _optim(cfg.dpo_lr, cfg.dpo_steps), k_dpo, total_steps=cfg.dpo_steps)
    dpo_state, _ = stages.run_dpo(dpo_state, pref_batches(dpo_train, cfg.seed + 1),
                                  stages.DPOConfig(num_steps=cfg.dpo_steps, beta=cfg.dpo_beta, log_every=10,
                                                   rpo_alpha=cfg.dpo_rpo_alpha),
                                  model_config=mc, ref_params=sft_params, hooks=hooks("dpo", cfg.dpo_steps))
    table["dpo"], dpo_gold = evaluate(dpo_state.params, **eval_kwargs)
    _done(timings, "dpo", t)

    vs_sft = {stage: world.paired_bootstrap(gold, sft_gold, seed=cfg.seed)
              for stage, gold in (("base", base_gold), ("ppo", ppo_gold), ("dpo", dpo_gold))}
    return _report(cfg, table, rm_report, vs_sft, curve.points, timings, time.time() - t0)


def _done(timings: dict, stage: str, t: float) -> None:
    timings[stage] = time.time() - t
    print(f"[pipeline] {stage:<12} done in {timings[stage]:6.1f} s", flush=True)


def split_pairs(on_policy: list[dict], off_policy: list[dict], n_prompts: int, n_off_prompts: int,
                rng: np.random.Generator) -> tuple[list[dict], list[PreferenceRecord], list[PreferenceRecord]]:
    """(all pairs shuffled, train records, test records): the pairs of the first 10% of each prompt set are held
    out to score the reward model. Prompt sets are i.i.d., so that is a random 10%; holding out whole prompts
    (by each pair's "group") keeps every pair of a held-out ranking out of training."""
    is_test = [_held_out(p, n_prompts) for p in on_policy] + [_held_out(p, n_off_prompts) for p in off_policy]
    pairs = on_policy + off_policy
    order = rng.permutation(len(pairs))
    pairs, is_test = [pairs[i] for i in order], [is_test[i] for i in order]
    records = [_record(p) for p in pairs]
    return (pairs, [r for r, test in zip(records, is_test) if not test],
            [r for r, test in zip(records, is_test) if test])


def on_policy_records(on_policy: list[dict], n_prompts: int) -> list[PreferenceRecord]:
    """The annotated SFT-sample pairs of the training prompts (not among the reward model's held-out 10%, see
    `split_pairs`), in prompt order."""
    return [_record(p) for p in on_policy if not _held_out(p, n_prompts)]


def _held_out(pair: dict, n_prompts: int) -> bool:
    """Whether a pair's prompt (its "group", an index into a prompt set of n_prompts) is among the first 10%."""
    return pair["group"] < n_prompts // 10


def _record(pair: dict) -> PreferenceRecord:
    """A labelled pair dict (`rlhf_jax.tasks.label_pairs`) as a single-turn PreferenceRecord."""
    return PreferenceRecord(prompt=({"role": "user", "content": pair["prompt"]},), chosen=pair["chosen"],
                            rejected=pair["rejected"])


def _pairwise_accuracy(reward_params, batches, mc) -> float:
    score = jax.jit(lambda p, b: reward_scores(p, b, model_config=mc))
    wins, total = 0.0, 0
    for batch in batches:
        real = batch["chosen"]["segment_ids"].max(axis=1) > 0
        rc = np.asarray(score(reward_params, batch["chosen"]))  # the whole sequences, final EOS included
        rr = np.asarray(score(reward_params, batch["rejected"]))
        wins += float(np.sum((rc > rr)[real]))
        total += int(real.sum())
    return wins / max(total, 1)


def plot_ppo_curve(points: list[dict], out_png: str) -> str:
    """Gold reward and reward-model score against KL to SFT during PPO (Gao et al. 2022's plot), each as its change
    from the SFT policy's value (the first point): the two live on different scales."""
    kl = [p["kl_to_sft"] for p in points]
    gain = lambda key: [p[key] - points[0][key] for p in points]  # noqa: E731
    return plot_xy(kl, {"gold reward": gain("gold_reward"), "reward-model score": gain("rm_score")},
                   "KL(policy || SFT) per response (nats)", "change from SFT", out_png,
                   title="PPO: gold and proxy reward vs KL")


def _report(cfg, table, rm_report, vs_sft, ppo_points, timings, seconds) -> dict:
    plots = [plot_ppo_curve(ppo_points, os.path.join(cfg.out, "ppo_reward_vs_kl.png"))]
    dpo_log = os.path.join(cfg.out, "dpo", "metrics.jsonl")
    if os.path.exists(dpo_log):
        plots.append(plot_curves({"dpo": dpo_log}, ["rewards/margins", "rewards/accuracies"],
                                 os.path.join(cfg.out, "dpo_margins.png"), title="DPO implicit rewards"))
    report = {stage: {**{k: m[k] for k in ("gold_reward", "kl_to_sft", "mean_length", "refusal_rate",
                                            "over_refusal_rate", "win_rate_vs_sft", "rm_score", "gold_greedy")},
                      "gold_by_family": {k[len("gold/"):]: m[k] for k in m if k.startswith("gold/")}}
              for stage, m in table.items()}
    for stage, ci in vs_sft.items():  # paired over the same held-out prompts, 95% bootstrap interval
        report[stage]["gold_vs_sft"] = ci
    report["reward_model"] = rm_report
    report["ppo_curve"] = ppo_points
    report["config"] = dataclasses.asdict(cfg)
    report["seconds"] = {"total": seconds, **timings}
    with open(os.path.join(cfg.out, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    rows = [{"stage": s, **{k: round(v, 3) for k, v in table[s].items()}} for s in table]
    bon = rm_report["best_of_n"]
    write_report(cfg.out, {"reward_model.accuracy": round(rm_report["accuracy"], 3),
                           f"best-of-{bon['n']} gold (random / reward-model pick / gold pick)":
                           f"{bon['gold_random']:.3f} / {bon['gold_rm_pick']:.3f} / {bon['gold_oracle_pick']:.3f}",
                           "seconds": round(seconds, 1)},
                 {"stages": rows}, title="rlhf_jax pipeline on the gold-reward world", images=plots)
    with open(os.path.join(cfg.out, "report.json"), "w") as f:  # write_report wrote its own; ours is the contract
        json.dump(report, f, indent=2)
    _print_table(rows, rm_report, vs_sft, seconds)
    return report


def _print_table(rows, rm_report, vs_sft, seconds):
    cols = ["stage", "gold_reward", "gold_greedy", "rm_score", "kl_to_sft", "mean_length", "refusal_rate",
            "over_refusal_rate", "win_rate_vs_sft"]
    print("\n" + "  ".join(f"{c:>17}" for c in cols))
    for r in rows:
        print("  ".join(f"{r[c]:>17}" if isinstance(r[c], str) else f"{r[c]:>17.3f}" for c in cols))
    print("\ngold reward minus SFT's on the same prompts (95% paired bootstrap interval): " + ", ".join(
        f"{stage} {ci['delta']:+.3f} [{ci['low']:+.3f}, {ci['high']:+.3f}]" for stage, ci in vs_sft.items()))
    bon = rm_report["best_of_n"]
    print(f"reward model held-out accuracy: {rm_report['accuracy']:.3f}    best of {bon['n']} SFT samples, gold "
          f"reward: random {bon['gold_random']:.3f}, reward-model pick {bon['gold_rm_pick']:.3f}, gold pick "
          f"{bon['gold_oracle_pick']:.3f}    total time: {seconds:.0f} s")


def main():
    run(tyro.cli(PipelineConfig))


if __name__ == "__main__":
    main()
