"""rlhf_jax/cli/benchmark.py (`rlhf-jax benchmark`): FLOP formulas against hand counts, the CLI with and without tyro, and one whole run.

The run is a subprocess so that (a) tyro, tensorflow_datasets and tensorboardX can be made unimportable (the GPU
machine lacks them: the benchmark must import and parse its flags without them), and (b) XLA's CPU backend can
skip its expensive optimisation passes (compilation dominates a tiny-model run; the timings are not checked
against anything but positivity).
"""
import json
import math
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from rlhf_jax.cli import benchmark as bm
from rlhf_jax.models import init_params
from rlhf_jax.models.config import ModelConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _kernel_sizes(params) -> int:
    """Scalars in the transformer blocks' matmul kernels, counted from an actual params tree."""
    leaves = jax.tree_util.tree_leaves_with_path(params["layers"])
    return sum(int(np.prod(x.shape)) for path, x in leaves if path[-1].key == "kernel")


@pytest.mark.parametrize("preset", ["tiny", "tiny-llama"])
def test_flop_formulas_match_hand_count(preset):
    cfg = ModelConfig.preset(preset)
    V, D, L, N, H = cfg.vocab_size, cfg.d_model, cfg.num_layers, cfg.num_heads, cfg.head_size
    n_lm = _kernel_sizes(init_params(cfg, jax.random.PRNGKey(0))) + V * D
    assert bm.matmul_params(cfg) == n_lm
    assert bm.matmul_params(cfg, head="scalar") == n_lm - V * D + D
    B, T = 3, 20
    attn_full = 2 * 2 * T * N * H * L                   # QK^T and AV: 2 matmuls, 2 FLOPs per MAC, per token
    assert bm.train_flops(cfg, B * T, T) == B * T * (6 * n_lm + 3 * attn_full / 2)
    assert bm.train_flops(cfg, B * T, T, causal=False) == B * T * (6 * n_lm + 12 * L * N * H * T)   # PaLM
    assert bm.forward_flops(cfg, B * T, T, head="scalar") == B * T * (2 * (n_lm - V * D + D) + attn_full / 2)


def test_generate_and_ppo_flops_by_brute_force():
    cfg = ModelConfig.preset("tiny")
    B, P, Nn, E = 2, 5, 7, 3
    n_lm = bm.matmul_params(cfg)
    per_key = 4 * cfg.num_layers * cfg.num_heads * cfg.head_size
    prefill = B * P * (2 * n_lm + per_key * P / 2)
    decode = sum(B * (2 * n_lm + per_key * (P + i)) for i in range(Nn))
    assert math.isclose(bm.generate_flops(cfg, B, P, Nn), prefill + decode)
    rollout, update = bm.ppo_flops(cfg, B, P, Nn, E)
    S, VD = P + Nn, cfg.vocab_size * cfg.d_model
    # Trunks over all B*S tokens, the LM head (2VD forward, 6VD trained) only at the B*N response positions.
    assert bm.matmul_params(cfg, head="none") == n_lm - VD
    lm_fwd = B * S * (2 * (n_lm - VD) + per_key * S / 2) + B * Nn * 2 * VD
    scoring = 2 * lm_fwd + 2 * bm.forward_flops(cfg, B * S, S, head="scalar")
    assert math.isclose(rollout, prefill + decode + scoring)
    lm_train = B * S * (6 * (n_lm - VD) + 3 * per_key * S / 2) + B * Nn * 6 * VD
    assert math.isclose(update, E * (lm_train + bm.train_flops(cfg, B * S, S, head="scalar")))
    # GRPO's update: the trainer's log-probs (one LM forward) and one LM training step, no value model
    assert math.isclose(bm.grpo_flops(cfg, B, P, Nn), lm_fwd + lm_train)


def test_shapes_the_preset_cannot_hold_are_refused_in_one_line(capsys):
    assert bm.main(["--preset", "tiny", "--benchmarks", "multiturn", "--mt-new", "64", "--peak-size", "64",
                    "--warmup", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: multiturn:") and "--mt-new 64" in err and "\n" not in err


def test_cli_argparse_matches_tyro_and_quick_keeps_explicit_shapes():
    argv = ["--preset", "gpt2-124m", "--sft-batch", "3", "--attention-impl", "cudnn", "--no-segment-ids",
            "--json", "x.json", "--gen-batches", "4,8", "--remat", "dots"]
    a = bm.argparse_cli(argv)
    assert a == bm.parse_args(argv)                      # tyro is installed here
    assert (a.sft_batch, a.attention_impl, a.segment_ids, a.json, a.remat) == (3, "cudnn", False, "x.json", "dots")
    assert bm.argparse_cli([]) == bm.BenchConfig()
    assert bm.argparse_cli(["--attention-impl", "None"]).attention_impl is None
    with pytest.raises(SystemExit):
        bm.argparse_cli(["--remat", "sometimes"])
    r = bm.resolve(bm.BenchConfig(preset="tiny", sft_batch=5))
    assert (r.sft_batch, r.sft_seq, r.dpo_pairs, r.dtype) == (5, bm.QUICK["sft_seq"], bm.QUICK["dpo_pairs"], "float32")
    assert bm.resolve(bm.BenchConfig(preset="gpt2-124m")).sft_seq == 1024
    with pytest.raises(ValueError, match="unknown"):
        bm.resolve(bm.BenchConfig(benchmarks="sft,rl"))


_RUN = """
import sys
for name in ("tyro", "tensorflow_datasets", "tensorboardX"):
    sys.modules[name] = None                               # any import of them now raises ImportError
from rlhf_jax.cli import benchmark
benchmark.main(sys.argv[1:])
assert "tensorflow_datasets" not in [m for m, v in sys.modules.items() if v is not None]
"""


def test_whole_benchmark_runs_without_tyro_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"}
    argv = ["--preset", "tiny", "--steps", "2", "--warmup", "0", "--peak-size", "256", "--json", str(out),
            "--sft-seq", "32", "--dpo-seq", "32", "--reward-seq", "32", "--ppo-prompts", "4", "--ppo-epochs", "1",
            "--mt-episodes", "2", "--mt-turns", "2", "--mt-new", "8",
            "--benchmarks", "sft,reward,dpo,simpo,orpo,kto,generate,ppo,grpo,lora_sft,lora_dpo,distill,qlora_sft,"
            "qlora_dpo,multiturn"]
    proc = subprocess.run([sys.executable, "-c", _RUN, *argv], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report) >= {"device", "config", "model", "peak", "flop_formula", "results", "ppo"}
    assert report["device"]["platform"] == "cpu" and report["model"]["dtype"] == "float32"
    names = [r["name"] for r in report["results"]]
    assert names == ["sft", "reward", "dpo", "simpo", "orpo", "kto", "generate", "ppo/sample", "ppo/rollout", "ppo/update", "ppo/iteration",
                     "grpo/sample", "grpo/rollout", "grpo/update", "lora_sft", "lora_dpo", "distill", "qlora_sft",
                     "qlora_dpo", "multiturn", "multiturn_kv", "multiturn_single"]
    z = report["lora_sizes"]["llama-1b"]                        # from shapes: rank 16 on every projection
    n = ModelConfig.preset("llama-1b").num_params()            # which leaves out the norms' 67,584 scales
    assert 0 <= z["base_params"] - n < 1e-4 * n and 0 < z["adam_ratio"] < 0.02
    assert z["adam_bytes_lora"] == 8 * z["adapter_params"]
    cfg = ModelConfig.preset("tiny")
    for r in report["results"]:
        assert set(r) == set(bm.ROW_KEYS)
        for k in ("compile_s", "median_ms", "min_ms", "throughput", "flops_per_step", "tflops_per_s", "mfu"):
            assert math.isfinite(r[k]) and r[k] > 0, (r["name"], k, r[k])
        assert r["min_ms"] <= r["median_ms"]
        # MFU is the achieved FLOP rate over the measured peak, and the rate is FLOPs / median time.
        assert math.isclose(r["tflops_per_s"], r["flops_per_step"] / (r["median_ms"] / 1e3) / 1e12, rel_tol=1e-9)
        assert math.isclose(r["mfu"], r["tflops_per_s"] * 1e12 / report["peak"]["measured_flops"], rel_tol=1e-9)
        assert r["peak_bytes"] is None                  # the CPU allocator reports no peak
    sft = report["results"][0]
    assert sft["tokens_per_step"] == 2 * 32 and sft["flops_per_step"] == bm.train_flops(cfg, 64, 32)
    distill = report["results"][names.index("distill")]     # student forward/backward + teacher forward
    B, P, N = map(int, re.fullmatch(r"(\d+)x\((\d+)\+(\d+)\)", distill["shape"]).groups())
    assert distill["flops_per_step"] == bm.distill_flops(cfg, B, P, N)
    dpo = report["results"][2]
    assert dpo["flops_per_step"] == bm.train_flops(cfg, 128, 32) + bm.forward_flops(cfg, 128, 32)
    ppo = report["ppo"]
    assert 0 < ppo["rollout_fraction"] < 1 and ppo["rollout_over_sampling"] > 0 and ppo["episodes_per_s"] > 0
    assert math.isclose(ppo["episodes_per_s"], 4 / ((ppo["rollout_ms"] + ppo["update_ms"]) / 1e3), rel_tol=1e-9)
    grpo_update = next(r for r in report["results"] if r["name"] == "grpo/update")   # 2 prompts x 2 x (16 + 16)
    assert grpo_update["flops_per_step"] == bm.grpo_flops(cfg, 4, 16, 16) and report["grpo"]["update_mfu"] > 0
    assert report["grpo"]["rollout_over_sampling"] > 0
    assert "sft" in proc.stdout and "MFU" in proc.stdout and "GRPO:" in proc.stdout
    multi, kept, single = report["results"][-3:]      # 2 episodes x 2 turns x at most 8 sampled tokens
    assert 0 < multi["tokens_per_step"] <= 2 * 2 * 8 and single["tokens_per_step"] == 2 * 2 * 8
    assert 0 < kept["tokens_per_step"] <= 2 * 2 * 8 and kept["flops_per_step"] < multi["flops_per_step"]
    assert report["multiturn"]["multi_over_single_time_per_token"] > 0 and report["multiturn"]["kv_cache_speedup"] > 0


def test_profile_ops_sums_device_or_host_events():
    """--profile: the trace of a known program has its ops, each with a positive time per call, sorted, with the
    per-kind totals adding up; the formatted text names the costliest op."""
    import jax
    import jax.numpy as jnp
    f = jax.jit(lambda a, b: jnp.tanh(a @ b).sum())
    a = jnp.ones((128, 128))
    jax.block_until_ready(f(a, a))
    prof = bm.profile_ops(lambda: [jax.block_until_ready(f(a, a)) for _ in range(2)], calls=2)
    assert prof["source"] == ("host" if jax.default_backend() == "cpu" else "device")
    ms = [op["ms"] for op in prof["ops"]]
    assert ms and all(m > 0 for m in ms) and ms == sorted(ms, reverse=True)
    assert math.isclose(sum(prof["kinds"].values()), prof["total_ms"], rel_tol=1e-9)
    assert set(prof["kinds"]) <= {"matmul", "attention", "other"}
    text = bm.format_profile(prof, 1.0, 3)
    assert prof["ops"][0]["hlo_op"][:40] in text and len(text.splitlines()) == 1 + min(3, len(ms))
    assert bm._op_kind("nvjet_sm90_tst_128x128") == "matmul"
    assert bm._op_kind("cudnn_generated_fort_native_sdpa_sm90_flash_bprop") == "attention"
    assert bm._op_kind("loop_add_fusion") == "other"
