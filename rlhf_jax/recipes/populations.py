"""Training on one annotator population's labels: what the annotators and length_bias experiments share.

Every population labels the same SFT answers (the main job's step 3, `recipes.preference_samples`, sampled once per
seed and cached), so populations differ only in their choices, and at equal label counts by construction. A reward
model or DPO policy trained on one population's labels is kept under the seed's models folder
(`<models>/populations/<name>/{reward,dpo}/final`) and reused by every script that asks for the same one.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import time

import jax
import numpy as np

from rlhf_jax import recipes
from rlhf_jax import tasks as world
from rlhf_jax.data import PreferenceRecord
from rlhf_jax.eval import PolicyEvaluator, pairwise_accuracy, sample_texts
from rlhf_jax.generation import SamplingConfig
from rlhf_jax.recipes import TOK, prompt_batch
from rlhf_jax.tasks.annotators import format_bias
from rlhf_jax.train import checkpoint as ckpt
from rlhf_jax.train import stages
from rlhf_jax.train.state import create_train_state, with_score_head


def _log(msg: str) -> None:
    print(f"[populations] {msg}", file=sys.stderr, flush=True)


def text_length(text: str) -> int:
    """Bytes of the stripped answer (the annotators' and the world's length)."""
    return len(text.strip().encode())


def sft_samples(pcfg, sft_params, mc, folder: str) -> tuple[list, list[list[str]]]:
    """The main job's preference prompts and their `pref_samples` temperature-1 SFT answers (exactly step 3's:
    same prompts, same key), cached in `folder/populations/samples.json`."""
    path = os.path.join(folder, "populations", "samples.json")
    key = {"seed": pcfg.seed, "pref_prompts": pcfg.pref_prompts, "pref_samples": pcfg.pref_samples,
           "max_new_tokens": pcfg.sampling.max_new_tokens}
    tasks = world.prompt_set(pcfg.pref_prompts, pcfg.seed + 3, split="train")
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        if saved["key"] == key:
            return tasks, saved["samples"]
    t = time.time()
    sampling = pcfg.sampling
    k_pref = jax.random.split(jax.random.PRNGKey(pcfg.seed), 7)[5]
    tasks, samples = recipes.preference_samples(pcfg, sft_params, mc, sampling, k_pref)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"key": key, "samples": samples}, f)
    _log(f"seed {pcfg.seed}: {len(tasks)} x {len(samples)} SFT answers sampled in {time.time() - t:.0f} s")
    return tasks, samples


def dev_answers(pcfg, sft_params, mc, folder: str, k: int = 4) -> tuple[list, list[list[str]]]:
    """`k` temperature-1 SFT answers to the main job's `rm_dev_prompts` dev-key prompts (keys no training data
    holds), cached: the pairs on which a reward model is scored against the gold reward."""
    path = os.path.join(folder, "populations", "dev_answers.json")
    prompts = pcfg.rm_dev_prompts
    key = {"seed": pcfg.seed, "prompts": prompts, "k": k}
    tasks = world.prompt_set(prompts, pcfg.seed + 9, split="dev")
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        if saved["key"] == key:
            return tasks, saved["answers"]
    batch = prompt_batch(tasks)
    sampling = dataclasses.replace(pcfg.sampling, temperature=1.0)
    rng = jax.random.fold_in(jax.random.PRNGKey(pcfg.seed), 77)
    answers = [sample_texts(sft_params, batch["prompts"], batch["prompt_mask"], jax.random.fold_in(rng, i),
                            model_config=mc, sampling=sampling, tokenizer=TOK, chunk=recipes.SAMPLE_CHUNK)
               for i in range(k)]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"key": key, "answers": answers}, f)
    return tasks, answers


def _record(task, chosen: str, rejected: str) -> PreferenceRecord:
    return PreferenceRecord(prompt=({"role": "user", "content": task.prompt},), chosen=chosen, rejected=rejected)


def dev_pair_sets(tasks, answers) -> dict[str, list[PreferenceRecord]]:
    """From the dev answers, every pair of distinct answers to one prompt, as records oriented two ways:
    "gold" (chosen = the higher gold reward; pairs whose gold differs) and "longer_equal_gold" (chosen = the longer;
    pairs of equal gold and different length)."""
    out = {"gold": [], "longer_equal_gold": []}
    for i, task in enumerate(tasks):
        cands = list(dict.fromkeys(a[i] for a in answers))
        gold = world.gold_rewards([task] * len(cands), cands)
        for a in range(len(cands)):
            for b in range(a + 1, len(cands)):
                if gold[a] != gold[b]:
                    hi, lo = (a, b) if gold[a] > gold[b] else (b, a)
                    out["gold"].append(_record(task, cands[hi], cands[lo]))
                elif text_length(cands[a]) != text_length(cands[b]):
                    lo, hi = sorted((a, b), key=lambda j: text_length(cands[j]))
                    out["longer_equal_gold"].append(_record(task, cands[hi], cands[lo]))
    return out


def population_data(pcfg, tasks, samples, annotator, bonus=None) -> recipes.PreferenceData:
    """`annotator`'s labels of the shared SFT answers (and of the off-policy pairs): the main job's step 3."""
    return recipes.label_preferences(pcfg, tasks, samples, annotator, bonus=bonus)


def stage_dir(folder: str, population: str, stage: str) -> str:
    return os.path.join(folder, "populations", population, stage, "final")


def reward_model(pcfg, sft_params, mc, prefs: recipes.PreferenceData, folder: str, population: str):
    """The main job's reward model (same steps, learning rate and key) trained on `population`'s labels; kept in
    `stage_dir(folder, population, "reward")` and loaded from there when it exists. The main job's own annotator
    gets the main job's reward model itself (identical data and key)."""
    if population == pcfg.annotator and os.path.isdir(os.path.join(folder, "reward", "final", "params")):
        return ckpt.load_params(os.path.join(folder, "reward", "final"))[1]
    path = stage_dir(folder, population, "reward")
    if os.path.isdir(os.path.join(path, "params")):
        return ckpt.load_params(path)[1]
    t = time.time()
    k_rm = jax.random.split(jax.random.PRNGKey(pcfg.seed), 7)[2]
    state = create_train_state(with_score_head(sft_params, mc, k_rm), pcfg.reward.optim, k_rm,
                               total_steps=pcfg.reward.num_steps)
    state, _ = stages.run_reward(state, recipes.preference_batches(pcfg, prefs.train_pairs, pcfg.seed), pcfg.reward,
                                 model_config=mc)
    ckpt.save_params(path, state.params, model_config=mc)
    _log(f"seed {pcfg.seed}: reward model on {population}'s labels in {time.time() - t:.0f} s")
    return state.params


def dpo_policy(pcfg, sft_params, mc, prefs: recipes.PreferenceData, folder: str, population: str, *,
               hooks=None, retrain: bool = False):
    """The main job's DPO (same pairs, beta, RPO term, steps and key) on `population`'s labels; kept like
    `reward_model` (the main job's annotator gets the main job's DPO policy). `retrain`: train even if kept (a
    caller that records a curve with `hooks`)."""
    path = stage_dir(folder, population, "dpo")
    main_dpo = os.path.join(folder, "dpo", "final")
    if not retrain and population == pcfg.annotator and os.path.isdir(os.path.join(main_dpo, "params")):
        return ckpt.load_params(main_dpo)[1]
    if not retrain and os.path.isdir(os.path.join(path, "params")):
        return ckpt.load_params(path)[1]
    t = time.time()
    k_dpo = jax.random.split(jax.random.PRNGKey(pcfg.seed), 7)[6]
    records = (prefs.train_pairs if pcfg.dpo_pairs == "all" else
               world.on_policy_records(prefs.on_policy, len(prefs.tasks)))
    state = create_train_state(sft_params, pcfg.dpo.optim, k_dpo, total_steps=pcfg.dpo.num_steps)
    state, _ = stages.run_dpo(state, recipes.preference_batches(pcfg, records, pcfg.seed + 1), pcfg.dpo,
                              model_config=mc, ref_params=sft_params, hooks=hooks)
    ckpt.save_params(path, state.params, model_config=mc)
    _log(f"seed {pcfg.seed}: DPO on {population}'s labels in {time.time() - t:.0f} s")
    return state.params


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
                           groups={name: np.isin(fams, members) for name, members in recipes.GROUPS.items()})


def reward_model_report(rm, mc, pcfg, prefs: recipes.PreferenceData, dev_sets) -> dict:
    """A reward model's held-out accuracy on its own population's labels (pairs of held-out preference prompts),
    its agreement with the gold reward on dev-key pairs (prompts no training saw), and how often it prefers the
    longer of two dev answers of equal gold (0.5: no length bias)."""
    acc = functools.partial(pairwise_accuracy, rm, model_config=mc)
    batches = functools.partial(recipes.preference_batches, pcfg, seed=0, epochs=1)
    return {"own_labels_accuracy": acc(batches(prefs.test_pairs)),
            "gold_agreement_dev": acc(batches(dev_sets["gold"])),
            "prefers_longer_equal_gold_dev": acc(batches(dev_sets["longer_equal_gold"])),
            "dev_pairs": {k: len(v) for k, v in dev_sets.items()}}


def length_only_accuracy(records) -> float:
    """Accuracy of the length-only reward model r(x, y) = len(y) on preference records (ties count one half)."""
    wins = [0.5 if text_length(r.chosen) == text_length(r.rejected) else float(text_length(r.chosen) >
                                                                               text_length(r.rejected))
            for r in records]
    return float(np.mean(wins)) if wins else float("nan")


def prefers_longer(pairs: list[dict]) -> dict:
    """How often a population's labels prefer the longer answer, among on-policy pairs of different length: all of
    them, and those of equal gold (where length is all that separates them, for a careful labeller)."""
    diff = [p for p in pairs if text_length(p["chosen"]) != text_length(p["rejected"])]
    eq = [p for p in diff if p["gold_chosen"] == p["gold_rejected"]]
    def rate(ps):
        return float(np.mean([text_length(p["chosen"]) > text_length(p["rejected"]) for p in ps]))
    return {"rate": rate(diff) if diff else float("nan"), "pairs": len(diff),
            "rate_equal_gold": rate(eq) if eq else float("nan"), "pairs_equal_gold": len(eq)}
