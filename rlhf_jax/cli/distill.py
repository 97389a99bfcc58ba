"""Distillation: `rlhf-jax distill --teacher DIR [--init STUDENT] [--data.path SFT.jsonl] [--distill.lmbda 0.5]
[--distill.beta 0.5] [--distill.temperature 0.9] [--out DIR]`.

Trains a student toward a teacher of the same vocabulary (any width or depth) on the prompts of SFT records:
each step, with probability `--distill.lmbda` the student answers the prompts itself (on-policy), else the
records' responses are used; the teacher scores the same tokens and the student follows a divergence between the
two next-token distributions (`--distill.beta`: 0 forward KL, 1 reverse KL, between GKD's generalised JSD), or with
`--distill.objective kl_reward` a policy gradient on the per-token reward -(log pi_s - log pi_t). See
`rlhf_jax/train/distill.py` and docs/distill.md. `--teacher` is a run's `final/` folder or a Hugging Face folder;
`--init` the student (a preset when unset). With no --data.path it uses built-in demonstrations of the synthetic
task world. `--help` lists every option and its default.
"""
from __future__ import annotations

import dataclasses
import sys

import jax

from rlhf_jax.config_cli import parse_cli
from rlhf_jax.generation import SamplingConfig
from rlhf_jax.runner import (
    STOPPED,
    CheckpointSpec,
    DataSpec,
    RunOptions,
    checkpoint_defaults,
    finish_report,
    init_model,
    load_data,
    make_run_mesh,
    run_stage,
    save_final,
    setup_error,
    start_run,
    trainable_state,
    with_tokenizer_ids,
)
from rlhf_jax.train.distill import DistillConfig, check_vocabularies, run_distill, sft_to_distill_batch
from rlhf_jax.train.optim import OptimConfig
from rlhf_jax.train.stages import NonFiniteLossError

@dataclasses.dataclass(frozen=True, kw_only=True)
class DistillExperiment(RunOptions):
    """Distillation of a teacher into a student (GKD, on-policy distillation, supervised KD). With --init a Hugging
    Face folder, the learning rate defaults to TRL's GKD default, 2e-5, unless given."""

    out: str = "runs/distill"
    """Run directory (metrics, checkpoints, final params, report)."""
    init: str | None = None
    """The student's initial weights: a Hugging Face or save_params folder (a run's final/). None: a fresh model of
    --preset."""
    teacher: str | None = None
    """The teacher (required): a run's final/ folder or a Hugging Face folder, with the student's vocabulary."""
    data: DataSpec = DataSpec(num_demo=256, seq_len=64)
    """SFT records (prompts and their responses) and the bucket length; the batch size is distill.batch_size."""
    distill: DistillConfig = DistillConfig(num_steps=20, log_every=5, batch_size=4, max_prompt_len=48,
                                           sampling=SamplingConfig(max_new_tokens=16),
                                           optim=OptimConfig(learning_rate=1e-3))
    """Distillation stage (lmbda, beta, temperature, objective, teacher_topk, prompt and answer lengths,
    optimizer)."""
    checkpoint: CheckpointSpec = CheckpointSpec(save_every=10)
    """Checkpoint schedule and logging outputs."""


def _check_lengths(c: DistillConfig, mc, name: str):
    if c.max_prompt_len + c.sampling.max_new_tokens > mc.max_seq_len:
        raise ValueError(f"--distill.max-prompt-len {c.max_prompt_len} + --distill.sampling.max-new-tokens "
                         f"{c.sampling.max_new_tokens} exceeds the {name}'s max_seq_len {mc.max_seq_len}; lower one "
                         "of them")


def main(argv=None) -> int:
    cfg = checkpoint_defaults(parse_cli(DistillExperiment, argv, prog="rlhf-jax distill"), argv, "distill")
    try:
        if cfg.teacher is None:
            raise ValueError("--teacher DIR is required: the teacher's folder (a run's final/ or a Hugging Face "
                             "folder)")
        if cfg.data.pack:
            raise ValueError("--data.pack: distillation reads one prompt and response per row; drop --data.pack")
        mesh = make_run_mesh(cfg.mesh)          # first: multi-host init precedes any other JAX call
        out = start_run(cfg, cfg.out)
        c = cfg.distill
        data, tok = load_data(cfg.data, "sft", seed=cfg.seed, batch_size=c.batch_size, init=cfg.init)
        c = with_tokenizer_ids(c, tok, "distill")
        k_student, k_teacher = jax.random.split(jax.random.key(cfg.seed))
        mc, params = init_model(cfg.preset, cfg.model, k_student, init=cfg.init, tokenizer=tok)
        try:
            teacher_mc, teacher = init_model(cfg.preset, None, k_teacher, init=cfg.teacher)
        except ValueError as e:         # init_model names its folder --init; here it is the teacher's
            raise ValueError(str(e).replace(f"--init {cfg.teacher}", f"--teacher {cfg.teacher}")) from None
        try:
            check_vocabularies(mc, teacher_mc)
        except ValueError as e:
            raise ValueError(f"--teacher {cfg.teacher}: {e}") from None
        _check_lengths(c, mc, "student")
        _check_lengths(c, teacher_mc, "teacher")
        teacher = jax.device_put(teacher)
        state, lora = trainable_state(cfg, params, mc, c.optim, c.num_steps)
        base = {"base_params": jax.device_put(params)} if lora else {}
    except (ValueError, OSError) as e:  # DataError is a ValueError
        return setup_error(e)

    def batches(d):
        for b in d:
            yield sft_to_distill_batch(b, max_prompt_len=c.max_prompt_len, max_new_tokens=c.sampling.max_new_tokens,
                                       pad_id=tok.pad_id)

    try:
        state, history, finished = run_stage(
            "distill", lambda s, d, dc, hooks: run_distill(s, batches(d), dc, model_config=mc, teacher_params=teacher,
                                                          teacher_config=teacher_mc, mesh=mesh, hooks=hooks,
                                                          **lora, **base),
            state, data, c, out=out, resume=cfg.resume, checkpoint=cfg.checkpoint, samples_per_step=c.batch_size)
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if finished:
        save_final(out, "distill", state.params, mc, lora.get("lora"), params, tokenizer=tok, init=cfg.init)
    finish_report(out, "distill", history, keys=("loss", "kl_forward", "kl_reverse"),
                  summary={"finished": finished, "student": cfg.init or cfg.preset, "teacher": cfg.teacher,
                           "lmbda": c.lmbda, "beta": c.beta, "objective": c.objective,
                           "data": cfg.data.path or "demo"}, data=data)
    return 0 if finished else STOPPED


if __name__ == "__main__":
    raise SystemExit(main())
