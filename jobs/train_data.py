"""Training batches from a manifest: deterministic order, sampled captions, augmentation.

What batch a step gets is a function of (seed, step) only, so a resumed run sees exactly the
batches an uninterrupted run would have: epoch e uses permutation(seed, e), step s takes its
slice, and each item draws its caption and augmentation from rng(seed, step, slot).

Caption sampling: with `label_probability` 0 an item's captions are drawn uniformly; with p > 0
its first caption (emoji-ko: the emoji's name) is drawn with probability p and the others
(CLDR label and keywords) uniformly otherwise. An item with one caption always gives it.

Several captions per image in one step (`captions_per_image` K != 1, or `text_rows` given:
`multi_batch`): each item
gives up to K of its captions (0: all), its first caption (the label) always among them, and every
caption is a text row of the step, so one image forward serves all its captions. The rows are
packed into a fixed number of text rows (`text_rows`; the extra non-label captions of an
overfull batch are dropped at random, an underfull one is padded with masked rows), sorted by
token length and cut into a short chunk and a long chunk (1/8 of the rows), each padded to its own
length bucket: emoji-ko's captions are mostly 3-8 tokens, so most rows cost 8 positions, not 16.

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
from koclip.processing import ImageDecodeError, open_image, pad_token_ids, preprocess_image, tokenize

# Length buckets of the short chunk of multi-caption rows (the long chunk uses the model's).
SHORT_BUCKETS = (8,)

log = logging.getLogger(__name__)


class PairBatches:
    def __init__(self, records, config: HybridCLIPConfig, tokenizer, batch_size: int, seed: int,
                 augment_images: bool = True, augment_config: AugmentConfig = AugmentConfig(),
                 cache_images: bool = False, workers: int = 4, label_probability: float = 0.0,
                 captions_per_image: int = 1, text_rows: int = 0):
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
        if captions_per_image < 0:
            raise UsageError(f"captions_per_image must be >= 0 (0: all), got {captions_per_image}")
        self.captions_per_image = captions_per_image
        self.text_rows = text_rows or batch_size * max(captions_per_image, 1)
        self.multi = captions_per_image != 1 or text_rows > 0  # packed text rows, multi_batch
        if self.multi and (self.text_rows < batch_size or self.text_rows % 8):
            raise UsageError(f"text_rows must be a multiple of 8 and at least batch_size, got {self.text_rows}")
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

    def item_captions(self, captions: tuple[str, ...], rng: np.random.Generator) -> list[str]:
        """The captions one item gives to a multi-caption step: all, or the first and K-1 others;
        with K = 1 one caption drawn as `caption` does."""
        k = self.captions_per_image
        if k == 1:
            return [self.caption(captions, rng)]
        if k == 0 or len(captions) <= k:
            return list(captions)
        others = rng.choice(np.arange(1, len(captions)), size=k - 1, replace=False)
        return [captions[0]] + [captions[int(i)] for i in sorted(others)]

    def _slot(self, step: int, slot: int, order: np.ndarray, start: int, multi: bool = False):
        """The item for one batch slot: the first decodable record at or after its position."""
        for offset in range(len(order)):
            index = int(order[(start + offset) % len(order)])
            image = self._image(index)
            if image is not None:
                rng = np.random.default_rng([self.seed, step, slot])
                captions = self.records[index].captions
                caption = self.item_captions(captions, rng) if multi else self.caption(captions, rng)
                return self._pixels(image, rng), caption
        raise ManifestError("no training image could be decoded (see the warnings above)")

    def _items(self, step: int, multi: bool = False) -> list:
        """(pixels, caption or captions) of every slot of a global step's batch."""
        epoch, position = divmod(step, self.steps_per_epoch)
        order = self.order(epoch)
        starts = [position * self.batch_size + slot for slot in range(self.batch_size)]
        return list(self._pool.map(lambda a: self._slot(step, a[0], order, a[1], multi), enumerate(starts)))

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids [B, T], mask [B, T], pixels [B, S, S, 3]) for a global step."""
        items = self._items(step)
        pixels = np.stack([p for p, _ in items])
        ids, mask = tokenize(self.tokenizer, [c for _, c in items], self.config.text_length_buckets,
                             self.config.max_text_length)
        return ids, mask, pixels

    def multi_batch(self, step: int):
        """(ids_short [R1, L1], mask_short, ids_long [R2, L2], mask_long, pixels [B, S, S, 3],
        positives [R1 + R2, B] bool, valid [R1 + R2] bool) for a global step: text row r (short
        rows first) is a positive of image b when b gave that caption text, so a keyword that two
        images of the batch share is a right answer for both."""
        items = self._items(step, multi=True)
        pixels = np.stack([p for p, _ in items])
        rows = [(text, owner, i == 0) for owner, (_, texts) in enumerate(items) for i, text in enumerate(texts)]
        capacity = self.text_rows
        if len(rows) > capacity:  # drop non-label rows at random
            extra = [r for r, row in enumerate(rows) if not row[2]]
            rng = np.random.default_rng([self.seed, step, self.batch_size])  # apart from every slot's
            drop = set(rng.choice(extra, size=len(rows) - capacity, replace=False).tolist())
            rows = [row for r, row in enumerate(rows) if r not in drop]
        limit = self.config.max_text_length
        encoded = self.tokenizer([t for t, _, _ in rows], truncation=True, max_length=limit, padding=False)["input_ids"]
        blank = self.tokenizer([""], truncation=True, max_length=limit, padding=False)["input_ids"][0]
        entries = [(ids, text, owner) for ids, (text, owner, _) in zip(encoded, rows)]
        entries += [(blank, None, -1)] * (capacity - len(entries))
        entries.sort(key=lambda e: len(e[0]))  # stable: the same order for the same batch
        long_rows = capacity // 8
        chunks = []
        for part, buckets in ((entries[:capacity - long_rows], SHORT_BUCKETS + tuple(self.config.text_length_buckets)),
                              (entries[capacity - long_rows:], tuple(self.config.text_length_buckets))):
            chunks += pad_token_ids([e[0] for e in part], buckets, self.tokenizer.pad_token_id)
        owners: dict[str, set[int]] = {}
        for _, text, owner in entries:
            if text is not None:
                owners.setdefault(text, set()).add(owner)
        positives = np.zeros((capacity, self.batch_size), bool)
        for r, (_, text, _) in enumerate(entries):
            if text is not None:
                positives[r, sorted(owners[text])] = True
        valid = np.asarray([text is not None for _, text, _ in entries])
        return (*chunks, pixels, positives, valid)

    def prefetch(self, step: int):
        """Start building a batch in the background; `.result()` returns it."""
        return self._prefetcher.submit(self.multi_batch if self.multi else self.batch, step)
