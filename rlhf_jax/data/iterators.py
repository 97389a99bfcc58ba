"""Deterministic, resumable iterators: shuffled epochs, weighted mixtures with a schedule, and batches.

- `ShuffledIterator(source, seed=...)`: epoch e visits `source` in the order
  `np.random.default_rng([seed, e]).permutation(len(source))`; its position is (epoch, index).
- `Mixture(sources, weights, seed=...)`: draw k picks a source with probabilities `weights(k // draws_per_step)`
  using `np.random.default_rng([seed, k])`, so the same draws come back after a restore. A schedule mixes, e.g.,
  pre-training text with SFT data in the decay phase of a warmup-stable-decay run (MiniCPM, Hu et al. 2024).
- `Batches(records, tokenizer, kind=..., batch_size=...)`: tokenises, truncates and collates (see `batching.py`).
- `Replayable(make)`: any deterministic stream, resumed by replaying it; `Together(main, **others)`: one position
  for streams a stage reads in step (PPO's prompts and its PPO-ptx batches); `ProcessRows`: a process's rows of
  every global batch (multi-host).

Each has `state() -> dict` (small, JSON-able) and `restore(state)`: take k batches, save, take m more; a new
iterator restored from the saved state gives the same m batches.
"""
from __future__ import annotations

import bisect
import copy
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from rlhf_jax.data import batching as B

__all__ = ["ShuffledIterator", "Mixture", "piecewise_linear_weights", "Batches"]


class ShuffledIterator:
    """Records of a random-access `source` (list, `load_prepared(...)`), reshuffled each epoch by (seed, epoch).

    `num_epochs=None` repeats forever; otherwise StopIteration after that many epochs.
    """

    def __init__(self, source: Sequence, *, seed: int = 0, shuffle: bool = True, num_epochs: int | None = None):
        if len(source) == 0:
            raise ValueError("ShuffledIterator: the source is empty")
        self.source, self.seed, self.shuffle, self.num_epochs = source, int(seed), shuffle, num_epochs
        self.epoch, self.index = 0, 0
        self._order, self._order_epoch = None, None

    def order(self, epoch: int) -> np.ndarray:
        """The visiting order of `epoch`."""
        if self._order_epoch != epoch:
            n = len(self.source)
            self._order = (np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle
                           else np.arange(n))
            self._order_epoch = epoch
        return self._order

    def __iter__(self):
        return self

    def __next__(self):
        if self.index >= len(self.source):
            self.epoch, self.index = self.epoch + 1, 0
        if self.num_epochs is not None and self.epoch >= self.num_epochs:
            raise StopIteration
        item = self.source[int(self.order(self.epoch)[self.index])]
        self.index += 1
        return item

    def state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed}

    def restore(self, state: Mapping) -> None:
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(f"state was saved with seed {state['seed']}, this iterator has seed {self.seed}")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


def piecewise_linear_weights(points: Sequence[tuple[int, Mapping[str, float]]]) -> Callable[[int], dict]:
    """Mixture weights as a function of step, linear between (step, {source: weight}) points, constant outside.

    E.g. [(0, {"text": 1, "sft": 0}), (900, {"text": 1, "sft": 0}), (1000, {"text": 0.3, "sft": 0.7})].
    """
    points = sorted(points, key=lambda p: p[0])
    steps = [p[0] for p in points]
    names = sorted({k for _, w in points for k in w})

    def weights(step: int) -> dict:
        i = bisect.bisect_right(steps, step)
        if i == 0:
            return {k: float(points[0][1].get(k, 0.0)) for k in names}
        if i == len(points):
            return {k: float(points[-1][1].get(k, 0.0)) for k in names}
        (s0, w0), (s1, w1) = points[i - 1], points[i]
        a = (step - s0) / (s1 - s0)
        return {k: (1 - a) * w0.get(k, 0.0) + a * w1.get(k, 0.0) for k in names}

    return weights


class Mixture:
    """Interleaves records of several resumable iterators with step-dependent weights.

    Args:
      sources: {name: iterator with state()/restore()} (usually `ShuffledIterator`s that repeat forever).
      weights: {name: weight} or a function step -> {name: weight} (normalised here; zero weights allowed).
      seed: the draws' seed.
      draws_per_step: draws per optimiser step (the batch size), so that `weights` sees optimiser steps.
    """

    def __init__(self, sources: Mapping[str, object], weights, *, seed: int = 0, draws_per_step: int = 1):
        self.sources, self.names = dict(sources), sorted(sources)
        self.weights = weights if callable(weights) else (lambda step, w=dict(weights): w)
        self.seed, self.draws_per_step, self.draws = int(seed), int(draws_per_step), 0
        self.counts = {k: 0 for k in self.names}

    def probabilities(self, step: int) -> np.ndarray:
        w = self.weights(step)
        unknown = set(w) - set(self.names)
        if unknown:
            raise ValueError(f"Mixture weights name unknown sources {sorted(unknown)}; sources are {self.names}")
        p = np.array([max(float(w.get(k, 0.0)), 0.0) for k in self.names])
        if p.sum() <= 0:
            raise ValueError(f"Mixture weights at step {step} are all zero: {w}")
        return p / p.sum()

    def __iter__(self):
        return self

    def __next__(self):
        p = self.probabilities(self.draws // self.draws_per_step)
        name = self.names[int(np.random.default_rng([self.seed, self.draws]).choice(len(p), p=p))]
        item = next(self.sources[name])
        self.draws += 1
        self.counts[name] += 1
        return item

    def state(self) -> dict:
        return {"draws": self.draws, "counts": dict(self.counts),
                "sources": {k: self.sources[k].state() for k in self.names}}

    def restore(self, state: Mapping) -> None:
        self.draws, self.counts = int(state["draws"]), dict(state["counts"])
        for k in self.names:
            self.sources[k].restore(state["sources"][k])


class Batches:
    """Batches of `kind` ("sft", "preference", "unpaired" or "prompt") from a resumable record iterator.

    Args:
      records: an iterator with state()/restore() (`ShuffledIterator`, `Mixture`).
      tokenizer: `ByteTokenizer` / `HFTokenizer`. chat_format: see `rlhf_jax.tokenizer.encode_chat`.
      batch_size: rows per batch (a short final batch is padded with empty rows: segment_ids 0, zero masks).
      buckets: allowed T (the largest also sets the truncation length).
      pack: SFT only; fill rows of length max(buckets) with several examples (next-fit, in order).
      max_prompt_len: truncation's prompt budget (default half the length).
    `stats` accumulates truncation and padding counts; it is saved in `state()`.
    """

    def __init__(self, records, tokenizer, *, kind: str = "sft", batch_size: int,
                 buckets: Sequence[int] = B.DEFAULT_BUCKETS, pack: bool = False, chat_format=None,
                 max_prompt_len: int | None = None):
        if kind not in ("sft", "preference", "unpaired", "prompt"):
            raise ValueError(f"Batches kind must be 'sft', 'preference', 'unpaired' or 'prompt', got {kind!r}")
        if pack and kind != "sft":
            raise ValueError("pack=True is for SFT batches only (preference and prompt rows hold one example)")
        self.records, self.tok, self.kind, self.batch_size = records, tokenizer, kind, int(batch_size)
        self.buckets, self.pack, self.chat_format = tuple(sorted(buckets)), pack, chat_format
        self.max_prompt_len, self.stats = max_prompt_len, B.new_stats()
        self._pending = None  # (example, records state before it, its stats delta) if it did not fit the last batch

    def _next_example(self):
        if self._pending is not None:
            item, self._pending = self._pending, None
            return item
        before, stats_before = copy.deepcopy(self.records.state()), dict(self.stats)
        record = next(self.records)
        max_len = self.buckets[-1] + 1
        if self.kind == "sft":
            ex = B.truncate(B.tokenize_sft(self.tok, record, self.chat_format), max_len,
                            max_prompt_len=self.max_prompt_len, stats=self.stats)
        elif self.kind == "preference":
            ex = B.truncate_pair(*B.tokenize_preference(self.tok, record, self.chat_format), max_len,
                                 max_prompt_len=self.max_prompt_len, stats=self.stats)
        elif self.kind == "unpaired":
            ex = (B.truncate(B.tokenize_unpaired(self.tok, record, self.chat_format), max_len,
                             max_prompt_len=self.max_prompt_len, stats=self.stats), record.label)
        else:
            ex = (B.tokenize_prompt(self.tok, record, self.chat_format), getattr(record, "meta", None))
        return ex, before, {k: self.stats[k] - stats_before[k] for k in self.stats}

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        items = []
        if self.pack:
            seq_len, rows, col = self.buckets[-1], [[]], 0
            while True:
                try:
                    item = self._next_example()
                except StopIteration:
                    break
                n = len(item[0].ids) - 1
                if col + n > seq_len:
                    if len(rows) == self.batch_size:
                        self._pending = item
                        break
                    rows.append([])
                    col = 0
                rows[-1].append(item[0])
                col += n
            if not rows[0]:
                raise StopIteration
            rows += [[] for _ in range(self.batch_size - len(rows))]
            return B.pack_sft(rows, seq_len=seq_len, pad_id=self.tok.pad_id, stats=self.stats)
        while len(items) < self.batch_size:
            try:
                items.append(self._next_example()[0])
            except StopIteration:
                break
        if not items:
            raise StopIteration
        kw = dict(buckets=self.buckets, pad_id=self.tok.pad_id, rows=self.batch_size, stats=self.stats)
        if self.kind == "sft":
            return B.collate_sft(items, **kw)
        if self.kind == "preference":
            return B.collate_preference(items, **kw)
        if self.kind == "unpaired":
            return B.collate_unpaired([e for e, _ in items], [y for _, y in items], **kw)
        return B.collate_prompts([p for p, _ in items], meta=[m for _, m in items], **kw)

    def state(self) -> dict:
        """Where the next batch starts: the records' state (before a pending example) and the stats."""
        if self._pending is not None:  # the pending example is read again after a restore: un-count it
            _, records, delta = self._pending
            return {"records": copy.deepcopy(records), "stats": {k: v - delta[k] for k, v in self.stats.items()}}
        return {"records": copy.deepcopy(self.records.state()), "stats": dict(self.stats)}

    def restore(self, state: Mapping) -> None:
        self.records.restore(state["records"])
        self.stats, self._pending = dict(state["stats"]), None


class ProcessRows:
    """This process's rows of every global batch of `batches` (multi-host: each process feeds only its rows).

    Every process reads the same global batch (same data and seed) and keeps rows
    [process_index * B / P, (process_index + 1) * B / P); `state()` / `restore()` pass through for checkpoints.
    """

    def __init__(self, batches, *, process_index: int, process_count: int):
        self.batches, self.index, self.count = batches, process_index, process_count

    def __iter__(self):
        return self

    def __next__(self):
        return self._rows(next(self.batches))

    def _rows(self, x):
        if isinstance(x, dict):
            return {k: self._rows(v) for k, v in x.items()}
        if isinstance(x, list) or (isinstance(x, np.ndarray) and x.ndim > 0):
            n = len(x)
            if n % self.count:
                raise ValueError(f"global batch of {n} rows does not divide over {self.count} processes; change "
                                 "the batch size")
            k = n // self.count
            return x[self.index * k:(self.index + 1) * k]
        return x

    def state(self):
        return self.batches.state()

    def restore(self, state):
        self.batches.restore(state)


class Replayable:
    """A deterministic batch stream made resumable by replay: `state()` is the number of batches taken, and
    `restore` rebuilds the stream with `make()` and takes that many again (cheap for generated data)."""

    def __init__(self, make: Callable[[], Any]):
        self.make, self.taken, self.it = make, 0, iter(make())

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.it)
        self.taken += 1
        return batch

    def state(self) -> dict:
        return {"taken": self.taken}

    def restore(self, state: dict) -> None:
        self.it, self.taken = iter(self.make()), 0
        for _ in range(int(state["taken"])):
            next(self)


class Together:
    """Iterates `main`; `state()` / `restore()` cover `main` and the `others` (streams a stage reads in step with
    it, e.g. PPO-ptx's SFT batches), so one checkpoint resumes them all."""

    def __init__(self, main, **others):
        self.main, self.others = main, others

    def __iter__(self):
        return self

    def __next__(self):
        return next(self.main)

    def state(self) -> dict:
        return {"main": self.main.state(), **{k: v.state() for k, v in self.others.items()}}

    def restore(self, state: dict) -> None:
        self.main.restore(state["main"])
        for k, v in self.others.items():
            v.restore(state[k])
