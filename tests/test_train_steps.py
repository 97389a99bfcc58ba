"""SFT, reward and DPO steps: independent recomputation, last-token reads, log 2 at the start, learning."""
import jax
import numpy as np
import pytest

from rlhf_jax.losses import sft_loss
from rlhf_jax.models import ModelConfig, forward, init_params, scalar_forward
from rlhf_jax.models.sequences import sequence_scores
from rlhf_jax.train import (OptimConfig, create_train_state, make_dpo_step, make_reward_step, make_sft_step,
                            pair_scores, reference_logps, with_score_head)


def reward_scores(params, side, *, model_config):
    """Scores of one side of a preference batch: the chosen half of `pair_scores` (what training computes)."""
    return pair_scores(params, {"chosen": side, "rejected": side}, model_config=model_config)[0]

CFG = ModelConfig.preset("tiny", d_model=32, num_layers=1, num_heads=2, mlp_dim=64, max_seq_len=64)


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.PRNGKey(0))


def sft_batch(seed, B=4, T=10, lengths=None):
    """Right-padded rows; loss on the second half of each row's real tokens."""
    rs = np.random.RandomState(seed)
    lengths = lengths or [T] * B
    toks = rs.randint(0, 256, (B, T + 1)).astype(np.int32)
    seg = np.zeros((B, T), np.int32)
    mask = np.zeros((B, T), np.float32)
    for b, n in enumerate(lengths):
        seg[b, :n] = 1
        mask[b, n // 2:n] = 1
        toks[b, n + 1:] = 256
    return {"inputs": toks[:, :-1], "targets": toks[:, 1:], "loss_mask": mask, "segment_ids": seg,
            "positions": np.tile(np.arange(T, dtype=np.int32), (B, 1))}


def pref_batch(seed=0):
    return {"chosen": sft_batch(seed, lengths=[10, 7, 9, 6]), "rejected": sft_batch(seed + 1, lengths=[8, 10, 5, 9])}


def floats(m):
    return {k: float(v) for k, v in m.items()}


def test_sft_step_matches_loss_and_learns(params):
    batch = sft_batch(0, lengths=[10, 8, 6, 9])
    step = make_sft_step(CFG)
    state = create_train_state(params, OptimConfig(learning_rate=1e-2), 0)
    _, ref = sft_loss(forward(params, batch["inputs"], config=CFG, positions=batch["positions"],
                              segment_ids=batch["segment_ids"]), batch["targets"], batch["loss_mask"])
    # Independent numpy NLL on the same logits.
    logits = np.asarray(forward(params, batch["inputs"], config=CFG, segment_ids=batch["segment_ids"]))
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    nll = -np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
    want = (nll * batch["loss_mask"]).sum() / batch["loss_mask"].sum()
    losses = []
    for i in range(20):
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
        if i == 0:
            np.testing.assert_allclose(losses[0], float(ref["loss"]), rtol=1e-6)
            np.testing.assert_allclose(losses[0], want, rtol=1e-5)
            assert float(m["num_tokens"]) == batch["loss_mask"].sum()
            assert {"accuracy", "grad_norm", "learning_rate"} <= set(m)
    assert losses[-1] < 0.5 * losses[0]
    assert int(state.step) == 20


def test_grad_accumulation_equals_big_batch(params):
    big = sft_batch(3, B=4)
    halves = [{k: v[:2] for k, v in big.items()}, {k: v[2:] for k, v in big.items()}]
    opt = OptimConfig(learning_rate=1e-2, max_grad_norm=0.5)
    one = create_train_state(params, opt, 0)
    one, _ = make_sft_step(CFG)(one, big)
    acc = create_train_state(params, OptimConfig(learning_rate=1e-2, max_grad_norm=0.5, grad_accum=2), 0)
    step = make_sft_step(CFG)
    acc, _ = step(acc, halves[0])
    leaf = lambda s: np.asarray(s.params["layers"]["mlp"]["up"]["kernel"])  # noqa: E731
    np.testing.assert_array_equal(leaf(acc), np.asarray(params["layers"]["mlp"]["up"]["kernel"]))
    acc, _ = step(acc, halves[1])
    for a, b in zip(jax.tree.leaves(acc.params), jax.tree.leaves(one.params)):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert not np.allclose(leaf(one), params["layers"]["mlp"]["up"]["kernel"])


def test_reward_reads_last_real_token(params):
    rparams = with_score_head(params, CFG, 1)
    lengths = [10, 6, 8, 3]
    batch = sft_batch(0, lengths=lengths)
    r = np.asarray(reward_scores(rparams, batch, model_config=CFG))
    # The whole sequence of row b is inputs[b, 0] + targets[b, :n]: n + 1 tokens, read at its last one (the EOS a
    # reply ends with), independently recomputed on the reassembled [B, T+1] sequences.
    whole = np.concatenate([batch["inputs"][:, :1], batch["targets"]], axis=1)
    seg = (np.arange(11)[None] <= np.asarray(lengths)[:, None]).astype(np.int32)
    values = np.asarray(scalar_forward(rparams, whole, config=CFG, positions=np.tile(np.arange(11), (4, 1)),
                                       segment_ids=seg))
    np.testing.assert_allclose(r, values[np.arange(4), lengths], rtol=1e-6)
    pad_changed = {**batch, "inputs": batch["inputs"].copy(), "targets": batch["targets"].copy()}
    pad_changed["inputs"][1, 7] = 5                      # row 1 has 6 real tokens: index 7 is padding
    pad_changed["targets"][1, 7] = 5
    np.testing.assert_allclose(reward_scores(rparams, pad_changed, model_config=CFG), r, rtol=1e-6)
    last_changed = {**batch, "targets": batch["targets"].copy()}
    last_changed["targets"][1, 5] = (last_changed["targets"][1, 5] + 1) % 256   # row 1's final token
    r2 = np.asarray(reward_scores(rparams, last_changed, model_config=CFG))
    assert abs(r2[1] - r[1]) > 1e-6
    np.testing.assert_allclose(np.delete(r2, 1), np.delete(r, 1), rtol=1e-6)


def test_reward_training_and_rollout_scoring_read_the_same_tokens(params):
    """A conversation scored as a side of a preference batch (what the reward model trains on) and as a rollout
    (left-padded prompt + sampled reply ending with EOS, what PPO and best-of-n score) gets one score."""
    from rlhf_jax.data import PreferenceRecord, collate_preference, collate_prompts
    from rlhf_jax.data.batching import tokenize_preference
    from rlhf_jax.tokenizer import ByteTokenizer, encode_prompt
    tok, rparams = ByteTokenizer(), with_score_head(params, CFG, 1)
    convs = [("add 2 3", "5", "6"), ("reverse frog", "gorf", "I can't help with that.")]
    recs = [PreferenceRecord(prompt=({"role": "user", "content": p},), chosen=c, rejected=r) for p, c, r in convs]
    batch = collate_preference([tokenize_preference(tok, r) for r in recs], buckets=(62,), pad_id=tok.pad_id)
    trained = np.concatenate(pair_scores(rparams, batch, model_config=CFG))
    prompts = collate_prompts([encode_prompt(tok, r.prompt) for r in recs] * 2, buckets=(40,), pad_id=tok.pad_id)
    replies = [c for _, c, _ in convs] + [r for _, _, r in convs]
    N = 24
    resp = np.full((4, N), tok.pad_id, np.int32)
    resp_mask = np.zeros((4, N), np.int32)
    for i, text in enumerate(replies):
        ids = tok.encode(text) + [tok.eos_id]
        resp[i, :len(ids)], resp_mask[i, :len(ids)] = ids, 1
    mask = np.concatenate([prompts["prompt_mask"], resp_mask], axis=1)
    tokens = np.concatenate([prompts["prompts"], resp], axis=1)
    np.testing.assert_allclose(sequence_scores(rparams, tokens, mask, model_config=CFG), trained, rtol=1e-5,
                               atol=1e-6)


def test_reward_step_learns(params):
    state = create_train_state(with_score_head(params, CFG, 1), OptimConfig(learning_rate=3e-3), 0)
    step = make_reward_step(CFG, center_coef=0.01)
    batch = pref_batch()
    losses = []
    for _ in range(20):
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
    m = floats(m)
    assert losses[-1] < 0.5 * losses[0]
    assert m["accuracy"] == 1.0
    np.testing.assert_allclose(m["rewards/margins"], m["rewards/chosen"] - m["rewards/rejected"], rtol=1e-5)


def _seq_logps(params, batch):
    logits = np.asarray(forward(params, batch["inputs"], config=CFG, positions=batch["positions"],
                                segment_ids=batch["segment_ids"]), np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    tok = np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
    return (tok * batch["loss_mask"]).sum(-1)


def test_dpo_step_starts_at_log2_and_learns(params):
    batch = pref_batch()
    state = create_train_state(params, OptimConfig(learning_rate=3e-3), 0)
    step = make_dpo_step(CFG, beta=0.1)
    state, m = step(state, batch, params)
    m = floats(m)
    np.testing.assert_allclose(m["loss"], np.log(2), rtol=1e-6)
    np.testing.assert_allclose(m["rewards/chosen"], 0.0, atol=1e-6)
    np.testing.assert_allclose(m["logps/chosen"], _seq_logps(params, batch["chosen"]).mean(), rtol=1e-5)
    np.testing.assert_allclose(m["logps/rejected"], _seq_logps(params, batch["rejected"]).mean(), rtol=1e-5)
    # Precomputed reference logps (run_dpo's precompute path, exercised in test_train_stages) match numpy.
    pre = reference_logps(params, batch, model_config=CFG)
    np.testing.assert_allclose(pre["ref_chosen_logps"], _seq_logps(params, batch["chosen"]), rtol=1e-5)
    np.testing.assert_allclose(pre["ref_rejected_logps"], _seq_logps(params, batch["rejected"]), rtol=1e-5)
    for _ in range(19):
        state, m = step(state, batch, params)
    m = floats(m)
    assert m["loss"] < 0.5 * np.log(2)
    assert m["rewards/accuracies"] == 1.0 and m["rewards/margins"] > 0


def test_dpo_step_rpo_alpha_adds_the_chosen_nll(params):
    """At the reference the DPO part is log 2, so the RPO loss is log 2 + alpha * the chosen responses' NLL per
    response token (recomputed with numpy)."""
    batch = pref_batch()
    state = create_train_state(params, OptimConfig(learning_rate=3e-3), 0)
    m = floats(make_dpo_step(CFG, beta=0.1, rpo_alpha=0.5)(state, batch, params)[1])
    nll = -_seq_logps(params, batch["chosen"]).sum() / np.asarray(batch["chosen"]["loss_mask"]).sum()
    np.testing.assert_allclose(m["nll_chosen"], nll, rtol=1e-5)
    np.testing.assert_allclose(m["loss"], np.log(2) + 0.5 * nll, rtol=1e-5)


@pytest.mark.parametrize("loss_type", ["simpo", "orpo"])
def test_reference_free_preference_steps_match_numpy_and_learn(params, loss_type):
    """SimPO and ORPO through the DPO step: no reference params at all, the loss recomputed from numpy
    log-probs (float64 forward), and a few steps raise the chosen responses over the rejected ones."""
    batch = pref_batch()
    state = create_train_state(params, OptimConfig(learning_rate=3e-3), 0)
    step = make_dpo_step(CFG, beta=2.0, loss_type=loss_type, simpo_gamma=0.3, orpo_lambda=0.5)
    state, m = step(state, batch, None)
    m = floats(m)
    pc, pr = _seq_logps(params, batch["chosen"]), _seq_logps(params, batch["rejected"])
    lc = np.asarray(batch["chosen"]["loss_mask"]).sum(-1)
    lr = np.asarray(batch["rejected"]["loss_mask"]).sum(-1)
    ac, ar = pc / lc, pr / lr
    if loss_type == "simpo":
        want = np.mean(np.log1p(np.exp(-(2.0 * (ac - ar) - 0.3))))
    else:
        log_odds = lambda a: a - np.log1p(-np.exp(a))  # noqa: E731
        nll = -pc.sum() / lc.sum()
        want = nll + 0.5 * np.mean(np.log1p(np.exp(-(log_odds(ac) - log_odds(ar)))))
        np.testing.assert_allclose(m["nll_chosen"], nll, rtol=1e-5)
    np.testing.assert_allclose(m["loss"], want, rtol=1e-5)
    np.testing.assert_allclose(m["logps/chosen"], pc.mean(), rtol=1e-5)
    first = m["loss"]
    for _ in range(15):
        state, m = step(state, batch, None)
    assert float(m["loss"]) < first and float(m["rewards/accuracies"]) == 1.0


def test_kto_step_matches_numpy_and_learns(params):
    """KTO against a reference that differs from the policy: the loss recomputed from float64 numpy log-probs of
    the completion rows and of the mismatched rows (z0), a padding row ignored, and training separates the kinds."""
    from rlhf_jax.train import make_kto_step
    ref = init_params(CFG, jax.random.PRNGKey(1))
    comp, kl = sft_batch(3, lengths=[10, 7, 9, 6]), sft_batch(4, lengths=[8, 10, 5, 9])
    batch = {"completion": comp, "kl": kl, "desirable": np.array([True, False, True, False]),
             "valid": np.array([True, True, True, False])}
    state = create_train_state(params, OptimConfig(learning_rate=3e-3), 0)
    step = make_kto_step(CFG, beta=0.5, desirable_weight=1.0, undesirable_weight=1.5)
    state, m = step(state, batch, ref)
    m = floats(m)
    r = (_seq_logps(params, comp) - _seq_logps(ref, comp))[:3]
    z0 = max(0.0, float(np.mean((_seq_logps(params, kl) - _seq_logps(ref, kl))[:3])))
    sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    losses = [1 - sig(0.5 * (r[0] - z0)), 1.5 * (1 - sig(0.5 * (z0 - r[1]))), 1 - sig(0.5 * (r[2] - z0))]
    np.testing.assert_allclose(m["kl"], z0, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(m["loss"], np.mean(losses), rtol=1e-5)
    np.testing.assert_allclose(m["rewards/chosen"], 0.5 * np.mean(r[[0, 2]]), rtol=1e-4)
    np.testing.assert_allclose(m["rewards/rejected"], 0.5 * r[1], rtol=1e-4)
    for _ in range(15):
        state, m = step(state, batch, ref)
    m = floats(m)
    assert m["rewards/chosen"] > 0.5 * np.mean(r[[0, 2]]) and m["rewards/rejected"] < 0.5 * r[1]
