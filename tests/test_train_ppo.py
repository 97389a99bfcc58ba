"""PPO: rollout shapes, masks, scores at EOS, KL 0 at the start; ratio 1 / clipfrac 0; learning a toy reward."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.generation import SamplingConfig, sample
from rlhf_jax.losses import adaptive_kl_update
from rlhf_jax.models import ModelConfig, init_params, scalar_forward
from rlhf_jax.train import (OptimConfig, PPOConfig, PPOState, create_train_state, init_ppo_state,
                            normalize_score_head, rollout, run_ppo, with_score_head)

CFG = ModelConfig.preset("tiny", d_model=32, num_layers=1, num_heads=2, mlp_dim=64, max_seq_len=64)
EOS, PAD = 258, 256


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.PRNGKey(0))


def prompts(B=8, P=5, seed=0):
    rs = np.random.RandomState(seed)
    toks = np.full((B, P), PAD, np.int32)
    mask = np.zeros((B, P), np.int32)
    for b in range(B):
        n = 1 + b % P                                   # left padded, lengths 1..P
        toks[b, P - n:] = rs.randint(97, 123, n)
        mask[b, P - n:] = 1
    return toks, mask


def _sampling(N, temperature):
    return SamplingConfig(max_new_tokens=N, temperature=temperature, eos_id=EOS, pad_id=PAD)


def _state(policy, value):
    """A PPOState holding `policy` and `value` (what `rollout` reads of a state)."""
    opt = OptimConfig(learning_rate=1e-3)
    return PPOState(policy=create_train_state(policy, opt, 0), value=create_train_state(value, opt, 1),
                    kl_coef=jnp.float32(0.05), rng=jax.random.PRNGKey(0), step=jnp.zeros((), jnp.int32))


def eos_biased(params, logit_boost=3.0):
    """Raise the EOS logit by about `logit_boost` everywhere (final LayerNorm bias along the EOS embedding)."""
    e = params["embed"]["embedding"][EOS]
    return {**params, "final_norm": {**params["final_norm"],
                                     "bias": params["final_norm"]["bias"] + logit_boost * e / jnp.sum(e * e)}}


def test_rollout(params):
    policy = eos_biased(params)
    reward = with_score_head(params, CFG, 3)
    config = PPOConfig(batch_size=8, sampling=_sampling(6, 0.7), value_init="policy")
    toks, mask = prompts()
    rng = jax.random.PRNGKey(5)
    run = jax.jit(rollout, static_argnames=("config", "model_config", "reward_fn"))
    r = run(_state(policy, with_score_head(policy, CFG, 4)), toks, mask, rng, policy, reward, config=config,
            model_config=CFG)
    ep = r.episodes
    B, P, N = 8, 5, 6
    assert ep.tokens.shape == (B, P + N) and r.logprobs.shape == (B, N) and r.scores.shape == (B,)
    np.testing.assert_array_equal(ep.tokens[:, :P], toks)
    resp, rmask = np.asarray(ep.tokens[:, P:]), np.asarray(ep.response_mask)
    lengths = rmask.sum(1)
    ends = np.asarray(ep.ends_with_eos(EOS))
    assert 0 < ends.sum() < B, "test needs rows with and without EOS"
    for b in range(B):
        n = lengths[b]
        np.testing.assert_array_equal(rmask[b], np.arange(N) < n)          # contiguous from t = 0
        assert (resp[b, n:] == PAD).all()
        assert ends[b] == (resp[b, n - 1] == EOS) and (EOS not in resp[b, :n - 1])
    np.testing.assert_array_equal(ep.mask, np.concatenate([mask, rmask], 1))
    # Same rng -> same tokens as `sample`; the recomputed forward logprobs match the sampler's (temperature 0.7).
    s = sample(policy, toks, mask, rng, config=CFG, max_new_tokens=N, temperature=0.7, eos_id=EOS, pad_id=PAD)
    np.testing.assert_array_equal(s.tokens, ep.tokens)
    np.testing.assert_allclose(r.logprobs, s.logprobs, atol=2e-5)
    np.testing.assert_array_equal(ep.sampler_logprobs, s.logprobs)
    # Reference == policy: identical logprobs, so the KL penalty starts at 0.
    np.testing.assert_allclose(r.ref_logprobs, r.logprobs, atol=1e-6)
    # Scores: the reward head at the last real token (EOS included), positions counted from the first real token.
    full_mask = np.concatenate([mask, rmask], 1)
    pos = np.maximum(np.cumsum(full_mask, 1) - 1, 0)
    v = np.asarray(scalar_forward(reward, ep.tokens, config=CFG, positions=pos, segment_ids=full_mask))
    np.testing.assert_allclose(r.scores, v[np.arange(B), P + lengths - 1], rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(r.values)[rmask == 0] == 0)


def test_init_ppo_state_value_init(params):
    reward = with_score_head(params, CFG, 3)
    cfg = PPOConfig(batch_size=8, value_init="reward")
    st = init_ppo_state(params, cfg, model_config=CFG, rng=0, reward_params=reward)
    np.testing.assert_array_equal(st.value.params["score_head"]["kernel"], reward["score_head"]["kernel"])
    assert st.value.params["score_head"]["kernel"] is not reward["score_head"]["kernel"]   # a copy: donation-safe
    st = init_ppo_state(params, PPOConfig(batch_size=8, value_init="policy"), model_config=CFG, rng=0)
    np.testing.assert_array_equal(st.value.params["embed"]["embedding"], params["embed"]["embedding"])
    assert st.value.params["score_head"]["kernel"].shape == (CFG.d_model, 1)
    assert float(st.kl_coef) == pytest.approx(cfg.kl_coef)
    with pytest.raises(ValueError, match="reward_params"):
        init_ppo_state(params, cfg, model_config=CFG, rng=0)


def test_run_ppo_learns_toy_reward(params):
    """One epoch, one minibatch: the update starts at the rollout params, so ratio == 1 and clipfrac == 0."""
    config = PPOConfig(num_steps=25, batch_size=8, num_epochs=1, num_minibatches=1, sampling=_sampling(6, 1.0),
                       kl_coef=0.01, kl_target=0.5, kl_horizon=100.0, value_init="policy",
                       missing_eos_penalty=None, optim=OptimConfig(learning_rate=1e-2), log_every=1)
    state = init_ppo_state(params, config, model_config=CFG, rng=1)

    def low_bytes(prompts, responses, mask):            # toy reward: fraction of response tokens < 128
        return jnp.sum((responses < 128) * mask, 1) / jnp.maximum(jnp.sum(mask, 1), 1)

    toks, mask = prompts()
    data = ({"prompts": toks, "prompt_mask": mask, "meta": ["host-only"] * 8} for _ in range(25))
    state, hist = run_ppo(state, data, config, model_config=CFG, ref_params=params, reward_fn=low_bytes)
    assert [h["step"] for h in hist] == list(range(1, 26)) and int(state.step) == 25
    assert hist[0]["objective/kl"] == pytest.approx(0.0, abs=1e-5)
    for h in hist:
        assert h["policy/clipfrac"] == 0.0 and h["val/ratio"] == pytest.approx(1.0, abs=1e-5)
        assert h["policy/approxkl"] == pytest.approx(0.0, abs=1e-6)
    first = np.mean([h["objective/scores"] for h in hist[:5]])
    last = np.mean([h["objective/scores"] for h in hist[-5:]])
    assert last > first + 0.15, (first, last)
    # The adaptive KL coefficient follows Ziegler et al.'s controller inside the jitted step.
    for a, b in zip(hist, hist[1:]):
        want = adaptive_kl_update(a["kl_coef"], a["objective/kl"], 8, target=0.5, horizon=100.0)
        np.testing.assert_allclose(b["kl_coef"], float(want), rtol=1e-5)
    assert hist[-1]["kl_coef"] != hist[0]["kl_coef"]
    np.testing.assert_allclose(hist[3]["objective/rlhf_reward"],
                               hist[3]["objective/scores"] + hist[3]["objective/non_score_reward"], rtol=1e-5)


def test_ppo_ptx_mixes_the_pretraining_nll(params):
    """PPO-ptx (InstructGPT eq. 2): with one epoch and one minibatch the update starts at the rollout params, so
    the reported loss/ptx is exactly the SFT NLL of those params on the ptx batch, and the ptx term moves the
    policy differently from plain PPO."""
    from rlhf_jax.losses import sft_loss
    from rlhf_jax.models import forward

    rs = np.random.RandomState(3)
    inputs = rs.randint(97, 123, (8, 12)).astype(np.int32)
    ptx = {"inputs": inputs, "targets": np.roll(inputs, -1, 1), "loss_mask": np.ones((8, 12), np.float32),
           "positions": np.tile(np.arange(12, dtype=np.int32), (8, 1)), "segment_ids": np.ones((8, 12), np.int32)}
    toks, mask = prompts()

    def run(ptx_coef):
        config = PPOConfig(num_steps=1, batch_size=8, num_epochs=1, num_minibatches=1, sampling=_sampling(4, 1.0),
                           value_init="policy", ptx_coef=ptx_coef,
                           optim=OptimConfig(learning_rate=1e-2), log_every=1)
        state = init_ppo_state(params, config, model_config=CFG, rng=1)
        data = iter([{"prompts": toks, "prompt_mask": mask}])
        return run_ppo(state, data, config, model_config=CFG, ref_params=params,
                       reward_fn=lambda p, r, m: jnp.sum(r < 110, 1) / 4.0,
                       ptx_data=iter([ptx]) if ptx_coef else None)

    with_ptx, hist = run(2.0)
    want, _ = sft_loss(forward(params, ptx["inputs"], config=CFG), ptx["targets"], ptx["loss_mask"])
    np.testing.assert_allclose(hist[0]["loss/ptx"], float(want), rtol=1e-4)
    without, hist0 = run(0.0)
    assert "loss/ptx" not in hist0[0]
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), with_ptx.policy.params, without.policy.params)
    assert max(jax.tree.leaves(moved)) > 1e-4


def test_normalize_score_head_rescales_rollout_scores(params):
    """Scores of the rollouts it was fitted on get mean 0 and std 1 (or the given targets); any other sequence's
    score goes through the same affine map, computed here in numpy from the old scores."""
    reward = with_score_head(params, CFG, 3)
    reward = {**reward, "score_head": {**reward["score_head"], "bias": reward["score_head"]["bias"] + 2.5}}
    config = PPOConfig(batch_size=8, sampling=_sampling(6, 1.0), value_init="policy")
    run = jax.jit(rollout, static_argnames=("config", "model_config", "reward_fn"))
    scores_of = lambda reward, seed: np.asarray(run(  # noqa: E731
        _state(params, reward), *prompts(seed=seed), jax.random.PRNGKey(seed), params, reward, config=config,
        model_config=CFG).scores, np.float64)
    fit, other = scores_of(reward, 0), scores_of(reward, 1)
    assert abs(fit.mean()) > 1.0 and abs(fit.std() - 1.0) > 0.1, "test needs scores away from mean 0, std 1"
    normalized = normalize_score_head(reward, fit)
    new_fit, new_other = scores_of(normalized, 0), scores_of(normalized, 1)
    np.testing.assert_allclose([new_fit.mean(), new_fit.std()], [0.0, 1.0], atol=1e-4)
    np.testing.assert_allclose(new_other, (other - fit.mean()) / fit.std(), rtol=1e-4, atol=1e-4)
    targeted = scores_of(normalize_score_head(reward, fit, mean=-1.0, std=0.5), 0)
    np.testing.assert_allclose([targeted.mean(), targeted.std()], [-1.0, 0.5], atol=1e-4)
    assert jax.tree.structure(normalized) == jax.tree.structure(reward)
    with pytest.raises(ValueError, match="score_head"):
        normalize_score_head(params, fit)


@pytest.mark.parametrize("scoring", ["reward_model", "host"])
def test_lora_ppo_starts_as_full_ppo_and_trains_only_adapters(params, scoring):
    """LoRA PPO: the states hold adapters only (and the value head). With B = 0 the merged models are their bases,
    so the first iteration (same keys, same samples) logs exactly what full-parameter PPO logs; later iterations
    move only the adapters, never the bases. Reward-model scoring (value from the reward model's base) and host
    scoring (value from the reference's base) both. (Learning is not asserted: with the embeddings and norms of a
    random tiny model frozen, the adapters cannot sharpen its near-uniform output; full PPO's test learns.)"""
    from rlhf_jax.lora import LoraConfig
    from rlhf_jax.tokenizer import ByteTokenizer
    lora = LoraConfig(rank=4, alpha=8.0, targets=("q", "v", "up", "down"))
    reward = with_score_head(init_params(CFG, jax.random.PRNGKey(7)), CFG, jax.random.PRNGKey(8))
    config = PPOConfig(num_steps=4, batch_size=8, num_epochs=1, num_minibatches=1, sampling=_sampling(6, 1.0),
                       kl_coef=0.01, missing_eos_penalty=None, optim=OptimConfig(learning_rate=3e-2), log_every=1,
                       value_init="reward" if scoring == "reward_model" else "policy")
    toks, mask = prompts()
    if scoring == "reward_model":
        kwargs = dict(reward_params=reward)
    else:
        kwargs = dict(host_reward_fn=lambda p, c: np.array([sum(ch < "\x80" for ch in t) / max(len(t), 1)
                                                            for t in c], np.float32), tokenizer=ByteTokenizer())
    full = init_ppo_state(params, config, model_config=CFG, rng=1, reward_params=reward)
    _, want = run_ppo(full, [{"prompts": toks, "prompt_mask": mask}], config, model_config=CFG, ref_params=params,
                      **kwargs)
    state = init_ppo_state(params, config, model_config=CFG, rng=1, reward_params=reward, lora=lora)
    assert set(state.policy.params) == {"attn", "mlp"} and set(state.value.params) == {"attn", "mlp", "score_head"}
    before = jax.tree.map(np.asarray, state.policy.params)
    state, hist = run_ppo(state, [{"prompts": toks, "prompt_mask": mask}] * 4, config, model_config=CFG,
                          ref_params=params, lora=lora, **kwargs)
    for k in want[0]:
        if k != "time":
            np.testing.assert_allclose(hist[0][k], want[0][k], rtol=1e-5, atol=1e-6, err_msg=k)
    moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()), state.policy.params, before)
    assert min(v for k, v in jax.tree_util.tree_flatten_with_path(moved)[0] if "b" in str(k[-1])) > 0
    assert hist[-1]["objective/kl"] != 0.0
    np.testing.assert_array_equal(np.asarray(params["layers"]["mlp"]["up"]["kernel"]),
                                  np.asarray(init_params(CFG, jax.random.PRNGKey(0))["layers"]["mlp"]["up"]["kernel"]))


def test_ppo_completions_table_every_n_iterations(params):
    """PPO logs, every completions_every iterations, completions_rows rows whose reward is the score of exactly
    those tokens (a jittable reward here) and whose advantage is the mean whitened GAE advantage over them."""
    from rlhf_jax.tokenizer import ByteTokenizer
    from rlhf_jax.train.logging import StageHooks

    class Record(StageHooks):
        def __init__(self):
            self.samples = []

        def on_samples(self, step, rows):
            self.samples.append((step, rows))

    def low_bytes(prompts, responses, mask):
        return jnp.sum((responses < 128) * mask, 1) / jnp.maximum(jnp.sum(mask, 1), 1)

    config = PPOConfig(num_steps=4, batch_size=8, num_epochs=1, num_minibatches=2, sampling=_sampling(6, 1.0),
                       value_init="policy", completions_every=2, completions_rows=3)
    toks, mask = prompts()
    hook = Record()
    state, hist = run_ppo(init_ppo_state(params, config, model_config=CFG, rng=1),
                          ({"prompts": toks, "prompt_mask": mask} for _ in range(4)), config, model_config=CFG,
                          ref_params=params, reward_fn=low_bytes, hooks=hook)
    assert [step for step, _ in hook.samples] == [2, 4] and "completions/table" not in hist[0]
    for _, rows in hook.samples:
        assert len(rows) == 3 and set(rows[0]) == {"prompt", "completion", "reward", "advantage"}
        for r, p, m in zip(rows, toks, mask):
            assert r["prompt"] == [int(t) for t, k in zip(p, m) if k]
            ids = np.array(r["completion"])
            assert r["reward"] == pytest.approx(float(np.mean(ids < 128)) if len(ids) else 0.0, abs=1e-6)
    texts = Record()
    run_ppo(state, ({"prompts": toks, "prompt_mask": mask} for _ in range(2)), config, model_config=CFG,
            ref_params=params, reward_fn=low_bytes, tokenizer=ByteTokenizer(), hooks=texts)
    assert [s for s, _ in texts.samples] == [6]  # steps continue from the state's
    assert all(isinstance(r["prompt"], str) for r in texts.samples[0][1])
