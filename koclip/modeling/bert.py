"""BERT and RoBERTa encoders in Flax linen.

Parameter names follow transformers' (4.x) FlaxBertModel / FlaxRobertaModel, which is what the
published FlaxHybridCLIP checkpoints hold under `text_model/`. The two models differ only in
how positions are numbered: RoBERTa counts non-padding tokens from pad_token_id + 1. With
`positions="from_zero"` both number 0..L-1, as FlaxHybridCLIP called them (see
HybridCLIPConfig.text_position_ids).
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from koclip.config import TextConfig
from koclip.modeling.layers import DenseActivation, dense, dot_product_attention, layer_norm, padding_bias, split_heads


class BertEmbeddings(nn.Module):
    config: TextConfig
    dtype: jnp.dtype = jnp.float32
    positions: str = "model"  # or "from_zero"

    @nn.compact
    def __call__(self, input_ids, deterministic: bool = True):
        cfg = self.config
        if cfg.model_type == "roberta" and self.positions == "model":
            not_pad = (input_ids != cfg.pad_token_id).astype(jnp.int32)
            positions = jnp.cumsum(not_pad, axis=1) * not_pad + cfg.pad_token_id
        else:
            positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
        init = nn.initializers.normal(0.02)
        words = nn.Embed(cfg.vocab_size, cfg.hidden_size, embedding_init=init, name="word_embeddings")(input_ids)
        pos = nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, embedding_init=init,
                       name="position_embeddings")(positions)
        types = nn.Embed(cfg.type_vocab_size, cfg.hidden_size, embedding_init=init,
                         name="token_type_embeddings")(jnp.zeros_like(input_ids))
        x = layer_norm(cfg.layer_norm_eps, self.dtype, "LayerNorm")(words + pos + types)
        return nn.Dropout(cfg.hidden_dropout_prob)(x, deterministic=deterministic)


class BertSelfAttention(nn.Module):
    config: TextConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, bias, deterministic: bool = True):
        cfg = self.config
        heads = cfg.num_attention_heads
        q, k, v = (split_heads(dense(cfg.hidden_size, self.dtype, n)(x), heads) for n in ("query", "key", "value"))
        rate = cfg.attention_probs_dropout_prob
        rng = self.make_rng("dropout") if not deterministic and rate > 0 else None
        return dot_product_attention(q, k, v, bias, rng, rate, deterministic)


class BertResidual(nn.Module):
    """Dense -> dropout -> LayerNorm(x + residual): the `output` blocks of a BERT layer."""

    config: TextConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, residual, deterministic: bool = True):
        cfg = self.config
        x = dense(cfg.hidden_size, self.dtype, "dense")(x)
        x = nn.Dropout(cfg.hidden_dropout_prob)(x, deterministic=deterministic)
        return layer_norm(cfg.layer_norm_eps, self.dtype, "LayerNorm")(x + residual)


class BertAttention(nn.Module):
    config: TextConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, bias, deterministic: bool = True):
        attn = BertSelfAttention(self.config, self.dtype, name="self")(x, bias, deterministic)
        return BertResidual(self.config, self.dtype, name="output")(attn, x, deterministic)


class BertIntermediate(nn.Module):
    config: TextConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        return DenseActivation(self.config.intermediate_size, self.config.hidden_act, self.dtype, name="dense")(x)


class BertLayer(nn.Module):
    config: TextConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, bias, deterministic: bool = True):
        x = BertAttention(self.config, self.dtype, name="attention")(x, bias, deterministic)
        h = BertIntermediate(self.config, self.dtype, name="intermediate")(x)
        return BertResidual(self.config, self.dtype, name="output")(h, x, deterministic)


class BertLayerStack(nn.Module):
    config: TextConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, bias, deterministic: bool = True):
        for i in range(self.config.num_hidden_layers):
            x = BertLayer(self.config, self.dtype, name=str(i))(x, bias, deterministic)
        return x


class BertEncoder(nn.Module):
    config: TextConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, bias, deterministic: bool = True):
        return BertLayerStack(self.config, self.dtype, name="layer")(x, bias, deterministic)


class BertPooler(nn.Module):
    config: TextConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, hidden):
        return jnp.tanh(dense(self.config.hidden_size, self.dtype, "dense")(hidden[:, 0]))


class BertModel(nn.Module):
    """Returns (last_hidden_state [B, T, H], pooler_output [B, H])."""

    config: TextConfig
    dtype: jnp.dtype = jnp.float32
    positions: str = "model"  # or "from_zero", see BertEmbeddings

    @nn.compact
    def __call__(self, input_ids, attention_mask, deterministic: bool = True):
        x = BertEmbeddings(self.config, self.dtype, self.positions, name="embeddings")(input_ids, deterministic)
        x = BertEncoder(self.config, self.dtype, name="encoder")(x, padding_bias(attention_mask), deterministic)
        return x, BertPooler(self.config, self.dtype, name="pooler")(x)
