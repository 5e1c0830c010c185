"""What the embedding pipeline reads: the input listing, split into deterministic work units.

An input is either
  - a manifest: JSONL (`.jsonl`/`.json`), CSV (`.csv`) or Parquet (`.parquet`), one item per
    row with `id`, `image` (also spelled `uri`, `image_uri` or `path`) and optional `captions`
    (a list, or one string; also spelled `caption` or `text`; in CSV a JSON list or a plain
    string), `split`, and `caption_uri` (a text file holding the caption, read by the workers). Relative image paths are relative to the manifest's folder.
  - a folder or a glob of images (`photos/`, `gs://bucket/imgs/**/*.jpg`), clip-retrieval's
    layout: `x.jpg` takes its caption from a sidecar `x.txt` when there is one.
Local paths and any fsspec URL (gs://) behave alike.

A structurally bad manifest (unreadable, not JSON, no id or image, a repeated id) is refused
before anything runs: `ListingError`, one line. Bad *content* (an empty caption, an image that
does not exist or does not decode) is the pipeline's business: such items become dead letters.

The listing, in its order (manifests) or sorted by path (globs), is cut into units of
`unit_size` items. A unit's key is a hash of its items, so a rerun over the same listing
finds the same units, and the pipeline can skip the ones already done. `unit_file_bytes` /
`read_unit_file` carry a unit's items from the driver to the workers as a JSONL file.
"""
from __future__ import annotations

import array
import csv
import hashlib
import io
import itertools
import json
import posixpath
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import fsspec
import numpy as np

from koclip import fs
from koclip.data.manifest import resolve_uri

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
MANIFEST_EXTENSIONS = (".jsonl", ".json", ".csv", ".parquet")
_IMAGE_KEYS = ("image", "uri", "image_uri", "path")
_CAPTION_KEYS = ("captions", "caption", "text")


class ListingError(ValueError):
    """An input that cannot be listed: missing, empty, or a manifest with a bad row."""


@dataclass(frozen=True)
class Item:
    id: str
    uri: str
    captions: tuple[str, ...] = ()
    split: str | None = None
    caption_uri: str | None = None  # a sidecar caption file, read by the workers


@dataclass(frozen=True)
class Unit:
    index: int
    key: str
    items: tuple[Item, ...] = field(repr=False)

    @property
    def name(self) -> str:
        return f"{self.index:05d}"


def _captions(value, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, (list, tuple)) and all(isinstance(c, str) for c in value):
        return tuple(value)
    raise ListingError(f"{where}: captions must be a string or a list of strings, got {value!r}")


def _item(row: dict, where: str, manifest_path: str) -> Item:
    rid = row.get("id")
    if rid is None or isinstance(rid, bool) or str(rid).strip() == "":
        raise ListingError(f"{where}: missing 'id'")
    image = next((row[k] for k in _IMAGE_KEYS if row.get(k)), None)
    if not isinstance(image, str) or not image.strip():
        raise ListingError(f"{where}: missing 'image' (or uri/image_uri/path)")
    caption_value = next((row[k] for k in _CAPTION_KEYS if k in row), None)
    split = row.get("split")
    caption_uri = row.get("caption_uri")
    return Item(str(rid), resolve_uri(image.strip(), manifest_path), _captions(caption_value, where),
                None if split in (None, "") else str(split),
                resolve_uri(caption_uri, manifest_path) if caption_uri else None)


def _jsonl_rows(lines: Iterable[str], path: str):
    for lineno, line in enumerate(lines, start=1):
        if line.strip():
            try:
                yield json.loads(line), f"{path}:{lineno}"
            except json.JSONDecodeError as e:
                raise ListingError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None


def _csv_rows(lines: Iterable[str], path: str):
    for lineno, row in enumerate(csv.DictReader(lines), start=2):
        for key in _CAPTION_KEYS:
            text = row.get(key)
            if text is not None and text.lstrip().startswith("["):
                try:
                    row[key] = json.loads(text)
                except json.JSONDecodeError:
                    pass  # a caption that happens to start with "["
        yield row, f"{path}:{lineno}"


def _parquet_rows(binary, path: str):
    import pyarrow.parquet as pq

    number = 0
    for batch in pq.ParquetFile(binary).iter_batches(batch_size=10_000):
        for row in batch.to_pylist():
            number += 1
            yield row, f"{path}: row {number}"


def _id_hash(item_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(item_id.encode(), digest_size=8).digest(), "little", signed=True)


def _manifest_items(path: str) -> Iterator[tuple[Item, str]]:
    lower = path.lower()
    try:
        with fsspec.open(path, "rb") as binary:
            if lower.endswith(".parquet"):
                rows = _parquet_rows(binary, path)
            else:
                text = io.TextIOWrapper(binary, encoding="utf-8-sig", newline="" if lower.endswith(".csv") else None)
                rows = (_csv_rows if lower.endswith(".csv") else _jsonl_rows)(text, path)
            for row, where in rows:
                if not isinstance(row, dict):
                    raise ListingError(f"{where}: not an object")
                yield _item(row, where, path), where
    except FileNotFoundError:
        raise ListingError(f"input manifest not found: {path}") from None
    except UnicodeDecodeError as e:
        raise ListingError(f"{path}: not UTF-8 text ({e.reason})") from None


def iter_manifest_items(path: str) -> Iterator[Item]:
    """A manifest's items, streamed: memory holds one row, plus 8 bytes per id for the check
    that ids are unique (a ListingError after the last row)."""
    id_hashes = array.array("q")
    for item, _ in _manifest_items(path):
        id_hashes.append(_id_hash(item.id))
        yield item
    hashes = np.sort(np.frombuffer(id_hashes, dtype=np.int64))
    repeated = set(hashes[1:][hashes[1:] == hashes[:-1]].tolist())
    if repeated:  # rare: read again to name the repeated id and both of its rows
        first: dict[str, str] = {}
        for item, where in _manifest_items(path):
            if _id_hash(item.id) in repeated:
                if item.id in first:
                    raise ListingError(f"{where}: duplicate id {item.id!r} (first at {first[item.id]})")
                first[item.id] = where



def _glob(pattern: str) -> list[str]:
    filesystem, fs_path = fsspec.core.url_to_fs(pattern)
    protocol = pattern.split("://", 1)[0] + "://" if "://" in pattern else ""
    return sorted(protocol + p if protocol and not p.startswith(protocol) else p
                  for p in filesystem.glob(fs_path) if not filesystem.isdir(p))


def list_images(source: str) -> list[Item]:
    """Images under a folder (recursively) or matching a glob, with their sidecar .txt captions."""
    is_glob = any(ch in source for ch in "*?[")
    root = source.split("*")[0].rsplit("/", 1)[0] if is_glob else source.rstrip("/")
    if not is_glob and not fs.is_dir(source):
        raise ListingError(f"input not found: {source} (give a folder, a glob of images, or a "
                           f"manifest ending in {', '.join(MANIFEST_EXTENSIONS)})")
    paths = _glob(source if is_glob else f"{root}/**")
    sidecars = {p[:-4] for p in paths if p.lower().endswith(".txt")}
    items = []
    for path in paths:
        stem, ext = posixpath.splitext(path)
        if ext.lower() not in IMAGE_EXTENSIONS:
            continue
        rel = path[len(root):].lstrip("/") if path.startswith(root) else posixpath.basename(path)
        items.append(Item(rel, path, (), None, stem + ".txt" if stem in sidecars else None))
    if not items:
        raise ListingError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found at {source}")
    return items


def iter_items(source: str) -> Iterator[Item]:
    """The input's items in listing order; a manifest is streamed (ListingError when empty)."""
    if not source.lower().endswith(MANIFEST_EXTENSIONS):
        yield from list_images(source)
        return
    empty = True
    for item in iter_manifest_items(source):
        empty = False
        yield item
    if empty:
        raise ListingError(f"input manifest is empty: {source}")


def list_items(source: str) -> list[Item]:
    return list(iter_items(source))


def _item_record(item: Item) -> bytes:
    """An item as the listing digest hashes it and a unit file stores it (one JSON array)."""
    return json.dumps([item.id, item.uri, list(item.captions), item.split, item.caption_uri],
                      ensure_ascii=False).encode()


class ListingDigest:
    """A hash of items in order; `listing_digest` of a list, fed one item at a time."""

    def __init__(self):
        self._sha = hashlib.sha256()

    def update(self, items: Iterable[Item]) -> None:
        for item in items:
            self._sha.update(_item_record(item))

    def hexdigest(self) -> str:
        return self._sha.hexdigest()[:16]


def listing_digest(items: Iterable[Item]) -> str:
    digest = ListingDigest()
    digest.update(items)
    return digest.hexdigest()


def iter_units(items: Iterable[Item], unit_size: int) -> Iterator[Unit]:
    """Consecutive runs of `unit_size` items, keyed by their digest; streams."""
    if unit_size < 1:
        raise ListingError(f"--unit_size must be at least 1, got {unit_size}")
    iterator = iter(items)
    for index in itertools.count():
        chunk = tuple(itertools.islice(iterator, unit_size))
        if not chunk:
            return
        yield Unit(index, listing_digest(chunk), chunk)


def unit_file_bytes(unit: Unit) -> bytes:
    """A unit's items, one `_item_record` per line (what `read_unit_file` reads back)."""
    return b"".join(_item_record(item) + b"\n" for item in unit.items)


def read_unit_file(path: str, index: int, key: str) -> Unit:
    """The unit written to `path`; a ListingError unless its items still hash to `key`."""
    rows = [json.loads(line) for line in fs.read_bytes(path).splitlines() if line.strip()]
    items = tuple(Item(id_, uri, tuple(captions), split, caption_uri) for id_, uri, captions, split, caption_uri in rows)
    found = listing_digest(items)
    if found != key:
        raise ListingError(f"{path} no longer holds unit {index} (its items hash to {found}, expected {key}); "
                           "rerun to rewrite it")
    return Unit(index, key, items)
