"""Manifests: the item lists training and embedding read. One reader, one item record.

A manifest is JSONL (`.jsonl`/`.json`), CSV (`.csv`) or Parquet (`.parquet`), one item a row:

    {"id": "1f436", "image": "images/1f436.png", "captions": ["강아지 얼굴"], "split": "train", "group": "1f436"}

- `id` (a string; an integer is taken as its decimal string): unique within the manifest.
- `image` (also spelled `uri`, `image_uri` or `path`): a path or URL. A relative one is relative
  to the manifest's folder and is resolved with the manifest's own scheme (`images/a.png` in
  `gs://b/m.jsonl` is `gs://b/images/a.png`; in a local manifest, an absolute local path).
- `captions` (also `caption` or `text`): a list of strings, or one string; in CSV a JSON list
  or a plain string.
- `split` (optional): "train", "val" or "test". `group` (optional): items of one group (e.g.
  the variants of one emoji) are never split across train/val/test.
- `caption_uri` (optional): a text file holding the caption, read by the embedding workers.
Other keys are kept in `Item.extra` and written back unchanged. Blank lines are ignored.

Three modes, one set of rules for what a row is:
- strict (`read_manifest`, training and evaluation): every item needs a caption (surrounding
  whitespace stripped, empty ones dropped) and a known split; every bad row is collected and
  the ManifestError names the first and counts the rest (`.errors` lists them all).
- lenient (`iter_manifest`): streamed row by row; a missing or empty caption is the embedding
  pipeline's business (a dead letter), so only a row that cannot be an item at all stops it, at
  the first such row. `pipelines.embed --strict` and callers of `list_items(source)` use this.
- lenient, going on (`koclip.data.manifest_scan.ManifestScan`, the embedding pipeline's
  listing): the same rules, but a row that cannot be an item becomes a `ListingReject` (a dead
  letter of stage "listing": a reason tag, its line, its text) and the scan goes on with the
  next row. A manifest in which no row is an item is still refused (pipelines.listing).
Reasons: not_utf8, not_json, not_csv (JSONL, CSV); not_an_object, no_id, bad_id, no_image,
bad_image, bad_captions, bad_group, bad_caption_uri, too_many_fields (CSV), duplicate_id; and in
strict mode only no_caption and bad_split. Where a row is: `m.jsonl:20` (a line of the file; for
CSV the line its record starts on, the header being line 1) or `m.parquet: row 20` (1-based).
Repeated ids are found through 8-byte hashes, so that streaming 10M rows holds 80 MB; the first
two modes refuse them (named by a second pass over the file), `ManifestScan` rejects every
later occurrence (its class docstring says why and how).
"""
from __future__ import annotations

import array
import csv
import hashlib
import io
import json
import os
import posixpath
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

from koclip import fs
from koclip.errors import ManifestError, NotFoundError, UsageError

SPLITS = ("train", "val", "test")
MANIFEST_EXTENSIONS = (".jsonl", ".json", ".csv", ".parquet")
IMAGE_KEYS = ("image", "uri", "image_uri", "path")
CAPTION_KEYS = ("captions", "caption", "text")
_KNOWN_KEYS = ("id", *IMAGE_KEYS, *CAPTION_KEYS, "split", "group", "caption_uri")


@dataclass(frozen=True)
class Item:
    """One image and its captions, as training, embedding and reindexing see it."""

    id: str
    uri: str  # the image: a local path or a URL
    captions: tuple[str, ...] = ()
    split: str | None = None
    group: str | None = None
    caption_uri: str | None = None  # a sidecar caption file, read by the embedding workers
    extra: dict = field(default_factory=dict, compare=False)  # the row's other keys

    def to_json(self) -> dict:
        """The manifest row (`image` key, as written: not re-relativised)."""
        out: dict = {"id": self.id, "image": self.uri, "captions": list(self.captions)}
        for key in ("split", "group", "caption_uri"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        out.update({k: v for k, v in self.extra.items() if k not in _KNOWN_KEYS})
        return out


def is_manifest(path: str) -> bool:
    return path.lower().endswith(MANIFEST_EXTENSIONS)


def resolve_uri(image: str, manifest_path: str) -> str:
    """`image` as written in the manifest at `manifest_path` -> a path or URL usable on its own."""
    if fs.is_url(image) or os.path.isabs(image) or image.startswith("/"):
        return image
    if fs.is_url(manifest_path):
        scheme, rest = manifest_path.split("://", 1)
        return f"{scheme}://{posixpath.normpath(posixpath.join(posixpath.dirname(rest), image))}"
    return os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(manifest_path)), image))


# ---------------------------------------------------------------- one row


class _RowError(ManifestError):
    """A row that cannot be an item: the one line "where: what is wrong", and a reason tag."""

    def __init__(self, where: str, reason: str, message: str):
        super().__init__(f"{where}: {message}")
        self.reason = reason


_bad = _RowError


def _captions(row: dict, where: str, strict: bool) -> tuple[str, ...]:
    key = next((k for k in CAPTION_KEYS if row.get(k) is not None), None)
    value = row[key] if key else None
    if value is None:
        if strict:
            raise _bad(where, "no_caption", "no caption (missing field 'captions')")
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise _bad(where, "bad_captions",
                   f"'{key}' must be a list of strings or a string, got {type(value).__name__}")
    bad = next((c for c in value if not isinstance(c, str)), None)
    if bad is not None:
        raise _bad(where, "bad_captions", f"'{key}' must hold strings only, got {bad!r}")
    if not strict:
        return tuple(value)
    captions = tuple(c.strip() for c in value if c.strip())
    if not captions:
        raise _bad(where, "no_caption", "no caption (every caption is empty or whitespace)")
    return captions


def _valid_id(rid) -> bool:
    return not isinstance(rid, bool) and isinstance(rid, (str, int)) and bool(str(rid).strip())


def parse_row(row, where: str, manifest_path: str, strict: bool = False) -> Item:
    """One manifest row (a dict) -> an Item with its uris resolved; ManifestError naming `where`."""
    if not isinstance(row, dict):
        raise _bad(where, "not_an_object", f"not a JSON object (got {type(row).__name__})")
    rid = row.get("id")
    if rid is None:
        raise _bad(where, "no_id", "missing field 'id'")
    if not _valid_id(rid):
        raise _bad(where, "bad_id", f"'id' must be a non-empty string or an integer, got {rid!r}")
    key = next((k for k in IMAGE_KEYS if row.get(k) is not None), None)
    if key is None:
        raise _bad(where, "no_image", f"missing field 'image' (or {', '.join(IMAGE_KEYS[1:])})")
    image = row[key]
    if not isinstance(image, str) or not image.strip():
        raise _bad(where, "bad_image", f"'{key}' must be a non-empty string, got {image!r}")
    captions = _captions(row, where, strict)
    split = row.get("split")
    split = None if split in (None, "") else str(split)
    if strict and split is not None and split not in SPLITS:
        raise _bad(where, "bad_split", f"'split' must be one of {', '.join(SPLITS)}, got {split!r}")
    group = row.get("group")
    if group is not None and (isinstance(group, bool) or not isinstance(group, (str, int))):
        raise _bad(where, "bad_group", f"'group' must be a string, got {group!r}")
    caption_uri = row.get("caption_uri")
    if caption_uri is not None and (not isinstance(caption_uri, str) or not caption_uri.strip()):
        raise _bad(where, "bad_caption_uri", f"'caption_uri' must be a non-empty string, got {caption_uri!r}")
    return Item(str(rid), resolve_uri(image.strip(), manifest_path), captions, split,
                None if group is None else str(group),
                resolve_uri(caption_uri.strip(), manifest_path) if caption_uri else None,
                {k: v for k, v in row.items() if k not in _KNOWN_KEYS})


# ---------------------------------------------------------------- rows of a file
# Each reader yields (the row, or the _RowError it is; where; its line or row number; the raw
# row, turned into text only for a reject).

# Text is decoded with surrogateescape so that one line of bad bytes is one bad row, not a file
# that cannot be read; a surrogate in the decoded text is exactly such a byte.
_NOT_UTF8 = re.compile("[\udc80-\udcff]")


def _not_utf8(where: str) -> _RowError:
    return _bad(where, "not_utf8", "not UTF-8 text")


def _jsonl_rows(lines: Iterable[str], path: str):
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        if _NOT_UTF8.search(line):
            yield _not_utf8(where), where, lineno, line
            continue
        try:
            yield json.loads(line), where, lineno, line
        except json.JSONDecodeError as e:
            yield _bad(where, "not_json", f"not valid JSON ({e.msg} at column {e.colno})"), where, lineno, line


def _csv_rows(lines: Iterable[str], path: str):
    record: list[str] = []  # the physical lines of the record being parsed

    def recorded():
        for line in lines:
            record.append(line)
            yield line

    reader = csv.reader(recorded())
    header, start = None, 1
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            fields = e
        text, lineno, where = "".join(record), start, f"{path}:{start}"
        record.clear()
        start = reader.line_num + 1
        if header is None and not isinstance(fields, csv.Error):
            header = fields
            continue
        if fields == []:  # a blank line
            continue
        if isinstance(fields, csv.Error):
            yield _bad(where, "not_csv", f"not a CSV record ({fields})"), where, lineno, text
        elif _NOT_UTF8.search(text):
            yield _not_utf8(where), where, lineno, text
        elif len(fields) > len(header):
            yield (_bad(where, "too_many_fields", f"{len(fields)} fields, the header has {len(header)}"),
                   where, lineno, text)
        else:
            yield _csv_row(dict(zip(header, fields))), where, lineno, text


def _csv_row(row: dict) -> dict:
    for key in CAPTION_KEYS:
        text = row.get(key)
        if text is not None and text.lstrip().startswith("["):
            try:
                row[key] = json.loads(text)
            except json.JSONDecodeError:
                pass  # a caption that happens to start with "["
    return {k: v for k, v in row.items() if v != "" or k in CAPTION_KEYS}


def _parquet_rows(binary, path: str):
    import pyarrow.parquet as pq

    number = 0
    for batch in pq.ParquetFile(binary).iter_batches(batch_size=10_000):
        for row in batch.to_pylist():
            number += 1
            yield row, f"{path}: row {number}", number, row


def _is_parquet(path: str) -> bool:
    return path.lower().endswith(".parquet")


def _rows(path: str) -> Iterator[tuple[object, str, int, object]]:
    """(row or the _RowError it is, where, line or row number, raw row) for every row, streamed."""
    try:
        with fs.open(path) as binary:
            if _is_parquet(path):
                yield from _parquet_rows(binary, path)
                return
            csv_file = path.lower().endswith(".csv")
            text = io.TextIOWrapper(binary, encoding="utf-8-sig", errors="surrogateescape",
                                    newline="" if csv_file else None)
            yield from (_csv_rows if csv_file else _jsonl_rows)(text, path)
    except NotFoundError:
        raise NotFoundError(f"manifest not found: {path}") from None


def _id_hash(item_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(item_id.encode(), digest_size=8).digest(), "little", signed=True)


def _repeated_hashes(hashes: array.array) -> set[int]:
    sorted_hashes = np.sort(np.frombuffer(hashes, dtype=np.int64))
    return set(sorted_hashes[1:][sorted_hashes[1:] == sorted_hashes[:-1]].tolist())


def _duplicates(path: str, hashes: array.array) -> list[str]:
    """"where: duplicate id ..." for each repeated id (a second pass, only when hashes repeat)."""
    repeated = _repeated_hashes(hashes)
    if not repeated:
        return []
    first: dict[str, str] = {}
    found = []
    for row, where, _, _ in _rows(path):
        if isinstance(row, dict) and row.get("id") is not None and _id_hash(str(row["id"])) in repeated:
            rid = str(row["id"])
            if rid in first:
                found.append(f"{where}: duplicate id {rid!r} (first at {first[rid]})")
            else:
                first[rid] = where
    return found


def iter_manifest(path: str | os.PathLike, strict: bool = False) -> Iterator[Item]:
    """The manifest's items in file order, streamed (module docstring for the modes).
    NotFoundError for a missing file, ManifestError for bad rows (strict: after the last row)."""
    path = os.fspath(path)
    errors, hashes = [], array.array("q")
    for row, where, _, _ in _rows(path):
        try:
            if isinstance(row, ManifestError):
                raise row
            item = parse_row(row, where, path, strict)
        except ManifestError as e:
            if not strict:
                raise
            errors.append(str(e))
            continue
        hashes.append(_id_hash(item.id))
        yield item
    errors += _duplicates(path, hashes)
    if errors:
        raise ManifestError(errors if strict else errors[:1])


def read_manifest(path: str | os.PathLike, split: str | None = None) -> list[Item]:
    """Every item of a manifest, strictly checked (local path or URL), relative uris resolved.
    With `split`, only the items of that split ("train", "val" or "test")."""
    if split is not None and split not in SPLITS:
        raise UsageError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    items = list(iter_manifest(path, strict=True))
    return items if split is None else [i for i in items if i.split == split]


def dumps_manifest(items: Iterable[Item]) -> str:
    return "".join(json.dumps(i.to_json(), ensure_ascii=False) + "\n" for i in items)


def write_manifest(path: str | os.PathLike, items: Iterable[Item]) -> str:
    """Write items as JSONL (UTF-8, uris as given), atomically; refuses what read_manifest would."""
    path = os.fspath(path)
    items = list(items)
    seen: set[str] = set()
    for item in items:
        if item.id in seen:
            raise ValueError(f"duplicate id {item.id!r}")
        seen.add(item.id)
        if not any(c.strip() for c in item.captions):
            raise ValueError(f"item {item.id!r} has no caption")
    fs.write_bytes(path, dumps_manifest(items).encode("utf-8"))
    return path


# Public names for the readers of other input layouts (pipelines.inputs), which follow these rules.
RowError = _RowError
read_rows = _rows
id_hash = _id_hash
repeated_hashes = _repeated_hashes
