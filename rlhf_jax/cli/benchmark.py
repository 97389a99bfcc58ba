"""Step-time, throughput, MFU and memory benchmark of every stage step and of generation.

For SFT, reward, DPO, generation and one PPO iteration (rollout and update timed apart) on a named preset and
batch/sequence shape, it reports: compile time (`jax.jit(f).lower(...).compile()`), the median of `--steps`
timed calls (each call blocked with `jax.block_until_ready`; a donated state is fed back in), throughput,
model FLOP/s and MFU, and device memory. Inputs are synthetic random tokens (no data files, no downloads).

Model FLOPs (Kaplan et al. 2020; PaLM, Chowdhery et al. 2022, appendix B), per token of a length-T row:
    N      = non-embedding matmul params + head matmul (V*D LM head, or D for a scalar reward/value head);
             embedding lookups, norms, biases and the softmax are not counted
    attn   = 4 * L * T * N_heads * H forward (QK^T and AV), halved for causal masks (`--attn-flops causal`,
             the work a causal kernel must do; `full` gives PaLM's 12 L H Q T for training)
    train  = 6N + 3*attn per trained token (forward + backward);  forward-only = 2N + attn
    decode = 2N + 4 * L * (P+i) * N_heads * H for the i-th new token after a P-token prompt (plus the prefill)
DPO counts policy train + reference forward on 2*pairs*T tokens; the reward model trains on 2*pairs*T tokens;
a PPO rollout counts sampling + policy, reference, value and reward forwards over B*(P+N) tokens; the update
counts epochs * (policy + value train) over B*(P+N) tokens; in both the LM head counts only at the B*N
response positions (the only ones PPO needs). MFU = achieved model FLOP/s / peak, where the peak
is a measured n^3 matmul in the compute dtype (8192 on GPU) and, when the device is known, the spec sheet's.

    rlhf-jax benchmark                                  # CPU: tiny preset, quick shapes
    rlhf-jax benchmark --preset gpt2-124m --json bench.json
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import platform
import statistics
import sys
import time
import typing
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.config_cli import field_docs
from rlhf_jax.generation import SamplingConfig, sample
from rlhf_jax.lora import LoraConfig, dequantize_params, init_lora, quantize_base
from rlhf_jax.models import init_params
from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.transformer import decode_attention_impl, segment_attention_impl
from rlhf_jax.train.distill import DistillConfig, distill_step
from rlhf_jax.train.grpo import GRPOConfig, grpo_sample, grpo_update
from rlhf_jax.train.optim import OptimConfig
from rlhf_jax.train.ppo import PPOConfig, init_ppo_state, ppo_update, rollout
from rlhf_jax.train.state import create_train_state, with_score_head
from rlhf_jax.train.steps import dpo_step, kto_step, reward_step, sft_step

BENCHMARKS = ("sft", "reward", "dpo", "simpo", "orpo", "kto", "generate", "ppo", "grpo", "lora_sft", "lora_dpo",
              "distill", "qlora_sft", "qlora_dpo", "multiturn")
ROW_KEYS = ("name", "shape", "compile_s", "median_ms", "min_ms", "steps", "throughput", "throughput_unit",
            "tokens_per_step", "flops_per_step", "tflops_per_s", "mfu", "mfu_spec", "peak_bytes",
            "compiled_bytes")
"""Keys of every result row in the JSON report (None where a number is not available on the device)."""
SPEC_BF16_PEAK = {"H100 PCIe": 756e12, "H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}
"""Dense bf16 tensor-core peaks from NVIDIA's spec sheets, matched as substrings of `device_kind`."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class BenchConfig:
    """What to benchmark, on which model and shapes."""

    preset: str = "tiny"
    """ModelConfig preset (tiny, tiny-llama, gpt2-124m, gpt2-355m, gpt2-774m, llama-1b); random init."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Compute dtype (params stay float32); auto = bfloat16 on GPU/TPU, float32 on CPU."""
    benchmarks: str = "sft,reward,dpo,simpo,orpo,kto,generate,ppo,grpo,lora_sft,lora_dpo"
    """Comma list of benchmarks to run (also: distill, a distillation step beside the sft row's; qlora_sft,
    qlora_dpo: the lora rows over an NF4 base; multiturn: multi-turn rollouts beside single-turn sampling)."""
    sft_batch: int = 8
    """SFT rows per step."""
    sft_seq: int = 1024
    """SFT tokens per row."""
    reward_pairs: int = 32
    """Reward model preference pairs per step (chosen and rejected rows share one forward)."""
    reward_seq: int = 512
    """Reward model tokens per row."""
    dpo_pairs: int = 32
    """DPO preference pairs per step (2 * pairs rows through policy and reference)."""
    dpo_seq: int = 512
    """DPO tokens per row."""
    gen_batches: str = "64,256"
    """Comma list of generation batch sizes."""
    gen_prompt: int = 128
    """Prompt tokens per row for generation."""
    gen_new: int = 256
    """New tokens per row (no EOS: every row generates all of them)."""
    gen_stages: int | None = None
    """Decode loops per generation (rlhf_jax.generation.decode_stages): None = 4 on GPU, 1 elsewhere."""
    ppo_prompts: int = 64
    """PPO rollout batch (episodes per iteration)."""
    ppo_prompt_len: int = 128
    """PPO prompt tokens."""
    ppo_new: int = 256
    """PPO response tokens."""
    ppo_epochs: int = 4
    """PPO epochs over each rollout batch."""
    ppo_minibatches: int = 4
    """PPO minibatches per epoch."""
    grpo_prompts: int = 64
    """GRPO prompts per iteration (each answered num_generations times)."""
    grpo_generations: int = 8
    """GRPO group size G."""
    grpo_minibatches: int = 8
    """GRPO minibatches per update (prompts * G rows split into this many optimizer steps)."""
    mt_episodes: int = 64
    """multiturn: episodes per rollout."""
    mt_turns: int = 4
    """multiturn: policy turns per episode (a scripted user answers each one)."""
    mt_new: int = 64
    """multiturn: tokens per policy turn (the prompt is gen_prompt tokens)."""
    lora_rank: int = 16
    """Adapter rank of the lora_sft / lora_dpo rows (every projection targeted, alpha = 2 * rank)."""
    remat: Literal["none", "full", "dots"] = "none"
    """Per-block rematerialisation (ModelConfig.remat)."""
    attention_impl: Literal["xla", "cudnn"] | None = None
    """jax.nn.dot_product_attention implementation (ModelConfig.attention_impl); cudnn needs bf16 on GPU."""
    decode_attention: Literal["reference", "pallas"] | None = None
    """Attention of one-token decode steps (ModelConfig.decode_attention): pallas = flash-decoding kernel;
    None = pallas on one GPU (power-of-two heads), reference elsewhere."""
    segment_attention: Literal["dense", "pallas"] | None = None
    """Training attention of rows with segment_ids (ModelConfig.segment_attention): dense [B,1,T,T] mask, or the
    Pallas flash-attention kernel over [B,T] ids; None = dense."""
    compute_copy: bool = False
    """SFT, reward, DPO, KTO states keep a copy of the params in the compute dtype (TrainState.create's
    compute_dtype), refreshed by the optimizer update, instead of casting the float32 params every step."""
    scan_unroll: int | None = None
    """Blocks per iteration of the scan over layers (ModelConfig.scan_unroll): None = all on GPU/TPU, 1 on CPU."""
    logits_chunk: str = "auto"
    """LM head + loss (ModelConfig.logits_chunk): auto, None (full float32 logits) or a vocabulary chunk size."""
    segment_ids: bool = True
    """Give training batches segment_ids (as real batches have): an explicit [B,1,T,T] mask, not is_causal."""
    attn_flops: Literal["causal", "full"] = "causal"
    """Attention FLOP convention: causal (half of the T x T scores) or full (PaLM's 12 L H Q T)."""
    steps: int = 10
    """Timed calls per benchmark (the median is reported)."""
    warmup: int = 2
    """Untimed calls after compilation."""
    peak_size: int = 0
    """n of the n^3 matmul that measures the peak FLOP/s; 0 = 8192 on GPU/TPU, 1024 on CPU."""
    seed: int = 0
    """Seed of the random params and tokens."""
    json: str | None = None
    """Write the full report to this JSON file."""
    quick_cpu: bool = False
    """Shrink every shape left at its default to a seconds-long CPU size (always on for tiny* presets)."""
    profile: int = 0
    """If > 0: trace 3 more calls of each benchmark with jax.profiler and print its N costliest device ops."""


QUICK = dict(sft_batch=2, sft_seq=64, reward_pairs=2, reward_seq=64, dpo_pairs=2, dpo_seq=64, gen_batches="2",
             gen_prompt=16, gen_new=16, ppo_prompts=4, ppo_prompt_len=16, ppo_new=16, ppo_epochs=2,
             ppo_minibatches=2, grpo_prompts=2, grpo_generations=2, grpo_minibatches=2)


def resolve(cfg: BenchConfig) -> BenchConfig:
    """Apply --quick-cpu (or a tiny* preset) to shape fields still at their defaults; resolve dtype=auto."""
    changes = {}
    if cfg.quick_cpu or cfg.preset.startswith("tiny"):
        defaults = {f.name: f.default for f in dataclasses.fields(BenchConfig)}
        changes = {k: v for k, v in QUICK.items() if getattr(cfg, k) == defaults[k]} | {"quick_cpu": True}
    if cfg.dtype == "auto":
        changes["dtype"] = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    unknown = set(cfg.benchmarks.split(",")) - set(BENCHMARKS)
    if unknown:
        raise ValueError(f"--benchmarks: unknown {sorted(unknown)}; choose from {','.join(BENCHMARKS)}")
    return dataclasses.replace(cfg, **changes)


# ---------------------------------------------------------------------------------------------------- FLOPs
def matmul_params(config: ModelConfig, *, head: Literal["lm", "scalar", "none"] = "lm") -> int:
    """N of the FLOP formulas: non-embedding matmul params plus the head (V*D LM head, D scalar head, or none)."""
    head_size = {"lm": config.vocab_size, "scalar": 1, "none": 0}[head]
    return config.num_params(include_embeddings=False) + config.d_model * head_size


def attention_flops(config: ModelConfig, seq: int, *, causal: bool = True) -> float:
    """Forward attention FLOPs per token of a length-`seq` row: 4 L T N H (QK^T and AV), halved if causal."""
    full = 4 * config.num_layers * seq * config.num_heads * config.head_size
    return full / 2 if causal else float(full)


def train_flops(config, tokens, seq, *, head="lm", causal=True) -> float:
    """Forward + backward model FLOPs: tokens * (6N + 3 attn)."""
    return tokens * (6 * matmul_params(config, head=head) + 3 * attention_flops(config, seq, causal=causal))


def lora_train_flops(config, tokens, seq, *, causal=True) -> float:
    """LoRA training FLOPs: the frozen matrices need no weight gradients, so tokens * (4N + 3 attn); the
    adapters' own products (2 * r * (in + out) per target, a fraction of a percent) are not counted."""
    return train_flops(config, tokens, seq, causal=causal) - 2 * tokens * matmul_params(config)


def lora_sizes(config: ModelConfig, rank: int) -> dict:
    """Trainable parameters and AdamW state (two f32 moments) of full fine-tuning against LoRA on every projection,
    from the shapes alone (no allocation)."""
    lora = LoraConfig(rank=rank, alpha=2.0 * rank)
    params = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    adapters = jax.eval_shape(lambda p: init_lora(p, config, lora, jax.random.key(0)), params)
    full, low = (sum(x.size for x in jax.tree.leaves(t)) for t in (params, adapters))
    return {"rank": rank, "base_params": full, "adapter_params": low, "trainable_fraction": low / full,
            "adam_bytes_full": 8 * full, "adam_bytes_lora": 8 * low, "adam_ratio": low / full}


def forward_flops(config, tokens, seq, *, head="lm", causal=True) -> float:
    """Forward-only model FLOPs: tokens * (2N + attn)."""
    return tokens * (2 * matmul_params(config, head=head) + attention_flops(config, seq, causal=causal))


def generate_flops(config, batch, prompt, new, *, causal=True) -> float:
    """Prefill of B*P tokens plus N decode steps; new token i attends to P + i cached keys."""
    per_key = 4 * config.num_layers * config.num_heads * config.head_size
    decode = batch * (new * 2 * matmul_params(config) + per_key * (new * prompt + new * (new - 1) / 2))
    return forward_flops(config, batch * prompt, prompt, causal=causal) + decode


def ppo_flops(config, batch, prompt, new, epochs, *, causal=True) -> tuple[float, float]:
    """(rollout FLOPs, update FLOPs) of one PPO iteration with four models of the same architecture.

    The trunks run over all B*(P+N) tokens; the LM head is needed only at the B*N positions that predict the
    response (the current code computes it at the prompt positions too: that work is not counted).
    """
    tokens, responses, T = batch * (prompt + new), batch * new, prompt + new
    head = 2 * config.vocab_size * config.d_model               # forward FLOPs of the LM head per position
    lm_fwd = forward_flops(config, tokens, T, head="none", causal=causal) + head * responses
    scoring = 2 * lm_fwd + 2 * forward_flops(config, tokens, T, head="scalar", causal=causal)
    lm_train = train_flops(config, tokens, T, head="none", causal=causal) + 3 * head * responses
    update = epochs * (lm_train + train_flops(config, tokens, T, head="scalar", causal=causal))
    return generate_flops(config, batch, prompt, new, causal=causal) + scoring, update


def grpo_flops(config, rows, prompt, new, *, causal=True) -> float:
    """Update FLOPs of one GRPO iteration (one pass, no reference): the trainer's log-probs of the samples (a
    forward) and one training step, over B*G*(P+N) tokens with the LM head at the response positions only."""
    tokens, responses, T = rows * (prompt + new), rows * new, prompt + new
    head = 2 * config.vocab_size * config.d_model
    forward = forward_flops(config, tokens, T, head="none", causal=causal) + head * responses
    return forward + train_flops(config, tokens, T, head="none", causal=causal) + 3 * head * responses


def distill_flops(config, batch, prompt, new, *, teacher=None, causal=True) -> float:
    """FLOPs of one teacher-forced distillation step over B*(P+N) tokens: the student's training step and the
    teacher's forward (`teacher`: its config, None for the student's), the LM heads at the B*N response positions
    only; the divergence over the vocabulary (O(V) per position) is not counted."""
    teacher = config if teacher is None else teacher
    tokens, responses, T = batch * (prompt + new), batch * new, prompt + new
    head = lambda c: 2 * c.vocab_size * c.d_model  # noqa: E731
    student = train_flops(config, tokens, T, head="none", causal=causal) + 3 * head(config) * responses
    return student + forward_flops(teacher, tokens, T, head="none", causal=causal) + head(teacher) * responses


# ---------------------------------------------------------------------------------------------- measurement
def measure_peak_flops(dtype, n: int, *, reps: int = 5, calls: int = 10) -> float:
    """FLOP/s of an n^3 matmul in `dtype`: median over `reps` of `calls` back-to-back calls (one block each)."""
    ka, kb = jax.random.split(jax.random.PRNGKey(0))
    a, b = jax.random.normal(ka, (n, n), dtype), jax.random.normal(kb, (n, n), dtype)
    f = jax.jit(lambda a, b: a @ b)
    jax.block_until_ready(f(a, b))
    rates = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready([f(a, b) for _ in range(calls)])
        rates.append(2 * n ** 3 * calls / (time.perf_counter() - t0))
    return statistics.median(rates)


def _compile(fn, args, *, donate: bool):
    """(compiled, seconds) of `jax.jit(fn).lower(*args).compile()`, the first argument donated if `donate`."""
    t0 = time.perf_counter()
    compiled = jax.jit(fn, donate_argnums=(0,) if donate else ()).lower(*args).compile()
    return compiled, time.perf_counter() - t0


def _time(compiled, args, *, steps: int, warmup: int, carry: bool):
    """Per-call seconds of `steps` timed calls after `warmup`; `carry` feeds output[0] back as args[0]."""
    times, out = [], None
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        out = jax.block_until_ready(compiled(*args))
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        if carry:
            args = (out[0], *args[1:])
    return times, out


def _compiled_bytes(compiled) -> int | None:
    """Arguments + outputs + temporaries - aliased (donated) bytes of one executable, if XLA reports them."""
    try:
        m = compiled.memory_analysis()
        return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                   - m.alias_size_in_bytes)
    except Exception:  # not every backend implements memory_analysis
        return None


def _peak_bytes() -> int | None:
    """Process-wide peak device memory so far (GPU/TPU allocator); None on CPU."""
    stats = jax.devices()[0].memory_stats()
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


_OP_KINDS = (("matmul", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "dot")),
             ("attention", ("cudnn", "fmha", "flash", "attention")))


def _op_kind(kernel: str) -> str:
    """A device kernel's category from its name: matmul, attention, or other (fusions, copies, reductions)."""
    lower = kernel.lower()
    return next((kind for kind, keys in _OP_KINDS if any(k in lower for k in keys)), "other")


def profile_ops(run, *, calls: int) -> dict:
    """Device time per call of every op while `run()` makes `calls` calls, from a jax.profiler trace.

    Device planes (GPU/TPU) are used when the trace has any: on GPU the kernels of the "Stream" lines, summed by
    (HLO op, kernel name); on TPU the "XLA Ops" line. Without a device plane (CPU), the host's events that carry
    an `hlo_op` stat (nested ops are then counted inside their parents too). Returns {"ops": the 100 costliest
    [{hlo_op, kernel, kind, ms, count}] per call, "kinds": {kind: ms per call}, "total_ms": summed op time per
    call, "source": "device" or "host"}.
    """
    import glob
    import tempfile

    from jax.profiler import ProfileData

    merged: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp):
            run()
        (path,) = glob.glob(f"{tmp}/**/*.xplane.pb", recursive=True)
        planes = list(ProfileData.from_file(path).planes)
        device = [p for p in planes if p.name.startswith("/device:")]
        for plane in device or planes:
            lines = list(plane.lines)
            if device:
                streams = [ln for ln in lines if ln.name.startswith("Stream")]
                lines = streams or [ln for ln in lines if ln.name == "XLA Ops"]
            for line in lines:
                for ev in line.events:
                    stats = dict(ev.stats)
                    if not device and "hlo_op" not in stats:
                        continue
                    key = (str(stats.get("hlo_op", "")), ev.name)
                    ns, n = merged.get(key, (0.0, 0))
                    merged[key] = (ns + ev.duration_ns, n + 1)
    rows = sorted(({"hlo_op": op, "kernel": kernel, "kind": _op_kind(kernel), "ms": ns / 1e6 / calls,
                    "count": n // calls} for (op, kernel), (ns, n) in merged.items()), key=lambda r: -r["ms"])
    kinds: dict[str, float] = {}
    for r in rows:
        kinds[r["kind"]] = kinds.get(r["kind"], 0.0) + r["ms"]
    return {"ops": rows[:100], "kinds": kinds, "total_ms": sum(kinds.values()),
            "source": "device" if device else "host"}


def format_profile(prof: dict, median_ms: float, top: int) -> str:
    """The `top` costliest ops of a `profile_ops` result, and the time per kind, as text."""
    total = prof["total_ms"] or float("nan")
    kinds = ", ".join(f"{k} {v:.2f} ms ({100 * v / total:.0f}%)" for k, v in sorted(prof["kinds"].items(),
                                                                                   key=lambda kv: -kv[1]))
    lines = [f"  profile ({prof['source']} ops): {total:.2f} ms of ops per call (median call {median_ms:.2f} ms); "
             f"{kinds}"]
    for r in prof["ops"][:top]:
        lines.append(f"  {r['ms']:8.3f} ms {100 * r['ms'] / total:5.1f}%  x{r['count']:<4} {r['kind']:<9} "
                     f"{r['hlo_op'][:40]:<40} {r['kernel'][:70]}")
    return "\n".join(lines)


class _Bench:
    """Runs benchmarks and collects result rows; `peaks` = (measured, spec or None) FLOP/s."""

    def __init__(self, cfg: BenchConfig, model: ModelConfig, peaks):
        self.cfg, self.model, self.peaks, self.rows = cfg, model, peaks, []
        self.rng = np.random.default_rng(cfg.seed)
        self.key = jax.random.PRNGKey(cfg.seed)

    def next_key(self):
        self.key, sub = jax.random.split(self.key)
        return sub

    def measure(self, name, shape, fn, args, *, flops, tokens, unit, per_step, donate=False):
        """Compile, time and record one row; `per_step` = units (tokens/episodes) per call. Returns the output."""
        compiled, compile_s = _compile(fn, args, donate=donate)
        times, out = _time(compiled, args, steps=self.cfg.steps, warmup=self.cfg.warmup, carry=donate)
        row = self.record(name, shape, compile_s, times, flops=flops, tokens=tokens, unit=unit, per_step=per_step,
                          compiled_bytes=_compiled_bytes(compiled))
        if self.cfg.profile:
            args = (out[0], *args[1:]) if donate else args
            row["profile"] = profile_ops(lambda: _time(compiled, args, steps=3, warmup=0, carry=donate), calls=3)
            print(format_profile(row["profile"], row["median_ms"], self.cfg.profile), flush=True)
        return out, row

    def record(self, name, shape, compile_s, times, *, flops, tokens, unit, per_step, compiled_bytes):
        med = statistics.median(times)
        measured, spec = self.peaks
        row = dict(name=name, shape=shape, compile_s=compile_s, median_ms=1e3 * med, min_ms=1e3 * min(times),
                   steps=len(times), throughput=per_step / med, throughput_unit=unit, tokens_per_step=tokens,
                   flops_per_step=flops, tflops_per_s=flops / med / 1e12, mfu=flops / med / measured,
                   mfu_spec=None if spec is None else flops / med / spec, peak_bytes=_peak_bytes(),
                   compiled_bytes=compiled_bytes)
        self.rows.append(row)
        print(_format_row(row), flush=True)
        return row

    # -------------------------------------------------------------------------------------- inputs
    def tokens(self, *shape):
        return self.rng.integers(0, self.model.vocab_size, shape, dtype=np.int32)

    def sft_batch(self, B, T):
        ids = self.tokens(B, T + 1)
        batch = {"inputs": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": np.ones((B, T), np.float32),
                 "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy()}
        if self.cfg.segment_ids:
            batch["segment_ids"] = np.ones((B, T), np.int32)
        return jax.device_put(batch)

    def state(self, *, scalar_head=False):
        params = init_params(self.model, self.next_key())
        if scalar_head:
            params = with_score_head(params, self.model, self.next_key())
        return create_train_state(params, OptimConfig(), self.next_key(),
                                  compute_dtype=self.model.dtype if self.cfg.compute_copy else None)

    # ---------------------------------------------------------------------------------- benchmarks
    def sft(self):
        c, m, causal = self.cfg, self.model, self.cfg.attn_flops == "causal"
        B, T = c.sft_batch, c.sft_seq
        fn = functools.partial(sft_step, model_config=m)
        self.measure("sft", f"{B}x{T}", fn, (self.state(), self.sft_batch(B, T)), donate=True,
                     flops=train_flops(m, B * T, T, causal=causal), tokens=B * T, unit="tokens/s", per_step=B * T)

    def reward(self):
        c, m, causal = self.cfg, self.model, self.cfg.attn_flops == "causal"
        B, T = c.reward_pairs, c.reward_seq
        batch = {"chosen": self.sft_batch(B, T), "rejected": self.sft_batch(B, T)}
        fn = functools.partial(reward_step, model_config=m)
        self.measure("reward", f"{B}pairs x{T}", fn, (self.state(scalar_head=True), batch), donate=True,
                     flops=train_flops(m, 2 * B * T, T, head="scalar", causal=causal), tokens=2 * B * T,
                     unit="tokens/s", per_step=2 * B * T)

    def dpo(self):
        c, m, causal = self.cfg, self.model, self.cfg.attn_flops == "causal"
        B, T = c.dpo_pairs, c.dpo_seq
        batch = {"chosen": self.sft_batch(B, T), "rejected": self.sft_batch(B, T)}
        ref = init_params(m, self.next_key())
        flops = train_flops(m, 2 * B * T, T, causal=causal) + forward_flops(m, 2 * B * T, T, causal=causal)
        fn = functools.partial(dpo_step, model_config=m)
        self.measure("dpo", f"{B}pairs x{T}", fn, (self.state(), batch, ref), donate=True, flops=flops,
                     tokens=2 * B * T, unit="tokens/s", per_step=2 * B * T)

    def _reference_free(self, loss_type):
        """SimPO / ORPO through the DPO step: the shapes of `dpo`, no reference forward (not in the FLOPs)."""
        c, m, causal = self.cfg, self.model, self.cfg.attn_flops == "causal"
        B, T = c.dpo_pairs, c.dpo_seq
        batch = {"chosen": self.sft_batch(B, T), "rejected": self.sft_batch(B, T)}
        fn = functools.partial(dpo_step, model_config=m, loss_type=loss_type, beta=2.0)
        self.measure(loss_type, f"{B}pairs x{T}", fn, (self.state(), batch, None), donate=True,
                     flops=train_flops(m, 2 * B * T, T, causal=causal), tokens=2 * B * T, unit="tokens/s",
                     per_step=2 * B * T)

    def simpo(self):
        self._reference_free("simpo")

    def orpo(self):
        self._reference_free("orpo")

    def kto(self):
        """KTO on 2 * dpo_pairs unpaired rows of dpo_seq, each with its mismatched row (z0): the policy trains on
        the rows and runs forward only over the mismatched ones; the reference runs forward over both."""
        c, m, causal = self.cfg, self.model, self.cfg.attn_flops == "causal"
        B, T = 2 * c.dpo_pairs, c.dpo_seq
        batch = {"completion": self.sft_batch(B, T), "kl": self.sft_batch(B, T),
                 "desirable": jnp.arange(B) % 2 == 0, "valid": jnp.ones((B,), bool)}
        ref = init_params(m, self.next_key())
        flops = train_flops(m, B * T, T, causal=causal) + forward_flops(m, 3 * B * T, T, causal=causal)
        fn = functools.partial(kto_step, model_config=m)
        self.measure("kto", f"{B}rows x{T}", fn, (self.state(), batch, ref), donate=True, flops=flops,
                     tokens=2 * B * T, unit="tokens/s", per_step=2 * B * T)

    def _lora(self):
        return LoraConfig(rank=self.cfg.lora_rank, alpha=2.0 * self.cfg.lora_rank)

    def lora_sft(self):
        """SFT with LoRA adapters on every projection over a frozen base (same shapes as `sft`)."""
        c, m, causal = self.cfg, self.model, self.cfg.attn_flops == "causal"
        B, T, lora = c.sft_batch, c.sft_seq, self._lora()
        base = init_params(m, self.next_key())
        state = create_train_state(init_lora(base, m, lora, self.next_key()), OptimConfig(), self.next_key())
        fn = functools.partial(sft_step, model_config=m, lora=lora)
        self.measure("lora_sft", f"{B}x{T} r{lora.rank}", fn, (state, self.sft_batch(B, T), base), donate=True,
                     flops=lora_train_flops(m, B * T, T, causal=causal), tokens=B * T, unit="tokens/s",
                     per_step=B * T)

    def lora_dpo(self):
        """DPO with LoRA adapters: the base is the reference too (one copy of the weights)."""
        c, m, causal = self.cfg, self.model, self.cfg.attn_flops == "causal"
        B, T, lora = c.dpo_pairs, c.dpo_seq, self._lora()
        batch = {"chosen": self.sft_batch(B, T), "rejected": self.sft_batch(B, T)}
        base = init_params(m, self.next_key())
        state = create_train_state(init_lora(base, m, lora, self.next_key()), OptimConfig(), self.next_key())
        flops = lora_train_flops(m, 2 * B * T, T, causal=causal) + forward_flops(m, 2 * B * T, T, causal=causal)
        fn = functools.partial(dpo_step, model_config=m, lora=lora)
        self.measure("lora_dpo", f"{B}pairs x{T} r{lora.rank}", fn, (state, batch, base), donate=True,
                     flops=flops, tokens=2 * B * T, unit="tokens/s", per_step=2 * B * T)

    def _nf4_base(self, name):
        """A fresh base with its projection kernels in NF4 (`quantize_base`, double quantisation); prints the bytes
        it stores against the full-precision params."""
        full = init_params(self.model, self.next_key())
        base = quantize_base(full)
        size = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))  # noqa: E731
        print(f"  {name}: base stored in {size(base) / 2**20:.2f} MiB (NF4 projections) against "
              f"{size(full) / 2**20:.2f} MiB ({self.model.param_dtype})", flush=True)
        return base

    def qlora_sft(self):
        """lora_sft over an NF4 base (QLoRA): every step dequantises the projection kernels (`merge_lora`)."""
        c, m, causal = self.cfg, self.model, self.cfg.attn_flops == "causal"
        B, T, lora = c.sft_batch, c.sft_seq, self._lora()
        base = self._nf4_base("qlora_sft")
        state = create_train_state(init_lora(base, m, lora, self.next_key()), OptimConfig(), self.next_key())
        fn = functools.partial(sft_step, model_config=m, lora=lora)
        self.measure("qlora_sft", f"{B}x{T} r{lora.rank} nf4", fn, (state, self.sft_batch(B, T), base),
                     donate=True, flops=lora_train_flops(m, B * T, T, causal=causal), tokens=B * T, unit="tokens/s",
                     per_step=B * T)

    def qlora_dpo(self):
        """lora_dpo over an NF4 base: the step dequantises the base once and uses it as the adapters' base and as
        the reference (the reference forward applies the model to the base itself)."""
        c, m, causal = self.cfg, self.model, self.cfg.attn_flops == "causal"
        B, T, lora = c.dpo_pairs, c.dpo_seq, self._lora()
        batch = {"chosen": self.sft_batch(B, T), "rejected": self.sft_batch(B, T)}
        base = self._nf4_base("qlora_dpo")
        state = create_train_state(init_lora(base, m, lora, self.next_key()), OptimConfig(), self.next_key())
        flops = lora_train_flops(m, 2 * B * T, T, causal=causal) + forward_flops(m, 2 * B * T, T, causal=causal)

        def fn(state, batch, base):
            return dpo_step(state, batch, dequantize_params(base), model_config=m, lora=lora)

        self.measure("qlora_dpo", f"{B}pairs x{T} r{lora.rank} nf4", fn, (state, batch, base), donate=True,
                     flops=flops, tokens=2 * B * T, unit="tokens/s", per_step=2 * B * T)

    def _sample_args(self, params, B, P):
        return (params, jax.device_put(self.tokens(B, P)), jnp.ones((B, P), jnp.int32), self.next_key())

    def generate(self, name="generate", batches=None, prompt=None, new=None, params=None, temperature=1.0):
        c, m = self.cfg, self.model
        P, N = prompt or c.gen_prompt, new or c.gen_new
        params = init_params(m, self.next_key()) if params is None else params
        # eos_id=None: every row generates all N tokens, so the work per call is fixed.
        fn = functools.partial(sample, config=m, max_new_tokens=N, temperature=temperature, eos_id=None,
                               stages=c.gen_stages)
        rows = []
        for B in batches or [int(b) for b in c.gen_batches.split(",")]:
            rows.append(self.measure(name, f"{B}x({P}+{N})", fn, self._sample_args(params, B, P),
                                     flops=generate_flops(m, B, P, N, causal=c.attn_flops == "causal"),
                                     tokens=B * N, unit="new tokens/s", per_step=B * N)[1])
        return rows

    def ppo(self):
        """One PPO iteration: rollout and update timed separately, plus pure sampling at the same shape."""
        c, m = self.cfg, self.model
        B, P, N = c.ppo_prompts, c.ppo_prompt_len, c.ppo_new
        V = m.vocab_size
        # eos_id = V is never sampled: every response has exactly N tokens.
        pcfg = PPOConfig(batch_size=B, sampling=SamplingConfig(max_new_tokens=N, eos_id=V, pad_id=0),
                         num_epochs=c.ppo_epochs, num_minibatches=c.ppo_minibatches, num_steps=1)
        policy = init_params(m, self.next_key())
        reward = with_score_head(init_params(m, self.next_key()), m, self.next_key())
        state = init_ppo_state(policy, pcfg, model_config=m, rng=self.next_key(), reward_params=reward)
        roll_flops, update_flops = ppo_flops(m, B, P, N, c.ppo_epochs, causal=c.attn_flops == "causal")
        shape = f"{B}x({P}+{N})"
        (sample_row,) = self.generate("ppo/sample", [B], P, N, params=policy, temperature=pcfg.sampling.temperature)
        prompts, mask, key = self._sample_args(policy, B, P)[1:]
        fn = functools.partial(rollout, config=pcfg, model_config=m)
        data, roll = self.measure("ppo/rollout", shape, fn, (state, prompts, mask, key, policy, reward),
                                  flops=roll_flops, tokens=B * (P + N), unit="episodes/s", per_step=B)
        fn = functools.partial(ppo_update, config=pcfg, model_config=m)
        _, upd = self.measure("ppo/update", f"{shape} {c.ppo_epochs}ep x{c.ppo_minibatches}mb", fn,
                              (state, data, self.next_key()), donate=True, flops=update_flops,
                              tokens=c.ppo_epochs * B * (P + N), unit="episodes/s", per_step=B)
        # The iteration row: per-step times add (rollout then update, as in ppo_step).
        it = self.record("ppo/iteration", shape, roll["compile_s"] + upd["compile_s"],
                         [(roll["median_ms"] + upd["median_ms"]) / 1e3],
                         flops=roll_flops + update_flops, tokens=B * (P + N), unit="episodes/s", per_step=B,
                         compiled_bytes=None)
        return {"rollout_ms": roll["median_ms"], "update_ms": upd["median_ms"], "episodes_per_s": it["throughput"],
                "rollout_fraction": roll["median_ms"] / (roll["median_ms"] + upd["median_ms"]),
                "rollout_over_sampling": roll["median_ms"] / sample_row["median_ms"], "update_mfu": upd["mfu"],
                "update_mfu_spec": upd["mfu_spec"]}

    def multiturn(self):
        """Multi-turn rollouts (`train.multiturn.rollout_episodes`) against single-turn sampling of as many policy
        tokens: `mt_episodes` episodes of `mt_turns` turns of at most `mt_new` tokens (a scripted user answers
        each turn; every turn re-prefills the conversation's fixed bucket in one compiled sampler; byte-level chat
        template), then `sample` of the same rows x turns * new tokens from a `gen_prompt`-token prompt. The
        rollout row is wall time per rollout, host steps included, and counts the policy tokens actually sampled
        (a turn may end early at EOS); its FLOPs are each turn's prefill of the bucket and its decode. The
        `multiturn_kv` row runs the same rollout keeping the KV cache across turns (`rollout_episodes` with
        `suffix_len`: each later turn forwards only the user's reply and the template's tokens); its FLOPs are
        the scores the sampler computes over every cache slot, masked ones included."""
        from rlhf_jax.envs import EpisodeBudget
        from rlhf_jax.tokenizer import ByteTokenizer, encode_prompt
        from rlhf_jax.train.multiturn import conversation_slots, make_turn_sampler, rollout_episodes, turn_suffix_ids

        c, m = self.cfg, self.model
        B, K, N = c.mt_episodes, c.mt_turns, c.mt_new
        tok = ByteTokenizer()
        if m.vocab_size < tok.vocab_size:
            raise ValueError(f"multiturn: the byte-level template needs vocab_size >= {tok.vocab_size}")
        template = len(encode_prompt(tok, [{"role": "user", "content": ""}]))
        P = max(c.gen_prompt, template)          # the opening prompt: gen_prompt tokens, template included
        T = P + K * (N + 32)                     # 32: room for each turn's closing and the user's reply
        if T > m.max_seq_len:
            raise ValueError(f"multiturn: --gen-prompt {P} + --mt-turns {K} x (--mt-new {N} + 32) = {T} tokens "
                             f"exceed the preset's max_seq_len {m.max_seq_len}")

        class ScriptedUser:
            def reset(self, task):
                self.left = K
                return [{"role": "user", "content": "q" * (P - template)}]

            def step(self, messages):
                self.left -= 1
                return ([{"role": "user", "content": "go on"}] if self.left else []), 0.0, self.left == 0

        sampling = SamplingConfig(max_new_tokens=N, temperature=1.0, eos_id=tok.eos_id, pad_id=tok.pad_id)
        params = init_params(m, self.next_key())
        opening = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
        Q = 1 + len(turn_suffix_ids(tok, opening, [{"role": "user", "content": "go on"}], eos_id=tok.eos_id))
        slots = conversation_slots(prompt_len=P, max_new_tokens=N, max_turns=K, suffix_len=Q)
        prefill_turn = make_turn_sampler(sampling=sampling, model_config=m)
        cached_turn = make_turn_sampler(sampling=sampling, model_config=m, conversation_slots=slots)
        samplers = {None: lambda p, mask, k: prefill_turn(params, None, p, mask, k),
                    Q: lambda conv, p, mask, k: cached_turn(params, None, conv, p, mask, k)}

        def timed(suffix_len):
            def rollout(key):
                ro = rollout_episodes(samplers[suffix_len], ScriptedUser, [0] * B, key, tokenizer=tok,
                                      budget=EpisodeBudget(max_turns=K), sampling=sampling, prompt_len=P, seq_len=T,
                                      num_generations=1, suffix_len=suffix_len)
                jax.block_until_ready(ro.episodes.tokens)
                return ro

            t0 = time.perf_counter()
            ro = rollout(self.next_key())                       # compiles the turn sampler
            first = time.perf_counter() - t0
            times = []
            for _ in range(max(1, min(c.steps, 3))):
                t0 = time.perf_counter()
                ro = rollout(self.next_key())
                times.append(time.perf_counter() - t0)
            return ro, first, times

        ro, first, times = timed(None)
        policy_tokens = int(np.asarray(ro.episodes.response_mask).sum())
        C = T - N                                            # the sampler's fixed context bucket
        flops = K * generate_flops(m, B, C, N, causal=c.attn_flops == "causal")
        multi = self.record("multiturn", f"{B}x{K}x{N} (bucket {C})", first - statistics.median(times), times,
                            flops=flops, tokens=policy_tokens, unit="policy tokens/s", per_step=policy_tokens,
                            compiled_bytes=None)
        ro, first, times = timed(Q)
        policy_tokens = int(np.asarray(ro.episodes.response_mask).sum())
        # What `sample_after` computes: each turn forwards its W new tokens (P, then Q) with scores over every one
        # of the `slots` cached slots and the W new keys, then N decode steps score slots + 1 keys each (padding
        # and unwritten slots included, masked: the sampler computes those scores too).
        per_key, dense = 4 * m.num_layers * m.num_heads * m.head_size, 2 * matmul_params(m)
        flops = sum(B * W * (dense + per_key * (slots + W)) + B * N * (dense + per_key * (slots + 1))
                    for W in [P] + [Q] * (K - 1))
        kept = self.record("multiturn_kv", f"{B}x{K}x{N} (suffix {Q}, {slots} slots)", first - statistics.median(times),
                           times, flops=flops, tokens=policy_tokens, unit="policy tokens/s", per_step=policy_tokens,
                           compiled_bytes=None)
        single = self.generate(name="multiturn_single", batches=[B], prompt=P, new=K * N)[0]
        return {"policy_tokens_per_s": multi["throughput"], "kv_cache_policy_tokens_per_s": kept["throughput"],
                "single_turn_tokens_per_s": single["throughput"],
                "multi_over_single_time_per_token": single["throughput"] / multi["throughput"],
                "kv_cache_speedup": kept["throughput"] / multi["throughput"]}

    def distill(self):
        """A distillation step (`train.distill.distill_step`, lambda 0: teacher-forced on the batch's responses) on
        the rows of the `sft` row, sft_seq tokens each split into a prompt and a response half, with a teacher of
        the same preset: the student's forward and backward plus the teacher's forward, the divergence over the
        full vocabulary at the response positions. Returns its time over an SFT step of the same rows, when the
        `sft` row ran before it."""
        c, m = self.cfg, self.model
        B, T = c.sft_batch, c.sft_seq
        P, N = T // 2, T - T // 2
        dcfg = DistillConfig(batch_size=B, lmbda=0.0, max_prompt_len=P, sampling=SamplingConfig(max_new_tokens=N))
        ones = lambda n: jnp.ones((B, n), jnp.int32)  # noqa: E731
        batch = jax.device_put({"prompts": self.tokens(B, P), "prompt_mask": ones(P), "responses": self.tokens(B, N),
                                "response_mask": ones(N)})
        teacher = init_params(m, self.next_key())
        fn = functools.partial(distill_step, config=dcfg, model_config=m, teacher_config=m)
        _, row = self.measure("distill", f"{B}x({P}+{N})", fn, (self.state(), batch, teacher), donate=True,
                              flops=distill_flops(m, B, P, N, causal=c.attn_flops == "causal"), tokens=B * T,
                              unit="tokens/s", per_step=B * T)
        sft = next((r for r in self.rows if r["name"] == "sft"), None)
        return None if sft is None else {"distill_over_sft": row["median_ms"] / sft["median_ms"],
                                         "distill_ms": row["median_ms"], "sft_ms": sft["median_ms"]}

    def grpo(self):
        """One GRPO iteration (G samples per prompt, one pass, no reference): the sampling half against pure sampling
        of the same B*G rows, and the update (the trainer's log-probs + one step) with its MFU."""
        c, m = self.cfg, self.model
        B, G, P, N = c.grpo_prompts, c.grpo_generations, c.ppo_prompt_len, c.ppo_new
        gcfg = GRPOConfig(batch_size=B, num_generations=G, num_steps=1, loss_type="dapo",
                          num_minibatches=c.grpo_minibatches,
                          sampling=SamplingConfig(max_new_tokens=N, temperature=1.0, eos_id=m.vocab_size, pad_id=0))
        policy = init_params(m, self.next_key())
        shape = f"{B}x{G}x({P}+{N})"
        (sample_row,) = self.generate("grpo/sample", [B * G], P, N, params=policy, temperature=1.0)
        state = create_train_state(policy, gcfg.optim, 0, total_steps=1)
        batch = {"prompts": jax.device_put(self.tokens(B, P)), "prompt_mask": jnp.ones((B, P), jnp.int32)}
        fn = functools.partial(grpo_sample, config=gcfg, model_config=m)
        (state, episodes, key), roll = self.measure("grpo/rollout", shape, fn, (state, batch), flops=generate_flops(
            m, B * G, P, N, causal=c.attn_flops == "causal"), tokens=B * G * N, unit="new tokens/s", per_step=B * G * N)
        scores = jax.random.normal(self.next_key(), (B * G,))
        fn = functools.partial(grpo_update, config=gcfg, model_config=m)
        _, upd = self.measure("grpo/update", f"{shape} {c.grpo_minibatches}mb", fn, (state, episodes, scores, key), donate=True,
                              flops=grpo_flops(m, B * G, P, N, causal=c.attn_flops == "causal"),
                              tokens=B * G * (P + N), unit="episodes/s", per_step=B * G)
        return {"rollout_over_sampling": roll["median_ms"] / sample_row["median_ms"], "update_mfu": upd["mfu"],
                "update_ms": upd["median_ms"], "rollout_ms": roll["median_ms"]}


def _logits_chunk(flag: str):
    """--logits-chunk: "auto", "None" or an int."""
    if flag in ("auto", "None"):
        return None if flag == "None" else flag
    if not flag.isdigit():
        raise ValueError(f"--logits-chunk: expected auto, None or a positive int, got {flag!r}")
    return int(flag)


def run_benchmarks(cfg: BenchConfig) -> dict:
    """Run the selected benchmarks; returns the report (also written to `cfg.json` if set)."""
    cfg = resolve(cfg)
    model = ModelConfig.preset(cfg.preset, dtype=cfg.dtype, remat=cfg.remat, attention_impl=cfg.attention_impl,
                               scan_unroll=cfg.scan_unroll, logits_chunk=_logits_chunk(cfg.logits_chunk),
                               decode_attention=cfg.decode_attention, segment_attention=cfg.segment_attention)
    dev = jax.devices()[0]
    n = cfg.peak_size or (1024 if dev.platform == "cpu" else 8192)
    measured = measure_peak_flops(model.compute_dtype, n)
    spec = None
    if cfg.dtype == "bfloat16":
        spec = next((v for k, v in SPEC_BF16_PEAK.items() if k in dev.device_kind), None)
    print(f"{dev.device_kind} ({dev.platform}), {jax.device_count()} device(s); preset {cfg.preset} "
          f"dtype {cfg.dtype}; measured {cfg.dtype} matmul peak {measured / 1e12:.2f} TFLOP/s (n={n})", flush=True)
    print(_header(), flush=True)
    bench = _Bench(cfg, model, (measured, spec))
    ppo_summary = grpo_summary = distill_summary = multiturn_summary = None
    for name in cfg.benchmarks.split(","):
        out = getattr(bench, name)()
        if name == "ppo":
            ppo_summary = out
        if name == "grpo":
            grpo_summary = out
        if name == "distill":
            distill_summary = out
        if name == "multiturn":
            multiturn_summary = out
    report = {
        "device": {"kind": dev.device_kind, "platform": dev.platform, "count": jax.device_count(),
                   "jax": jax.__version__, "python": platform.python_version(), "host": platform.node()},
        "config": dataclasses.asdict(cfg),
        "model": {"preset": cfg.preset, "dtype": cfg.dtype, "param_dtype": model.param_dtype,
                  "decode_attention": decode_attention_impl(model), "segment_attention": segment_attention_impl(model),
                  "num_params": model.num_params(), "matmul_params_lm": matmul_params(model),
                  "matmul_params_scalar": matmul_params(model, head="scalar")},
        "peak": {"measured_flops": measured, "matmul_n": n, "dtype": cfg.dtype, "spec_flops": spec},
        "flop_formula": ("train 6N + 3*attn, forward 2N + attn per token; N = non-embedding matmul params + head "
                         f"(V*D or D); attn = 4*L*T*N_heads*H{' / 2 (causal)' if cfg.attn_flops == 'causal' else ''}"
                         "; decode token i: 2N + 4*L*(P+i)*N_heads*H"),
        "results": bench.rows,
        "ppo": ppo_summary,
        "grpo": grpo_summary,
        "distill": distill_summary,
        "multiturn": multiturn_summary,
        "lora_sizes": {name: lora_sizes(ModelConfig.preset(name), cfg.lora_rank) for name in
                       dict.fromkeys([cfg.preset, "tiny", "llama-1b"])},
    }
    print(f"FLOPs: {report['flop_formula']}")
    if ppo_summary:
        p = ppo_summary
        print(f"PPO: {p['episodes_per_s']:.4g} episodes/s; rollout {100 * p['rollout_fraction']:.0f}% of the "
              f"iteration; rollout / pure sampling = {p['rollout_over_sampling']:.2f}x; update MFU "
              f"{100 * p['update_mfu']:.1f}%")
    if multiturn_summary:
        print(f"Multi-turn: {multiturn_summary['multi_over_single_time_per_token']:.2f}x the time per policy token "
              f"of single-turn sampling; keeping the KV cache across turns: "
              f"{multiturn_summary['kv_cache_speedup']:.2f}x the re-prefilling rollout's policy tokens/s")
    if grpo_summary:
        g = grpo_summary
        print(f"GRPO: rollout / pure sampling of the same rows = {g['rollout_over_sampling']:.2f}x; update MFU "
              f"{100 * g['update_mfu']:.1f}%")
    if distill_summary:
        print(f"distill: a teacher-forced distillation step takes {distill_summary['distill_over_sft']:.2f}x an SFT "
              "step of the same rows (student forward/backward + teacher forward)")
    for name, z in report["lora_sizes"].items():
        print(f"LoRA r{z['rank']} on {name}: {z['adapter_params']:,} of {z['base_params']:,} params trainable "
              f"({100 * z['trainable_fraction']:.2f}%); AdamW state {z['adam_bytes_lora'] / 2**20:.1f} MiB against "
              f"{z['adam_bytes_full'] / 2**20:.1f} MiB for full fine-tuning")
    if cfg.json:
        with open(cfg.json, "w") as f:
            json.dump(report, f, indent=2)
    return report


# --------------------------------------------------------------------------------------------------- output
_COLS = (("benchmark", 14), ("shape", 22), ("compile s", 9), ("median ms", 10), ("throughput", 22),
         ("TFLOP/s", 8), ("MFU %", 6), ("peak GiB", 8), ("exec GiB", 8))


def _header() -> str:
    head = " ".join(f"{n:>{w}}" if i > 1 else f"{n:<{w}}" for i, (n, w) in enumerate(_COLS))
    return head + "\n" + "-" * len(head)


def _format_row(r: dict) -> str:
    gib = lambda b: "-" if b is None else f"{b / 2 ** 30:.2f}"  # noqa: E731
    vals = (r["name"], r["shape"], f"{r['compile_s']:.2f}", f"{r['median_ms']:.2f}",
            f"{r['throughput']:.4g} {r['throughput_unit']}", f"{r['tflops_per_s']:.3g}", f"{100 * r['mfu']:.1f}",
            gib(r["peak_bytes"]), gib(r["compiled_bytes"]))
    return " ".join(f"{v:>{w}}" if i > 1 else f"{v:<{w}}" for i, (v, (_, w)) in enumerate(zip(vals, _COLS)))


# ------------------------------------------------------------------------------------------------------ CLI
def _argument(tp, default) -> dict:
    """argparse keyword arguments for one field type (bool, int, float, str, Literal, and `X | None`)."""
    optional = typing.get_origin(tp) is not Literal and type(None) in typing.get_args(tp)
    if optional:
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    if tp is bool:
        return dict(action=argparse.BooleanOptionalAction, default=default)
    conv = str if typing.get_origin(tp) is Literal else tp
    if optional:
        conv = lambda s, base=conv: None if s == "None" else base(s)  # noqa: E731
    if typing.get_origin(tp) is Literal:
        return dict(type=conv, choices=[*typing.get_args(tp), *([None] if optional else [])], default=default)
    return dict(type=conv, default=default)


def argparse_cli(argv=None) -> BenchConfig:
    """BenchConfig from the command line with argparse only (the fallback when tyro is not installed)."""
    parser = argparse.ArgumentParser(prog="rlhf-jax benchmark", description=__doc__.split("\n")[0])
    hints, docs = typing.get_type_hints(BenchConfig), field_docs(BenchConfig)
    for f in dataclasses.fields(BenchConfig):
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, **_argument(hints[f.name], f.default),
                            help=f"{docs.get(f.name, '')} (default: {f.default})")
    return BenchConfig(**vars(parser.parse_args(argv)))


def parse_args(argv=None) -> BenchConfig:
    """BenchConfig from the command line: tyro when installed, else `argparse_cli`."""
    try:
        import tyro
    except ImportError:
        return argparse_cli(argv)
    return tyro.cli(BenchConfig, args=argv, description=__doc__.split("\n")[0], prog="rlhf-jax benchmark")


def main(argv=None) -> int:
    try:
        run_benchmarks(parse_args(argv))
    except ValueError as e:          # a benchmark's shapes against the preset: one line naming the flags
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
