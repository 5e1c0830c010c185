"""Write each work unit once all of its items are accounted for: a Parquet shard of the
embedded ones, a JSONL file of the dead letters, then the unit's done marker, in that order.

Every file is published whole (koclip.fs.write_bytes), and the done marker comes last, so a
crash at any point leaves either a finished unit or one that the next run redoes; a redone
unit overwrites its shard with the same rows. The writer runs fused with decoding and
inference (no shuffle in between), so units are committed as the job goes, not at its end.

Output folder layout:
  shard-00003.parquet               embedded items of unit 3 (koclip.store schema)
  _dead_letters/unit-00003.jsonl    {"id", "uri", "stage", "reason", "message"} per line
  _dead_letters/listing.jsonl       manifest rows that are not items (stage "listing"), the same
                                    fields plus source, line (JSONL, CSV) or row (Parquet), text;
                                    written whole by the driver while planning, before any unit
  _done/unit-00003.json             the unit's key and counts, written last
  _run.json                         the run: input, listing digest, unit size, model fingerprint
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field

import apache_beam as beam
from apache_beam.metrics import Metrics

from koclip import fs, store
from koclip.data.manifest_scan import ListingReject
from pipelines.transforms.decode import NAMESPACE, DeadLetter, UnitRef
from pipelines.transforms.model_handler import Embedded

DONE_DIR = "_done"
DEAD_LETTER_DIR = "_dead_letters"
LISTING_DEAD_LETTERS = "listing.jsonl"
RUN_FILE = "_run.json"


def shard_path(output: str, index: int) -> str:
    return fs.join(output, store.shard_name(index))


def dead_letter_path(output: str, index: int) -> str:
    return fs.join(output, DEAD_LETTER_DIR, f"unit-{index:05d}.jsonl")


def done_path(output: str, index: int) -> str:
    return fs.join(output, DONE_DIR, f"unit-{index:05d}.json")


def listing_dead_letter_path(output: str) -> str:
    return fs.join(output, DEAD_LETTER_DIR, LISTING_DEAD_LETTERS)


def write_listing_dead_letters(output: str, rejects: list[ListingReject]) -> None:
    """The listing's rejected rows (ListingReject) as one file, replacing the last run's; none: no file."""
    path = listing_dead_letter_path(output)
    if rejects:
        write_records(path, [r.to_json() for r in rejects])
    else:
        fs.remove(path)


def write_records(path: str, records: list[dict]) -> None:
    """Dead-letter records as JSON lines."""
    fs.write_bytes(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode())


def _records(path: str) -> list[dict]:
    # split on "\n" only: a record's text may hold U+2028 or \x1c, which splitlines() splits on
    return [json.loads(line) for line in fs.read_bytes(path).decode().split("\n") if line]


def unit_dead_letters(output: str, index: int) -> list[dict]:
    """The dead-letter records of one written unit (none when it has no file)."""
    path = dead_letter_path(output, index)
    return _records(path) if fs.exists(path) else []


def read_dead_letters(output: str) -> list[dict]:
    """Every dead-letter record of an output folder: the listing's rejected rows, then unit by unit.
    A listing record is a row, not an item: its `id` is null when the row has no usable id, and
    for a `duplicate_id` it is the id of an item embedded from an earlier row."""
    listing = listing_dead_letter_path(output)
    records = _records(listing) if fs.exists(listing) else []
    for path in fs.glob(fs.join(output, DEAD_LETTER_DIR, "unit-*.jsonl")):
        records += _records(path)
    return records


@dataclass
class _Pending:
    unit: UnitRef
    rows: list = field(default_factory=list)
    dead: list = field(default_factory=list)
    blank_captions: int = 0

    @property
    def complete(self) -> bool:
        return len(self.rows) + len(self.dead) == self.unit.size


class WriteUnits(beam.DoFn):
    """Embedded | DeadLetter -> (files written as a side effect) -> the unit's done record."""

    def __init__(self, output: str, fingerprint: str, config: dict, dim: int, embedding_dtype: str,
                 extra_columns: tuple[str, ...] = ()):
        self.output, self.fingerprint, self.config = output, fingerprint, config
        self.dim, self.embedding_dtype = dim, embedding_dtype
        self.extra_columns = extra_columns  # the input columns the run keeps (pipelines.embed --keep-columns)
        self.units_written = Metrics.counter(NAMESPACE, "units_written")

    def start_bundle(self):
        self.pending: dict[int, _Pending] = {}

    def process(self, element):
        unit = element.unit
        pending = self.pending.setdefault(unit.index, _Pending(unit))
        if isinstance(element, DeadLetter):
            pending.dead.append(element)
        else:
            pending.rows.append(_row(element))
            pending.blank_captions += element.decoded.blank_captions
        if pending.complete:
            del self.pending[unit.index]
            yield self._write(pending)

    def finish_bundle(self):
        if self.pending:
            # Cannot happen while the writer is fused with decoding: a unit's items never leave
            # the bundle that expanded it. Failing beats writing a partial shard.
            parts = ", ".join(f"unit {p.unit.index}: {len(p.rows) + len(p.dead)} of {p.unit.size}"
                              for p in self.pending.values())
            raise RuntimeError(f"bundle ended with incomplete units ({parts})")

    def _write(self, pending: _Pending) -> dict:
        index = pending.unit.index
        # A unit redone after a partial run replaces both of its files: a stale shard or dead-letter
        # file would hold an item twice (or an item that is now the other kind).
        if pending.rows:
            table = store.rows_to_table(pending.rows, self.fingerprint, self.config, self.dim, self.embedding_dtype,
                                        self.extra_columns)
            store.write_shard(shard_path(self.output, index), table)
        else:
            fs.remove(shard_path(self.output, index))
        if pending.dead:
            write_records(dead_letter_path(self.output, index), [d.to_json() for d in pending.dead])
        else:
            fs.remove(dead_letter_path(self.output, index))
        done = {
            "unit": index,
            "key": pending.unit.key,
            "items": pending.unit.size,
            "embedded": len(pending.rows),
            "dead_letters": len(pending.dead),
            "dead_letter_reasons": dict(Counter(d.reason for d in pending.dead)),
            "captions": sum(len(r.captions) for r in pending.rows),
            "blank_captions": pending.blank_captions,
            "shard": store.shard_name(index) if pending.rows else None,
        }
        fs.write_bytes(done_path(self.output, index), json.dumps(done).encode())
        self.units_written.inc()
        return done


def _row(embedded: Embedded) -> store.Row:
    d = embedded.decoded
    return store.Row(d.item.id, d.item.uri, d.sha256, d.width, d.height, list(d.captions),
                     embedded.image_embedding, embedded.caption_embeddings, d.item.split, d.item.extra)
