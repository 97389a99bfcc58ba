"""How the main job scores a policy: every distinct prompt of a key split sampled with the gold reward, paired
bootstrap comparisons between stages, SFT's best temperature on the dev keys and the reward model's accuracy on
pairs of unseen-key prompts."""
from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np

from rlhf_jax import tasks as world
from rlhf_jax.eval import (
    PolicyEvaluator,
    paired_bootstrap,
    pairwise_accuracy,
    sample_texts,
)
from rlhf_jax.generation import SamplingConfig
from rlhf_jax.models import ModelConfig
from rlhf_jax.recipes.data import SAMPLE_CHUNK, TOK, preference_batches, prompt_batch
from rlhf_jax.tasks.annotators import format_bias

GROUPS = {"skills": world.SKILL_FAMILIES, "safety": world.SAFETY_FAMILIES}
"""The table's family groups, reported separately (and all together as `gold_reward`)."""


def split_evaluator(split: str, mc: ModelConfig, sampling: SamplingConfig, samples: int,
               world_config: world.WorldConfig = world.WorldConfig()):
    """(PolicyEvaluator, tasks) over every distinct prompt of `split` once, families weighted as DEFAULT_MIX."""
    tasks = world.key_tasks(split, config=world_config)
    return task_evaluator(tasks, mc, sampling, samples, world_config), tasks


def task_evaluator(tasks: list, mc: ModelConfig, sampling: SamplingConfig, samples: int,
                   world_config: world.WorldConfig = world.WorldConfig()) -> PolicyEvaluator:
    """A PolicyEvaluator of `tasks` (each prompt once), families weighted as DEFAULT_MIX, groups as the table."""
    batch = prompt_batch(tasks)
    fams = np.asarray([t.family for t in tasks])
    return PolicyEvaluator(
        batch["prompts"], batch["prompt_mask"], model_config=mc, tokenizer=TOK, sampling=sampling, samples=samples,
        gold_fn=lambda texts: world.gold_rewards(tasks, texts, world_config),
        metrics_fn=lambda idx, texts: world.compute_metrics([tasks[i] for i in idx], texts, world_config),
        weights=world.family_weights(tasks, world.DEFAULT_MIX),
        groups={name: np.isin(fams, members) for name, members in GROUPS.items()})


def compare_to(evaluate, tasks, gold, baseline, seed) -> dict:
    """Paired differences gold - baseline over the distinct prompts, resampled within families, weighted as the
    table: all families ("all") and each group."""
    fams = np.asarray([t.family for t in tasks])
    out = {"all": paired_bootstrap(gold, baseline, seed=seed, strata=fams, weights=evaluate.weights)}
    for name, mask in evaluate.groups.items():
        out[name] = paired_bootstrap(gold[mask], baseline[mask], seed=seed, strata=fams[mask],
                                     weights=evaluate.weights[mask])
    return out


def best_sft_temperature(cfg, sft_params, mc, sampling, rng) -> tuple[float, dict]:
    """The temperature (0 = greedy) at which SFT's weighted gold reward on the dev keys is highest."""
    dev, _ = split_evaluator("dev", mc, sampling, cfg.eval_samples, cfg.world())
    sweep = {}
    for temperature in cfg.sft_temperatures:
        metrics, _ = dev.with_temperature(temperature)(sft_params, ref_params=sft_params, rng=rng)
        sweep[str(temperature)] = metrics["gold_reward"]
    best = max(cfg.sft_temperatures, key=lambda t: sweep[str(t)])
    return best, sweep


def rm_dev_accuracy(cfg, reward_params, sft_params, mc, sampling, pref_batches, rng) -> float:
    """Reward-model accuracy on annotated pairs of two SFT samples for dev-key prompts: prompts that occur nowhere
    in its training data (the pairs of `split_pairs`'s held-out 10% share keys with training prompts)."""
    tasks = world.prompt_set(cfg.rm_dev_prompts, cfg.seed + 9, split="dev", config=cfg.world())
    batch = prompt_batch(tasks)
    a, b = (sample_texts(sft_params, batch["prompts"], batch["prompt_mask"], jax.random.fold_in(rng, i),
                         model_config=mc, sampling=sampling, tokenizer=TOK, chunk=SAMPLE_CHUNK) for i in range(2))
    pairs = world.label_pairs(tasks, a, b, cfg.annotator, np.random.default_rng(cfg.seed + 9))
    records = [world.pair_record(p) for p in pairs]
    return pairwise_accuracy(reward_params, pref_batches(records, 0, epochs=1), model_config=mc)




def reward_model_report(cfg, reward_params, sft_params, mc: ModelConfig, sampling: SamplingConfig, prefs,
                        evaluate: PolicyEvaluator, k_pref, k_eval) -> dict:
    """The reward model judged: accuracy on annotated SFT pairs of dev-key prompts (`rm_dev_accuracy`) and on the
    held-out pairs of training keys, the labels' agreement with the gold reward, and its best-of-n pick of SFT
    samples against a random and the gold pick."""
    pref_sampling = dataclasses.replace(sampling, temperature=1.0)
    batches = functools.partial(preference_batches, cfg)
    return {"accuracy": rm_dev_accuracy(cfg, reward_params, sft_params, mc, pref_sampling, batches,
                                        jax.random.fold_in(k_pref, 99)),
            "accuracy_same_keys": pairwise_accuracy(reward_params, batches(prefs.test_pairs, 0, epochs=1),
                                                    model_config=mc),
            "train_pairs": len(prefs.train_pairs), "test_pairs": len(prefs.test_pairs),
            "label_gold_agreement": world.gold_agreement(prefs.pairs),
            "best_of_n": evaluate.best_of_n(sft_params, reward_params, jax.random.fold_in(k_eval, 7),
                                            n=cfg.best_of_n, temperature=cfg.sampling.temperature)}


def style_metrics(tasks, texts, phrase: str = "the answer is") -> dict[str, float]:
    """The world's metrics plus the styles the biased populations reward: `format_rate` (mean of the annotators'
    format score) and `phrase_rate` (share of answers with the AI judge's pet phrase)."""
    out = world.compute_metrics(tasks, texts)
    out["format_rate"] = float(np.mean([format_bias(t) for t in texts]))
    out["phrase_rate"] = float(np.mean([phrase in t.lower() for t in texts]))
    return out


def test_tasks(prompts: int | None = None) -> list:
    """Every distinct test-key prompt, or the first `prompts` of a fixed shuffle of them (`test_evaluator`'s)."""
    tasks = world.key_tasks("test")
    if prompts is not None:
        tasks = [tasks[i] for i in np.random.default_rng(0).permutation(len(tasks))[:prompts]]
    return tasks


def test_evaluator(mc, max_new_tokens: int, samples: int, temperature: float = 0.7, prompts: int | None = None
                   ) -> PolicyEvaluator:
    """Every distinct test-key prompt once (or the first `prompts` of a fixed shuffle), `samples` answers each
    (families weighted as the main job's table, skills and safety groups), with `style_metrics`."""
    tasks = test_tasks(prompts)
    batch = prompt_batch(tasks)
    fams = np.asarray([t.family for t in tasks])
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, eos_id=TOK.eos_id,
                              pad_id=TOK.pad_id)
    return PolicyEvaluator(batch["prompts"], batch["prompt_mask"], model_config=mc, tokenizer=TOK, sampling=sampling,
                           samples=samples, gold_fn=functools.partial(world.gold_rewards, tasks),
                           metrics_fn=lambda idx, texts: style_metrics([tasks[i] for i in idx], texts),
                           weights=world.family_weights(tasks, world.DEFAULT_MIX),
                           groups={name: np.isin(fams, members) for name, members in GROUPS.items()})
