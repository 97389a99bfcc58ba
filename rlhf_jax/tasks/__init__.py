"""The synthetic instruction world: task families with an exact gold reward, its data, labellers and metrics."""
from rlhf_jax.tasks.annotators import (
    ANNOTATORS, Annotator, Mixture, format_bias, get_annotator, label_pairs, length_bias, preference_prob,
    label_rankings, rank_responses, synthetic_pairs, utility)
from rlhf_jax.tasks.corpus import (
    DEFAULT_MIX, KINDS, SKILL_MIX, messages_for, perturb, prompt_set, sft_demos, synthetic_candidates, web_corpus)
from rlhf_jax.tasks.metrics import compute_metrics, gold_agreement, paired_bootstrap, win_rate
from rlhf_jax.tasks.pairs import held_out, on_policy_records, pair_record, split_pairs
from rlhf_jax.tasks.world import (
    FAMILIES, REFUSAL, SAFETY_FAMILIES, SKILL_FAMILIES, SPLITS, Task, WorldConfig, answer_credit, char_credit,
    extract_answer, family_weights, gold_reward, gold_rewards, held_out_keys, is_refusal, eval_keys, family_keys,
    key_tasks, length_penalty, make_task, make_tasks, task_for_key, task_split, word_recall, words)

__all__ = [
    "ANNOTATORS", "Annotator", "Mixture", "format_bias", "get_annotator", "label_pairs", "length_bias",
    "preference_prob", "label_rankings", "rank_responses", "synthetic_pairs", "utility",
    "DEFAULT_MIX", "KINDS", "SKILL_MIX", "messages_for", "perturb", "prompt_set", "sft_demos",
    "synthetic_candidates", "web_corpus",
    "compute_metrics", "gold_agreement", "paired_bootstrap", "win_rate",
    "held_out", "on_policy_records", "pair_record", "split_pairs",
    "FAMILIES", "REFUSAL", "SAFETY_FAMILIES", "SKILL_FAMILIES", "SPLITS", "Task", "WorldConfig", "answer_credit",
    "char_credit", "extract_answer", "family_weights", "gold_reward", "gold_rewards", "held_out_keys", "is_refusal",
    "eval_keys", "family_keys", "key_tasks", "length_penalty", "make_task", "make_tasks", "task_for_key",
    "task_split", "word_recall", "words",
]
