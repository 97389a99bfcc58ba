"""Generate: `rlhf-jax generate --init DIR (--prompt TEXT | --prompts FILE) [--out FILE.jsonl]`.

Samples completions from a model folder (a run's final/ or a Hugging Face folder) with its own tokenizer (the
folder's tokenizer.json, else bytes) and chat format, the sampling options every stage shares (`--sampling.*`:
temperature, top-k, top-p, max new tokens). Prompts come from `--prompt` (one text) or `--prompts` (a JSON /
JSONL file of prompt records: strings, {prompt | question | instruction | messages}). Prints one JSON line per
completion ({"prompt", "completion", "sample"}) or writes them to `--out`. `--help` lists every option.
"""
from __future__ import annotations

import dataclasses
import json
import sys

import jax
import numpy as np

from rlhf_jax.config_cli import check_ranges, parse_cli
from rlhf_jax.generation import SamplingConfig
from rlhf_jax.runner import check_vocab, make_tokenizer, setup_error, tokenizer_source


@dataclasses.dataclass(frozen=True, kw_only=True)
class GenerateOptions:
    """Sample completions from a model folder."""

    init: str | None = None
    """The model: a run's RUN/STAGE/final (save_params) or a Hugging Face folder (required)."""
    prompt: str | None = None
    """One prompt text (a user message)."""
    prompts: str | None = None
    """A JSON / JSONL file of prompt records (instead of --prompt)."""
    out: str | None = None
    """Write the completions as JSONL here (None: print them)."""
    tokenizer: str | None = None
    """A tokenizer.json or its folder; None: the --init folder's, else bytes."""
    num_samples: int = 1
    """Completions per prompt."""
    batch_size: int = 8
    """Prompts per sampling call."""
    seed: int = 0
    """Sampling seed."""
    sampling: SamplingConfig = SamplingConfig(max_new_tokens=64, temperature=0.7)
    """Sampling (eos / pad ids are the tokenizer's)."""

    def __post_init__(self):
        check_ranges(self, positive=("num_samples", "batch_size"), non_negative=("seed",))


def _messages(cfg: GenerateOptions) -> list:
    from rlhf_jax.data import load_records, parse_record

    if (cfg.prompt is None) == (cfg.prompts is None):
        raise ValueError("give exactly one of --prompt TEXT and --prompts FILE")
    if cfg.prompt is not None:
        return [parse_record(cfg.prompt, "prompt").messages]
    return [r.messages for r in load_records(cfg.prompts, "prompt")]


def generate(cfg: GenerateOptions) -> list[dict]:
    """The completions as {"prompt", "completion", "sample"} dicts (prompt: the last user message)."""
    from rlhf_jax.data import collate_prompts
    from rlhf_jax.eval import sample_texts
    from rlhf_jax.tokenizer import encode_prompt
    from rlhf_jax.train.checkpoint import load_params

    if cfg.init is None:
        raise ValueError("--init DIR is required (a run's final/ folder or a Hugging Face folder)")
    conversations = _messages(cfg)
    tok = make_tokenizer(tokenizer_source(cfg.tokenizer, cfg.init))
    model_config, params = load_params(cfg.init)
    if model_config is None:
        raise ValueError(f"--init {cfg.init}: no model_config.json beside params/")
    check_vocab(tok, model_config, cfg.init)
    params = {k: v for k, v in params.items() if k != "score_head"}
    sampling = dataclasses.replace(cfg.sampling, eos_id=tok.eos_id, pad_id=tok.pad_id)
    ids = [encode_prompt(tok, list(m)) for m in conversations]
    room = model_config.max_seq_len - sampling.max_new_tokens
    if room < 1:
        raise ValueError(f"--sampling.max-new-tokens {sampling.max_new_tokens} leaves no room for a prompt in the "
                         f"model's {model_config.max_seq_len} positions")
    width = min(max(len(p) for p in ids), room)
    batch = collate_prompts(ids, buckets=(width,), pad_id=tok.pad_id)
    rows = []
    for s in range(cfg.num_samples):
        texts = sample_texts(params, batch["prompts"], batch["prompt_mask"],
                             jax.random.fold_in(jax.random.key(cfg.seed), s), model_config=model_config,
                             sampling=sampling, tokenizer=tok, chunk=min(cfg.batch_size, len(ids)))
        rows += [{"prompt": m[-1]["content"], "completion": t, "sample": s} for m, t in zip(conversations, texts)]
    order = np.argsort([r["sample"] + cfg.num_samples * (i % len(ids)) for i, r in enumerate(rows)], kind="stable")
    return [rows[i] for i in order]


def main(argv=None) -> int:
    cfg = parse_cli(GenerateOptions, argv, prog="rlhf-jax generate")
    try:
        rows = generate(cfg)
    except (ValueError, OSError) as e:
        return setup_error(e)
    lines = [json.dumps(r, ensure_ascii=False) for r in rows]
    if cfg.out is None:
        print("\n".join(lines))
    else:
        with open(cfg.out, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        print(f"{len(rows)} completions written to {cfg.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
