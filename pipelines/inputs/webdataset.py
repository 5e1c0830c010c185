"""WebDataset tars: img2dataset's `webdataset` output, or any tar of samples.

A sample is the members that share a key (webdataset's rule: the member name up to the first
dot of its base name): `000000012.jpg`, `000000012.txt`, `000000012.json`. Its image is the first
member with an image extension; its caption the `.txt` member, or the `.json` field named by
`--caption-field`. A sample with no `.txt` is embedded without a caption, as a manifest row
without one is.

Planning (the driver never opens a tar). The tars are `source` itself, a glob's matches or a
folder's `*.tar`, in name order. Beside `NNNNN.tar`, img2dataset writes `NNNNN.parquet` (key, url,
caption, status, error_message, ...), and when it is there the driver reads it: each `success` row
is an item (id = `key`, or `--id-column`; the url kept as column `url`), cut into units of
`--unit-size` (member ranges of one tar); every other row is a dead letter of stage "listing"
whose reason is img2dataset's status (`failed_to_download`, `failed_to_resize`) and message its
error_message, so the counts add up to the URL list. Without a sidecar, a tar is one unit whose
items only the worker can count; its key is the tar's name, size and etag.

Reading (a worker). The tar is streamed through koclip.fs (`tarfile` stream mode, one member at
a time, so memory holds one sample); a tar without a sidecar is read twice, its headers first to
count the samples. What goes wrong is one item's dead letter, and the unit still ends with one
outcome per item: a member too large (`too_large`), a sample without an image member
(`no_image`), a repeated key inside the tar (`duplicate_id`), a listed key the tar does not hold
(`not_in_tar`), a tar that ends mid-member (`truncated`: every item not read by then), a file that
is not a tar at all (`unreadable_tar`: the tar's one dead letter when it has no sidecar). A key
repeated in another tar without a sidecar is caught once every unit is written (pipelines.repeats).
"""
from __future__ import annotations

import json
import re
import tarfile
from collections.abc import Iterator
from dataclasses import replace

from koclip import fs
from koclip.data.manifest import Item
from pipelines.inputs.base import (IMAGE_EXTENSIONS, Shard, ShardedInput, duplicate_reject, kept_values,
                              list_paths, row_reject)
from pipelines.transforms.decode import CAPTION_MAX_BYTES, DEFAULT_MAX_BYTES, Payload, UnitRef

_KEY = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset's base_plus_ext
_IMAGE_EXTS = tuple(e[1:] for e in IMAGE_EXTENSIONS)
_SIDECAR_COLUMNS = ("key", "url", "caption", "status", "error_message")


def split_name(name: str) -> tuple[str, str] | None:
    """(key, extension lower-cased) of a member name, or None for a name without one."""
    match = _KEY.match(name)
    return (match.group(1), match.group(2).lower()) if match else None


def sidecar_path(tar_path: str) -> str:
    return tar_path[:-len(".tar")] + ".parquet"


class WebDatasetInput(ShardedInput):
    """The tars of `source` as work units (module docstring)."""

    def units(self, unit_size: int):
        from pipelines.listing import Unit, unit_key

        tars = list_paths(self.source, (".tar",), "WebDataset tars")
        self.rejects = []
        self._ids.start()
        index = 0
        for tar in tars:
            sidecar = fs.info(sidecar_path(tar))
            if sidecar is None:
                entry = fs.info(tar) or {}
                shard = Shard("webdataset", tar, listed=False)
                yield Unit(index, unit_key((), shard, f"{entry.get('size')}:{entry.get('etag') or entry.get('mtime')}"),
                           (), shard)
                index += 1
                continue
            items = list(self._sidecar_items(tar, sidecar["path"]))
            for start in range(0, len(items), unit_size):
                chunk = tuple(items[start:start + unit_size])
                shard = Shard("webdataset", tar, start, start + len(chunk))
                yield Unit(index, unit_key(chunk, shard), chunk, shard)
                index += 1
        self._ids.end(self.source)

    def _sidecar_items(self, tar: str, sidecar: str) -> Iterator[Item]:
        """The success rows of one tar's sidecar as items; the others as rejects."""
        import pyarrow.parquet as pq

        id_column = self.options.id_column or "key"
        keep = self.options.keep_columns
        with fs.open(sidecar) as f:
            parquet = pq.ParquetFile(f)
            names = set(parquet.schema_arrow.names)
            columns = [c for c in dict.fromkeys((*_SIDECAR_COLUMNS, id_column, *keep)) if c in names]
            if id_column not in names:
                from pipelines.inputs.base import InputError

                raise InputError(f"{sidecar} has no column {id_column!r} for the ids (see --id-column)")
            number = 0
            for batch in parquet.iter_batches(batch_size=10_000, columns=columns):
                for row in batch.to_pylist():
                    number += 1
                    where = f"{sidecar}: row {number}"
                    key = row.get("key")
                    item_id = row.get(id_column)
                    reject = row_reject(sidecar, row, number, None if key is None else item_id, id_column)
                    if reject is not None:
                        self.rejects.append(reject)
                        continue
                    extra = kept_values(row, keep)
                    if row.get("url") is not None:
                        extra["url"] = row["url"]
                    caption = row.get("caption")
                    item = Item(str(item_id), f"{tar}#{key}", (caption,) if isinstance(caption, str) else (),
                                extra=extra)
                    first = self._ids.duplicate_of(item.id, where)
                    if first is not None:
                        self.rejects.append(duplicate_reject(sidecar, item, where, first, number))
                        continue
                    yield item


# ---------------------------------------------------------------- the worker side


class _TarStream:
    """A tar's samples in member order, streamed: (key, {extension: member}) with each member's
    data read (or left None past `max_bytes`); `error` holds why the stream ended early."""

    def __init__(self, path: str, max_bytes: int, wanted: set[str] | None = None):
        self.path, self.max_bytes, self.wanted = path, max_bytes, wanted
        self.error: str | None = None
        self.too_large: set[str] = set()

    def __iter__(self):
        try:
            with fs.open(self.path) as f, tarfile.open(fileobj=f, mode="r|") as tar:
                key, parts = None, {}
                for member in tar:
                    named = split_name(member.name) if member.isfile() else None
                    if named is None:
                        continue
                    if key is not None and (named[0] != key or named[1] in parts):
                        yield key, parts  # a member name repeated in a run of one key starts a sample too
                        parts = {}
                    key = named[0]
                    if self.wanted is not None and key not in self.wanted:
                        continue
                    limit = CAPTION_MAX_BYTES if named[1] in ("txt", "json") else self.max_bytes
                    if member.size > limit:
                        self.too_large.add(key)
                        parts[named[1]] = None
                        continue
                    parts[named[1]] = tar.extractfile(member).read()
                if key is not None:
                    yield key, parts
        except (tarfile.TarError, EOFError, OSError) as e:
            self.error = f"{type(e).__name__}: {e}"


def _tar_keys(path: str) -> list[str]:
    """The sample keys of a tar in member order (its headers only), one entry per run of members of
    one key (a member name repeated in the run starts another); a key that comes back is listed
    again (the worker dead-letters it as a duplicate).
    Raises tarfile.TarError / OSError for what is not a tar; a tar cut short lists what it has."""
    keys: list[str] = []
    extensions: set[str] = set()  # of the current sample: a repeated one starts the next (as _TarStream)
    with fs.open(path) as f, tarfile.open(fileobj=f, mode="r:") as tar:
        try:
            for member in tar:
                named = split_name(member.name) if member.isfile() else None
                if named is None:
                    continue
                if not keys or keys[-1] != named[0] or named[1] in extensions:
                    keys.append(named[0])
                    extensions = set()
                extensions.add(named[1])
        except (tarfile.TarError, EOFError):
            pass  # truncated: the members read so far; reading them says which ones are whole
    return keys


def _caption(parts: dict, caption_field: str | None, listed: tuple[str, ...]) -> tuple[str, ...]:
    if listed:
        return listed
    if caption_field:
        value = _sample_json(parts).get(caption_field)
        if isinstance(value, str):
            return (value,)
        return tuple(v for v in value if isinstance(v, str)) if isinstance(value, list) else ()
    if parts.get("txt") is not None:
        return (parts["txt"].decode("utf-8-sig", "replace"),)
    return ()


def _sample_json(parts: dict) -> dict:
    try:
        value = json.loads(parts["json"]) if parts.get("json") else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _payload(path: str, key: str, parts: dict) -> tuple[str, Payload]:
    """(the uri, the bytes or why not) of one sample's image member."""
    ext = next((e for e in _IMAGE_EXTS if e in parts), None)
    if ext is None:
        found = ", ".join(f".{e}" for e in sorted(parts)) or "nothing"
        return f"{path}#{key}", Payload(failure=("read", "no_image", f"sample {key!r} of {path} has no image member "
                                                  f"({', '.join(_IMAGE_EXTS)}); it has {found}"))
    uri = f"{path}#{key}.{ext}"
    if parts[ext] is None:
        return uri, Payload(failure=("read", "too_large", f"{uri} is over the byte limit (--max-bytes)"))
    return uri, Payload(parts[ext])


def read_tar_unit(unit, ref: UnitRef, max_bytes: int = DEFAULT_MAX_BYTES, caption_field: str | None = None,
                  id_column: str | None = None, keep_columns: tuple[str, ...] = (), **_):
    """(UnitRef, Item, Payload) for each item of a tar unit, exactly one per item."""
    shard = unit.shard
    if shard.listed:
        yield from _read_listed(unit, ref, max_bytes)
        return
    try:
        keys = _tar_keys(shard.path)
    except (tarfile.TarError, EOFError, OSError) as e:
        sized = UnitRef(ref.index, ref.key, 1)
        yield sized, Item(shard.path, shard.path), Payload(failure=("read", "unreadable_tar", f"{shard.path}: {e}"))
        return
    if not keys:
        sized = UnitRef(ref.index, ref.key, 1)
        yield sized, Item(shard.path, shard.path), Payload(failure=("read", "empty_tar", f"{shard.path} holds no samples"))
        return
    sized = UnitRef(ref.index, ref.key, len(keys))
    stream = _TarStream(shard.path, max_bytes)
    seen: dict[str, int] = {}
    emitted = 0
    for key, parts in stream:
        meta = _sample_json(parts)
        item_id = str(meta[id_column]) if id_column and meta.get(id_column) is not None else key
        uri, payload = _payload(shard.path, key, parts)
        extra = kept_values(meta, keep_columns)
        if isinstance(meta.get("url"), str):
            extra["url"] = meta["url"]
        item = Item(item_id, uri, _caption(parts, caption_field, ()), extra=extra)
        emitted += 1
        if emitted > len(keys):
            break  # the tar changed between the two reads; the counts of the first read stand
        if item_id in seen:
            payload = Payload(failure=("read", "duplicate_id", f"{uri}: key {item_id!r} repeats sample "
                                                                f"{seen[item_id]} of {shard.path}"))
        seen.setdefault(item_id, emitted)
        yield sized, item, payload
    for key in keys[emitted:]:
        yield sized, Item(key, f"{shard.path}#{key}"), Payload(failure=(
            "read", "truncated", f"{shard.path} ended before sample {key!r} was whole ({stream.error or 'short read'})"))


def _read_listed(unit, ref: UnitRef, max_bytes: int):
    shard = unit.shard
    by_key = {item.uri.rsplit("#", 1)[1]: item for item in unit.items}
    stream = _TarStream(shard.path, max_bytes, wanted=set(by_key))
    for key, parts in stream:
        item = by_key.pop(key, None)
        if item is None:
            continue  # a key listed twice in the tar: its first sample was this unit's
        uri, payload = _payload(shard.path, key, parts)
        yield ref, replace(item, uri=uri, captions=_caption(parts, None, item.captions)), payload
        if not by_key:
            return
    for key, item in by_key.items():
        if stream.error is not None:
            failure = ("read", "truncated", f"{shard.path} ended before sample {key!r} ({stream.error})")
        else:
            failure = ("read", "not_in_tar", f"{shard.path} holds no sample {key!r} (its sidecar lists it)")
        yield ref, item, Payload(failure=failure)
