"""Input formats of the embedding pipeline: what a `--input` is, how the driver plans it into work
units, and how a worker reads a unit's bytes.

  format       what it is                                          module
  manifest     one JSONL / CSV / Parquet manifest                  pipelines.listing (koclip.data.manifest)
  images       a folder or glob of image files (+ x.txt captions)  pipelines.listing
  manifests    a folder or glob of manifest shards                 pipelines.inputs.manifests
  webdataset   WebDataset tars (img2dataset `webdataset` output    pipelines.inputs.webdataset
               with its NNNNN.parquet sidecars, or any tar)
  parquet      Parquet with image bytes (img2dataset `parquet`     pipelines.inputs.parquet_bytes
               output; Hugging Face `datasets` {bytes, path})
  files        img2dataset `files` output (NNNNN/key.jpg + .txt,   pipelines.inputs.files
               beside NNNNN.parquet)

`detect_format` names the format from the path (or `--input-format` does); `open_input` gives an
`Input`: `units(unit_size)` yields its `Unit`s (pipelines.listing), `kept_columns` names the input
columns its shards keep (--keep-columns, and img2dataset's `url` for the webdataset, parquet and
files formats), and once a pass has ended `rejects` holds the
rows that are not items (dead letters of stage "listing": a manifest's bad rows, img2dataset's
failed downloads with its own status and error_message) and `complete` says whether the pass
stands (False after a pass that met a repeated id: iterate again, each later row of the id then
being a `duplicate_id` reject).

A unit of the manifest, images, manifests and files formats lists items whose bytes are whole
files (`Item.uri`), read by pipelines.transforms.decode. A unit of the webdataset and parquet
formats also carries a `Shard`: the tar, or the Parquet file and row range, that the worker
streams (`read_shard_unit`) to get each item's bytes; the driver never opens a tar, and reads a
Parquet file's footer and its small columns only (never the image column).
"""
from __future__ import annotations

import os
import posixpath
from collections.abc import Iterator

from koclip import fs
from koclip.data.manifest import MANIFEST_EXTENSIONS, is_manifest
from koclip.errors import UsageError
from pipelines.inputs.base import (IMAGE_BYTES_COLUMNS, IMAGE_EXTENSIONS, SHARD_NAME, IdCheck, InputError,  # noqa: F401
                                   InputOptions, Shard, _is_wildcard, absolute, duplicate_reject, kept_values,
                                   list_paths, parse_keep_columns)

FORMATS = ("manifest", "images", "manifests", "webdataset", "parquet", "files")

# ---------------------------------------------------------------- which format


def _basename(path: str) -> str:
    return posixpath.basename(path.rstrip("/"))


def has_image_bytes(path: str, image_column: str | None = None) -> bool:
    """Whether a Parquet file holds image bytes (a binary or {bytes, path} column), not paths."""
    from pipelines.inputs.parquet_bytes import find_image_column

    return find_image_column(path, image_column, refuse=False) is not None


def detect_format(source: str, image_column: str | None = None) -> str:
    """The format of `source` from its name and, for a folder, the names directly under it."""
    if _is_wildcard(source):
        tail = source.lower()
        if tail.endswith(".tar"):
            return "webdataset"
        if tail.endswith(".parquet"):
            first = next(iter(fs.glob(source)), None)
            return "parquet" if first and has_image_bytes(first, image_column) else "manifests"
        if tail.endswith(MANIFEST_EXTENSIONS):
            return "manifests"
        return "images"
    if source.lower().endswith(".tar"):
        return "webdataset"
    if is_manifest(source):
        if source.lower().endswith(".parquet") and fs.exists(source) and has_image_bytes(source, image_column):
            return "parquet"
        return "manifest"
    if not fs.is_dir(source):
        return "images"  # pipelines.listing names what is missing
    has_tar = has_manifest = False
    parquets, shard_folders = [], set()
    for name, is_folder in _names_under(source):  # streamed: a folder of 1M images holds no listing here
        if is_folder:
            if SHARD_NAME.match(name):
                shard_folders.add(name)
        elif name.endswith(".tar"):
            has_tar = True
        elif name.endswith(".parquet"):
            parquets.append(name)
        elif name.endswith(MANIFEST_EXTENSIONS):
            has_manifest = True
    if has_tar:
        return "webdataset"
    if any(p[:-len(".parquet")] in shard_folders for p in parquets):
        return "files"
    if parquets and has_image_bytes(fs.join(source, min(parquets)), image_column):
        return "parquet"
    if parquets or has_manifest:
        return "manifests"
    return "images"


def _names_under(folder: str) -> Iterator[tuple[str, bool]]:
    """(name, is a folder) directly under `folder`; a local folder is scanned, not listed whole."""
    if fs.is_url(folder):
        for entry in fs.ls(folder):
            yield _basename(entry["path"]), entry["type"] == "directory"
        return
    with os.scandir(folder) as scan:
        for entry in scan:
            yield entry.name, entry.is_dir()


def open_input(source: str, input_format: str | None = None, options: InputOptions = InputOptions(),
               refuse_bad_rows: bool = False):
    """The `Input` of `source` (module docstring), in the named or detected format."""
    if input_format is not None and input_format not in FORMATS:
        raise UsageError(f"--input-format must be one of {', '.join(FORMATS)}, got {input_format!r}")
    fmt = input_format or detect_format(source, options.image_column)
    if fmt in ("manifest", "images"):
        from pipelines.listing import ListingInput

        return ListingInput(source, options, refuse_bad_rows)
    if fmt == "manifests":
        from pipelines.inputs.manifests import ManifestShards

        return ManifestShards(source, options)
    if fmt == "webdataset":
        from pipelines.inputs.webdataset import WebDatasetInput

        return WebDatasetInput(source, options)
    if fmt == "parquet":
        from pipelines.inputs.parquet_bytes import ParquetBytesInput

        return ParquetBytesInput(source, options)
    from pipelines.inputs.files import Img2datasetFiles

    return Img2datasetFiles(source, options)


def read_shard_unit(unit, ref, read_options: dict | None = None) -> Iterator[tuple]:
    """A worker reads a unit with a Shard: (UnitRef, Item, Payload) per item (the UnitRef gets its
    size here when the driver could not know it). `read_options`: max_bytes, caption_field,
    id_column, keep_columns, image_column."""
    if unit.shard.format == "webdataset":
        from pipelines.inputs.webdataset import read_tar_unit

        return read_tar_unit(unit, ref, **(read_options or {}))
    from pipelines.inputs.parquet_bytes import read_parquet_unit

    return read_parquet_unit(unit, ref, **(read_options or {}))
