"""Stage loop semantics (log windows, hooks, NaN, stop) and a tiny smoke run of SFT, reward and DPO stages."""
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.models import ModelConfig, init_params
from rlhf_jax.train import (DPOConfig, NonFiniteLossError, OptimConfig, RewardConfig, SFTConfig, StageHooks,
                            create_train_state,
                            run_dpo, run_loop, run_reward, run_sft, with_score_head)

CFG = ModelConfig.preset("tiny", d_model=32, num_layers=1, num_heads=2, mlp_dim=64, max_seq_len=64)


@flax.struct.dataclass
class Counter:
    step: jax.Array


def count_step(state, batch):
    """Toy transition: the loss of step s is batch["x"]; metrics stay on device like a real step's."""
    return Counter(step=state.step + 1), {"loss": jnp.asarray(batch["x"], jnp.float32), "s": state.step + 1.0}


class Recorder(StageHooks):
    def __init__(self, stop_after=None):
        self.steps, self.metrics, self.states, self.final = [], [], [], None
        self.stop_after = stop_after

    def on_step(self, step, metrics):
        self.steps.append(step)
        self.metrics.append(metrics)

    def on_state(self, step, state):
        assert int(state.step) == step
        self.states.append(step)

    def should_stop(self):
        return self.stop_after is not None and len(self.states) >= self.stop_after

    def finalize(self, step, state):
        self.final = step


def data(values, meta=True):
    for v in values:
        yield {"x": np.float32(v), **({"meta": ["host side"]} if meta else {})}


def test_run_loop_windows_and_hooks():
    hooks = Recorder()
    state, hist = run_loop(Counter(step=jnp.int32(10)), data(range(1, 8)), count_step, num_steps=5, log_every=2,
                           hooks=hooks)
    # Steps continue from the state's counter; logs at multiples of log_every and at the last step.
    assert hooks.steps == [12, 14, 15] and [h["step"] for h in hist] == [12, 14, 15]
    assert hist[0]["loss"] == pytest.approx(1.5) and hist[1]["loss"] == pytest.approx(3.5)   # window means
    assert hist[2]["loss"] == pytest.approx(5.0)
    assert hooks.states == [11, 12, 13, 14, 15] and hooks.final == 15 and int(state.step) == 15


def test_run_loop_stops_when_data_ends_or_hook_asks():
    _, hist = run_loop(Counter(step=jnp.int32(0)), data([1, 2, 3]), count_step, num_steps=10, log_every=2)
    assert [h["step"] for h in hist] == [2, 3]
    hooks = Recorder(stop_after=2)
    state, _ = run_loop(Counter(step=jnp.int32(0)), data(range(10)), count_step, num_steps=10, hooks=hooks)
    assert int(state.step) == 2 and hooks.final == 2


def test_non_finite_loss_names_the_step():
    hooks = Recorder()
    with pytest.raises(NonFiniteLossError, match="step 3") as err:
        run_loop(Counter(step=jnp.int32(0)), data([1, 2, np.nan, 4, 5]), count_step, num_steps=5, log_every=2,
                 hooks=hooks)
    assert err.value.step == 3 and np.isnan(err.value.metrics["loss"])
    assert hooks.steps == [2]                     # the window holding the NaN never reaches the hooks


def sft_batches(n, seed=0, B=4, T=8):
    rs = np.random.RandomState(seed)
    toks = rs.randint(0, 256, (B, T + 1)).astype(np.int32)
    batch = {"inputs": toks[:, :-1], "targets": toks[:, 1:], "loss_mask": np.ones((B, T), np.float32),
             "segment_ids": np.ones((B, T), np.int32), "positions": np.tile(np.arange(T, dtype=np.int32), (B, 1))}
    return [batch] * n


def pref_batches(n):
    c, r = sft_batches(1, 0)[0], sft_batches(1, 1)[0]
    return [{"chosen": c, "rejected": r}] * n


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.PRNGKey(0))


def test_stage_smoke_runs(params):
    opt = OptimConfig(learning_rate=1e-2, schedule="cosine", warmup_steps=2)
    sft_cfg = SFTConfig(num_steps=8, log_every=4, optim=opt)
    state = create_train_state(params, sft_cfg.optim, 0, total_steps=sft_cfg.num_steps)
    state, hist = run_sft(state, sft_batches(8), sft_cfg, model_config=CFG)
    assert [h["step"] for h in hist] == [4, 8] and hist[1]["loss"] < hist[0]["loss"]
    assert hist[0]["learning_rate"] == pytest.approx(np.mean([0, 5e-3, 1e-2, 1e-2 * (0.1 + 0.9 * 0.5 * (
        1 + np.cos(np.pi / 6)))]), rel=1e-5)
    sft_params = state.params

    rw_cfg = RewardConfig(num_steps=4, log_every=1, optim=OptimConfig(learning_rate=1e-2))
    rstate = create_train_state(with_score_head(sft_params, CFG, 1), rw_cfg.optim, 0)
    rstate, rhist = run_reward(rstate, pref_batches(4), rw_cfg, model_config=CFG)
    assert len(rhist) == 4 and rhist[-1]["loss"] < rhist[0]["loss"]

    dpo_cfg = DPOConfig(num_steps=4, log_every=1, precompute_ref_logps=True, optim=OptimConfig(learning_rate=1e-2))
    dstate = create_train_state(sft_params, dpo_cfg.optim, 0)
    dstate, dhist = run_dpo(dstate, pref_batches(4), dpo_cfg, model_config=CFG, ref_params=sft_params)
    assert dhist[0]["loss"] == pytest.approx(np.log(2), rel=1e-5)     # the SFT params are policy and reference
    assert dhist[-1]["loss"] < dhist[0]["loss"]
    np.testing.assert_array_equal(sft_params["embed"]["embedding"], state.params["embed"]["embedding"])
