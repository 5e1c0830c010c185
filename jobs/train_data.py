"""Training batches from a manifest: deterministic order, sampled captions, augmentation.

What batch a step gets is a function of (seed, step) only, so a resumed run sees exactly the
batches an uninterrupted run would have: epoch e uses permutation(seed, e), step s takes its
slice, and each item draws its caption and augmentation from rng(seed, step, slot).

Caption sampling: with `label_probability` 0 an item's captions are drawn uniformly; with p > 0
its first caption (emoji-ko: the emoji's name) is drawn with probability p and the others
(CLDR label and keywords) uniformly otherwise. An item with one caption always gives it.

An image that cannot be read or decoded is skipped, counted and logged once; its slot is filled
by the next item of the epoch's order, so the batch keeps its shape and jit does not recompile.
"""
from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from koclip.augment import AugmentConfig, augment
from koclip.config import HybridCLIPConfig
from koclip.errors import ManifestError, UsageError
from koclip.processing import ImageDecodeError, open_image, preprocess_image, tokenize

log = logging.getLogger(__name__)


class PairBatches:
    def __init__(self, records, config: HybridCLIPConfig, tokenizer, batch_size: int, seed: int,
                 augment_images: bool = True, augment_config: AugmentConfig = AugmentConfig(),
                 cache_images: bool = False, workers: int = 4, label_probability: float = 0.0):
        if not 0.0 <= label_probability <= 1.0:
            raise UsageError(f"label_probability must be in [0, 1], got {label_probability}")
        if len(records) < batch_size:
            raise UsageError(f"{len(records)} training pairs is fewer than one batch of {batch_size}; "
                             "lower it with --set batch_size=N")
        self.records = records
        self.config = config
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.seed = seed
        self.augment_images = augment_images
        self.augment_config = augment_config
        self.label_probability = label_probability
        self.steps_per_epoch = len(records) // batch_size
        self.failed: dict[int, str] = {}  # record index -> reason
        self._cache: dict[int, Image.Image] | None = {} if cache_images else None
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(workers)
        self._prefetcher = ThreadPoolExecutor(1)  # apart from _pool: batch() waits on _pool

    def order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.records))

    def _image(self, index: int) -> Image.Image | None:
        if index in self.failed:
            return None
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        try:
            image = open_image(self.records[index].uri)
        except ImageDecodeError as e:
            with self._lock:
                if index not in self.failed:
                    self.failed[index] = e.reason
                    log.warning("skipping %s: %s", self.records[index].uri, e)
            return None
        if self._cache is not None:
            self._cache[index] = image
        return image

    def _pixels(self, image: Image.Image, rng: np.random.Generator) -> np.ndarray:
        cfg = self.config
        if self.augment_images:
            image = augment(image, cfg.image_size, rng, self.augment_config)
        return preprocess_image(image, cfg.image_size, cfg.image_mean, cfg.image_std, cfg.resize_shortest_edge,
                                cfg.image_resize_mode, cfg.image_resample)

    def caption(self, captions: tuple[str, ...], rng: np.random.Generator) -> str:
        """One caption of an item (see the module docstring for the rule)."""
        if self.label_probability == 0.0 or len(captions) == 1:
            return captions[int(rng.integers(len(captions)))]
        if rng.random() < self.label_probability:
            return captions[0]
        return captions[1 + int(rng.integers(len(captions) - 1))]

    def _slot(self, step: int, slot: int, order: np.ndarray, start: int):
        """The item for one batch slot: the first decodable record at or after its position."""
        for offset in range(len(order)):
            index = int(order[(start + offset) % len(order)])
            image = self._image(index)
            if image is not None:
                rng = np.random.default_rng([self.seed, step, slot])
                caption = self.caption(self.records[index].captions, rng)
                return self._pixels(image, rng), caption
        raise ManifestError("no training image could be decoded (see the warnings above)")

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids [B, T], mask [B, T], pixels [B, S, S, 3]) for a global step."""
        epoch, position = divmod(step, self.steps_per_epoch)
        order = self.order(epoch)
        starts = [position * self.batch_size + slot for slot in range(self.batch_size)]
        items = list(self._pool.map(lambda a: self._slot(step, a[0], order, a[1]), enumerate(starts)))
        pixels = np.stack([p for p, _ in items])
        ids, mask = tokenize(self.tokenizer, [c for _, c in items], self.config.text_length_buckets,
                             self.config.max_text_length)
        return ids, mask, pixels

    def prefetch(self, step: int):
        """Start building a batch in the background; `.result()` returns it."""
        return self._prefetcher.submit(self.batch, step)
