"""Hugging Face checkpoint import and export: GPT-2 and the Llama-style families (Llama, Qwen2, Mistral, Qwen3,
OLMo 2, SmolLM3, Phi-3 / Phi-4-mini, Gemma 2, Gemma 3).

A Hugging Face folder is `config.json` plus `model.safetensors`, or several shards listed by
`model.safetensors.index.json`. `load_pretrained` reads one into a `ModelConfig` and our param tree (layers stacked
on a leading L axis, attention kernels split per head); `save_pretrained` writes the inverse, which
`transformers.AutoModelForCausalLM.from_pretrained` loads with the same logits. Nothing here touches the network.

Layout conversions (shape alphabet: D model width, F MLP width, N heads, K kv heads, H head dim, V vocab, L layers):
  * GPT-2 (Radford et al. 2019) stores `Conv1D` weights as [in, out] and a fused `c_attn` [D, 3D] = [q | k | v].
  * Llama (Touvron et al. 2023), Qwen2, Mistral store `nn.Linear` weights as [out, in]: q_proj [N*H, D] becomes
    our kernel [D, N, H]; o_proj [D, N*H] becomes [N, H, D]. Their q/k use the rotate-half RoPE convention
    (Su et al. 2021, split halves rather than interleaved pairs), which our model implements, so no permutation.
  * Qwen3 and Gemma 3 add per-head q_norm / k_norm [H]; OLMo 2 norms the whole projection (q_norm [N*H], our
    [N, H]) and puts its two norms after the sublayers; Gemma 3 has four norms per layer.
  * Phi-3 fuses qkv_proj [(N + 2K)*H, D] = [q | k | v] and gate_up_proj [2F, D] = [gate | up]: split on import,
    concatenated on export.
Biases the family has but our config lacks (or the reverse) are filled with zeros, which is exact.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Any, Callable

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from rlhf_jax.models.config import ModelConfig

_SINGLE = "model.safetensors"
_INDEX = "model.safetensors.index.json"
_ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                  "mistral": "MistralForCausalLM", "qwen3": "Qwen3ForCausalLM", "olmo2": "Olmo2ForCausalLM",
                  "smollm3": "SmolLM3ForCausalLM", "phi3": "Phi3ForCausalLM", "gemma2": "Gemma2ForCausalLM",
                  "gemma3_text": "Gemma3ForCausalLM"}
_LLAMA_FAMILY = ("llama", "qwen2", "mistral", "qwen3", "olmo2", "smollm3", "phi3", "gemma2", "gemma3_text")
_GEMMA = ("gemma2", "gemma3_text")
_NORMS = {  # our per-layer norm -> the family's module name
    "olmo2": {"attn_post_norm": "post_attention_layernorm", "mlp_post_norm": "post_feedforward_layernorm"},
    "gemma3_text": {"attn_norm": "input_layernorm", "attn_post_norm": "post_attention_layernorm",
                    "mlp_norm": "pre_feedforward_layernorm", "mlp_post_norm": "post_feedforward_layernorm"},
}
_NORMS["gemma2"] = _NORMS["gemma3_text"]
_LLAMA_NORMS = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}
_FUSED = {"phi3": {"qkv_proj": ("q", "k", "v"), "gate_up_proj": ("gate", "up")}}
"""Families whose checkpoint stores some projections concatenated along the output axis."""
_GPT2_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # all the tanh approximation of GELU


class CheckpointError(ValueError):
    """A Hugging Face folder that cannot be read, or a config field we do not support."""


# ----------------------------------------------------------------------------------------------- config.json


def config_from_hf(hf: dict[str, Any], *, source: str = "config.json", **overrides) -> ModelConfig:
    """Map a Hugging Face `config.json` dict to a `ModelConfig`; `overrides` replace fields (e.g. dtype)."""
    model_type = hf.get("model_type")

    def need(key):
        if key not in hf:
            raise CheckpointError(f"{source}: missing field {key!r} required for model_type={model_type!r}")
        return hf[key]

    def unsupported(field, value, why):
        raise NotImplementedError(f"{source}: field {field!r} = {value!r} is not supported: {why}")

    if model_type == "gpt2":
        act = hf.get("activation_function", "gelu_new")
        if act not in _GPT2_GELUS:
            unsupported("activation_function", act, f"our GELU MLP is the tanh approximation {_GPT2_GELUS}")
        if hf.get("scale_attn_by_inverse_layer_idx"):
            unsupported("scale_attn_by_inverse_layer_idx", True, "attention logits are scaled by 1/sqrt(H) only")
        if not hf.get("scale_attn_weights", True):
            unsupported("scale_attn_weights", False, "attention logits are always scaled by 1/sqrt(H)")
        d = need("n_embd")
        fields = dict(vocab_size=need("vocab_size"), d_model=d, num_layers=need("n_layer"), num_heads=need("n_head"),
                      mlp_dim=hf.get("n_inner") or 4 * d, max_seq_len=need("n_positions"), mlp="gelu",
                      norm="layernorm", norm_eps=hf.get("layer_norm_epsilon", 1e-5), positional="learned",
                      use_bias=True, qkv_bias=True, tie_embeddings=hf.get("tie_word_embeddings", True))
    elif model_type in _LLAMA_FAMILY:
        gemma = model_type in _GEMMA
        act_field = "hidden_activation" if gemma else "hidden_act"
        act = hf.get(act_field) or ("gelu_pytorch_tanh" if gemma else "silu")
        if gemma and act not in _GPT2_GELUS:
            unsupported(act_field, act, f"the Gemma MLP is GeGLU with a tanh GELU {_GPT2_GELUS}")
        if not gemma and act != "silu":
            unsupported(act_field, act, "the Llama-family MLP is SwiGLU with SiLU")
        rope_params = dict(hf.get("rope_parameters") or {})  # transformers >= 5; older files: rope_theta, rope_scaling
        legacy = dict(hf.get("rope_scaling") or {})    # transformers lets an old rope_scaling override the type
        if legacy:
            legacy.setdefault("rope_type", legacy.get("type", "default"))
        field = "rope_scaling" if legacy else "rope_parameters"
        if model_type == "gemma3_text":  # one RoPE per layer type: {"full_attention": {...}, "sliding_attention": ...}
            local = dict(rope_params.get("sliding_attention") or {})
            rope = dict(rope_params.get("full_attention") or {}) | legacy
            rope.setdefault("rope_theta", hf.get("rope_theta", 1_000_000.0))
            local.setdefault("rope_theta", hf.get("rope_local_base_freq", 10_000.0))
            _rope_fields(local, {}, source, "rope_parameters.sliding_attention", scaling=False)
            field = "rope_scaling" if legacy else "rope_parameters.full_attention"
        else:
            rope = rope_params | legacy
        rope_extra = _rope_fields(rope, hf, source, field, scaling=True)
        rotary = float(rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)))
        layer_types = hf.get("layer_types") or []
        if model_type in ("qwen2", "qwen3") and hf.get("use_sliding_window") and not layer_types:
            # a config.json from before layer_types: the layers from max_window_layers on slide (transformers 4.x)
            first = hf.get("max_window_layers", 28)                       # transformers' default
            layer_types = ["sliding_attention" if i >= first else "full_attention"
                           for i in range(hf["num_hidden_layers"])]
        sliding = model_type == "mistral" or hf.get("use_sliding_window") or "sliding_attention" in layer_types
        window = hf.get("sliding_window") if sliding or model_type == "phi3" else None
        extra: dict[str, Any] = {}
        if model_type == "mistral":
            if window:                                   # every layer windowed
                extra.update(sliding_window=int(window), sliding_layers=None)
        elif window:
            extra.update(sliding_window=int(window), sliding_layers=tuple(
                t == "sliding_attention" for t in layer_types) if layer_types and model_type != "phi3" else None)
            if extra["sliding_layers"] is not None and not any(extra["sliding_layers"]):
                extra.update(sliding_window=None, sliding_layers=None)
        if model_type == "qwen2":
            qkv_bias, use_bias = True, False
        else:
            attention_bias, mlp_bias = bool(hf.get("attention_bias")), bool(hf.get("mlp_bias"))
            qkv_bias, use_bias = attention_bias, attention_bias or mlp_bias
        if model_type == "qwen3":
            extra.update(qk_norm="head")
        elif model_type == "olmo2":
            extra.update(qk_norm="proj", pre_norm=False, post_norm=True)
        elif model_type == "smollm3":
            flags = hf.get("no_rope_layers")  # despite the name: 1 = the layer uses RoPE
            if flags is not None and not all(flags):
                extra.update(rope_layers=tuple(bool(f) for f in flags))
        elif gemma:
            if hf.get("use_bidirectional_attention"):
                unsupported("use_bidirectional_attention", True, "our attention is causal")
            extra.update(post_norm=True, norm_offset=1.0, embed_scale=True, mlp="geglu",
                         attn_scale=float(hf.get("query_pre_attn_scalar", 256)) ** -0.5,
                         final_softcap=hf.get("final_logit_softcapping"))
            if model_type == "gemma2":
                extra.update(attn_softcap=hf.get("attn_logit_softcapping"))
            else:   # Gemma 3's attention does not read attn_logit_softcapping
                extra.update(qk_norm="head")
            if model_type == "gemma3_text" and extra.get("sliding_layers") is not None:
                extra["rope_theta_sliding"] = float(local["rope_theta"])
        d, n = need("hidden_size"), need("num_attention_heads")
        fields = dict(vocab_size=need("vocab_size"), d_model=d, num_layers=need("num_hidden_layers"), num_heads=n,
                      num_kv_heads=hf.get("num_key_value_heads") or n, head_dim=hf.get("head_dim") or d // n,
                      mlp_dim=need("intermediate_size"), max_seq_len=hf.get("max_position_embeddings", 2048),
                      mlp="swiglu", norm="rmsnorm", norm_eps=hf.get("rms_norm_eps", 1e-6), positional="rope",
                      rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10_000.0))), rope_fraction=rotary,
                      use_bias=use_bias, qkv_bias=qkv_bias,
                      tie_embeddings=bool(hf.get("tie_word_embeddings", gemma)))
        fields.update(extra)
        fields.update(rope_extra)
    else:
        raise CheckpointError(f"{source}: field 'model_type' = {model_type!r} is not supported; "
                              f"supported model types: {sorted(_ARCHITECTURES)}")
    return ModelConfig(**{**fields, **overrides})


_ROPE_TYPES = ("default", "linear", "yarn", "llama3", "longrope")


def _rope_fields(rope: dict, hf: dict, source: str, field: str, *, scaling: bool) -> dict[str, Any]:
    """The ModelConfig rotary-scaling fields of a rope_parameters (or legacy rope_scaling) dict, resolved as
    transformers' `standardize_rope_params` does (original length: Phi-3's top-level
    original_max_position_embeddings, else the dict's, else max_position_embeddings); one line refusing what we
    do not implement."""
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return {}
    if not scaling or kind not in _ROPE_TYPES:
        where = "these layers take plain RoPE only" if not scaling and kind in _ROPE_TYPES else \
            f"implemented rope types: {list(_ROPE_TYPES)}"
        raise NotImplementedError(f"{source}: field {field!r} = {kind!r} is not supported: {where}")
    for key in ("mscale", "mscale_all_dim"):
        if rope.get(key):
            raise NotImplementedError(f"{source}: field {field}.{key} = {rope[key]!r} is not supported (DeepSeek's "
                                      "YaRN attention scaling)")
    if rope.get("truncate") is False:
        raise NotImplementedError(f"{source}: field {field}.truncate = false is not supported")
    max_pos = hf.get("max_position_embeddings", 2048)
    original = hf.get("original_max_position_embeddings") or rope.get("original_max_position_embeddings") or max_pos

    def need(key):
        if rope.get(key) is None:
            raise CheckpointError(f"{source}: field {field} (rope_type {kind!r}) has no {key!r}")
        return rope[key]

    out: dict[str, Any] = {"rope_type": kind}
    if kind == "linear":
        out.update(rope_factor=float(need("factor")))
    elif kind == "llama3":
        out.update(rope_factor=float(need("factor")), rope_low_freq_factor=float(need("low_freq_factor")),
                   rope_high_freq_factor=float(need("high_freq_factor")), rope_original_max_len=int(original))
    elif kind == "yarn":
        out.update(rope_factor=float(rope.get("factor") or max_pos / original), rope_original_max_len=int(original),
                   rope_beta_fast=float(rope.get("beta_fast") or 32.0),
                   rope_beta_slow=float(rope.get("beta_slow") or 1.0),
                   rope_attention_factor=rope.get("attention_factor"))
    else:  # longrope: max_seq_len / original gives the attention factor unless the file sets one (or a factor)
        attention = rope.get("attention_factor")
        if attention is None and rope.get("factor") is not None:
            factor = float(rope["factor"])
            attention = math.sqrt(1 + math.log(factor) / math.log(original)) if factor > 1 else 1.0
        out.update(rope_original_max_len=int(original), rope_attention_factor=attention,
                   rope_short_factor=tuple(need("short_factor")), rope_long_factor=tuple(need("long_factor")))
    return out


def _rope_to_hf(c: ModelConfig) -> dict[str, Any]:
    """The rope_parameters dict of `c` (the inverse of `_rope_fields`)."""
    out: dict[str, Any] = {"rope_type": c.rope_type, "rope_theta": c.rope_theta}
    if c.rope_type in ("linear", "llama3", "yarn"):
        out["factor"] = c.rope_factor
    if c.rope_type in ("llama3", "yarn", "longrope"):
        out["original_max_position_embeddings"] = c.rope_original_max_len
    if c.rope_type == "llama3":
        out.update(low_freq_factor=c.rope_low_freq_factor, high_freq_factor=c.rope_high_freq_factor)
    if c.rope_type == "yarn":
        out.update(beta_fast=c.rope_beta_fast, beta_slow=c.rope_beta_slow)
    if c.rope_type in ("yarn", "longrope") and c.rope_attention_factor is not None:
        out["attention_factor"] = c.rope_attention_factor
    if c.rope_type == "longrope":
        out.update(short_factor=list(c.rope_short_factor), long_factor=list(c.rope_long_factor))
    return out


def infer_model_type(config: ModelConfig) -> str:
    """The Hugging Face family a config exports as: learned positions -> gpt2; Gemma's norms (1 + w) ->
    gemma3_text (with q/k norms) or gemma2; post-sublayer norms only -> olmo2; per-head q/k norms -> qwen3;
    layers without RoPE -> smollm3; partial rotary -> phi3; RoPE with q/k/v-only biases -> qwen2; other RoPE
    configs -> llama."""
    c = config
    if c.positional == "learned":
        return "gpt2"
    if c.norm_offset:
        return "gemma3_text" if c.qk_norm != "none" else "gemma2"
    if c.post_norm and not c.pre_norm:
        return "olmo2"
    if c.qk_norm == "head":
        return "qwen3"
    if c.rope_layers is not None:
        return "smollm3"
    if c.rope_fraction != 1.0:
        return "phi3"
    return "qwen2" if c.qkv_bias and not c.use_bias else "llama"


def config_to_hf(config: ModelConfig, *, model_type: str | None = None, dtype: str = "float32") -> dict[str, Any]:
    """The `config.json` dict of `config` as a Hugging Face `model_type` model (inferred when None)."""
    model_type = model_type or infer_model_type(config)
    c = config

    def require(ok, what):
        if not ok:
            raise CheckpointError(f"save_pretrained: ModelConfig cannot be exported as model_type={model_type!r}: "
                                  f"{what}")

    common = dict(model_type=model_type, architectures=[_ARCHITECTURES.get(model_type, "?")], vocab_size=c.vocab_size,
                  tie_word_embeddings=c.tie_embeddings, torch_dtype=dtype, dtype=dtype)
    if model_type == "gpt2":
        require(c.positional == "learned" and c.norm == "layernorm" and c.mlp == "gelu",
                "GPT-2 needs positional='learned', norm='layernorm', mlp='gelu'")
        require(c.kv_heads == c.num_heads and c.head_size * c.num_heads == c.d_model,
                "GPT-2 needs num_kv_heads == num_heads and head_dim == d_model // num_heads")
        return dict(common, n_embd=c.d_model, n_layer=c.num_layers, n_head=c.num_heads, n_inner=c.mlp_dim,
                    n_positions=c.max_seq_len, layer_norm_epsilon=c.norm_eps, activation_function="gelu_new",
                    bos_token_id=50256 if c.vocab_size > 50256 else None,  # GPT-2's <|endoftext|>
                    eos_token_id=50256 if c.vocab_size > 50256 else None,
                    scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False, reorder_and_upcast_attn=False,
                    attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0)
    if model_type not in _LLAMA_FAMILY:
        raise CheckpointError(f"save_pretrained: model_type={model_type!r} is not supported; "
                              f"choose one of {sorted(_ARCHITECTURES)}")
    gemma = model_type in _GEMMA
    mlp = "geglu" if gemma else "swiglu"
    require(c.positional == "rope" and c.norm == "rmsnorm" and c.mlp == mlp,
            f"the Llama family needs positional='rope', norm='rmsnorm', mlp={mlp!r}")
    defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
    optional = set().union(*_FAMILY_FIELDS.values())
    for field in sorted(optional - _FAMILY_FIELDS[model_type] - {"mlp"}):
        require(getattr(c, field) == defaults[field], f"{field}={getattr(c, field)!r} has no {model_type} "
                f"config.json field (it needs the default {defaults[field]!r})")
    for field, want in _FAMILY_VALUES.get(model_type, {}).items():
        require(getattr(c, field) == want, f"{model_type} needs {field}={want!r}")
    layer_types = ["sliding_attention" if f else "full_attention" for f in c.layer_flags("sliding_layers")]
    out = dict(common, hidden_size=c.d_model, num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
               num_key_value_heads=c.kv_heads, head_dim=c.head_size, intermediate_size=c.mlp_dim,
               max_position_embeddings=c.max_seq_len, rms_norm_eps=c.norm_eps, hidden_act="silu",
               rope_theta=c.rope_theta, rope_parameters=_rope_to_hf(c),
               attention_dropout=0.0)
    if model_type in ("qwen3", "olmo2", "smollm3", "phi3") + _GEMMA:
        require(c.qkv_bias == c.use_bias or model_type == "smollm3",
                f"{model_type}'s attention_bias covers q, k, v and o together (qkv_bias == use_bias)")
        # token ids come from the tokenizer (extra_config); the family classes' defaults may lie outside vocab_size
        out.update(attention_bias=c.qkv_bias, sliding_window=c.sliding_window, pad_token_id=None, bos_token_id=None,
                   eos_token_id=None)
        if model_type in ("qwen3", "smollm3") + _GEMMA:
            out.update(layer_types=layer_types, use_sliding_window=c.sliding_window is not None)
        if model_type == "qwen3":
            out.update(max_window_layers=c.num_layers)
    if model_type == "smollm3":
        out.update(attention_bias=c.qkv_bias or c.use_bias, mlp_bias=c.use_bias,
                   no_rope_layers=[int(f) for f in c.layer_flags("rope_layers")])
    elif model_type == "phi3":
        require(not c.qkv_bias and not c.use_bias, "Phi-3 has no biases (qkv_bias=False, use_bias=False)")
        require(all(c.layer_flags("sliding_layers")) or c.sliding_window is None,
                "Phi-3's sliding_window applies to every layer (sliding_layers=None)")
        out.pop("attention_bias")
        out.update(original_max_position_embeddings=c.rope_original_max_len or c.max_seq_len,
                   partial_rotary_factor=c.rope_fraction,
                   rope_parameters=_rope_to_hf(c) | {"partial_rotary_factor": c.rope_fraction})
    elif gemma:
        out.pop("hidden_act")
        local = c.rope_theta_sliding or c.rope_theta  # Gemma 2 has one base (rope_theta_sliding stays None)
        scalar = (c.attn_scale or c.head_size ** -0.5) ** -2
        scalar = round(scalar) if abs(scalar - round(scalar)) < 1e-6 * scalar else scalar  # an int in the file
        out.update(hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=scalar,
                   attn_logit_softcapping=c.attn_softcap, final_logit_softcapping=c.final_softcap,
                   use_bidirectional_attention=False)
        if model_type == "gemma3_text":
            out.update(rope_local_base_freq=local,
                       rope_parameters={"full_attention": _rope_to_hf(c),
                                        "sliding_attention": dict(rope_type="default", rope_theta=local)})
    if model_type in ("qwen3", "olmo2", "smollm3", "phi3") + _GEMMA:
        return out
    if model_type == "qwen2":
        require(c.qkv_bias and not c.use_bias, "Qwen2 has q/k/v biases only (qkv_bias=True, use_bias=False)")
        flags = c.layer_flags("sliding_layers") if c.sliding_window is not None else (False,) * c.num_layers
        first = next((i for i, f in enumerate(flags) if f), c.num_layers)
        require(all(flags[first:]), "Qwen2 slides on the layers from max_window_layers on: sliding_layers must be "
                "False then True")
        out.update(use_sliding_window=c.sliding_window is not None, sliding_window=c.sliding_window,
                   max_window_layers=first, layer_types=layer_types)
    elif model_type == "mistral":
        require(not c.qkv_bias and not c.use_bias, "Mistral has no biases (qkv_bias=False, use_bias=False)")
        require(c.sliding_window is None or all(c.layer_flags("sliding_layers")),
                "Mistral's sliding_window applies to every layer (sliding_layers=None)")
        out.update(sliding_window=c.sliding_window)
    else:  # Llama's attention_bias covers q, k, v and o; mlp_bias the three MLP projections
        out.update(attention_bias=c.qkv_bias or c.use_bias, mlp_bias=c.use_bias)
    return out


_FAMILY_FIELDS = {  # ModelConfig fields beyond the Llama core that a family's config.json expresses
    "llama": set(), "qwen2": {"sliding_window", "sliding_layers"}, "mistral": {"sliding_window", "sliding_layers"},
    "qwen3": {"qk_norm", "sliding_window", "sliding_layers"},
    "olmo2": {"qk_norm", "pre_norm", "post_norm"},
    "smollm3": {"rope_layers", "sliding_window", "sliding_layers"},
    "phi3": {"rope_fraction", "sliding_window", "sliding_layers"},
    "gemma3_text": {"qk_norm", "post_norm", "norm_offset", "embed_scale", "mlp", "attn_scale", "sliding_window",
                    "sliding_layers", "rope_theta_sliding", "final_softcap"},
    "gemma2": {"post_norm", "norm_offset", "embed_scale", "mlp", "attn_scale", "sliding_window", "sliding_layers",
               "attn_softcap", "final_softcap"},
}
_ROPE_SCALING = {"rope_type", "rope_factor", "rope_original_max_len", "rope_low_freq_factor", "rope_high_freq_factor",
                 "rope_beta_fast", "rope_beta_slow", "rope_attention_factor", "rope_short_factor", "rope_long_factor"}
for _family in ("llama", "qwen2", "mistral", "qwen3", "olmo2", "smollm3", "phi3", "gemma3_text", "gemma2"):
    _FAMILY_FIELDS[_family] |= _ROPE_SCALING
_FAMILY_VALUES = {  # fields a family fixes
    "qwen3": {"qk_norm": "head"},
    "olmo2": {"qk_norm": "proj", "pre_norm": False, "post_norm": True},
    "gemma3_text": {"qk_norm": "head", "post_norm": True, "norm_offset": 1.0, "embed_scale": True},
    "gemma2": {"post_norm": True, "norm_offset": 1.0, "embed_scale": True},
}

# ----------------------------------------------------------------------------------------------- tensors


def _open_tensors(path: str) -> tuple[dict[str, str], Callable[[str], np.ndarray]]:
    """Map each tensor name to its shard file, and a getter reading one tensor (lazily, shard by shard)."""
    single, index = os.path.join(path, _SINGLE), os.path.join(path, _INDEX)
    if os.path.exists(index):
        weight_map = _read_json(index).get("weight_map")
        if not weight_map:
            raise CheckpointError(f"{index}: no 'weight_map' field")
        files = {name: os.path.join(path, shard) for name, shard in weight_map.items()}
    elif os.path.exists(single):
        with _safe_open(single) as f:
            files = {name: single for name in f.keys()}
    else:
        present = sorted(os.listdir(path))
        raise CheckpointError(f"{path}: neither {_SINGLE} nor {_INDEX} found (folder holds {present}); "
                              "re-save the model with `save_pretrained(..., safe_serialization=True)`")
    for shard in sorted(set(files.values())):
        if not os.path.exists(shard):
            raise CheckpointError(f"{index}: shard {os.path.basename(shard)} is listed in 'weight_map' but missing")
    handles: dict[str, Any] = {}

    def get(name: str) -> np.ndarray:
        if name not in files:
            raise CheckpointError(f"{path}: tensor {name!r} not found in the checkpoint")
        if files[name] not in handles:  # safetensors numpy reads bfloat16 as an ml_dtypes array
            handles[files[name]] = _safe_open(files[name])
        try:
            return handles[files[name]].get_tensor(name)
        except Exception as e:  # noqa: BLE001  (safetensors raises its own SafetensorError)
            raise CheckpointError(f"{files[name]}: tensor {name!r} cannot be read ({e}); the file may be "
                                  "incomplete: download it again") from None

    return files, get


def _safe_open(file: str):
    try:
        return safe_open(file, framework="np")
    except Exception as e:  # noqa: BLE001  (a truncated or foreign file: SafetensorError, not an OSError)
        raise CheckpointError(f"{file}: not a readable safetensors file ({e}); it may be incomplete: download "
                              "it again") from None


def _read_json(file: str) -> dict:
    """A JSON object from `file`; a CheckpointError naming the file, line and column when it is not one."""
    try:
        with open(file, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: expected a JSON object, got {type(data).__name__}")
    return data


def _gpt2_from_hf(get: Callable[[str], np.ndarray], names, c: ModelConfig) -> dict:
    prefix = "transformer." if "transformer.wte.weight" in names else ""
    D, N, H = c.d_model, c.num_heads, c.head_size

    def layers(fn):
        return np.stack([fn(f"{prefix}h.{i}.") for i in range(c.num_layers)])

    def ln(name):
        return {"scale": get(name + ".weight"), "bias": get(name + ".bias")}

    def stacked_ln(name):
        return {"scale": layers(lambda p: get(p + name + ".weight")), "bias": layers(lambda p: get(p + name + ".bias"))}

    def qkv(j):
        return {"kernel": layers(lambda p: get(p + "attn.c_attn.weight")[:, j * D:(j + 1) * D].reshape(D, N, H)),
                "bias": layers(lambda p: get(p + "attn.c_attn.bias")[j * D:(j + 1) * D].reshape(N, H))}

    def dense(name, shape):  # Conv1D weights are already [in, out]
        return {"kernel": layers(lambda p: get(p + name + ".weight").reshape(shape)),
                "bias": layers(lambda p: get(p + name + ".bias"))}

    params = {"embed": {"embedding": get(prefix + "wte.weight")},
              "pos_embed": {"embedding": get(prefix + "wpe.weight")},
              "layers": {"attn_norm": stacked_ln("ln_1"), "mlp_norm": stacked_ln("ln_2"),
                         "attn": {"q": qkv(0), "k": qkv(1), "v": qkv(2), "o": dense("attn.c_proj", (N, H, D))},
                         "mlp": {"up": dense("mlp.c_fc", (D, c.mlp_dim)), "down": dense("mlp.c_proj", (c.mlp_dim, D))}},
              "final_norm": ln(prefix + "ln_f")}
    if not c.tie_embeddings:
        params["lm_head"] = {"kernel": get("lm_head.weight").T}
    return params


_PROJ = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
         "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}


def fused_projections(model_type: str, config: ModelConfig) -> dict[str, list[tuple[str, int]]]:
    """A family's fused Hugging Face modules: name (e.g. "self_attn.qkv_proj") -> [(our projection, its output
    width)] in the order they are concatenated along the output axis ({} for unfused families)."""
    c = config
    width = {"q": c.num_heads * c.head_size, "k": c.kv_heads * c.head_size, "v": c.kv_heads * c.head_size,
             "gate": c.mlp_dim, "up": c.mlp_dim}
    return {_PROJ[parts[0]].rsplit(".", 1)[0] + "." + name: [(x, width[x]) for x in parts]
            for name, parts in _FUSED.get(model_type, {}).items()}


def _llama_from_hf(get: Callable[[str], np.ndarray], names, c: ModelConfig, model_type: str) -> dict:
    D, N, K, H, F = c.d_model, c.num_heads, c.kv_heads, c.head_size, c.mlp_dim
    fused = {x: (module, sum(w for _, w in parts[:j]), width)
             for module, parts in fused_projections(model_type, c).items() for j, (x, width) in enumerate(parts)}

    def layers(fn):
        return np.stack([fn(f"model.layers.{i}.") for i in range(c.num_layers)])

    def maybe(name, shape):  # a bias the checkpoint lacks (Llama attention_bias without mlp_bias): zeros are exact
        return get(name).reshape(shape) if name in names else np.zeros(shape, np.float32)

    def weight(p, name):  # [out, in]; a fused module's rows of this projection
        x = next((x for x, m in _PROJ.items() if m == name), None)
        if x in fused:
            module, start, width = fused[x]
            return get(p + module + ".weight")[start:start + width]
        return get(p + name + ".weight")

    def linear(name, kernel_shape, bias, bias_shape):
        d = {"kernel": layers(lambda p: weight(p, name).T.reshape(kernel_shape))}  # [out,in] -> [in,out]
        if bias:
            d["bias"] = layers(lambda p: maybe(p + name + ".bias", bias_shape))
        return d

    attn = {"q": linear("self_attn.q_proj", (D, N, H), c.qkv_bias, (N, H)),
            "k": linear("self_attn.k_proj", (D, K, H), c.qkv_bias, (K, H)),
            "v": linear("self_attn.v_proj", (D, K, H), c.qkv_bias, (K, H)),
            "o": linear("self_attn.o_proj", (N, H, D), c.use_bias, (D,))}
    mlp = {"gate": linear("mlp.gate_proj", (D, F), c.use_bias, (F,)),
           "up": linear("mlp.up_proj", (D, F), c.use_bias, (F,)),
           "down": linear("mlp.down_proj", (F, D), c.use_bias, (D,))}
    if c.qk_norm != "none":
        shapes = {"q": (H,), "k": (H,)} if c.qk_norm == "head" else {"q": (N, H), "k": (K, H)}
        for x in "qk":
            attn[f"{x}_norm"] = {"scale": layers(
                lambda p, x=x: get(f"{p}self_attn.{x}_norm.weight").reshape(shapes[x]))}
    params = {"embed": {"embedding": get("model.embed_tokens.weight")},
              "layers": {ours: {"scale": layers(lambda p, theirs=theirs: get(p + theirs + ".weight"))}
                         for ours, theirs in _NORMS.get(model_type, _LLAMA_NORMS).items()}
              | {"attn": attn, "mlp": mlp},
              "final_norm": {"scale": get("model.norm.weight")}}
    if not c.tie_embeddings:
        params["lm_head"] = {"kernel": get("lm_head.weight").T}
    return params


def _gpt2_to_hf(p: dict, c: ModelConfig) -> dict[str, np.ndarray]:
    D, lay, at = c.d_model, p["layers"], p["layers"]["attn"]
    out = {"transformer.wte.weight": p["embed"]["embedding"], "transformer.wpe.weight": p["pos_embed"]["embedding"],
           "transformer.ln_f.weight": p["final_norm"]["scale"], "transformer.ln_f.bias": p["final_norm"]["bias"]}
    for i in range(c.num_layers):
        h = f"transformer.h.{i}."
        out.update({
            h + "ln_1.weight": lay["attn_norm"]["scale"][i], h + "ln_1.bias": lay["attn_norm"]["bias"][i],
            h + "ln_2.weight": lay["mlp_norm"]["scale"][i], h + "ln_2.bias": lay["mlp_norm"]["bias"][i],
            h + "attn.c_attn.weight": np.concatenate([at[x]["kernel"][i].reshape(D, D) for x in "qkv"], axis=1),
            h + "attn.c_attn.bias": np.concatenate([at[x]["bias"][i].reshape(D) for x in "qkv"]),
            h + "attn.c_proj.weight": at["o"]["kernel"][i].reshape(D, D), h + "attn.c_proj.bias": at["o"]["bias"][i],
            h + "mlp.c_fc.weight": lay["mlp"]["up"]["kernel"][i], h + "mlp.c_fc.bias": lay["mlp"]["up"]["bias"][i],
            h + "mlp.c_proj.weight": lay["mlp"]["down"]["kernel"][i],
            h + "mlp.c_proj.bias": lay["mlp"]["down"]["bias"][i],
        })
    if not c.tie_embeddings:
        out["lm_head.weight"] = p["lm_head"]["kernel"].T
    return out


def _llama_to_hf(p: dict, c: ModelConfig, hf: dict[str, Any]) -> dict[str, np.ndarray]:
    D, lay, model_type = c.d_model, p["layers"], hf["model_type"]
    qkv_bias = model_type == "qwen2" or hf.get("attention_bias", False)
    o_bias, mlp_bias = hf.get("attention_bias", False), hf.get("mlp_bias", False)
    out = {"model.embed_tokens.weight": p["embed"]["embedding"], "model.norm.weight": p["final_norm"]["scale"]}

    def put(name, module, i, in_dim, bias):
        w = module["kernel"][i]
        out[name + ".weight"] = w.reshape(in_dim, -1).T  # [in, out] -> [out, in]
        if bias:  # zeros where our config has no such bias
            b = module["bias"][i] if "bias" in module else np.zeros(w.size // in_dim, w.dtype)
            out[name + ".bias"] = b.reshape(-1)

    fused = fused_projections(model_type, c)
    for i in range(c.num_layers):
        h, at, mlp = f"model.layers.{i}.", lay["attn"], lay["mlp"]
        for ours, theirs in _NORMS.get(model_type, _LLAMA_NORMS).items():
            out[f"{h}{theirs}.weight"] = lay[ours]["scale"][i]
        for x in "qk":
            if f"{x}_norm" in at:
                out[f"{h}self_attn.{x}_norm.weight"] = at[f"{x}_norm"]["scale"][i].reshape(-1)
        for x in "qkv":
            put(f"{h}self_attn.{x}_proj", at[x], i, D, qkv_bias)
        put(h + "self_attn.o_proj", at["o"], i, c.num_heads * c.head_size, o_bias)
        for x in ("gate", "up"):
            put(f"{h}mlp.{x}_proj", mlp[x], i, D, mlp_bias)
        put(h + "mlp.down_proj", mlp["down"], i, c.mlp_dim, mlp_bias)
        for module, parts in fused.items():   # Phi-3: concatenate along the output axis (no biases)
            out[h + module + ".weight"] = np.concatenate([out.pop(f"{h}{_PROJ[x]}.weight") for x, _ in parts])
    if not c.tie_embeddings:
        out["lm_head.weight"] = p["lm_head"]["kernel"].T
    return out


# ----------------------------------------------------------------------------------------------- public API


def load_pretrained(path: str | os.PathLike, *, param_dtype: str = "float32", **overrides) -> tuple[ModelConfig, dict]:
    """Read a local Hugging Face folder into `(config, params)`; never touches the network.

    Args:
      path: folder with `config.json` and `model.safetensors` (or `model.safetensors.index.json` and its shards).
      param_dtype: dtype the params are cast to and recorded in the config ("float32" master weights by default;
        "bfloat16" halves memory). Checkpoints stored in bfloat16, float16 or float32 all load.
      **overrides: other `ModelConfig` fields to set, e.g. `dtype="bfloat16"`, `remat="full"`, `max_seq_len=4096`.

    Returns:
      The `ModelConfig` and the param tree (host numpy arrays; `jax.device_put` them with your shardings), with
      layers stacked on a leading L axis exactly as `init_params` lays them out.
    """
    path = os.fspath(path)
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        raise CheckpointError(f"load_pretrained: {path} is not a folder (expected a Hugging Face checkpoint folder)")
    if not os.path.exists(cfg_file):
        raise CheckpointError(f"load_pretrained: {cfg_file} not found; a Hugging Face folder needs config.json")
    hf = _read_json(cfg_file)
    config = config_from_hf(hf, source=cfg_file, param_dtype=param_dtype, **overrides)
    names, get = _open_tensors(path)
    if hf["model_type"] == "gpt2":
        params = _gpt2_from_hf(get, names, config)
    else:
        params = _llama_from_hf(get, names, config, hf["model_type"])
    dtype = np.dtype(config.params_dtype)
    params = _tree_map(lambda x: np.asarray(x).astype(dtype), params)
    _check_layout(config, params, source=path)
    return config, params


def mode_from_umask(path: str | os.PathLike) -> None:
    """Give a written file the permissions of an ordinary new file under the process umask (safetensors writes
    through a private temporary file, 0600 whatever the umask)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def save_pretrained(config: ModelConfig, params: dict, path: str | os.PathLike, *, dtype: str | None = None,
                    model_type: str | None = None, max_shard_size: int | str | None = None,
                    extra_config: dict[str, Any] | None = None) -> None:
    """Write `params` as a Hugging Face folder (config.json + safetensors) that `transformers` loads.

    Args:
      config: the `ModelConfig` the params were built for.
      params: our param tree (jax or numpy arrays; a "score_head" is not exported).
      path: output folder (created if missing).
      dtype: storage dtype of the tensors ("float32", "bfloat16", "float16"); defaults to `config.param_dtype`.
      model_type: one of "gpt2", "llama", "qwen2", "mistral", "qwen3", "olmo2", "smollm3", "phi3",
        "gemma2", "gemma3_text"; inferred from the config when None (see `infer_model_type`).
      max_shard_size: bytes (int) or a string such as "5GB" / "20KB"; when the tensors exceed it they are split
        into `model-0000i-of-0000n.safetensors` shards listed by `model.safetensors.index.json`.
      extra_config: more config.json fields, e.g. {"bos_token_id": 1, "eos_token_id": 2} from your tokenizer.
    """
    path = os.fspath(path)
    dtype = str(np.dtype(dtype or config.param_dtype))
    hf = {**config_to_hf(config, model_type=model_type, dtype=dtype), **(extra_config or {})}
    host = _tree_map(lambda x: np.asarray(x), params)
    _check_layout(config, {k: v for k, v in host.items() if k != "score_head"}, source="save_pretrained params")
    tensors = _gpt2_to_hf(host, config) if hf["model_type"] == "gpt2" else _llama_to_hf(host, config, hf)
    tensors = {k: np.ascontiguousarray(v.astype(np.dtype(dtype))) for k, v in tensors.items()}
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf, f, indent=2, sort_keys=True)
    shards = _split(tensors, _parse_size(max_shard_size) if max_shard_size is not None else None)
    for stale in (_SINGLE, _INDEX):  # a previous export of another size must not shadow this one
        if os.path.exists(os.path.join(path, stale)):
            os.remove(os.path.join(path, stale))
    if len(shards) == 1:
        save_file(shards[0], os.path.join(path, _SINGLE), metadata={"format": "pt"})
        mode_from_umask(os.path.join(path, _SINGLE))
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(path, name), metadata={"format": "pt"})
        mode_from_umask(os.path.join(path, name))
        weight_map.update({k: name for k in shard})
    total = sum(v.nbytes for v in tensors.values())
    with open(os.path.join(path, _INDEX), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)


# ----------------------------------------------------------------------------------------------- helpers


def _tree_map(fn, tree):
    return {k: _tree_map(fn, v) for k, v in tree.items()} if isinstance(tree, dict) else fn(tree)


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)\s*", size.upper())
    if not m:
        raise ValueError(f"save_pretrained: max_shard_size={size!r}; use an int (bytes) or e.g. '500MB', '5GB'")
    unit = m.group(2)
    base = 1024 if "I" in unit else 1000
    return int(float(m.group(1)) * base ** "BKMGT".index(unit[0]))


def _split(tensors: dict[str, np.ndarray], max_bytes: int | None) -> list[dict[str, np.ndarray]]:
    """Greedy split in name order; a tensor larger than `max_bytes` gets a shard of its own."""
    if max_bytes is None:
        return [tensors]
    shards, size = [{}], 0
    for name, value in tensors.items():
        if shards[-1] and size + value.nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = value
        size += value.nbytes
    return shards


def _check_layout(config: ModelConfig, params: dict, *, source: str) -> None:
    """Compare the tree with `init_params`' layout (names and shapes), so a mismatch fails here, not in jit."""
    import jax  # the model module pulls in flax; import late so config mapping works without it

    from rlhf_jax.models import transformer

    expected = jax.eval_shape(lambda: transformer.init_params(config, jax.random.key(0)))
    want = {jax.tree_util.keystr(k): tuple(v.shape) for k, v in jax.tree_util.tree_leaves_with_path(expected)}
    got = {jax.tree_util.keystr(k): tuple(np.shape(v)) for k, v in jax.tree_util.tree_leaves_with_path(params)}
    problems = [f"{k}: expected {want.get(k)}, got {got.get(k)}" for k in sorted(set(want) | set(got))
                if want.get(k) != got.get(k)]
    if problems:
        raise CheckpointError(f"{source}: params do not match the layout of init_params for this config:\n  "
                              + "\n  ".join(problems[:20]))


__all__ = ["CheckpointError", "config_from_hf", "config_to_hf", "fused_projections", "infer_model_type",
           "load_pretrained",
           "save_pretrained"]
