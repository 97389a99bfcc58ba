"""TFDS builders for local record files, read back through `as_data_source` (ArrayRecord, no TensorFlow).

`RlhfRecords` is a `tfds.core.GeneratorBasedBuilder` with one config per record kind ("sft", "oasst",
"preference", "prompt", "text"; see `records.py`). It reads a local JSON / JSONL / JSONL.gz file given by
`source_path` (nothing downloads), parses it with `load_records` (same errors, same `skip_invalid`), and writes
ArrayRecord files under `data_dir/rlhf_records/<kind>/1.0.0/`. Reading uses `builder.as_data_source(split)`, a
random-access sequence backed by `array_record`: TensorFlow is not needed to prepare or to read (checked with
tensorflow-datasets 4.9.10 and no tensorflow installed). Records are stored in source order
(`disable_shuffling=True`); `iterators.ShuffledIterator` does the shuffling, by seed and epoch.

Messages are stored as {role, content, extra}: `extra` is the JSON of a message's other keys (an assistant's
`tool_calls`, a tool result's `name`), "" when it has none; an SFT record's `tools` is stored as JSON text ("" for
none). Reading turns both back into the record's own values.

`RecordSource(source, kind, fields=...)` turns any random-access source of feature dicts (ours, or a public TFDS
catalogue dataset prepared with `tfds.data_sources(name, data_dir=...)`) into typed records, renaming fields.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from etils import epath
import tensorflow_datasets as tfds

from rlhf_jax.data.records import (KINDS, PreferenceRecord, PromptRecord, SFTRecord, UnpairedRecord, load_records,
                                   parse_record)

__all__ = ["RlhfRecords", "prepare_records", "load_prepared", "RecordSource", "from_example"]


def _messages_feature():
    return tfds.features.Sequence({"role": tfds.features.Text(), "content": tfds.features.Text(),
                                   "extra": tfds.features.Text()})


def _message_features(messages) -> list[dict]:
    """Messages as features: role, content, and the other keys (tool calls ...) as JSON in `extra`."""
    out = []
    for m in messages:
        rest = {k: v for k, v in m.items() if k not in ("role", "content")}
        out.append({"role": m["role"], "content": m["content"],
                    "extra": json.dumps(rest, ensure_ascii=False) if rest else ""})
    return out


def _features(kind: str):
    if kind in ("sft", "oasst"):
        spec = {"messages": _messages_feature(), "tools": tfds.features.Text()}
    elif kind == "preference":
        spec = {"prompt": _messages_feature(), "chosen": tfds.features.Text(), "rejected": tfds.features.Text()}
    elif kind == "unpaired":
        spec = {"prompt": _messages_feature(), "completion": tfds.features.Text(),
                "label": tfds.features.Scalar(dtype=np.bool_)}
    elif kind == "prompt":
        spec = {"messages": _messages_feature(), "meta": tfds.features.Text()}
    else:
        spec = {"text": tfds.features.Text()}
    return tfds.features.FeaturesDict(spec)


def _to_features(record) -> dict:
    if isinstance(record, SFTRecord):
        tools = json.dumps(list(record.tools), ensure_ascii=False) if record.tools else ""
        return {"messages": _message_features(record.messages), "tools": tools}
    if isinstance(record, PreferenceRecord):
        return {"prompt": _message_features(record.prompt), "chosen": record.chosen, "rejected": record.rejected}
    if isinstance(record, UnpairedRecord):
        return {"prompt": _message_features(record.prompt), "completion": record.completion, "label": record.label}
    if isinstance(record, PromptRecord):
        return {"messages": _message_features(record.messages), "meta": json.dumps(record.meta, ensure_ascii=False)}
    return {"text": record.text}


class RlhfRecords(tfds.core.GeneratorBasedBuilder):
    """Local SFT / conversation / preference / prompt / text files as a TFDS dataset (ArrayRecord).

    Args (besides the usual `data_dir`, `config`):
      source_path: a file, or {split: file}; needed only to prepare (`download_and_prepare`), not to read.
      skip_invalid: skip bad records (counted in `self.summaries[split]`) instead of raising `DataError`.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Typed records from local JSON/JSONL/JSONL.gz files; messages keep their tool calls "
                              "(`extra`), SFT records their tool schemas (`tools`)."}
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=k, description=f"{k} records") for k in KINDS]

    def __init__(self, *, source_path: str | Path | Mapping[str, str | Path] | None = None,
                 skip_invalid: bool = False, **kwargs):
        self._sources = ({"train": source_path} if isinstance(source_path, (str, Path)) else dict(source_path or {}))
        self._skip_invalid = skip_invalid
        self.summaries: dict[str, dict] = {}
        kwargs.setdefault("file_format", "array_record")
        super().__init__(**kwargs)

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # TFDS finds a builder's folder with `importlib_resources`, which this environment lacks (an optional
        # dependency of etils); the module file is what it would find.
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, description=__doc__, features=_features(self.builder_config.name),
                                     disable_shuffling=True)

    def _split_generators(self, dl_manager):
        if not self._sources:
            raise ValueError("RlhfRecords: pass source_path=<file> or {split: file} to prepare the dataset")
        return {split: self._generate_examples(split, Path(p)) for split, p in self._sources.items()}

    def _generate_examples(self, split: str, path: Path):
        records = load_records(path, self.builder_config.name, skip_invalid=self._skip_invalid)
        self.summaries[split] = records.summary
        for i, record in enumerate(records):
            yield i, _to_features(record)


def prepare_records(source_path, kind: str, data_dir: str | Path, *, skip_invalid: bool = False) -> RlhfRecords:
    """Prepares `source_path` (a file or {split: file}) as `kind` records under `data_dir`; returns the builder."""
    builder = RlhfRecords(config=kind, source_path=source_path, data_dir=str(data_dir), skip_invalid=skip_invalid)
    builder.download_and_prepare()
    return builder


def _decode(x: Any) -> Any:
    """TFDS examples -> plain JSON values: bytes to str, a Sequence-of-dict (dict of lists) to a list of dicts."""
    if isinstance(x, bytes):
        return x.decode("utf-8")
    if isinstance(x, np.ndarray):
        return [_decode(v) for v in x.tolist()] if x.ndim else _decode(x.item())
    if isinstance(x, (list, tuple)):
        return [_decode(v) for v in x]
    if isinstance(x, dict):
        d = {k: _decode(v) for k, v in x.items()}
        if d and all(isinstance(v, list) for v in d.values()) and len({len(v) for v in d.values()}) == 1 \
                and set(d) <= {"role", "content", "from", "value", "extra"}:
            return [_unpack_extra(dict(zip(d, vals))) for vals in zip(*d.values())]
        return d
    return x.item() if isinstance(x, np.generic) else x


def _unpack_extra(message: dict) -> dict:
    """A stored message back to its own keys: the JSON in `extra` ("" for none) merged in."""
    extra = message.pop("extra", "")
    return {**message, **json.loads(extra)} if extra else message


def from_example(example: Mapping, kind: str, fields: Mapping[str, str] | None = None):
    """One TFDS feature dict -> a typed record. `fields` maps our field names to the dataset's, e.g.
    {"prompt": "question", "completion": "answer"}; other fields keep their names."""
    obj = _decode(dict(example))
    for ours, theirs in (fields or {}).items():
        if theirs in obj:
            obj[ours] = obj.pop(theirs)
    if obj.get("tools") == "":   # stored for "no tools"
        del obj["tools"]
    if kind == "prompt" and isinstance(obj.get("meta"), str):
        meta = json.loads(obj.pop("meta") or "{}")
        obj = {**meta, **obj}
    return parse_record(obj, "sft" if kind == "oasst" else kind)


class RecordSource(Sequence):
    """A random-access source of feature dicts (`builder.as_data_source(split)`, `tfds.data_sources(...)[split]`)
    seen as a sequence of typed records."""

    def __init__(self, source, kind: str, fields: Mapping[str, str] | None = None):
        self.source, self.kind, self.fields = source, kind, dict(fields or {})

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(f"record {i} out of range (0..{len(self) - 1})")
        return from_example(self.source[i % len(self)], self.kind, self.fields)

    def __iter__(self):
        return (self[i] for i in range(len(self)))


def load_prepared(kind: str, data_dir: str | Path, split: str = "train") -> RecordSource:
    """The prepared `kind` records of `split` under `data_dir`, as a random-access sequence (no TensorFlow)."""
    builder = RlhfRecords(config=kind, data_dir=str(data_dir))
    return RecordSource(builder.as_data_source(split), kind)
