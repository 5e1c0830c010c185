"""The hybrid model: text encoder + vision encoder, each projected into one space.

The parameter tree is FlaxHybridCLIP's: text_model/, vision_model/, text_projection/kernel,
visual_projection/kernel, logit_scale. `KoCLIP` wraps the Flax module into pure functions of
(params, inputs) that jit, shard and differentiate.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from koclip.config import HybridCLIPConfig
from koclip.modeling.bert import BertModel
from koclip.modeling.clip_text import ClipTextModel
from koclip.modeling import onednn
from koclip.modeling.layers import dense
from koclip.modeling.vision import vision_model_class

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def l2_normalize(x, eps: float = 1e-12):
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


class HybridCLIP(nn.Module):
    config: HybridCLIPConfig
    dtype: Any = jnp.float32

    def setup(self):
        cfg = self.config
        if cfg.text_config.model_type == "clip_text_model":
            self.text_model = ClipTextModel(cfg.text_config, self.dtype)
        else:
            self.text_model = BertModel(cfg.text_config, self.dtype, cfg.text_position_ids)
        self.vision_model = vision_model_class(cfg.vision_config)(cfg.vision_config, self.dtype)
        init = nn.initializers.normal(0.02)
        self.text_projection = dense(cfg.projection_dim, self.dtype, None, use_bias=False, kernel_init=init)
        self.visual_projection = dense(cfg.projection_dim, self.dtype, None, use_bias=False, kernel_init=init)
        self.logit_scale = self.param("logit_scale", nn.initializers.constant(cfg.logit_scale_init), ())

    def text_features(self, input_ids, attention_mask, deterministic: bool = True):
        _, pooled = self.text_model(input_ids, attention_mask, deterministic)
        return self.text_projection(pooled).astype(jnp.float32)

    def image_features(self, pixels, deterministic: bool = True):
        _, pooled, _ = self.vision_model(pixels, deterministic=deterministic)
        return self.visual_projection(pooled).astype(jnp.float32)

    def patch_features(self, pixels):
        _, _, patches = self.vision_model(pixels, with_patches=True)
        return self.visual_projection(patches).astype(jnp.float32)

    def scale(self):
        if self.config.logit_scale_mode == "fixed":
            return jnp.float32(self.config.fixed_logit_scale)
        return jnp.exp(self.logit_scale.astype(jnp.float32))

    def __call__(self, input_ids, attention_mask, pixels, deterministic: bool = True):
        """Returns (text embeddings, image embeddings, logit scale); embeddings L2-normalised."""
        text = l2_normalize(self.text_features(input_ids, attention_mask, deterministic))
        image = l2_normalize(self.image_features(pixels, deterministic))
        return text, image, self.scale()


class KoCLIP:
    """Pure, jit-ready functions of the hybrid model for one config and compute dtype.

    Inputs: token ids and attention mask int32 [B, T]; pixels float32 NHWC [B, S, S, 3],
    normalised as koclip.processing does. Outputs are float32 whatever the compute dtype.
    The encode functions (inference) run the dense layers' matmuls through oneDNN where
    koclip.modeling.onednn.status() says so; contrastive_logits (training) keeps XLA's dot.
    """

    def __init__(self, config: HybridCLIPConfig, dtype: str = "float32", matmul: str | None = None):
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
        self.config = config
        self.dtype = dtype
        # "auto", "onednn" or "xla" (koclip.modeling.onednn); None: $KOCLIP_MATMUL, else auto.
        # Fixed per instance: jit caches a trace per bound method, so a change needs a new KoCLIP.
        self.matmul = onednn.setting(matmul)
        self.module = HybridCLIP(config, DTYPES[dtype])

    def dummy_inputs(self, batch: int = 1):
        size = self.config.image_size
        ids = jnp.ones((batch, self.config.text_length_buckets[0]), jnp.int32)
        return ids, jnp.ones_like(ids), jnp.zeros((batch, size, size, 3), jnp.float32)

    def init(self, rng: jax.Array | int = 0) -> dict:
        if isinstance(rng, int):
            rng = jax.random.PRNGKey(rng)
        return jax.jit(lambda r: self.module.init(r, *self.dummy_inputs())["params"])(rng)

    def param_shapes(self) -> dict:
        """The parameter tree as jax.ShapeDtypeStruct leaves, without allocating it."""
        return jax.eval_shape(lambda r: self.module.init(r, *self.dummy_inputs())["params"], jax.random.PRNGKey(0))

    def cast_params(self, params):
        """Float params in the compute dtype. The encode functions cast inside too; casting once
        up front saves re-reading float32 weights on every bfloat16 call."""
        if self.dtype == "float32":
            return params
        dtype = DTYPES[self.dtype]
        return jax.tree_util.tree_map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)

    def encode_text(self, params, input_ids, attention_mask):
        """[B, T] ids and mask -> L2-normalised text embeddings [B, D]."""
        with onednn.inference(self.matmul):
            out = self.module.apply({"params": self.cast_params(params)}, input_ids, attention_mask,
                                    method=HybridCLIP.text_features)
        return l2_normalize(out)

    def encode_image(self, params, pixels):
        """[B, S, S, 3] pixels -> L2-normalised image embeddings [B, D]."""
        with onednn.inference(self.matmul):
            out = self.module.apply({"params": self.cast_params(params)}, pixels, method=HybridCLIP.image_features)
        return l2_normalize(out)

    def encode_patches(self, params, pixels):
        """[B, S, S, 3] pixels -> L2-normalised per-patch embeddings [B, P, D], row-major patch order."""
        with onednn.inference(self.matmul):
            out = self.module.apply({"params": self.cast_params(params)}, pixels, method=HybridCLIP.patch_features)
        return l2_normalize(out)

    def logit_scale(self, params):
        return self.module.apply({"params": params}, method=HybridCLIP.scale)

    def contrastive_logits(self, params, input_ids, attention_mask, pixels, deterministic: bool = True, rng=None):
        """(logits_per_text [Bt, Bi], logits_per_image [Bi, Bt]) = scale * cosine similarity."""
        rngs = {"dropout": rng} if rng is not None else {}
        text, image, scale = self.module.apply(
            {"params": params}, input_ids, attention_mask, pixels, deterministic, rngs=rngs
        )
        logits_per_text = scale * text @ image.T
        return logits_per_text, logits_per_text.T


def count_params(params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))
