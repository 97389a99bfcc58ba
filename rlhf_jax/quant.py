"""4-bit NormalFloat (NF4) quantisation of QLoRA (Dettmers et al. 2023), for a frozen base under LoRA adapters.

A tensor w is flattened in row-major order and cut into blocks of `block_size` (64) consecutive values; per block

    absmax = max |w|,    code_i = argmin_j |NF4_CODE[j] - w_i * (1 / absmax)|,    w_i ~ NF4_CODE[code_i] * absmax

(QLoRA section 3: blockwise absmax quantisation with the NF4 data type). NF4_CODE is the 16-value NormalFloat4 table
of bitsandbytes (`functional.get_4bit_type("nf4")`, made by `create_normal_map(offset=0.9677083)`: quantiles of
N(0, 1) scaled to [-1, 1] with an exact 0; QLoRA appendix E lists the same values). As bitsandbytes does
(`backends/default/ops.py`, quantize_4bit): the scaled value is w * (1 / absmax) clamped to [-1, 1] (0 in an
all-zero block); the code is the bucket among the midpoints of adjacent NF4 values (torch.bucketize, right=False),
so a value exactly on a midpoint takes the lower code; two codes are packed per byte, the first (even-index) value
in the high nibble: byte = code[2i] << 4 | code[2i + 1]. A size that is not a multiple of `block_size` is padded
with zeros to whole blocks (the last block's absmax is then the max of its real values, as bitsandbytes' partial
last block); dequantisation drops the padding. Checked against bitsandbytes 0.50.2 on CPU: the packed bytes and the
float32 absmax are the same, bit for bit; with double quantisation the 8-bit codes are the same and the constants
agree to the float32 rounding of their mean (torch and XLA sum in different orders).

Double quantisation (QLoRA section 3, `compress_statistics=True` in bitsandbytes' quantize_4bit): the float32
absmax constants c (one per 64 values) are stored as 8 bits each:

    offset = mean(c);  per block of 256 of (c - offset): s = max |c - offset|,
    q = bucket of (c - offset) * (1 / s) among the midpoints of DYNAMIC_CODE;   c ~ DYNAMIC_CODE[q] * s + offset

DYNAMIC_CODE is bitsandbytes' default 8-bit code of quantize_blockwise, the signed dynamic map of Dettmers (2016)
(`create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)`), not a linear 8-bit code. Storage: 0.5 byte
per weight plus 4 / 64 = 0.0625 (plain) or 1 / 64 + 4 / (64 * 256) = 0.0159 (double) bytes per weight for the
constants: 4.5 or 4.127 bits per parameter (QLoRA section 3: the constants' 0.5 bits per parameter become 8/64 +
32/(64 * 256) = 0.127).

`NF4Tensor` is a `flax.struct` pytree (arrays as children, shape / dtype / block size static), so it lives in a
params tree, passes through `jax.jit` and saves with orbax (restored with the tree's shapes as the target).
`quantize_base` replaces the projection kernels of the layer stack with NF4Tensors; `dequantize_params` (called by
`rlhf_jax.lora.merge_lora` inside the jitted step) turns them back into arrays of their original dtype.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

NF4_CODE: tuple[float, ...] = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0)
"""The 16 NormalFloat4 values, ascending (bitsandbytes' `get_4bit_type("nf4")`; QLoRA appendix E)."""


def _dynamic_code() -> tuple[float, ...]:
    """bitsandbytes' `create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)`, bit for bit: for each
    exponent i = 0..6, the midpoints of 2^i + 1 points evenly spaced on [0.1, 1] (torch's float32 linspace: from
    the start for the first half, from the end for the second) times +-10^(i - 6); then 0 and 1; sorted."""
    data = []
    for i in range(7):
        n = 2 ** i + 1
        start, end, idx = np.float32(0.1), np.float32(1.0), np.arange(n)
        step = (end - start) / (n - 1)
        points = np.where(idx < n // 2, start + step * idx, end - step * (n - 1 - idx)).astype(np.float32)
        means = (points[:-1] + points[1:]) / np.float32(2)
        data += (10.0 ** (i - 6) * means).tolist() + (-(10.0 ** (i - 6)) * means).tolist()
    return tuple(float(x) for x in np.sort(np.asarray(data + [0.0, 1.0], np.float32)))


DYNAMIC_CODE: tuple[float, ...] = _dynamic_code()
"""The 256 values of the signed dynamic 8-bit code that double quantisation stores the absmax constants in."""

DOUBLE_QUANT_BLOCK = 256
"""Absmax constants per 8-bit block of double quantisation (QLoRA and bitsandbytes: 256)."""


@struct.dataclass
class NF4Tensor:
    """A tensor of `shape` in NF4: `codes` uint8 [num_blocks, block_size / 2] (two codes per byte, the first in
    the high nibble); `absmax` float32 [num_blocks] or, with double quantisation, uint8 [num_blocks] (indices
    into DYNAMIC_CODE) with `absmax_scale` float32 [ceil(num_blocks / 256)] and `absmax_offset` float32 []."""

    codes: jax.Array
    absmax: jax.Array
    absmax_scale: jax.Array | None = None
    absmax_offset: jax.Array | None = None
    shape: tuple[int, ...] = struct.field(pytree_node=False, default=())
    dtype: str = struct.field(pytree_node=False, default="float32")
    """The dtype of the quantised array (merge_lora returns the dequantised kernel in it)."""
    block_size: int = struct.field(pytree_node=False, default=64)
    layers: int = struct.field(pytree_node=False, default=0)
    """0: one tensor of `shape`. L > 0: a stack of L layers, each quantised on its own (its own blocks, and with
    double quantisation its own constants' blocks and mean, as bitsandbytes quantises each Linear's weight): every
    array has a leading L axis and `shape` is [L, ...]. A layer's slice (indexing every array, as `nn.scan` and
    `split_layers` do) is an NF4Tensor of shape[1:] with the same `layers`, told apart by its 2-D codes."""

    @property
    def double_quant(self) -> bool:
        return self.absmax_scale is not None

    @property
    def nbytes(self) -> int:
        """Bytes stored (codes and constants)."""
        return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(self))


def _bucket(scaled, code):
    """Index of the nearest code value (code ascending): the bucket among the midpoints, ties to the lower one."""
    code = jnp.asarray(code, jnp.float32)
    return jnp.searchsorted((code[:-1] + code[1:]) / 2, scaled, side="left").astype(jnp.uint8)


def _blockwise(x, code):
    """(indices [nb, bs], absmax [nb]) of x [nb, bs] float32 in `code`, as bitsandbytes' quantize kernels."""
    absmax = jnp.max(jnp.abs(x), axis=1)
    # bitsandbytes' 1 / max(absmax, 1e-38): 1e-38 is subnormal in float32, which XLA flushes to 0; 1 / inf = 0
    scaled = jnp.clip(x * (1.0 / jnp.where(absmax > 0, absmax, jnp.inf))[:, None], -1.0, 1.0)
    return _bucket(scaled, code), absmax


def quantize_nf4(w, *, block_size: int = 64, double_quant: bool = True) -> NF4Tensor:
    """NF4Tensor of w [...] (any float dtype): blocks of `block_size` consecutive row-major values, each as 4-bit
    codes of NF4_CODE times its absmax; with `double_quant` the absmax constants are stored in 8 bits (blocks of
    256 of DYNAMIC_CODE around their mean). A size that is not a multiple of block_size is padded with zeros."""
    if block_size <= 0 or block_size % 2:
        raise ValueError(f"quantize_nf4: block_size = {block_size} must be a positive even number")
    return _quantize(jnp.asarray(w), block_size, double_quant)


def _quantize_one(w, block_size: int, double_quant: bool) -> NF4Tensor:
    flat = w.astype(jnp.float32).reshape(-1)
    num_blocks = max(1, math.ceil(flat.size / block_size))
    flat = jnp.pad(flat, (0, num_blocks * block_size - flat.size))
    idx, absmax = _blockwise(flat.reshape(num_blocks, block_size), NF4_CODE)
    codes = (idx[:, 0::2] << 4) | idx[:, 1::2]                                     # [nb, bs/2] uint8
    scale = offset = None
    if double_quant:
        offset = jnp.mean(absmax)
        n2 = math.ceil(num_blocks / DOUBLE_QUANT_BLOCK)
        centred = jnp.pad(absmax - offset, (0, n2 * DOUBLE_QUANT_BLOCK - num_blocks))
        q2, scale = _blockwise(centred.reshape(n2, DOUBLE_QUANT_BLOCK), DYNAMIC_CODE)
        absmax = q2.reshape(-1)[:num_blocks]
    return NF4Tensor(codes=codes, absmax=absmax, absmax_scale=scale, absmax_offset=offset, shape=tuple(w.shape),
                     dtype=jnp.dtype(w.dtype).name, block_size=block_size)


_quantize = jax.jit(_quantize_one, static_argnums=(1, 2))


@functools.partial(jax.jit, static_argnums=(1, 2))
def _quantize_all(tensors: dict, block_size: int, double_quant: bool) -> dict:
    """quantize_nf4 of every layer of every stacked [L, ...] array of a dict (a stack of L NF4Tensors), compiled
    once as one program."""
    out = {}
    for key, w in tensors.items():
        q = jax.vmap(lambda one: _quantize_one(one, block_size, double_quant))(w)
        out[key] = q.replace(shape=tuple(w.shape), layers=int(w.shape[0]))
    return out


def nf4_absmax(q: NF4Tensor):
    """The absmax constants [num_blocks] float32 as dequantisation uses them (after double quantisation)."""
    if not q.double_quant:
        return q.absmax
    values = jnp.asarray(DYNAMIC_CODE, jnp.float32)[q.absmax.astype(jnp.int32)]
    scale = jnp.repeat(q.absmax_scale, DOUBLE_QUANT_BLOCK)[:q.absmax.shape[0]]
    return values * scale + q.absmax_offset


def _dequantize_one(q: NF4Tensor, shape):
    idx = jnp.stack([q.codes >> 4, q.codes & 0xF], axis=-1).reshape(q.codes.shape[0], -1)     # [nb, bs]
    values = jnp.asarray(NF4_CODE, jnp.float32)[idx.astype(jnp.int32)] * nf4_absmax(q)[:, None]
    return values.reshape(-1)[:math.prod(shape)].reshape(shape)


@jax.jit
def dequantize_nf4(q: NF4Tensor):
    """float32 array of q's shape: NF4_CODE[code] * absmax per value (the padding dropped); a stack of layers
    layer by layer, a layer's slice as that layer."""
    if q.codes.ndim == 3:                                                 # a stack [L, nb, bs/2]
        return jax.vmap(lambda one: _dequantize_one(one, q.shape[1:]))(q)
    return _dequantize_one(q, q.shape[1:] if q.layers else q.shape)


def is_nf4(x) -> bool:
    return isinstance(x, NF4Tensor)


QUANTIZED_KERNELS = ("q", "k", "v", "o", "gate", "up", "down")
"""The projections of the layer stack that `quantize_base` stores in NF4 (QLoRA / peft: every Linear layer of the
blocks; the embeddings, the LM head, the norms, the biases and a score head stay in full precision)."""


def quantize_base(params, *, block_size: int = 64, double_quant: bool = True) -> dict:
    """The params with the kernel of every projection of the layer stack (q, k, v, o, gate, up, down; stacked
    over layers, [L, ...]) replaced by its NF4Tensor, each layer quantised on its own (`NF4Tensor.layers`), so
    that the model's layer scan dequantises one layer at a time; every other leaf is the same array."""
    if block_size <= 0 or block_size % 2:
        raise ValueError(f"quantize_base: block_size = {block_size} must be a positive even number")
    layers = {group: dict(modules) if group in ("attn", "mlp") else modules
              for group, modules in params["layers"].items()}
    kernels = {f"{group}.{name}": layers[group][name]["kernel"] for group in ("attn", "mlp") if group in layers
               for name in QUANTIZED_KERNELS
               if "kernel" in layers[group].get(name, {}) and not is_nf4(layers[group][name]["kernel"])}
    for group in ("attn", "mlp"):
        for name, m in layers.get(group, {}).items():
            if is_nf4(m.get("kernel")) and not m["kernel"].layers:
                raise ValueError(f"quantize_base: layers.{group}.{name}.kernel is an NF4Tensor of the whole stack "
                                 "(quantize_nf4); the layer scan needs one per layer: quantise the float params")
    for key, q in _quantize_all(kernels, block_size, double_quant).items():
        group, name = key.split(".")
        layers[group][name] = {**layers[group][name], "kernel": q}
    return {**params, "layers": layers}


@struct.dataclass
class LoraKernel:
    """A LoRA-adapted kernel left unmerged: `base` (an array or an NF4Tensor) + `scale` * a @ b, with a [..., in, r]
    and b [..., r, out] (a leading L axis for a stack of layers, none for one layer's slice). `merge_lora(...,
    lazy=True)` makes these for an NF4 base, so that the model's layer scan dequantises and merges one layer at a
    time (`dequantize_params` inside the scanned block) instead of the whole stack before the forward pass."""

    base: object
    a: jax.Array
    b: jax.Array
    scale: float = struct.field(pytree_node=False, default=1.0)


def _is_packed(x) -> bool:
    return isinstance(x, (NF4Tensor, LoraKernel))


def _unpack(x):
    if isinstance(x, NF4Tensor):
        return dequantize_nf4(x).astype(x.dtype)
    w = _unpack(x.base) if isinstance(x.base, NF4Tensor) else x.base
    return w + (x.scale * jnp.matmul(x.a, x.b)).reshape(w.shape).astype(w.dtype)


def dequantize_params(params):
    """The params with every NF4Tensor leaf replaced by its dequantised array in its original dtype and every
    LoraKernel by its merged kernel; the other leaves are the same arrays (params with neither are returned as
    they are). The model calls it inside its layer scan on one layer's params, and on the whole tree where it
    does not scan (cached decoding)."""
    if not any(_is_packed(x) for x in jax.tree.leaves(params, is_leaf=_is_packed)):
        return params
    return jax.tree.map(lambda x: _unpack(x) if _is_packed(x) else x, params, is_leaf=_is_packed)
