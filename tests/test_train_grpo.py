"""The GRPO stage: it learns a verifiable toy reward, every estimator and loss type runs, the reference is read only
with a KL term, and host rewards equal the same reward as a jittable function."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.generation import SamplingConfig
from rlhf_jax.models import ModelConfig, init_params
from rlhf_jax.tokenizer import ByteTokenizer
from rlhf_jax.train import GRPOConfig, OptimConfig, create_train_state, run_grpo

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
                sampling=SamplingConfig(max_new_tokens=6, temperature=1.0))
    return GRPOConfig(**{**base, **kw})


def test_grpo_learns_a_verifiable_reward_on_policy(params):
    config = _config(num_steps=30, log_every=5)
    state, hist = run_grpo(create_train_state(params, config.optim, 0), iter([_prompts()] * 30), config,
                           model_config=CFG, reward_fn=low_bytes)
    assert [h["step"] for h in hist] == [5, 10, 15, 20, 25, 30]
    assert hist[-1]["reward"] > hist[0]["reward"] + 0.15, [h["reward"] for h in hist]
    for h in hist:                                       # one pass over each batch: on-policy, ratio 1
        assert h["clip_ratio"] == 0.0 and h["policy/ratio_mean"] == pytest.approx(1.0, abs=1e-5)
        assert h["sampler/logprob_mismatch"] < 1e-4      # f32 on one CPU device: sampler == trainer
        assert 0.0 <= h["frac_reward_zero_std"] <= 1.0 and h["completions/mean_length"] > 0
    assert "kl" not in hist[0]                           # kl_coef 0: no reference at all
    # TRL's entropy: per response token (a sequence's sum would be ~6x larger), below log V for a near-uniform start.
    assert 0 < hist[0]["entropy"] < 1.2 * np.log(CFG.vocab_size), hist[0]["entropy"]


@pytest.mark.parametrize("advantage, loss_type, extra", [      # every estimator and loss type at least once
    ("grpo", "dapo", dict(clip_eps_high=0.28, num_iterations=2, num_minibatches=2, tis_cap=2.0, scale="batch")),
    ("rloo", "gspo", dict(kl_coef=0.05, kl_in="reward")),
    ("reinforce++", "cispo", dict(clip_eps_high=0.28, num_iterations=2, overlong_buffer=3, kl_coef=0.05,
                                  kl_in="reward")),
    ("reinforce++-baseline", "dr_grpo", dict(kl_coef=0.05, kl_estimator="k1")),
])
def test_every_estimator_and_loss_type_runs(params, advantage, loss_type, extra):
    config = _config(advantage=advantage, loss_type=loss_type, **extra)
    state, hist = run_grpo(create_train_state(params, config.optim, 0), iter([_prompts()] * 2), config,
                           model_config=CFG, ref_params=params, reward_fn=low_bytes)
    assert len(hist) == 2 and all(np.isfinite(h["loss"]) for h in hist)
    assert ("kl" in hist[0]) == (config.kl_coef > 0)
    if config.num_iterations > 1:                        # a second pass moves the ratio off 1
        assert hist[1]["policy/approxkl"] > 0


def test_reference_only_with_a_kl_term_and_config_checks(params):
    with pytest.raises(ValueError, match="needs ref_params"):
        run_grpo(create_train_state(params, OptimConfig(), 0), iter([_prompts()]), _config(kl_coef=0.1),
                 model_config=CFG, reward_fn=low_bytes)
    with pytest.raises(ValueError, match="rloo needs num_generations >= 2"):
        _config(advantage="rloo", num_generations=1)
    with pytest.raises(ValueError, match="must divide by num_minibatches"):
        _config(num_minibatches=3)
    with pytest.raises(ValueError, match="gspo needs a sequence advantage"):
        _config(advantage="reinforce++", loss_type="gspo")


def test_host_reward_equals_the_jittable_one(params):
    config = _config(num_generations=2)

    def low_bytes_text(prompt_texts, completions):
        assert len(prompt_texts) == len(completions) == 8 and prompt_texts[0] == prompt_texts[1]
        return np.array([sum(b < 128 for b in t.encode("utf-8", "surrogateescape")) for t in completions],
                        np.float32)

    def count_jit(prompts, responses, mask):           # the same count on token ids (U+FFFD is 3 bytes >= 128)
        return jnp.sum((responses < 128) * mask, 1).astype(jnp.float32)

    def run(**reward):
        return run_grpo(create_train_state(params, config.optim, 0), iter([_prompts()] * 2), config,
                        model_config=CFG, **reward)[1]

    ids, host = run(reward_fn=count_jit), run(host_reward_fn=low_bytes_text, tokenizer=TOK)
    assert max(h["reward"] for h in ids) > 0
    for a, b in zip(ids, host):
        for k in a:
            np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_dynamic_sampling_updates_on_informative_groups_first(params):
    from rlhf_jax.train.grpo import _informative_first
    from rlhf_jax.train.rl import Episodes
    G = 2
    ep = Episodes(tokens=np.arange(8)[:, None] * np.ones((1, 3), int), mask=np.ones((8, 3), int),
                  response_mask=np.ones((8, 2), int), sampler_logprobs=np.zeros((8, 2), np.float32))
    scores = np.array([1, 1, 0, 2, 3, 3, 5, 4], np.float32)               # groups 1 and 3 are informative
    informative = np.array([False, True, False, True])
    kept, kept_scores = _informative_first(ep, scores, informative, G, 3)
    np.testing.assert_array_equal(kept.tokens[:, 0], [2, 3, 6, 7, 0, 1])    # groups 1, 3, then 0 to fill
    np.testing.assert_array_equal(kept_scores, [0, 2, 5, 4, 1, 1])

    def half_constant(prompts, responses, mask):        # prompts ending in an even byte: every answer scores 0.5
        varied = jnp.sum((responses < 128) * mask, 1) / jnp.maximum(jnp.sum(mask, 1), 1)
        return jnp.where(prompts[:, -1] % 2 == 0, 0.5, varied)

    batch = _prompts()
    config = _config(dynamic_sampling_groups=2, num_minibatches=2)
    _, hist = run_grpo(create_train_state(params, config.optim, 0), iter([batch] * 2), config, model_config=CFG,
                       reward_fn=half_constant)
    odd = float(np.mean(batch["prompts"][:, -1] % 2 == 1))
    assert 0 < odd < 1
    for h in hist:       # the odd-ended prompts' groups are informative (unless all 4 answers tie, not here)
        assert h["dynamic_sampling/informative_fraction"] == pytest.approx(odd)
    with pytest.raises(ValueError, match="dynamic_sampling_groups must be <= batch_size"):
        _config(dynamic_sampling_groups=5)


def test_completions_table_and_step_numbers_with_several_updates_per_iteration(params):
    """Every completions_every iterations the hooks get completions_rows rows whose rewards are the verifier's on
    those very tokens; steps count iterations (not optimizer updates), also when a run continues a state."""
    from rlhf_jax.train.logging import StageHooks

    class Record(StageHooks):
        def __init__(self):
            self.samples = []

        def on_samples(self, step, rows):
            self.samples.append((step, rows))

    config = _config(num_iterations=2, num_minibatches=2, completions_every=2, completions_rows=3)
    assert config.updates_per_iteration == 4
    hook = Record()
    state, hist = run_grpo(create_train_state(params, config.optim, 0), iter([_prompts()] * 2), config,
                           model_config=CFG, reward_fn=low_bytes, hooks=hook)
    assert int(state.step) == 8 and [h["step"] for h in hist] == [1, 2]
    assert {"clip_ratio/low_mean", "clip_ratio/high_mean"} <= hist[0].keys()
    assert "completions/table" not in hist[0]
    _, more = run_grpo(state, iter([_prompts()] * 2), config, model_config=CFG, reward_fn=low_bytes, hooks=hook)
    assert [h["step"] for h in more] == [3, 4]
    assert [step for step, _ in hook.samples] == [2, 4]
    for _, rows in hook.samples:
        assert len(rows) == 3 and set(rows[0]) == {"prompt", "completion", "reward", "advantage"}
        for r in rows:
            ids = np.array(r["completion"])
            assert r["reward"] == pytest.approx(float(np.mean(ids < 128)) if len(ids) else 0.0, abs=1e-6)
    texts = Record()
    run_grpo(create_train_state(params, config.optim, 0), iter([_prompts()] * 2), config, model_config=CFG,
             reward_fn=low_bytes, tokenizer=TOK, hooks=texts)
    assert all(isinstance(r["prompt"], str) and isinstance(r["completion"], str) for r in texts.samples[0][1])


def test_lora_grpo_trains_adapters_with_the_base_as_reference(params):
    """LoRA GRPO: the state holds adapters; the base is the reference, so the first iteration's KL is 0 (b = 0);
    the host-scored path equals the one-program path."""
    from rlhf_jax.lora import LoraConfig, init_lora
    lora = LoraConfig(rank=4, alpha=8.0, targets=("q", "v", "up"))
    config = _config(kl_coef=0.05, num_minibatches=2)

    def count_text(prompt_texts, completions):
        return np.array([sum(b < 128 for b in t.encode("utf-8", "surrogateescape")) for t in completions], np.float32)

    def count_ids(prompts, responses, mask):
        return jnp.sum((responses < 128) * mask, 1).astype(jnp.float32)

    def run(**reward):
        state = create_train_state(init_lora(params, CFG, lora, jax.random.key(3)), config.optim, 0)
        return run_grpo(state, iter([_prompts()] * 2), config, model_config=CFG, ref_params=params, lora=lora,
                        **reward)

    state, ids = run(reward_fn=count_ids)
    _, host = run(host_reward_fn=count_text, tokenizer=TOK)
    assert set(state.params) == {"attn", "mlp"} and float(jnp.abs(state.params["mlp"]["up"]["b"]).max()) > 0
    assert ids[0]["kl"] == pytest.approx(0.0, abs=1e-6) and ids[1]["kl"] > 0
    for a, b in zip(ids, host):
        for k in a:
            np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-6, err_msg=k)
    with pytest.raises(ValueError, match="needs ref_params"):
        run_grpo(state, iter([_prompts()]), _config(), model_config=CFG, reward_fn=count_ids, lora=lora)
