"""Mixed-precision building blocks shared by the model and the losses.

`head_matmul` is the LM head's matmul: 16-bit operands, float32 output (the logits feed a float32 log-softmax),
and a backward pass whose two matmuls run in the operands' dtype. Differentiating a plain
`einsum(..., preferred_element_type=float32)` instead gives a float32 cotangent to both backward matmuls, which
XLA then runs as float32 (TF32 on Hopper) products of the largest matrices in the model: measured on an H100
for GPT-2 124M at 8 x 1024 tokens, 4.0 ms of a 25 ms SFT step against about 1.9 ms in bf16. Casting the logits'
cotangent to the compute dtype is what bf16 autocast training does (the logits' gradient is bf16 there too);
with float32 operands nothing is cast and the gradient is exact.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


@jax.custom_vjp
def head_matmul(x, w):
    """x [..., D] @ w [D, V] -> [..., V] float32 (accumulated in float32, never rounded to x.dtype).

    Backward: the cotangent g [..., V] is cast to x.dtype, then dx = g w^T and dw = sum x^T g are computed with
    float32 accumulation and returned in x.dtype and w.dtype.
    """
    return _product(x, w)


def _product(x, w):
    # The barriers keep XLA from fusing neighbouring elementwise work (the softmax gradient, a temperature
    # scale) into the product as a Triton gemm fusion. Measured on an H100, PPO update of GPT-2 124M: one head
    # product went from 1.12 to 0.67 ms and the update from 492.7 to 480.7 ms. XLA may still choose Triton for
    # the product itself (two of PPO's three head products stay Triton fusions at about 1.4 ms; the update takes
    # 450 ms with --xla_gpu_enable_triton_gemm=false, which slows decoding).
    x, w = jax.lax.optimization_barrier((x, w))
    return jax.lax.optimization_barrier(jnp.einsum("...d,dv->...v", x, w, preferred_element_type=jnp.float32))


def _head_matmul_fwd(x, w):
    return head_matmul(x, w), (x, w)


def head_matmul_grads(x, w, g):
    """(dx, dw) of `head_matmul(x, w)` for the logits' cotangent g [..., V]: g is cast to x.dtype (kept apart from
    its producer by a barrier, see `_product`), then dx = g w^T and dw = sum x^T g with float32 accumulation, in
    x.dtype and w.dtype. Also the tail of hand-written backward passes that form g themselves."""
    g = jax.lax.optimization_barrier(g.astype(x.dtype))
    dx = jnp.einsum("...v,dv->...d", g, w, preferred_element_type=jnp.float32).astype(x.dtype)
    rows = x.reshape(-1, x.shape[-1])
    dw = jnp.einsum("nd,nv->dv", rows, g.reshape(-1, g.shape[-1]), preferred_element_type=jnp.float32)
    return dx, dw.astype(w.dtype)


def _head_matmul_bwd(residuals, g):
    return head_matmul_grads(*residuals, g)


head_matmul.defvjp(_head_matmul_fwd, _head_matmul_bwd)
