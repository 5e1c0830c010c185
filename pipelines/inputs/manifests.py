"""Sharded manifests: a folder or glob of JSONL / CSV / Parquet manifest files, read as one manifest.

The shards are read in name order, one at a time and row by row (koclip.data.manifest's reader and
lenient rules, as pipelines.listing reads one manifest), so the driver holds one row and the ids'
8-byte hashes (80 MB for 10M rows), never the listing. A row that is not an item is a dead letter
of stage "listing" naming its shard and line; an id repeated in another shard is a `duplicate_id`
reject of every later row (the first row in shard order is embedded). Relative image paths are
relative to their own shard's folder. `--keep-columns` keeps those keys of each row.
"""
from __future__ import annotations

from dataclasses import replace

from koclip.data.manifest import MANIFEST_EXTENSIONS, RowError, parse_row, read_rows
from koclip.data.manifest_scan import ListingReject, reject_from_row
from koclip.errors import ManifestError
from pipelines.inputs.base import IdCheck, InputOptions, duplicate_reject, kept_values, list_paths


class ManifestShards:
    def __init__(self, source: str, options: InputOptions = InputOptions()):
        self.source = source
        self.options = options
        self.rejects: list[ListingReject] = []
        self.kept_columns = options.keep_columns
        self._ids = IdCheck()

    @property
    def complete(self) -> bool:
        return self._ids.complete

    def units(self, unit_size: int):
        from pipelines.listing import iter_units

        return iter_units(self._items(), unit_size)

    def _items(self):
        self.rejects = []
        self._ids.start()
        keep = self.options.keep_columns
        empty = True
        for path in list_paths(self.source, MANIFEST_EXTENSIONS, "manifest shards"):
            for row, where, number, raw in read_rows(path):
                try:
                    if isinstance(row, RowError):
                        raise row
                    item = parse_row(row, where, path)
                except RowError as e:
                    self.rejects.append(reject_from_row(path, number, e, row, raw))
                    continue
                item = replace(item, extra=kept_values(item.extra, keep) if keep else {})
                first = self._ids.duplicate_of(item.id, where)
                if first is not None:
                    at = {"row": number} if path.lower().endswith(".parquet") else {"line": number}
                    self.rejects.append(duplicate_reject(path, item, where, first, **at))
                    continue
                empty = False
                yield item
        self._ids.end(self.source)
        if empty:
            first = self.rejects[0].message if self.rejects else "no rows"
            raise ManifestError(f"no row of the manifests at {self.source} is an item ({len(self.rejects)} "
                                f"rejected; first: {first})")
