"""Turning raw inputs into model inputs: image decoding and preprocessing, tokenization, batching.

Images are preprocessed as transformers' PIL-based CLIP image processor does (shortest-side bicubic
resize, center crop, rescale, normalise), but channels last: our Flax encoders take NHWC.
Texts are padded to one of a few length buckets and batches to a fixed size, so jitted functions
see a small, fixed set of shapes.
"""
from __future__ import annotations

import io
import math
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from koclip import fs
from koclip.errors import ImageDecodeError, NotFoundError

# Below Pillow's own DecompressionBombWarning threshold (~89.5M pixels).
DEFAULT_MAX_PIXELS = 8192 * 8192

_RGB_CONVERTIBLE = ("1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr")
_WIDE_GRAYSCALE = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json",
                    "sentencepiece.bpe.model", "spiece.model", "tokenizer.model")
_WEIGHT_SUFFIXES = (".msgpack", ".safetensors", ".bin", ".h5", ".ckpt", ".pt", ".npz", ".pkl")


# --- images ---------------------------------------------------------------------------------

def _read_bytes(source: bytes | bytearray | memoryview | str | os.PathLike) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        try:
            return fs.read_bytes(path)
        except NotFoundError as e:
            raise ImageDecodeError("not_found", f"no such file: {path}") from e
        except Exception as e:
            raise ImageDecodeError("unreadable", f"cannot read {path}: {e}") from e
    raise TypeError(f"expected bytes, a path or a PIL image, got {type(source).__name__}")


def _check_pixels(size: tuple[int, int], max_pixels: int | None) -> None:
    width, height = size
    if max_pixels is not None and width * height > max_pixels:
        raise ImageDecodeError("too_many_pixels", f"{width}x{height} image exceeds {max_pixels} pixels")


def _wide_grayscale_to_l(image: Image.Image) -> Image.Image:
    values = np.asarray(image).astype(np.float64)
    if image.mode.startswith("I;16"):
        full_scale = 65535.0
    elif image.mode == "I":
        # Mode "I" holds 16-bit samples (PNG/PGM in older Pillow) unless values say otherwise.
        full_scale = 65535.0 if values.max(initial=0) <= 65535 else float(2**31 - 1)
    else:
        values = np.nan_to_num(values)
        full_scale = 1.0 if values.max(initial=0) <= 1.0 else 255.0
    scaled = np.rint(np.clip(values, 0, full_scale) * (255.0 / full_scale))
    return Image.fromarray(scaled.astype(np.uint8))  # 2-D uint8: mode L


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode in _WIDE_GRAYSCALE:
        return _wide_grayscale_to_l(image).convert("RGB")
    # The same rule as transformers' convert_to_rgb: any alpha or transparency goes over white.
    if {"A", "a"} & set(image.getbands()) or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode in _RGB_CONVERTIBLE:
        return image if mode == "RGB" else image.convert("RGB")
    raise ImageDecodeError("unsupported_mode", f"image mode {mode!r} cannot be converted to RGB")


def open_image(source: Any, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode bytes, an fsspec path or a PIL image into a fully loaded RGB image.

    Only the first frame of an animated image is used, EXIF orientation is applied, and images
    larger than `max_pixels` are rejected from their header, before any pixel is decoded.
    Every failure is an ImageDecodeError.
    """
    if isinstance(source, Image.Image):
        image = source
    else:
        data = _read_bytes(source)
        if not data:
            raise ImageDecodeError("empty", "the input has zero bytes")
        try:
            image = Image.open(io.BytesIO(data))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ImageDecodeError("too_many_pixels", str(e)) from e
        except UnidentifiedImageError as e:
            raise ImageDecodeError("not_an_image", "not a recognised image format") from e
        except Exception as e:
            raise ImageDecodeError("unreadable", f"cannot parse the image header: {e}") from e

    _check_pixels(image.size, max_pixels)
    try:
        if getattr(image, "n_frames", 1) > 1:
            image.seek(0)
        image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageDecodeError("too_many_pixels", str(e)) from e
    except Exception as e:
        reason = "truncated" if isinstance(e, EOFError) or "truncated" in str(e).lower() else "unreadable"
        raise ImageDecodeError(reason, f"cannot decode the image: {e}") from e

    try:
        image = ImageOps.exif_transpose(image)
    except Exception as e:
        raise ImageDecodeError("unreadable", f"cannot apply the EXIF orientation: {e}") from e
    try:
        return _to_rgb(image)
    except ImageDecodeError:
        raise
    except Exception as e:
        raise ImageDecodeError("unsupported_mode", f"cannot convert mode {image.mode!r} to RGB: {e}") from e


def _center_crop(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """transformers' center_crop on an HWC array: floor offsets, zero padding when too small."""
    orig_height, orig_width = pixels.shape[:2]
    top = (orig_height - height) // 2
    left = (orig_width - width) // 2
    if top >= 0 and left >= 0:
        return pixels[top:top + height, left:left + width]
    new_height, new_width = max(height, orig_height), max(width, orig_width)
    top_pad = math.ceil((new_height - orig_height) / 2)
    left_pad = math.ceil((new_width - orig_width) / 2)
    padded = np.zeros((new_height, new_width) + pixels.shape[2:], dtype=pixels.dtype)
    padded[top_pad:top_pad + orig_height, left_pad:left_pad + orig_width] = pixels
    top, left = max(0, top + top_pad), max(0, left + left_pad)
    return padded[top:top + height, left:left + width]


def preprocess_image(image: Image.Image | np.ndarray, size: int, mean: Sequence[float], std: Sequence[float],
                     resize_shortest_edge: int | None = None, resize_mode: str = "shortest_edge",
                     resample: str = "bicubic") -> np.ndarray:
    """Resize, rescale and normalise: float32 [size, size, 3].

    resize_mode "shortest_edge" (CLIPImageProcessor): the shortest side to resize_shortest_edge
    (default size), then a centre crop to size x size. "square" (ViTImageProcessor): straight to
    size x size. `resample` names the PIL filter.
    """
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    image = _to_rgb(image)
    filter_ = Image.Resampling[resample.upper()]
    if resize_mode == "square":
        pixels = np.asarray(image.resize((size, size), resample=filter_))
    else:
        width, height = image.size
        target = resize_shortest_edge or size
        short, long = (width, height) if width <= height else (height, width)
        # Truncation, not rounding, as transformers' get_resize_output_image_size.
        new_long = int(target * long / short)
        new_size = (target, new_long) if width <= height else (new_long, target)
        pixels = np.asarray(image.resize(new_size, resample=filter_))
        pixels = _center_crop(pixels, size, size)
    # transformers rescales in float64 and rounds to float32 before normalising in float32.
    scaled = (pixels.astype(np.float64) * (1 / 255)).astype(np.float32)
    return (scaled - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)


class ImagePreprocessor:
    """open_image + preprocess_image with a model's image settings."""

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float],
                 resize_shortest_edge: int | None = None, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                 resize_mode: str = "shortest_edge", resample: str = "bicubic"):
        self.size = size
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.resize_shortest_edge = resize_shortest_edge
        self.max_pixels = max_pixels
        self.resize_mode = resize_mode
        self.resample = resample

    @classmethod
    def from_config(cls, config, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> "ImagePreprocessor":
        return cls(config.image_size, config.image_mean, config.image_std,
                   resize_shortest_edge=config.resize_shortest_edge, max_pixels=max_pixels,
                   resize_mode=config.image_resize_mode, resample=config.image_resample)

    def preprocess(self, image: Image.Image | np.ndarray) -> np.ndarray:
        """preprocess_image on an opened image, with these settings."""
        return preprocess_image(image, self.size, self.mean, self.std, self.resize_shortest_edge,
                                self.resize_mode, self.resample)

    def __call__(self, source: Any) -> np.ndarray:
        return self.preprocess(open_image(source, max_pixels=self.max_pixels))

    def batch(self, sources: Iterable[Any]) -> np.ndarray:
        arrays = [self(source) for source in sources]
        if not arrays:
            return np.zeros((0, self.size, self.size, 3), dtype=np.float32)
        return np.stack(arrays)


# --- text -----------------------------------------------------------------------------------

def _is_remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def _copy_tokenizer_files(url: str, local_dir: str) -> None:
    if not fs.is_dir(url):
        raise NotFoundError(f"tokenizer directory not found: {url}")
    for entry in fs.ls(url):
        name = entry["path"].rstrip("/").rsplit("/", 1)[-1]
        # Skip weights: a checkpoint directory holds the tokenizer files beside them.
        if entry["type"] == "file" and not name.endswith(_WEIGHT_SUFFIXES):
            fs.download(entry["path"], os.path.join(local_dir, name))


def _check_tokenizer_dir(local_dir: str, shown_path: str) -> None:
    if not os.path.isdir(local_dir):
        raise NotFoundError(f"tokenizer directory not found: {shown_path}")
    if not any(os.path.isfile(os.path.join(local_dir, name)) for name in _TOKENIZER_FILES):
        raise NotFoundError(f"no tokenizer files (tokenizer.json, vocab.txt, ...) in {shown_path}")


def load_tokenizer(path: str | os.PathLike):
    """A transformers tokenizer from a local directory or any fsspec URL (gs://, memory://, ...)."""
    from transformers import AutoTokenizer

    path = os.fspath(path)
    if not _is_remote(path):
        local_dir = path[len("file://"):] if path.startswith("file://") else path
        _check_tokenizer_dir(local_dir, path)
        return _from_pretrained(AutoTokenizer, local_dir)
    with tempfile.TemporaryDirectory(prefix="koclip-tokenizer-") as local_dir:
        _copy_tokenizer_files(path, local_dir)
        _check_tokenizer_dir(local_dir, path)
        tokenizer = _from_pretrained(AutoTokenizer, local_dir)
    return tokenizer


def _from_pretrained(auto_tokenizer, local_dir: str):
    # A checkpoint directory's config.json is a hybrid-clip config, which transformers reads
    # and warns about while it looks for the tokenizer class; the warning means nothing here.
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return auto_tokenizer.from_pretrained(local_dir, local_files_only=True)
    finally:
        hf_logging.set_verbosity(level)


# Tokenizer classes that are only a wrapper around tokenizer.json: for these, the file alone says
# how texts become ids. A model-specific class (BertTokenizer, ...) may rebuild parts of the
# pipeline from tokenizer_config.json, so those stay with transformers.
_GENERIC_TOKENIZER_CLASSES = (None, "TokenizersBackend", "PreTrainedTokenizerFast")


class JsonTokenizer:
    """A tokenizer.json run by the `tokenizers` library alone, for encoding texts.

    Loading it takes milliseconds; importing transformers takes 1-3 s, paid by every pipeline
    worker and every query. Called as transformers tokenizers are (`tok(texts, truncation=True,
    max_length=L)["input_ids"]`, `tok.pad_token_id`), and gives the same ids. Thread-safe: each
    truncation length gets its own configured `tokenizers.Tokenizer`.
    """

    def __init__(self, tokenizer_json: str, pad_token: str | None):
        self._json = tokenizer_json
        self._by_length: dict[int | None, Any] = {None: self._configured(None)}
        self.pad_token_id = None if pad_token is None else self._by_length[None].token_to_id(pad_token)

    def _configured(self, max_length: int | None):
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_str(self._json)
        tokenizer.no_padding()
        if max_length is None:
            tokenizer.no_truncation()
        else:
            tokenizer.enable_truncation(max_length, strategy="longest_first", direction="right")
        return tokenizer

    def __call__(self, texts: Sequence[str], truncation: bool = False, max_length: int | None = None,
                 padding: bool = False, add_special_tokens: bool = True) -> dict[str, list[list[int]]]:
        if isinstance(texts, str):
            raise TypeError("texts must be a sequence of strings, not a single string")
        if padding:
            raise ValueError("JsonTokenizer does not pad; koclip.processing.tokenize pads to a bucket")
        length = max_length if truncation else None
        tokenizer = self._by_length.get(length)
        if tokenizer is None:  # two threads may both build it; either copy is the same
            tokenizer = self._by_length.setdefault(length, self._configured(length))
        encodings = tokenizer.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        return {"input_ids": [e.ids for e in encodings]}


def load_encoding_tokenizer(path: str | os.PathLike):
    """The tokenizer texts are encoded with: a `JsonTokenizer` when the folder's tokenizer.json
    alone defines the tokenizer, else the transformers tokenizer (`load_tokenizer`)."""
    import json

    path = os.fspath(path)
    config_path, json_path = fs.join(path, "tokenizer_config.json"), fs.join(path, "tokenizer.json")
    if not fs.exists(json_path):
        return load_tokenizer(path)
    config = json.loads(fs.read_bytes(config_path)) if fs.exists(config_path) else {}
    if config.get("tokenizer_class") not in _GENERIC_TOKENIZER_CLASSES:
        return load_tokenizer(path)
    pad = config.get("pad_token")
    pad = pad.get("content") if isinstance(pad, dict) else pad
    return JsonTokenizer(fs.read_bytes(json_path).decode("utf-8"), pad)


def bucket_length(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds n tokens."""
    for bucket in sorted(buckets):
        if bucket >= n:
            return bucket
    raise ValueError(f"{n} tokens do not fit the largest length bucket ({max(buckets)})")


def tokenize(tokenizer, texts: Sequence[str], buckets: Sequence[int],
             max_length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and attention mask, int32 [N, L], L the smallest bucket that fits the longest text."""
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of strings, not a single string")
    limit = max(buckets) if max_length is None else min(max(buckets), max_length)
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        raise ValueError("the tokenizer has no pad token")
    texts = list(texts)
    encoded = tokenizer(texts, truncation=True, max_length=limit, padding=False)["input_ids"] if texts else []
    return pad_token_ids(encoded, buckets, pad_id)


def pad_token_ids(encoded: Sequence[Sequence[int]], buckets: Sequence[int], pad_id: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Token id lists as ids and attention mask, int32 [N, L], L the smallest bucket that fits the
    longest list."""
    length = bucket_length(max((len(ids) for ids in encoded), default=0), buckets)
    input_ids = np.full((len(encoded), length), pad_id, dtype=np.int32)
    attention_mask = np.zeros((len(encoded), length), dtype=np.int32)
    for row, ids in enumerate(encoded):
        input_ids[row, :len(ids)] = ids
        attention_mask[row, :len(ids)] = 1
    return input_ids, attention_mask


# --- batching -------------------------------------------------------------------------------

def pad_batch(array: np.ndarray, batch_size: int) -> tuple[np.ndarray, int]:
    """Zero-pad axis 0 to batch_size (or its next multiple); returns (padded, number of real rows)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    count = array.shape[0]
    target = max(1, math.ceil(count / batch_size)) * batch_size
    if target == count:
        return array, count
    padding = np.zeros((target - count,) + array.shape[1:], dtype=array.dtype)
    return np.concatenate([array, padding], axis=0), count


def iter_batches(items: Iterable[Any], batch_size: int) -> Iterator[list[Any]]:
    """Lists of at most batch_size consecutive items."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch
