"""CLIP's transformer encoder, shared by its vision and text towers.

Pre-LayerNorm blocks (layer_norm1 -> self_attn -> residual, layer_norm2 -> mlp -> residual) with
the parameter names of transformers' CLIPEncoder: `layers/<i>/self_attn/{q,k,v,out}_proj`,
`layers/<i>/mlp/fc1|fc2`, `layers/<i>/layer_norm1|2`. `config` is a VisionConfig or a TextConfig:
only hidden_size, num_attention_heads, intermediate_size, hidden_act and layer_norm_eps are read.
The vision tower attends everywhere (bias None); the text tower passes a causal + padding bias.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from koclip.modeling.layers import DenseActivation, dense, dot_product_attention, layer_norm, split_heads


class ClipAttention(nn.Module):
    config: Any
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, bias=None):
        cfg = self.config
        proj = lambda name: dense(cfg.hidden_size, self.dtype, name)
        q, k, v = (split_heads(proj(n)(x), cfg.num_attention_heads) for n in ("q_proj", "k_proj", "v_proj"))
        return proj("out_proj")(dot_product_attention(q, k, v, bias))


class ClipMLP(nn.Module):
    config: Any
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        x = DenseActivation(cfg.intermediate_size, cfg.hidden_act, self.dtype, name="fc1")(x)
        return dense(cfg.hidden_size, self.dtype, "fc2")(x)


class ClipLayer(nn.Module):
    config: Any
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, bias=None):
        eps = self.config.layer_norm_eps
        attn = ClipAttention(self.config, self.dtype, name="self_attn")
        x = x + attn(layer_norm(eps, self.dtype, "layer_norm1")(x), bias)
        return x + ClipMLP(self.config, self.dtype, name="mlp")(layer_norm(eps, self.dtype, "layer_norm2")(x))


class ClipLayerStack(nn.Module):
    config: Any
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, bias=None):
        for i in range(self.config.num_hidden_layers):
            x = ClipLayer(self.config, self.dtype, name=str(i))(x, bias)
        return x


class ClipEncoder(nn.Module):
    config: Any
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, bias=None):
        return ClipLayerStack(self.config, self.dtype, name="layers")(x, bias)
