"""Supervised fine-tuning: `rlhf-jax sft [--data.path FILE.jsonl] [--out DIR] [--resume]`.

Trains a causal LM on prompt/response or conversation records (loss on assistant tokens, InstructGPT-style SFT,
Ouyang et al. 2022). With no --data.path it uses built-in demonstrations from the synthetic task world and the
tiny preset, and finishes in about a minute on a CPU. `--help` lists every option and its default.
"""
from __future__ import annotations

import dataclasses
import functools
import sys

import jax

from rlhf_jax.config_cli import parse_cli
from rlhf_jax.runner import (
    STOPPED,
    CheckpointSpec,
    DataSpec,
    EvalOptions,
    RunOptions,
    check_row_length,
    checkpoint_defaults,
    eval_hook,
    eval_summary,
    finish_report,
    init_model,
    load_data,
    make_run_mesh,
    run_stage,
    save_final,
    setup_error,
    start_run,
    trainable_state,
)
from rlhf_jax.train.optim import OptimConfig
from rlhf_jax.train.stages import NonFiniteLossError, SFTConfig, run_sft
from rlhf_jax.train.steps import sft_eval


@dataclasses.dataclass(frozen=True, kw_only=True)
class SFTExperiment(RunOptions, EvalOptions):
    """Supervised fine-tuning of a causal LM on chat records. With --init a Hugging Face folder,
    the learning rate defaults to TRL's SFT default, 2e-5, unless given."""

    out: str = "runs/sft"
    """Run directory (metrics, checkpoints, final params, report)."""
    init: str | None = None
    """Initial weights: a Hugging Face folder or a save_params folder; its config replaces the preset.
    None: random init."""
    data: DataSpec = DataSpec(num_demo=512, batch_size=16, seq_len=64)
    """Training records and batching."""
    sft: SFTConfig = SFTConfig(num_steps=150, log_every=10,
                               optim=OptimConfig(learning_rate=3e-3, schedule="cosine", warmup_steps=10))
    """SFT stage (steps, logging period, optimizer)."""
    checkpoint: CheckpointSpec = CheckpointSpec()
    """Checkpoint schedule and logging outputs."""


def main(argv=None) -> int:
    cfg = parse_cli(SFTExperiment, argv, prog="rlhf-jax sft")
    cfg = checkpoint_defaults(cfg, argv, "sft")
    try:
        mesh = make_run_mesh(cfg.mesh)          # first: multi-host init precedes any other JAX call
        out = start_run(cfg, cfg.out)
        data, tok = load_data(cfg.data, "sft", seed=cfg.seed, init=cfg.init)
        mc, params = init_model(cfg.preset, cfg.model, jax.random.key(cfg.seed), init=cfg.init,
                                tokenizer=tok)
        check_row_length(cfg.data.seq_len, mc)
        params = cfg.lora.base(params)
        state, lora = trainable_state(cfg, params, mc, cfg.sft.optim, cfg.sft.num_steps)
        base = {"base_params": params} if lora else {}
        evaluate = functools.partial(sft_eval, model_config=mc)
        evals = eval_hook("sft", cfg.eval_data, cfg.eval_every, evaluate, kind="sft",
                          spec=cfg.data, tok=tok, out=out, last_step=cfg.sft.num_steps,
                          lora=lora.get("lora"), base=params, args=())
    except (ValueError, OSError) as e:  # DataError is a ValueError
        return setup_error(e)
    try:
        state, history, finished = run_stage(
            "sft", lambda s, d, c, hooks: run_sft(s, d, c, model_config=mc, mesh=mesh, hooks=hooks, **lora, **base),
            state, data,
            cfg.sft, out=out, resume=cfg.resume, checkpoint=cfg.checkpoint, extra_hooks=evals,
            tokens_per_step=cfg.data.batch_size * cfg.data.seq_len)
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if finished:
        save_final(out, "sft", state.params, mc, lora.get("lora"), params, tokenizer=tok, init=cfg.init)
    finish_report(out, "sft", history, keys=("loss", "accuracy"),
                  summary={"finished": finished, "model": cfg.init or cfg.preset, "data": cfg.data.path or "demo",
                           **eval_summary(evals)},
                  data=data)
    return 0 if finished else STOPPED


if __name__ == "__main__":
    raise SystemExit(main())
