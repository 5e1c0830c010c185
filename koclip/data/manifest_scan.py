"""Reading a manifest past its bad rows: the embedding pipeline's listing (koclip.data.manifest's
third mode). A row that is not an item becomes a `ListingReject`, a dead letter of stage
"listing", and the scan goes on; `pipelines.listing` wraps this for every kind of input."""
from __future__ import annotations

import array
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass

from koclip.data.manifest import (IMAGE_KEYS, Item, _bad, _id_hash, _is_parquet, _repeated_hashes, _RowError, _rows,
                                  _valid_id, parse_row, resolve_uri)
from koclip.errors import ManifestError

TEXT_LIMIT = 200  # characters of a rejected row kept in its dead letter


@dataclass(frozen=True)
class ListingReject:
    """A manifest row that is not an item, as the embedding listing records it: a dead letter
    of stage "listing". Exactly one of `line` (JSONL, CSV) and `row` (Parquet) is set."""

    source: str  # the manifest
    reason: str  # not_json, no_id, duplicate_id, ... (koclip.data.manifest lists them)
    message: str  # the one line a ManifestError would say: "m.jsonl:20: not valid JSON (...)"
    line: int | None = None
    row: int | None = None
    id: str | None = None  # the row's id and image, when it has usable ones
    uri: str | None = None
    text: str = ""  # the row as read, cut to TEXT_LIMIT characters

    def to_json(self) -> dict:
        """The unit dead letters' fields (id, uri, stage, reason, message), then where the row is."""
        return {"id": self.id, "uri": self.uri, "stage": "listing", "reason": self.reason,
                "message": self.message, "source": self.source, "line": self.line, "row": self.row,
                "text": self.text}


def _reject(path: str, number: int, error: _RowError, row, raw) -> ListingReject:
    text = raw.rstrip("\r\n") if isinstance(raw, str) else json.dumps(raw, ensure_ascii=False, default=str)
    text = text[:TEXT_LIMIT].encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    rid = image = None
    if isinstance(row, dict):
        rid = str(row["id"]) if _valid_id(row.get("id")) else None
        image = next((row[k] for k in IMAGE_KEYS if isinstance(row.get(k), str) and row[k].strip()), None)
    where = {"row": number} if _is_parquet(path) else {"line": number}
    return ListingReject(path, error.reason, str(error), id=rid, uri=image and resolve_uri(image.strip(), path),
                         text=text, **where)


class ManifestScan:
    """The manifest's items in file order, streamed, going on past bad rows: each row that cannot
    be an item (lenient rules) is appended to `rejects` as a ListingReject.

    A repeated id: the first row with the id that is an item is embedded, and every later one is
    a `duplicate_id` reject naming the first's line. Embedding both would make the id ambiguous in
    the shards and the index; refusing the whole listing for one row pasted twice is what this mode
    is against; and file order gives the same answer on every rerun. Ids are checked through 8-byte
    hashes (80 MB for 10M rows, not a set of strings), so a repeat is only known at the end of a
    pass: `complete` is then False, and iterating again makes a second pass that knows the repeated
    hashes and rejects the later rows. A caller that streams the items (the pipeline's planner)
    redoes what it did with them; a manifest without repeats (the usual case) is read once."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self.rejects: list[ListingReject] = []
        self.complete = False
        self._repeated: set[int] | None = None  # None until a pass has ended

    def __iter__(self) -> Iterator[Item]:
        known = self._repeated or set()
        self.rejects, hashes, first = [], array.array("q"), {}
        for row, where, number, raw in _rows(self.path):
            try:
                if isinstance(row, _RowError):
                    raise row
                item = parse_row(row, where, self.path)
                item_hash = _id_hash(item.id)
                if item_hash in known:
                    if item.id in first:
                        raise _bad(where, "duplicate_id", f"duplicate id {item.id!r} (first at {first[item.id]})")
                    first[item.id] = where
            except _RowError as e:
                self.rejects.append(_reject(self.path, number, e, row, raw))
                continue
            hashes.append(item_hash)
            yield item
        unknown = _repeated_hashes(hashes) - known
        if unknown and self._repeated is not None:
            raise ManifestError(f"{self.path} changed while it was read (ids repeat that did not in the "
                                "previous pass); run again")
        self._repeated = known | unknown
        self.complete = not unknown


reject_from_row = _reject  # public, for pipelines.inputs.manifests
