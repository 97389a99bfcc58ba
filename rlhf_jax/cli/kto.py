"""KTO: `rlhf-jax kto [--data.path FEEDBACK.jsonl] [--init SFT_FOLDER] [--kto.beta 0.1] [--out DIR]`.

Kahneman-Tversky optimisation (Ethayarajh et al. 2024) on unpaired feedback, {prompt, completion, label: true|false}
records (or preference pairs with `--data.kind preference`, each split into a desirable and an undesirable
record), against a frozen reference: the initial weights (usually the SFT model). With no --data.path it uses the
built-in labelled pairs of the synthetic task world, split the same way. `--help` lists every option and its
default.
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
from rlhf_jax.train.stages import KTOConfig, NonFiniteLossError, run_kto
from rlhf_jax.train.steps import kto_eval


@dataclasses.dataclass(frozen=True, kw_only=True)
class KTOExperiment(RunOptions, EvalOptions):
    """KTO of a policy on unpaired desirable / undesirable feedback against a frozen reference. With --init a
    Hugging Face folder, the learning rate defaults to TRL's KTO default, 1e-6, unless given."""

    out: str = "runs/kto"
    """Run directory (metrics, checkpoints, final params, report)."""
    init: str | None = None
    """Policy and reference weights (usually the SFT model): a Hugging Face or save_params folder.
    None: random init (a demo only)."""
    data: DataSpec = DataSpec(num_demo=256, batch_size=16, seq_len=64)
    """Unpaired records ({prompt, completion, label}) or preference pairs (--data.kind preference), batching."""
    kto: KTOConfig = KTOConfig(num_steps=100, log_every=10,
                               optim=OptimConfig(learning_rate=1e-3, schedule="cosine", warmup_steps=10))
    """KTO stage (steps, beta, desirable / undesirable weights, optimizer)."""
    checkpoint: CheckpointSpec = CheckpointSpec()
    """Checkpoint schedule and logging outputs."""


def main(argv=None) -> int:
    cfg = parse_cli(KTOExperiment, argv, prog="rlhf-jax kto")
    cfg = checkpoint_defaults(cfg, argv, "kto")
    try:
        mesh = make_run_mesh(cfg.mesh)          # first: multi-host init precedes any other JAX call
        out = start_run(cfg, cfg.out)
        data, tok = load_data(cfg.data, "unpaired", seed=cfg.seed, init=cfg.init)
        mc, params = init_model(cfg.preset, cfg.model, jax.random.key(cfg.seed), init=cfg.init,
                                tokenizer=tok)
        check_row_length(cfg.data.seq_len, mc)
        ref_params = jax.device_put(cfg.lora.base(params))
        state, lora = trainable_state(cfg, ref_params, mc, cfg.kto.optim, cfg.kto.num_steps)
        evaluate = functools.partial(kto_eval, model_config=mc, beta=cfg.kto.beta,
                                     desirable_weight=cfg.kto.desirable_weight,
                                     undesirable_weight=cfg.kto.undesirable_weight)
        evals = eval_hook("kto", cfg.eval_data, cfg.eval_every, evaluate, kind="unpaired",
                          spec=cfg.data, tok=tok, out=out, last_step=cfg.kto.num_steps,
                          lora=lora.get("lora"), base=ref_params, args=(ref_params,))
    except (ValueError, OSError) as e:  # DataError is a ValueError
        return setup_error(e)
    try:
        state, history, finished = run_stage(
            "kto", lambda s, d, c, hooks: run_kto(s, d, c, model_config=mc, ref_params=ref_params, mesh=mesh,
                                                  hooks=hooks, **lora),
            state, data, cfg.kto, out=out, resume=cfg.resume, checkpoint=cfg.checkpoint, extra_hooks=evals,
            samples_per_step=cfg.data.batch_size)
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if finished:
        save_final(out, "kto", state.params, mc, lora.get("lora"), ref_params, tokenizer=tok, init=cfg.init)
    finish_report(out, "kto", history, keys=("loss", "kl", "rewards/chosen", "rewards/rejected"),
                  summary={"finished": finished, "model": cfg.init or cfg.preset, "beta": cfg.kto.beta,
                           "data": cfg.data.path or "demo",
                           **eval_summary(evals)}, data=data)
    return 0 if finished else STOPPED


if __name__ == "__main__":
    raise SystemExit(main())
