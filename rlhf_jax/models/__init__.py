"""Decoder-only transformer (GPT-2 and Llama families), its config, KV-cache decoding and HF checkpoint I/O."""
from rlhf_jax.models.config import PRESETS, ModelConfig
from rlhf_jax.models.hf import load_pretrained, save_pretrained
from rlhf_jax.models.transformer import (
    KVCache,
    count_params,
    forward,
    forward_cached,
    forward_hidden,
    init_cache,
    init_params,
    lm_logits,
    param_logical_axes,
    scalar_forward,
)
