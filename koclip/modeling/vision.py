"""Vision encoders in Flax linen: the CLIP vision transformer and ViT.

Parameter names follow transformers' (4.x) FlaxCLIPVisionModel and FlaxViTModel, which is what
the published FlaxHybridCLIP checkpoints hold under `vision_model/`. Pixels are NHWC float32,
already normalised (see koclip.processing).

Each model returns (last_hidden_state, pooled, patches): `pooled` is what the hybrid model
projects for the image embedding, and `patches` ([B, P, H], only when asked for) are the patch
tokens through the same head as the class token, so they project into the same space.
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from koclip.config import VisionConfig
from koclip.modeling.clip_encoder import ClipEncoder
from koclip.modeling.layers import DenseActivation, activation, dense, dot_product_attention, layer_norm, split_heads


def patchify(config: VisionConfig, dtype, use_bias: bool, name: str) -> nn.Conv:
    p = config.patch_size
    return nn.Conv(config.hidden_size, (p, p), strides=(p, p), padding="VALID", use_bias=use_bias,
                   dtype=dtype, name=name)


class ClipEmbeddings(nn.Module):
    config: VisionConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, pixels):
        cfg = self.config
        cls = self.param("class_embedding", nn.initializers.normal(0.02), (cfg.hidden_size,))
        x = patchify(cfg, self.dtype, False, "patch_embedding")(pixels.astype(self.dtype))
        x = x.reshape(x.shape[0], -1, cfg.hidden_size)
        cls = jnp.broadcast_to(cls.astype(x.dtype), (x.shape[0], 1, cfg.hidden_size))
        x = jnp.concatenate([cls, x], axis=1)
        pos = nn.Embed(cfg.num_patches + 1, cfg.hidden_size, embedding_init=nn.initializers.normal(0.02),
                       name="position_embedding")(jnp.arange(cfg.num_patches + 1))
        return x + pos[None].astype(x.dtype)


class ClipVisionTransformer(nn.Module):
    config: VisionConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, pixels, with_patches: bool = False):
        eps = self.config.layer_norm_eps
        x = ClipEmbeddings(self.config, self.dtype, name="embeddings")(pixels)
        x = layer_norm(eps, self.dtype, "pre_layrnorm")(x)  # sic: the published name
        hidden = ClipEncoder(self.config, self.dtype, name="encoder")(x)
        post = layer_norm(eps, self.dtype, "post_layernorm")
        patches = post(hidden[:, 1:]) if with_patches else None
        return hidden, post(hidden[:, 0]), patches


class ClipVisionModel(nn.Module):
    """The `clip_vision_model` tree: everything sits under `vision_model/`."""

    config: VisionConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, pixels, with_patches: bool = False, deterministic: bool = True):
        return ClipVisionTransformer(self.config, self.dtype, name="vision_model")(pixels, with_patches)


class VitEmbeddings(nn.Module):
    config: VisionConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, pixels, deterministic: bool = True):
        cfg = self.config
        init = nn.initializers.truncated_normal(0.02)
        cls = self.param("cls_token", init, (1, 1, cfg.hidden_size))
        pos = self.param("position_embeddings", init, (1, cfg.num_patches + 1, cfg.hidden_size))
        x = PatchEmbeddings(cfg, self.dtype, name="patch_embeddings")(pixels)
        cls = jnp.broadcast_to(cls.astype(x.dtype), (x.shape[0], 1, cfg.hidden_size))
        x = jnp.concatenate([cls, x], axis=1) + pos.astype(x.dtype)
        return nn.Dropout(cfg.hidden_dropout_prob)(x, deterministic=deterministic)


class PatchEmbeddings(nn.Module):
    config: VisionConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, pixels):
        x = patchify(self.config, self.dtype, True, "projection")(pixels.astype(self.dtype))
        return x.reshape(x.shape[0], -1, self.config.hidden_size)


class VitSelfAttention(nn.Module):
    config: VisionConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        cfg = self.config
        proj = lambda name: dense(cfg.hidden_size, self.dtype, name, use_bias=cfg.qkv_bias)
        q, k, v = (split_heads(proj(n)(x), cfg.num_attention_heads) for n in ("query", "key", "value"))
        rate = cfg.attention_dropout
        rng = self.make_rng("dropout") if not deterministic and rate > 0 else None
        return dot_product_attention(q, k, v, None, rng, rate, deterministic)


class VitDenseDropout(nn.Module):
    """Dense -> dropout: ViT's `attention/output` and `output` blocks (residual added by the caller)."""

    features: int
    dropout: float
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        x = dense(self.features, self.dtype, "dense")(x)
        return nn.Dropout(self.dropout)(x, deterministic=deterministic)


class VitAttention(nn.Module):
    config: VisionConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        cfg = self.config
        x = VitSelfAttention(cfg, self.dtype, name="attention")(x, deterministic)
        return VitDenseDropout(cfg.hidden_size, cfg.hidden_dropout_prob, self.dtype, name="output")(x, deterministic)


class VitIntermediate(nn.Module):
    config: VisionConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        return DenseActivation(self.config.intermediate_size, self.config.hidden_act, self.dtype, name="dense")(x)


class VitLayer(nn.Module):
    config: VisionConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        cfg = self.config
        norm = lambda name: layer_norm(cfg.layer_norm_eps, self.dtype, name)
        x = x + VitAttention(cfg, self.dtype, name="attention")(norm("layernorm_before")(x), deterministic)
        h = VitIntermediate(cfg, self.dtype, name="intermediate")(norm("layernorm_after")(x))
        return x + VitDenseDropout(cfg.hidden_size, cfg.hidden_dropout_prob, self.dtype, name="output")(h, deterministic)


class VitLayerStack(nn.Module):
    config: VisionConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        for i in range(self.config.num_hidden_layers):
            x = VitLayer(self.config, self.dtype, name=str(i))(x, deterministic)
        return x


class VitEncoder(nn.Module):
    config: VisionConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        return VitLayerStack(self.config, self.dtype, name="layer")(x, deterministic)


class VitModel(nn.Module):
    """ViT with its pooler; last_hidden_state is after the final layernorm, as in transformers."""

    config: VisionConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, pixels, with_patches: bool = False, deterministic: bool = True):
        cfg = self.config
        x = VitEmbeddings(cfg, self.dtype, name="embeddings")(pixels, deterministic)
        x = VitEncoder(cfg, self.dtype, name="encoder")(x, deterministic)
        hidden = layer_norm(cfg.layer_norm_eps, self.dtype, "layernorm")(x)
        pooler = VitPooler(cfg, self.dtype, name="pooler")
        patches = pooler(hidden[:, 1:]) if with_patches else None
        return hidden, pooler(hidden[:, 0]), patches


class VitPooler(nn.Module):
    config: VisionConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens):
        x = dense(self.config.hidden_size, self.dtype, "dense")(tokens)
        return activation(self.config.pooler_act)(x)


def vision_model_class(config: VisionConfig) -> type[nn.Module]:
    return ClipVisionModel if config.model_type == "clip_vision_model" else VitModel
