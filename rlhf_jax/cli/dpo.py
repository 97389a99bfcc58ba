"""DPO: `rlhf-jax dpo [--data.path PAIRS.jsonl] [--init SFT_FOLDER] [--dpo.beta 0.1] [--out DIR]`.

Direct preference optimisation (Rafailov et al. 2023) and its variants (IPO, hinge, robust/conservative DPO)
against a frozen reference: the initial weights (usually the SFT model). With no --data.path it uses built-in
pairs from the synthetic task world. `--help` lists every option and its default.
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
from rlhf_jax.train.stages import DPOConfig, NonFiniteLossError, run_dpo
from rlhf_jax.train.steps import dpo_eval


@dataclasses.dataclass(frozen=True, kw_only=True)
class DPOExperiment(RunOptions, EvalOptions):
    """Direct preference optimisation of a policy against a frozen reference. With --init a Hugging Face folder,
    the learning rate defaults to TRL's DPO default, 1e-6, unless given."""

    out: str = "runs/dpo"
    """Run directory (metrics, checkpoints, final params, report)."""
    init: str | None = None
    """Policy and reference weights (usually the SFT model): a Hugging Face or save_params folder.
    None: random init (a demo only)."""
    data: DataSpec = DataSpec(num_demo=512, batch_size=16, seq_len=64)
    """Preference records ({prompt, chosen, rejected}, HH-RLHF transcripts, ...) and batching."""
    dpo: DPOConfig = DPOConfig(num_steps=100, log_every=10,
                               optim=OptimConfig(learning_rate=1e-3, schedule="cosine", warmup_steps=10))
    """DPO stage (steps, beta, loss type, optimizer)."""
    checkpoint: CheckpointSpec = CheckpointSpec()
    """Checkpoint schedule and logging outputs."""


def main(argv=None) -> int:
    cfg = parse_cli(DPOExperiment, argv, prog="rlhf-jax dpo")
    cfg = checkpoint_defaults(cfg, argv, "dpo")
    try:
        mesh = make_run_mesh(cfg.mesh)          # first: multi-host init precedes any other JAX call
        out = start_run(cfg, cfg.out)
        data, tok = load_data(cfg.data, "preference", seed=cfg.seed, init=cfg.init)
        mc, params = init_model(cfg.preset, cfg.model, jax.random.key(cfg.seed), init=cfg.init,
                                tokenizer=tok)
        check_row_length(cfg.data.seq_len, mc)
        # On the device once (a no-op for device arrays); the train state makes its own copy to donate.
        ref_params = jax.device_put(cfg.lora.base(params))
        state, lora = trainable_state(cfg, ref_params, mc, cfg.dpo.optim, cfg.dpo.num_steps)
        evaluate = functools.partial(dpo_eval, model_config=mc, beta=cfg.dpo.beta, loss_type=cfg.dpo.loss_type,
                                     label_smoothing=cfg.dpo.label_smoothing, reference_free=cfg.dpo.reference_free,
                                     rpo_alpha=cfg.dpo.rpo_alpha, simpo_gamma=cfg.dpo.simpo_gamma,
                                     orpo_lambda=cfg.dpo.orpo_lambda)
        evals = eval_hook("dpo", cfg.eval_data, cfg.eval_every, evaluate, kind="preference",
                          spec=cfg.data, tok=tok, out=out, last_step=cfg.dpo.num_steps,
                          lora=lora.get("lora"), base=ref_params, args=(ref_params,))
    except (ValueError, OSError) as e:  # DataError is a ValueError
        return setup_error(e)
    try:
        state, history, finished = run_stage(
            "dpo", lambda s, d, c, hooks: run_dpo(s, d, c, model_config=mc, ref_params=ref_params, mesh=mesh,
                                                  hooks=hooks, **lora),
            state, data, cfg.dpo, out=out, resume=cfg.resume, checkpoint=cfg.checkpoint, extra_hooks=evals,
            samples_per_step=cfg.data.batch_size)
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if finished:
        save_final(out, "dpo", state.params, mc, lora.get("lora"), ref_params, tokenizer=tok, init=cfg.init)
    finish_report(out, "dpo", history, keys=("loss", "rewards/accuracies", "rewards/margins"),
                  summary={"finished": finished, "model": cfg.init or cfg.preset, "beta": cfg.dpo.beta,
                           "loss_type": cfg.dpo.loss_type, "data": cfg.data.path or "demo",
                           **eval_summary(evals)}, data=data)
    return 0 if finished else STOPPED


if __name__ == "__main__":
    raise SystemExit(main())
