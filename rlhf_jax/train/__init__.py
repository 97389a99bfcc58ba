"""Training: immutable states, optimizers, pure jitted steps, the RL core and PPO, and the stages."""
from rlhf_jax.train.optim import OptimConfig, decay_mask, make_optimizer, make_schedule, optimizer_updates
from rlhf_jax.train.rl import (Episodes, HostRewardFn, RewardFn, decode_responses, episode_logprobs,
                               episode_sequence_logps, episode_values, epochs_minibatches, host_scores,
                               reward_model_scores, sample_episodes)
from rlhf_jax.train.online_dpo import (OnlineDPOConfig, best_and_worst, judge_agreement, online_dpo_sample,
                                      online_dpo_update)
from rlhf_jax.train.grpo import GRPOConfig, grpo_sample, grpo_step, grpo_update
from rlhf_jax.train.ppo import (PPOConfig, Rollout, init_ppo_state, ppo_sample, ppo_step, ppo_update,
                                ppo_update_scored, rollout, score_rollout)
from rlhf_jax.train.stages import (
    DPOConfig,
    KTOConfig,
    NonFiniteLossError,
    RewardConfig,
    SFTConfig,
    run_dpo,
    run_grpo,
    run_grpo_env,
    run_ppo_env,
    run_kto,
    run_loop,
    run_online_dpo,
    run_ppo,
    run_reward,
    run_sft,
)
from rlhf_jax.train.distill import DistillConfig, distill_step, run_distill, sft_to_distill_batch
from rlhf_jax.train.state import PPOState, TrainState, create_train_state, normalize_score_head, with_score_head
from rlhf_jax.train.steps import (
    compile_step,
    dpo_eval,
    dpo_step,
    kto_eval,
    kto_step,
    make_dpo_step,
    make_kto_step,
    make_reward_step,
    make_sft_step,
    pair_scores,
    reference_logps,
    reward_eval,
    reward_step,
    sequence_logps,
    sft_eval,
    sft_nll,
    sft_step,
)

from rlhf_jax.train.checkpoint import (CheckpointHook, GracefulExit, load_params, make_checkpoint_manager,
                                       restore_latest, save_params, stage_checkpoint_dir)
from rlhf_jax.train.logging import (Hooks, JsonlHook, ProgressHook, StageHooks, TensorBoardHook, make_stage_hooks,
                                    read_jsonl)
from rlhf_jax.train.report import plot_curves, plot_xy, write_report
