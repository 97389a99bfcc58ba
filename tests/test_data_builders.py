"""TFDS builders: prepare local files as ArrayRecord and read them back without TensorFlow."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import tensorflow_datasets as tfds

from rlhf_jax.data import (DataError, RecordSource, SFTRecord, from_example, load_prepared, load_records,
                           prepare_records)

FIX = Path(__file__).parent / "fixtures"
CASES = [("hh-rlhf-helpful-base-20.jsonl.gz", "preference"), ("oasst-en-3-trees.jsonl", "oasst"),
         ("alpaca-seed-tasks-20.jsonl", "sft"), ("flan-commonsense-qa-10.jsonl", "sft"),
         ("oasst-prompts-10.jsonl", "prompt")]


@pytest.mark.parametrize("name,kind", CASES)
def test_prepare_and_read_back(tmp_path, name, kind):
    builder = prepare_records(FIX / name, kind, tmp_path)
    assert builder.summaries["train"]["skipped"] == 0
    got = load_prepared(kind, tmp_path)
    assert list(got) == list(load_records(FIX / name, kind))  # same records, same (source) order
    assert got[-1] == got[len(got) - 1]
    with pytest.raises(IndexError):
        got[len(got)]
    prepared = tmp_path / "rlhf_records" / kind / "1.0.0"
    assert any(p.name.startswith("rlhf_records-train.array_record") for p in prepared.iterdir())
    # the generic TFDS readers find it too, still without TensorFlow
    source = tfds.data_source(f"rlhf_records/{kind}", data_dir=str(tmp_path), download=False)["train"]
    assert RecordSource(source, kind)[0] == got[0]
    assert RecordSource(tfds.builder_from_directory(str(prepared)).as_data_source("train"), kind)[1] == got[1]
    assert importlib.util.find_spec("tensorflow") is None or "tensorflow" not in sys.modules


def test_splits_skip_invalid_and_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "completion": "c"}) + "\n" + json.dumps({"prompt": "p"}) + "\n")
    with pytest.raises(DataError, match="bad.jsonl:2: field 'completion': missing"):
        prepare_records(bad, "sft", tmp_path / "a")
    b = prepare_records({"train": bad, "test": FIX / "flan-commonsense-qa-10.jsonl"}, "sft", tmp_path / "b",
                        skip_invalid=True)
    assert b.summaries["train"]["skipped"] == 1 and b.summaries["train"]["kept"] == 1
    assert len(load_prepared("sft", tmp_path / "b", "train")) == 1
    assert len(load_prepared("sft", tmp_path / "b", "test")) == 10


def test_field_mapping_for_catalogue_datasets():
    # A TFDS catalogue dataset's examples arrive as dicts of bytes; a mapping renames them to our fields.
    source = [{"question": b"What is 2+2?", "answer": b"4", "id": 7}]
    rec = RecordSource(source, "sft", fields={"prompt": "question", "completion": "answer"})[0]
    assert rec == SFTRecord(messages=({"role": "user", "content": "What is 2+2?"},
                                      {"role": "assistant", "content": "4"}))
    pref = from_example({"prompt": b"q", "chosen": b"a", "rejected": b"b"}, "preference")
    assert (pref.chosen, pref.rejected) == ("a", "b")
