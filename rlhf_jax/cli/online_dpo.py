"""Online DPO: `rlhf-jax online-dpo [--init SFT_FOLDER] [--judge world|model|MODULE:FUNCTION] [--out DIR]`.

Each iteration samples k completions per prompt from the current policy, a judge scores them, and DPO steps
follow on the best-vs-worst pairs against the frozen initial model (see `rlhf_jax/train/online_dpo.py` and
docs/algorithms.md). Judges: `world` (default) is the synthetic world's gold reward of the built-in prompts, a
verifier run on the host; `model` a reward model (--reward-init). On the built-in prompts the gold reward is also
logged next to any judge: "judge/gold_agree" / "judge/gold_decided" is the judge's agreement with it. Every
`--online-dpo.pairs-every` iterations a few pairs with their scores go to DIR/online_dpo/completions.jsonl.
`--help` lists every option and its default.
"""
from __future__ import annotations

import dataclasses
import sys

import jax

from rlhf_jax.config_cli import parse_cli
from rlhf_jax.generation import SamplingConfig
from rlhf_jax.runner import (
    STOPPED,
    CheckpointSpec,
    DataSpec,
    RewardFunctionError,
    RunOptions,
    check_rollout_length,
    checkpoint_defaults,
    finish_report,
    init_model,
    load_data,
    make_run_mesh,
    prompt_table,
    read_records,
    run_stage,
    save_final,
    setup_error,
    start_run,
    trainable_state,
    user_reward,
    with_tokenizer_ids,
    world_judge,
)
from rlhf_jax.train.online_dpo import OnlineDPOConfig
from rlhf_jax.train.optim import OptimConfig
from rlhf_jax.train.stages import NonFiniteLossError, run_online_dpo


@dataclasses.dataclass(frozen=True, kw_only=True)
class OnlineDPOExperiment(RunOptions):
    """Online DPO: DPO on the policy's own samples, labelled by a judge each iteration. With --init a Hugging Face folder,
    the learning rate defaults to TRL's online DPO default, 5e-7, unless given."""

    out: str = "runs/online_dpo"
    """Run directory (metrics, checkpoints, final params, report)."""
    init: str | None = None
    """Policy and reference weights, usually the SFT model: a Hugging Face or save_params folder. None: random."""
    judge: str = "world"
    """world: the synthetic world's gold reward (built-in prompts); model: a reward model (--reward-init);
    MODULE:FUNCTION or FILE.py:FUNCTION: your function, called as TRL's reward_funcs (prompts= as the records
    wrote them, completions= texts, the records' other fields by name), returning one float per completion (higher
    is preferred)."""
    reward_init: str | None = None
    """The reward model for --judge model: a save_params folder from rlhf-jax reward or a Hugging Face folder."""
    data: DataSpec = DataSpec(num_demo=256, seq_len=64)
    """Prompt records ({prompt | question | messages}) and the prompt length bucket; the batch size is
    online_dpo.batch_size."""
    online_dpo: OnlineDPOConfig = OnlineDPOConfig(num_steps=10, batch_size=8, num_generations=2,
                                                  sampling=SamplingConfig(max_new_tokens=16, temperature=1.0),
                                                  optim=OptimConfig(learning_rate=1e-4), pairs_every=5)
    """Online DPO stage (k, beta, loss type, reference refresh, sampling, optimizer)."""
    checkpoint: CheckpointSpec = CheckpointSpec(save_every=5)
    """Checkpoint schedule and logging outputs."""


def main(argv=None) -> int:
    cfg = parse_cli(OnlineDPOExperiment, argv, prog="rlhf-jax online-dpo")
    cfg = checkpoint_defaults(cfg, argv, "online_dpo")
    try:
        if cfg.mesh is not None:
            raise ValueError("--mesh: online DPO runs on one device for now; leave --mesh unset")
        make_run_mesh(cfg.mesh)
        out = start_run(cfg, cfg.out)
        data, tok = load_data(cfg.data, "prompt", seed=cfg.seed, batch_size=cfg.online_dpo.batch_size,
                              init=cfg.init)
        stage_cfg = with_tokenizer_ids(cfg.online_dpo, tok, "online-dpo")
        k_policy, k_reward = jax.random.split(jax.random.key(cfg.seed))
        mc, policy = init_model(cfg.preset, cfg.model, k_policy, init=cfg.init, tokenizer=tok)
        check_rollout_length(cfg.data.seq_len, stage_cfg.sampling, mc, "online-dpo")
        gold = None
        if cfg.data.path is None:     # the built-in prompts: the world's gold reward is known
            gold = world_judge(cfg.data, cfg.seed, tok)
        judge = {}
        if cfg.judge not in ("world", "model"):   # a user's function of prompt and completion texts
            records = read_records(cfg.data, "prompt", seed=cfg.seed)
            table = prompt_table(records, tok, cfg.data.seq_len, cfg.data.path or "the built-in prompts")
            judge["host_reward_fn"] = user_reward(cfg.judge, "--judge", table=table)
        elif cfg.judge == "model":
            if cfg.reward_init is None:
                raise ValueError("--judge model needs --reward-init (a reward model folder)")
            _, reward = init_model(cfg.preset, cfg.model, k_reward, init=cfg.reward_init)
            if "score_head" not in reward:
                raise ValueError(f"{cfg.reward_init}: no score head (train one with rlhf-jax reward)")
            judge["reward_params"] = jax.device_put(reward)
        else:
            if gold is None:
                raise ValueError("--judge world scores the built-in prompts: leave --data.path unset (or use "
                                 "--judge model)")
            judge["host_reward_fn"] = gold
        ref = jax.device_put(cfg.lora.base(policy))
        state, lora = trainable_state(cfg, ref, mc, stage_cfg.optim, stage_cfg.num_steps * stage_cfg.num_updates)
    except (ValueError, OSError) as e:  # DataError is a ValueError
        return setup_error(e)
    try:
        state, history, finished = run_stage(
            "online_dpo", lambda s, d, c, hooks: run_online_dpo(s, d, c, model_config=mc, ref_params=ref,
                                                                tokenizer=tok, gold_reward_fn=gold, hooks=hooks,
                                                                **judge, **lora),
            state, data, stage_cfg, out=out, resume=cfg.resume, checkpoint=cfg.checkpoint,
            samples_per_step=stage_cfg.batch_size * stage_cfg.num_generations)
    except (NonFiniteLossError, RewardFunctionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if finished:
        save_final(out, "online_dpo", state.params, mc, lora.get("lora"), ref, tokenizer=tok, init=cfg.init)
    finish_report(out, "online_dpo", history, keys=("loss", "judge/score", "rewards/accuracies",
                                                    "completions/mean_length"),
                  summary={"finished": finished, "policy": cfg.init or cfg.preset, "judge": cfg.judge,
                           "data": cfg.data.path or "demo"}, data=data)
    return 0 if finished else STOPPED


if __name__ == "__main__":
    raise SystemExit(main())
