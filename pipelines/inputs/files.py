"""img2dataset's `files` output: `NNNNN/KEY.jpg` (+ `KEY.txt`, `KEY.json`) beside `NNNNN.parquet`.

The sidecars are the listing: each `success` row is an item (id = `key`, or `--id-column`) whose
image is the file of its key in the shard's folder (one listing of that folder per shard, not of
the whole tree), caption from the sidecar's `caption` column or else the `KEY.txt` file (read by
the worker as any caption_uri); every other row is a dead letter of stage "listing" with
img2dataset's status and error_message. The items are whole files, so units are cut and read as
for a manifest (pipelines.listing, pipelines.transforms.decode).
"""
from __future__ import annotations

import posixpath

from koclip import fs
from koclip.data.manifest import Item
from pipelines.inputs.base import (IMAGE_EXTENSIONS, SHARD_NAME, InputError, InputOptions, ShardedInput, absolute,
                              duplicate_reject, kept_values, row_reject)

_SIDECAR_COLUMNS = ("key", "url", "caption", "status", "error_message")


class Img2datasetFiles(ShardedInput):
    def __init__(self, source: str, options: InputOptions = InputOptions()):
        super().__init__(absolute(source).rstrip("/"), options)

    def _sidecars(self) -> list[str]:
        if not fs.is_dir(self.source):
            raise InputError(f"input not found: {self.source}")
        found = sorted(e["path"] for e in fs.ls(self.source)
                       if e["path"].endswith(".parquet") and SHARD_NAME.match(posixpath.basename(e["path"])[:-8]))
        if not found:
            raise InputError(f"no img2dataset shards (NNNNN.parquet beside NNNNN/) found at {self.source}")
        return found

    def units(self, unit_size: int):
        from pipelines.listing import iter_units

        return iter_units(self._items(), unit_size)

    def _items(self):
        self.rejects = []
        self._ids.start()
        for sidecar in self._sidecars():
            yield from self._shard_items(sidecar)
        self._ids.end(self.source)

    def _shard_items(self, sidecar: str):
        import pyarrow.parquet as pq

        folder = sidecar[:-len(".parquet")]
        files = {posixpath.basename(e["path"]): e["path"] for e in fs.ls(folder) if e["type"] != "directory"}
        images = {}
        for name, path in files.items():
            stem, ext = posixpath.splitext(name)
            if ext.lower() in IMAGE_EXTENSIONS:
                images.setdefault(stem, path)
        id_column = self.options.id_column or "key"
        keep = self.options.keep_columns
        with fs.open(sidecar) as f:
            parquet = pq.ParquetFile(f)
            names = parquet.schema_arrow.names
            if id_column not in names:
                raise InputError(f"{sidecar} has no column {id_column!r} for the ids (see --id-column)")
            columns = [c for c in dict.fromkeys((*_SIDECAR_COLUMNS, id_column, *keep)) if c in names]
            number = 0
            for batch in parquet.iter_batches(batch_size=10_000, columns=columns):
                for row in batch.to_pylist():
                    number += 1
                    where = f"{sidecar}: row {number}"
                    key, item_id = row.get("key"), row.get(id_column)
                    reject = row_reject(sidecar, row, number, None if key is None else item_id, id_column)
                    if reject is not None:
                        self.rejects.append(reject)
                        continue
                    caption = row.get("caption")
                    txt = files.get(f"{key}.txt")
                    extra = kept_values(row, keep)
                    if row.get("url") is not None:
                        extra["url"] = row["url"]
                    item = Item(str(item_id), images.get(key, fs.join(folder, f"{key}.jpg")),
                                (caption,) if isinstance(caption, str) else (),
                                caption_uri=None if isinstance(caption, str) else txt, extra=extra)
                    first = self._ids.duplicate_of(item.id, where)
                    if first is not None:
                        self.rejects.append(duplicate_reject(sidecar, item, where, first, number))
                        continue
                    yield item
