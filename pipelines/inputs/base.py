"""What every input format shares (pipelines.inputs): the options, the Shard a unit is read from,
kept columns, the id check, and finding a format's files. Imports nothing of pipelines, so that
pipelines.listing and every format module can use it."""
from __future__ import annotations

import array
import json
import os
import re
from dataclasses import dataclass

from koclip import fs
from koclip.data.manifest import Item, id_hash, repeated_hashes
from koclip.data.manifest_scan import ListingReject
from koclip.errors import KoclipError, ManifestError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
# Columns that hold an image's bytes in a Parquet file, in the order they are looked for:
# img2dataset names the column after its encode format; Hugging Face datasets call it "image".
IMAGE_BYTES_COLUMNS = ("jpg", "jpeg", "png", "webp", "image", "img", "image_bytes", "bytes")
SHARD_NAME = re.compile(r"^\d+$")  # img2dataset's shard names: 00000, 00001, ...


class InputError(KoclipError):
    """An input that cannot be planned: an unknown format, a wrong column type, no shards."""


@dataclass(frozen=True)
class InputOptions:
    """The flags that say how to read an input (pipelines.options)."""

    id_column: str | None = None  # default: img2dataset's `key`, a manifest's `id`
    caption_field: str | None = None  # a .json member's field (WebDataset) or a column (Parquet)
    image_column: str | None = None  # default: the first of IMAGE_BYTES_COLUMNS present
    keep_columns: tuple[str, ...] = ()  # kept into the shards as string columns


@dataclass(frozen=True)
class Shard:
    """Where a worker reads a unit's bytes: a tar, or rows [start, stop) of a Parquet file.
    `listed` is False for a tar without a sidecar: its samples are found by the worker."""

    format: str
    path: str
    start: int = 0
    stop: int | None = None
    listed: bool = True

    def to_json(self) -> dict:
        return {"format": self.format, "path": self.path, "start": self.start, "stop": self.stop,
                "listed": self.listed}

    @classmethod
    def from_json(cls, raw: dict) -> "Shard":
        return cls(raw["format"], raw["path"], raw["start"], raw["stop"], raw["listed"])


def parse_keep_columns(text: str | None) -> tuple[str, ...]:
    return tuple(c.strip() for c in (text or "").split(",") if c.strip())


def kept_values(row: dict, keep_columns: tuple[str, ...]) -> dict:
    """A row's kept columns as strings (JSON for what is not a string), null when absent: one
    column type whatever the source, so that every shard of a run has the same schema."""
    kept = {}
    for name in keep_columns:
        value = row.get(name)
        if value is None or isinstance(value, str):
            kept[name] = value
        else:
            kept[name] = json.dumps(value, ensure_ascii=False, default=str)
    return kept


class IdCheck:
    """Ids unique across a whole listing in bounded memory (8-byte hashes, as
    koclip.data.manifest_scan.ManifestScan): a pass that meets a repeated hash ends incomplete,
    and the next pass knows the repeated hashes and names each later row of an id."""

    def __init__(self):
        self.repeated: set[int] | None = None
        self.complete = False

    def start(self) -> None:
        self._hashes, self._first = array.array("q"), {}

    def duplicate_of(self, item_id: str, where: str) -> str | None:
        """Where the id was first seen, when this row repeats it (only known from the second pass)."""
        item_hash = id_hash(item_id)
        if self.repeated and item_hash in self.repeated:
            if item_id in self._first:
                return self._first[item_id]
            self._first[item_id] = where
        self._hashes.append(item_hash)
        return None

    def end(self, source: str) -> None:
        known = self.repeated or set()
        unknown = repeated_hashes(self._hashes) - known
        if unknown and self.repeated is not None:
            raise ManifestError(f"{source} changed while it was read (ids repeat that did not in the previous "
                                "pass); run again")
        self.repeated = known | unknown
        self.complete = not unknown


class ShardedInput:
    """What every input of shards holds: its source and options, the rows its listing rejected,
    the columns kept into the embedding shards (img2dataset's `url` always) and the id check."""

    def __init__(self, source: str, options: InputOptions = InputOptions()):
        self.source = source
        self.options = options
        self.rejects: list[ListingReject] = []
        self.kept_columns = tuple(dict.fromkeys(("url", *options.keep_columns)))
        self._ids = IdCheck()

    @property
    def complete(self) -> bool:
        return self._ids.complete


def row_reject(path: str, row: dict, number: int, item_id, id_column: str | None) -> ListingReject | None:
    """The reject of an img2dataset metadata row that is not an item, else None: a status other
    than success (with img2dataset's error message, so the counts add up to its URL list), or no id."""
    status = row.get("status")
    if status is not None and status != "success":
        return ListingReject(path, status, row.get("error_message") or status, row=number,
                             id=None if item_id is None else str(item_id), uri=row.get("url"))
    if item_id is None or not str(item_id).strip():
        return ListingReject(path, "no_id", f"{path}: row {number}: no {id_column!r}", row=number, uri=row.get("url"))
    return None


def duplicate_reject(source: str, item: Item, where: str, first: str, row: int | None = None,
                     line: int | None = None) -> ListingReject:
    return ListingReject(source, "duplicate_id", f"{where}: duplicate id {item.id!r} (first at {first})",
                         line=line, row=row, id=item.id, uri=item.uri)




def _is_wildcard(source: str) -> bool:
    return any(ch in source for ch in "*?[")


def list_paths(source: str, extensions: tuple[str, ...], what: str) -> list[str]:
    """The files of a format's shards: `source` itself, the glob's matches, or the folder's files
    ending in one of `extensions` (not recursive), sorted; InputError when there are none."""
    if _is_wildcard(source):
        paths = fs.glob(source)
    elif source.lower().endswith(extensions):
        if not fs.exists(source):
            raise InputError(f"input not found: {source}")
        return [source]
    else:
        if not fs.is_dir(source):
            raise InputError(f"input not found: {source}")
        paths = sorted(e["path"] for e in fs.ls(source) if e["type"] != "directory")
    paths = [p for p in paths if p.lower().endswith(extensions)]
    if not paths:
        raise InputError(f"no {what} ({', '.join(extensions)}) found at {source}")
    return paths


def absolute(source: str) -> str:
    return source if fs.is_url(source) else os.path.abspath(source)


