"""Sharded steps on 8 simulated CPU devices equal the one-device run, and the arrays really are sharded.

Every stage step is compiled through `sharding.jit_sharded`; the reference is the same step on a one-device mesh.
Optimizer settings (lr 1e-3, Adam eps 1e-3) keep Adam from amplifying float32 reduction-order noise in tiny
gradients, so updated params agree to 1e-5. XLA backend optimisation is off here only to compile faster.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from _multihost_worker import make_sft_batches
from rlhf_jax import sharding as S
from rlhf_jax.generation import sample
from rlhf_jax.models import ModelConfig, init_params, param_logical_axes
from rlhf_jax.train.optim import OptimConfig
from rlhf_jax.train.state import PPOState, create_train_state
from rlhf_jax.train.steps import dpo_step, reward_step, sft_step

FAST = {"xla_backend_optimization_level": 0}
OPTIM = OptimConfig(learning_rate=1e-3, eps=1e-3, weight_decay=0.1)
MESHES = [(8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 1, 8)]
B, T = 8, 8


def _mesh(shape):
    return S.make_mesh(shape) if shape is not None else S.make_mesh((1, 1, 1), devices=jax.devices()[:1])


def _spec(x):
    return tuple(x.sharding.spec)


def _close(a, b, tol=1e-5):
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=tol, rtol=tol, err_msg=str(path))


# ------------------------------------------------------------------------------------------------- mesh, rules
def test_make_mesh_shapes_and_errors():
    assert dict(S.make_mesh().shape) == {"data": 8, "fsdp": 1, "tensor": 1}
    assert dict(S.make_mesh((2, -1, 2)).shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert S.make_mesh((1, 1, 2), devices=jax.devices()[:2]).devices.size == 2
    for bad in [(3, 1, 1), (2, 2), (-1, -1, 2), (-1, 3, 1)]:
        with pytest.raises(ValueError):
            S.make_mesh(bad)


def _rule_property(config, mesh, scalar_head):
    """Each dim is split over exactly the rule's mesh axis when that divides it, else replicated."""
    rules = dict(S.DEFAULT_RULES)
    shardings = S.params_sharding(config, mesh, scalar_head=scalar_head)
    shapes = jax.eval_shape(lambda: init_params(config, jax.random.key(0), scalar_head=scalar_head))
    names = param_logical_axes(config, scalar_head=scalar_head)
    is_axes = lambda x: isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)  # noqa: E731
    for sh, shape, logical in zip(jax.tree.leaves(shardings), jax.tree.leaves(shapes),
                                  jax.tree.leaves(names, is_leaf=is_axes)):
        assert len(sh.spec) == len(shape.shape) == len(logical)
        for dim, got, name in zip(shape.shape, sh.spec, logical):
            target = rules.get(name)
            want = target if target is not None and mesh.shape[target] > 1 and dim % mesh.shape[target] == 0 \
                else None
            assert got == want, (logical, shape.shape, sh.spec)


@pytest.mark.parametrize("preset", ["tiny", "tiny-llama"])
def test_rule_table_property_on_every_mesh(preset):
    config = ModelConfig.preset(preset)
    for shape in MESHES + [(2, 1, 4), (1, 2, 4)]:
        _rule_property(config, S.make_mesh(shape), scalar_head=True)


def test_indivisible_dims_are_replicated():
    cfg = ModelConfig.preset("tiny-llama")               # K=2 kv heads, N=4 heads, V=259 (prime), F=128
    sh = S.params_sharding(cfg, S.make_mesh((2, 1, 4)))
    attn = sh["layers"]["attn"]
    assert tuple(attn["k"]["kernel"].spec) == (None, None, None, None)     # K=2 on tensor=4: replicated
    assert tuple(attn["q"]["kernel"].spec) == (None, None, "tensor", None)  # N=4 on tensor=4: split
    assert tuple(sh["lm_head"]["kernel"].spec) == (None, None)              # V=259 never divides
    sh = S.params_sharding(cfg, S.make_mesh((1, 4, 2)))
    assert tuple(sh["layers"]["attn"]["k"]["kernel"].spec) == (None, "fsdp", "tensor", None)
    assert tuple(sh["embed"]["embedding"].spec) == (None, "fsdp")


def test_logical_to_mesh_custom_rules_and_no_shapes():
    mesh = S.make_mesh((2, 2, 2))
    tree = {"w": ("embed", "mlp"), "b": ("mlp",), "s": ()}
    out = S.logical_to_mesh(tree, mesh)
    assert [tuple(out[k].spec) for k in ("w", "b", "s")] == [("fsdp", "tensor"), ("tensor",), ()]
    rules = (("embed", ("data", "fsdp")), ("mlp", "tensor"))               # ZeRO-3 over data and fsdp
    out = S.logical_to_mesh(tree, mesh, rules, shapes={"w": np.zeros((8, 6)), "b": np.zeros(5), "s": 0.0})
    assert tuple(out["w"].spec) == (("data", "fsdp"), "tensor")
    assert tuple(out["b"].spec) == (None,)                                  # 5 does not divide by 2


# ----------------------------------------------------------------------------------------- optimizer state
@pytest.mark.parametrize("tx_kind", ["adamw", "accum", "adafactor"])
def test_state_sharding_mirrors_params_in_opt_state(tx_kind):
    cfg = ModelConfig.preset("tiny-llama")
    mesh = S.make_mesh((1, 4, 2))
    params = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    psh = S.params_sharding(cfg, mesh)
    if tx_kind == "adafactor":
        tx = optax.adafactor(1e-3)
        state = jax.eval_shape(lambda p: {"params": p, "opt_state": tx.init(p)}, params)
    else:
        optim = OPTIM if tx_kind == "adamw" else OptimConfig(grad_accum=2)
        state = jax.eval_shape(lambda p: create_train_state(p, optim, 0), params)
    ssh = S.state_sharding(state, psh, mesh)
    mirrored = 0
    for (path, sh), leaf in zip(jax.tree_util.tree_leaves_with_path(ssh), jax.tree.leaves(state)):
        keys = [getattr(k, "key", getattr(k, "name", None)) for k in path]
        sh.shard_shape(leaf.shape)                                           # raises if a spec misfits
        if "up" in keys and leaf.shape == (2, 64, 128):
            assert tuple(sh.spec) == (None, "fsdp", "tensor"), keys
            mirrored += 1
        if leaf.ndim == 0:
            assert sh.is_fully_replicated, keys
    # params + mu + nu (+ accumulated grads under MultiSteps); Adafactor: params + unfactored v (its factored
    # v_row / v_col placeholders of shape (1,) fall back to replicated).
    assert mirrored == {"adamw": 3, "accum": 4, "adafactor": 2}[tx_kind]


# --------------------------------------------------------------------------------------------- sharded steps
@functools.lru_cache(maxsize=None)
def _init(cfg, seed, scalar_head):
    # One compiled init per model (cheaper on CPU than optax's eager per-leaf init ops).
    return jax.jit(lambda key: create_train_state(init_params(cfg, key, scalar_head=scalar_head), OPTIM, seed))


def _sft_state(cfg, seed=0, scalar_head=False):
    return _init(cfg, seed, scalar_head)(jax.random.key(seed))


def _run(step, cfg, make_state, batch, shape, *, scalar_head=False, extra=(), **options):
    """One step on mesh `shape` (None: one device) -> (state, metrics, mesh)."""
    mesh = _mesh(shape)
    psh = S.params_sharding(cfg, mesh, scalar_head=scalar_head)
    state = make_state()
    ssh = S.state_sharding(state, psh, mesh)
    extra_sh = tuple(S.params_sharding(cfg, mesh) for _ in extra)
    fn = S.jit_sharded(step, mesh, ssh, S.batch_sharding(mesh), extra_in_shardings=extra_sh,
                       compiler_options=FAST, **options)
    new, metrics = fn(S.shard(state, ssh), S.shard_batch(batch, mesh),
                      *[S.shard(e, sh) for e, sh in zip(extra, extra_sh)])
    return new, metrics, mesh


@functools.lru_cache(maxsize=None)
def _sft_reference():
    cfg = ModelConfig.preset("tiny-llama")
    batch = make_sft_batches(cfg.vocab_size, num_steps=1)[0]
    state, metrics, _ = _run(sft_step, cfg, lambda: _sft_state(cfg), batch, None, model_config=cfg)
    return cfg, batch, jax.device_get(state.params), jax.device_get(metrics)


# (mesh, MLP up kernel [L,D,F] spec, embedding [V,D] spec); tiny-llama: D=64, F=128, N=4, K=2, V=259.
EXPECTED = {
    (8, 1, 1): ((None, None, None), (None, None)),
    (2, 4, 1): ((None, "fsdp", None), (None, "fsdp")),
    (2, 2, 2): ((None, "fsdp", "tensor"), (None, "fsdp")),
    (1, 1, 8): ((None, None, "tensor"), (None, None)),
}


@pytest.mark.parametrize("shape", MESHES)
def test_sft_step_sharded_equals_one_device(shape):
    cfg, batch, ref_params, ref_metrics = _sft_reference()
    state, metrics, mesh = _run(sft_step, cfg, lambda: _sft_state(cfg), batch, shape, model_config=cfg)
    for k in ("loss", "grad_norm", "accuracy", "num_tokens"):
        np.testing.assert_allclose(float(metrics[k]), float(ref_metrics[k]), rtol=1e-5, err_msg=k)
    _close(state.params, ref_params)
    moved = jax.tree.map(lambda a, b: np.abs(np.asarray(a) - np.asarray(b)).max(), state.params,
                         jax.device_get(_sft_state(cfg).params))
    assert max(jax.tree.leaves(moved)) > 5e-4                              # the step did update the params

    up_spec, embed_spec = EXPECTED[shape]
    up = state.params["layers"]["mlp"]["up"]["kernel"]
    mu = state.opt_state[1][0].mu["layers"]["mlp"]["up"]["kernel"]        # chain(clip, adamw) -> adam's mu
    assert _spec(up) == _spec(mu) == up_spec
    assert _spec(state.params["embed"]["embedding"]) == embed_spec
    want = tuple(d // math.prod(mesh.shape[a] for a in ([s] if s else [])) for d, s in zip(up.shape, up_spec))
    assert {s.data.shape for s in up.addressable_shards} == {want}
    assert len(up.addressable_shards) == 8
    assert state.step.sharding.is_fully_replicated
    if shape == (1, 1, 8):                                                 # N=4, K=2 do not divide by 8
        assert state.params["layers"]["attn"]["q"]["kernel"].sharding.is_fully_replicated
    if shape == (2, 2, 2):
        assert _spec(state.params["layers"]["attn"]["k"]["kernel"]) == (None, "fsdp", "tensor", None)
    rows = B // (mesh.shape["data"] * mesh.shape["fsdp"])
    batch_arr = S.shard_batch(batch, mesh)["inputs"]
    assert {s.data.shape for s in batch_arr.addressable_shards} == {(rows, T)}


def _preference_batch(vocab):
    chosen = make_sft_batches(vocab, num_steps=1, seed=1)[0]
    rejected = make_sft_batches(vocab, num_steps=1, seq_len=6, seed=2)[0]
    return {"chosen": chosen, "rejected": rejected}


def _compare_one_step(step, cfg, make_state, batch, shape, *, scalar_head=False, extra=(), **options):
    ref, ref_m, _ = _run(step, cfg, make_state, batch, None, scalar_head=scalar_head, extra=extra, **options)
    got, got_m, _ = _run(step, cfg, make_state, batch, shape, scalar_head=scalar_head, extra=extra, **options)
    for k in ref_m:
        np.testing.assert_allclose(float(got_m[k]), float(ref_m[k]), rtol=1e-5, atol=1e-6, err_msg=k)
    _close(jax.device_get(got), jax.device_get(ref))
    return got


def test_reward_step_sharded_equals_one_device():
    cfg = ModelConfig.preset("tiny-llama")
    state = _compare_one_step(reward_step, cfg, lambda: _sft_state(cfg, scalar_head=True),
                              _preference_batch(cfg.vocab_size), (2, 2, 2), scalar_head=True, model_config=cfg,
                              center_coef=0.01)
    assert _spec(state.params["score_head"]["kernel"]) == ("fsdp", None)


def test_dpo_step_sharded_equals_one_device():
    cfg = ModelConfig.preset("tiny")
    ref_params = _sft_state(cfg, seed=7).params
    state = _compare_one_step(dpo_step, cfg, lambda: _sft_state(cfg), _preference_batch(cfg.vocab_size),
                              (1, 1, 8), extra=(ref_params,), model_config=cfg, beta=0.1)
    assert _spec(state.params["layers"]["mlp"]["up"]["kernel"]) == (None, None, "tensor")


def test_ppo_update_sharded_equals_one_device():
    from rlhf_jax.generation import SamplingConfig
    from rlhf_jax.train.ppo import PPOConfig, Rollout, ppo_update
    from rlhf_jax.train.rl import Episodes

    cfg = ModelConfig.preset("tiny-llama")
    pcfg = PPOConfig(batch_size=B, sampling=SamplingConfig(max_new_tokens=4), num_epochs=1, num_minibatches=2,
                     kl_target=6.0)
    Pn, N = 4, 4
    rng = np.random.default_rng(3)
    prompt_mask = (np.arange(Pn)[None] >= rng.integers(0, 3, B)[:, None]).astype(np.int32)    # left padded
    response_mask = (np.arange(N)[None] < rng.integers(1, N + 1, B)[:, None]).astype(np.int32)
    tokens = rng.integers(0, 260, (B, Pn + N)).astype(np.int32)          # 258 = EOS ends some responses
    episodes = Episodes(tokens=tokens, mask=np.concatenate([prompt_mask, response_mask], 1),
                        response_mask=response_mask, sampler_logprobs=np.zeros((B, N), np.float32))
    data = Rollout(episodes=episodes,
                   logprobs=(-rng.random((B, N)) * 3 * response_mask).astype(np.float32),
                   ref_logprobs=(-rng.random((B, N)) * 3 * response_mask).astype(np.float32),
                   values=(rng.normal(size=(B, N)) * response_mask).astype(np.float32),
                   scores=rng.normal(size=B).astype(np.float32))

    def make_state():
        return PPOState(policy=_sft_state(cfg), value=_sft_state(cfg, seed=1, scalar_head=True),
                        kl_coef=jnp.float32(0.05), rng=jax.random.PRNGKey(0), step=jnp.zeros((), jnp.int32))

    def run(shape):
        mesh = _mesh(shape)
        psh = [S.params_sharding(cfg, mesh), S.params_sharding(cfg, mesh, scalar_head=True)]
        state = make_state()
        ssh = S.state_sharding(state, psh, mesh)
        fn = S.jit_sharded(ppo_update, mesh, ssh, S.batch_sharding(mesh), extra_in_shardings=(S.replicated(mesh),),
                           compiler_options=FAST, config=pcfg, model_config=cfg)
        return fn(S.shard(state, ssh), S.shard_batch(data, mesh), jax.random.PRNGKey(1))

    ref, ref_m = run(None)
    got, got_m = run((2, 2, 2))
    for k in ref_m:
        np.testing.assert_allclose(float(got_m[k]), float(ref_m[k]), rtol=1e-5, atol=1e-6, err_msg=k)
    _close(jax.device_get(got), jax.device_get(ref))
    assert _spec(got.value.params["layers"]["mlp"]["up"]["kernel"]) == (None, "fsdp", "tensor")
    assert _spec(got.value.opt_state[1][0].nu["score_head"]["kernel"]) == ("fsdp", None)
    assert got.kl_coef.sharding.is_fully_replicated


# ----------------------------------------------------------------------------------------------- generation
def test_greedy_generation_with_sharded_params_and_batch():
    cfg = ModelConfig.preset("tiny-llama")
    params = _sft_state(cfg).params
    rng = np.random.default_rng(4)
    prompts = rng.integers(0, 256, (B, 5)).astype(np.int32)
    mask = (np.arange(5)[None] >= rng.integers(0, 3, B)[:, None]).astype(np.int32)
    prompts = np.where(mask > 0, prompts, 256)
    kw = dict(config=cfg, max_new_tokens=4, temperature=0.0, eos_id=258, pad_id=256)
    ref = sample(params, prompts, mask, jax.random.key(1), **kw)
    mesh = S.make_mesh((2, 2, 2))
    sharded_params = S.shard_params(params, cfg, mesh)
    batch = S.shard_batch({"prompts": prompts, "mask": mask}, mesh)
    got = sample(sharded_params, batch["prompts"], batch["mask"], jax.random.key(1), **kw)
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(ref.tokens))
    np.testing.assert_allclose(np.asarray(got.logprobs), np.asarray(ref.logprobs), atol=1e-5)
    assert len(sharded_params["layers"]["mlp"]["up"]["kernel"].sharding.device_set) == 8


def test_shard_batch_rejects_indivisible_batch():
    with pytest.raises(ValueError, match="divisible by data\\*fsdp"):
        S.shard_batch({"x": np.zeros((6, 3))}, S.make_mesh((4, 2, 1)))
    out = S.shard_batch({"x": np.zeros((6, 3))}, S.make_mesh((2, 1, 4)))
    assert tuple(out["x"].sharding.spec) == (("data", "fsdp"),)


def test_initialize_distributed_is_a_noop_on_one_process():
    S.initialize_distributed()
    S.initialize_distributed("localhost:1", num_processes=1, process_id=0)
    assert not jax.distributed.is_initialized() and jax.process_count() == 1
