"""Hugging Face import/export: our logits must match `transformers` (the independent reference) on tiny random
models of each family, in both directions, for single-file, sharded and bfloat16 checkpoints."""
import json
import os

import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from rlhf_jax.models.hf import CheckpointError, load_pretrained, save_pretrained  # noqa: E402
from rlhf_jax.models.transformer import forward  # noqa: E402

B, T = 2, 12


def _gpt2():
    return transformers.GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=16, bos_token_id=0,
                                   eos_token_id=0)


def _llama():  # grouped-query attention, head_dim != hidden/heads, untied head
    return transformers.LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                    max_position_embeddings=64, tie_word_embeddings=False, rms_norm_eps=1e-5)


def _llama_bias():  # attention_bias without mlp_bias: our MLP biases are zero-filled
    return transformers.LlamaConfig(vocab_size=89, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                                    tie_word_embeddings=True, attention_bias=True, rope_theta=500.0)


def _qwen2():  # q/k/v biases, tied embeddings (no lm_head in the file)
    return transformers.Qwen2Config(vocab_size=103, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                    tie_word_embeddings=True)


def _mistral():
    return transformers.MistralConfig(vocab_size=83, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=64,
                                      sliding_window=None, tie_word_embeddings=False)


FAMILIES = {"gpt2": _gpt2, "llama": _llama, "llama_bias": _llama_bias, "qwen2": _qwen2, "mistral": _mistral}


def _hf_model(hf_config):
    """A random transformers model; norms and biases are randomised too so that a swapped leaf shows up."""
    hf_config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(hf_config, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_scale = ("norm" in name or "ln_" in name) and name.endswith("weight")
            p.copy_((1.0 if is_scale else 0.0) + 0.15 * torch.randn_like(p))
    return model


def _hf_logits(model, tokens):
    with torch.no_grad():
        ids = torch.from_numpy(tokens).long()
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float().numpy()


def _tokens(vocab, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, (B, T)).astype(np.int32)


def _assert_logits_close(ours, ref):
    ours = np.asarray(ours)
    assert ours.shape == ref.shape and ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4 * np.abs(ref).max())


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """family -> (folder saved by transformers, the transformers model)."""
    out = {}
    for family, make in FAMILIES.items():
        model = _hf_model(make())
        path = tmp_path_factory.mktemp(family)
        model.save_pretrained(path)
        out[family] = (str(path), model)
    return out


@pytest.mark.parametrize("family", list(FAMILIES))
def test_import_matches_transformers(checkpoints, family):
    path, model = checkpoints[family]
    config, params = load_pretrained(path)
    tokens = _tokens(config.vocab_size)
    _assert_logits_close(forward(params, tokens, config=config), _hf_logits(model, tokens))


def test_config_mapping(checkpoints):
    config, _ = load_pretrained(checkpoints["llama"][0])
    assert (config.num_heads, config.kv_heads, config.head_size, config.d_model) == (4, 2, 16, 32)
    assert not config.tie_embeddings and not config.qkv_bias and config.positional == "rope"
    config, params = load_pretrained(checkpoints["qwen2"][0])
    assert config.tie_embeddings and config.qkv_bias and not config.use_bias and "lm_head" not in params
    config, params = load_pretrained(checkpoints["gpt2"][0], param_dtype="bfloat16", dtype="bfloat16")
    assert config.max_seq_len == 16 and config.mlp_dim == 128 and config.dtype == "bfloat16"
    assert params["layers"]["attn"]["q"]["kernel"].dtype == ml_dtypes.bfloat16


@pytest.mark.parametrize("family", list(FAMILIES))
def test_export_round_trip(checkpoints, tmp_path, family):
    """Our save_pretrained output loads in transformers with the same logits, and loads back bit-exactly."""
    config, params = load_pretrained(checkpoints[family][0])
    model_type = "mistral" if family == "mistral" else None  # otherwise inferred from the config
    save_pretrained(config, params, tmp_path, model_type=model_type, extra_config={"bos_token_id": 0})
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == family.split("_")[0] and saved["bos_token_id"] == 0
    assert saved["architectures"] == [type(checkpoints[family][1]).__name__]
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    tokens = _tokens(config.vocab_size, seed=1)
    _assert_logits_close(forward(params, tokens, config=config), _hf_logits(reloaded, tokens))
    _assert_logits_close(_hf_logits(reloaded, tokens), _hf_logits(checkpoints[family][1], tokens))
    config2, params2 = load_pretrained(tmp_path)
    assert config2 == config
    _assert_trees_equal(params2, params)


def _assert_trees_equal(a, b):
    assert isinstance(a, dict) == isinstance(b, dict)
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_trees_equal(a[k], b[k])
    else:
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_original_gpt2_naming(checkpoints, tmp_path):
    """The hub's gpt2 files have no "transformer." prefix and carry attention-mask buffers; both are handled."""
    from safetensors.numpy import load_file, save_file

    path, _ = checkpoints["gpt2"]
    tensors = {k.removeprefix("transformer."): v for k, v in load_file(os.path.join(path, "model.safetensors")).items()}
    tensors["h.0.attn.bias"] = np.tril(np.ones((1, 1, 16, 16), np.float32))
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(open(os.path.join(path, "config.json")).read())
    _assert_trees_equal(load_pretrained(tmp_path)[1], load_pretrained(path)[1])


def test_sharded_checkpoint_from_transformers(checkpoints, tmp_path):
    _, model = checkpoints["llama"]
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    shards = [f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]
    assert len(shards) > 1 and (tmp_path / "model.safetensors.index.json").exists()
    _assert_trees_equal(load_pretrained(tmp_path)[1], load_pretrained(checkpoints["llama"][0])[1])


def test_sharded_export(checkpoints, tmp_path):
    config, params = load_pretrained(checkpoints["qwen2"][0])
    save_pretrained(config, params, tmp_path, max_shard_size="16KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and not (tmp_path / "model.safetensors").exists()
    total = sum(np.prod(v.shape) * 4 for v in _leaves(params))
    assert index["metadata"]["total_size"] == total  # tied: the embedding is written once
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    tokens = _tokens(config.vocab_size, seed=2)
    _assert_logits_close(forward(params, tokens, config=config), _hf_logits(reloaded, tokens))


def _leaves(tree):
    return [x for v in tree.values() for x in _leaves(v)] if isinstance(tree, dict) else [tree]


def test_bfloat16_checkpoint(checkpoints, tmp_path):
    path, model = checkpoints["qwen2"]
    model.to(torch.bfloat16).save_pretrained(tmp_path)
    model.to(torch.float32)
    config, params = load_pretrained(tmp_path)
    assert params["embed"]["embedding"].dtype == np.float32
    _, params32 = load_pretrained(path)  # the same weights in float32, rounded to bfloat16 by hand
    rounded = {k: v for k, v in params32.items()}
    _assert_trees_equal(params, _map(lambda x: x.astype(ml_dtypes.bfloat16).astype(np.float32), rounded))
    # and the export writes bfloat16 tensors that transformers reads as such
    out = tmp_path / "export"
    save_pretrained(config, params, out, dtype="bfloat16")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert reloaded.model.embed_tokens.weight.dtype == torch.bfloat16


def _map(fn, tree):
    return {k: _map(fn, v) for k, v in tree.items()} if isinstance(tree, dict) else fn(tree)


def test_errors(checkpoints, tmp_path):
    with pytest.raises(CheckpointError, match="not a folder"):
        load_pretrained(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="config.json"):
        load_pretrained(tmp_path)
    cfg = json.loads(open(os.path.join(checkpoints["llama"][0], "config.json")).read())
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "bert"}))
    with pytest.raises(CheckpointError, match=r"config.json.*model_type.*'bert'"):
        load_pretrained(tmp_path)
    scaled = {**cfg, "rope_parameters": {"rope_type": "dynamic", "rope_theta": 5e5, "factor": 8.0}}
    (tmp_path / "config.json").write_text(json.dumps(scaled))
    with pytest.raises(NotImplementedError, match=r"config.json.*rope_parameters.*dynamic"):
        load_pretrained(tmp_path)
    legacy = {**cfg, "rope_scaling": {"type": "dynamic", "factor": 2.0}}
    (tmp_path / "config.json").write_text(json.dumps(legacy))
    with pytest.raises(NotImplementedError, match=r"config.json.*rope_scaling.*dynamic"):
        load_pretrained(tmp_path)


def test_config_edge_cases():
    from rlhf_jax.models.config import ModelConfig
    from rlhf_jax.models.hf import config_from_hf, config_to_hf

    mistral = _mistral().to_dict() | {"sliding_window": 4096}
    config = config_from_hf(mistral)                   # every layer windowed, read and written back
    assert config.kv_heads == 1 and not config.use_bias and not config.qkv_bias
    assert config.sliding_window == 4096 and config.sliding_layers is None
    assert config_to_hf(config, model_type="mistral")["sliding_window"] == 4096
    # Qwen2's window from max_window_layers on, also from a config.json written before layer_types existed
    qwen2 = {k: v for k, v in _qwen2().to_dict().items() if k != "layer_types"} | {
        "sliding_window": 4096, "use_sliding_window": True, "max_window_layers": 1}
    config = config_from_hf(qwen2)
    assert config.sliding_window == 4096 and config.layer_flags("sliding_layers") == (False,) + (True,) * (
        config.num_layers - 1)
    back = config_to_hf(config, model_type="qwen2")
    assert back["max_window_layers"] == 1 and back["use_sliding_window"] and back["sliding_window"] == 4096
    with pytest.raises(CheckpointError, match="max_window_layers"):
        config_to_hf(config.replace(sliding_layers=(True,) + (False,) * (config.num_layers - 1)), model_type="qwen2")
    assert config_from_hf(_qwen2().to_dict() | {"sliding_window": 4096}).sliding_window is None      # off
    legacy = {k: v for k, v in _llama().to_dict().items() if k != "rope_parameters"} | {"rope_theta": 123.0}
    assert config_from_hf(legacy).rope_theta == 123.0
    with pytest.raises(NotImplementedError, match="activation_function"):
        config_from_hf(_gpt2().to_dict() | {"activation_function": "relu"})
    with pytest.raises(CheckpointError, match="model_type='llama'.*positional='rope'"):
        config_to_hf(ModelConfig.preset("tiny"), model_type="llama")
    with pytest.raises(CheckpointError, match="Mistral has no biases"):
        config_to_hf(ModelConfig.preset("tiny-llama", qkv_bias=True), model_type="mistral")
