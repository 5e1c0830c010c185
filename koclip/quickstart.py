"""KoCLIP's quickstart, called the way KoCLIP's and transformers' users call it:

    from koclip import load_koclip
    model, processor = load_koclip(path)
    inputs = processor(text=["강아지", "고양이"], images=image, return_tensors="np", padding=True)
    outputs = model(**inputs)   # logits_per_image, logits_per_text, text_embeds, image_embeds

A thin adapter over a loaded checkpoint: the towers are koclip.modeling's (the functions
koclip.encoders and the query library embed with), images go through koclip.processing, texts
through the checkpoint's own tokenizer. `pixel_values` are NCHW, as transformers' processors
return them (our Flax encoders take NHWC; the adapter transposes). Texts are padded to the
config's length buckets and batches to a power of two before the jitted functions see them,
so a few shapes are compiled whatever the inputs; the padding is masked out and cut off again.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
from PIL import Image

from koclip.errors import UsageError

RETURN_TENSORS = ("np", "jax")


class ProcessorOutput(dict):
    """The processor's arrays by name, also as attributes (`inputs.pixel_values`), as
    transformers' BatchFeature."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


@dataclass
class KoCLIPOutput:
    """float32 numpy arrays; embeddings L2-normalised, logits = logit scale * cosine similarity."""

    logits_per_image: np.ndarray  # [images, texts]
    logits_per_text: np.ndarray  # [texts, images]
    text_embeds: np.ndarray  # [texts, D]
    image_embeds: np.ndarray  # [images, D]

    def __getitem__(self, name: str) -> np.ndarray:
        return getattr(self, name)

    def keys(self) -> list[str]:
        return [f.name for f in fields(self)]


def _next_power_of_two(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _pad_rows(array: np.ndarray, rows: int) -> np.ndarray:
    if array.shape[0] == rows:
        return array
    padding = np.zeros((rows - array.shape[0],) + array.shape[1:], dtype=array.dtype)
    return np.concatenate([array, padding])


def _normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


# (config, dtype) -> jitted (text features, image features): a model loaded again in the same
# process (each load_koclip call, a test after another) reuses what was compiled.
_JITTED: dict[tuple[str, str], tuple] = {}


def _jitted_features(model) -> tuple:
    import jax

    from koclip.modeling import HybridCLIP

    key = (model.config.to_json(), model.dtype)
    if key not in _JITTED:
        module = model.module
        _JITTED[key] = (
            jax.jit(lambda p, ids, mask: module.apply({"params": p}, ids, mask, method=HybridCLIP.text_features)),
            jax.jit(lambda p, pixels: module.apply({"params": p}, pixels, method=HybridCLIP.image_features)),
        )
    return _JITTED[key]


class KoCLIPProcessor:
    """Texts -> input_ids and attention_mask; images (PIL images, HWC uint8 arrays, bytes or paths) ->
    pixel_values NCHW float32, preprocessed as koclip.processing does for this checkpoint."""

    def __init__(self, tokenizer, image_processor, max_length: int):
        self.tokenizer = tokenizer
        self.image_processor = image_processor  # koclip.processing.ImagePreprocessor
        self.max_length = max_length

    def __call__(self, text=None, images=None, return_tensors: str = "np", padding=True,
                 truncation: bool = True, max_length: int | None = None) -> ProcessorOutput:
        if text is None and images is None:
            raise UsageError("the processor needs text=, images= or both")
        if return_tensors not in RETURN_TENSORS:
            raise UsageError(f"return_tensors={return_tensors!r} is not supported; use one of {RETURN_TENSORS}")
        out = ProcessorOutput()
        if text is not None:
            texts = [text] if isinstance(text, str) else list(text)
            encoded = self.tokenizer(texts, padding=padding, truncation=truncation,
                                     max_length=min(max_length or self.max_length, self.max_length),
                                     return_token_type_ids=False, return_tensors="np")
            out["input_ids"] = np.asarray(encoded["input_ids"], np.int32)
            out["attention_mask"] = np.asarray(encoded["attention_mask"], np.int32)
        if images is not None:
            batch = images if isinstance(images, (list, tuple)) else [images]
            # an HWC uint8 array, as transformers' processors accept; bytes, paths and PIL images as they are
            batch = [Image.fromarray(image) if isinstance(image, np.ndarray) else image for image in batch]
            out["pixel_values"] = np.ascontiguousarray(self.image_processor.batch(batch).transpose(0, 3, 1, 2))
        if return_tensors == "jax":
            import jax.numpy as jnp

            out = ProcessorOutput({k: jnp.asarray(v) for k, v in out.items()})
        return out


class KoCLIPModel:
    """A checkpoint's towers as transformers' CLIP-style methods, returning numpy arrays."""

    def __init__(self, ckpt, dtype: str = "float32"):
        self.checkpoint = ckpt
        self.config = ckpt.config
        self.model = ckpt.model(dtype)  # koclip.modeling.KoCLIP
        self.params = self.model.cast_params(ckpt.params)
        self._text, self._image = _jitted_features(self.model)
        self.logit_scale = float(self.model.logit_scale(ckpt.params))

    @property
    def fingerprint(self) -> str:
        return self.checkpoint.fingerprint

    def get_text_features(self, input_ids, attention_mask=None, token_type_ids=None) -> np.ndarray:
        """Projected text features [B, D], not normalised (as transformers' get_text_features)."""
        ids = np.asarray(input_ids, dtype=np.int32)
        if ids.ndim != 2:
            raise UsageError(f"input_ids must be [batch, length], got shape {ids.shape}")
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, dtype=np.int32)
        if mask.shape != ids.shape:
            raise UsageError(f"attention_mask has shape {mask.shape}, input_ids {ids.shape}")
        if token_type_ids is not None and np.any(np.asarray(token_type_ids)):
            raise UsageError("token_type_ids other than 0 are not supported (the towers embed one segment)")
        buckets = self.config.text_length_buckets
        if ids.shape[1] > max(buckets):
            raise UsageError(f"input_ids have {ids.shape[1]} tokens; this model takes at most {max(buckets)}")
        from koclip.processing import bucket_length

        length = bucket_length(ids.shape[1], buckets)
        rows = _next_power_of_two(ids.shape[0])
        pad = self.config.text_config.pad_token_id
        padded_ids = np.full((rows, length), pad, np.int32)
        padded_mask = np.zeros((rows, length), np.int32)
        padded_ids[:ids.shape[0], :ids.shape[1]] = ids
        padded_mask[:ids.shape[0], :ids.shape[1]] = mask
        return np.asarray(self._text(self.params, padded_ids, padded_mask))[:ids.shape[0]]

    def get_image_features(self, pixel_values) -> np.ndarray:
        """Projected image features [B, D] of NCHW pixel values, not normalised."""
        pixels = np.asarray(pixel_values, dtype=np.float32)
        size = self.config.image_size
        expected = (3, size, size)
        if pixels.ndim != 4 or pixels.shape[1:] != expected:
            raise UsageError(f"pixel_values must be NCHW [batch, {', '.join(map(str, expected))}] as "
                             f"transformers' processors return them, got shape {pixels.shape}")
        nhwc = _pad_rows(pixels.transpose(0, 2, 3, 1), _next_power_of_two(pixels.shape[0]))
        return np.asarray(self._image(self.params, nhwc))[:pixels.shape[0]]

    def __call__(self, input_ids=None, pixel_values=None, attention_mask=None, token_type_ids=None) -> KoCLIPOutput:
        if input_ids is None or pixel_values is None:
            raise UsageError("the model needs input_ids and pixel_values (the processor's text= and images=)")
        text = _normalize(self.get_text_features(input_ids, attention_mask, token_type_ids))
        image = _normalize(self.get_image_features(pixel_values))
        logits_per_text = (self.logit_scale * text @ image.T).astype(np.float32)
        return KoCLIPOutput(logits_per_image=logits_per_text.T, logits_per_text=logits_per_text,
                            text_embeds=text, image_embeds=image)


def load_koclip(path: str, dtype: str = "float32") -> tuple[KoCLIPModel, KoCLIPProcessor]:
    """(model, processor) for the checkpoint at `path` (local or any fsspec URL)."""
    from koclip.checkpoint import load_checkpoint
    from koclip.processing import ImagePreprocessor

    ckpt = load_checkpoint(path)
    processor = KoCLIPProcessor(ckpt.tokenizer(), ImagePreprocessor.from_config(ckpt.config),
                                ckpt.config.max_text_length)
    return KoCLIPModel(ckpt, dtype), processor
