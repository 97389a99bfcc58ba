"""Records -> token ids -> fixed-shape numpy batches (SFT, packed SFT, preference, prompt).

Every SFT-style batch is already shifted for next-token prediction (`inputs = ids[:-1]`, `targets = ids[1:]`):

    {"inputs": int32 [B,T], "targets": int32 [B,T], "loss_mask": float32 [B,T],
     "positions": int32 [B,T], "segment_ids": int32 [B,T]}      # segment 0 = padding, 1, 2, ... examples

- Loss is on response (assistant) tokens only, their EOS included (InstructGPT SFT, Ouyang et al. 2022).
- T is the smallest of a few fixed `buckets` that fits the longest row, so a jitted step compiles once per bucket.
- Truncation keeps the end of the prompt and the start of the response: prompt keeps at most
  `max(max_prompt_len, max_len - len(response))` tokens from its end, the response fills what is left from its
  start (`max_len = buckets[-1] + 1` tokens, i.e. `buckets[-1]` shifted positions). What was cut is counted.
- Packing (as in T5 / Raffel et al. 2020) puts several examples in one row; each example is shifted on its own,
  so a segment's last target is its own last token, never the next segment's first; positions restart at 0 in each
  segment and the model attends only within a segment (`segment_ids`). The (input, target, position, loss) tuples of
  a packed batch are exactly those of the unpacked one.
- Preference batches: {"chosen": SFT batch, "rejected": SFT batch}, one example per row, right padded, same T.
- Unpaired (KTO) batches: {"completion": SFT batch, "kl": SFT batch, "desirable": bool [B], "valid": bool [B]}.
  Row i of "kl" is row i's prompt followed by row (i - 1) mod n's completion (n real rows), the mismatched pair
  from which KTO estimates its reference point (TRL shifts completions the same way); padding rows have
  valid False.
- Prompt batches: {"prompts": int32 [B,P] left padded with pad_id, "prompt_mask": int32 [B,P]} (+ "meta").
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from rlhf_jax.data.records import PreferenceRecord, PromptRecord, SFTRecord, TextRecord, UnpairedRecord
from rlhf_jax.tokenizer import ChatFormat, encode_chat_split, encode_prompt

__all__ = ["Example", "tokenize_sft", "tokenize_preference", "tokenize_unpaired", "tokenize_prompt", "truncate",
           "truncate_pair", "bucket_length", "collate_sft", "pack_sft", "collate_preference", "collate_unpaired",
           "mismatched", "collate_prompts", "new_stats"]

DEFAULT_BUCKETS = (64, 128, 256, 512, 1024)


@dataclasses.dataclass(frozen=True)
class Example:
    """One tokenised example: `ids` [n], token-level loss `mask` [n] and `prompt_len` (tokens before the final
    response). After shifting, target t = ids[t+1] carries loss mask[t+1]."""

    ids: tuple[int, ...]
    mask: tuple[int, ...]
    prompt_len: int


def new_stats() -> dict:
    """Counters filled by `truncate` and the collate functions."""
    return {"examples": 0, "truncated": 0, "prompt_tokens_cut": 0, "response_tokens_cut": 0, "tokens": 0,
            "loss_tokens": 0, "pad_tokens": 0}


def _split(tokenizer, messages, chat_format, tools=None) -> Example:
    """The conversation tokenised once; the prompt is everything before the final reply's first token."""
    ids, mask, prompt_len = encode_chat_split(tokenizer, messages, chat_format, tools=tools)
    return Example(tuple(ids), tuple(mask), prompt_len)


def tokenize_sft(tokenizer, record, chat_format: ChatFormat | None = None) -> Example:
    """SFTRecord -> chat-formatted Example; TextRecord -> [BOS] text [EOS] with loss on every token but BOS."""
    if isinstance(record, TextRecord):
        ids = [tokenizer.bos_id] + tokenizer.encode(record.text) + [tokenizer.eos_id]
        return Example(tuple(ids), (0,) + (1,) * (len(ids) - 1), 1)
    if not isinstance(record, SFTRecord):
        raise TypeError(f"tokenize_sft needs an SFTRecord or TextRecord, got {type(record).__name__}")
    return _split(tokenizer, list(record.messages), chat_format, tools=record.tools)


def tokenize_preference(tokenizer, record: PreferenceRecord, chat_format: ChatFormat | None = None
                        ) -> tuple[Example, Example]:
    """(chosen, rejected) Examples sharing the prompt; loss on the final reply and its EOS only (earlier assistant
    turns of the prompt get none: DPO and reward models score the reply, not the context)."""
    out = []
    for reply in (record.chosen, record.rejected):
        ex = _split(tokenizer, list(record.prompt) + [{"role": "assistant", "content": reply}], chat_format)
        out.append(dataclasses.replace(ex, mask=(0,) * ex.prompt_len + ex.mask[ex.prompt_len:]))
    return tuple(out)


def tokenize_unpaired(tokenizer, record: UnpairedRecord, chat_format: ChatFormat | None = None) -> Example:
    """The prompt and the judged reply as one Example, loss on the reply and its EOS only (as a preference side)."""
    ex = _split(tokenizer, list(record.prompt) + [{"role": "assistant", "content": record.completion}], chat_format)
    return dataclasses.replace(ex, mask=(0,) * ex.prompt_len + ex.mask[ex.prompt_len:])


def tokenize_prompt(tokenizer, record: PromptRecord, chat_format: ChatFormat | None = None) -> list[int]:
    """Prompt ids ending with the assistant header (what the policy continues in a rollout)."""
    return encode_prompt(tokenizer, list(record.messages), chat_format)


def _prompt_keep(n_p: int, n_r: int, max_len: int, max_prompt_len: int | None) -> int:
    budget = max_len // 2 if max_prompt_len is None else max_prompt_len
    if not 0 <= budget < max_len:
        raise ValueError(f"max_prompt_len must be in [0, max_len={max_len}), got {budget}")
    return min(n_p, max(budget, max_len - n_r))


def _cut(example: Example, keep_p: int, max_len: int, stats: dict | None) -> Example:
    n, n_p = len(example.ids), example.prompt_len
    if stats is not None:
        stats["examples"] += 1
    if n <= max_len and keep_p >= n_p:
        return example
    keep_r = min(n - n_p, max_len - keep_p)
    idx = list(range(n_p - keep_p, n_p)) + list(range(n_p, n_p + keep_r))
    if stats is not None:
        stats["truncated"] += 1
        stats["prompt_tokens_cut"] += n_p - keep_p
        stats["response_tokens_cut"] += n - n_p - keep_r
    return Example(tuple(example.ids[i] for i in idx), tuple(example.mask[i] for i in idx), keep_p)


def truncate(example: Example, max_len: int, *, max_prompt_len: int | None = None, stats: dict | None = None
             ) -> Example:
    """Cuts `example` to at most `max_len` tokens: keeps the end of the prompt and the start of the response.

    The prompt keeps min(len_p, max(max_prompt_len, max_len - len_r)) tokens (default max_prompt_len =
    max_len // 2); the response keeps the rest of the budget. Cut counts are added to `stats`.
    """
    n_p = example.prompt_len
    if len(example.ids) <= max_len:
        return _cut(example, n_p, max_len, stats)
    return _cut(example, _prompt_keep(n_p, len(example.ids) - n_p, max_len, max_prompt_len), max_len, stats)


def truncate_pair(chosen: Example, rejected: Example, max_len: int, *, max_prompt_len: int | None = None,
                  stats: dict | None = None) -> tuple[Example, Example]:
    """`truncate` for a preference pair: both keep the same prompt tokens (set by the longer reply)."""
    if chosen.ids[: chosen.prompt_len] != rejected.ids[: rejected.prompt_len]:
        raise ValueError("truncate_pair: chosen and rejected do not share the same prompt tokens")
    n_p = chosen.prompt_len
    longest = max(len(chosen.ids), len(rejected.ids))
    keep_p = n_p if longest <= max_len else _prompt_keep(n_p, longest - n_p, max_len, max_prompt_len)
    return _cut(chosen, keep_p, max_len, stats), _cut(rejected, keep_p, max_len, stats)


def bucket_length(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= n."""
    for b in sorted(buckets):
        if n <= b:
            return b
    raise ValueError(f"length {n} exceeds the largest bucket {max(buckets)}; truncate first")


def _empty(rows: int, width: int, pad_id: int) -> dict:
    return {"inputs": np.full((rows, width), pad_id, np.int32), "targets": np.full((rows, width), pad_id, np.int32),
            "loss_mask": np.zeros((rows, width), np.float32), "positions": np.zeros((rows, width), np.int32),
            "segment_ids": np.zeros((rows, width), np.int32)}


def _place(batch: dict, row: int, start: int, ex: Example, segment: int) -> int:
    """Writes the shifted example at batch[row, start:start+n-1]; returns the next free column."""
    n = len(ex.ids) - 1
    sl = slice(start, start + n)
    batch["inputs"][row, sl] = ex.ids[:-1]
    batch["targets"][row, sl] = ex.ids[1:]
    batch["loss_mask"][row, sl] = ex.mask[1:]
    batch["positions"][row, sl] = np.arange(n)
    batch["segment_ids"][row, sl] = segment
    return start + n


def _count(batch: dict, stats: dict | None) -> None:
    if stats is not None:
        real = int((batch["segment_ids"] > 0).sum())
        stats["tokens"] += real
        stats["loss_tokens"] += int(batch["loss_mask"].sum())
        stats["pad_tokens"] += batch["segment_ids"].size - real


def collate_sft(examples: Sequence[Example], *, buckets: Sequence[int], pad_id: int, rows: int | None = None,
                width: int | None = None, stats: dict | None = None) -> dict:
    """One example per row, right padded to a bucket: the SFT batch dict (see module docstring).

    `rows` (default len(examples)) adds all-padding rows to keep the batch size fixed; `width` forces T.
    """
    rows = len(examples) if rows is None else rows
    longest = max((len(e.ids) - 1 for e in examples), default=1)
    width = bucket_length(longest, buckets) if width is None else width
    batch = _empty(rows, width, pad_id)
    for r, ex in enumerate(examples):
        if len(ex.ids) < 2:
            raise ValueError("an example needs at least 2 tokens to give one (input, target) pair")
        _place(batch, r, 0, ex, 1)
    _count(batch, stats)
    return batch


def pack_sft(rows_of_examples: Sequence[Sequence[Example]], *, seq_len: int, pad_id: int,
             stats: dict | None = None) -> dict:
    """Packs each inner list of examples into one row of length `seq_len`, segment ids 1, 2, ... per example."""
    batch = _empty(len(rows_of_examples), seq_len, pad_id)
    for r, row in enumerate(rows_of_examples):
        col = 0
        for s, ex in enumerate(row, start=1):
            if col + len(ex.ids) - 1 > seq_len:
                raise ValueError(f"row {r}: examples need more than seq_len={seq_len} positions")
            col = _place(batch, r, col, ex, s)
    _count(batch, stats)
    return batch


def collate_preference(pairs: Sequence[tuple[Example, Example]], *, buckets: Sequence[int], pad_id: int,
                       rows: int | None = None, stats: dict | None = None) -> dict:
    """{"chosen": batch, "rejected": batch}: row i of each is pair i, both right padded to the same bucket T."""
    longest = max((len(e.ids) - 1 for pair in pairs for e in pair), default=1)
    width = bucket_length(longest, buckets)
    return {"chosen": collate_sft([c for c, _ in pairs], buckets=buckets, pad_id=pad_id, rows=rows, width=width,
                                  stats=stats),
            "rejected": collate_sft([r for _, r in pairs], buckets=buckets, pad_id=pad_id, rows=rows, width=width,
                                    stats=stats)}


def mismatched(examples: Sequence[Example], max_len: int) -> list[Example]:
    """KTO's mismatched pairs: example i's prompt with example (i - 1) mod n's reply, truncated to `max_len`
    (the reply's start is kept). One example is paired with itself."""
    n = len(examples)
    out = []
    for i, ex in enumerate(examples):
        other = examples[(i - 1) % n]
        p = ex.prompt_len
        ids = ex.ids[:p] + other.ids[other.prompt_len:]
        mask = (0,) * p + other.mask[other.prompt_len:]
        out.append(truncate(Example(ids, mask, p), max_len))
    return out


def collate_unpaired(examples: Sequence[Example], labels: Sequence[bool], *, buckets: Sequence[int], pad_id: int,
                     rows: int | None = None, stats: dict | None = None) -> dict:
    """{"completion", "kl": SFT batches of one width, "desirable", "valid": bool [rows]} (see the module doc)."""
    rows = len(examples) if rows is None else rows
    kl = mismatched(examples, max(buckets) + 1)
    longest = max((len(e.ids) - 1 for e in (*examples, *kl)), default=1)
    width = bucket_length(longest, buckets)
    flags = np.zeros((2, rows), bool)
    flags[0, :len(labels)] = np.asarray(labels, bool)
    flags[1, :len(examples)] = True
    return {"completion": collate_sft(examples, buckets=buckets, pad_id=pad_id, rows=rows, width=width, stats=stats),
            "kl": collate_sft(kl, buckets=buckets, pad_id=pad_id, rows=rows, width=width),
            "desirable": flags[0], "valid": flags[1]}


def collate_prompts(prompts: Sequence[Sequence[int]], *, buckets: Sequence[int], pad_id: int,
                    meta: Sequence | None = None, rows: int | None = None, stats: dict | None = None) -> dict:
    """Left-padded prompts: {"prompts": int32 [B,P], "prompt_mask": int32 [B,P], "meta": list}.

    Prompts longer than the largest bucket keep their end (the assistant header must stay); the cut is counted.
    """
    rows = len(prompts) if rows is None else rows
    limit = max(buckets)
    width = bucket_length(min(max((len(p) for p in prompts), default=1), limit), buckets)
    out = np.full((rows, width), pad_id, np.int32)
    mask = np.zeros((rows, width), np.int32)
    for r, p in enumerate(prompts):
        if stats is not None:
            stats["examples"] += 1
            if len(p) > width:
                stats["truncated"] += 1
                stats["prompt_tokens_cut"] += len(p) - width
        p = list(p)[-width:]
        if p:
            out[r, width - len(p):] = p
            mask[r, width - len(p):] = 1
    if stats is not None:
        stats["tokens"] += int(mask.sum())
        stats["pad_tokens"] += mask.size - int(mask.sum())
    return {"prompts": out, "prompt_mask": mask, "meta": list(meta) if meta is not None else [None] * len(prompts)}
