"""Parquet files holding image bytes: img2dataset's `parquet` output (the bytes in a column named
after its encode format, `jpg`; `key`, `url`, `caption`/`txt`, `status`, `error_message`), and
Hugging Face `datasets` Parquet (an `image` column of {bytes, path} structs).

Planning reads each file's footer and its small columns (id, caption, status, kept columns),
never the image column. A row whose `status` is not `success` is a dead letter of stage
"listing" with img2dataset's error_message; the others are items, id = `key` (or `--id-column`;
without either, `FILE-STEM/ROW`), caption from `--caption-field`, `caption` or `txt`. A unit is a run
of up to `--unit-size` rows of one file, so a large row group is split; a worker reads only the
row groups its rows lie in, and of those only the image column (byte ranges through koclip.fs).

An image column that is neither binary nor a {bytes, ...} struct (a string column of paths is a
manifest: pipelines.inputs.manifests) is refused in one line. A null cell is the item's dead
letter (`no_image_bytes`).
"""
from __future__ import annotations

import posixpath

import pyarrow as pa

from koclip import fs
from koclip.data.manifest import Item
from pipelines.inputs.base import (IMAGE_BYTES_COLUMNS, InputError, Shard, ShardedInput, duplicate_reject,
                              kept_values, list_paths, row_reject)
from pipelines.transforms.decode import DEFAULT_MAX_BYTES, Payload, UnitRef

_CAPTION_COLUMNS = ("caption", "txt", "text", "captions")


def _holds_bytes(field_type: pa.DataType) -> bool:
    if pa.types.is_binary(field_type) or pa.types.is_large_binary(field_type):
        return True
    return pa.types.is_struct(field_type) and any(
        f.name == "bytes" and (pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type)) for f in field_type)


def _schema(path: str) -> pa.Schema:
    import pyarrow.parquet as pq

    with fs.open(path) as f:
        return pq.ParquetFile(f).schema_arrow


def find_image_column(path: str, image_column: str | None = None, refuse: bool = True) -> str | None:
    """The column of image bytes in a Parquet file. With `refuse`, an InputError when there is none or
    the named one holds something else; otherwise None."""
    schema = _schema(path)
    candidates = (image_column,) if image_column else IMAGE_BYTES_COLUMNS
    for name in candidates:
        if name in schema.names:
            if _holds_bytes(schema.field(name).type):
                return name
            if refuse and (image_column or name in ("jpg", "png", "webp")):
                raise InputError(f"{path}: column {name!r} is {schema.field(name).type}, not image bytes "
                                 "(binary, or a struct with a binary 'bytes' field as Hugging Face datasets write)")
    if refuse:
        raise InputError(f"{path} has no column of image bytes ({', '.join(candidates)}; see --image-column)")
    return None


class ParquetBytesInput(ShardedInput):
    """The Parquet files of `source` as work units (module docstring)."""

    def units(self, unit_size: int):
        from pipelines.listing import Unit, unit_key

        paths = list_paths(self.source, (".parquet",), "Parquet files")
        self.rejects = []
        self._ids.start()
        index = 0
        for path in paths:
            find_image_column(path, self.options.image_column)
            chunk: list[Item] = []
            rows: list[int] = []
            for row, item in self._items(path):
                chunk.append(item)
                rows.append(row)
                if len(chunk) == unit_size:
                    shard = Shard("parquet", path, rows[0], rows[-1] + 1)
                    yield Unit(index, unit_key(tuple(chunk), shard), tuple(chunk), shard)
                    index, chunk, rows = index + 1, [], []
            if chunk:
                shard = Shard("parquet", path, rows[0], rows[-1] + 1)
                yield Unit(index, unit_key(tuple(chunk), shard), tuple(chunk), shard)
                index += 1
        self._ids.end(self.source)

    def _items(self, path: str):
        """(row number from 0, item) for each row that is an item; the others become rejects."""
        import pyarrow.parquet as pq

        opts = self.options
        stem = posixpath.basename(path)[:-len(".parquet")]
        with fs.open(path) as f:
            parquet = pq.ParquetFile(f)
            names = parquet.schema_arrow.names
            id_column = opts.id_column or next((c for c in ("key", "id") if c in names), None)
            if opts.id_column and opts.id_column not in names:
                raise InputError(f"{path} has no column {opts.id_column!r} for the ids (see --id-column)")
            caption_column = opts.caption_field or next((c for c in _CAPTION_COLUMNS if c in names), None)
            wanted = [c for c in dict.fromkeys((id_column, caption_column, "status", "error_message", "url",
                                                *opts.keep_columns)) if c in names]
            number = -1
            for batch in parquet.iter_batches(batch_size=10_000, columns=wanted or None):
                for row in batch.to_pylist() if wanted else [{}] * batch.num_rows:
                    number += 1
                    where = f"{path}: row {number + 1}"
                    raw_id = row.get(id_column) if id_column else f"{stem}/{number}"
                    reject = row_reject(path, row, number + 1, raw_id, id_column)
                    if reject is not None:
                        self.rejects.append(reject)
                        continue
                    caption = row.get(caption_column) if caption_column else None
                    captions = (caption,) if isinstance(caption, str) else tuple(
                        c for c in caption or () if isinstance(c, str))
                    extra = kept_values(row, opts.keep_columns)
                    if row.get("url") is not None:
                        extra["url"] = row["url"]
                    item = Item(str(raw_id), f"{path}#row={number}", captions, extra=extra)
                    first = self._ids.duplicate_of(item.id, where)
                    if first is not None:
                        self.rejects.append(duplicate_reject(path, item, where, first, number + 1))
                        continue
                    yield number, item


def _cell_bytes(value) -> bytes | None:
    if isinstance(value, dict):
        return value.get("bytes")
    return value


def read_parquet_unit(unit, ref: UnitRef, max_bytes: int = DEFAULT_MAX_BYTES, image_column: str | None = None, **_):
    """(UnitRef, Item, Payload) for each item of a Parquet unit: its rows' image cells, read from
    the row groups they lie in, the image column only."""
    import pyarrow.parquet as pq

    shard = unit.shard
    by_row = {int(item.uri.rsplit("#row=", 1)[1]): item for item in unit.items}
    column = find_image_column(shard.path, image_column)
    with fs.open(shard.path) as f:
        parquet = pq.ParquetFile(f)
        first_row = 0
        for group in range(parquet.metadata.num_row_groups):
            count = parquet.metadata.row_group(group).num_rows
            rows = range(max(first_row, shard.start), min(first_row + count, shard.stop))
            if rows:
                cells = parquet.read_row_group(group, columns=[column]).column(0)
                for row in rows:
                    item = by_row.pop(row, None)
                    if item is None:
                        continue  # a row of the range that is not an item (a failed download)
                    data = _cell_bytes(cells[row - first_row].as_py())
                    if data is None:
                        payload = Payload(failure=("read", "no_image_bytes", f"{item.uri}: the {column!r} cell is null"))
                    elif len(data) > max_bytes:
                        payload = Payload(failure=("read", "too_large",
                                                   f"{item.uri} is over the {max_bytes}-byte limit (--max-bytes)"))
                    else:
                        payload = Payload(data)
                    yield ref, item, payload
            first_row += count
    for item in by_row.values():
        yield ref, item, Payload(failure=("read", "not_in_file", f"{shard.path} has fewer rows than when it was listed"))
