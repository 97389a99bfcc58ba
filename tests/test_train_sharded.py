"""Stages on a device mesh (8 simulated CPU devices) equal the one-device stages, and their states are sharded.

`run_sft` / `run_reward` / `run_dpo` / `run_ppo` with `mesh=...` must give the same per-step metrics and final
state as with `mesh=None` (1e-5, float32), and leave params and optimizer state split by the rule table. Adam
eps 1e-3 keeps Adam from amplifying float32 reduction-order noise; XLA backend optimisation is off only to
compile faster. Also: the experiment scripts' `--mesh` option, and `TrainState.create` not donating the
caller's rng key.
"""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _multihost_worker import make_sft_batches
from rlhf_jax import sharding as S
from rlhf_jax.generation import SamplingConfig
from rlhf_jax.models import ModelConfig, init_params
from rlhf_jax.train import stages
from rlhf_jax.train.optim import OptimConfig
from rlhf_jax.train.state import PPOState, create_train_state, with_score_head
from rlhf_jax.train.steps import compile_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = {"xla_backend_optimization_level": 0}
OPTIM = OptimConfig(learning_rate=1e-3, eps=1e-3, weight_decay=0.1)
CFG = ModelConfig.preset("tiny-llama", num_layers=1)            # D=64, F=128, N=4, K=2, V=259
B = 8


@pytest.fixture(autouse=True)
def _fast_compile(monkeypatch):
    monkeypatch.setattr(stages, "compile_step", functools.partial(compile_step, compiler_options=FAST))


@functools.lru_cache(maxsize=None)
def _params(seed, scalar_head=False):
    params = jax.device_get(init_params(CFG, jax.random.key(seed)))
    return with_score_head(params, CFG, seed + 100) if scalar_head else params


_make_state = jax.jit(lambda p: create_train_state(p, OPTIM, 0))   # one compiled init (cheaper on CPU)


def _spec(x):
    return tuple(x.sharding.spec)


def _host(x):
    return np.asarray(jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x)


def _close(got, want, tol=1e-5):
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(_host(x), _host(y), rtol=tol, atol=tol, err_msg=str(path))


def _same_history(got, want, *, one_flip=0.0):
    """Continuous metrics to 1e-5; a clip fraction (a count of tokens on either side of a boundary) may differ by
    `one_flip`, what one token flipping changes it by: float32 reduction order differs between layouts."""
    discrete = ("clipfrac", "clip_ratio")
    assert [h["step"] for h in got] == [h["step"] for h in want]
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        for k in w:
            atol = one_flip + 1e-6 if k.endswith(discrete) else 1e-6
            np.testing.assert_allclose(g[k], w[k], rtol=1e-5, atol=atol, err_msg=f"step {w['step']} {k}")


def _both(run, shape, one_flip=0.0):
    """run(mesh) -> (state, history) with mesh=None and on `shape`; the histories must agree."""
    ref_state, ref_hist = run(None)
    ref_state = jax.tree.map(_host, ref_state)
    mesh = S.make_mesh(shape)
    state, hist = run(mesh)
    _same_history(hist, ref_hist, one_flip=one_flip)
    _close(state, ref_state)
    return state, hist


def _preference_batches(n):
    chosen = make_sft_batches(CFG.vocab_size, num_steps=n, seed=1)
    rejected = make_sft_batches(CFG.vocab_size, num_steps=n, seq_len=6, seed=2)
    return [{"chosen": c, "rejected": r, "meta": ["host side"] * B} for c, r in zip(chosen, rejected)]


# ----------------------------------------------------------------------------------------------------- state
def test_create_train_state_leaves_the_callers_key_alive():
    key = jax.random.key(3)
    params = {"w": jnp.ones((3,))}
    step = compile_step(lambda s, b: (s.apply_gradients(jax.tree.map(lambda p: p * b, s.params)), {}))
    state, _ = step(create_train_state(params, OPTIM, key), jnp.float32(1.0))   # donates the whole state
    np.testing.assert_array_equal(jax.random.key_data(key), jax.random.key_data(jax.random.key(3)))
    again = create_train_state(params, OPTIM, key)                               # one key seeding two states
    np.testing.assert_array_equal(jax.random.key_data(again.rng), jax.random.key_data(key))
    assert float(state.params["w"][0]) < 1.0 and float(params["w"][0]) == 1.0


# ---------------------------------------------------------------------------------------------------- stages
def test_run_sft_on_mesh_equals_one_device_and_is_sharded():
    batches = make_sft_batches(CFG.vocab_size, num_steps=3)
    config = stages.SFTConfig(num_steps=3, log_every=1, optim=OPTIM)
    state, hist = _both(lambda mesh: stages.run_sft(_make_state(_params(0)), batches, config, model_config=CFG,
                                                    mesh=mesh), (2, 2, 2))
    assert len(hist) == 3 and int(state.step) == 3
    assert len({round(h["loss"], 6) for h in hist}) == 3                  # three different batches and updates
    up = state.params["layers"]["mlp"]["up"]["kernel"]                     # [L, D, F]
    mu = state.opt_state[1][0].mu["layers"]["mlp"]["up"]["kernel"]        # chain(clip, adamw) -> adam's mu
    assert _spec(up) == _spec(mu) == (None, "fsdp", "tensor")
    assert {s.data.shape for s in up.addressable_shards} == {(up.shape[0], 32, 64)}
    assert _spec(state.params["embed"]["embedding"]) == (None, "fsdp")
    assert state.step.sharding.is_fully_replicated and state.rng.sharding.is_fully_replicated
    moved = np.abs(np.asarray(up) - np.asarray(_params(0)["layers"]["mlp"]["up"]["kernel"])).max()
    assert moved > 1e-3                                                    # the stage did train


def test_run_reward_on_mesh_equals_one_device():
    config = stages.RewardConfig(num_steps=2, log_every=1, center_coef=0.01, optim=OPTIM)
    state, _ = _both(lambda mesh: stages.run_reward(_make_state(_params(0, True)), _preference_batches(2), config,
                                                    model_config=CFG, mesh=mesh), (2, 2, 2))
    assert _spec(state.params["score_head"]["kernel"]) == ("fsdp", None)
    assert _spec(state.params["layers"]["attn"]["k"]["kernel"]) == (None, "fsdp", "tensor", None)


def test_run_dpo_on_mesh_equals_one_device_with_and_without_precomputed_reference():
    ref = _params(7)
    config = stages.DPOConfig(num_steps=2, log_every=1, beta=0.1, optim=OPTIM)
    state, hist = _both(lambda mesh: stages.run_dpo(_make_state(_params(0)), _preference_batches(2), config,
                                                    model_config=CFG, ref_params=ref, mesh=mesh), (1, 1, 8))
    assert _spec(state.params["layers"]["mlp"]["up"]["kernel"]) == (None, None, "tensor")
    assert hist[0]["loss"] != pytest.approx(np.log(2), abs=1e-4)           # the reference differs from the policy
    pre = stages.DPOConfig(num_steps=2, log_every=1, beta=0.1, optim=OPTIM, precompute_ref_logps=True)
    pre_state, pre_hist = stages.run_dpo(_make_state(_params(0)), _preference_batches(2), pre, model_config=CFG,
                                         ref_params=ref, mesh=S.make_mesh((1, 1, 8)))
    _same_history(pre_hist, hist)
    _close(pre_state.params, state.params)
    np.testing.assert_array_equal(ref["embed"]["embedding"], _params(7)["embed"]["embedding"])   # ref untouched


@pytest.mark.parametrize("loss_type", ["simpo", "orpo"])
def test_run_reference_free_preference_on_mesh_equals_one_device(loss_type):
    config = stages.DPOConfig(num_steps=2, log_every=1, beta=2.0, loss_type=loss_type, optim=OPTIM)
    state, hist = _both(lambda mesh: stages.run_dpo(_make_state(_params(0)), _preference_batches(2), config,
                                                    model_config=CFG, mesh=mesh), (2, 2, 2))
    assert _spec(state.params["layers"]["mlp"]["up"]["kernel"]) == (None, "fsdp", "tensor")
    assert len({round(h["loss"], 6) for h in hist}) == 2


def test_run_kto_on_mesh_equals_one_device():
    ref = _params(7)
    comp = make_sft_batches(CFG.vocab_size, num_steps=2, seed=1)
    kl = make_sft_batches(CFG.vocab_size, num_steps=2, seed=3)
    flags = np.arange(B) % 3 == 0
    batches = [{"completion": c, "kl": k, "desirable": flags, "valid": np.arange(B) < B - 1}
               for c, k in zip(comp, kl)]
    config = stages.KTOConfig(num_steps=2, log_every=1, beta=0.5, optim=OPTIM)
    state, hist = _both(lambda mesh: stages.run_kto(_make_state(_params(0)), batches, config, model_config=CFG,
                                                    ref_params=ref, mesh=mesh), (2, 2, 2))
    assert _spec(state.params["layers"]["mlp"]["up"]["kernel"]) == (None, "fsdp", "tensor")
    assert len({round(h["loss"], 6) for h in hist}) == 2


def test_run_ppo_on_mesh_equals_one_device():
    P, N = 4, 4
    rng = np.random.default_rng(5)
    mask = (np.arange(P)[None] >= rng.integers(0, 3, B)[:, None]).astype(np.int32)               # left padded
    prompts = np.where(mask > 0, rng.integers(0, 256, (B, P)), 256).astype(np.int32)
    data = [{"prompts": prompts, "prompt_mask": mask, "meta": [{}] * B}]
    config = stages.PPOConfig(batch_size=B, sampling=SamplingConfig(max_new_tokens=N), num_epochs=1,
                              num_minibatches=2, num_steps=1,
                              kl_target=6.0, optim=OPTIM)
    policy, reward = _params(0), _params(1, True)

    def run(mesh):
        state = PPOState(policy=_make_state(policy), value=_make_state(reward), kl_coef=jnp.float32(0.05),
                         rng=jax.random.key(2), step=jnp.zeros((), jnp.int32))
        return stages.run_ppo(state, data, config, model_config=CFG, ref_params=policy, reward_params=reward,
                              mesh=mesh)

    # A clip fraction is a mean over num_epochs x num_minibatches minibatches of a fraction over each minibatch's
    # valid tokens (>= 1 per row): one flipped token moves it by at most 1 / (B * num_epochs).
    state, hist = _both(run, (2, 2, 2), one_flip=1.0 / (B * config.num_epochs))
    assert hist[0]["episode_length"] > 0 and hist[0]["kl_coef"] == pytest.approx(0.05)
    assert _spec(state.policy.params["layers"]["mlp"]["up"]["kernel"]) == (None, "fsdp", "tensor")
    assert _spec(state.value.opt_state[1][0].nu["score_head"]["kernel"]) == ("fsdp", None)
    assert state.kl_coef.sharding.is_fully_replicated


def test_run_grpo_on_mesh_equals_one_device():
    P, N = 4, 4
    rng = np.random.default_rng(6)
    mask = (np.arange(P)[None] >= rng.integers(0, 3, 4)[:, None]).astype(np.int32)                # left padded
    prompts = np.where(mask > 0, rng.integers(0, 256, (4, P)), 256).astype(np.int32)
    data = [{"prompts": prompts, "prompt_mask": mask, "meta": [{}] * 4}]
    config = stages.GRPOConfig(batch_size=4, num_generations=2, sampling=SamplingConfig(max_new_tokens=N),
                               num_iterations=2, num_minibatches=2, num_steps=1, kl_coef=0.05, clip_eps_high=0.28,
                               optim=OPTIM)
    policy, reward = _params(0), _params(1, True)
    run = lambda mesh: stages.run_grpo(_make_state(policy), data, config, model_config=CFG,  # noqa: E731
                                       ref_params=_params(2), reward_params=reward, mesh=mesh)
    state, hist = _both(run, (2, 2, 2), one_flip=1.0 / (8 * config.num_iterations))
    assert hist[0]["kl"] > 0 and hist[0]["policy/approxkl"] > 0
    assert _spec(state.params["layers"]["mlp"]["up"]["kernel"]) == (None, "fsdp", "tensor")


# --------------------------------------------------------------------------------------------------- scripts
def test_script_mesh_option_parses_and_rejects_bad_shapes(tmp_path, capsys):
    from rlhf_jax.cli.sft import SFTExperiment, main
    from rlhf_jax.config_cli import parse_cli

    assert parse_cli(SFTExperiment, ["--mesh", "-1", "1", "1"]).mesh == (-1, 1, 1)
    assert parse_cli(SFTExperiment, []).mesh is None
    assert main(["--mesh", "3", "1", "1", "--out", str(tmp_path / "never")]) == 2
    assert "needs 3 devices but 8 are given" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


def test_sft_script_runs_on_a_mesh(tmp_path):
    out = str(tmp_path / "run")
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "JAX_PLATFORMS": "cpu", "CI": "1", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    r = subprocess.run([sys.executable, "-m", "rlhf_jax.cli.sft", "--mesh", "2", "2", "2", "--out", out,
                        "--model.num-layers", "1", "--model.max-seq-len", "32", "--data.num-demo", "16",
                        "--data.batch-size", "8", "--data.seq-len", "32", "--sft.num-steps", "2",
                        "--sft.log-every", "1", "--sft.optim.warmup-steps", "1", "--checkpoint.save-every", "2",
                        "--checkpoint.no-tensorboard"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "mesh: data=2 fsdp=2 tensor=2 (8 devices, 1 processes)" in r.stderr
    lines = [json.loads(line) for line in open(os.path.join(out, "sft", "metrics.jsonl"))]
    assert [x["step"] for x in lines] == [1, 2] and all(np.isfinite(x["loss"]) for x in lines)
    assert os.path.exists(os.path.join(out, "sft", "final", "model_config.json"))
    assert os.listdir(os.path.join(out, "checkpoints", "sft")) == ["2"]
    # orbax records each saved array's sharding: the checkpointed state was split over fsdp (and tensor)
    specs = json.load(open(os.path.join(out, "checkpoints", "sft", "2", "state", "_sharding"))).values()
    assert any('"fsdp"' in v and '"tensor"' in v for v in specs)
    assert json.load(open(os.path.join(out, "config.json")))["mesh"] == [2, 2, 2]


def test_process_rows_gives_each_process_its_share():
    from rlhf_jax.data.iterators import ProcessRows

    class Source:
        def __init__(self):
            self.i = 0

        def __next__(self):
            self.i += 1
            return {"x": np.arange(8) + 10 * self.i, "meta": list("abcdefgh"), "scalar": np.float32(1.0),
                    "chosen": {"y": np.arange(16).reshape(8, 2)}}

        def state(self):
            return {"i": self.i}

        def restore(self, s):
            self.i = s["i"]

    rows = ProcessRows(Source(), process_index=1, process_count=4)
    b = next(rows)
    np.testing.assert_array_equal(b["x"], [12, 13])
    assert b["meta"] == ["c", "d"] and b["scalar"] == 1.0
    np.testing.assert_array_equal(b["chosen"]["y"], [[4, 5], [6, 7]])
    assert rows.state() == {"i": 1}
    rows.restore({"i": 5})
    np.testing.assert_array_equal(next(rows)["x"], [62, 63])
    with pytest.raises(ValueError, match="does not divide over 3 processes"):
        next(ProcessRows(Source(), process_index=0, process_count=3))


def test_run_sft_with_lora_on_mesh_equals_one_device():
    """LoRA SFT: adapters (split like their kernels' input and output axes) train, the base (sharded by the rule
    table) is read and never changed."""
    from rlhf_jax.lora import LoraConfig, init_lora
    lora = LoraConfig(rank=4, alpha=8.0)
    base = _params(0)
    adapters = jax.device_get(init_lora(base, CFG, lora, jax.random.key(5)))
    batches = make_sft_batches(CFG.vocab_size, num_steps=2)
    config = stages.SFTConfig(num_steps=2, log_every=1, optim=OPTIM)
    state, hist = _both(lambda mesh: stages.run_sft(_make_state(adapters), batches, config, model_config=CFG,
                                                    mesh=mesh, lora=lora, base_params=base), (2, 2, 2))
    assert set(state.params) == {"attn", "mlp"} and float(np.abs(np.asarray(state.params["mlp"]["up"]["b"])).max()) > 0
    up, o = state.params["mlp"]["up"], state.params["attn"]["o"]         # kernels (L,D,F): fsdp, tensor; o: (L,N,H,D)
    assert _spec(up["a"]) == (None, "fsdp", None) and _spec(up["b"]) == (None, None, "tensor")
    assert _spec(o["a"]) == (None, "tensor", None) and _spec(o["b"]) == (None, None, "fsdp")
    mu = state.opt_state[1][0].mu["mlp"]["up"]["a"]                       # Adam's moments follow their adapter
    assert _spec(mu) == (None, "fsdp", None)


def test_run_reward_with_lora_on_mesh_equals_one_device():
    """LoRA reward model: adapters and the trainable score head over a base that carries a head too (it was
    placed without one before, and a mesh run failed)."""
    from rlhf_jax.lora import LoraConfig, init_lora
    lora = LoraConfig(rank=4, alpha=8.0)
    base = _params(0, True)
    adapters = {**jax.device_get(init_lora(base, CFG, lora, jax.random.key(5))), "score_head": base["score_head"]}
    config = stages.RewardConfig(num_steps=2, log_every=1, optim=OPTIM)
    state, _ = _both(lambda mesh: stages.run_reward(_make_state(adapters), _preference_batches(2), config,
                                                    model_config=CFG, mesh=mesh, lora=lora, base_params=base),
                     (2, 2, 2))
    assert _spec(state.params["score_head"]["kernel"]) == ("fsdp", None)
    assert _spec(state.params["attn"]["q"]["a"]) == (None, "fsdp", None)
