#!/usr/bin/env bash
# GPT-2 124M on one GPU, in one process: `rlhf-jax benchmark` rows with today's attention paths
# (--decode-attention reference --segment-attention dense) and with the Pallas kernels (pallas / pallas) side by
# side: sampling at batch 256 (128 + 256 tokens), SFT 8x1024, DPO 32 pairs x 512, one PPO iteration (sample,
# rollout, update); SFT also with a bf16 copy of the params kept in the train state (--compute-copy); then
# distill, qlora_sft (also with gradient checkpointing, --remat full: QLoRA's memory, one dequantised layer at a
# time), qlora_dpo and multiturn (64 episodes x 4 turns x 64 tokens beside single-turn sampling of as many tokens)
# on today's paths; last, one PPO iteration with 1 minibatch of 64 rows instead of 4 of 16 (TRL's default, larger
# matmuls in the update). 5 timed calls after 1 warmup each.
#
#   bash docs/results/gpu_round3.sh [OUT_DIR]        # from the repository root; writes OUT_DIR/gpu_round3.json
#
# OUT_DIR defaults to $OUT, else docs/results. Rows run in the order above; a row starts only when its expected
# time on an H100 (EXPECT_S below: compile times of docs/results/performance_h100.json plus the timed calls) still
# fits in BUDGET_S seconds (360) from the start; the others are listed under "skipped", and the last line prints
# the ROWS=... that runs them in a second call (a comma list of names, every path of each, or name:path, e.g.
# ROWS=ppo:pallas,distill,qlora_sft,qlora_dpo,multiturn; about 5 minutes), with another OUT_DIR. All rows take
# about 10 minutes of an H100 (generate 35 s a path, sft 27, dpo 38, ppo 105, distill 35, qlora 30-40, multiturn
# 45, an estimate). The JSON is
# rewritten after every row, so a run cut short by a timeout still reports what finished. A row that fails (a
# kernel that does not lower, out of memory) records its error and the next one runs. The JSON records the
# device, JAX version, commit and each row's options, and first (in a call without ROWS, about 20 s) how far the
# kernels' outputs agree with the reference paths' on the device. Give the device call a timeout of about 420 s.
# A CPU dry run of the script itself: PRESET=tiny GEN_BATCHES=2 BUDGET_S=200 bash docs/results/gpu_round3.sh /tmp
set -u
OUT_DIR=${1:-${OUT:-docs/results}}
mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export BUDGET_S=${BUDGET_S:-360}
PYTHON=${PYTHON:-$(command -v python || command -v python3)}
"$PYTHON" - "$OUT_DIR" <<'EOF'
import gc
import json
import os
import subprocess
import sys
import time
import traceback

import jax

from rlhf_jax.cli import benchmark as bm

out_path = os.path.join(sys.argv[1], "gpu_round3.json")
budget, start = float(os.environ["BUDGET_S"]), time.time()


def git(*args):
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10).stdout.strip() or None
    except Exception:
        return None


TODAY = {"decode_attention": "reference", "segment_attention": "dense"}
PALLAS = {"decode_attention": "pallas", "segment_attention": "pallas"}
COMMON = {"preset": os.environ.get("PRESET", "gpt2-124m"), "gen_batches": os.environ.get("GEN_BATCHES", "256"),
          "steps": 5, "warmup": 1}
COPY = {**TODAY, "compute_copy": True}       # a bf16 copy of the params kept in the state (--compute-copy)
ROWS = [("generate", "today", TODAY), ("generate", "pallas", PALLAS), ("sft", "today", TODAY),
        ("sft", "pallas", PALLAS), ("sft", "copy", COPY), ("dpo", "today", TODAY), ("dpo", "pallas", PALLAS),
        ("ppo", "today", TODAY), ("ppo", "pallas", PALLAS), ("distill", "today", TODAY),
        ("qlora_sft", "today", TODAY), ("qlora_sft", "remat", {**TODAY, "remat": "full"}),
        ("qlora_dpo", "today", TODAY), ("multiturn", "today", TODAY), ("ppo", "mb1", {**TODAY, "ppo_minibatches": 1})]
EXPECT_S = {"generate": 35, "sft": 27, "dpo": 38, "ppo": 105, "distill": 35, "qlora_sft": 30, "qlora_dpo": 40,
            "multiturn": 45}
if os.environ.get("ROWS"):   # "sft" (every path of it) or "sft:pallas", comma-separated
    wanted = os.environ["ROWS"].split(",")
    ROWS = [r for r in ROWS if r[0] in wanted or f"{r[0]}:{r[1]}" in wanted]
dev = jax.devices()[0]
report = {"command": "bash docs/results/gpu_round3.sh", "commit": git("rev-parse", "HEAD"),
          "dirty_paths": git("status", "--porcelain", "--untracked-files=no"),
          "device": {"kind": dev.device_kind, "platform": dev.platform, "count": jax.device_count()},
          "jax": jax.__version__, "jaxlib": getattr(sys.modules.get("jaxlib"), "__version__", None),
          "common_flags": COMMON, "budget_s": budget, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
          "runs": [], "skipped": []}


def agreement():
    """The kernels against the reference paths on this device, in bf16: greedy tokens of a small grouped-query
    model (tiny-llama) sampled both ways, and logits of packed rows through both segment attentions."""
    import jax.numpy as jnp
    from rlhf_jax.generation import sample
    from rlhf_jax.models import forward, init_params
    from rlhf_jax.models.config import ModelConfig

    cfg = ModelConfig.preset("tiny-llama", dtype="bfloat16", max_seq_len=512)
    params = init_params(cfg, jax.random.key(0))
    prompts = jax.random.randint(jax.random.key(1), (8, 64), 0, 256)
    mask = jnp.ones((8, 64), jnp.int32).at[:4, :20].set(0)
    runs = [sample(params, prompts, mask, jax.random.key(2), config=cfg.replace(decode_attention=d),
                   max_new_tokens=64, temperature=0.0, eos_id=None) for d in ("reference", "pallas")]
    segments = jnp.concatenate([jnp.full((2, 100), 1), jnp.full((2, 300), 2), jnp.zeros((2, 112))], 1)
    tokens = jax.random.randint(jax.random.key(3), segments.shape, 0, 256)
    logits = [forward(params, tokens, config=cfg.replace(segment_attention=a), segment_ids=segments)
              for a in ("dense", "pallas")]
    real = (segments > 0)[..., None]
    same = jnp.cumprod(runs[0].tokens[:, 64:] == runs[1].tokens[:, 64:], axis=1)   # 1 until the first flip
    return {"decode_steps_before_first_flip": [int(n) for n in same.sum(1)], "decode_new_tokens": 64,
            "decode_logprob_max_abs_diff_before_flip": float(jnp.max(jnp.abs(runs[0].logprobs - runs[1].logprobs)
                                                                     * same)),
            "segment_logits_max_abs_diff": float(jnp.max(jnp.where(real, jnp.abs(logits[0] - logits[1]), 0))),
            "segment_logits_finite": bool(jnp.all(jnp.isfinite(logits[1])))}


if not os.environ.get("ROWS"):
    try:
        report["agreement"] = agreement()
    except Exception as e:
        report["agreement"] = {"error": "".join(traceback.format_exception_only(e))[-3000:]}
        traceback.print_exc()
    print(f"agreement of the kernels with the reference paths (bf16): {report['agreement']}", flush=True)
for name, path, options in ROWS:
    elapsed = time.time() - start
    if elapsed + EXPECT_S[name] > budget:
        report["skipped"].append({"benchmark": name, "path": path, "elapsed_s": elapsed})
        continue
    print(f"=== {name} ({path}: {options}) at {elapsed:.0f} s", flush=True)
    run = {"benchmark": name, "path": path, "options": options}
    t = time.time()
    try:
        r = bm.run_benchmarks(bm.BenchConfig(benchmarks=name, **COMMON, **options))
        run.update(results=r["results"], model=r["model"], peak=r["peak"], ppo=r["ppo"], distill=r["distill"],
                   multiturn=r["multiturn"])
    except Exception as e:   # record it and go on: the other rows still tell something
        run["error"] = "".join(traceback.format_exception_only(e))[-3000:]
        traceback.print_exc()
    run["wall_s"] = time.time() - t
    report["runs"].append(run)
    report["total_s"] = time.time() - start
    with open(out_path, "w") as f:
        json.dump(report, f, indent=2)
    jax.clear_caches()
    gc.collect()

by, paths = {}, []
for run in report["runs"]:
    paths += [] if run["path"] in paths else [run["path"]]
    for row in run.get("results", []):
        by.setdefault(row["name"], {})[run["path"]] = row["median_ms"]
print(f"\n{'benchmark':<28} " + " ".join(f"{p + ' ms':>10}" for p in paths))
for name, times in by.items():
    print(f"{name:<28} " + " ".join(f"{times.get(p, float('nan')):>10.2f}" for p in paths))
sft = by.get("sft", {}).get("today")
if sft and "distill" in by:
    report["distill_over_sft"] = by["distill"]["today"] / sft
skipped = ",".join(f"{s['benchmark']}:{s['path']}" for s in report["skipped"])
print(f"total {time.time() - start:.0f} s" + (f"; run the skipped rows with ROWS={skipped}" if skipped else ""))
with open(out_path, "w") as f:
    json.dump(report, f, indent=2)
EOF
