"""What the embedding pipeline reads: the input listing, split into deterministic work units.

An input is either
  - a manifest (JSONL, CSV or Parquet), read row by row by koclip.data.manifest's lenient rules;
  - a folder or a glob of images (`photos/`, `gs://bucket/imgs/**/*.jpg`), clip-retrieval's
    layout: `x.jpg` takes its caption from a sidecar `x.txt` when there is one.
Local paths and any fsspec URL (gs://) behave alike.

A manifest row that cannot be an item (not UTF-8, not JSON, not an object, no id or image, an
id that is neither a string nor an integer, a repeated id: koclip.data.manifest lists the
reasons) does not stop the listing: `Listing` collects it as a `ListingReject`, which the
pipeline writes as a dead letter of stage "listing", and goes on. What cannot be listed at all
is refused before anything runs, in one line: a missing or unreadable manifest, one in which no
row is an item (`ManifestError`), a folder or glob without images (`ListingError`).
`Listing(source, refuse_bad_rows=True)` (pipelines.embed --strict), `iter_items(source)` and
`list_items(source)` keep the older rule: the first bad row or repeated id is a ManifestError.
Bad *content* (an empty caption, an image that does not exist or does not decode) is the
pipeline's business: such items become dead letters of the later stages.

The listing, in its order (manifests) or sorted by path (globs), is cut into units of
`unit_size` items. A unit's key is a hash of its items, so a rerun over the same listing
finds the same units, and the pipeline can skip the ones already done. `unit_file_bytes` /
`read_unit_file` carry a unit's items from the driver to the workers as a JSONL file.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import posixpath
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from koclip import fs
from koclip.data.manifest import MANIFEST_EXTENSIONS, Item, is_manifest, iter_manifest
from koclip.data.manifest_scan import ListingReject, ManifestScan
from koclip.errors import KoclipError, ManifestError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")


class ListingError(KoclipError):
    """An input that cannot be listed: missing, empty, or holding no images."""


@dataclass(frozen=True)
class Unit:
    index: int
    key: str
    items: tuple[Item, ...] = field(repr=False)

    @property
    def name(self) -> str:
        return f"{self.index:05d}"


def _listing_root(source: str) -> tuple[str, str, bool]:
    """(pattern to glob, the root ids are relative to, whether it is a glob). A local source is made
    absolute first, as the listing's paths are: `photos/`, `./photos`, `a/../photos` and
    `/abs/photos` all give the same ids."""
    if not fs.is_url(source):
        source = os.path.abspath(source)
    wildcard = min((source.index(ch) for ch in "*?[" if ch in source), default=None)
    if wildcard is None:
        root = source.rstrip("/")
        return f"{root}/**", root, False
    return source, source[:wildcard].rsplit("/", 1)[0], True


def input_root(source: str) -> str:
    """The folder an input's files are expected under: a manifest's folder, a folder itself, or
    the fixed part of a glob."""
    if is_manifest(source):
        return posixpath.dirname(source) if fs.is_url(source) else os.path.dirname(os.path.abspath(source))
    return _listing_root(source)[1]


def list_images(source: str) -> list[Item]:
    """Images under a folder (recursively) or matching a glob, with their sidecar .txt captions.
    An image's id is its path relative to the folder (or to the glob's fixed part)."""
    pattern, root, is_glob = _listing_root(source)
    if not is_glob and not fs.is_dir(root):
        raise ListingError(f"input not found: {source} (give a folder, a glob of images, or a "
                           f"manifest ending in {', '.join(MANIFEST_EXTENSIONS)})")
    paths = fs.glob(pattern)
    sidecars = {p[:-4] for p in paths if p.lower().endswith(".txt")}
    items = []
    for path in paths:
        stem, ext = posixpath.splitext(path)
        if ext.lower() not in IMAGE_EXTENSIONS:
            continue
        if not path.startswith(root + "/"):
            raise ListingError(f"{path} was listed under {source} but is not inside {root}")
        items.append(Item(path[len(root) + 1:], path, caption_uri=stem + ".txt" if stem in sidecars else None))
    if not items:
        raise ListingError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found at {source}")
    return items


def iter_items(source: str) -> Iterator[Item]:
    """The input's items in listing order; a manifest is streamed (ListingError when empty)."""
    if not is_manifest(source):
        yield from list_images(source)
        return
    empty = True
    for item in iter_manifest(source):
        empty = False
        yield item
    if empty:
        raise ListingError(f"input manifest is empty: {source}")


class Listing:
    """An input's items, streamed, and the manifest rows that are not items (module docstring).

    Iterate it for the items; once a pass has ended, `rejects` holds that pass's rejected rows and
    `complete` says whether the pass stands. It is False only after a manifest pass that met a
    repeated id it could not yet tell (koclip.data.manifest_scan.ManifestScan): iterating again
    gives the corrected items, each later row of a repeated id then being a reject. `read()` does
    that for a caller that wants a list."""

    def __init__(self, source: str, refuse_bad_rows: bool = False):
        self.source = source
        self._scan = ManifestScan(source) if is_manifest(source) and not refuse_bad_rows else None

    @property
    def rejects(self) -> list[ListingReject]:
        return [] if self._scan is None else self._scan.rejects

    @property
    def complete(self) -> bool:
        return self._scan is None or self._scan.complete

    def __iter__(self) -> Iterator[Item]:
        if self._scan is None:
            yield from iter_items(self.source)
            return
        empty = True
        for item in self._scan:
            empty = False
            yield item
        if empty and self.rejects:
            first = self.rejects[0].message
            raise ManifestError(f"no row of {self.source} is an item ({len(self.rejects)} rejected; first: {first})")
        if empty:
            raise ListingError(f"input manifest is empty: {self.source}")

    def read(self) -> list[Item]:
        items = list(self)
        return items if self.complete else list(self)


def list_items(source: str, rejects: list[ListingReject] | None = None) -> list[Item]:
    """The input's items. Without `rejects`, the first bad manifest row or repeated id is a
    ManifestError; with a list, each row that is not an item is appended to it, in file order,
    and the listing goes on (`Listing`)."""
    if rejects is None:
        return list(iter_items(source))
    listing = Listing(source)
    items = listing.read()
    rejects.extend(listing.rejects)
    return items


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
        raise ListingError(f"--unit-size must be at least 1, got {unit_size}")
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
    items = tuple(Item(id_, uri, tuple(captions), split, caption_uri=caption_uri)
                  for id_, uri, captions, split, caption_uri in rows)
    found = listing_digest(items)
    if found != key:
        raise ListingError(f"{path} no longer holds unit {index} (its items hash to {found}, expected {key}); "
                           "rerun to rewrite it")
    return Unit(index, key, items)
