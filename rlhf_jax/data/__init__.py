"""Data: local records (JSON/JSONL/JSONL.gz) -> typed records -> TFDS ArrayRecord -> shuffled, mixed, batched."""
from rlhf_jax.data.batching import (DEFAULT_BUCKETS, Example, bucket_length, collate_preference, collate_prompts,
                                    collate_sft, collate_unpaired, mismatched, new_stats, pack_sft,
                                    tokenize_preference, tokenize_prompt, tokenize_sft, tokenize_unpaired, truncate,
                                    truncate_pair)
from rlhf_jax.data.builders import RecordSource, RlhfRecords, from_example, load_prepared, prepare_records
from rlhf_jax.data.iterators import Batches, Mixture, ShuffledIterator, piecewise_linear_weights
from rlhf_jax.data.records import (KINDS, DataError, PreferenceRecord, PromptRecord, Records, SFTRecord, TextRecord,
                                   UnpairedRecord, load_records, parse_hh_transcript, parse_record, unpair)

__all__ = [
    "DEFAULT_BUCKETS", "Example", "bucket_length", "collate_preference", "collate_prompts", "collate_sft",
    "collate_unpaired", "mismatched", "tokenize_unpaired", "UnpairedRecord", "unpair",
    "new_stats", "pack_sft", "tokenize_preference", "tokenize_prompt", "tokenize_sft", "truncate", "truncate_pair",
    "RecordSource", "RlhfRecords", "from_example", "load_prepared", "prepare_records",
    "Batches", "Mixture", "ShuffledIterator", "piecewise_linear_weights",
    "KINDS", "DataError", "PreferenceRecord", "PromptRecord", "Records", "SFTRecord", "TextRecord",
    "load_records", "parse_hh_transcript", "parse_record",
]
