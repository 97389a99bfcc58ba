"""Low-rank adapters (LoRA, Hu et al. 2021) over the params pytree of `rlhf_jax.models`, as pure functions.

For each target kernel W (stacked over layers, [L, in..., out...]) an adapter holds a [L, in, r] and b [L, r, out]
(in and out the flattened input and output axes), and the adapted model uses

    W' = W + (alpha / r) * a @ b                                    (Hu et al. 2021, eq. 3; peft's "scaling")

`init_lora` draws a as peft does (Kaiming-uniform with a = sqrt(5): U(-1/sqrt(in), 1/sqrt(in))) and sets b = 0,
so the merged model equals the base at step 0. `merge_lora` returns the base params with every target kernel
replaced by W'. Targets name the projections of every layer: "q", "k", "v", "o" (attention) and "gate", "up",
"down" (MLP; "gate" only in SwiGLU models).

`save_peft` / `load_peft` read and write peft's format (adapter_config.json + adapter_model.safetensors) with the
module names of the Hugging Face architecture `models.hf.save_pretrained` writes, so that
`peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir)` gives our merged
model's logits. GPT-2 fuses q, k and v into one `c_attn` [D, 3D], Phi-3 into `qkv_proj` (and gate, up into
`gate_up_proj`): the targeted ones of a fused module are written as one adapter of rank n*r (a concatenated, b
block-diagonal; peft's `rank_pattern`/`alpha_pattern` keep the scale), which is exact; reading a fused adapter
back gives its projections one shared a (rank of the fused adapter; a projection it did not adapt gets b = 0).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.checks import check_ranges, config_check
from rlhf_jax.models.config import ModelConfig
from rlhf_jax.quant import (NF4_CODE, LoraKernel, NF4Tensor, dequantize_nf4, dequantize_params,  # noqa: F401
                            quantize_base, quantize_nf4)

TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
_GROUP = {"q": "attn", "k": "attn", "v": "attn", "o": "attn", "gate": "mlp", "up": "mlp", "down": "mlp"}
_IN_AXES = {"o": 2}
"""How many leading axes (after L) of each kernel are its input: o is [N, H, D]; the others have one."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraConfig:
    """Rank, scale and target projections of the adapters."""

    rank: int = 8
    """r: the adapters' inner dimension."""
    alpha: float = 16.0
    """The update is scaled by alpha / rank (peft's lora_alpha)."""
    targets: tuple[str, ...] = TARGETS
    """Projections of every layer that get an adapter: q, k, v, o, gate, up, down."""

    def __post_init__(self):
        check_ranges(self, positive=("rank", "alpha"))
        targets = tuple(self.targets)
        config_check(self, len(targets) > 0 and set(targets) <= set(TARGETS),
                     f"targets = {targets!r} must be a non-empty subset of {TARGETS}")
        object.__setattr__(self, "targets", targets)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def _kernel(params, name):
    return params["layers"][_GROUP[name]][name]["kernel"]


def _targets(params, lora_config: LoraConfig) -> list[str]:
    names = [t for t in lora_config.targets if t in params["layers"][_GROUP[t]]]
    missing = set(lora_config.targets) - set(names)
    if missing - {"gate"} or not names:   # "gate" is in the default targets but only SwiGLU models have it
        raise ValueError(f"LoraConfig.targets: the model has no {sorted(missing)} projection(s)")
    return names


def _in_out(kernel, name) -> tuple[int, int]:
    k = _IN_AXES.get(name, 1)
    return math.prod(kernel.shape[1:1 + k]), math.prod(kernel.shape[1 + k:])


def init_lora(params, model_config: ModelConfig, lora_config: LoraConfig, rng) -> dict:
    """Adapters {"attn"|"mlp": {name: {"a" [L,in,r], "b" [L,r,out]}}} in float32: a ~ U(-1/sqrt(in), 1/sqrt(in))
    (peft's default), b = 0."""
    del model_config  # the shapes come from the params; kept for the contract's signature
    adapters = {}
    names = _targets(params, lora_config)
    for name, key in zip(names, jax.random.split(rng, len(names))):
        w = _kernel(params, name)
        n_in, n_out = _in_out(w, name)
        bound = 1.0 / math.sqrt(n_in)
        a = jax.random.uniform(key, (w.shape[0], n_in, lora_config.rank), jnp.float32, -bound, bound)
        b = jnp.zeros((w.shape[0], lora_config.rank, n_out), jnp.float32)
        adapters.setdefault(_GROUP[name], {})[name] = {"a": a, "b": b}
    return adapters


def lora_delta(adapter: dict, kernel_shape, scale: float):
    """(alpha / r) * a @ b for one target, reshaped to its kernel's [L, in..., out...] shape (float32)."""
    return (scale * jnp.einsum("lir,lro->lio", adapter["a"], adapter["b"])).reshape(kernel_shape)


def merge_lora(params, adapters: dict, lora_config: LoraConfig, *, lazy: bool = False) -> dict:
    """The params with every adapted kernel W replaced by W + (alpha / rank) * a @ b (in W's dtype); the other
    leaves are the same arrays. Differentiable in both arguments. A QLoRA base (`quantize_base`) holds NF4Tensor
    kernels (of the layer stack): each is dequantised to its original dtype first, inside the caller's jitted
    step (QLoRA's doubleDequant), so that the stored base stays 4-bit; one without an adapter is only dequantised.

    `lazy` (for a QLoRA base): the NF4 kernels stay as they are and an adapted one becomes a `quant.LoraKernel`;
    the model's layer scan then dequantises and merges one layer at a time; with `remat="full"` (gradient
    checkpointing) a step never holds the whole dequantised stack (QLoRA's memory), without it the backward pass
    keeps each layer's kernel. The model's functions take such params; anything else that reads the
    kernels as arrays needs the eager merge."""
    if lazy and any(isinstance(x, NF4Tensor) for x in jax.tree.leaves(params["layers"],
                                                                     is_leaf=lambda x: isinstance(x, NF4Tensor))):
        layers = dict(params["layers"])
        for group, modules in adapters.items():
            layers[group] = dict(layers[group])
            for name, adapter in modules.items():
                kernel = LoraKernel(base=layers[group][name]["kernel"], a=adapter["a"], b=adapter["b"],
                                    scale=lora_config.scale)       # a @ b reshaped onto the kernel when unpacked
                layers[group][name] = {**layers[group][name], "kernel": kernel}
        return {**params, "layers": layers}
    layers = dict(dequantize_params(params["layers"]))
    for group, modules in adapters.items():
        layers[group] = dict(layers[group])
        for name, adapter in modules.items():
            w = layers[group][name]["kernel"]
            merged = w + lora_delta(adapter, w.shape, lora_config.scale).astype(w.dtype)
            layers[group][name] = {**layers[group][name], "kernel": merged}
    return {**params, "layers": layers}


# ----------------------------------------------------------------------------------------------- peft format
_LLAMA_NAMES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
                "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
_GPT2_NAMES = {"o": "attn.c_proj", "up": "mlp.c_fc", "down": "mlp.c_proj"}
_PREFIX = "base_model.model."


def _arch(model_config: ModelConfig, model_type: str | None = None) -> str:
    """The Hugging Face model_type whose module names the adapters use (`models.hf.infer_model_type` when None)."""
    from rlhf_jax.models.hf import infer_model_type
    return model_type or infer_model_type(model_config)


def _layer_prefix(arch: str, i: int) -> str:
    return f"{_PREFIX}transformer.h.{i}." if arch == "gpt2" else f"{_PREFIX}model.layers.{i}."


def _module_names(arch: str, model_config: ModelConfig) -> tuple[dict[str, str], dict[str, list[tuple[str, int]]]]:
    """(our projection -> its own peft module, fused module -> [(our projection, output width)] in order)."""
    from rlhf_jax.models.hf import fused_projections
    if arch == "gpt2":
        D = model_config.d_model
        return _GPT2_NAMES, {"attn.c_attn": [("q", D), ("k", D), ("v", D)]}
    fused = fused_projections(arch, model_config)
    members = {x for parts in fused.values() for x, _ in parts}
    return {x: m for x, m in _LLAMA_NAMES.items() if x not in members}, fused


def save_peft(adapters: dict, lora_config: LoraConfig, model_config: ModelConfig, path: str | os.PathLike, *,
              base_model: str | None = None, model_type: str | None = None) -> None:
    """Write adapter_config.json and adapter_model.safetensors (float32) that peft loads over the Hugging Face
    model `models.hf.save_pretrained(model_config, ...)` writes. `base_model` (a Hugging Face folder or hub id) is
    recorded as `base_model_name_or_path`, so that `AutoPeftModelForCausalLM.from_pretrained(path)` finds it.
    `model_type`: the base folder's family when it was not inferred (e.g. "phi3", whose projections are fused)."""
    from safetensors.numpy import save_file

    from rlhf_jax.models.hf import mode_from_umask

    arch, r, scale = _arch(model_config, model_type), lora_config.rank, lora_config.scale
    own, fused_modules = _module_names(arch, model_config)
    flat = {name: jax.tree.map(np.asarray, a) for mods in adapters.values() for name, a in mods.items()}
    tensors, modules, rank_pattern, alpha_pattern = {}, set(), {}, {}
    L = next(iter(flat.values()))["a"].shape[0]
    for i in range(L):
        p = _layer_prefix(arch, i)
        for name, ad in flat.items():
            if name not in own:
                continue
            module = own[name]
            modules.add(module.split(".")[-1])
            tensors[f"{p}{module}.lora_A.weight"] = ad["a"][i].T.copy()                 # [r, in]
            tensors[f"{p}{module}.lora_B.weight"] = ad["b"][i].T.copy()                 # [out, r]
            if ad["a"].shape[-1] != r:
                rank_pattern[module.split(".")[-1]] = ad["a"].shape[-1]
                alpha_pattern[module.split(".")[-1]] = scale * ad["a"].shape[-1]
        for module, parts in fused_modules.items():
            fused = [x for x, _ in parts if x in flat]
            if not fused:
                continue
            # e.g. c_attn [D, 3D] = [q | k | v]: a concatenated, b block-diagonal over the projections' columns
            starts = dict(zip([x for x, _ in parts], np.cumsum([0] + [w for _, w in parts])))
            a = np.concatenate([flat[x]["a"][i] for x in fused], axis=1)                # [D, n*r']
            b = np.zeros((a.shape[1], sum(w for _, w in parts)), np.float32)
            col = 0
            for x in fused:
                rx = flat[x]["a"].shape[-1]
                b[col:col + rx, starts[x]:starts[x] + flat[x]["b"].shape[-1]] = flat[x]["b"][i]
                col += rx
            short = module.split(".")[-1]
            tensors[f"{p}{module}.lora_A.weight"] = a.T.copy()
            tensors[f"{p}{module}.lora_B.weight"] = b.T.copy()
            modules.add(short)
            if a.shape[1] != r:
                rank_pattern[short], alpha_pattern[short] = a.shape[1], scale * a.shape[1]
    os.makedirs(path, exist_ok=True)
    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()},
              os.path.join(path, "adapter_model.safetensors"), metadata={"format": "pt"})
    mode_from_umask(os.path.join(path, "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": lora_config.alpha,
              "target_modules": sorted(modules), "lora_dropout": 0.0, "bias": "none",
              "fan_in_fan_out": arch == "gpt2", "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
              "init_lora_weights": True, "use_rslora": False, "use_dora": False, "modules_to_save": None,
              "inference_mode": True, "base_model_name_or_path": base_model}
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)


def load_peft(path: str | os.PathLike, model_config: ModelConfig, *,
              model_type: str | None = None) -> tuple[dict, LoraConfig]:
    """(adapters, LoraConfig) of a peft LoRA adapter folder for a model of `model_config` (plain LoRA only: no
    DoRA, rsLoRA or trained biases). A module whose rank or alpha differs from the config's (rank_pattern /
    alpha_pattern) is folded into b, so that merge_lora with the returned config's one scale is exact.
    `model_type`: the base model's family (None: inferred; Phi-3's fused modules are recognised by name)."""
    from safetensors.numpy import load_file

    with open(os.path.join(path, "adapter_config.json")) as f:
        cfg = json.load(f)
    source = os.path.join(path, "adapter_config.json")
    for key, ok in (("peft_type", cfg.get("peft_type") == "LORA"), ("use_dora", not cfg.get("use_dora")),
                    ("use_rslora", not cfg.get("use_rslora")), ("bias", cfg.get("bias", "none") == "none")):
        if not ok:
            raise ValueError(f"{source}: {key} = {cfg.get(key)!r} is not supported (plain LoRA only)")
    tensors = load_file(os.path.join(path, "adapter_model.safetensors"))
    tensors = {k.replace(".default", ""): v for k, v in tensors.items()}
    r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    scale = alpha / r
    arch, L = _arch(model_config, model_type), model_config.num_layers
    if model_type is None and arch != "gpt2" and any(".qkv_proj." in k or ".gate_up_proj." in k for k in tensors):
        arch = "phi3"

    def module_scale(module):
        short = module.split(".")[-1]
        rank = cfg.get("rank_pattern", {}).get(short, r)
        return cfg.get("alpha_pattern", {}).get(short, alpha) / rank

    def read(module, i):
        p = _layer_prefix(arch, i)
        a, b = tensors.get(f"{p}{module}.lora_A.weight"), tensors.get(f"{p}{module}.lora_B.weight")
        if a is None or b is None:
            return None
        return a.T.astype(np.float32), b.T.astype(np.float32) * (module_scale(module) / scale)

    names, fused_modules = _module_names(arch, model_config)
    adapters = {}
    for name, module in names.items():
        per_layer = [read(module, i) for i in range(L)]
        if all(x is None for x in per_layer):
            continue
        if any(x is None for x in per_layer):
            raise ValueError(f"{path}: the adapter of {module} is missing in some layers")
        adapters.setdefault(_GROUP[name], {})[name] = {"a": jnp.asarray(np.stack([x[0] for x in per_layer])),
                                                       "b": jnp.asarray(np.stack([x[1] for x in per_layer]))}
    for module, parts in fused_modules.items():
        fused = [read(module, i) for i in range(L)]
        if all(x is not None for x in fused):
            a, start = jnp.asarray(np.stack([f[0] for f in fused])), 0
            for x, width in parts:   # each projection: the shared a and its columns of b (exact)
                adapters.setdefault(_GROUP[x], {})[x] = {
                    "a": a, "b": jnp.asarray(np.stack([f[1][:, start:start + width] for f in fused]))}
                start += width
    if not adapters:
        raise ValueError(f"{path}: no LoRA weights for this model's modules (target_modules "
                         f"{cfg.get('target_modules')})")
    targets = tuple(t for t in TARGETS if t in adapters.get(_GROUP[t], {}))
    return adapters, LoraConfig(rank=r, alpha=alpha, targets=targets)


def _flat_axis(spec) -> str | tuple | None:
    """The mesh axis of a flattened group of dims: the leading dim's, when the others are unsharded (sharding the
    leading dim of a row-major flattening is sharding the flattened dim in contiguous blocks)."""
    spec = tuple(spec)
    if not spec or any(a is not None for a in spec[1:]):
        return None
    return spec[0]


def lora_sharding(adapters, model_config: ModelConfig, mesh):
    """NamedShardings for an adapter tree (and a reward model's "score_head" beside it) under the rule table:
    each adapter's A [L, in, r] is split like its kernel's input axis, B [L, r, out] like its output axis, the rank
    never; so that `merge_lora`'s A @ B lands on the kernel's own layout."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from rlhf_jax import sharding as S

    kernels = S.params_sharding(model_config, mesh, scalar_head="score_head" in adapters)

    def spec_of(name):
        kernel = tuple(kernels["layers"][_GROUP[name]][name]["kernel"].spec)
        kernel = kernel + (None,) * (4 - len(kernel))
        k = _IN_AXES.get(name, 1)
        return _flat_axis(kernel[1:1 + k]), _flat_axis(kernel[1 + k:])

    out = {}
    for group, names in adapters.items():
        if group not in ("attn", "mlp"):
            out[group] = kernels[group] if group in kernels else jax.tree.map(lambda _: NamedSharding(mesh, P()),
                                                                              names)
            continue
        out[group] = {}
        for name, ab in names.items():
            i, o = spec_of(name)
            out[group][name] = {"a": NamedSharding(mesh, P(None, i, None)), "b": NamedSharding(mesh, P(None, None, o))}
    return out
