"""Online DPO: best/worst pairing with ties left out, the loss against a float64 numpy recomputation, learning a
verifiable toy reward, the reference refresh, host judges with gold agreement and logged pairs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.generation import SamplingConfig
from rlhf_jax.models import ModelConfig, forward, init_params
from rlhf_jax.tokenizer import ByteTokenizer
from rlhf_jax.train import (OnlineDPOConfig, OptimConfig, best_and_worst, create_train_state, online_dpo_sample,
                            online_dpo_update, run_online_dpo)
from rlhf_jax.train.logging import StageHooks

CFG = ModelConfig.preset("tiny", d_model=32, num_layers=1, num_heads=2, mlp_dim=64, max_seq_len=64)
TOK = ByteTokenizer()


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.PRNGKey(0))


def _prompts(B=4, P=5):
    rs = np.random.RandomState(0)
    mask = (np.arange(P)[None] >= np.arange(B)[:, None] % P).astype(np.int32)
    return {"prompts": np.where(mask > 0, rs.randint(97, 123, (B, P)), TOK.pad_id).astype(np.int32),
            "prompt_mask": mask}


def low_bytes(prompts, responses, mask):            # a verifiable toy reward: fraction of response bytes < 128
    return jnp.sum((responses < 128) * mask, 1) / jnp.maximum(jnp.sum(mask, 1), 1)


def _config(**kw):
    base = dict(num_steps=2, batch_size=4, num_generations=4, optim=OptimConfig(learning_rate=1e-2), log_every=1,
                sampling=SamplingConfig(max_new_tokens=6, temperature=1.0), beta=0.5)
    return OnlineDPOConfig(**{**base, **kw})


def test_best_and_worst_pick_per_group_and_flag_ties():
    scores = np.array([0.1, 0.7, 0.3, 0.5, 0.5, 0.5, 2.0, -1.0, 2.0], np.float32)
    c, r, inf = jax.device_get(best_and_worst(scores, 3))
    assert c.tolist() == [1, 3, 6] and r.tolist() == [0, 3, 7] and inf.tolist() == [True, False, True]


def _np_seq_logps(params, tokens, mask, P):
    """Float64 log-prob of each row's response tokens from the model's logits (positions = cumsum of the mask)."""
    tokens, mask = np.asarray(tokens), np.asarray(mask)
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    logits = np.asarray(forward(params, tokens, config=CFG, positions=positions, segment_ids=mask), np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    out = []
    for b in range(tokens.shape[0]):
        out.append(sum(logp[b, t - 1, tokens[b, t]] for t in range(P, tokens.shape[1]) if mask[b, t]))
    return np.array(out)


def test_update_loss_matches_numpy_and_leaves_ties_out(params):
    config = _config(num_generations=2)
    ref = init_params(CFG, jax.random.PRNGKey(1))
    state = create_train_state(params, config.optim, 0)
    state, ep = jax.jit(online_dpo_sample, static_argnames=("config", "model_config"))(
        state, _prompts(), None, config=config, model_config=CFG)
    scores = np.array([1.0, 0.0, 0.3, 0.3, -1.0, 2.0, 0.5, 0.4], np.float32)    # pair 2 is a tie
    _, m = online_dpo_update(state, ep, scores, ref, config=config, model_config=CFG)
    P = ep.prompt_len
    pol = _np_seq_logps(params, ep.tokens, ep.mask, P)
    rf = _np_seq_logps(ref, ep.tokens, ep.mask, P)
    chosen, rejected = [0, 5, 6], [1, 4, 7]
    h = 0.5 * ((pol[chosen] - rf[chosen]) - (pol[rejected] - rf[rejected]))
    np.testing.assert_allclose(m["loss"], np.mean(np.log1p(np.exp(-h))), rtol=1e-4)
    np.testing.assert_allclose(m["pairs/informative_fraction"], 0.75)
    np.testing.assert_allclose(m["judge/margin"], np.mean([1.0, 3.0, 0.1]), rtol=1e-5)
    np.testing.assert_allclose(m["logps/chosen"], pol[chosen].mean(), rtol=1e-4)


def test_online_dpo_learns_a_verifiable_reward(params):
    config = _config(num_steps=30, log_every=5)
    _, hist = run_online_dpo(create_train_state(params, config.optim, 0), iter([_prompts()] * 30), config,
                             model_config=CFG, ref_params=params, reward_fn=low_bytes)
    assert [h["step"] for h in hist] == [5, 10, 15, 20, 25, 30]
    assert hist[-1]["judge/score"] > hist[0]["judge/score"] + 0.15, [h["judge/score"] for h in hist]
    assert hist[0]["loss"] == pytest.approx(np.log(2), abs=0.05)


def test_reference_refreshed_every_iteration_keeps_the_loss_at_log2(params):
    """With the reference copied from the policy after every iteration and one update per iteration, each
    update starts at policy == reference: the DPO loss is exactly log 2 every time."""
    config = _config(num_steps=4, ref_refresh_every=1)
    _, hist = run_online_dpo(create_train_state(params, config.optim, 0), iter([_prompts()] * 4), config,
                             model_config=CFG, ref_params=params, reward_fn=low_bytes)
    np.testing.assert_allclose([h["loss"] for h in hist], np.log(2), rtol=1e-5)
    fixed = _config(num_steps=4)
    _, hist = run_online_dpo(create_train_state(params, fixed.optim, 0), iter([_prompts()] * 4), fixed,
                             model_config=CFG, ref_params=params, reward_fn=low_bytes)
    assert abs(hist[-1]["loss"] - np.log(2)) > 1e-3                       # a fixed reference drifts away


class _Pairs(StageHooks):
    def __init__(self):
        self.tables = []

    def on_samples(self, step, rows):
        self.tables.append((step, rows))


def test_host_judge_gold_agreement_and_logged_pairs(params):
    """A host judge of text that is the gold reward itself agrees with it on every decided pair; a judge that is
    its negation on none; pairs are logged with both scores."""
    def gold(prompts, completions):
        return np.array([sum(ch < "\x80" for ch in c) / max(len(c), 1) for c in completions], np.float32)

    for judge, want in ((gold, 1.0), (lambda p, c: -gold(p, c), 0.0)):
        hooks = _Pairs()
        config = _config(num_steps=2, pairs_every=2, pairs_rows=3)
        _, hist = run_online_dpo(create_train_state(params, config.optim, 0), iter([_prompts()] * 2), config,
                                 model_config=CFG, ref_params=params, host_reward_fn=judge, tokenizer=TOK,
                                 gold_reward_fn=gold, hooks=hooks)
        decided = sum(h["judge/gold_decided"] for h in hist)
        assert decided > 0
        assert sum(h["judge/gold_agree"] for h in hist) / decided == pytest.approx(want)
        (step, rows), = hooks.tables
        assert step == 2 and len(rows) == 3
        assert set(rows[0]) == {"prompt", "chosen", "rejected", "score_chosen", "score_rejected", "gold_chosen",
                                "gold_rejected"}
        assert all(r["score_chosen"] >= r["score_rejected"] for r in rows)


def test_online_dpo_config_and_stage_errors(params):
    with pytest.raises(ValueError, match="num_generations = 1 must be >= 2"):
        _config(num_generations=1)
    with pytest.raises(ValueError, match="exactly one reward source"):
        run_online_dpo(create_train_state(params, OptimConfig(), 0), [], _config(), model_config=CFG,
                       ref_params=params)
