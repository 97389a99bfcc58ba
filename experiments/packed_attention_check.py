"""cuDNN packed-sequence attention against the dense segment mask, on a GPU (issue 23).

For packed rows (several examples per row, random lengths, padding at the end), the SFT loss, its gradient and
the hidden states through `ModelConfig.packed_segments` (cuDNN's packed-sequence flash kernels) must equal the
dense [B,1,T,T] mask path (`packed_segments=0`) to bf16 precision; then both SFT steps are timed on the same
batches. Also checks the fallback: a batch with a row of more segments than the packed form holds.

    python -m experiments.packed_attention_check --preset gpt2-124m --json packed.json
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.models import forward_hidden, init_params
from rlhf_jax.models.config import ModelConfig
from rlhf_jax.train.optim import OptimConfig
from rlhf_jax.train.state import create_train_state
from rlhf_jax.train.steps import sft_nll, sft_step


def packed_batch(rng, vocab, B, T, segments):
    """Rows of `segments` examples of random lengths each, then padding (segment 0) to T."""
    seg = np.zeros((B, T), np.int32)
    pos = np.zeros((B, T), np.int32)
    for b in range(B):
        cuts = np.sort(rng.choice(np.arange(8, T - 8), segments, replace=False))
        start = 0
        for i, end in enumerate(cuts):
            seg[b, start:end] = i + 1
            pos[b, start:end] = np.arange(end - start)
            start = end
    ids = rng.integers(0, vocab, (B, T + 1), dtype=np.int32)
    return {"inputs": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": (seg > 0).astype(np.float32),
            "positions": pos, "segment_ids": seg}


def timed(fn, args, steps):
    out = fn(*args)
    jax.block_until_ready(out)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        out = fn(*args)
        jax.block_until_ready(out)
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="gpt2-124m")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--segments", type=int, default=6)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    packed_cfg = ModelConfig.preset(args.preset, dtype="bfloat16")
    dense_cfg = packed_cfg.replace(packed_segments=0)
    params = init_params(packed_cfg, jax.random.PRNGKey(0))
    batch = jax.device_put(packed_batch(rng, packed_cfg.vocab_size, args.batch, args.seq, args.segments))
    report = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "preset": args.preset,
              "shape": f"{args.batch}x{args.seq}, {args.segments} segments per row"}

    for name, cfg in (("packed", packed_cfg), ("dense", dense_cfg)):
        h = jax.jit(functools.partial(forward_hidden, config=cfg))(params, batch["inputs"],
                                                                  positions=batch["positions"],
                                                                  segment_ids=batch["segment_ids"])
        (loss, _), grads = jax.jit(jax.value_and_grad(functools.partial(sft_nll, model_config=cfg),
                                                      has_aux=True))(params, batch)
        report[name] = {"hidden": h, "loss": loss, "grads": grads}
    real = np.asarray(batch["segment_ids"]) > 0
    hp, hd = (np.asarray(report[k]["hidden"], np.float32)[real] for k in ("packed", "dense"))
    gp, gd = (jax.tree.leaves(report[k]["grads"]) for k in ("packed", "dense"))
    rel = max(float(jnp.linalg.norm(a - b) / (jnp.linalg.norm(b) + 1e-30)) for a, b in zip(gp, gd))
    check = {"loss_packed": float(report["packed"]["loss"]), "loss_dense": float(report["dense"]["loss"]),
             "hidden_max_abs_diff": float(np.max(np.abs(hp - hd))), "hidden_max_abs": float(np.max(np.abs(hd))),
             "hidden_finite_everywhere": bool(np.isfinite(np.asarray(report["packed"]["hidden"])).all()),
             "grad_max_relative_diff": rel,
             "grads_finite": bool(all(np.isfinite(np.asarray(g)).all() for g in gp))}
    for k in ("packed", "dense"):
        del report[k]
    report["check"] = check
    print(json.dumps(check, indent=1), flush=True)

    # the fallback: one row with more segments than packed_segments
    many = jax.device_put(packed_batch(rng, packed_cfg.vocab_size, 2, 256, packed_cfg.packed_segments + 4))
    fall = [float(sft_nll(params, many, model_config=c)[0]) for c in (packed_cfg, dense_cfg)]
    report["fallback"] = {"loss_packed_cfg": fall[0], "loss_dense": fall[1]}
    print("fallback", fall, flush=True)

    for name, cfg in (("packed", packed_cfg), ("dense", dense_cfg)):
        state = create_train_state(params, OptimConfig(), jax.random.PRNGKey(1))
        step = jax.jit(functools.partial(sft_step, model_config=cfg))
        report[f"sft_ms_{name}"] = timed(step, (state, batch), args.steps)
        print(name, "SFT step ms", report[f"sft_ms_{name}"], flush=True)
    report["tokens_per_s_packed"] = args.batch * args.seq / report["sft_ms_packed"] * 1e3
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
