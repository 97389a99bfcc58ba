"""The main job: the whole post-training pipeline on the gold-reward instruction world, end to end on a CPU.

    pretrain (web corpus) -> SFT (demonstrations) -> reward model (annotated pairs of SFT samples) -> PPO
                                                 \\-> DPO (the same pairs)
                                                 \\-> GRPO (the gold reward as a verifier)

The world (`rlhf_jax.tasks`) knows the true reward of every answer, so each stage is judged by the gold reward
rather than by its own proxy. Simplifications against InstructGPT, chosen to fit ~15 minutes on 2 CPU cores: a
byte-level transformer of ~0.4M parameters, ~100-token conversations, one reward model for both the labels' noise
and PPO. The table scores 8 samples per distinct held-out prompt at PPO's rollout temperature (the policy PPO
optimises), the greedy answer on the side, and temperature-1 samples for the KL column. The pieces (data,
evaluation, stages, report) are the other `rlhf_jax.recipes` modules; `run_pipeline` composes them.

    rlhf-jax pipeline --out runs/demo            # the default, 12-15 minutes on 2 cores (`rlhf_jax.cli.pipeline`)
    rlhf-jax pipeline --out runs/quick --quick   # the same code path in about 2.5 minutes
    rlhf-jax pipeline --out runs/demo --resume   # after a SIGTERM: finished stages are reloaded

Every stage writes `DIR/<stage>/final` (params + model_config.json, for `load_params`, `--init` and the export)
and its metrics under `DIR/<stage>/`; `--config FILE.json` sets any option, `--help` lists them.
"""
from __future__ import annotations

import functools
import json
import os
import time

import jax

from rlhf_jax import tasks as world
from rlhf_jax.config_cli import save_config
from rlhf_jax.data import Batches, ShuffledIterator
from rlhf_jax.data.iterators import Replayable, Together
from rlhf_jax.models import ModelConfig, init_params
from rlhf_jax.recipes.config import PipelineConfig
from rlhf_jax.recipes.data import (
    TOK,
    demonstration_records,
    document_example,
    gold_verifier,
    packed_batches,
    preference_batches,
    preference_data,
    ptx_batches_of,
    rl_prompt_batches,
    rl_prompts,
)
from rlhf_jax.recipes.evaluate import (
    best_sft_temperature,
    compare_to,
    reward_model_report,
    split_evaluator,
)
from rlhf_jax.recipes.report import write_pipeline_report
from rlhf_jax.recipes.stages import (
    CONTROLS,
    FAMILY,
    PPOCurve,
    StageRunner,
    run_controls,
    run_preference_family,
)
from rlhf_jax.train import stages
from rlhf_jax.train.ppo import init_ppo_state
from rlhf_jax.train.state import create_train_state, with_score_head


def run_pipeline(cfg: PipelineConfig) -> dict:
    """Run every stage of `cfg` (its `scaled()` form) in `cfg.out` and write the report; -> report.json's dict.
    Raises `Stopped` when a signal stopped a stage (its checkpoint is saved; `--resume` continues)."""
    cfg = cfg.scaled()
    t0 = time.time()
    os.makedirs(cfg.out, exist_ok=True)
    save_config(cfg, os.path.join(cfg.out, "config.json"))
    mc = ModelConfig(vocab_size=TOK.vocab_size, d_model=cfg.d_model, num_layers=cfg.num_layers,
                     num_heads=cfg.num_heads, mlp_dim=4 * cfg.d_model, max_seq_len=128)
    k_init, k_sft, k_rm, k_ppo, k_eval, k_pref, k_dpo = jax.random.split(jax.random.PRNGKey(cfg.seed), 7)
    k_grpo = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), 8)   # a key of its own: the other stages' keys stay
    runs = StageRunner(cfg, mc)
    sampling = cfg.sampling   # PPO's: the table's answers, the best-of-n check, the preference samples (at T=1)
    docs = world.web_corpus(cfg.pretrain_docs, cfg.seed, config=cfg.world())
    evaluate, eval_tasks = split_evaluator(cfg.eval_split, mc, sampling, cfg.eval_samples, cfg.world())

    # 1. Pretraining on the web corpus (packed documents, the loss on every token).
    state = create_train_state(init_params(mc, k_init), cfg.pretrain.optim, jax.random.fold_in(k_init, 1),
                               total_steps=cfg.pretrain.num_steps)
    documents = [document_example(d) for d in docs]
    base_params, _ = runs.stage("pretrain", functools.partial(stages.run_sft, model_config=mc), state,
                                Replayable(lambda: packed_batches(documents, cfg, cfg.seed)),
                                cfg.pretrain)

    # 2. SFT on concise, correct demonstrations (loss on the answers only).
    sft_records = demonstration_records(cfg)
    sft_batches = Batches(ShuffledIterator(sft_records, seed=cfg.seed), TOK, kind="sft",
                          batch_size=cfg.batch_size, buckets=(cfg.seq_len,), pack=True)
    state = create_train_state(base_params, cfg.sft.optim, k_sft, total_steps=cfg.sft.num_steps)
    sft_params, _ = runs.stage("sft", functools.partial(stages.run_sft, model_config=mc), state, sft_batches,
                               cfg.sft)

    # 3. Preference pairs: SFT samples labelled by the simulated annotators, and off-policy pairs.
    t = time.time()
    prefs = preference_data(cfg, sft_params, mc, sampling, k_pref)
    runs.timings["preferences"] = time.time() - t

    # 4. Reward model: the SFT trunk plus a scalar head, Bradley-Terry on the annotated pairs; judged, then the
    #    SFT policy's rows (sampled at `temperature`, at its best dev temperature) and the base model's.
    state = create_train_state(with_score_head(sft_params, mc, k_rm), cfg.reward.optim, k_rm,
                               total_steps=cfg.reward.num_steps)
    reward_params, _ = runs.stage("reward", functools.partial(stages.run_reward, model_config=mc), state,
                                  preference_batches(cfg, prefs.train_pairs, cfg.seed),
                                  cfg.reward)
    t = time.time()
    rm_report = reward_model_report(cfg, reward_params, sft_params, mc, sampling, prefs, evaluate, k_pref, k_eval)
    table = {}
    table["sft"], sft_gold = evaluate(sft_params, ref_params=sft_params, reward_params=reward_params, rng=k_eval)
    eval_kwargs = dict(ref_params=sft_params, reward_params=reward_params, rng=k_eval, baseline_gold=sft_gold)
    table["base"], base_gold = evaluate(base_params, **eval_kwargs)
    best_t, rm_report["sft_temperature_sweep_dev"] = best_sft_temperature(cfg, sft_params, mc, sampling, k_eval)
    table["sft_best_t"], sft_best_gold = evaluate.with_temperature(best_t)(sft_params, **eval_kwargs)
    table["sft_best_t"]["temperature"] = best_t
    runs.timings["eval"] = time.time() - t

    # 5. PPO from the SFT policy against the reward model, KL-penalised towards the SFT policy, with PPO-ptx.
    ppo_cfg = cfg.ppo
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
        Together(rl_prompt_batches(cfg, cfg.ppo.batch_size, cfg.ppo.num_steps),
                 **({"ptx": ptx_batches} if ptx_batches is not None else {})), ppo_cfg,
        params_of=lambda s: s.policy.params, extra_hooks=[curve])
    # The final policy's row: the curve's evaluation of it when it just ran one (same prompts, same rng).
    done = curve.last is not None and curve.last[0] == cfg.ppo.num_steps
    table["ppo"], ppo_gold = curve.last[1] if done else evaluate(ppo_params, **eval_kwargs)

    # 6. DPO from the SFT policy on the on-policy pairs (no reward model, no rollouts).
    dpo_train = (prefs.train_pairs if cfg.dpo_pairs == "all"
                 else world.on_policy_records(prefs.on_policy, len(prefs.tasks)))
    dpo_cfg = cfg.dpo
    state = create_train_state(sft_params, dpo_cfg.optim, k_dpo, total_steps=dpo_cfg.num_steps)
    dpo_params, _ = runs.stage("dpo", functools.partial(stages.run_dpo, model_config=mc, ref_params=sft_params),
                               state, preference_batches(cfg, dpo_train, cfg.seed + 1), dpo_cfg)
    table["dpo"], dpo_gold = evaluate(dpo_params, **eval_kwargs)

    # 7. GRPO from the SFT policy against the gold reward (a verifier on the host: no reward model, no value model).
    grpo_cfg = cfg.grpo
    state = create_train_state(sft_params, grpo_cfg.optim, k_grpo,
                               total_steps=cfg.grpo.num_steps * grpo_cfg.updates_per_iteration)
    grpo_params, _ = runs.stage(
        "grpo", functools.partial(stages.run_grpo, model_config=mc, host_reward_fn=gold_verifier(rl_prompts(cfg)),
                                  tokenizer=TOK, ref_params=sft_params if grpo_cfg.uses_reference else None),
        state, rl_prompt_batches(cfg, cfg.grpo.batch_size, cfg.grpo.num_steps), grpo_cfg)
    table["grpo"], grpo_gold = evaluate(grpo_params, **eval_kwargs)

    golds = {"base": base_gold, "ppo": ppo_gold, "dpo": dpo_gold, "grpo": grpo_gold}
    if cfg.controls:
        golds.update(run_controls(cfg, runs, mc, sft_params=sft_params, reward_params=reward_params, ppo_cfg=ppo_cfg,
                                  ptx_stream=ptx_stream, dpo_cfg=dpo_cfg, dpo_train=dpo_train, k_ppo=k_ppo,
                                  k_dpo=k_dpo, evaluate=evaluate, eval_kwargs=eval_kwargs, table=table))
    if cfg.preference_family:
        golds.update(run_preference_family(cfg, runs, mc, sft_params, dpo_train, prefs.tasks,
                                           functools.partial(preference_batches, cfg), sampling, evaluate,
                                           eval_kwargs, table))
    golds["sft_best_t"] = sft_best_gold
    vs_sft = {stage: compare_to(evaluate, eval_tasks, gold, sft_gold, cfg.seed) for stage, gold in golds.items()}
    vs_best = {stage: compare_to(evaluate, eval_tasks, gold, sft_best_gold, cfg.seed)
               for stage, gold in golds.items() if stage not in ("base", "sft_best_t")}
    table = {s: table[s] for s in ("base", "sft", "sft_best_t", "ppo", "dpo", "grpo", *CONTROLS, *FAMILY)
             if s in table}
    return write_pipeline_report(cfg, table, rm_report, vs_sft, vs_best, curve.points(), runs.timings,
                                 time.time() - t0)

