"""The model families people post-train now (Qwen3, OLMo 2, SmolLM3, Phi-3, Gemma 3, Gemma 2), each against
`transformers` on a tiny random model built from the family's own config class: logits, greedy decoding with EOS
through our KV cache, export back to Hugging Face, and LoRA adapters through `peft`. Sequences are longer than the
sliding windows, so the windowed masks (training and cached) are exercised; rotary scaling (YaRN, linear,
LongRoPE, llama3) against transformers' own frequency functions and end to end."""
import json

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from rlhf_jax.generation import sample  # noqa: E402
from rlhf_jax.lora import LoraConfig, init_lora, load_peft, merge_lora, save_peft  # noqa: E402
from rlhf_jax.models.hf import CheckpointError, config_from_hf, load_pretrained, save_pretrained  # noqa: E402
from rlhf_jax.models.transformer import forward  # noqa: E402

B, T = 2, 14
SMALL = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _qwen3():  # per-head q/k norms; the second layer slides over 5 tokens; YaRN rotary scaling
    return transformers.Qwen3Config(vocab_size=101, head_dim=8, tie_word_embeddings=False, use_sliding_window=True,
                                    sliding_window=5, max_window_layers=1,
                                    rope_parameters={"rope_type": "yarn", "rope_theta": 300.0, "factor": 4.0,
                                                     "original_max_position_embeddings": 16}, **SMALL)


def _qwen2():  # q/k/v biases; the second layer (from max_window_layers = 1 on) slides over 5 tokens
    return transformers.Qwen2Config(vocab_size=103, tie_word_embeddings=False, use_sliding_window=True,
                                    sliding_window=5, max_window_layers=1, **SMALL)


def _olmo2():  # post-sublayer norms, q/k norms over the whole projection
    return transformers.Olmo2Config(vocab_size=89, tie_word_embeddings=False, **SMALL)


def _smollm3():  # the second layer has no RoPE
    return transformers.SmolLM3Config(vocab_size=97, no_rope_layers=[1, 0], tie_word_embeddings=True, **SMALL)


def _phi3():  # fused qkv_proj / gate_up_proj, RoPE over half of each head, a sliding window of 6
    return transformers.Phi3Config(vocab_size=83, tie_word_embeddings=False, sliding_window=6,
                                   rope_parameters={"rope_type": "default", "rope_theta": 500.0,
                                                    "partial_rotary_factor": 0.5}, **SMALL)


def _gemma3():  # sliding (window 4, local base) / global (linear-scaled RoPE) layers, (1 + w) norms, GeGLU, capping
    return transformers.Gemma3TextConfig(
        vocab_size=79, head_dim=8, query_pre_attn_scalar=12, sliding_window=4, final_logit_softcapping=3.0,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 3.0, "rope_theta": 1000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 50.0}}, **SMALL)


def _gemma2():  # attention logits soft-capped at 2 (they reach it), sliding / global layers, (1 + w) norms
    return transformers.Gemma2Config(vocab_size=71, head_dim=8, query_pre_attn_scalar=10, sliding_window=4,
                                     attn_logit_softcapping=2.0, final_logit_softcapping=4.0, **SMALL)


FAMILIES = {"qwen2": _qwen2, "qwen3": _qwen3, "olmo2": _olmo2, "smollm3": _smollm3, "phi3": _phi3, "gemma3_text": _gemma3,
            "gemma2": _gemma2}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    """(name, transformers model, folder it saved, our config, our params), built once per family."""
    name = request.param
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(FAMILIES[name](), attn_implementation="eager").eval()
    with torch.no_grad():   # norms and every weight random, so that a swapped or dropped leaf shows up
        for pname, p in model.named_parameters():
            is_scale = "norm" in pname and not name.startswith("gemma")
            p.copy_((1.0 if is_scale else 0.0) + 0.2 * torch.randn_like(p))
    path = tmp_path_factory.mktemp(name)
    model.save_pretrained(path)
    config, params = load_pretrained(path)
    return name, model, path, config, params


def _tokens(vocab, seed=0, shape=(B, T)):
    return np.random.default_rng(seed).integers(0, vocab, shape).astype(np.int32)


def _hf_logits(model, tokens):
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(tokens).long()).logits.float().numpy()


def _close(ours, ref):
    np.testing.assert_allclose(np.asarray(ours), ref, rtol=0, atol=1e-4 * np.abs(ref).max())


def test_logits_match_transformers(family):
    name, model, _, config, params = family
    tokens = _tokens(config.vocab_size)
    _close(forward(params, tokens, config=config), _hf_logits(model, tokens))
    if name in ("qwen2", "qwen3", "phi3", "gemma3_text", "gemma2"):
        assert config.sliding_window is not None and config.sliding_window < T


def test_greedy_decoding_with_eos_matches_transformers(family):
    """Left-padded prompts, greedy, stop at EOS: our KV-cache sampler against the transformers model re-run on the
    whole sequence at every step (no cache; rows are independent, so the EOS run is the free run cut at EOS)."""
    _, model, _, config, params = family
    P, N = 5, 12
    prompts = _tokens(config.vocab_size, seed=3, shape=(B, P))
    mask = np.ones((B, P), np.int32)
    mask[1, :2] = 0
    prompts[1, :2] = 0
    ids, m = torch.from_numpy(prompts).long(), torch.from_numpy(mask).long()
    with torch.no_grad():
        for _ in range(N):
            positions = (m.cumsum(-1) - 1).clamp(min=0)
            nxt = model(input_ids=ids, attention_mask=m, position_ids=positions).logits[:, -1].argmax(-1)
            ids, m = torch.cat([ids, nxt[:, None]], 1), torch.cat([m, torch.ones_like(m[:, :1])], 1)
    free = ids[:, P:].numpy()
    eos = int(free[0, 6])                                  # a token row 0 emits mid-way: it must stop there
    stop = int(np.argmax(free[0] == eos))
    want = free.copy()
    for row in range(B):
        hit = np.flatnonzero(free[row] == eos)
        if hit.size:
            want[row, hit[0] + 1:] = 0
    out = sample(params, prompts, mask, jax.random.key(0), config=config, max_new_tokens=N, temperature=0.0,
                 eos_id=eos, pad_id=0)
    np.testing.assert_array_equal(np.asarray(out.tokens[:, P:]), want)
    assert int(np.asarray(out.response_mask)[0].sum()) == stop + 1 <= 7


def test_export_round_trip(family, tmp_path):
    name, model, _, config, params = family
    save_pretrained(config, params, tmp_path, model_type=name)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["architectures"] == [type(model).__name__]
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    tokens = _tokens(config.vocab_size, seed=1)
    _close(_hf_logits(reloaded, tokens), _hf_logits(model, tokens))
    config2, params2 = load_pretrained(tmp_path)
    assert config2 == config
    for a, b in zip(jax.tree.leaves(params2), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)


def test_lora_adapters_round_trip_through_peft(family, tmp_path):
    """Our adapters saved in peft's format give our merged logits under peft (Phi-3: on the fused modules), and
    an adapter peft makes on the family's own module names reads back with peft's logits."""
    name, _, path, config, params = family
    lora = LoraConfig(rank=2, alpha=3.0, targets=("q", "v", "o", "gate", "down"))
    adapters = init_lora(params, config, lora, jax.random.key(1))
    keys = iter(jax.random.split(jax.random.key(2), 16))
    adapters = jax.tree.map(lambda x: x + 0.2 * jax.random.normal(next(keys), x.shape), adapters)
    save_peft(adapters, lora, config, tmp_path / "ours")
    tokens = _tokens(config.vocab_size, seed=2)
    merged = np.asarray(forward(merge_lora(params, adapters, lora), tokens, config=config))
    assert np.abs(merged - np.asarray(forward(params, tokens, config=config))).max() > 1e-2
    base = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")
    _close(_hf_logits(peft.PeftModel.from_pretrained(base, tmp_path / "ours").eval(), tokens), merged)
    back, lora_back = load_peft(tmp_path / "ours", config)
    _close(forward(merge_lora(params, back, lora_back), tokens, config=config), merged)

    if name != "phi3":   # the others share Llama's module names, which tests/test_lora.py reads from peft
        return
    modules = ["qkv_proj", "gate_up_proj", "down_proj"]
    torch.manual_seed(1)
    made = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager"),
                               peft.LoraConfig(r=3, lora_alpha=5, target_modules=modules, init_lora_weights=False))
    made.save_pretrained(tmp_path / "peft")
    adapters, lora = load_peft(tmp_path / "peft", config)
    _close(forward(merge_lora(params, adapters, lora), tokens, config=config), _hf_logits(made.eval(), tokens))


def test_unsupported_families_and_fields_are_named():
    with pytest.raises(CheckpointError, match=r"'bert' is not supported; supported model types: \[.*'gemma3_text'.*"
                                              r"'olmo2'.*'phi3'.*'qwen3'.*'smollm3'"):
        config_from_hf({"model_type": "bert"})
    dynamic = _qwen3().to_dict() | {"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}}
    with pytest.raises(NotImplementedError, match=r"rope_parameters.*'dynamic' is not supported.*'longrope'"):
        config_from_hf(dynamic)
    with pytest.raises(CheckpointError, match=r"rope_type 'llama3'.*'low_freq_factor'"):
        config_from_hf(_qwen3().to_dict() | {"rope_parameters": {"rope_type": "llama3", "factor": 8.0}})


@pytest.mark.parametrize("kind, extra", [
    ("linear", {"factor": 4.0}),
    ("llama3", {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64}),
    ("yarn", {"factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 16.0}),
    ("longrope", {"short_factor": list(np.linspace(1, 2, 32)), "long_factor": list(np.linspace(2, 9, 32))}),
])
def test_rotary_scaling_frequencies_match_transformers(kind, extra):
    """inv_freq and the cos/sin factor of each rope_type, from the config.json mapping, against transformers'
    ROPE_INIT_FUNCTIONS (longrope: short below the original length, long above it)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from rlhf_jax.models.transformer import rope_frequencies
    make = transformers.Phi3Config if kind == "longrope" else transformers.Qwen3Config
    hf = make(hidden_size=128, num_attention_heads=2, num_key_value_heads=2, num_hidden_layers=1,
              max_position_embeddings=1024, original_max_position_embeddings=64, head_dim=64,
              rope_parameters={"rope_type": kind, "rope_theta": 5000.0} | extra)
    inv, factor, long = rope_frequencies(config_from_hf(hf.to_dict()))
    want, want_factor = ROPE_INIT_FUNCTIONS[kind](hf, "cpu")
    np.testing.assert_allclose(inv, want.numpy(), rtol=1e-6)
    assert factor == pytest.approx(want_factor, rel=1e-9) and (long is None) == (kind != "longrope")
    if kind == "longrope":
        np.testing.assert_allclose(long, ROPE_INIT_FUNCTIONS[kind](hf, "cpu", seq_len=65)[0].numpy(), rtol=1e-6)


def test_longrope_phi3_logits_switch_like_transformers(tmp_path):
    """Phi-4-mini's LongRoPE on a tiny Phi-3: short factors while a call fits in the original 8 positions, long
    ones past it (both lengths checked), through import and export."""
    rope = {"rope_type": "longrope", "rope_theta": 100.0, "partial_rotary_factor": 0.5,
            "short_factor": [1.0, 1.5], "long_factor": [3.0, 7.0]}
    hf = transformers.Phi3Config(vocab_size=61, original_max_position_embeddings=8, rope_parameters=rope, **SMALL)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(hf, attn_implementation="eager").eval()
    model.save_pretrained(tmp_path / "hf")
    config, params = load_pretrained(tmp_path / "hf")
    assert config.rope_type == "longrope" and config.rope_original_max_len == 8
    save_pretrained(config, params, tmp_path / "ours", model_type="phi3")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation="eager")
    for length in (6, 14):
        tokens = _tokens(config.vocab_size, seed=length, shape=(B, length))
        ref = _hf_logits(model, tokens)
        _close(forward(params, tokens, config=config), ref)
        _close(_hf_logits(reloaded.eval(), tokens), ref)


def test_llama_3_rope_scaling_logits_and_export_match_transformers(tmp_path):
    """Llama-3.1 / 3.2's rope_type "llama3" (their config.json's) on a tiny Llama: logits as transformers' through
    import, and an export that transformers reads back to the same logits."""
    rope = {"rope_type": "llama3", "rope_theta": 100.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8}
    hf = transformers.LlamaConfig(vocab_size=61, rope_parameters=rope, **SMALL)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(hf, attn_implementation="eager").eval()
    model.save_pretrained(tmp_path / "hf")
    config, params = load_pretrained(tmp_path / "hf")
    assert config.rope_type == "llama3" and config.rope_factor == 8.0
    save_pretrained(config, params, tmp_path / "ours")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation="eager")
    tokens = _tokens(config.vocab_size, seed=3, shape=(B, 14))
    ref = _hf_logits(model, tokens)
    _close(forward(params, tokens, config=config), ref)
    _close(_hf_logits(reloaded.eval(), tokens), ref)
