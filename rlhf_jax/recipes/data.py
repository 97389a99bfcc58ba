"""The main job's data: the byte tokenizer, prompt batches, packed documents, the annotated comparisons, the RL
prompt sets and the gold verifier, all drawn from the task world (`rlhf_jax.tasks`) by a `PipelineConfig`."""
from __future__ import annotations

import dataclasses

import jax
import numpy as np

from rlhf_jax import tasks as world
from rlhf_jax.data import (
    Batches,
    SFTRecord,
    ShuffledIterator,
    collate_prompts,
    pack_sft,
)
from rlhf_jax.data.batching import Example
from rlhf_jax.data.iterators import Replayable
from rlhf_jax.eval import sample_texts
from rlhf_jax.generation import SamplingConfig
from rlhf_jax.models import ModelConfig
from rlhf_jax.recipes.config import PipelineConfig
from rlhf_jax.rewards import chat_prompt_text, world_reward
from rlhf_jax.tokenizer import ByteTokenizer, encode_chat, encode_prompt
from rlhf_jax.train.optim import OptimConfig

TOK = ByteTokenizer()
PROMPT_WIDTH = 64  # bytes: BOS + headers + the longest prompt (40) fit
SAMPLE_CHUNK = 256  # prompts per sampling call when labelling preference prompts


# ---------------------------------------------------------------------------------------------------- data
def packed_batches(examples: list[Example], cfg: PipelineConfig, seed: int):
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
    pref_batch = prompt_batch(pref_tasks)
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



def rl_prompts(cfg: PipelineConfig, mix: dict[str, float] | None = None) -> list:
    """The train-key prompts of PPO's and GRPO's rollouts (taken in order, cycling), families drawn from `mix`
    (default: the world's mix)."""
    return world.prompt_set(cfg.ppo.batch_size * 64, cfg.seed + 4, split="train", mix=mix, config=cfg.world())


def rl_prompt_batches(cfg: PipelineConfig, per_iteration: int, iterations: int) -> Replayable:
    """`iterations` prompt batches of `per_iteration` prompts from `rl_prompts`, replayable for --resume."""
    tasks = rl_prompts(cfg)
    return Replayable(lambda: (prompt_batch([tasks[j % len(tasks)] for j in range(
        i * per_iteration, (i + 1) * per_iteration)]) for i in range(iterations)))


def gold_verifier(tasks: list):
    """The gold reward as a host reward function of (prompt text, completion text), for `tasks`' prompts."""
    return world_reward(tasks, chat_prompt_text(TOK))


def demonstration_records(cfg: PipelineConfig) -> list[SFTRecord]:
    """Step 2's demonstrations as records."""
    demos = world.sft_demos(cfg.sft_demos, cfg.seed + 1, n_safety=cfg.sft_safety, n_benign=cfg.sft_benign,
                            config=cfg.world())
    return [SFTRecord(messages=tuple(d["messages"])) for d in demos]


def ptx_batches_of(cfg: PipelineConfig, records: list[SFTRecord]):
    """PPO-ptx's stream of packed demonstration rows (16 per iteration), or None when `ppo_ptx_coef` is 0."""
    if cfg.ppo.ptx_coef <= 0:
        return None
    return Batches(ShuffledIterator(records, seed=cfg.seed + 7), TOK, kind="sft", batch_size=16,
                   buckets=(cfg.seq_len,), pack=True)


def document_example(doc) -> Example:
    ids, _ = encode_chat(TOK, doc["messages"])
    return Example(tuple(ids), (1,) * len(ids), 0)


def prompt_batch(task_list):
    return collate_prompts([encode_prompt(TOK, world.messages_for(t)) for t in task_list], buckets=(PROMPT_WIDTH,),
                           pad_id=TOK.pad_id)


def cosine_optim(lr, steps, warmup_frac=0.05, **kw) -> OptimConfig:
    return OptimConfig(learning_rate=lr, schedule="cosine", warmup_steps=max(1, int(warmup_frac * steps)), **kw)

