"""Read, decode and validate one item, before any batching: a bad item becomes a dead letter
here, so it can never take a batch of good ones down with it.

Dead letters stay in the same PCollection as the decoded items (the model handler passes them
through), so decoding, inference and the unit writer form one chain of ParDos that every runner
fuses: a unit's items never leave the bundle that expanded it."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

from koclip import fs
from koclip.processing import ImageDecodeError, ImagePreprocessor, open_image, preprocess_image
from pipelines.listing import Item

NAMESPACE = "koclip.embed"


@dataclass(frozen=True)
class UnitRef:
    """Which work unit an element belongs to, and how many items that unit has."""

    index: int
    key: str
    size: int


@dataclass
class DeadLetter:
    unit: UnitRef
    id: str
    uri: str
    stage: str  # read | caption | decode | validate | embed
    reason: str
    message: str

    def to_json(self) -> dict:
        return {"id": self.id, "uri": self.uri, "stage": self.stage, "reason": self.reason,
                "message": self.message}


@dataclass
class Decoded:
    unit: UnitRef
    item: Item
    captions: tuple[str, ...]
    sha256: str
    width: int
    height: int
    pixels: np.ndarray  # float32 [S, S, 3], preprocessed for the model


class DecodeItem(beam.DoFn):
    """(UnitRef, Item) -> Decoded, or a DeadLetter."""

    def __init__(self, preprocessor: ImagePreprocessor):
        self.pre = preprocessor
        self.read = Metrics.counter(NAMESPACE, "items_read")
        self.dead = Metrics.counter(NAMESPACE, "dead_letters")

    def _dead(self, unit, item, stage, reason, message):
        self.dead.inc()
        Metrics.counter(NAMESPACE, f"dead_letters_{reason}").inc()
        return DeadLetter(unit, item.id, item.uri, stage, reason, message)

    def process(self, element):
        unit, item = element
        self.read.inc()
        try:
            yield self._decode(unit, item)
        except _Rejected as e:
            yield self._dead(unit, item, e.stage, e.reason, e.message)
        except Exception as e:  # anything unforeseen is still this item's failure, not the job's
            yield self._dead(unit, item, "decode", "decode_failed", f"{type(e).__name__}: {e}")

    def _decode(self, unit: UnitRef, item: Item) -> Decoded:
        captions = item.captions
        if item.caption_uri is not None:
            try:
                captions = (fs.read_bytes(item.caption_uri).decode("utf-8-sig").strip(),)
            except (OSError, UnicodeDecodeError) as e:
                raise _Rejected("caption", "caption_unreadable", f"{item.caption_uri}: {e}") from None
        if any(not c.strip() for c in captions):
            raise _Rejected("caption", "empty_caption", f"caption {captions!r} is empty or whitespace")
        try:
            data = fs.read_bytes(item.uri)
        except FileNotFoundError:
            raise _Rejected("read", "not_found", f"no such file: {item.uri}") from None
        except OSError as e:
            raise _Rejected("read", "unreadable", f"{type(e).__name__}: {e}") from None
        try:
            image = open_image(data, self.pre.max_pixels)
        except ImageDecodeError as e:
            raise _Rejected("decode", e.reason, e.message) from None
        pre = self.pre
        pixels = preprocess_image(image, pre.size, pre.mean, pre.std, pre.resize_shortest_edge)
        if pixels.shape != (pre.size, pre.size, 3) or not np.isfinite(pixels).all():
            raise _Rejected("validate", "bad_shape", f"preprocessed to {pixels.shape}, expected "
                            f"{(pre.size, pre.size, 3)} finite values")
        return Decoded(unit, item, tuple(c.strip() for c in captions), hashlib.sha256(data).hexdigest(),
                       image.width, image.height, pixels.astype(np.float32, copy=False))


class _Rejected(Exception):
    def __init__(self, stage: str, reason: str, message: str):
        super().__init__(message)
        self.stage, self.reason, self.message = stage, reason, message
