"""Decoder-only transformer (GPT-2, Llama, Qwen, OLMo 2, SmolLM3, Phi-3, Gemma families), its config, KV-cache
decoding and HF checkpoint I/O."""
from rlhf_jax.models.config import PRESETS, ModelConfig
from rlhf_jax.models.hf import load_pretrained, save_pretrained
from rlhf_jax.models.transformer import (
    KVCache,
    attention_impl,
    cached_attention,
    count_params,
    decode_params,
    forward,
    forward_cached,
    forward_hidden,
    init_cache,
    init_params,
    lm_head_kernel,
    lm_logits,
    param_logical_axes,
    prefill,
    scalar_forward,
    scalar_head,
)
