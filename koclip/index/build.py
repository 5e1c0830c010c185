"""Building an index from an embedding store (build_index) and extending a published one
(extend_index). Row r of an index is row r of its rows.parquet: the store's rows in shard order,
except the tuning query rows, which are held out while tuning and come last
(koclip.index.tuning). A caption index has one row per caption, id "item#k".

build_index reads the store's vectors twice at most: flat and hnsw hold every vector anyway, so
they load them all; ivfpq streams: one pass gathers the training sample and the tuning queries, a
second adds each shard and finds the queries' exact neighbours on the way.

Extending (extend_index): the CURRENT version plus the rows of `add` (a store of the same model)
minus the items in `remove` (item ids; a caption index drops all of an item's captions). An added
item already in the index replaces its old rows. flat and ivfpq are updated in place: ivfpq keeps
its trained quantizer and its search parameters, and meta "recall_version" names the version
whose build measured its recall (an ivfpq index cannot give its vectors back for a new
measurement); hnsw cannot remove vectors, so it is rebuilt from the vectors it stores. When
choose_index would pick another kind for the new size (or ivfpq's nlist would be off by 2x), the
index is rebuilt; from flat or hnsw with their stored vectors, from ivfpq only with `full_store=`
(a store of every current item; the build then reads it, ignoring add/remove). A call that
changes nothing publishes nothing (BuildResult.published is False).

Both hold the index root's lock (ROOT/LOCK, koclip.lock) from before reading CURRENT or naming the
version until the publish, and check it right before flipping CURRENT: a second build into the
same root, on any machine, fails at once with LockHeld naming the first. The lock is re-entrant
per thread, so a caller that already holds the root's lock (jobs.reindex:
`with lock.hold(index_root, what="jobs.reindex"): build_index(store, index_root)`) is not asked
for it again, and the record keeps naming that caller.
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from koclip import fs
from koclip.errors import IndexBuildError, IndexFolderError, StoreError
from koclip.index.faiss_ops import add_truth, add_vectors, copy_index, in_memory, remove_rows, train
from koclip.index.load import load_index, read_index_file
from koclip.index.plan import (DEFAULT_MAX_MEMORY, DEFAULT_QUERIES, DEFAULT_TARGET_RECALL, RECALL_K, Plan,
                               choose_index, parse_memory, plan_of)
from koclip.index.tuning import Tuning, build_and_tune, holdout_order, query_rows, train_rows, tune
from koclip.index.versions import (ROWS_SCHEMA, current_version, make_meta, new_version, publish_written,
                                   removed_on_failure, write_version)
from koclip.lock import Lock, hold
from koclip.store import Store, open_store, vectors_to_numpy

log = logging.getLogger("koclip.index")


def rows_table(table: pa.Table, column: str) -> pa.Table:
    """Store rows (id, uri, captions) -> index rows: one per item, or one per caption ("id#k")."""
    ids, uris, captions = (table.column(c).to_pylist() for c in ("id", "uri", "captions"))
    if column == "image_embedding":
        return pa.table([ids, ids, uris, captions], schema=ROWS_SCHEMA)
    out: dict[str, list] = {"id": [], "item_id": [], "uri": [], "captions": []}
    for item, uri, texts in zip(ids, uris, captions):
        for k, text in enumerate(texts or []):
            for key, value in zip(out, (f"{item}#{k}", item, uri, [text])):
                out[key].append(value)
    return pa.table(out, schema=ROWS_SCHEMA)


def read_shard(path: str, column: str, vectors: bool = True) -> tuple[pa.Table, np.ndarray | None]:
    """One shard's index rows and (optionally) its float32 vectors of `column`."""
    with fs.open(path) as f:
        table = pq.read_table(f, columns=["id", "uri", "captions"] + ([column] if vectors else []))
    rows = rows_table(table, column)
    if not vectors:
        return rows, None
    values = table.column(column).combine_chunks()
    values = values if column == "image_embedding" else values.flatten()
    return rows, vectors_to_numpy(values, values.type.list_size)


def _check_column(column: str) -> None:
    if column not in ("image_embedding", "caption_embeddings"):
        raise StoreError(f"no embedding column {column!r}; choose image_embedding or caption_embeddings")


def read_rows(store: Store, column: str) -> tuple[pa.Table, list[int]]:
    """Every index row of the store (no vectors), and the row count of each shard in order."""
    _check_column(column)
    parts = [read_shard(s.path, column, vectors=False)[0] for s in store.shards]
    return pa.concat_tables(parts) if parts else ROWS_SCHEMA.empty_table(), [len(p) for p in parts]


def read_vectors(store: Store, column: str, counts: list[int]) -> np.ndarray:
    """Every vector of `column`, float32 [sum(counts), D], filled shard by shard."""
    out = np.empty((sum(counts), store.dim), np.float32)
    start = 0
    for shard, count in zip(store.shards, counts):
        out[start:start + count] = read_shard(shard.path, column)[1]
        start += count
    return out


def gather(store: Store, column: str, counts: list[int], rows: np.ndarray) -> np.ndarray:
    """The vectors of the given global rows (any order), reading only the shards that hold them."""
    rows = np.asarray(rows, dtype=np.int64)
    out = np.empty((len(rows), store.dim), np.float32)
    start = 0
    for shard, count in zip(store.shards, counts):
        picked = np.flatnonzero((rows >= start) & (rows < start + count))
        if len(picked):
            out[picked] = read_shard(shard.path, column)[1][rows[picked] - start]
        start += count
    return out


def add_store(index: faiss.Index, store: Store, column: str, counts: list[int], held_out: np.ndarray,
              queries: np.ndarray) -> np.ndarray:
    """Add every shard's rows except the held-out ones, in order, as rows 0..; returns the queries'
    exact top RECALL_K among them (koclip.index_faiss.build_and_tune, streaming)."""
    heap = faiss.ResultHeap(len(queries), RECALL_K, keep_max=True)
    start = added = 0
    for shard, count in zip(store.shards, counts):
        vectors = read_shard(shard.path, column)[1]
        keep = ~np.isin(np.arange(start, start + count), held_out)
        add_vectors(index, vectors[keep], added)
        add_truth(heap, queries, np.ascontiguousarray(vectors[keep]), added)
        start, added = start + count, added + int(keep.sum())
        log.info("added %s: %d/%d rows", os.path.basename(shard.path), start, sum(counts))
    heap.finalize()
    return heap.I


@dataclass
class BuildResult:
    root: str
    version: str
    meta: dict
    published: bool = True  # False when extend_index had nothing to change
    deleted: tuple[str, ...] = ()

    @property
    def path(self) -> str:
        return fs.join(self.root, "versions", self.version)


def _build_from_store(plan: Plan, store: Store, column: str, counts: list[int], queries: int, seed: int,
                      target_recall: float, trained: faiss.Index | None):
    """(index, trained, tuning, order); order[r] is the store row of index row r."""
    held_out = query_rows(plan.n, queries, seed)
    if plan.kind != "ivfpq":  # these hold every vector anyway
        return build_and_tune(plan, read_vectors(store, column, counts), held_out, target_recall, seed)
    # streaming: one pass for the samples, one to add (finding the queries' exact neighbours on the way)
    picked = held_out if trained is not None else np.concatenate([held_out, train_rows(plan, seed)])
    sample = gather(store, column, counts, picked)
    q = sample[:len(held_out)]
    trained = trained if trained is not None else train(plan, sample[len(held_out):])
    index = copy_index(trained)
    truth = add_store(index, store, column, counts, held_out, q)
    tuning = tune(index, q, truth, target_recall)
    add_vectors(index, q, plan.n - len(held_out))
    return index, trained, tuning, holdout_order(plan.n, held_out)


def _open(embeddings: str | os.PathLike | Store) -> Store:
    return embeddings if isinstance(embeddings, Store) else open_store(os.fspath(embeddings))


def build_index(embeddings: str | os.PathLike | Store, out: str | os.PathLike, *, column: str = "image_embedding",
                kind: str = "auto", max_memory: str | int = DEFAULT_MAX_MEMORY,
                target_recall: float = DEFAULT_TARGET_RECALL, queries: int = DEFAULT_QUERIES, keep: int = 3,
                seed: int = 0, trained: str | faiss.Index | None = None,
                before_publish: Callable[[str], None] | None = None) -> BuildResult:
    """Index a store's `column`, write a new version under `out` and publish it (module docstring).

    `trained`: a trained empty ivfpq index (or a trained.faiss path) to use instead of training
    (the kind is then ivfpq, whatever `kind` says).
    """
    started, out = time.perf_counter(), os.fspath(out)
    if keep < 1:
        raise IndexBuildError(f"keep must be at least 1, got {keep}")
    with hold(out, what="koclip.index.build_index") as root_lock:
        store = _open(embeddings)
        rows, counts = read_rows(store, column)
        if not len(rows):
            raise IndexBuildError(f"{store.root} holds no {column} vectors to index")
        budget = parse_memory(max_memory)
        trained_given, trained = trained is not None, read_index_file(trained) if trained is not None else None
        plan = plan_of(trained, len(rows), budget) if trained is not None else choose_index(len(rows), store.dim,
                                                                                             budget, kind)
        log.info("indexing %d rows of %s as %s (%s)", plan.n, column, plan.factory, plan.reason)
        version = new_version(out)
        index, trained, tuning, order = _build_from_store(plan, store, column, counts, queries, seed, target_recall,
                                                          trained)
        rows = rows.take(pa.array(order))
        meta = make_meta(version=version, plan=plan, tuning=tuning, store_root=store.root, column=column, count=plan.n,
                         dim=store.dim, fingerprint=store.fingerprint, model_config=store.config,
                         target_recall=target_recall, max_memory=budget,
                         kind_requested="ivfpq" if trained_given else kind,
                         build_seconds=time.perf_counter() - started)
        return write_and_publish(out, version, index, rows, meta, trained, keep, before_publish, root_lock)


def write_and_publish(root: str, version: str, index: faiss.Index, rows: pa.Table, meta: dict,
                      trained: faiss.Index | None, keep: int, before_publish: Callable[[str], None] | None,
                      lock: Lock | None = None) -> BuildResult:
    """Write the version folder, run the hook, check `lock` (the root's), flip CURRENT; on any
    failure remove the folder."""
    with removed_on_failure(root, version):
        write_version(root, version, index, rows, meta, trained)
        deleted = publish_written(root, version, keep, before_publish, lock)
    return BuildResult(root, version, meta, True, deleted)


def _rows_and_vectors(add, column: str, fingerprint: str, dim: int) -> tuple[pa.Table, np.ndarray]:
    if add is None:
        return ROWS_SCHEMA.empty_table(), np.zeros((0, dim), np.float32)
    store = _open(add)
    if store.fingerprint != fingerprint:
        raise IndexBuildError(f"{store.root} was embedded by model {store.fingerprint}, the index by {fingerprint}; "
                              "an index never mixes models: rebuild it with build_index")
    rows, counts = read_rows(store, column)
    return rows, read_vectors(store, column, counts)


def _needs_rebuild(old: Plan, new: Plan) -> bool:
    if old.kind != new.kind or old.kind == "hnsw":
        return True
    return old.kind == "ivfpq" and not new.nlist / 2 < old.nlist < new.nlist * 2


def extend_index(root: str | os.PathLike, add: str | os.PathLike | Store | None = None, remove: Iterable[str] = (),
                 *, kind: str | None = None, max_memory: str | int | None = None, target_recall: float | None = None,
                 queries: int = DEFAULT_QUERIES, keep: int = 3, seed: int = 0,
                 full_store: str | os.PathLike | Store | None = None,
                 before_publish: Callable[[str], None] | None = None) -> BuildResult:
    """The CURRENT version of `root` plus `add`'s rows minus `remove`d items, as a new published
    version (module docstring). kind, max_memory and target_recall default to the previous build's
    (kind: what it was asked for, "auto" or a forced kind)."""
    started, root = time.perf_counter(), os.fspath(root)
    with hold(root, what="koclip.index.extend_index") as root_lock:
        if current_version(root) is None:
            raise IndexFolderError(f"{root} has no CURRENT version to extend; build one with build_index")
        prev = load_index(root)
        meta, column = prev.meta, prev.meta["column"]
        budget = parse_memory(max_memory if max_memory is not None else meta["max_memory"])
        target = target_recall if target_recall is not None else meta["target_recall"]
        kind = kind if kind is not None else meta.get("kind_requested", "auto")
        new_rows, new_vectors = _rows_and_vectors(add, column, prev.fingerprint, prev.dim)
        gone = set(remove) | set(new_rows.column("item_id").to_pylist())
        removed = np.isin(np.asarray(prev.rows.column("item_id").to_pylist(), dtype=object), list(gone))
        if not removed.any() and not len(new_rows):
            log.info("nothing to add or remove: %s stays at version %s", root, prev.version)
            return BuildResult(root, prev.version, meta, published=False)
        kept = int((~removed).sum())
        rows = pa.concat_tables([prev.rows.filter(pa.array(~removed)), new_rows.cast(ROWS_SCHEMA)])
        if not len(rows):
            raise IndexBuildError(f"removing {int(removed.sum())} rows would leave {root} empty")
        plan = choose_index(len(rows), prev.dim, budget, kind)
        old_plan = plan_of(prev.faiss, prev.count, budget)
        common = dict(column=column, count=len(rows), dim=prev.dim, fingerprint=prev.fingerprint,
                      model_config=meta["model_config"], target_recall=target, max_memory=budget,
                      kind_requested=kind, parent=prev.version)
        version = new_version(root)
        if _needs_rebuild(old_plan, plan) and old_plan.kind == "ivfpq":
            if full_store is None:
                raise IndexBuildError(f"{root} should be rebuilt as {plan.factory} for {len(rows)} rows, and an ivfpq "
                                      "index cannot give its vectors back: pass full_store= (every current item)")
            return build_index(full_store, root, column=column, kind=kind, max_memory=budget, target_recall=target,
                               queries=queries, keep=keep, seed=seed, before_publish=before_publish)
        index, trained = prev.faiss, None
        if _needs_rebuild(old_plan, plan):  # from the vectors flat and hnsw keep, queries held out again
            vectors = np.concatenate([index.reconstruct_n(0, prev.count)[~removed], new_vectors])
            index, trained, tuning, order = build_and_tune(plan, vectors, query_rows(len(rows), queries, seed),
                                                           target, seed)
            rows = rows.take(pa.array(order))
        elif plan.kind == "flat":
            remove_rows(index, removed)
            add_vectors(index, new_vectors, kept)
            tuning = Tuning({}, 1.0, True, 0)  # exact search: nothing to tune or measure
        else:  # ivfpq in place, with its trained quantizer
            plan = plan_of(index, len(rows), budget)
            index = in_memory(index)
            remove_rows(index, removed)
            add_vectors(index, new_vectors, kept)
            trained = read_index_file(fs.join(prev.path, "trained.faiss"))
            tuning = Tuning(meta["search_params"], meta["recall_at_10"], meta["target_reached"], meta["recall_queries"])
            common["recall_version"] = meta["recall_version"]
        log.info("extend %s: -%d +%d rows -> %d (%s)", prev.version, int(removed.sum()), len(new_rows), len(rows),
                 plan.factory)
        meta = make_meta(version=version, plan=plan, tuning=tuning, store_root=meta["store_root"],
                         build_seconds=time.perf_counter() - started, **common)
        return write_and_publish(root, version, index, rows, meta, trained, keep, before_publish, root_lock)
