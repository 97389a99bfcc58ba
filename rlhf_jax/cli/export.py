"""Export: `rlhf-jax export RUN/STAGE/final --out HF_DIR [--what merged|adapter] [--dtype bfloat16]`.

Writes a run's final params as a Hugging Face folder that `transformers.AutoModelForCausalLM.from_pretrained`
loads: config.json (with the bos / eos / pad ids), the safetensors weights, generation_config.json (the one the
run's --init folder had, carried through every stage's final/, else only the special ids: greedy decoding, as
transformers defaults to) and the tokenizer's files when the run had a Hugging Face tokenizer (a byte-level model exports its weights only).
With `--what adapter` it writes the LoRA adapters of a `--lora.rank` run instead (RUN/STAGE/adapter, in peft's
format: `peft.PeftModel.from_pretrained(base, HF_DIR)`), with the same tokenizer files. A score head (reward
model) is not exported. `--help` lists every option.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from typing import Literal

from rlhf_jax.config_cli import parse_cli
from rlhf_jax.runner import (
    GENERATION_CONFIG,
    TOKENIZER_FILES,
    make_tokenizer,
    setup_error,
    tokenizer_source,
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExportOptions:
    """Export a run's final params (or its LoRA adapters) as a Hugging Face folder."""

    src: str | None = None
    """A save_params folder: RUN/STAGE/final (required; the first argument may give it without --src)."""
    out: str | None = None
    """The Hugging Face folder to write (required; created; files of an earlier export there are replaced)."""
    what: Literal["merged", "adapter"] = "merged"
    """merged: the whole model (LoRA runs save their adapters merged into final/); adapter: the LoRA adapters in
    peft's format, from the stage's adapter/ folder beside final/."""
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    """Storage dtype of the weights; None: the params' own (float32)."""
    model_type: Literal["gpt2", "llama", "qwen2", "mistral"] | None = None
    """The Hugging Face architecture; None: inferred from the model config (as the folder was loaded)."""
    max_shard_size: str | None = None
    """Split the weights into shards of at most this size, e.g. 5GB (None: one file)."""


def special_ids(tok, generation: dict | None) -> dict:
    """config.json's bos / eos / pad ids: the carried generation_config.json's where it has them (a list of EOS
    ids and a null BOS stay as they were), else the tokenizer's (BOS null when it has no BOS token of its own)."""
    has_bos = getattr(tok, "bos_token", "") is not None   # None: tokenizer_config.json says "bos_token": null
    ids = {"bos_token_id": int(tok.bos_id) if has_bos else None, "eos_token_id": int(tok.eos_id),
           "pad_token_id": int(tok.pad_id)}
    return {k: generation[k] if generation is not None and k in generation else v for k, v in ids.items()}


def export(cfg: ExportOptions) -> str:
    """Write the export; returns the output folder. Raises ValueError / OSError on a bad source."""
    from rlhf_jax.models import save_pretrained
    from rlhf_jax.train.checkpoint import load_params

    if cfg.src is None or cfg.out is None:
        raise ValueError("give the run's final folder and --out: rlhf-jax export RUN/STAGE/final "
                         "--out HF_DIR")
    if not os.path.isdir(cfg.src):
        raise ValueError(f"--src {cfg.src}: no such folder (expected RUN/STAGE/final)")
    tok = make_tokenizer(tokenizer_source(None, cfg.src))
    os.makedirs(cfg.out, exist_ok=True)
    if cfg.what == "adapter":
        adapter = os.path.join(os.path.dirname(os.path.abspath(cfg.src)), "adapter")
        if not os.path.isfile(os.path.join(adapter, "adapter_config.json")):
            raise ValueError(f"--what adapter: {adapter} holds no adapter_config.json (train with --lora.rank R)")
        for name in os.listdir(adapter):
            shutil.copyfile(os.path.join(adapter, name), os.path.join(cfg.out, name))
    else:
        model_config, params = load_params(cfg.src)
        if model_config is None:
            raise ValueError(f"{cfg.src}: no model_config.json (a save_params folder has one)")
        if "score_head" in params:
            print(f"note: {cfg.src} is a reward model; its score head is not exported (the folder is the causal LM "
                  "trunk: transformers' AutoModelForSequenceClassification would add a new, random head)",
                  file=sys.stderr)
        carried = os.path.join(cfg.src, GENERATION_CONFIG)
        generation = json.load(open(carried)) if os.path.isfile(carried) else None
        ids = special_ids(tok, generation)
        save_pretrained(model_config, {k: v for k, v in params.items() if k != "score_head"}, cfg.out,
                        dtype=cfg.dtype, model_type=cfg.model_type, max_shard_size=cfg.max_shard_size,
                        extra_config=ids)
        if generation is not None:   # the source checkpoint's own, carried through every stage: unchanged
            shutil.copyfile(carried, os.path.join(cfg.out, GENERATION_CONFIG))
        else:                        # only the ids: transformers' defaults (greedy) for everything else
            with open(os.path.join(cfg.out, GENERATION_CONFIG), "w") as f:
                json.dump({k: v for k, v in ids.items() if v is not None}, f, indent=2)
    if tok.source_dir is not None:
        for name in TOKENIZER_FILES:
            if os.path.isfile(os.path.join(tok.source_dir, name)):
                shutil.copyfile(os.path.join(tok.source_dir, name), os.path.join(cfg.out, name))
    return cfg.out


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not argv[0].startswith("-"):
        argv = ["--src", *argv]
    cfg = parse_cli(ExportOptions, argv, prog="rlhf-jax export")
    try:
        out = export(cfg)
    except (ValueError, OSError) as e:
        return setup_error(e)
    print(f"exported {cfg.src} ({cfg.what}) to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
