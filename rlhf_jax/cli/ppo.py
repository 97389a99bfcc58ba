"""PPO (RLHF): `rlhf-jax ppo [--init SFT_FOLDER] [--reward-init RM_FOLDER] [--out DIR]`.

Samples responses to prompts, scores them with a learned reward model, subtracts a per-token KL penalty to the
frozen reference (the initial policy), and runs clipped PPO with GAE on policy and value models (Ouyang et al.
2022; Ziegler et al. 2019; Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO"). With no
--data.path it uses built-in prompts from the synthetic task world; without --init / --reward-init it
starts from fresh tiny models, just so it runs. `--help` lists every option and its default.

`--env NAME | MODULE:CLASS | FILE.py:CLASS` trains on multi-turn episodes with an environment instead (as `rlhf-jax
grpo --env`, docs/tools.md): the environment's rewards (no reward model; the value model starts from the policy),
the loss, KL and values on the policy's tokens only (`train.stages.run_ppo_env`), one device, no LoRA or PPO-ptx.
"""
from __future__ import annotations

import dataclasses
import sys

import jax

from rlhf_jax.config_cli import parse_cli
from rlhf_jax.envs import make_environment
from rlhf_jax.data.iterators import Together
from rlhf_jax.generation import SamplingConfig
from rlhf_jax.models import init_params
from rlhf_jax.runner import (
    STOPPED,
    CheckpointSpec,
    DataSpec,
    RunOptions,
    check_rollout_length,
    checkpoint_defaults,
    env_lengths,
    env_tasks,
    finish_report,
    init_model,
    load_data,
    make_run_mesh,
    make_tokenizer,
    notice,
    run_stage,
    save_final,
    setup_error,
    start_run,
    tokenizer_source,
    with_tokenizer_ids,
)
from rlhf_jax.train.optim import OptimConfig
from rlhf_jax.train.ppo import PPOConfig, init_ppo_state
from rlhf_jax.train.multiturn import TaskBatches
from rlhf_jax.train.stages import NonFiniteLossError, run_ppo, run_ppo_env
from rlhf_jax.train.state import with_score_head


@dataclasses.dataclass(frozen=True, kw_only=True)
class PPOExperiment(RunOptions):
    """RLHF with PPO against a learned reward model and a KL penalty to the reference. With --init a Hugging Face folder,
    the learning rate defaults to TRL's PPO default, 3e-6, unless given."""

    out: str = "runs/ppo"
    """Run directory (metrics, checkpoints, final params, report)."""
    init: str | None = None
    """Policy and reference weights (the SFT model): a Hugging Face or save_params folder. None: random init."""
    reward_init: str | None = None
    """Reward model weights (with a score head): a save_params folder from rlhf-jax reward or a Hugging Face
    folder. None: a random tiny reward model."""
    data: DataSpec = DataSpec(num_demo=256, seq_len=64)
    """Prompt records ({prompt | question | messages}) and the prompt length bucket; the batch size is
    ppo.batch_size."""
    ptx_data: DataSpec = DataSpec(num_demo=256, batch_size=8, seq_len=64, pack=True)
    """SFT records mixed into the policy loss when --ppo.ptx-coef > 0 (PPO-ptx, InstructGPT eq. 2): path, batch
    size (packed rows per iteration), row length; None path: the built-in demonstrations. Unused otherwise."""
    ppo: PPOConfig = PPOConfig(num_steps=10, batch_size=8, sampling=SamplingConfig(max_new_tokens=16), num_epochs=2,
                               num_minibatches=2, optim=OptimConfig(learning_rate=1e-4, eps=1e-5),
                               value_optim=OptimConfig(learning_rate=1e-4, eps=1e-5),
                               completions_every=5)
    """PPO stage (iterations, rollout size, KL, clipping, GAE, optimizer)."""
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


def _main_env(cfg: PPOExperiment) -> int:
    """`rlhf-jax ppo --env ...`: PPO on multi-turn episodes (`run_ppo_env`)."""
    try:
        if cfg.mesh is not None:
            raise ValueError("--env runs on one device (the environments answer on the host): drop --mesh")
        if cfg.reward_init is not None:
            raise ValueError("--env: the environment gives the rewards; drop --reward-init")
        if cfg.ppo.ptx_coef > 0:
            raise ValueError("--env: PPO-ptx is not supported on multi-turn episodes; set --ppo.ptx-coef 0")
        env = make_environment(cfg.env)
        out = start_run(cfg, cfg.out)
        tok = make_tokenizer(tokenizer_source(cfg.data.tokenizer, cfg.init))
        tasks = env_tasks(cfg, env, tok, batch_size=cfg.ppo.batch_size, batch_flag="--ppo.batch-size")
        data = TaskBatches(tasks, batch_size=cfg.ppo.batch_size, seed=cfg.seed)
        # No reward model to start the value from: the value model is the policy's trunk with a fresh head.
        ppo_cfg = dataclasses.replace(with_tokenizer_ids(cfg.ppo, tok, "ppo"), value_init="policy")
        k_policy, _, _, k_state = jax.random.split(jax.random.key(cfg.seed), 4)
        mc, policy = init_model(cfg.preset, cfg.model, k_policy, init=cfg.init, tokenizer=tok)
        budget, seq_len = env_lengths(cfg, ppo_cfg.sampling, mc, "ppo")
        lora = cfg.lora.config()          # with LoRA: adapters of the (quantised) base, which is also the reference
        ref = jax.device_put(cfg.lora.base(policy))
        state = init_ppo_state(ref, ppo_cfg, model_config=mc, rng=k_state, lora=lora)
    except (ValueError, OSError) as e:
        return setup_error(e)
    try:
        state, history, finished = run_stage(
            "ppo", lambda s, d, c, hooks: run_ppo_env(
                s, d, c, model_config=mc, env_factory=lambda: make_environment(cfg.env), tokenizer=tok,
                budget=budget, prompt_len=cfg.data.seq_len, seq_len=seq_len, ref_params=ref, hooks=hooks,
                lora=lora, suffix_len=cfg.env_kv_suffix),
            state, data, ppo_cfg, out=out, resume=cfg.resume, checkpoint=cfg.checkpoint,
            samples_per_step=ppo_cfg.batch_size)
    except (NonFiniteLossError, ValueError) as e:    # ValueError: an environment's or a chat template's, mid-run
        print(f"error: {e}", file=sys.stderr)
        return 1
    if finished:
        save_final(out, "ppo", state.policy.params, mc, lora, ref, tokenizer=tok, init=cfg.init)
    finish_report(out, "ppo", history, keys=("objective/scores", "tools/calls", "turns/mean", "objective/kl"),
                  summary={"finished": finished, "policy": cfg.init or cfg.preset, "env": cfg.env,
                           "data": cfg.data.path or f"{cfg.env} tasks"})
    return 0 if finished else STOPPED


def main(argv=None) -> int:
    cfg = parse_cli(PPOExperiment, argv, prog="rlhf-jax ppo")
    cfg = checkpoint_defaults(cfg, argv, "ppo")
    if cfg.env is not None:
        return _main_env(cfg)
    try:
        mesh = make_run_mesh(cfg.mesh)          # first: multi-host init precedes any other JAX call
        lora = cfg.lora.config()
        if lora is not None and mesh is not None:
            raise ValueError("--lora.rank with --mesh: LoRA PPO runs on one device for now; drop one of them")
        out = start_run(cfg, cfg.out)
        data, tok = load_data(cfg.data, "prompt", seed=cfg.seed, batch_size=cfg.ppo.batch_size,
                              init=cfg.init)
        ppo_cfg = with_tokenizer_ids(cfg.ppo, tok, "ppo")
        ptx = None
        if ppo_cfg.ptx_coef > 0:   # resumable with the prompts: Together checkpoints both positions
            ptx, _ = load_data(cfg.ptx_data, "sft", seed=cfg.seed + 1, init=cfg.init)
            data = Together(data, ptx=ptx)
        k_policy, k_reward, k_head, k_state = jax.random.split(jax.random.key(cfg.seed), 4)
        mc, policy = init_model(cfg.preset, cfg.model, k_policy, init=cfg.init, tokenizer=tok)
        check_rollout_length(cfg.data.seq_len, cfg.ppo.sampling, mc, "ppo")
        if cfg.reward_init is None:  # a fresh reward model of the policy's architecture
            reward = init_params(mc, k_reward)
            notice("[ppo] no --reward-init: PPO optimises a random reward model (a demo of the loop only); pass "
                   "--reward-init RM_FOLDER (rlhf-jax reward's final/) to train against a learned one")
        else:
            reward_mc, reward = init_model(cfg.preset, cfg.model, k_reward, init=cfg.reward_init)
            if reward_mc != mc:
                diff = ", ".join(f"{f.name} {getattr(reward_mc, f.name)} vs {getattr(mc, f.name)}"
                                 for f in dataclasses.fields(mc) if getattr(reward_mc, f.name) != getattr(mc, f.name))
                raise ValueError(f"--reward-init {cfg.reward_init} and the policy (--init) differ in {diff}: PPO "
                                 "initialises its value model from the reward model, so they must share the "
                                 "architecture (train the reward model from the policy's --init)")
            if "score_head" not in reward:
                raise ValueError(f"--reward-init {cfg.reward_init}: no score head (train one with rlhf-jax reward; "
                                 "a transformers *ForSequenceClassification folder's head is not read)")
        if "score_head" not in reward:
            reward = with_score_head(reward, mc, k_head)
        # On the device once (a no-op for device arrays); the train states make their own copies to donate.
        ref, reward = jax.device_put((cfg.lora.base(policy), reward))
        state = init_ppo_state(ref, ppo_cfg, model_config=mc, rng=k_state, reward_params=reward, lora=lora)
    except (ValueError, OSError) as e:  # DataError is a ValueError
        return setup_error(e)
    try:
        state, history, finished = run_stage(
            "ppo", lambda s, d, c, hooks: run_ppo(s, d, c, model_config=mc, ref_params=ref, reward_params=reward,
                                                 ptx_data=ptx, mesh=mesh, hooks=hooks, lora=lora, tokenizer=tok),
            state, data, ppo_cfg, out=out, resume=cfg.resume, checkpoint=cfg.checkpoint,
            samples_per_step=ppo_cfg.batch_size)
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if finished:
        save_final(out, "ppo", state.policy.params, mc, lora, ref, tokenizer=tok, init=cfg.init)
    finish_report(out, "ppo", history, keys=("objective/scores", "objective/kl", "loss/policy", "loss/value"),
                  summary={"finished": finished, "policy": cfg.init or cfg.preset,
                           "reward_model": cfg.reward_init or "random", "data": cfg.data.path or "demo"},
                  data=data)
    return 0 if finished else STOPPED


if __name__ == "__main__":
    raise SystemExit(main())
