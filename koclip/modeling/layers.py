"""Pieces shared by the encoders: activations, attention math, layer norm."""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from koclip.modeling import onednn


def quick_gelu(x):
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS = {
    "gelu": functools.partial(nn.gelu, approximate=False),
    "gelu_new": functools.partial(nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(nn.gelu, approximate=True),
    "quick_gelu": quick_gelu,
    "relu": nn.relu,
    "tanh": jnp.tanh,
}


def activation(name: str):
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"activation {name!r} is not supported; expected one of {sorted(ACTIVATIONS)}") from None


def _is_dense_contraction(lhs, rhs, dimension_numbers) -> bool:
    """[..., K] x [K, N]: nn.Dense's dot."""
    (lc, rc), (lb, rb) = dimension_numbers
    return rhs.ndim == 2 and tuple(lc) == (lhs.ndim - 1,) and tuple(rc) == (0,) and not lb and not rb


def _onednn_dense(lhs, rhs, dimension_numbers) -> bool:
    """Whether nn.Dense's dot runs as oneDNN's matmul: inside KoCLIP's encode functions when
    koclip.modeling.onednn says so (decided at trace time)."""
    return onednn.active(lhs.dtype) and _is_dense_contraction(lhs, rhs, dimension_numbers) and lhs.dtype == rhs.dtype


def _dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """nn.Dense's dot: oneDNN's matmul where _onednn_dense says so, else XLA's dot."""
    if _onednn_dense(lhs, rhs, dimension_numbers):
        return onednn.matmul(lhs, rhs)
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision)


def _dot_general_f32_accumulate(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    if _onednn_dense(lhs, rhs, dimension_numbers):
        return onednn.matmul(lhs, rhs)  # accumulates in float32, rounds once to lhs's dtype
    out = jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                              preferred_element_type=jnp.float32)
    return out.astype(lhs.dtype)


def _dense_dot(dtype):
    """The dot of a dense layer computing in `dtype` (float32 accumulation below float32)."""
    return _dot_general if dtype == jnp.float32 else _dot_general_f32_accumulate


def dense(features: int, dtype, name: str, use_bias: bool = True, kernel_init=nn.initializers.lecun_normal()) -> nn.Dense:
    """nn.Dense whose low-precision matmuls accumulate in float32.

    XLA on CPU runs a bfloat16 x bfloat16 -> bfloat16 dot by converting both operands to float32
    (no faster than float32), but a bfloat16 dot with a float32 result natively, about twice
    as fast (measured by bench/encoders.py). The result is cast back to the compute dtype.
    Inside KoCLIP's encode functions the dot may run as oneDNN's matmul instead
    (koclip.modeling.onednn).
    """
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, kernel_init=kernel_init, dot_general=_dense_dot(dtype),
                    name=name)


class DenseActivation(nn.Module):
    """activation(dense(x)): the first MLP layer of a transformer block.

    Its parameters are nn.Dense's (`kernel` [in, features], `bias` [features], the same
    initializers, drawn in the same order), so it stands where `dense(...)` followed by
    `activation(...)` stood. Inside KoCLIP's encode functions, when oneDNN's matmul is on
    (koclip.modeling.onednn), bias and activation run as oneDNN post-ops of the matmul on its
    float32 accumulator, saving a pass over the [tokens, intermediate] activations; otherwise it
    computes exactly what nn.Dense + activation do.
    """

    features: int
    act: str
    dtype: Any = jnp.float32
    kernel_init: Any = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        if onednn.active(x.dtype) and self.act in onednn.POST_OPS:
            return onednn.dense_activation(x, kernel, bias, self.act, activation(self.act))
        y = _dense_dot(self.dtype)(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))
        return activation(self.act)(y + bias)


def layer_norm(eps: float, dtype, name: str) -> nn.LayerNorm:
    # use_fast_variance=False: E[(x-mean)^2] like PyTorch, not E[x^2]-mean^2, which loses
    # precision on activations with a large mean.
    return nn.LayerNorm(epsilon=eps, dtype=dtype, use_fast_variance=False, name=name)


def split_heads(x, num_heads: int):
    b, t, d = x.shape
    return x.reshape(b, t, num_heads, d // num_heads)


def dot_product_attention(q, k, v, bias, dropout_rng=None, dropout_rate=0.0, deterministic=True):
    """q, k, v: [B, T, H, Dh]; bias: additive, broadcastable to [B, H, Tq, Tk] or None.

    Softmax runs in float32 whatever the compute dtype.
    """
    scale = q.shape[-1] ** -0.5
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    if bias is not None:
        scores = scores + bias
    probs = jax.nn.softmax(scores, axis=-1)
    if not deterministic and dropout_rate > 0.0:
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs.shape)
        probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32).astype(v.dtype)
    return out.reshape(out.shape[0], out.shape[1], -1)


def padding_bias(mask):
    """[B, T] 1/0 attention mask -> additive bias [B, 1, 1, T] in float32."""
    return jnp.where(mask[:, None, None, :] > 0, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)
