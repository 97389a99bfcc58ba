"""The main job: the whole post-training pipeline on the gold-reward instruction world, end to end on a CPU.

    pretrain (web corpus) -> SFT (demonstrations) -> reward model (annotated pairs of SFT samples) -> PPO
                                                 \\-> DPO (the same pairs)
                                                 \\-> GRPO (the gold reward as a verifier)

The world (`rlhf_jax.tasks`) knows the true reward of every answer, so each stage is judged by the gold reward
rather than by its own proxy. Simplifications against InstructGPT, chosen to fit ~15 minutes on 2 CPU cores
(727 s alone in session 15, 823 s in session 14 with a smaller GRPO stage; 1,297 s on session 10's slower
machine): a byte-level transformer of ~0.4M parameters, ~100-token conversations, one reward model for both the
labels' noise and PPO. The table scores 8 samples per
distinct held-out prompt at PPO's rollout temperature (the policy PPO optimises), the greedy answer on the side,
and temperature-1 samples for the KL column.

    python -m experiments.pipeline --out runs/demo            # the default, 12-15 minutes on 2 cores
    python -m experiments.pipeline --out runs/quick --quick   # the same code path in about 2.5 minutes
    python -m experiments.pipeline --out runs/demo --resume   # after a SIGTERM: finished stages are reloaded

Every stage writes `DIR/<stage>/final` (params + model_config.json, for `load_params`, `--policy-init` and
the export) and its metrics under `DIR/<stage>/`; `--config FILE.json` sets any option, `--help` lists them.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import time
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from experiments.common import CheckpointSpec, run_stage
from rlhf_jax import tasks as world
from rlhf_jax.config_cli import check_ranges, config_check, parse_cli, save_config
from rlhf_jax.data import Batches, SFTRecord, ShuffledIterator, collate_prompts, pack_sft, unpair
from rlhf_jax.data.batching import Example
from rlhf_jax.data.iterators import Replayable, Together
from rlhf_jax.eval import PolicyEvaluator, pairwise_accuracy, paired_bootstrap, sample_texts
from rlhf_jax.generation import SamplingConfig
from rlhf_jax.models import ModelConfig, init_params
from rlhf_jax.rewards import annotator_judge, world_reward
from rlhf_jax.tokenizer import ByteTokenizer, encode_chat, encode_prompt
from rlhf_jax.train import checkpoint as ckpt
from rlhf_jax.train import stages
from rlhf_jax.train.logging import StageHooks
from rlhf_jax.train.optim import OptimConfig
from rlhf_jax.train.grpo import GRPOConfig
from rlhf_jax.train.online_dpo import OnlineDPOConfig
from rlhf_jax.train.ppo import PPOConfig, init_ppo_state
from rlhf_jax.train.report import plot_curves, plot_xy, write_report
from rlhf_jax.train.state import create_train_state, with_score_head


WORLD_OPTIONS = ("extra_words", "max_operand")
"""The PipelineConfig fields that are `WorldConfig` fields of the same name (`PipelineConfig.world`)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class PipelineConfig:
    """The embedded default: ~18 minutes on 2 CPU cores, 2-3 of them spent evaluating."""

    out: str = "runs/pipeline"
    """Run directory: report.json, report.md, plots, per-stage metrics (JSONL, TensorBoard)."""
    resume: bool = False
    """Continue a run in --out that a signal stopped: stages with a `final/` folder are loaded, not rerun."""
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
    grpo_iterations: int = 40
    """GRPO iterations from the SFT policy against the gold reward itself (the world's verifier: reinforcement
    learning with a verifiable reward, no reward model)."""
    grpo_prompts: int = 32
    """Prompts per GRPO iteration, each answered grpo_generations times (32 x 8 = 256 answers, one update: chosen
    on the dev keys in session 15, where 16 x 4 answers in 2 x 4 updates lowered the reward even on the training
    keys; docs/results/grpo_shape_dev_session15.md)."""
    grpo_generations: int = 8
    """GRPO group size G."""
    grpo_loss_type: Literal["grpo", "dapo", "dr_grpo", "gspo", "cispo"] = "grpo"
    """GRPO's loss aggregation (GRPOConfig.loss_type)."""
    grpo_advantage: Literal["grpo", "rloo", "reinforce++", "reinforce++-baseline"] = "grpo"
    """GRPO's advantage estimator (GRPOConfig.advantage)."""
    grpo_scale: Literal["group", "batch", "none"] = "group"
    """Advantage scaling (GRPOConfig.scale; "none" with loss dr_grpo is Dr. GRPO)."""
    grpo_kl_coef: float = 0.04
    """KL coefficient towards the SFT policy, k3 in the loss (DeepSeekMath's 0.04); 0 = no reference (DAPO)."""
    grpo_clip_eps_high: float | None = None
    """Upper clip width (DAPO's clip-higher: 0.28); None: symmetric 0.2."""
    grpo_lr: float = 3e-5
    """GRPO learning rate (constant after a short warmup)."""
    grpo_passes: int = 1
    """Passes over each iteration's answers (GRPOConfig.num_iterations, mu)."""
    grpo_minibatches: int = 1
    """Minibatches per pass: grpo_passes x grpo_minibatches updates per iteration."""
    preference_family: bool = False
    """Also run KTO, SimPO, ORPO and online DPO from the SFT policy after GRPO, each on the labels offline DPO
    gets (KTO: its pairs split into desirable / undesirable; online DPO: as many fresh annotator labels of its own
    samples), and report them beside DPO. Off by default: it adds several minutes to the main job."""
    controls: bool = False
    """Also run two controls after GRPO (issue 21): `ppo_zero_reward`, PPO with every setting of `ppo` but a
    reward of 0 (what PPO-ptx's continued SFT and the KL term do alone), and `dpo_beta0`, DPO with beta = 1e-3 and
    the same RPO term (what the NLL on chosen replies does alone). Off by default: it adds several minutes."""
    kto_beta: float = 0.1
    """KTO's beta (paper and TRL default)."""
    simpo_beta: float = 2.0
    """SimPO's beta (Meng et al. 2024 use 2.0-2.5)."""
    simpo_gamma: float = 1.0
    """SimPO's target margin (gamma / beta = 0.5, the paper's default ratio)."""
    orpo_lambda: float = 0.1
    """ORPO's odds-ratio weight (Hong et al. 2024)."""
    online_dpo_prompts: int = 32
    """Prompts per online-DPO iteration (one labelled pair each)."""
    online_dpo_generations: int = 4
    """Samples per prompt that the annotator ranks; online DPO trains on the best against the worst (offline DPO's
    pairs are likewise the best and worst of pref_samples = 4)."""
    max_new_tokens: int = 28
    """Response budget in bytes; every reference answer fits with its EOS."""
    eval_split: Literal["test", "dev"] = "test"
    """Which held-out keys the table scores: "test" (every distinct test prompt once, the reported numbers) or
    "dev" (for choosing recipes and hyper-parameters; the README's choices were made there)."""
    temperature: float = 0.7
    """Sampling temperature of PPO's rollouts, of the table's answers and of the best-of-n check: `gold_reward` is
    then the gold version of the objective PPO maximises, E_{y ~ pi}[r(x, y)] (the greedy answer's is
    `gold_greedy`)."""
    eval_samples: int = 8
    """Answers sampled per held-out prompt for the table (their mean is each prompt's gold reward)."""
    sft_temperatures: tuple[float, ...] = (0.0, 0.3, 0.5, 0.7, 1.0)
    """Temperatures at which SFT is scored on the dev keys; the best one gives the `sft_best_t` baseline (0:
    greedy). A stage has to beat it, not only SFT sampled at `temperature`."""
    rm_dev_prompts: int = 256
    """Dev-key prompts whose annotated SFT pairs score the reward model (prompts its training never saw)."""
    best_of_n: int = 4
    """Samples per held-out prompt for the reward model's best-of-n check (its pick against random and gold picks)."""
    eval_every: int = 10
    """PPO iterations between gold/proxy/KL evaluations for the reward-vs-KL plot."""
    extra_words: int = 0
    """The world's `WorldConfig.extra_words`: made-up words added to the 40 of the word families (0: the default
    world, every figure in the README unless it says otherwise)."""
    max_operand: int = 20
    """The world's `WorldConfig.max_operand` (`add` draws both operands from 0..max_operand)."""

    def __post_init__(self):
        check_ranges(self, positive=(
            "d_model", "num_layers", "num_heads", "seq_len", "batch_size", "pretrain_docs", "pretrain_steps",
            "sft_demos", "sft_steps", "pref_prompts", "rm_steps", "rm_lr", "ppo_iterations", "ppo_batch", "ppo_lr",
            "grpo_iterations", "grpo_prompts", "grpo_generations", "grpo_lr", "grpo_passes", "grpo_minibatches",
            "kto_beta", "simpo_beta", "orpo_lambda", "online_dpo_prompts",
            "dpo_steps", "dpo_beta", "dpo_lr", "max_new_tokens", "temperature", "eval_samples",
            "best_of_n", "eval_every", "rm_dev_prompts"),
            non_negative=("seed", *WORLD_OPTIONS, "sft_safety", "sft_benign", "synthetic_pairs", "lookalike_pairs",
                          "ppo_kl_coef", "grpo_kl_coef", "ppo_ptx_coef", "dpo_rpo_alpha", "simpo_gamma"))
        config_check(self, self.online_dpo_generations >= 2,
                     f"online_dpo_generations = {self.online_dpo_generations} must be >= 2 (a pair)")
        config_check(self, len(self.sft_temperatures) > 0 and min(self.sft_temperatures) >= 0,
                     f"sft_temperatures = {self.sft_temperatures} must be non-empty and >= 0")
        config_check(self, self.pref_samples >= 2,
                     f"pref_samples = {self.pref_samples} must be >= 2 (answers to compare)")

    def world(self) -> world.WorldConfig:
        """The task world of this run (its key tables; splits, gold reward and length penalty as the default)."""
        return world.WorldConfig(**{k: getattr(self, k) for k in WORLD_OPTIONS})

    def scaled(self) -> "PipelineConfig":
        if not self.quick:
            return self
        return dataclasses.replace(self, d_model=64, num_layers=2, pretrain_docs=4000, pretrain_steps=60,
                                   sft_demos=400, sft_safety=40, sft_benign=40, sft_steps=30, pref_prompts=256,
                                   synthetic_pairs=256, lookalike_pairs=64, rm_steps=30, ppo_iterations=4, ppo_batch=32,
                                   grpo_iterations=4, grpo_prompts=8, grpo_generations=4,
                                   dpo_steps=20, eval_samples=2, sft_temperatures=(0.0, 0.7), rm_dev_prompts=64,
                                   eval_every=2, batch_size=16)


TOK = ByteTokenizer()
PROMPT_WIDTH = 64  # bytes: BOS + headers + the longest prompt (40) fit
SAMPLE_CHUNK = 256  # prompts per sampling call when labelling preference prompts


class Stopped(Exception):
    """A signal stopped the named stage (its checkpoint is saved; `--resume` continues)."""


# ---------------------------------------------------------------------------------------------------- data
def _packed_batches(examples: list[Example], cfg: PipelineConfig, seed: int):
    """Endless packed SFT-style batches [batch_size, seq_len] of a shuffled stream of whole documents (the loss on
    every token: pretraining sees prompts and answers alike)."""
    rng = np.random.default_rng(seed)
    while True:   # epochs; each drops its last partial batch
        yield from pack_documents((examples[i] for i in rng.permutation(len(examples))), cfg)


def pack_documents(stream, cfg: PipelineConfig):
    """Packed batches [batch_size, seq_len] of a stream of whole `Example`s, in order: a row takes documents until
    the next would overflow it (each example keeps its own loss mask); a last partial batch is dropped."""
    rows, row, col = [], [], 0
    for example in stream:
        n = len(example.ids) - 1
        if col + n > cfg.seq_len:
            rows.append(row)
            row, col = [], 0
            if len(rows) == cfg.batch_size:
                yield pack_sft(rows, seq_len=cfg.seq_len, pad_id=TOK.pad_id)
                rows = []
        row.append(example)
        col += n


@dataclasses.dataclass(frozen=True)
class PreferenceData:
    """The main job's annotated comparisons (step 3): `tasks` (the on-policy prompts), `on_policy` (their labelled
    pairs), `pairs` (every pair, dicts), `train_pairs` / `test_pairs` (records; the test ones share keys with
    training, see `world.split_pairs`)."""
    tasks: list
    on_policy: list
    pairs: list
    train_pairs: list
    test_pairs: list


def preference_data(cfg: PipelineConfig, sft_params, mc: ModelConfig, sampling: SamplingConfig, k_pref
                    ) -> PreferenceData:
    """Temperature-1 SFT samples of `cfg.pref_prompts` train-key prompts, compared (K = 2) or ranked (K > 2) by the
    simulated annotators; off-policy pairs of edited reference answers and look-alike answer-vs-refusal pairs widen
    the comparisons (as HH-RLHF mixes sources). The first 10% of each prompt set is held out (`test_pairs`)."""
    return label_preferences(cfg, *preference_samples(cfg, sft_params, mc, sampling, k_pref))


def preference_samples(cfg: PipelineConfig, sft_params, mc: ModelConfig, sampling: SamplingConfig, k_pref
                       ) -> tuple[list, list[list[str]]]:
    """(the preference prompts' tasks, `cfg.pref_samples` lists of temperature-1 SFT answers to them): step 3's
    sampling, which every annotator population of an experiment can label in turn (`label_preferences`)."""
    pref_tasks = world.prompt_set(cfg.pref_prompts, cfg.seed + 3, split="train", config=cfg.world())
    pref_batch = _prompt_batch(pref_tasks)
    pref_sampling = dataclasses.replace(sampling, temperature=1.0)
    samples = [sample_texts(sft_params, pref_batch["prompts"], pref_batch["prompt_mask"],
                            jax.random.fold_in(k_pref, i), model_config=mc, sampling=pref_sampling, tokenizer=TOK,
                            chunk=SAMPLE_CHUNK) for i in range(cfg.pref_samples)]
    return pref_tasks, samples


def label_preferences(cfg: PipelineConfig, pref_tasks: list, samples: list[list[str]], annotator=None,
                      bonus: list[list[float]] | None = None) -> PreferenceData:
    """Step 3's labelling of `preference_samples` by `annotator` (default `cfg.annotator`): on-policy pairs, the
    off-policy edited-answer and look-alike pairs, and the held-out split. `bonus[k][i]` is added to the utility of
    the k-th answer to prompt i (a judge's self-preference; on-policy pairs only). Every population gets the same
    pairs of answers (and as many labels): only the choices differ."""
    annotator = cfg.annotator if annotator is None else annotator
    label_rng = np.random.default_rng(cfg.seed)
    if cfg.pref_samples == 2:
        on_policy = world.label_pairs(pref_tasks, samples[0], samples[1], annotator, label_rng,
                                      bonus=None if bonus is None else list(zip(bonus[0], bonus[1])))
    else:
        on_policy = world.label_rankings(pref_tasks, [list(r) for r in zip(*samples)], annotator, label_rng,
                                         pairs=cfg.pref_pairs,
                                         bonus=None if bonus is None else [list(b) for b in zip(*bonus)])
    off_tasks = world.prompt_set(cfg.synthetic_pairs, cfg.seed + 5, split="train", config=cfg.world())
    off_pairs = world.synthetic_pairs(off_tasks, annotator, label_rng)
    pairs, train_pairs, test_pairs = world.split_pairs(on_policy, off_pairs, len(pref_tasks), len(off_tasks),
                                                       label_rng)
    lookalikes = world.prompt_set(cfg.lookalike_pairs, cfg.seed + 6, split="train", mix={"benign": 1.0},
                                  config=cfg.world())
    lookalike_pairs = world.synthetic_pairs(lookalikes, annotator, label_rng, kinds=("correct", "refusal"))
    pairs += lookalike_pairs
    train_pairs += [world.pair_record(p) for p in lookalike_pairs]
    return PreferenceData(pref_tasks, on_policy, pairs, train_pairs, test_pairs)


def preference_batches(cfg: PipelineConfig, records, seed, epochs=None):
    """Preference batches [batch_size, seq_len] of `records`, shuffled by `seed` (`epochs` None: endless)."""
    return Batches(ShuffledIterator(records, seed=seed, num_epochs=epochs), TOK, kind="preference",
                   batch_size=cfg.batch_size, buckets=(cfg.seq_len,))


def ppo_config(cfg: PipelineConfig, sampling: SamplingConfig) -> PPOConfig:
    """Step 5's PPO settings."""
    return PPOConfig(num_steps=cfg.ppo_iterations, batch_size=cfg.ppo_batch, sampling=sampling,
                     kl_coef=cfg.ppo_kl_coef, missing_eos_penalty=1.0, ptx_coef=cfg.ppo_ptx_coef,
                     optim=OptimConfig(learning_rate=cfg.ppo_lr, eps=1e-5, max_grad_norm=1.0),
                     value_optim=OptimConfig(learning_rate=1e-4, eps=1e-5, max_grad_norm=1.0))


def grpo_config(cfg: PipelineConfig, sampling: SamplingConfig) -> GRPOConfig:
    """Step 7's GRPO settings."""
    return GRPOConfig(num_steps=cfg.grpo_iterations, batch_size=cfg.grpo_prompts,
                      num_generations=cfg.grpo_generations, sampling=sampling, advantage=cfg.grpo_advantage,
                      scale=cfg.grpo_scale, loss_type=cfg.grpo_loss_type, kl_coef=cfg.grpo_kl_coef,
                      clip_eps_high=cfg.grpo_clip_eps_high, num_iterations=cfg.grpo_passes,
                      num_minibatches=cfg.grpo_minibatches, log_every=5,
                      optim=OptimConfig(learning_rate=cfg.grpo_lr, warmup_steps=10, max_grad_norm=1.0))


def train_grpo(cfg: PipelineConfig, grpo_cfg: GRPOConfig, mc: ModelConfig, sft_params):
    """(params, history) of step 7 outside the main job's runner: GRPO from `sft_params` against the gold verifier
    on the main job's RL prompts with its key (the experiments' variants pass another `grpo_cfg`)."""
    state = create_train_state(sft_params, grpo_cfg.optim, jax.random.fold_in(jax.random.PRNGKey(cfg.seed), 8),
                               total_steps=cfg.grpo_iterations * grpo_cfg.updates_per_iteration)
    state, history = stages.run_grpo(state, rl_prompt_batches(cfg, grpo_cfg.batch_size, cfg.grpo_iterations),
                                     grpo_cfg, model_config=mc, host_reward_fn=gold_verifier(rl_prompts(cfg)),
                                     tokenizer=TOK, ref_params=sft_params if grpo_cfg.uses_reference else None)
    return state.params, history


def rl_prompts(cfg: PipelineConfig, mix: dict[str, float] | None = None) -> list:
    """The train-key prompts of PPO's and GRPO's rollouts (taken in order, cycling), families drawn from `mix`
    (default: the world's mix)."""
    return world.prompt_set(cfg.ppo_batch * 64, cfg.seed + 4, split="train", mix=mix, config=cfg.world())


def rl_prompt_batches(cfg: PipelineConfig, per_iteration: int, iterations: int) -> Replayable:
    """`iterations` prompt batches of `per_iteration` prompts from `rl_prompts`, replayable for --resume."""
    tasks = rl_prompts(cfg)
    return Replayable(lambda: (_prompt_batch([tasks[j % len(tasks)] for j in range(
        i * per_iteration, (i + 1) * per_iteration)]) for i in range(iterations)))


def gold_verifier(tasks: list):
    """The gold reward as a host reward function of (prompt text, completion text), for `tasks`' prompts."""
    return world_reward(tasks, lambda t: TOK.decode(encode_prompt(TOK, world.messages_for(t))))


def demonstration_records(cfg: PipelineConfig) -> list[SFTRecord]:
    """Step 2's demonstrations as records."""
    demos = world.sft_demos(cfg.sft_demos, cfg.seed + 1, n_safety=cfg.sft_safety, n_benign=cfg.sft_benign,
                            config=cfg.world())
    return [SFTRecord(messages=tuple(d["messages"])) for d in demos]


def ptx_batches_of(cfg: PipelineConfig, records: list[SFTRecord]):
    """PPO-ptx's stream of packed demonstration rows (16 per iteration), or None when `ppo_ptx_coef` is 0."""
    if cfg.ppo_ptx_coef <= 0:
        return None
    return Batches(ShuffledIterator(records, seed=cfg.seed + 7), TOK, kind="sft", batch_size=16,
                   buckets=(cfg.seq_len,), pack=True)


def _document(doc) -> Example:
    ids, _ = encode_chat(TOK, doc["messages"])
    return Example(tuple(ids), (1,) * len(ids), 0)


def _prompt_batch(task_list):
    return collate_prompts([encode_prompt(TOK, world.messages_for(t)) for t in task_list], buckets=(PROMPT_WIDTH,),
                           pad_id=TOK.pad_id)


def _optim(lr, steps, warmup_frac=0.05, **kw) -> OptimConfig:
    return OptimConfig(learning_rate=lr, schedule="cosine", warmup_steps=max(1, int(warmup_frac * steps)), **kw)


# ---------------------------------------------------------------------------------------------------- stages
class _Run:
    """The stages of one run directory, each through the scripts' runner (`experiments.common.run_stage`):
    JSONL/TensorBoard metrics, a checkpoint every 100 steps and on SIGTERM/SIGINT, and `final/` params at the
    end. With --resume a stage whose `final/` exists is loaded, and a stopped one continues from its checkpoint."""

    def __init__(self, cfg: PipelineConfig, mc: ModelConfig):
        self.cfg, self.mc, self.timings = cfg, mc, {}

    def stage(self, name, run, state, data, stage_config, params_of=lambda s: s.params, extra_hooks=()):
        """-> (final params, whether the stage ran in this process)."""
        final = os.path.join(self.cfg.out, name, "final")
        if self.cfg.resume and os.path.isdir(os.path.join(final, "params")):
            print(f"[pipeline] {name:<12} loaded from {final}", flush=True)
            return ckpt.load_params(final)[1], False
        t = time.time()
        state, _, finished = run_stage(name, run, state, data, stage_config, out=self.cfg.out,
                                       resume=self.cfg.resume, checkpoint=CheckpointSpec(save_every=100),
                                       tokens_per_step=self.cfg.batch_size * self.cfg.seq_len,
                                       extra_hooks=extra_hooks)
        if not finished:
            raise Stopped(name)
        params = params_of(state)
        ckpt.save_params(final, params, model_config=self.mc)
        self.timings[name] = time.time() - t
        print(f"[pipeline] {name:<12} done in {self.timings[name]:6.1f} s", flush=True)
        return params, True


class PPOCurve(StageHooks):
    """Every `every` PPO iterations: the evaluation of the current policy (gold, proxy, KL: the plot), appended to
    `path` (JSONL) so that a resumed run keeps the points evaluated before the stop."""

    def __init__(self, evaluate, every, path, **kwargs):
        self.evaluate, self.every, self.path, self.kwargs, self.last = evaluate, every, path, kwargs, None

    def on_state(self, step, state):
        if step % self.every == 0:
            m, gold = self.evaluate(state.policy.params, **self.kwargs)
            with open(self.path, "a") as f:
                f.write(json.dumps({"iteration": step, **m}) + "\n")
            self.last = (step, (m, gold))

    def points(self) -> list[dict]:
        """The evaluations by iteration (a later line wins: a resumed run may redo one)."""
        with open(self.path) as f:
            by_step = {p["iteration"]: p for p in map(json.loads, f)}
        return [by_step[k] for k in sorted(by_step)]


def run(cfg: PipelineConfig) -> dict:
    cfg = cfg.scaled()
    t0 = time.time()
    os.makedirs(cfg.out, exist_ok=True)
    save_config(cfg, os.path.join(cfg.out, "config.json"))
    mc = ModelConfig(vocab_size=TOK.vocab_size, d_model=cfg.d_model, num_layers=cfg.num_layers,
                     num_heads=cfg.num_heads, mlp_dim=4 * cfg.d_model, max_seq_len=128)
    k_init, k_sft, k_rm, k_ppo, k_eval, k_pref, k_dpo = jax.random.split(jax.random.PRNGKey(cfg.seed), 7)
    k_grpo = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), 8)   # a key of its own: the other stages' keys stay
    runs = _Run(cfg, mc)
    sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, eos_id=TOK.eos_id,
                              pad_id=TOK.pad_id)

    # World data: the web corpus, the demonstrations, the held-out evaluation prompts.
    docs = world.web_corpus(cfg.pretrain_docs, cfg.seed, config=cfg.world())
    evaluate, eval_tasks = _evaluator(cfg.eval_split, mc, sampling, cfg.eval_samples, cfg.world())
    # 1. Pretraining on the web corpus.
    state = create_train_state(init_params(mc, k_init), _optim(1e-3, cfg.pretrain_steps, weight_decay=0.01),
                               jax.random.fold_in(k_init, 1), total_steps=cfg.pretrain_steps)
    documents = [_document(d) for d in docs]
    base_params, _ = runs.stage("pretrain", functools.partial(stages.run_sft, model_config=mc), state,
                                Replayable(lambda: _packed_batches(documents, cfg, cfg.seed)),
                                stages.SFTConfig(num_steps=cfg.pretrain_steps, log_every=10, optim=OptimConfig()))

    # 2. SFT on concise, correct demonstrations (loss on the answers only).
    sft_records = demonstration_records(cfg)
    sft_batches = Batches(ShuffledIterator(sft_records, seed=cfg.seed), TOK, kind="sft",
                          batch_size=cfg.batch_size, buckets=(cfg.seq_len,), pack=True)
    state = create_train_state(base_params, _optim(3e-4, cfg.sft_steps), k_sft, total_steps=cfg.sft_steps)
    sft_params, _ = runs.stage("sft", functools.partial(stages.run_sft, model_config=mc), state, sft_batches,
                               stages.SFTConfig(num_steps=cfg.sft_steps, log_every=10))

    # 3. Preference pairs: SFT samples labelled by the simulated annotators, and off-policy pairs (preference_data).
    t = time.time()
    prefs = preference_data(cfg, sft_params, mc, sampling, k_pref)
    pref_tasks, on_policy, pairs, train_pairs, test_pairs = (prefs.tasks, prefs.on_policy, prefs.pairs,
                                                             prefs.train_pairs, prefs.test_pairs)
    pref_sampling = dataclasses.replace(sampling, temperature=1.0)
    pref_batches = functools.partial(preference_batches, cfg)
    runs.timings["preferences"] = time.time() - t

    # 4. Reward model: the SFT trunk plus a scalar head, Bradley-Terry on the annotated pairs.
    state = create_train_state(with_score_head(sft_params, mc, k_rm), _optim(cfg.rm_lr, cfg.rm_steps), k_rm,
                               total_steps=cfg.rm_steps)
    reward_params, _ = runs.stage("reward", functools.partial(stages.run_reward, model_config=mc), state,
                                  pref_batches(train_pairs, cfg.seed),
                                  stages.RewardConfig(num_steps=cfg.rm_steps, log_every=10))
    t = time.time()
    rm_report = {"accuracy": _rm_dev_accuracy(cfg, reward_params, sft_params, mc, pref_sampling, pref_batches,
                                              jax.random.fold_in(k_pref, 99)),
                 "accuracy_same_keys": pairwise_accuracy(reward_params, pref_batches(test_pairs, 0, epochs=1),
                                                         model_config=mc),
                 "train_pairs": len(train_pairs), "test_pairs": len(test_pairs),
                 "label_gold_agreement": world.gold_agreement(pairs),
                 "best_of_n": evaluate.best_of_n(sft_params, reward_params, jax.random.fold_in(k_eval, 7),
                                                 n=cfg.best_of_n, temperature=cfg.temperature)}
    table = {}
    table["sft"], sft_gold = evaluate(sft_params, ref_params=sft_params, reward_params=reward_params, rng=k_eval)
    eval_kwargs = dict(ref_params=sft_params, reward_params=reward_params, rng=k_eval, baseline_gold=sft_gold)
    table["base"], base_gold = evaluate(base_params, **eval_kwargs)
    best_t, dev_sweep = _best_sft_temperature(cfg, sft_params, mc, sampling, k_eval)
    rm_report["sft_temperature_sweep_dev"] = dev_sweep
    table["sft_best_t"], sft_best_gold = evaluate.with_temperature(best_t)(sft_params, **eval_kwargs)
    table["sft_best_t"]["temperature"] = best_t
    runs.timings["eval"] = time.time() - t

    # 5. PPO from the SFT policy against the reward model, KL-penalised towards the SFT policy, with PPO-ptx.
    ppo_cfg = ppo_config(cfg, sampling)
    rl_tasks = rl_prompts(cfg)
    prompt_batches = rl_prompt_batches(cfg, cfg.ppo_batch, cfg.ppo_iterations)
    ptx_stream = functools.partial(ptx_batches_of, cfg, sft_records)
    ptx_batches = ptx_stream()
    curve_file = os.path.join(cfg.out, "ppo", "curve.jsonl")
    if not cfg.resume and os.path.exists(curve_file):
        os.remove(curve_file)
    os.makedirs(os.path.dirname(curve_file), exist_ok=True)
    with open(curve_file, "a") as f:
        f.write(json.dumps({"iteration": 0, **table["sft"]}) + "\n")
    curve = PPOCurve(evaluate, cfg.eval_every, curve_file, **eval_kwargs)
    ppo_params, _ = runs.stage(
        "ppo", functools.partial(stages.run_ppo, model_config=mc, ref_params=sft_params, reward_params=reward_params,
                                 ptx_data=ptx_batches),
        init_ppo_state(sft_params, ppo_cfg, model_config=mc, rng=k_ppo, reward_params=reward_params),
        Together(prompt_batches, **({"ptx": ptx_batches} if ptx_batches is not None else {})), ppo_cfg,
        params_of=lambda s: s.policy.params, extra_hooks=[curve])
    # The final policy's row: the curve's evaluation of it when it just ran one (same prompts, same rng).
    done = curve.last is not None and curve.last[0] == cfg.ppo_iterations
    table["ppo"], ppo_gold = curve.last[1] if done else evaluate(ppo_params, **eval_kwargs)

    # 6. DPO from the SFT policy on the on-policy pairs (no reward model, no rollouts).
    dpo_train = train_pairs if cfg.dpo_pairs == "all" else world.on_policy_records(on_policy, len(pref_tasks))
    dpo_cfg = stages.DPOConfig(num_steps=cfg.dpo_steps, beta=cfg.dpo_beta, log_every=10, rpo_alpha=cfg.dpo_rpo_alpha)
    state = create_train_state(sft_params, _optim(cfg.dpo_lr, cfg.dpo_steps), k_dpo, total_steps=cfg.dpo_steps)
    dpo_params, _ = runs.stage("dpo", functools.partial(stages.run_dpo, model_config=mc, ref_params=sft_params),
                               state, pref_batches(dpo_train, cfg.seed + 1), dpo_cfg)
    table["dpo"], dpo_gold = evaluate(dpo_params, **eval_kwargs)

    # 7. GRPO from the SFT policy against the gold reward (a verifier on the host: no reward model, no value model).
    grpo_cfg = grpo_config(cfg, sampling)
    grpo_prompts = rl_prompt_batches(cfg, cfg.grpo_prompts, cfg.grpo_iterations)
    gold_fn = gold_verifier(rl_tasks)
    state = create_train_state(sft_params, grpo_cfg.optim, k_grpo,
                               total_steps=cfg.grpo_iterations * grpo_cfg.updates_per_iteration)
    grpo_params, _ = runs.stage(
        "grpo", functools.partial(stages.run_grpo, model_config=mc, host_reward_fn=gold_fn, tokenizer=TOK,
                                  ref_params=sft_params if grpo_cfg.uses_reference else None),
        state, grpo_prompts, grpo_cfg)
    table["grpo"], grpo_gold = evaluate(grpo_params, **eval_kwargs)

    golds = {"base": base_gold, "ppo": ppo_gold, "dpo": dpo_gold, "grpo": grpo_gold}
    if cfg.controls:
        # PPO with a zero reward: only the KL penalty towards SFT and PPO-ptx's NLL on the demonstrations act.
        ptx = ptx_stream()  # PPO's start, prompts and demonstrations (fresh streams), with a reward of 0
        control_params, _ = runs.stage(
            "ppo_zero_reward", functools.partial(stages.run_ppo, model_config=mc, ref_params=sft_params,
                                                 reward_fn=_zero_reward, ptx_data=ptx),
            init_ppo_state(sft_params, ppo_cfg, model_config=mc, rng=k_ppo, reward_params=reward_params),
            Together(Replayable(prompt_batches.make), **({"ptx": ptx} if ptx is not None else {})), ppo_cfg,
            params_of=lambda s: s.policy.params)
        table["ppo_zero_reward"], golds["ppo_zero_reward"] = evaluate(control_params, **eval_kwargs)
        # DPO whose preference term is nearly off (beta 1e-3): the RPO NLL on the chosen replies alone.
        beta0 = dataclasses.replace(dpo_cfg, beta=1e-3)
        state = create_train_state(sft_params, _optim(cfg.dpo_lr, cfg.dpo_steps), k_dpo, total_steps=cfg.dpo_steps)
        control_params, _ = runs.stage(
            "dpo_beta0", functools.partial(stages.run_dpo, model_config=mc, ref_params=sft_params), state,
            pref_batches(dpo_train, cfg.seed + 1), beta0)
        table["dpo_beta0"], golds["dpo_beta0"] = evaluate(control_params, **eval_kwargs)
    if cfg.preference_family:
        golds.update(_preference_family(cfg, runs, mc, sft_params, dpo_train, pref_tasks, pref_batches, sampling,
                                        evaluate, eval_kwargs, table))
    golds["sft_best_t"] = sft_best_gold
    vs_sft = {stage: _compare(evaluate, eval_tasks, gold, sft_gold, cfg.seed) for stage, gold in golds.items()}
    vs_best = {stage: _compare(evaluate, eval_tasks, gold, sft_best_gold, cfg.seed) for stage, gold in golds.items()
               if stage not in ("base", "sft_best_t")}
    table = {s: table[s] for s in ("base", "sft", "sft_best_t", "ppo", "dpo", "grpo", *CONTROLS, *FAMILY)
             if s in table}
    return _report(cfg, table, rm_report, vs_sft, vs_best, curve.points(), runs.timings, time.time() - t0)


GROUPS = {"skills": world.SKILL_FAMILIES, "safety": world.SAFETY_FAMILIES}
"""The table's family groups, reported separately (and all together as `gold_reward`)."""


def _evaluator(split: str, mc: ModelConfig, sampling: SamplingConfig, samples: int,
               world_config: world.WorldConfig = world.WorldConfig()):
    """(PolicyEvaluator, tasks) over every distinct prompt of `split` once, families weighted as DEFAULT_MIX."""
    tasks = world.key_tasks(split, config=world_config)
    return task_evaluator(tasks, mc, sampling, samples, world_config), tasks


def task_evaluator(tasks: list, mc: ModelConfig, sampling: SamplingConfig, samples: int,
                   world_config: world.WorldConfig = world.WorldConfig()) -> PolicyEvaluator:
    """A PolicyEvaluator of `tasks` (each prompt once), families weighted as DEFAULT_MIX, groups as the table."""
    batch = _prompt_batch(tasks)
    fams = np.asarray([t.family for t in tasks])
    return PolicyEvaluator(
        batch["prompts"], batch["prompt_mask"], model_config=mc, tokenizer=TOK, sampling=sampling, samples=samples,
        gold_fn=lambda texts: world.gold_rewards(tasks, texts, world_config),
        metrics_fn=lambda idx, texts: world.compute_metrics([tasks[i] for i in idx], texts, world_config),
        weights=world.family_weights(tasks, world.DEFAULT_MIX),
        groups={name: np.isin(fams, members) for name, members in GROUPS.items()})


def _compare(evaluate, tasks, gold, baseline, seed) -> dict:
    """Paired differences gold - baseline over the distinct prompts, resampled within families, weighted as the
    table: all families ("all") and each group."""
    fams = np.asarray([t.family for t in tasks])
    out = {"all": paired_bootstrap(gold, baseline, seed=seed, strata=fams, weights=evaluate.weights)}
    for name, mask in evaluate.groups.items():
        out[name] = paired_bootstrap(gold[mask], baseline[mask], seed=seed, strata=fams[mask],
                                     weights=evaluate.weights[mask])
    return out


def _best_sft_temperature(cfg, sft_params, mc, sampling, rng) -> tuple[float, dict]:
    """The temperature (0 = greedy) at which SFT's weighted gold reward on the dev keys is highest."""
    dev, _ = _evaluator("dev", mc, sampling, cfg.eval_samples, cfg.world())
    sweep = {}
    for temperature in cfg.sft_temperatures:
        metrics, _ = dev.with_temperature(temperature)(sft_params, ref_params=sft_params, rng=rng)
        sweep[str(temperature)] = metrics["gold_reward"]
    best = max(cfg.sft_temperatures, key=lambda t: sweep[str(t)])
    return best, sweep


def _rm_dev_accuracy(cfg, reward_params, sft_params, mc, sampling, pref_batches, rng) -> float:
    """Reward-model accuracy on annotated pairs of two SFT samples for dev-key prompts: prompts that occur nowhere
    in its training data (the pairs of `split_pairs`'s held-out 10% share keys with training prompts)."""
    tasks = world.prompt_set(cfg.rm_dev_prompts, cfg.seed + 9, split="dev", config=cfg.world())
    batch = _prompt_batch(tasks)
    a, b = (sample_texts(sft_params, batch["prompts"], batch["prompt_mask"], jax.random.fold_in(rng, i),
                         model_config=mc, sampling=sampling, tokenizer=TOK, chunk=SAMPLE_CHUNK) for i in range(2))
    pairs = world.label_pairs(tasks, a, b, cfg.annotator, np.random.default_rng(cfg.seed + 9))
    records = [world.pair_record(p) for p in pairs]
    return pairwise_accuracy(reward_params, pref_batches(records, 0, epochs=1), model_config=mc)


CONTROLS = ("ppo_zero_reward", "dpo_beta0")
"""The controls' stages (`--controls`)."""


def _zero_reward(prompts, responses, mask):
    """The control's reward: 0 for every response (jittable)."""
    del prompts, mask
    return jnp.zeros(responses.shape[0], jnp.float32)


FAMILY = ("kto", "simpo", "orpo", "online_dpo")
"""The preference family's stages (`--preference-family`), in the order they run after GRPO."""


def _preference_family(cfg, runs, mc, sft_params, dpo_train, pref_tasks, pref_batches, sampling, evaluate,
                       eval_kwargs, table) -> dict:
    """8-11. KTO, SimPO, ORPO and online DPO from the SFT policy, each with offline DPO's step count, batch and
    learning rate and no tuning of its own (their papers' or TRL's defaults): KTO on DPO's pairs split into
    desirable and undesirable answers (the same labels), SimPO and ORPO on DPO's pairs with no reference model,
    online DPO on as many fresh labels (best vs worst of its own samples, ranked by the same annotators).
    -> {stage: per-prompt gold}; the table rows are added to `table`."""
    keys = {name: jax.random.fold_in(jax.random.PRNGKey(cfg.seed), 9 + i) for i, name in enumerate(FAMILY)}
    golds = {}

    def train(name, run, state, data, stage_cfg):
        params, _ = runs.stage(name, run, state, data, stage_cfg)
        table[name], golds[name] = evaluate(params, **eval_kwargs)

    steps, optim = cfg.dpo_steps, _optim(cfg.dpo_lr, cfg.dpo_steps)
    unpaired = Batches(ShuffledIterator(unpair(dpo_train), seed=cfg.seed + 11), TOK, kind="unpaired",
                       batch_size=2 * cfg.batch_size, buckets=(cfg.seq_len,))
    train("kto", functools.partial(stages.run_kto, model_config=mc, ref_params=sft_params),
          create_train_state(sft_params, optim, keys["kto"], total_steps=steps), unpaired,
          stages.KTOConfig(num_steps=steps, beta=cfg.kto_beta, log_every=10, optim=optim))
    for name, extra in (("simpo", dict(beta=cfg.simpo_beta, simpo_gamma=cfg.simpo_gamma)),
                        ("orpo", dict(orpo_lambda=cfg.orpo_lambda))):
        train(name, functools.partial(stages.run_dpo, model_config=mc),
              create_train_state(sft_params, optim, keys[name], total_steps=steps),
              pref_batches(dpo_train, cfg.seed + 1),
              stages.DPOConfig(num_steps=steps, loss_type=name, log_every=10, optim=optim, **extra))
    # Online DPO: as many labels as offline DPO had pairs, on the preference prompts, fresh samples each iteration.
    P = cfg.online_dpo_prompts
    iterations = -(-len(dpo_train) // P)
    online_cfg = OnlineDPOConfig(num_steps=iterations, batch_size=P, num_generations=cfg.online_dpo_generations,
                                 sampling=dataclasses.replace(sampling, temperature=1.0), beta=cfg.dpo_beta,
                                 rpo_alpha=cfg.dpo_rpo_alpha, log_every=5, pairs_every=max(1, iterations // 4),
                                 optim=_optim(cfg.dpo_lr, iterations))
    prompts = Replayable(lambda: (_prompt_batch([pref_tasks[j % len(pref_tasks)] for j in range(i * P, (i + 1) * P)])
                                  for i in range(iterations)))
    text = lambda t: TOK.decode(encode_prompt(TOK, world.messages_for(t)))  # noqa: E731
    judge = annotator_judge(pref_tasks, text, cfg.annotator, np.random.default_rng(cfg.seed + 12))
    train("online_dpo", functools.partial(stages.run_online_dpo, model_config=mc, ref_params=sft_params,
                                          host_reward_fn=judge, tokenizer=TOK,
                                          gold_reward_fn=world_reward(pref_tasks, text)),
          create_train_state(sft_params, online_cfg.optim, keys["online_dpo"], total_steps=iterations),
          prompts, online_cfg)
    return golds


_SFT_NAMES = {"kl_to_ref": "kl_to_sft", "win_rate": "win_rate_vs_sft"}


def plot_ppo_curve(points: list[dict], out_png: str) -> str:
    """Gold reward and reward-model score against KL to SFT during PPO (Gao et al. 2022's plot), each as its change
    from the SFT policy's value (the first point): the two live on different scales."""
    kl = [p["kl_to_sft"] for p in points]
    gain = lambda key: [p[key] - points[0][key] for p in points]  # noqa: E731
    return plot_xy(kl, {"gold reward": gain("gold_reward"), "reward-model score": gain("rm_score")},
                   "KL(policy || SFT) per response (nats)", "change from SFT", out_png,
                   title="PPO: gold and proxy reward vs KL")


def _report(cfg, table, rm_report, vs_sft, vs_best, ppo_points, timings, seconds) -> dict:
    # The evaluator's KL and win rate are against the SFT policy here: named so in the report.
    table = {stage: {_SFT_NAMES.get(k, k): v for k, v in m.items()} for stage, m in table.items()}
    ppo_points = [{_SFT_NAMES.get(k, k): v for k, v in p.items()} for p in ppo_points]
    plots = [plot_ppo_curve(ppo_points, os.path.join(cfg.out, "ppo_reward_vs_kl.png"))]
    dpo_log = os.path.join(cfg.out, "dpo", "metrics.jsonl")
    if os.path.exists(dpo_log):
        plots.append(plot_curves({"dpo": dpo_log}, ["rewards/margins", "rewards/accuracies"],
                                 os.path.join(cfg.out, "dpo_margins.png"), title="DPO implicit rewards"))
    report = {stage: {**{k: m[k] for k in ("gold_reward", "kl_to_sft", "mean_length", "refusal_rate",
                                            "over_refusal_rate", "win_rate_vs_sft", "rm_score", "gold_greedy")},
                      **{f"gold_{g}": m[f"gold/{g}"] for g in GROUPS},
                      **{f"gold_greedy_{g}": m[f"gold_greedy/{g}"] for g in GROUPS},
                      "gold_by_family": {k[len("gold/"):]: m[k] for k in m
                                         if k.startswith("gold/") and k[len("gold/"):] not in GROUPS}}
              for stage, m in table.items()}
    report["sft_best_t"]["temperature"] = table["sft_best_t"]["temperature"]
    for stage, ci in vs_sft.items():  # paired over the same distinct prompts, 95% stratified bootstrap interval
        report[stage]["gold_vs_sft"] = ci
    for stage, ci in vs_best.items():
        report[stage]["gold_vs_sft_best_t"] = ci
    report["evaluation"] = {"split": cfg.eval_split,
                            "distinct_prompts": len(world.key_tasks(cfg.eval_split, config=cfg.world())),
                            "samples_per_prompt": cfg.eval_samples, "family_weights": world.DEFAULT_MIX,
                            "groups": {g: list(f) for g, f in GROUPS.items()}}
    report["reward_model"] = rm_report
    report["ppo_curve"] = ppo_points
    report["config"] = dataclasses.asdict(cfg)
    report["seconds"] = {"total": seconds, **timings}
    with open(os.path.join(cfg.out, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    rows = [{"stage": s, **{k.replace("/", "_"): round(v, 3) for k, v in table[s].items()}} for s in table]
    bon = rm_report["best_of_n"]
    write_report(cfg.out, {"reward_model.accuracy (dev-key prompts)": round(rm_report["accuracy"], 3),
                           "SFT's best temperature on dev": table["sft_best_t"]["temperature"],
                           f"best-of-{bon['n']} gold (random / reward-model pick / gold pick)":
                           f"{bon['gold_random']:.3f} / {bon['gold_rm_pick']:.3f} / {bon['gold_oracle_pick']:.3f}",
                           "seconds": round(seconds, 1)},
                 {"stages": rows}, title="rlhf_jax pipeline on the gold-reward world", images=plots)
    with open(os.path.join(cfg.out, "report.json"), "w") as f:  # write_report wrote its own; ours is the contract
        json.dump(report, f, indent=2)
    _print_table(cfg, rows, rm_report, vs_sft, vs_best, seconds)
    return report


def _print_table(cfg, rows, rm_report, vs_sft, vs_best, seconds):
    cols = ["stage", "gold_reward", "gold_skills", "gold_safety", "gold_greedy", "rm_score", "kl_to_sft",
            "mean_length", "refusal_rate", "over_refusal_rate"]
    n_prompts = len(world.key_tasks(cfg.eval_split, config=cfg.world()))
    print(f"\n{cfg.eval_split} split: {n_prompts} distinct prompts, {cfg.eval_samples} samples each at temperature "
          f"{cfg.temperature} (sft_best_t: SFT at its best dev temperature, "
          f"{rows[[r['stage'] for r in rows].index('sft_best_t')]['temperature']})")
    print("  ".join(f"{c:>11}" for c in cols))
    for r in rows:
        print("  ".join(f"{r[c]:>11}" if isinstance(r[c], str) else f"{r[c]:>11.3f}" for c in cols))
    for title, comparison in (("SFT", vs_sft), ("SFT at its best temperature", vs_best)):
        print(f"\ngold reward minus {title}'s on the same prompts (95% bootstrap over distinct prompts within "
              "families): all / skills / safety")
        for stage, groups in comparison.items():
            print(f"  {stage:>12}: " + "   ".join(
                f"{ci['delta']:+.3f} [{ci['low']:+.3f}, {ci['high']:+.3f}]" for ci in groups.values()))
    bon = rm_report["best_of_n"]
    print(f"reward model accuracy on dev-key pairs: {rm_report['accuracy']:.3f} (on held-out pairs of training keys: "
          f"{rm_report['accuracy_same_keys']:.3f})    best of {bon['n']} SFT samples, gold "
          f"reward: random {bon['gold_random']:.3f}, reward-model pick {bon['gold_rm_pick']:.3f}, gold pick "
          f"{bon['gold_oracle_pick']:.3f}    total time: {seconds:.0f} s")


def main(argv=None) -> int:
    cfg = parse_cli(PipelineConfig, argv)
    try:
        run(cfg)
    except Stopped as e:
        print(f"[pipeline] stopped during {e}; continue with: python -m experiments.pipeline --resume --out "
              f"{cfg.out}", file=sys.stderr)
        return 143
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
