"""What the embedding pipeline reads: the input listing, split into deterministic work units.

An input is either
  - a manifest (JSONL, CSV or Parquet), read row by row by koclip.data.manifest's lenient rules;
  - a folder or a glob of images (`photos/`, `gs://bucket/imgs/**/*.jpg`), clip-retrieval's
    layout: `x.jpg` takes its caption from a sidecar `x.txt` when there is one. A folder is
    listed one subfolder at a time (memory holds one folder's names), a glob whole.
Local paths and any fsspec URL (gs://) behave alike. The other formats (tars, Parquet with image
bytes, sharded manifests, img2dataset's outputs) are in pipelines.inputs; this module's `Unit`,
unit files and `ListingInput` (these two kinds as a pipelines.inputs `Input`) serve them all.

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

The listing, in its order (manifests) or sorted by path (folders, globs), is cut into units of
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
from dataclasses import dataclass, field, replace

from koclip import fs
from koclip.data.manifest import MANIFEST_EXTENSIONS, Item, is_manifest, iter_manifest
from koclip.data.manifest_scan import ListingReject, ManifestScan
from koclip.errors import KoclipError, ManifestError
from pipelines.inputs.base import IMAGE_EXTENSIONS, InputOptions, Shard, kept_values



class ListingError(KoclipError):
    """An input that cannot be listed: missing, empty, or holding no images."""


@dataclass(frozen=True)
class Unit:
    """A work unit: its items, and for the shard formats (pipelines.inputs) the tar or Parquet rows
    their bytes are read from. A tar without a sidecar lists no items: the worker finds them."""

    index: int
    key: str
    items: tuple[Item, ...] = field(repr=False)
    shard: Shard | None = None

    @property
    def name(self) -> str:
        return f"{self.index:05d}"

    @property
    def size(self) -> int | None:
        """How many items the unit has; None when only the worker can tell (an unlisted tar)."""
        return None if self.shard is not None and not self.shard.listed else len(self.items)


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


def _folder_entries(folder: str) -> tuple[list[str], list[str]]:
    """(file names, subfolder names) directly under `folder`: one listing call."""
    if fs.is_url(folder):
        entries = fs.ls(folder)
        names = [(posixpath.basename(e["path"].rstrip("/")), e["type"] == "directory") for e in entries]
    else:
        with os.scandir(folder) as scan:
            names = [(entry.name, entry.is_dir()) for entry in scan]
    return [n for n, d in names if not d], [n for n, d in names if d]


def _folder_runs(folder: str) -> Iterator[tuple[list[str], set[str]]]:
    """The files under `folder` in sorted-path order, streamed one folder's listing at a time: runs
    of consecutive paths of one folder, each with the stems of that folder's .txt sidecars. A
    subfolder's files come where its name sorts as NAME/, so the order is that of sorting every
    path, while memory holds one folder's names, never the tree's."""
    files, folders = _folder_entries(folder)
    sidecars = {fs.join(folder, n[:-4]) for n in files if n.lower().endswith(".txt")}
    run: list[str] = []
    for name in sorted([*files, *(f + "/" for f in folders)]):
        if name.endswith("/"):
            if run:
                yield run, sidecars
                run = []
            yield from _folder_runs(fs.join(folder, name[:-1]))
        else:
            run.append(fs.join(folder, name))
    if run:
        yield run, sidecars


def _glob_runs(pattern: str) -> Iterator[tuple[list[str], set[str]]]:
    paths = fs.glob(pattern)
    yield paths, {p[:-4] for p in paths if p.lower().endswith(".txt")}


def iter_images(source: str) -> Iterator[Item]:
    """Images under a folder (recursively) or matching a glob, with their sidecar .txt captions,
    sorted by path. An image's id is its path relative to the folder (or to the glob's fixed part).
    A folder is listed one subfolder at a time (`_folder_runs`); a glob's matches are listed whole."""
    pattern, root, is_glob = _listing_root(source)
    if not is_glob and not fs.is_dir(root):
        raise ListingError(f"input not found: {source} (give a folder, a glob of images, or a "
                           f"manifest ending in {', '.join(MANIFEST_EXTENSIONS)})")
    found = False
    for paths, sidecars in (_glob_runs(pattern) if is_glob else _folder_runs(root)):
        for path in paths:
            stem, ext = posixpath.splitext(path)
            if ext.lower() not in IMAGE_EXTENSIONS:
                continue
            if not path.startswith(root + "/"):
                raise ListingError(f"{path} was listed under {source} but is not inside {root}")
            found = True
            yield Item(path[len(root) + 1:], path, caption_uri=stem + ".txt" if stem in sidecars else None)
    if not found:
        raise ListingError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found at {source}")


def list_images(source: str) -> list[Item]:
    return list(iter_images(source))


def iter_items(source: str) -> Iterator[Item]:
    """The input's items in listing order; a manifest is streamed (ListingError when empty)."""
    if not is_manifest(source):
        yield from iter_images(source)
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
    """An item as the listing digest hashes it and a unit file stores it (one JSON array). Its
    `extra` holds only the kept columns (--keep-columns), and is written only when there are any, so
    a listing without them hashes as it always has."""
    record = [item.id, item.uri, list(item.captions), item.split, item.caption_uri]
    if item.extra:
        record.append(item.extra)
    return json.dumps(record, ensure_ascii=False).encode()


class ListingDigest:
    """A hash of items in order; `listing_digest` of a list, fed one item at a time."""

    def __init__(self):
        self._sha = hashlib.sha256()

    def update(self, items: Iterable[Item]) -> None:
        for item in items:
            self._sha.update(_item_record(item))

    def update_key(self, key: str) -> None:
        """A unit known by its key alone (a shard format's: pipelines.inputs)."""
        self._sha.update(key.encode() + b"\n")

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


def unit_key(items: tuple[Item, ...], shard: Shard | None, shard_version: str = "") -> str:
    """A unit's key: the digest of its items, and of its shard (and that shard's size and etag
    when the driver cannot list its items) for the shard formats."""
    if shard is None:
        return listing_digest(items)
    digest = ListingDigest()
    digest.update_key(json.dumps([shard.to_json(), shard_version]))
    digest.update(items)
    return digest.hexdigest()


class ListingInput:
    """A manifest, or a folder or glob of images, as a pipelines.inputs `Input` (units of `Listing`)."""

    def __init__(self, source: str, options: InputOptions = InputOptions(), refuse_bad_rows: bool = False):
        self.source = source
        self.options = options
        self.kept_columns = options.keep_columns
        self.listing = Listing(source, refuse_bad_rows=refuse_bad_rows)

    @property
    def rejects(self) -> list[ListingReject]:
        return self.listing.rejects

    @property
    def complete(self) -> bool:
        return self.listing.complete

    def _items(self) -> Iterator[Item]:
        keep = self.options.keep_columns
        for item in self.listing:
            # only the kept columns ride along (and into the unit's key)
            yield replace(item, extra=kept_values(item.extra, keep) if keep else {})

    def units(self, unit_size: int) -> Iterator[Unit]:
        return iter_units(self._items(), unit_size)


def unit_file_bytes(unit: Unit) -> bytes:
    """A unit's items, one `_item_record` per line (what `read_unit_file` reads back), after a
    first line {"shard": ...} for a unit of the shard formats."""
    head = json.dumps({"shard": unit.shard.to_json()}).encode() + b"\n" if unit.shard is not None else b""
    return head + b"".join(_item_record(item) + b"\n" for item in unit.items)


def _record_item(record: list) -> Item:
    id_, uri, captions, split, caption_uri, *extra = record
    return Item(id_, uri, tuple(captions), split, caption_uri=caption_uri, extra=extra[0] if extra else {})


def read_unit_file(path: str, index: int, key: str) -> Unit:
    """The unit written to `path`; a ListingError unless its items still hash to `key`."""
    rows = [json.loads(line) for line in fs.read_bytes(path).splitlines() if line.strip()]
    shard = Shard.from_json(rows.pop(0)["shard"]) if rows and isinstance(rows[0], dict) else None
    items = tuple(_record_item(row) for row in rows)
    found = unit_key(items, shard) if shard is None or shard.listed else key
    if found != key:
        raise ListingError(f"{path} no longer holds unit {index} (its items hash to {found}, expected {key}); "
                           "rerun to rewrite it")
    return Unit(index, key, items, shard)
