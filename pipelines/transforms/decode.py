"""Read, decode and validate one item, before any batching: a bad item becomes a dead letter
here, so it can never take a batch of good ones down with it.

Dead letters stay in the same PCollection as the decoded items (the model handler passes them
through), so decoding, inference and the unit writer form one chain of ParDos that every runner
fuses: a unit's items never leave the bundle that expanded it."""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

from koclip import faults, fs
from koclip.data.manifest import Item
from koclip.errors import ImageDecodeError, TooLargeError
from koclip.processing import ImagePreprocessor, open_image

NAMESPACE = "koclip.embed"


@dataclass(frozen=True)
class UnitRef:
    """Which work unit an element belongs to, and how many items that unit has (None on the driver
    for a tar without a sidecar: the worker that reads it gives the elements a UnitRef with its size)."""

    index: int
    key: str
    size: int | None


@dataclass(frozen=True)
class Payload:
    """An item's bytes as a shard reader (pipelines.inputs) got them from a tar member or a Parquet
    cell, or why it could not: (stage, reason, message)."""

    data: bytes | None = None
    failure: tuple[str, str, str] | None = None


@dataclass
class DeadLetter:
    unit: UnitRef
    id: str
    uri: str
    stage: str  # read | caption | decode | validate | embed (ids: pipelines.repeats, after writing)
    reason: str
    message: str
    transient: bool = False  # another try may succeed (koclip.faults.is_transient)

    def to_json(self) -> dict:
        return {"id": self.id, "uri": self.uri, "stage": self.stage, "reason": self.reason,
                "message": self.message, "transient": self.transient}


@dataclass
class Decoded:
    unit: UnitRef
    item: Item
    captions: tuple[str, ...]
    sha256: str
    width: int
    height: int
    pixels: np.ndarray  # float32 [S, S, 3], preprocessed for the model
    blank_captions: int = 0  # empty or whitespace captions dropped from the item


CAPTION_MAX_BYTES = 64 * 1024  # a caption sidecar larger than this is not a caption
DEFAULT_MAX_BYTES = 64 * 1024**2


def _inside(path: str, root: str) -> bool:
    if not fs.is_url(path):
        path, root = os.path.abspath(path), os.path.abspath(root)
    return path.startswith(root.rstrip("/") + "/")


class DecodeItem(beam.DoFn):
    """(UnitRef, Item) or (UnitRef, Item, Payload) -> Decoded, or a DeadLetter.

    Reads are bounded: an image of more than `max_bytes` and a caption file of more than
    CAPTION_MAX_BYTES are dead letters, read no further than the limit. A caption file must lie
    under `caption_root` (the input's folder), so a manifest cannot make a worker publish any file
    it can read (/etc/...) as a caption. Empty or whitespace captions are dropped and counted; the
    image is still embedded."""

    def __init__(self, preprocessor: ImagePreprocessor, caption_root: str | None = None,
                 max_bytes: int = DEFAULT_MAX_BYTES):
        self.pre = preprocessor
        self.caption_root = caption_root
        self.max_bytes = max_bytes
        self.read = Metrics.counter(NAMESPACE, "items_read")
        self.dead = Metrics.counter(NAMESPACE, "dead_letters")

    def _dead(self, unit, item, stage, reason, message, transient=False):
        self.dead.inc()
        Metrics.counter(NAMESPACE, f"dead_letters_{reason}").inc()
        return DeadLetter(unit, item.id, item.uri, stage, reason, message, transient)

    def process(self, element):
        unit, item, *payload = element
        self.read.inc()
        try:
            yield self._decode(unit, item, payload[0] if payload else None)
        except _Rejected as e:
            yield self._dead(unit, item, e.stage, e.reason, e.message, e.transient)
        except Exception as e:  # anything unforeseen is still this item's failure, not the job's
            yield self._dead(unit, item, "decode", "decode_failed", f"{type(e).__name__}: {e}",
                             faults.is_transient(e))

    def _decode(self, unit: UnitRef, item: Item, payload: Payload | None = None) -> Decoded:
        captions = item.captions
        if item.caption_uri is not None:
            if self.caption_root is not None and not _inside(item.caption_uri, self.caption_root):
                raise _Rejected("caption", "caption_outside_input",
                                f"{item.caption_uri} is not under {self.caption_root} (see --caption-root)")
            try:
                captions = (fs.read_bytes(item.caption_uri, CAPTION_MAX_BYTES).decode("utf-8-sig").strip(),)
            except TooLargeError:
                raise _Rejected("caption", "caption_too_large",
                                f"{item.caption_uri} is over {CAPTION_MAX_BYTES} bytes") from None
            except (OSError, UnicodeDecodeError) as e:
                raise _Rejected("caption", "caption_unreadable", f"{item.caption_uri}: {e}",
                                faults.is_transient(e)) from None
        kept = tuple(c.strip() for c in captions if c.strip())
        data = self._payload_bytes(item, payload) if payload is not None else self._read(item)
        try:
            image = open_image(data, self.pre.max_pixels)
        except ImageDecodeError as e:
            raise _Rejected("decode", e.reason, e.message) from None
        pre = self.pre
        pixels = pre.preprocess(image)
        if pixels.shape != (pre.size, pre.size, 3) or not np.isfinite(pixels).all():
            raise _Rejected("validate", "bad_shape", f"preprocessed to {pixels.shape}, expected "
                            f"{(pre.size, pre.size, 3)} finite values")
        if len(kept) < len(captions):
            Metrics.counter(NAMESPACE, "blank_captions_dropped").inc(len(captions) - len(kept))
        return Decoded(unit, item, kept, hashlib.sha256(data).hexdigest(), image.width, image.height,
                       pixels.astype(np.float32, copy=False), len(captions) - len(kept))

    def _payload_bytes(self, item: Item, payload: Payload) -> bytes:
        if payload.failure is not None:
            raise _Rejected(*payload.failure)
        if len(payload.data) > self.max_bytes:
            raise _Rejected("read", "too_large", f"{item.uri} is over the {self.max_bytes}-byte limit (--max-bytes)")
        return payload.data

    def _read(self, item: Item) -> bytes:
        try:
            faults.check_read(item.uri)
            return fs.read_bytes(item.uri, self.max_bytes)
        except FileNotFoundError:
            raise _Rejected("read", "not_found", f"no such file: {item.uri}") from None
        except TooLargeError:
            raise _Rejected("read", "too_large", f"{item.uri} is over the {self.max_bytes}-byte limit "
                            "(--max-bytes)") from None
        except Exception as e:  # OSError, or a client library's own (aiohttp, gcsfs)
            transient = faults.is_transient(e)
            raise _Rejected("read", "read_failed" if transient else "unreadable", f"{type(e).__name__}: {e}",
                            transient) from None


class _Rejected(Exception):
    def __init__(self, stage: str, reason: str, message: str, transient: bool = False):
        super().__init__(message)
        self.stage, self.reason, self.message, self.transient = stage, reason, message, transient
