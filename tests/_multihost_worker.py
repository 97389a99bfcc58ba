"""One process of a multi-host SFT run on CPU (used by tests/test_multihost.py).

    python tests/_multihost_worker.py --process-id I --num-processes P --port PORT --out result_I.json

Every process sees `--local-devices` CPU devices, joins `jax.distributed` at localhost:PORT, builds one
(data, fsdp, tensor) mesh over all global devices, reads only its own rows of each global batch and runs
`NUM_STEPS` sharded SFT steps. It writes the per-step losses and a checksum of the final params as JSON.
`make_sft_batches` is also imported by the tests for the single-process reference.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

NUM_STEPS = 2
GLOBAL_BATCH, SEQ_LEN = 8, 8
MESH_SHAPE = (1, 2, 2)        # fsdp spans the processes, tensor stays inside one
FAST = {"xla_backend_optimization_level": 0}      # compile faster on CPU; numerics unchanged to 1e-5
UNAVAILABLE = 77              # exit code: jax.distributed could not start


def make_sft_batches(vocab_size: int, *, num_steps: int = NUM_STEPS, batch: int = GLOBAL_BATCH,
                     seq_len: int = SEQ_LEN, seed: int = 0) -> list[dict]:
    """Deterministic global SFT batches (numpy), right padded rows of random length."""
    import numpy as np
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(num_steps):
        lengths = rng.integers(seq_len // 2, seq_len + 1, size=batch)
        real = (np.arange(seq_len)[None, :] < lengths[:, None])
        out.append({
            "inputs": np.where(real, rng.integers(0, vocab_size, (batch, seq_len)), 0).astype(np.int32),
            "targets": np.where(real, rng.integers(0, vocab_size, (batch, seq_len)), 0).astype(np.int32),
            "loss_mask": (real & (rng.random((batch, seq_len)) > 0.2)).astype(np.float32),
            "positions": np.tile(np.arange(seq_len, dtype=np.int32), (batch, 1)),
            "segment_ids": real.astype(np.int32)})
    return out


def optim_config():
    from rlhf_jax.train.optim import OptimConfig
    return OptimConfig(learning_rate=1e-3, eps=1e-3, weight_decay=0.1)


def make_state(cfg):
    """The initial TrainState (one compiled init instead of optax's eager per-leaf ops)."""
    import jax
    from rlhf_jax.models import init_params
    from rlhf_jax.train.state import create_train_state
    return jax.jit(lambda key: create_train_state(init_params(cfg, key), optim_config(), 0))(jax.random.key(0))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--process-id", type=int, required=True)
    ap.add_argument("--num-processes", type=int, required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

    from rlhf_jax import sharding
    try:
        sharding.initialize_distributed(f"localhost:{args.port}", args.num_processes, args.process_id)
    except Exception as e:  # reported to the test, which skips: jax.distributed unavailable on this CPU build
        print(f"DISTRIBUTED_UNAVAILABLE: {type(e).__name__}: {e}", flush=True)
        sys.exit(UNAVAILABLE)

    import jax
    import numpy as np
    jax.config.update("jax_default_matmul_precision", "highest")
    from rlhf_jax.models import ModelConfig
    from rlhf_jax.train.steps import sft_step

    cfg = ModelConfig.preset("tiny")
    mesh = sharding.make_mesh(MESH_SHAPE)
    state = make_state(cfg)
    state_sh = sharding.state_sharding(state, sharding.params_sharding(cfg, mesh), mesh)
    state = sharding.shard(state, state_sh)       # the same init on every process -> global arrays
    step = sharding.jit_sharded(sft_step, mesh, state_sh, sharding.batch_sharding(mesh), compiler_options=FAST,
                                model_config=cfg)

    rows = GLOBAL_BATCH // jax.process_count()
    lo = jax.process_index() * rows
    losses = []
    for batch in make_sft_batches(cfg.vocab_size):
        local = {k: v[lo:lo + rows] for k, v in batch.items()}                 # this process's shard only
        state, metrics = step(state, sharding.shard_batch(local, mesh))
        losses.append(float(metrics["loss"]))
    checksum = jax.jit(lambda p: sum(jax.numpy.sum(x * x) for x in jax.tree.leaves(p)),
                       out_shardings=sharding.replicated(mesh))(state.params)
    kernel = state.params["layers"]["mlp"]["up"]["kernel"]
    result = {"process_index": jax.process_index(), "process_count": jax.process_count(),
              "global_devices": jax.device_count(), "local_devices": jax.local_device_count(),
              "losses": losses, "param_sq_sum": float(checksum),
              "kernel_spec": [a if a is None or isinstance(a, str) else list(a) for a in kernel.sharding.spec],
              "kernel_local_shapes": [list(s.data.shape) for s in kernel.addressable_shards],
              "embed_shape": list(np.shape(state.params["embed"]["embedding"]))}
    from rlhf_jax.train.checkpoint import save_params
    save_params(os.path.join(os.path.dirname(args.out), "final"), state.params, model_config=cfg)  # no gather
    with open(args.out, "w") as f:
        json.dump(result, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
