"""CLIP's text transformer in Flax linen (`clip_text_model`: OpenAI CLIP, Bingsu/clip-vit-base-patch32-ko).

Token + position embeddings (positions 0..L-1), CLIP's pre-LayerNorm encoder under a causal mask
(and the padding mask), a final LayerNorm, and the hidden state of the end-of-text token as the
pooled output. Parameter names are transformers' CLIPTextTransformer's, so a CLIPModel's
`text_model.*` tensors map one to one: embeddings/token_embedding, embeddings/position_embedding,
encoder/layers/<i>/..., final_layer_norm.

Which token is the end of text follows transformers' CLIPTextModel: with `eos_token_id` 2 (the
value configs saved before transformers PR #24773 carry) it is the highest token id of each row,
as OpenAI's code took it; otherwise the first `eos_token_id` of each row.
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from koclip.config import TextConfig
from koclip.modeling.clip_encoder import ClipEncoder
from koclip.modeling.layers import layer_norm

LEGACY_EOS_TOKEN_ID = 2


def causal_padding_bias(mask):
    """[B, T] 1/0 attention mask -> additive bias [B, 1, T, T]: query q sees keys k <= q that are not padding."""
    t = mask.shape[1]
    causal = jnp.tril(jnp.ones((t, t), bool))
    visible = causal[None, None] & (mask[:, None, None, :] > 0)
    return jnp.where(visible, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)


def end_of_text_positions(input_ids, eos_token_id: int):
    if eos_token_id == LEGACY_EOS_TOKEN_ID:
        return jnp.argmax(input_ids, axis=-1)
    return jnp.argmax((input_ids == eos_token_id).astype(jnp.int32), axis=-1)


class ClipTextEmbeddings(nn.Module):
    config: TextConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids):
        cfg = self.config
        init = nn.initializers.normal(0.02)
        words = nn.Embed(cfg.vocab_size, cfg.hidden_size, embedding_init=init, name="token_embedding")(input_ids)
        pos = nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, embedding_init=init,
                       name="position_embedding")(jnp.arange(input_ids.shape[1]))
        return (words + pos[None]).astype(self.dtype)


class ClipTextModel(nn.Module):
    """Returns (last_hidden_state [B, T, H], pooled [B, H]: the end-of-text token's state)."""

    config: TextConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids, attention_mask, deterministic: bool = True):
        cfg = self.config
        x = ClipTextEmbeddings(cfg, self.dtype, name="embeddings")(input_ids)
        x = ClipEncoder(cfg, self.dtype, name="encoder")(x, causal_padding_bias(attention_mask))
        x = layer_norm(cfg.layer_norm_eps, self.dtype, "final_layer_norm")(x)
        rows = jnp.arange(x.shape[0])
        return x, x[rows, end_of_text_positions(input_ids, cfg.eos_token_id)]
