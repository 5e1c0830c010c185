"""Ids repeated across units that only the workers could list: WebDataset tars without a sidecar.

For every other input the ids are known while planning and a repeat is a `duplicate_id` dead
letter of the listing (pipelines.inputs.base `IdCheck`). A tar without a sidecar is one unit whose
samples only the worker that streams it sees (the driver never opens a tar), and a worker sees
one tar: it dead-letters a key repeated inside its tar, but the same key in two tars was embedded
twice, two rows with one id in the store.

The check here runs on the driver once every unit is written (pipelines.embed `run`), over what
the units wrote: each unit's ids are its shard's `id` column and its dead letters' ids (those that
are not already a repeat). "First" is the occurrence in the lowest unit, and units follow the
tars' name order (a worker already keeps a tar's first sample of a key), so the first is fixed by
the listing alone, whatever order the workers finished in. Every later occurrence, in a later
unit, becomes a `duplicate_id` dead letter (stage "ids") naming the first's uri: its row is taken
out of its unit's shard (or its dead letter of another reason replaced), and its done marker's
counts are rewritten, so `items = embedded + dead letters` per unit and in total.

Why after the units and not before: knowing the repeats before embedding needs every tar's
headers before any unit starts (a barrier: another pass or a global shuffle of all keys), to
save the embedding of what are, in real data, a few samples. Here the cost is reading the id
columns at the end, in bounded memory (8-byte hashes of every id first, as IdCheck; the ids
themselves only of the units that hold a repeated hash), and rewriting only the units that hold
a later occurrence.

Resume. The check is a function of the written units, it never touches the first occurrence (it
is in a lower unit than any occurrence it removes), and each unit's rewrite is idempotent: the
dead letters first, then the shard, then the done marker, so a crash between them leaves the row
in both places, and the next run's check (every run makes it once all units are done) finds the
row again and finishes the same rewrite. A unit a crash left unwritten is redone whole by the
next run (its done marker is missing) and checked again like any other.
"""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from koclip import fs, store
from koclip.data.manifest import id_hash
from pipelines.transforms.write import dead_letter_path, done_path, shard_path, unit_dead_letters, write_records

STAGE = "ids"


def _shard(output: str, index: int, columns: list[str] | None = None) -> pa.Table | None:
    path = shard_path(output, index)
    if not fs.exists(path):
        return None
    with fs.open(path) as f:
        return pq.read_table(f, columns=columns)


def _occurrences(output: str, index: int, with_table: bool = False):
    """(id, uri) of each item of a unit that is not already a repeat, in the unit's files (only a
    shard's id and uri columns, unless the whole table is wanted for a rewrite)."""
    found = []
    table = _shard(output, index, None if with_table else ["id", "uri"])
    if table is not None:
        found += zip(table.column("id").to_pylist(), table.column("uri").to_pylist())
    records = unit_dead_letters(output, index)
    found += [(r["id"], r["uri"]) for r in records if r["reason"] != "duplicate_id" and r["id"] is not None]
    return (found, table, records) if with_table else found


def _repeated(units: list[int], output: str) -> tuple[set[int], list[int]]:
    """The id hashes found in more than one unit, and the units holding one of them."""
    per_unit = {i: np.array([id_hash(str(v)) for v, _ in _occurrences(output, i)], dtype=np.int64) for i in units}
    every = np.sort(np.concatenate([*per_unit.values(), np.zeros(0, np.int64)]))
    repeated = np.unique(every[1:][every[1:] == every[:-1]])
    touched = [i for i in units if np.isin(per_unit[i], repeated).any()]
    return set(repeated.tolist()), touched


def check_repeated_ids(output: str, units: list[int]) -> int:
    """Make every later occurrence of an id in `units` (indexes, all written) a dead letter; how
    many occurrences this call turned into dead letters (0 on a rerun that finds it done)."""
    repeated, touched = _repeated(sorted(units), output)
    if not repeated:
        return 0
    first: dict[str, tuple[int, str]] = {}
    later: dict[int, dict[str, tuple[str, str]]] = {}  # unit -> id -> (its uri, the first's uri)
    for index in touched:
        for item_id, uri in _occurrences(output, index):
            if id_hash(str(item_id)) not in repeated:
                continue
            seen = first.setdefault(item_id, (index, uri))
            if seen[0] != index:
                later.setdefault(index, {})[item_id] = (uri, seen[1])
    return sum(_rewrite(output, index, found) for index, found in later.items())


def _rewrite(output: str, index: int, later: dict[str, tuple[str, str]]) -> int:
    """One unit without its later occurrences: dead letters, then shard, then done marker."""
    _, table, records = _occurrences(output, index, with_table=True)
    kept = [r for r in records if r["id"] not in later or r["reason"] == "duplicate_id"]
    flagged = {r["id"] for r in kept if r["stage"] == STAGE}
    added = [{"id": item_id, "uri": uri, "stage": STAGE, "reason": "duplicate_id",
              "message": f"{uri}: id {item_id!r} repeats {first} (an earlier tar); only the first is embedded",
              "transient": False} for item_id, (uri, first) in later.items() if item_id not in flagged]
    records = kept + added
    write_records(dead_letter_path(output, index), records)
    if table is not None:
        table = table.filter(pc.invert(pc.is_in(table.column("id"), value_set=pa.array(list(later), pa.string()))))
        if table.num_rows:
            store.write_shard(shard_path(output, index), table)
        else:
            fs.remove(shard_path(output, index))
    marker = json.loads(fs.read_bytes(done_path(output, index)))
    rows = table.num_rows if table is not None else 0
    marker.update(embedded=rows, dead_letters=len(records),
                  dead_letter_reasons=dict(Counter(r["reason"] for r in records)),
                  captions=sum(len(c) for c in table.column("captions").to_pylist()) if rows else 0,
                  shard=store.shard_name(index) if rows else None)
    fs.write_bytes(done_path(output, index), json.dumps(marker).encode())
    return len(added)
