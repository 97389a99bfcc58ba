"""Training: immutable states, optimizers, pure jitted steps, PPO rollout/update, and the four stages."""
from rlhf_jax.train.optim import OptimConfig, decay_mask, make_optimizer, make_schedule, optimizer_updates
from rlhf_jax.train.ppo import Rollout, ppo_step, ppo_update, rollout
from rlhf_jax.train.stages import (
    DPOConfig,
    NonFiniteLossError,
    PPOConfig,
    RewardConfig,
    SFTConfig,
    StageHooks,
    init_ppo_state,
    run_dpo,
    run_loop,
    run_ppo,
    run_reward,
    run_sft,
)
from rlhf_jax.train.state import PPOState, TrainState, create_train_state, normalize_score_head, with_score_head
from rlhf_jax.train.steps import (
    compile_step,
    dpo_step,
    full_sequences,
    last_token_index,
    make_dpo_step,
    make_reward_step,
    make_sft_step,
    reference_logps,
    reward_eval,
    reward_scores,
    reward_step,
    sequence_logps,
    sft_eval,
    sft_step,
)

from rlhf_jax.train.checkpoint import (CheckpointHook, GracefulExit, load_params, make_checkpoint_manager,
                                       restore_latest, save_params, stage_checkpoint_dir)
from rlhf_jax.train.logging import Hooks, JsonlHook, ProgressHook, TensorBoardHook, make_stage_hooks, read_jsonl
from rlhf_jax.train.report import plot_curves, plot_xy, write_report
