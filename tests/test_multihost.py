"""Two processes on localhost run sharded SFT steps together through `jax.distributed` (CPU, gloo collectives).

Each process has 2 CPU devices and loads only its own half of every global batch; the (data, fsdp, tensor) =
(1, 2, 2) mesh puts FSDP across the processes. Losses and the final params must match a one-device run of the
same global batches.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

import _multihost_worker as worker
from rlhf_jax import sharding as S
from rlhf_jax.models import ModelConfig
from rlhf_jax.train.steps import sft_step

NUM_PROCESSES = 2
TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _one_device_reference():
    cfg = ModelConfig.preset("tiny")
    mesh = S.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    state = worker.make_state(cfg)
    ssh = S.state_sharding(state, S.params_sharding(cfg, mesh), mesh)
    step = S.jit_sharded(sft_step, mesh, ssh, S.batch_sharding(mesh), compiler_options=worker.FAST,
                         model_config=cfg)
    state, losses = S.shard(state, ssh), []
    for batch in worker.make_sft_batches(cfg.vocab_size):
        state, metrics = step(state, S.shard_batch(batch, mesh))
        losses.append(float(metrics["loss"]))
    return losses, float(sum(np.sum(np.square(np.asarray(x), dtype=np.float64)) for x in jax.tree.leaves(state.params)))


def test_two_processes_run_sft_together(tmp_path):
    port = _free_port()
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "PYTHONPATH": repo + os.pathsep + os.environ.get("PYTHONPATH", "")}
    procs = [subprocess.Popen([sys.executable, worker.__file__, "--process-id", str(i), "--num-processes",
                               str(NUM_PROCESSES), "--port", str(port), "--out", str(tmp_path / f"r{i}.json")],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(NUM_PROCESSES)]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=TIMEOUT_S)[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"multi-host workers did not finish in {TIMEOUT_S} s:\n" + "\n".join(
            p.communicate()[0][-3000:] for p in procs))
    if any(p.returncode == worker.UNAVAILABLE for p in procs):
        pytest.skip("jax.distributed is unavailable on this CPU build: " + " | ".join(
            line for out in outputs for line in out.splitlines() if "DISTRIBUTED_UNAVAILABLE" in line))
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]

    results = [json.loads((tmp_path / f"r{i}.json").read_text()) for i in range(NUM_PROCESSES)]
    ref_losses, ref_sq = _one_device_reference()
    for i, r in enumerate(results):
        assert (r["process_index"], r["process_count"]) == (i, NUM_PROCESSES)
        assert (r["global_devices"], r["local_devices"]) == (4, 2)
        np.testing.assert_allclose(r["losses"], ref_losses, rtol=1e-5)
        np.testing.assert_allclose(r["param_sq_sum"], ref_sq, rtol=1e-5)
        # MLP up kernel [L,D,F] = [2,64,256]: D over fsdp (across processes), F over tensor (within one).
        assert r["kernel_spec"] == [None, "fsdp", "tensor"]
        assert r["kernel_local_shapes"] == [[2, 32, 128], [2, 32, 128]]
    assert ref_losses[1] != ref_losses[0]                  # the second step saw updated params and new data
    # save_params wrote the FSDP-sharded params from both processes without gathering; they load back whole.
    from rlhf_jax.train.checkpoint import load_params  # noqa: PLC0415
    config, params = load_params(tmp_path / "final")
    assert config == ModelConfig.preset("tiny")
    sq = float(sum(np.sum(np.square(np.asarray(x), dtype=np.float64)) for x in jax.tree.leaves(params)))
    np.testing.assert_allclose(sq, ref_sq, rtol=1e-5)
