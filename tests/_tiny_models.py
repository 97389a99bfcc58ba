"""Tiny GPT-2-style and Llama-style configs, their params and random tokens, shared by the model test files."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.models import ModelConfig, init_params

GPT = ModelConfig(vocab_size=61, d_model=32, num_layers=2, num_heads=4, mlp_dim=64, max_seq_len=32)
LLAMA = ModelConfig(vocab_size=61, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=48,
                    max_seq_len=32, mlp="swiglu", norm="rmsnorm", positional="rope", use_bias=False,
                    qkv_bias=True, tie_embeddings=False)
CONFIGS = {"gpt2": GPT, "llama": LLAMA}


@pytest.fixture(scope="module")
def params():
    return {name: init_params(cfg, jax.random.key(1), scalar_head=True) for name, cfg in CONFIGS.items()}


def _tokens(B, T, seed=0, V=61):
    return jnp.asarray(np.random.default_rng(seed).integers(0, V, (B, T)), jnp.int32)
