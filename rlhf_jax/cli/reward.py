"""Reward model: `rlhf-jax reward [--data.path PAIRS.jsonl] [--init SFT_FOLDER] [--out DIR]`.

Trains an LM trunk with a scalar head on preference pairs with the Bradley-Terry loss (Ouyang et al. 2022,
Stiennon et al. 2020); the reward is read at the last real token. With no --data.path it uses built-in pairs
from the synthetic task world labelled by the "careful" annotator. `--help` lists every option and its default.
"""
from __future__ import annotations

import dataclasses
import functools
import sys

import jax

from rlhf_jax.config_cli import parse_cli
from rlhf_jax.runner import (
    STOPPED,
    CheckpointSpec,
    DataSpec,
    EvalOptions,
    RunOptions,
    check_row_length,
    checkpoint_defaults,
    eval_hook,
    eval_summary,
    finish_report,
    init_model,
    load_data,
    make_run_mesh,
    run_stage,
    save_final,
    setup_error,
    start_run,
    trainable_state,
)
from rlhf_jax.train.optim import OptimConfig
from rlhf_jax.train.stages import NonFiniteLossError, RewardConfig, run_reward
from rlhf_jax.train.state import with_score_head
from rlhf_jax.train.steps import reward_eval


@dataclasses.dataclass(frozen=True, kw_only=True)
class RewardExperiment(RunOptions, EvalOptions):
    """Reward-model training on preference pairs (Bradley-Terry). With --init a Hugging Face folder,
    the learning rate defaults to TRL's reward default, 1e-4, unless given."""

    out: str = "runs/reward"
    """Run directory (metrics, checkpoints, final params, report)."""
    init: str | None = None
    """Trunk weights (usually the SFT model): a Hugging Face or save_params folder. None: random init. A fresh
    score head is added when the weights have none."""
    data: DataSpec = DataSpec(num_demo=512, batch_size=16, seq_len=65)
    """Preference records ({prompt, chosen, rejected}, HH-RLHF transcripts, ...) and batching; --data.seq-len counts
    the tokens of each scored sequence, prompt and answer (TRL's max_length)."""
    reward: RewardConfig = RewardConfig(num_steps=100, log_every=10,
                                        optim=OptimConfig(learning_rate=1e-3, schedule="cosine", warmup_steps=10))
    """Reward stage (steps, logging period, centering, optimizer)."""
    checkpoint: CheckpointSpec = CheckpointSpec()
    """Checkpoint schedule and logging outputs."""


def main(argv=None) -> int:
    cfg = parse_cli(RewardExperiment, argv, prog="rlhf-jax reward")
    cfg = checkpoint_defaults(cfg, argv, "reward")
    try:
        mesh = make_run_mesh(cfg.mesh)          # first: multi-host init precedes any other JAX call
        out = start_run(cfg, cfg.out)
        # The reward model scores whole rows: --data.seq-len tokens each (TRL's max_length), one more than the
        # shifted positions of the other stages' rows.
        rows = dataclasses.replace(cfg.data, seq_len=cfg.data.seq_len - 1)
        data, tok = load_data(rows, "preference", seed=cfg.seed, init=cfg.init)
        k_init, k_head = jax.random.split(jax.random.key(cfg.seed))
        mc, params = init_model(cfg.preset, cfg.model, k_init, init=cfg.init, tokenizer=tok)
        check_row_length(cfg.data.seq_len, mc)
        if "score_head" not in params:
            params = with_score_head(params, mc, k_head)
        if cfg.lora.rank:                  # LoRA: the trunk is the frozen base, the head trains with the adapters
            head, params = params["score_head"], cfg.lora.base({k: v for k, v in params.items() if k != "score_head"})
        state, lora = trainable_state(cfg, params, mc, cfg.reward.optim, cfg.reward.num_steps,
                                      head=head if cfg.lora.rank else None)
        base = {"base_params": params} if lora else {}
        evaluate = functools.partial(reward_eval, model_config=mc, center_coef=cfg.reward.center_coef)
        evals = eval_hook("reward", cfg.eval_data, cfg.eval_every, evaluate, kind="preference",
                          spec=rows, tok=tok, out=out, last_step=cfg.reward.num_steps,
                          lora=lora.get("lora"), base=params, args=())
    except (ValueError, OSError) as e:  # DataError is a ValueError
        return setup_error(e)
    try:
        state, history, finished = run_stage(
            "reward", lambda s, d, c, hooks: run_reward(s, d, c, model_config=mc, mesh=mesh, hooks=hooks, **lora,
                                                        **base), state, data,
            cfg.reward, out=out, resume=cfg.resume, checkpoint=cfg.checkpoint, extra_hooks=evals,
            samples_per_step=cfg.data.batch_size)
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if finished:
        save_final(out, "reward", state.params, mc, lora.get("lora"), params, tokenizer=tok, init=cfg.init)
    finish_report(out, "reward", history, keys=("loss", "accuracy", "rewards/margins"),
                  summary={"finished": finished, "model": cfg.init or cfg.preset, "data": cfg.data.path or "demo",
                           **eval_summary(evals)},
                  data=data)
    return 0 if finished else STOPPED


if __name__ == "__main__":
    raise SystemExit(main())
