"""The public API contract (shared/API.md, restated here because a user's clone lacks that file): every name it
promises exists, takes its arguments in the promised order under the promised names, with the promised keyword
defaults, and every loss returns (float32 scalar, flat dict of scalars) with the promised metric keys.

Additions (docs/api_additions.md) may add keyword arguments with defaults; they may not rename, reorder or drop
the contract's arguments, nor add required ones.
"""
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import envs, generation, lora, losses, models, tokenizer, tools

REQUIRED = inspect.Parameter.empty
# (module, name, positional parameters in order, {keyword-only parameter: default})
CONTRACT = [
    (losses, "token_logprobs", ["logits", "targets"], {}),
    (losses, "sequence_logprobs", ["logits", "targets", "mask"], {}),
    (losses, "sft_loss", ["logits", "targets", "loss_mask"], {}),
    (losses, "bradley_terry_loss", ["chosen_rewards", "rejected_rewards"], {"margin": None, "center_coef": 0.0}),
    (losses, "dpo_loss", ["policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps"],
     {"beta": 0.1, "loss_type": "sigmoid", "label_smoothing": 0.0, "chosen_lengths": None, "rejected_lengths": None,
      "reference_free": False}),
    (losses, "kl_penalty", ["logprobs", "ref_logprobs"], {"estimator": "k1"}),
    (losses, "gae", ["rewards", "values", "mask"], {"gamma": 1.0, "lam": 0.95}),
    (losses, "whiten", ["x", "mask"], {"shift_mean": True}),
    (losses, "ppo_policy_loss", ["logprobs", "old_logprobs", "advantages", "mask"], {"clip_eps": 0.2}),
    (losses, "ppo_value_loss", ["values", "old_values", "returns", "mask"], {"clip_eps": 0.2}),
    (losses, "adaptive_kl_update", ["coef", "observed_kl", "n_steps"], {"target": REQUIRED, "horizon": REQUIRED}),
    # wave 2
    (losses, "group_advantages", ["rewards"], {"group_size": REQUIRED, "scale": "group", "eps": 1e-4}),
    (losses, "rloo_advantages", ["rewards"], {"group_size": REQUIRED}),
    (losses, "discounted_returns", ["rewards", "mask"], {"gamma": 1.0}),
    (losses, "overlong_penalty", ["lengths"], {"max_len": REQUIRED, "cache_len": REQUIRED}),
    (losses, "policy_gradient_loss", ["logprobs", "old_logprobs", "advantages", "mask"],
     {"loss_type": "grpo", "clip_eps": 0.2, "clip_eps_high": None, "max_tokens": None, "ref_logprobs": None,
      "kl_coef": 0.0, "kl_estimator": "k3", "importance_weights": None}),
    (losses, "kto_loss", ["policy_logps", "ref_logps", "desirable", "kl_policy_logps", "kl_ref_logps"],
     {"beta": 0.1, "desirable_weight": 1.0, "undesirable_weight": 1.0}),
    (losses, "simpo_loss", ["policy_chosen_logps", "policy_rejected_logps", "chosen_lengths", "rejected_lengths"],
     {"beta": 2.0, "gamma": 0.5, "label_smoothing": 0.0}),
    (losses, "orpo_loss", ["policy_chosen_logps", "policy_rejected_logps", "chosen_lengths", "rejected_lengths",
                           "nll_chosen"], {"lam": 0.1}),
    (models, "init_params", ["config", "rng"], {}),
    (models, "forward", ["params", "tokens"], {"config": REQUIRED, "positions": None, "segment_ids": None}),
    (models, "load_pretrained", ["path"], {}),
    (models, "save_pretrained", ["config", "params", "path"], {}),
    (generation, "sample", ["params", "prompts", "prompt_mask", "rng"],
     {"config": REQUIRED, "max_new_tokens": REQUIRED, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "eos_id": None}),
    # distillation, QLoRA, tools
    (losses, "distill_loss", ["student_logits", "teacher_logits", "mask"], {"beta": 0.5, "temperature": 1.0}),
    (lora, "quantize_nf4", ["w"], {"block_size": 64, "double_quant": True}),
    (lora, "dequantize_nf4", ["q"], {}),
    (tokenizer, "render_template", ["template", "messages"], {"tools": None, "add_generation_prompt": False}),
    (tokenizer, "encode_chat", ["tokenizer", "messages"], {"tools": None}),
    (tools, "parse_tool_calls", ["text"], {"style": "auto"}),
]


@pytest.mark.parametrize("module,name,positional,keywords", CONTRACT, ids=[c[1] for c in CONTRACT])
def test_signature_keeps_the_contract(module, name, positional, keywords):
    params = inspect.signature(getattr(module, name)).parameters
    names = list(params)
    assert names[:len(positional)] == positional, f"{name}: positional arguments {names} != contract {positional}"
    for p in names[:len(positional)]:
        assert params[p].default is REQUIRED and params[p].kind in (params[p].POSITIONAL_ONLY,
                                                                     params[p].POSITIONAL_OR_KEYWORD), (name, p)
    for key, default in keywords.items():
        assert key in params, f"{name}: contract keyword {key!r} missing"
        assert params[key].kind in (params[key].KEYWORD_ONLY, params[key].POSITIONAL_OR_KEYWORD), (name, key)
        assert params[key].default == default, f"{name}({key}=...): default {params[key].default!r} != {default!r}"
    extra_required = [p for p in names[len(positional):] if p not in keywords and params[p].default is REQUIRED
                      and params[p].kind not in (params[p].VAR_POSITIONAL, params[p].VAR_KEYWORD)]
    assert not extra_required, f"{name}: arguments beyond the contract must have defaults: {extra_required}"


def test_model_names_and_presets():
    assert inspect.isclass(models.ModelConfig) and inspect.isclass(losses.AdaptiveKLController)
    for preset in ("tiny", "gpt2-124m", "gpt2-355m", "llama-1b"):
        assert isinstance(models.ModelConfig.preset(preset), models.ModelConfig), preset
    assert list(generation.Samples.__dataclass_fields__) == ["tokens", "logprobs", "response_mask"]


def _loss_calls():
    rng = np.random.default_rng(0)
    b, t, v = 3, 5, 7
    logits = rng.normal(size=(b, t, v)).astype(np.float32)
    targets = rng.integers(0, v, size=(b, t))
    mask = np.ones((b, t), np.float32)
    lp = lambda: (rng.normal(size=(b, t)) - 2).astype(np.float32)   # noqa: E731
    seq = lambda: (-rng.uniform(1, 9, size=b)).astype(np.float32)   # noqa: E731
    return {
        "sft_loss": (losses.sft_loss(logits, targets, mask),
                     {"loss", "num_tokens", "accuracy", "perplexity"}),
        "bradley_terry_loss": (losses.bradley_terry_loss(seq(), seq()),
                               {"loss", "accuracy", "reward_chosen", "reward_rejected", "reward_margin"}),
        "dpo_loss": (losses.dpo_loss(seq(), seq(), seq(), seq()),
                     {"loss", "rewards_chosen", "rewards_rejected", "rewards_margin", "rewards_accuracy",
                      "logps_chosen", "logps_rejected"}),
        "ppo_policy_loss": (losses.ppo_policy_loss(lp(), lp(), rng.normal(size=(b, t)).astype(np.float32), mask),
                            {"loss", "clipfrac", "approx_kl", "ratio_mean"}),
        "ppo_value_loss": (losses.ppo_value_loss(lp(), lp(), lp(), mask), {"loss", "clipfrac", "explained_variance"}),
        "policy_gradient_loss": (losses.policy_gradient_loss(lp(), lp(), seq(), mask, ref_logprobs=lp(), kl_coef=0.1),
                                 {"loss", "clipfrac", "clipfrac_low", "clipfrac_high", "approx_kl", "ratio_mean",
                                  "kl"}),
        "kto_loss": (losses.kto_loss(seq(), seq(), np.array([True, False, True]), seq(), seq()),
                     {"loss", "kl", "rewards_desirable", "rewards_undesirable"}),
        "simpo_loss": (losses.simpo_loss(seq(), seq(), np.full(b, 4.0), np.full(b, 5.0)),
                       {"loss", "rewards_chosen", "rewards_rejected", "rewards_margin", "rewards_accuracy"}),
        "orpo_loss": (losses.orpo_loss(seq(), seq(), np.full(b, 4.0), np.full(b, 5.0), 1.5),
                      {"loss", "nll", "or_loss", "log_odds_ratio", "rewards_accuracy"}),
    }


def test_losses_return_a_float32_scalar_and_flat_scalar_metrics():
    for name, ((loss, metrics), keys) in _loss_calls().items():
        assert jnp.shape(loss) == () and jnp.result_type(loss) == jnp.float32, name
        assert keys <= set(metrics), f"{name}: missing metrics {keys - set(metrics)}"
        for key, value in metrics.items():
            assert isinstance(key, str) and jnp.shape(value) == (), (name, key)
        np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-6, err_msg=name)


def test_array_functions_keep_their_shapes():
    rng = np.random.default_rng(1)
    b, t, v = 2, 4, 6
    logits, targets = rng.normal(size=(b, t, v)).astype(np.float32), rng.integers(0, v, size=(b, t))
    x, mask = rng.normal(size=(b, t)).astype(np.float32), np.ones((b, t), np.float32)
    logprobs = losses.token_logprobs(logits, targets)
    assert logprobs.shape == (b, t) and logprobs.dtype == jnp.float32
    assert losses.sequence_logprobs(logits, targets, mask).shape == (b,)
    assert losses.kl_penalty(x, x + 1).shape == (b, t)
    assert losses.whiten(x, mask).shape == (b, t)
    advantages, returns = losses.gae(x, x, mask)
    assert advantages.shape == returns.shape == (b, t)
    assert jnp.shape(jax.jit(losses.adaptive_kl_update, static_argnames=("target", "horizon"))(
        jnp.float32(0.2), jnp.float32(3.0), 8, target=6.0, horizon=100.0)) == ()


def test_distillation_qlora_tools_and_environment_names():
    """NF4's 16 code values ascend from -1 to 1; a Hermes and a Llama-3 call parse to {name, arguments}; a
    malformed call is no call; an environment has reset and step; the console script has every subcommand."""
    from rlhf_jax import cli
    assert len(lora.NF4_CODE) == 16 and lora.NF4_CODE[0] == -1.0 and lora.NF4_CODE[-1] == 1.0
    assert list(lora.NF4_CODE) == sorted(lora.NF4_CODE) and 0.0 in lora.NF4_CODE
    w = np.linspace(-1, 1, 128, dtype=np.float32).reshape(2, 64)
    assert np.asarray(lora.dequantize_nf4(lora.quantize_nf4(w))).shape == (2, 64)
    assert tools.parse_tool_calls('<tool_call>{"name": "f", "arguments": {"x": 1}}</tool_call>') == [
        {"name": "f", "arguments": {"x": 1}}]
    assert tools.parse_tool_calls('{"name": "f", "parameters": {}}', style="llama3") == [{"name": "f", "arguments": {}}]
    assert tools.parse_tool_calls("<tool_call>{bad</tool_call>") == []
    assert callable(envs.Environment.reset) and callable(envs.Environment.step)
    from rlhf_jax.train import run_distill, run_grpo_env
    assert callable(run_grpo_env) and callable(run_distill)
    assert set(cli.COMMANDS) >= {"sft", "reward", "ppo", "dpo", "kto", "online-dpo", "grpo", "distill", "export",
                                 "generate", "benchmark", "pipeline", "seeds"}
    loss, metrics = losses.distill_loss(np.zeros((1, 2, 3), np.float32), np.zeros((1, 2, 3), np.float32),
                                        np.ones((1, 2), np.float32))
    assert jnp.shape(loss) == () and {"loss", "kl_forward", "kl_reverse"} <= set(metrics)
