"""Model configuration: one frozen dataclass covers GPT-2 and the Llama-style families (Llama, Qwen2, Mistral,
Qwen3, OLMo 2, SmolLM3, Phi-3, Gemma 3). Every field that only a later family uses is off by default.

Shape alphabet used across rlhf_jax: B batch, T time, S cache length, D model width, F MLP width,
N query heads, K kv heads, H head dim, V vocab, L layers.
"""
from __future__ import annotations

import dataclasses
from typing import Literal

import jax.numpy as jnp

from rlhf_jax.checks import check_ranges, config_check


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Architecture of a decoder-only transformer."""

    vocab_size: int = 259
    """V: number of token ids (the byte tokenizer has 256 bytes + PAD, BOS, EOS)."""
    d_model: int = 64
    """D: residual stream width."""
    num_layers: int = 2
    """L: number of transformer blocks (stacked with `nn.scan`, so params carry a leading L axis)."""
    num_heads: int = 4
    """N: query heads."""
    num_kv_heads: int | None = None
    """K: key/value heads (grouped-query attention); None means K = N."""
    head_dim: int | None = None
    """H: per-head width; None means D // N."""
    mlp_dim: int = 256
    """F: MLP hidden width."""
    max_seq_len: int = 256
    """Longest sequence (learned position table size; RoPE has no table but caches are sized by it)."""
    mlp: Literal["gelu", "swiglu", "geglu"] = "gelu"
    """GPT-2 uses a GELU MLP with biases; Llama a gated SiLU (SwiGLU) MLP without biases; Gemma a gated tanh-GELU
    (GeGLU, Shazeer 2020) MLP."""
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_eps: float = 1e-5
    norm_offset: float = 0.0
    """RMSNorm multiplies by (norm_offset + scale): Gemma stores its scales around 0 and uses 1 + scale."""
    pre_norm: bool = True
    """Normalise each sublayer's input: x + f(norm(x)) (GPT-2, Llama)."""
    post_norm: bool = False
    """Normalise each sublayer's output before the residual add: x + norm(f(.)) (OLMo 2 without pre_norm;
    Gemma 2/3 with both, "sandwich" norms). Adds attn_post_norm and mlp_post_norm parameters."""
    qk_norm: Literal["none", "head", "proj"] = "none"
    """RMSNorm of queries and keys before RoPE: "head" over each head's H features (Qwen3, Gemma 3), "proj" over
    the whole N*H (K*H) projection (OLMo 2). Adds q_norm and k_norm parameters."""
    embed_scale: bool = False
    """Multiply the token embeddings by sqrt(D) (Gemma)."""
    attn_scale: float | None = None
    """Attention logit scale; None: 1/sqrt(H). Gemma's query_pre_attn_scalar s gives 1/sqrt(s)."""
    positional: Literal["learned", "rope"] = "learned"
    rope_theta: float = 10_000.0
    rope_type: Literal["default", "linear", "yarn", "llama3", "longrope"] = "default"
    """Rotary scaling for long contexts, as Hugging Face's rope_type: "linear" (positions / factor; Chen et al.
    2023), "yarn" (Peng et al. 2023), "llama3" (Llama 3.1), "longrope" (Ding et al. 2024; Phi-3, Phi-4-mini).
    With rope_theta_sliding set it scales the non-sliding layers only (Gemma 3)."""
    rope_factor: float = 1.0
    """Scaling factor of linear, yarn and llama3 (longrope: max_seq_len / rope_original_max_len)."""
    rope_original_max_len: int | None = None
    """Context length the model was pretrained with (yarn, llama3, longrope)."""
    rope_low_freq_factor: float = 1.0
    """llama3: wavelengths above original / low_freq_factor are divided by the factor."""
    rope_high_freq_factor: float = 4.0
    """llama3: wavelengths below original / high_freq_factor are kept; those between are interpolated."""
    rope_beta_fast: float = 32.0
    """yarn: rotations below which a frequency is interpolated (the ramp's fast end)."""
    rope_beta_slow: float = 1.0
    """yarn: rotations above which a frequency is kept (the ramp's slow end)."""
    rope_attention_factor: float | None = None
    """yarn, longrope: multiplier of cos and sin; None: the paper's value from the factor."""
    rope_short_factor: tuple[float, ...] | None = None
    """longrope: per-frequency divisors while a sequence fits in rope_original_max_len (R/2 values)."""
    rope_long_factor: tuple[float, ...] | None = None
    """longrope: per-frequency divisors once it does not (Hugging Face switches on the longest position of a
    forward call)."""
    rope_fraction: float = 1.0
    """Share of each head's H features that RoPE rotates (the first H * rope_fraction, rotate-half among them;
    Phi-3's partial_rotary_factor); the rest pass through."""
    rope_layers: tuple[bool, ...] | None = None
    """Per layer: whether it applies RoPE (SmolLM3 leaves every fourth layer without positions); None: all."""
    sliding_window: int | None = None
    """W: a query at position t sees keys at t - W < s <= t on sliding layers (Mistral, Gemma 3); None: off."""
    sliding_layers: tuple[bool, ...] | None = None
    """Per layer: whether it uses the sliding window (Gemma 3 interleaves five sliding and one global layer);
    None with a sliding_window: every layer."""
    rope_theta_sliding: float | None = None
    """RoPE base of the sliding layers (Gemma 3's local base); None: rope_theta."""
    attn_softcap: float | None = None
    """Soft-capping of attention logits, c * tanh(logits / c) (Gemma 2); None: off."""
    final_softcap: float | None = None
    """Soft-capping of the output logits, c * tanh(logits / c) (Gemma 2); None: off."""
    use_bias: bool = True
    """Biases on attention output and MLP projections (GPT-2 style)."""
    qkv_bias: bool = True
    """Biases on the q, k, v projections (GPT-2 and Qwen2 have them; Llama does not)."""
    tie_embeddings: bool = True
    """Share the token embedding with the LM head."""
    dtype: str = "float32"
    """Compute dtype ("bfloat16" on accelerators); logits are always returned in float32."""
    param_dtype: str = "float32"
    """Storage dtype of the parameters (keep float32 master weights for training)."""
    remat: Literal["none", "full", "dots"] = "none"
    """Rematerialisation policy per block: recompute everything, or keep only matmul outputs."""
    attention_impl: Literal["xla", "cudnn"] | None = None
    """`jax.nn.dot_product_attention` implementation; None = cuDNN on GPU with a bf16/fp16 compute dtype, else XLA."""
    decode_attention: Literal["reference", "pallas"] | None = None
    """Attention of one-token decode steps over the KV cache: "pallas" is the flash-decoding kernel
    (`models.kernels.decode_attention`: the cache read once in blocks, partial softmaxes combined; interpret mode
    off GPU, slow; one device, a power-of-two head dim and query-per-kv-head group), "reference" the einsum /
    multiply-reduce softmax of `cached_attention`. None: reference (the kernel becomes the GPU default once it has
    been compiled and timed on a GPU, docs/results/gpu_round3.sh)."""
    segment_attention: Literal["dense", "pallas"] | None = None
    """Training attention of rows given segment_ids (packed or left-padded): "dense" builds a [B,1,T,T] mask for
    `jax.nn.dot_product_attention`; "pallas" passes the [B,T] ids to a Pallas flash-attention kernel
    (`models.kernels.segment_attention`, forward and backward; interpret mode off GPU, slow). Models with a
    sliding window or attention soft-capping always use the dense mask; unsharded only, as decode_attention.
    None: dense."""
    scan_unroll: int | None = None
    """Blocks per iteration of the `nn.scan` over layers. 1 is a rolled loop (one compiled block, fastest
    compile); num_layers is straight-line code that XLA fuses and schedules across layer boundaries (no
    per-layer parameter slicing or residual stacking: GPT-2 124M SFT on an H100 went from 42 to 32 ms a step),
    at about twice the compile time. None: num_layers on GPU/TPU, 1 on CPU. The parameter tree is the same."""
    logits_chunk: int | Literal["auto"] | None = "auto"
    """LM head + log-softmax of the training steps (SFT, DPO, PPO-ptx): an int streams the vocabulary in chunks
    of that many columns (no [B,T,V] float32 logits; each chunk's logits are recomputed in the backward pass);
    None builds the [B,T,V] float32 logits once (faster: 32 -> 28 ms for GPT-2 124M SFT 8x1024 on an H100);
    "auto" builds them while they take at most a quarter of the device's free memory (`models.head.resolve_chunk`;
    on a backend without memory statistics, such as CPU, `models.head.FULL_LOGITS_MAX_BYTES`, 4 GiB), else chunks
    of 8192."""

    def __post_init__(self):
        check_ranges(self, positive=("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                                     "mlp_dim", "max_seq_len", "norm_eps", "rope_theta", "attn_scale",
                                     "sliding_window", "rope_theta_sliding", "attn_softcap", "final_softcap"),
                     non_negative=("norm_offset",))
        for name in ("rope_short_factor", "rope_long_factor"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(float(v) for v in value))
        check_ranges(self, positive=("rope_factor", "rope_original_max_len", "rope_attention_factor"))
        if self.rope_type in ("yarn", "llama3", "longrope"):
            config_check(self, self.rope_original_max_len is not None,
                         f"rope_type = {self.rope_type!r} needs rope_original_max_len")
        for name in ("rope_layers", "sliding_layers"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(bool(v) for v in value))
                config_check(self, len(value) == self.num_layers,
                             f"{name} has {len(value)} entries; it needs one per layer (num_layers = "
                             f"{self.num_layers})")
        if self.scan_unroll is not None and (not isinstance(self.scan_unroll, int) or self.scan_unroll < 1):
            raise ValueError(f"ModelConfig: scan_unroll={self.scan_unroll!r} must be None or an int >= 1")
        chunk = self.logits_chunk
        if chunk is not None and chunk != "auto" and (not isinstance(chunk, int) or chunk < 1):
            raise ValueError(f"ModelConfig: logits_chunk={chunk!r} must be 'auto', None or an int >= 1")
        kv = self.num_kv_heads or self.num_heads
        if self.num_heads % kv:
            raise ValueError(f"ModelConfig: num_heads={self.num_heads} must be a multiple of num_kv_heads={kv}")
        if self.head_dim is None and self.d_model % self.num_heads:
            raise ValueError(f"ModelConfig: d_model={self.d_model} must be divisible by num_heads={self.num_heads}")
        config_check(self, 0.0 < self.rope_fraction <= 1.0 and self.rotary_dim % 2 == 0 and self.rotary_dim > 0,
                     f"rope_fraction = {self.rope_fraction} must be in (0, 1] and rotate an even number of the "
                     f"head_dim = {self.head_size} features")
        if self.rope_type == "longrope":
            half = self.rotary_dim // 2
            config_check(self, all(f is not None and len(f) == half for f in (self.rope_short_factor,
                                                                               self.rope_long_factor)),
                         f"rope_type = 'longrope' needs rope_short_factor and rope_long_factor of {half} values "
                         "(half the rotated features)")

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def head_size(self) -> int:
        return self.head_dim or self.d_model // self.num_heads

    @property
    def rotary_dim(self) -> int:
        """Features of each head that RoPE rotates: int(H * rope_fraction), as Hugging Face rounds it."""
        return int(self.head_size * self.rope_fraction)

    def layer_flags(self, name: str) -> tuple[bool, ...]:
        """`rope_layers` or `sliding_layers` spelled out per layer (None: every layer; no window: none slides)."""
        value = getattr(self, name)
        if name == "sliding_layers" and self.sliding_window is None:
            return (False,) * self.num_layers
        return (True,) * self.num_layers if value is None else value

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def params_dtype(self):
        return jnp.dtype(self.param_dtype)

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def preset(cls, name: str, **overrides) -> "ModelConfig":
        """A named architecture; keyword overrides replace fields (e.g. `dtype="bfloat16"`)."""
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)

    def num_params(self, *, include_embeddings: bool = True) -> int:
        """Parameter count (used for FLOP estimates: 6N per trained token, 2N per forward token)."""
        D, F, H = self.d_model, self.mlp_dim, self.head_size
        attn = D * H * (self.num_heads + 2 * self.kv_heads) + self.num_heads * H * D
        mlp = (2 if self.mlp == "gelu" else 3) * D * F
        per_layer = attn + mlp
        total = self.num_layers * per_layer
        if include_embeddings:
            total += self.vocab_size * D * (1 if self.tie_embeddings else 2)
            if self.positional == "learned":
                total += self.max_seq_len * D
        return total


_GPT2 = dict(vocab_size=50257, max_seq_len=1024, mlp="gelu", norm="layernorm", positional="learned",
             use_bias=True, qkv_bias=True, tie_embeddings=True)
_LLAMA = dict(mlp="swiglu", norm="rmsnorm", norm_eps=1e-5, positional="rope", use_bias=False, qkv_bias=False)

PRESETS: dict[str, ModelConfig] = {
    # CI-sized: a byte-level vocabulary, two layers.
    "tiny": ModelConfig(vocab_size=259, d_model=64, num_layers=2, num_heads=4, mlp_dim=256, max_seq_len=256),
    "tiny-llama": ModelConfig(vocab_size=259, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=128,
                              max_seq_len=256, tie_embeddings=False, **_LLAMA),
    "gpt2-124m": ModelConfig(d_model=768, num_layers=12, num_heads=12, mlp_dim=3072, **_GPT2),
    "gpt2-355m": ModelConfig(d_model=1024, num_layers=24, num_heads=16, mlp_dim=4096, **_GPT2),
    "gpt2-774m": ModelConfig(d_model=1280, num_layers=36, num_heads=20, mlp_dim=5120, **_GPT2),
    # Llama-3.2-1B shape.
    "llama-1b": ModelConfig(vocab_size=128256, d_model=2048, num_layers=16, num_heads=32, num_kv_heads=8,
                            head_dim=64, mlp_dim=8192, max_seq_len=4096, rope_theta=500_000.0,
                            tie_embeddings=True, **_LLAMA),
}
