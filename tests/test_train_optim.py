"""Optimizer: schedules at key steps, the weight-decay mask, and the learning rate reported under accumulation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.train import OptimConfig, TrainState, create_train_state, decay_mask, make_optimizer, make_schedule


def test_constant_with_warmup():
    s = make_schedule(OptimConfig(learning_rate=1.0, warmup_steps=10))
    np.testing.assert_allclose([s(0), s(5), s(10), s(999)], [0.0, 0.5, 1.0, 1.0], atol=1e-7)
    assert float(make_schedule(OptimConfig(learning_rate=0.3))(0)) == pytest.approx(0.3)


def test_cosine_key_steps():
    s = make_schedule(OptimConfig(learning_rate=2.0, schedule="cosine", warmup_steps=10, min_lr_ratio=0.1),
                      total_steps=110)
    end = 0.2
    np.testing.assert_allclose([s(0), s(10), s(60), s(110)], [0.0, 2.0, end + (2.0 - end) * 0.5, end], atol=1e-6)
    # Quarter of the decay: end + (lr - end) * (1 + cos(pi/4)) / 2.
    np.testing.assert_allclose(s(35), end + 1.8 * (1 + np.cos(np.pi / 4)) / 2, atol=1e-6)


def test_wsd_key_steps():
    s = make_schedule(OptimConfig(learning_rate=1.0, schedule="wsd", warmup_steps=10, decay_fraction=0.2,
                                  min_lr_ratio=0.0), total_steps=100)
    np.testing.assert_allclose([s(5), s(10), s(50), s(80), s(90), s(100)], [0.5, 1, 1, 1, 0.5, 0], atol=1e-6)


def test_schedule_needs_total_steps():
    with pytest.raises(ValueError, match="total_steps"):
        make_schedule(OptimConfig(schedule="cosine"))


def _params():
    return {"embed": {"embedding": jnp.ones((5, 4))},
            "layers": {"attn_norm": {"scale": jnp.ones((2, 4)), "bias": jnp.ones((2, 4))},
                       "mlp": {"up": {"kernel": jnp.ones((2, 4, 8)), "bias": jnp.ones((2, 8))}}}}


def test_decay_mask_by_name_not_rank():
    m = decay_mask(_params())
    assert m["layers"]["mlp"]["up"]["kernel"] and not m["layers"]["mlp"]["up"]["bias"]
    assert not m["layers"]["attn_norm"]["scale"]          # 2-D (stacked) but a norm: no decay
    assert not m["embed"]["embedding"]
    assert decay_mask(_params(), decay_embeddings=True)["embed"]["embedding"]


def test_weight_decay_hits_kernels_only():
    lr, wd = 0.1, 0.5
    tx = make_optimizer(OptimConfig(learning_rate=lr, weight_decay=wd, max_grad_norm=None))
    params = _params()
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    new = jax.tree.map(lambda p, u: p + u, params, updates)
    # Zero gradient: Adam's step is 0, so only the decoupled decay -lr * wd * p remains.
    np.testing.assert_allclose(new["layers"]["mlp"]["up"]["kernel"], 1 - lr * wd, rtol=1e-6)
    np.testing.assert_allclose(new["layers"]["mlp"]["up"]["bias"], 1.0)
    np.testing.assert_allclose(new["layers"]["attn_norm"]["scale"], 1.0)
    np.testing.assert_allclose(new["embed"]["embedding"], 1.0)


def test_learning_rate_counts_optimizer_updates_under_accumulation():
    params = {"w": {"kernel": jnp.ones((2, 2))}}
    state = create_train_state(params, OptimConfig(learning_rate=1.0, warmup_steps=4, grad_accum=2), 0)
    assert isinstance(state, TrainState)
    lrs = []
    for _ in range(4):
        lrs.append(float(state.learning_rate()))
        state = state.apply_gradients({"w": {"kernel": jnp.ones((2, 2))}})
    # Micro-steps 0,1 belong to update 0 (lr 0), micro-steps 2,3 to update 1 (lr 0.25).
    np.testing.assert_allclose(lrs, [0.0, 0.0, 0.25, 0.25])
    assert int(state.step) == 4
