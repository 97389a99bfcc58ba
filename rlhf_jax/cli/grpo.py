"""GRPO and its family (DAPO, Dr. GRPO, GSPO, CISPO), RLOO and REINFORCE++ with verifiable rewards:
`rlhf-jax grpo [--init SFT_FOLDER] [--reward world|gsm8k|model|MODULE:FUNCTION] [--out DIR]`.

Samples G answers per prompt, scores them, and takes clipped policy-gradient steps on group advantages (see
`rlhf_jax/train/grpo.py` and docs/algorithms.md). Rewards: `world` (default) is the exact gold reward of the
built-in prompts of the synthetic world, a verifier run on the host; `gsm8k` checks the final number against the
"answer" field of GSM8K-style records in --data.path; `model` scores with a reward model (--reward-init). Without
--init it starts from a fresh tiny model, just so it runs. Every `--grpo.completions-every` iterations a table of
sampled completions with their rewards goes to DIR/grpo/completions.jsonl and TensorBoard (text).

`--env NAME | MODULE:CLASS | FILE.py:CLASS` trains on multi-turn episodes with an environment instead (tools, a
user; `rlhf_jax/train/multiturn.py`, docs/tools.md): the environment's own tasks (`calculator`: arithmetic with a
`calculate` tool) or the records of --data.path as tasks, --env-max-turns / --env-max-tokens per episode, the
environment's rewards (no --reward), one device.
`--help` lists every option and its default.
"""
from __future__ import annotations

import dataclasses
import sys

import jax

from rlhf_jax.config_cli import parse_cli
from rlhf_jax.envs import make_environment
from rlhf_jax.generation import SamplingConfig
from rlhf_jax.rewards import gsm8k_answer, gsm8k_reward
from rlhf_jax.runner import (
    STOPPED,
    CheckpointSpec,
    DataSpec,
    RewardFunctionError,
    RunOptions,
    check_rollout_length,
    checkpoint_defaults,
    env_lengths,
    env_tasks,
    finish_report,
    init_model,
    load_data,
    make_tokenizer,
    make_run_mesh,
    prompt_table,
    read_records,
    run_stage,
    save_final,
    setup_error,
    start_run,
    trainable_state,
    tokenizer_source,
    user_reward,
    with_tokenizer_ids,
    world_judge,
)
from rlhf_jax.train.grpo import GRPOConfig
from rlhf_jax.train.optim import OptimConfig
from rlhf_jax.train.multiturn import TaskBatches
from rlhf_jax.train.stages import NonFiniteLossError, run_grpo, run_grpo_env


@dataclasses.dataclass(frozen=True, kw_only=True)
class GRPOExperiment(RunOptions):
    """Reinforcement learning with verifiable rewards: GRPO and its family. With --init a Hugging Face folder,
    the learning rate defaults to TRL's GRPO default, 1e-6, unless given."""

    out: str = "runs/grpo"
    """Run directory (metrics, checkpoints, final params, report)."""
    init: str | None = None
    """Policy (and reference) weights, usually the SFT model: a Hugging Face or save_params folder. None: random."""
    reward: str = "world"
    """world: the synthetic world's gold reward (built-in prompts); gsm8k: final-number match against the records'
    "answer" (--data.path); model: a reward model (--reward-init); MODULE:FUNCTION or FILE.py:FUNCTION: your
    function, called as TRL's reward_funcs (prompts= as the records wrote them, completions= texts, the records'
    other fields by name), returning one float per completion. From a Hugging Face --init, --data.seq-len and
    --grpo.sampling.max-new-tokens default to TRL's 512 and 256 (fitted to the checkpoint's positions)."""
    reward_init: str | None = None
    """The reward model for --reward model: a save_params folder from rlhf-jax reward or a Hugging Face folder."""
    data: DataSpec = DataSpec(num_demo=256, seq_len=64)
    """Prompt records ({prompt | question | messages}) and the prompt length bucket; the batch size is
    grpo.batch_size."""
    grpo: GRPOConfig = GRPOConfig(num_steps=10, batch_size=4, num_generations=4, loss_type="dapo",
                                  sampling=SamplingConfig(max_new_tokens=16, temperature=1.0),
                                  optim=OptimConfig(learning_rate=1e-4), completions_every=5)
    """GRPO stage (group size, estimator, loss type, clipping, KL, sampling, optimizer)."""
    checkpoint: CheckpointSpec = CheckpointSpec(save_every=5)
    """Checkpoint schedule and logging outputs."""
    env: str | None = None
    """Multi-turn episodes with this environment: a registered name (calculator), MODULE:CLASS or FILE.py:CLASS
    (rlhf_jax.envs). Tasks: the records of --data.path (each record is a task), else the environment's
    tasks(n, seed=) (--data.num-demo of them). --data.seq-len is then the opening prompt's bucket."""
    env_max_turns: int = 4
    """--env: policy turns per episode."""
    env_max_tokens: int = 256
    """--env: policy tokens per episode, all its turns together."""
    env_max_len: int = 256
    """--env: tokens of an episode after its opening prompt (policy turns, tool results, template tokens); an
    episode whose next turn would not fit ends there."""
    env_kv_suffix: int | None = None
    """--env: keep the KV cache across turns, each later turn forwarding only what followed the last one (the
    environment's answer and the template's tokens), left-padded to this many tokens; an episode whose next such
    suffix is longer ends there. Unset: every turn re-prefills the conversation (docs/tools.md compares the two)."""


def _host_reward(cfg: GRPOExperiment, tok):
    """The host reward function of --reward world / gsm8k / MODULE:FUNCTION; gsm8k and a user's function get each
    sampled prompt's record back (`prompt_table`), never a text lookup of a cut prompt."""
    if cfg.reward == "world":
        if cfg.data.path is not None:
            raise ValueError("--reward world scores the built-in prompts: leave --data.path unset (or use gsm8k)")
        return world_judge(cfg.data, cfg.seed, tok)
    if cfg.reward == "gsm8k" and cfg.data.path is None:
        raise ValueError("--reward gsm8k needs --data.path: records with a question and an 'answer' field")
    records = read_records(cfg.data, "prompt", seed=cfg.seed)
    table = prompt_table(records, tok, cfg.data.seq_len, cfg.data.path or "the built-in prompts")
    if cfg.reward != "gsm8k":
        return user_reward(cfg.reward, "--reward", table=table)
    for i, r in enumerate(records):
        if "answer" not in r.meta:
            raise ValueError(f"{cfg.data.path}: record {i + 1} has no 'answer' field (needed by --reward gsm8k)")
    reference = lambda r: gsm8k_answer(str(r.meta["answer"])) if "####" in str(r.meta["answer"]) else str(  # noqa: E731
        r.meta["answer"])
    return lambda prompts, completions: gsm8k_reward(prompts, completions,
                                                     answers=[reference(table[p]) for p in prompts])


def _main_env(cfg: GRPOExperiment) -> int:
    """`rlhf-jax grpo --env ...`: GRPO on multi-turn episodes (`run_grpo_env`)."""
    try:
        if cfg.mesh is not None:
            raise ValueError("--env runs on one device (the environments answer on the host): drop --mesh")
        if cfg.reward != "world" or cfg.reward_init is not None:
            raise ValueError("--env: the environment gives the rewards; drop --reward / --reward-init")
        env = make_environment(cfg.env)
        out = start_run(cfg, cfg.out)
        tok = make_tokenizer(tokenizer_source(cfg.data.tokenizer, cfg.init))
        tasks = env_tasks(cfg, env, tok, batch_size=cfg.grpo.batch_size, batch_flag="--grpo.batch-size")
        data = TaskBatches(tasks, batch_size=cfg.grpo.batch_size, seed=cfg.seed)
        grpo_cfg = with_tokenizer_ids(cfg.grpo, tok, "grpo")
        mc, policy = init_model(cfg.preset, cfg.model, jax.random.split(jax.random.key(cfg.seed), 3)[0],
                                init=cfg.init, tokenizer=tok)
        budget, seq_len = env_lengths(cfg, grpo_cfg.sampling, mc, "grpo")
        if grpo_cfg.overlong_buffer is not None:
            raise ValueError("--grpo.overlong-buffer is not defined on multi-turn episodes; use --env-max-tokens")
        ref = jax.device_put(policy) if grpo_cfg.kl_coef > 0 or cfg.lora.rank else None
        state, lora = trainable_state(cfg, policy, mc, grpo_cfg.optim,
                                      grpo_cfg.num_steps * grpo_cfg.updates_per_iteration)
    except (ValueError, OSError) as e:
        return setup_error(e)
    try:
        state, history, finished = run_stage(
            "grpo", lambda s, d, c, hooks: run_grpo_env(
                s, d, c, model_config=mc, env_factory=lambda: make_environment(cfg.env), tokenizer=tok,
                budget=budget, prompt_len=cfg.data.seq_len, seq_len=seq_len, ref_params=ref, hooks=hooks,
                suffix_len=cfg.env_kv_suffix, **lora),
            state, data, grpo_cfg, out=out, resume=cfg.resume, checkpoint=cfg.checkpoint,
            samples_per_step=grpo_cfg.batch_size * grpo_cfg.num_generations)
    except (NonFiniteLossError, ValueError) as e:    # ValueError: an environment's or a chat template's, mid-run
        print(f"error: {e}", file=sys.stderr)
        return 1
    if finished:
        save_final(out, "grpo", state.params, mc, lora.get("lora"), ref, tokenizer=tok, init=cfg.init)
    finish_report(out, "grpo", history, keys=("reward", "tools/calls", "turns/mean", "kl"),
                  summary={"finished": finished, "policy": cfg.init or cfg.preset, "env": cfg.env,
                           "data": cfg.data.path or f"{cfg.env} tasks"})
    return 0 if finished else STOPPED


def main(argv=None) -> int:
    cfg = parse_cli(GRPOExperiment, argv, prog="rlhf-jax grpo")
    cfg = checkpoint_defaults(cfg, argv, "grpo")
    if cfg.env is not None:
        return _main_env(cfg)
    try:
        mesh = make_run_mesh(cfg.mesh)          # first: multi-host init precedes any other JAX call
        out = start_run(cfg, cfg.out)
        data, tok = load_data(cfg.data, "prompt", seed=cfg.seed, batch_size=cfg.grpo.batch_size, init=cfg.init)
        grpo_cfg = with_tokenizer_ids(cfg.grpo, tok, "grpo")
        k_policy, k_reward, k_head = jax.random.split(jax.random.key(cfg.seed), 3)
        mc, policy = init_model(cfg.preset, cfg.model, k_policy, init=cfg.init, tokenizer=tok)
        check_rollout_length(cfg.data.seq_len, grpo_cfg.sampling, mc, "grpo")
        rewards = {}
        if cfg.reward == "model":
            if cfg.reward_init is None:
                raise ValueError("--reward model needs --reward-init (a reward model folder)")
            reward_mc, reward = init_model(cfg.preset, cfg.model, k_reward, init=cfg.reward_init)
            if "score_head" not in reward:
                raise ValueError(f"{cfg.reward_init}: no score head (train one with rlhf-jax reward)")
            rewards["reward_params"] = jax.device_put(reward)
        else:
            if mesh is not None:
                raise ValueError("--reward world/gsm8k/MODULE:FUNCTION score on the host and run without --mesh; "
                                 "use --reward model")
            rewards.update(host_reward_fn=_host_reward(cfg, tok), tokenizer=tok)
        # On the device once; the train state makes its own copy to donate.
        ref = jax.device_put(cfg.lora.base(policy)) if grpo_cfg.kl_coef > 0 or cfg.lora.rank else None
        state, lora = trainable_state(cfg, policy if ref is None else ref, mc, grpo_cfg.optim,
                                      grpo_cfg.num_steps * grpo_cfg.updates_per_iteration)
    except (ValueError, OSError) as e:  # DataError is a ValueError
        return setup_error(e)
    try:
        state, history, finished = run_stage(
            "grpo", lambda s, d, c, hooks: run_grpo(s, d, c, model_config=mc, ref_params=ref, mesh=mesh,
                                                   hooks=hooks, **rewards, **lora),
            state, data, grpo_cfg, out=out, resume=cfg.resume, checkpoint=cfg.checkpoint,
            samples_per_step=grpo_cfg.batch_size * grpo_cfg.num_generations)
    except (NonFiniteLossError, RewardFunctionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if finished:
        save_final(out, "grpo", state.params, mc, lora.get("lora"), ref, tokenizer=tok, init=cfg.init)
    finish_report(out, "grpo", history, keys=("reward", "reward_std", "completions/mean_length", "kl"),
                  summary={"finished": finished, "policy": cfg.init or cfg.preset, "reward": cfg.reward,
                           "data": cfg.data.path or "demo"}, data=data)
    return 0 if finished else STOPPED


if __name__ == "__main__":
    raise SystemExit(main())
