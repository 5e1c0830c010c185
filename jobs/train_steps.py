"""The training losses and the jitted train steps of jobs.train.

`contrastive_loss` is the symmetric InfoNCE of one caption per image (captions with the same text
sharing the target); `multi_positive_loss` the one of several captions per image, whose batches
(jobs.train_data.PairBatches.multi_batch) carry their text rows packed by length. Each
`make_*train_step` gives a jitted step over the flat parameter dict in which only the named
parameters get gradients and optimizer state.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax.traverse_util import unflatten_dict

from koclip.modeling import KoCLIP


def same_caption(ids):
    """[B, B] bool: rows of the batch whose token ids are identical (the same caption)."""
    return (ids[:, None, :] == ids[None, :, :]).all(axis=-1)


def contrastive_loss(logits_per_text, same=None):
    """Symmetric InfoNCE. With `same` ([B, B] bool, true on the diagonal), pairs whose captions
    are the same text are positives too, sharing the target mass: with several captions per image
    two images of a batch can both draw a keyword such as `동물`, and neither is a wrong answer."""
    if same is None:
        labels = jnp.arange(logits_per_text.shape[0])
        ce = optax.softmax_cross_entropy_with_integer_labels
        return (ce(logits_per_text, labels).mean() + ce(logits_per_text.T, labels).mean()) / 2
    targets = same.astype(logits_per_text.dtype)
    targets = targets / targets.sum(axis=1, keepdims=True)  # symmetric, so the same for columns
    ce = optax.softmax_cross_entropy
    return (ce(logits_per_text, targets).mean() + ce(logits_per_text.T, targets).mean()) / 2


def multi_positive_loss(logits_per_text, positives, valid):
    """Symmetric InfoNCE with several captions per image (logits_per_text [T, B], positives [T, B]
    bool, valid [T] bool: padding rows are false). A caption's target mass is spread over the
    images that have its text; an image's over its captions, softmax over every valid text row of
    the batch. With one caption per image and `positives` = `same_caption` this is contrastive_loss."""
    positives = positives & valid[:, None]
    weights = positives.astype(logits_per_text.dtype)
    ce = optax.softmax_cross_entropy
    text_targets = weights / jnp.maximum(weights.sum(axis=1, keepdims=True), 1.0)
    per_text = ce(logits_per_text, text_targets)
    text_loss = jnp.where(valid, per_text, 0.0).sum() / jnp.maximum(valid.sum(), 1)
    image_logits = jnp.where(valid[None, :], logits_per_text.T, -1e9)
    image_targets = weights.T / jnp.maximum(weights.T.sum(axis=1, keepdims=True), 1.0)
    return (text_loss + ce(image_logits, image_targets).mean()) / 2


def multi_caption_logits(model: KoCLIP, params, ids_short, mask_short, ids_long, mask_long, pixels,
                         deterministic: bool = True, rng=None):
    """logits_per_text [R1 + R2, B] of a multi-caption batch (jobs.train_data.PairBatches.multi_batch)."""
    from koclip.modeling.hybrid import HybridCLIP, l2_normalize

    keys = jax.random.split(rng, 3) if rng is not None else [None] * 3

    def apply(method, *args, key):
        rngs = {"dropout": key} if key is not None else {}
        return model.module.apply({"params": params}, *args, deterministic, method=method, rngs=rngs)

    text = jnp.concatenate([apply(HybridCLIP.text_features, ids_short, mask_short, key=keys[0]),
                            apply(HybridCLIP.text_features, ids_long, mask_long, key=keys[1])])
    image = apply(HybridCLIP.image_features, pixels, key=keys[2])
    scale = model.module.apply({"params": params}, method=HybridCLIP.scale)
    return scale * l2_normalize(text) @ l2_normalize(image).T


def make_multi_train_step(model: KoCLIP, optimizer, names: list[str]):
    """make_train_step for multi-caption batches (TrainConfig.captions_per_image != 1)."""

    def loss_fn(trainable, frozen, ids_short, mask_short, ids_long, mask_long, pixels, positives, valid, rng):
        params = unflatten_dict({**frozen, **trainable}, sep="/")
        logits = multi_caption_logits(model, params, ids_short, mask_short, ids_long, mask_long, pixels,
                                      deterministic=False, rng=rng)
        return multi_positive_loss(logits, positives, valid)

    def step(flat, opt_state, ids_short, mask_short, ids_long, mask_long, pixels, positives, valid, rng):
        trainable = {k: flat[k] for k in names}
        frozen = {k: v for k, v in flat.items() if k not in trainable}
        loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, ids_short, mask_short, ids_long, mask_long,
                                                  pixels, positives, valid, rng)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        return {**flat, **optax.apply_updates(trainable, updates)}, opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1))


def make_train_step(model: KoCLIP, optimizer, names: list[str]):
    """A jitted step over the flat param dict; only `names` get gradients and optimizer state."""

    def loss_fn(trainable, frozen, ids, mask, pixels, rng):
        params = unflatten_dict({**frozen, **trainable}, sep="/")
        logits, _ = model.contrastive_logits(params, ids, mask, pixels, deterministic=False, rng=rng)
        return contrastive_loss(logits, same_caption(ids))

    def step(flat, opt_state, ids, mask, pixels, rng):
        trainable = {k: flat[k] for k in names}
        frozen = {k: v for k, v in flat.items() if k not in trainable}
        loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, ids, mask, pixels, rng)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        return {**flat, **optax.apply_updates(trainable, updates)}, opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1))
