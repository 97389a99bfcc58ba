"""Recipes: the main job's world recipe as library pieces (configuration, data, evaluation, stages, report).

The main job (`rlhf-jax pipeline`, `rlhf_jax.cli.pipeline`) composes these; the lecture experiments in
`experiments/` reuse them to build their variants, and `rlhf_jax.recipes.cards` renders their result cards.
Each first-world lecture experiment's measures, summaries and report renderers are library modules here, named by
experiment (`recipes.hallucination`, `.midtraining`, `.grpo_variants`, `.calibration`; imported by name, not
re-exported), so that its script keeps only parsing, orchestration and I/O; the rule world's experiments share
`recipes.rule_world`.
"""
from rlhf_jax.recipes.config import (
                                   WORLD_OPTIONS,
                                   PipelineConfig,
                                   get_option,
                                   with_options,
)
from rlhf_jax.recipes.data import (
                                   PROMPT_WIDTH,
                                   SAMPLE_CHUNK,
                                   TOK,
                                   PreferenceData,
                                   cosine_optim,
                                   demonstration_records,
                                   document_example,
                                   gold_verifier,
                                   label_preferences,
                                   pack_documents,
                                   packed_batches,
                                   preference_batches,
                                   preference_data,
                                   preference_samples,
                                   prompt_batch,
                                   ptx_batches_of,
                                   rl_prompt_batches,
                                   rl_prompts,
)
from rlhf_jax.recipes.evaluate import (
                                   GROUPS,
                                   best_sft_temperature,
                                   compare_to,
                                   reward_model_report,
                                   rm_dev_accuracy,
                                   split_evaluator,
                                   task_evaluator,
)
from rlhf_jax.recipes.pipeline import run_pipeline
from rlhf_jax.recipes.report import (
                                   plot_ppo_curve,
                                   print_pipeline_table,
                                   write_pipeline_report,
)
from rlhf_jax.recipes.stages import (
                                   CONTROLS,
                                   FAMILY,
                                   PPOCurve,
                                   StageRunner,
                                   Stopped,
                                   grpo_config,
                                   ppo_config,
                                   run_controls,
                                   run_preference_family,
                                   train_grpo,
                                   zero_reward,
)

__all__ = [
    "CONTROLS", "FAMILY", "GROUPS", "PROMPT_WIDTH", "SAMPLE_CHUNK", "TOK", "WORLD_OPTIONS",
    "PPOCurve", "PipelineConfig", "PreferenceData", "StageRunner", "Stopped",
    "best_sft_temperature", "compare_to", "cosine_optim", "demonstration_records", "document_example",
    "gold_verifier", "grpo_config", "label_preferences", "pack_documents", "packed_batches", "plot_ppo_curve",
    "ppo_config", "preference_batches", "preference_data", "preference_samples", "print_pipeline_table",
    "prompt_batch", "ptx_batches_of", "reward_model_report", "rl_prompt_batches", "rl_prompts", "rm_dev_accuracy",
    "run_controls", "run_pipeline", "run_preference_family", "split_evaluator", "task_evaluator", "train_grpo",
    "get_option", "with_options", "write_pipeline_report", "zero_reward",
]
