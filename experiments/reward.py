"""Reward model: `python -m experiments.reward [--data.path PAIRS.jsonl] [--init SFT_FOLDER] [--out DIR]`.

Trains an LM trunk with a scalar head on preference pairs with the Bradley-Terry loss (Ouyang et al. 2022,
Stiennon et al. 2020); the reward is read at the last real token. With no --data.path it uses built-in pairs
from the synthetic task world labelled by the "careful" annotator. `--help` lists every option and its default.
"""
from __future__ import annotations

import dataclasses
import os
import sys

import jax

from experiments.common import (CheckpointSpec, DataSpec, RunOptions, finish_report, init_model, load_data,
                                make_run_mesh, run_stage, setup_error, start_run)
from rlhf_jax.config_cli import parse_cli
from rlhf_jax.train import checkpoint as ckpt
from rlhf_jax.train.optim import OptimConfig
from rlhf_jax.train.stages import NonFiniteLossError, RewardConfig, run_reward
from rlhf_jax.train.state import create_train_state, with_score_head


@dataclasses.dataclass(frozen=True, kw_only=True)
class RewardExperiment(RunOptions):
    """Reward-model training on preference pairs (Bradley-Terry)."""

    out: str = "runs/reward"
    """Run directory (metrics, checkpoints, final params, report)."""
    init: str | None = None
    """Trunk weights (usually the SFT model): a Hugging Face or save_params folder. None: random init. A fresh
    score head is added when the weights have none."""
    data: DataSpec = DataSpec(num_demo=512, batch_size=16, seq_len=64)
    """Preference records ({prompt, chosen, rejected}, HH-RLHF transcripts, ...) and batching."""
    reward: RewardConfig = RewardConfig(num_steps=100, log_every=10,
                                        optim=OptimConfig(learning_rate=1e-3, schedule="cosine", warmup_steps=10))
    """Reward stage (steps, logging period, centering, optimizer)."""
    checkpoint: CheckpointSpec = CheckpointSpec()
    """Checkpoint schedule and logging outputs."""


def main(argv=None) -> int:
    cfg = parse_cli(RewardExperiment, argv)
    try:
        mesh = make_run_mesh(cfg.mesh)          # first: multi-host init precedes any other JAX call
        out = start_run(cfg, cfg.out)
        data, _ = load_data(cfg.data, "preference", seed=cfg.seed)
        k_init, k_head = jax.random.split(jax.random.key(cfg.seed))
        mc, params = init_model(cfg.preset, cfg.model, k_init, init=cfg.init)
        if "score_head" not in params:
            params = with_score_head(params, mc, k_head)
        state = create_train_state(params, cfg.reward.optim, cfg.seed, total_steps=cfg.reward.num_steps)
    except (ValueError, OSError) as e:  # DataError is a ValueError
        return setup_error(e)
    try:
        state, history, finished = run_stage(
            "reward", lambda s, d, c, hooks: run_reward(s, d, c, model_config=mc, mesh=mesh, hooks=hooks), state, data,
            cfg.reward, out=out, resume=cfg.resume, checkpoint=cfg.checkpoint, samples_per_step=cfg.data.batch_size)
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if finished:
        ckpt.save_params(os.path.join(out, "reward", "final"), state.params, model_config=mc)
    finish_report(out, "reward", history, keys=("loss", "accuracy", "rewards/margins"),
                  summary={"finished": finished, "model": cfg.init or cfg.preset, "data": cfg.data.path or "demo"})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
