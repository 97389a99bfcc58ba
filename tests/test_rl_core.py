"""The RL core (rlhf_jax.train.rl): grouped sampling, the epochs x minibatches driver, host-side rewards."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.generation import SamplingConfig, sample
from rlhf_jax.models import ModelConfig, init_params
from rlhf_jax.tokenizer import ByteTokenizer
from rlhf_jax.train import OptimConfig, PPOConfig, init_ppo_state, run_ppo
from rlhf_jax.train.rl import decode_responses, epochs_minibatches, host_scores, sample_episodes

CFG = ModelConfig.preset("tiny", d_model=32, num_layers=1, num_heads=2, mlp_dim=64, max_seq_len=64)
TOK = ByteTokenizer()


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.PRNGKey(0))


def _prompts(B=4, P=5):
    rs = np.random.RandomState(0)
    mask = (np.arange(P)[None] >= np.arange(B)[:, None] % P).astype(np.int32)     # left padded, lengths 5..2
    return np.where(mask > 0, rs.randint(97, 123, (B, P)), TOK.pad_id).astype(np.int32), mask


def test_grouped_sampling_repeats_each_prompt_in_consecutive_rows(params):
    prompts, mask = _prompts()
    greedy = SamplingConfig(max_new_tokens=6, temperature=0.0)
    ep = sample_episodes(params, prompts, mask, jax.random.PRNGKey(1), sampling=greedy, model_config=CFG,
                         num_samples_per_prompt=3)
    assert ep.tokens.shape == (12, 11) and ep.response_mask.shape == (12, 6)
    one = sample(params, prompts, mask, jax.random.PRNGKey(1), config=CFG, **greedy.sample_kwargs())
    np.testing.assert_array_equal(ep.tokens, np.repeat(np.asarray(one.tokens), 3, axis=0))    # greedy: all equal
    np.testing.assert_array_equal(ep.mask, np.concatenate([np.repeat(mask, 3, 0), ep.response_mask], 1))
    sampled = sample_episodes(params, prompts, mask, jax.random.PRNGKey(1), model_config=CFG,
                              sampling=SamplingConfig(max_new_tokens=6, temperature=1.0), num_samples_per_prompt=3)
    groups = np.asarray(sampled.responses).reshape(4, 3, 6)
    assert any(len({tuple(r) for r in g}) > 1 for g in groups)                      # samples differ within groups
    np.testing.assert_array_equal(np.asarray(sampled.tokens)[:, :5], np.repeat(prompts, 3, 0))
    with pytest.raises(ValueError, match="num_samples_per_prompt"):
        sample_episodes(params, prompts, mask, jax.random.PRNGKey(1), sampling=greedy, model_config=CFG,
                        num_samples_per_prompt=0)


def test_epochs_minibatches_visits_every_row_once_per_epoch():
    data = {"x": jnp.arange(8, dtype=jnp.float32)}
    extra = {"y": jnp.arange(4, dtype=jnp.float32) * 10}

    def update(carry, mb, extra_mb):
        return carry + jnp.sum(mb["x"]), {"seen": mb["x"], "extra": extra_mb["y"], "n": jnp.float32(mb["x"].size)}

    carry, metrics = jax.jit(lambda d, e: epochs_minibatches(update, jnp.float32(0), d, jax.random.PRNGKey(0),
                                                             num_epochs=3, num_minibatches=4, extra=e))(data, extra)
    assert float(carry) == 3 * 28.0                          # every row once per epoch
    assert float(metrics["n"]) == 2.0 and float(metrics["extra"]) == 15.0   # mean over 12 updates of [0,10,20,30]
    with pytest.raises(ValueError, match="not divisible"):
        epochs_minibatches(update, 0.0, data, jax.random.PRNGKey(0), num_epochs=1, num_minibatches=3)


def test_host_reward_equals_the_same_reward_as_a_jittable_function(params):
    """run_ppo with a host function of decoded text (a compiled sample, the host call, a compiled update) gives
    the same run as the same reward written as a jittable function of token ids: same samples, same update."""
    prompts, mask = _prompts(B=8)
    config = PPOConfig(num_steps=2, batch_size=8, num_epochs=1, num_minibatches=2, value_init="policy",
                       sampling=SamplingConfig(max_new_tokens=6, temperature=1.0),
                       optim=OptimConfig(learning_rate=1e-2))

    def vowels_jit(prompts, responses, mask):              # ASCII vowels in the response, counted on token ids
        is_vowel = jnp.isin(responses, jnp.array([ord(c) for c in "aeiou"]))
        return jnp.sum(is_vowel * mask, 1).astype(jnp.float32) / 3.0

    seen = []

    def vowels_host(prompt_texts, completions):           # the same, counted on the decoded text
        seen.append((prompt_texts, completions))
        return np.array([sum(c in "aeiou" for c in t) / 3.0 for t in completions], np.float32)

    def run(**reward):
        state = init_ppo_state(params, config, model_config=CFG, rng=3)
        data = iter([{"prompts": prompts, "prompt_mask": mask}] * 2)
        return run_ppo(state, data, config, model_config=CFG, ref_params=params, **reward)

    ids_state, ids_hist = run(reward_fn=vowels_jit)
    host_state, host_hist = run(host_reward_fn=vowels_host, tokenizer=TOK)
    assert len(seen) == 2 and len(seen[0][1]) == 8
    assert max(h["objective/scores"] for h in ids_hist) > 0          # the reward is not 0 everywhere
    assert seen[0][0][0] == TOK.decode([int(t) for t, m in zip(prompts[0], mask[0]) if m])
    for a, b in zip(ids_hist, host_hist):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-6, err_msg=k)
    with pytest.raises(ValueError, match="exactly one reward source"):
        run(reward_fn=vowels_jit, host_reward_fn=vowels_host, tokenizer=TOK)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        run(host_reward_fn=vowels_host)


def test_host_scores_checks_what_the_reward_function_returns(params):
    prompts, mask = _prompts()
    ep = sample_episodes(params, prompts, mask, jax.random.PRNGKey(1), model_config=CFG,
                         sampling=SamplingConfig(max_new_tokens=4, temperature=1.0), num_samples_per_prompt=2)
    batch = {"prompts": prompts, "prompt_mask": mask}
    got = host_scores(lambda p, c: np.arange(len(c), dtype=np.float32), TOK, batch, ep)
    np.testing.assert_array_equal(got, np.arange(8))
    texts = decode_responses(TOK, ep)
    args = []
    host_scores(lambda p, c: args.append((p, c)) or np.zeros(len(c)), TOK, batch, ep)
    assert args[0][1] == texts and args[0][0][0] == args[0][0][1] != args[0][0][2]   # prompts repeated G = 2 times
    with pytest.raises(ValueError, match="expected 8 finite floats"):
        host_scores(lambda p, c: np.zeros(3), TOK, batch, ep)
    with pytest.raises(ValueError, match="expected 8 finite floats"):
        host_scores(lambda p, c: np.full(len(c), np.nan), TOK, batch, ep)


def test_the_extending_guide_example_runs_and_learns(params):
    """docs/extending.md's RLOO step, executed as written: a toy reward (fraction of response bytes below 128)
    rises over 30 iterations run by the stage loop."""
    import os
    import re

    from rlhf_jax.train import compile_step, create_train_state, run_loop
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    blocks = re.findall(r"```python\n(.*?)```", open(os.path.join(root, "docs", "extending.md")).read(), re.S)
    scope = {}
    exec(blocks[0], scope)                                        # defines rloo_step

    def my_reward(prompts, responses, mask):
        return jnp.sum((responses < 128) * mask, 1) / jnp.maximum(jnp.sum(mask, 1), 1)

    scope.update(cfg=CFG, my_reward=my_reward, state=create_train_state(params, OptimConfig(learning_rate=1e-2), 0),
                 prompt_batches=iter([dict(zip(("prompts", "prompt_mask"), _prompts()))] * 50))
    exec(blocks[1].replace("num_steps=50", "num_steps=30"), scope)  # compiles and runs it
    hist = scope["history"]
    assert [h["step"] for h in hist] == [10, 20, 30] and all(np.isfinite(h["loss"]) for h in hist)
    assert hist[-1]["reward"] > hist[0]["reward"] + 0.1, [h["reward"] for h in hist]
