"""What a build indexes: an embedding store's index rows and vectors, read shard by shard
(rows_table, read_shard, read_rows, read_vectors, gather, add_store), and Corpus, the vectors of
one build, which builds and tunes each candidate plan (koclip.index.build's docstring: when the
store is loaded whole, when the IVF kinds stream it).
"""
from __future__ import annotations

import logging
import os

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from koclip import fs
from koclip.index.faiss_ops import add_truth, add_vectors, coarse_centroids, copy_index, train
from koclip.index.plan import IVF_KINDS, RECALL_K, Plan
from koclip.index.tuning import Tuning, build_and_tune, holdout_order, holdout_truth, train_rows, tune
from koclip.index.versions import ROWS_SCHEMA
from koclip.store import Store, check_column, vectors_to_numpy

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


def read_rows(store: Store, column: str) -> tuple[pa.Table, list[int]]:
    """Every index row of the store (no vectors), and the row count of each shard in order."""
    check_column(column)
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
    exact top RECALL_K among them (koclip.index.tuning.build_and_tune, streaming)."""
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


class Corpus:
    """The vectors a build indexes: a store read shard by shard (loaded whole only when a kind
    needs every vector in memory), or vectors already in memory (`vectors=`)."""

    def __init__(self, store: Store | None = None, column: str = "", counts: list[int] | None = None,
                 vectors: np.ndarray | None = None):
        self.store, self.column, self.counts, self.vectors = store, column, counts, vectors
        self.n = len(vectors) if vectors is not None else sum(counts)
        self.truth: np.ndarray | None = None  # the held-out rows' exact neighbours, once known
        self.centroids: dict[int, np.ndarray] = {}  # nlist -> coarse centroids (ivfflat, ivfsq8)

    def load(self) -> np.ndarray:
        if self.vectors is None:
            self.vectors = read_vectors(self.store, self.column, self.counts)
        return self.vectors

    def build(self, plan: Plan, held_out: np.ndarray, target_recall: float, seed: int,
              trained: faiss.Index | None) -> tuple[faiss.Index, faiss.Index | None, Tuning, np.ndarray]:
        """(index, trained, tuning, order) of one plan; order[r] is the corpus row of index row r."""
        if plan.kind not in IVF_KINDS or self.vectors is not None:
            vectors = self.load()
            if self.truth is None:
                self.truth = holdout_truth(vectors, held_out)
            if trained is None and plan.kind in IVF_KINDS:
                trained = train(plan, vectors[train_rows(plan, seed, held_out)], self.centroids.get(plan.nlist))
            built = build_and_tune(plan, vectors, held_out, target_recall, seed, trained, truth=self.truth)
        else:
            built = self._stream(plan, held_out, target_recall, seed, trained)
        if plan.kind in ("ivfflat", "ivfsq8"):
            self.centroids.setdefault(plan.nlist, coarse_centroids(built[1]))
        return built

    def _stream(self, plan: Plan, held_out: np.ndarray, target_recall: float, seed: int,
                trained: faiss.Index | None):
        """An IVF build in two passes over the store (module docstring)."""
        picked = held_out if trained is not None else np.concatenate([held_out, train_rows(plan, seed, held_out)])
        sample = gather(self.store, self.column, self.counts, picked)
        q = sample[:len(held_out)]
        if trained is None:
            trained = train(plan, sample[len(held_out):], self.centroids.get(plan.nlist))
        index = copy_index(trained)
        self.truth = add_store(index, self.store, self.column, self.counts, held_out, q)
        tuning = tune(index, q, self.truth, target_recall)
        add_vectors(index, q, plan.n - len(held_out))
        return index, trained, tuning, holdout_order(plan.n, held_out)
