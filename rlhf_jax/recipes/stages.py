"""The main job's stages: each stage's settings from a `PipelineConfig`, the runner of one run directory (a stage
is loaded when its `final/` exists under --resume), the PPO curve hook, and the optional preference family."""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import tasks as world
from rlhf_jax.data import Batches, SFTRecord, ShuffledIterator, unpair
from rlhf_jax.data.iterators import Replayable, Together
from rlhf_jax.generation import SamplingConfig
from rlhf_jax.models import ModelConfig
from rlhf_jax.recipes.config import PipelineConfig
from rlhf_jax.recipes.data import (
    TOK,
    cosine_optim,
    gold_verifier,
    preference_batches,
    prompt_batch,
    rl_prompt_batches,
    rl_prompts,
)
from rlhf_jax.rewards import annotator_judge, chat_prompt_text, world_reward
from rlhf_jax.runner import CheckpointSpec, run_stage
from rlhf_jax.train import checkpoint as ckpt
from rlhf_jax.train import stages
from rlhf_jax.train.grpo import GRPOConfig
from rlhf_jax.train.logging import StageHooks
from rlhf_jax.train.online_dpo import OnlineDPOConfig
from rlhf_jax.train.ppo import PPOConfig, init_ppo_state
from rlhf_jax.train.state import create_train_state


class Stopped(Exception):
    """A signal stopped the named stage (its checkpoint is saved; `--resume` continues)."""



def ppo_config(cfg: PipelineConfig, sampling: SamplingConfig | None = None) -> PPOConfig:
    """Step 5's PPO settings: `cfg.ppo`, with `sampling` instead of its own when given (an experiment's budget)."""
    return cfg.ppo if sampling is None else dataclasses.replace(cfg.ppo, sampling=sampling)


def grpo_config(cfg: PipelineConfig, sampling: SamplingConfig | None = None) -> GRPOConfig:
    """Step 7's GRPO settings: `cfg.grpo`, with `sampling` instead of its own when given."""
    return cfg.grpo if sampling is None else dataclasses.replace(cfg.grpo, sampling=sampling)


def train_grpo(cfg: PipelineConfig, grpo_cfg: GRPOConfig, mc: ModelConfig, sft_params):
    """(params, history) of step 7 outside the main job's runner: GRPO from `sft_params` against the gold verifier
    on the main job's RL prompts with its key (the experiments' variants pass another `grpo_cfg`)."""
    state = create_train_state(sft_params, grpo_cfg.optim, jax.random.fold_in(jax.random.PRNGKey(cfg.seed), 8),
                               total_steps=cfg.grpo.num_steps * grpo_cfg.updates_per_iteration)
    state, history = stages.run_grpo(state, rl_prompt_batches(cfg, grpo_cfg.batch_size, cfg.grpo.num_steps),
                                     grpo_cfg, model_config=mc, host_reward_fn=gold_verifier(rl_prompts(cfg)),
                                     tokenizer=TOK, ref_params=sft_params if grpo_cfg.uses_reference else None)
    return state.params, history


# ---------------------------------------------------------------------------------------------------- stages
class StageRunner:
    """The stages of one run directory, each through the runner (`rlhf_jax.runner.run_stage`):
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


CONTROLS = ("ppo_zero_reward", "dpo_beta0")
"""The controls' stages (`--controls`)."""


def zero_reward(prompts, responses, mask):
    """The control's reward: 0 for every response (jittable)."""
    del prompts, mask
    return jnp.zeros(responses.shape[0], jnp.float32)


FAMILY = ("kto", "simpo", "orpo", "online_dpo")
"""The preference family's stages (`--preference-family`), in the order they run after GRPO."""


def run_preference_family(cfg, runs, mc, sft_params, dpo_train, pref_tasks, pref_batches, sampling, evaluate,
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

    steps, optim = cfg.dpo.num_steps, cfg.dpo.optim
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
                                 sampling=dataclasses.replace(sampling, temperature=1.0), beta=cfg.dpo.beta,
                                 rpo_alpha=cfg.dpo.rpo_alpha, log_every=5, pairs_every=max(1, iterations // 4),
                                 optim=cosine_optim(cfg.dpo.optim.learning_rate, iterations))
    prompts = Replayable(lambda: (prompt_batch([pref_tasks[j % len(pref_tasks)] for j in range(i * P, (i + 1) * P)])
                                  for i in range(iterations)))
    text = chat_prompt_text(TOK)
    judge = annotator_judge(pref_tasks, text, cfg.annotator, np.random.default_rng(cfg.seed + 12))
    train("online_dpo", functools.partial(stages.run_online_dpo, model_config=mc, ref_params=sft_params,
                                          host_reward_fn=judge, tokenizer=TOK,
                                          gold_reward_fn=world_reward(pref_tasks, text)),
          create_train_state(sft_params, online_cfg.optim, keys["online_dpo"], total_steps=iterations),
          prompts, online_cfg)
    return golds




def run_controls(cfg: PipelineConfig, runs: StageRunner, mc: ModelConfig, *, sft_params, reward_params,
                 ppo_cfg: PPOConfig, ptx_stream, dpo_cfg, dpo_train: list, k_ppo, k_dpo, evaluate, eval_kwargs: dict,
                 table: dict) -> dict:
    """The two zero-signal controls (`--controls`), after GRPO: `ppo_zero_reward`, PPO with every setting of PPO
    but a reward of 0 (what PPO-ptx's NLL on the demonstrations and the KL term do alone), and `dpo_beta0`, DPO with
    beta 1e-3 and the same RPO term (what the NLL on the chosen replies does alone).
    -> {stage: per-prompt gold}; the table rows are added to `table`."""
    golds = {}
    ptx = ptx_stream()  # PPO's start, prompts and demonstrations (fresh streams), with a reward of 0
    prompts = rl_prompt_batches(cfg, cfg.ppo.batch_size, cfg.ppo.num_steps)
    params, _ = runs.stage(
        "ppo_zero_reward", functools.partial(stages.run_ppo, model_config=mc, ref_params=sft_params,
                                             reward_fn=zero_reward, ptx_data=ptx),
        init_ppo_state(sft_params, ppo_cfg, model_config=mc, rng=k_ppo, reward_params=reward_params),
        Together(prompts, **({"ptx": ptx} if ptx is not None else {})), ppo_cfg,
        params_of=lambda s: s.policy.params)
    table["ppo_zero_reward"], golds["ppo_zero_reward"] = evaluate(params, **eval_kwargs)
    beta0 = dataclasses.replace(dpo_cfg, beta=1e-3)
    state = create_train_state(sft_params, cfg.dpo.optim, k_dpo, total_steps=cfg.dpo.num_steps)
    params, _ = runs.stage("dpo_beta0", functools.partial(stages.run_dpo, model_config=mc, ref_params=sft_params),
                           state, preference_batches(cfg, dpo_train, cfg.seed + 1), beta0)
    table["dpo_beta0"], golds["dpo_beta0"] = evaluate(params, **eval_kwargs)
    return golds


class EvalCurve(StageHooks):
    """At iterations 0, 1, 2, 4, 8 and every `every`: the policy's gold, proxy and KL to SFT on each key set."""

    def __init__(self, evaluators, every, params_of, **kwargs):
        self.evaluators, self.every, self.params_of, self.kwargs = evaluators, every, params_of, kwargs
        self.points = []

    def record(self, step, params):
        point = {"iteration": step}
        for name, ev in self.evaluators.items():
            m, gold = ev(params, **self.kwargs)
            point[name] = {"gold": m["gold_reward"], "proxy": m["rm_score"], "kl": m["kl_to_ref"],
                           "length": m["mean_length"], "refusal": m["refusal_rate"],
                           "over_refusal": m["over_refusal_rate"],
                           "gold_per_prompt": [round(float(g), 6) for g in gold]}
        self.points.append(point)

    def on_state(self, step, state):
        if step % self.every == 0 or (step < self.every and step & (step - 1) == 0):
            self.record(step, self.params_of(state))


def train_sft(pcfg: PipelineConfig, base_params, mc, n_safety: int, n_benign: int, extra: list[dict] = ()):
    """The main job's SFT with `n_safety` refusals and `n_benign` look-alikes beside its skill demonstrations, and
    `extra` demonstrations ({"messages": ...}) mixed in."""
    demos = world.sft_demos(pcfg.sft_demos, pcfg.seed + 1, n_safety=n_safety, n_benign=n_benign)
    records = [SFTRecord(messages=tuple(d["messages"])) for d in [*demos, *extra]]
    batches = Batches(ShuffledIterator(records, seed=pcfg.seed), TOK, kind="sft", batch_size=pcfg.batch_size,
                      buckets=(pcfg.seq_len,), pack=True)
    k_sft = jax.random.split(jax.random.PRNGKey(pcfg.seed), 7)[1]
    state = create_train_state(base_params, pcfg.sft.optim, k_sft, total_steps=pcfg.sft.num_steps)
    state, _ = stages.run_sft(state, batches, pcfg.sft,
                              model_config=mc)
    return state.params
