"""The ivfpq build as Beam pipelines, for corpora past one machine's memory.

The driver never holds the corpus: it counts each shard's rows (the footers; a caption index reads
the captions column) and streams rows.parquet from the shards' small columns (id, uri, captions),
in index order: every row but the tuning queries, in shard order, then the tuning query rows
(koclip.index_faiss.holdout_order). Each shard gets its global row offset and its offset in that
order. Then:

  1. sample (Beam, one element per shard): each worker reads its shard and saves the vectors of
     the rows picked for training and for the tuning queries (the same seeded rows build_index
     picks), to _work/sample-NNNNN.npz;
  2. train (driver): OPQ, the coarse quantizer and the PQ codebooks on that sample -> the trained,
     empty index, saved as trained.faiss in the version folder (unless `trained=` was given);
  3. add (Beam, one element per shard): each worker loads trained.faiss once, adds its shard's
     rows but the held-out queries under their index row ids (add_with_ids) and writes
     _work/part-NNNNN.faiss, and the queries' exact top 10 among those rows (_work/truth-NNNNN.npz);
  4. merge (driver): faiss.contrib.ondisk.merge_ondisk concatenates the parts' inverted lists, in
     shard order, into one on-disk file (index.ivfdata) through memory-mapped reads, so neither
     the parts nor the result need to fit in memory (faiss's in-memory merge_from would need the
     whole index in RAM); the Refine(SQ8) codes, when the budget chose them, are concatenated in
     memory (IndexFlatCodes.merge_from; they are in memory when served anyway). Per list, rows
     stay in increasing order, as a single-process build adds them, so both builds give identical
     results;
  5. tune nprobe (and k_factor) on the merged index against the merged exact neighbours; merge
     again with the held-out query rows as one more part, last (faiss's on-disk lists cannot grow
     after a merge: the ids come out corrupt), write meta.json (layout "ondisk"), delete _work and
     publish. The second merge reads the parts a second time.

Workers read and write through koclip.fs, so the version folder may be on gs:// (merging needs local
files: the parts are copied to a local temporary folder and the result uploaded).
"""
from __future__ import annotations

import io
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack, contextmanager

import apache_beam as beam
import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.options.pipeline_options import PipelineOptions

from koclip import fs
from koclip.index import (DEFAULT_MAX_MEMORY, DEFAULT_QUERIES, DEFAULT_TARGET_RECALL, RECALL_K, ROWS_SCHEMA,
                          Attempt, BuildResult, IndexBuildError, add_truth, add_vectors, choose_index, ivf_part,
                          make_meta, new_version, parse_memory, plan_of, publish_written, query_rows, read_index_file,
                          read_shard, refusal, removed_on_failure, train, train_rows, tune, write_meta)
from koclip.lock import hold
from koclip.store import Store, open_store

log = logging.getLogger("pipelines.index")
LOCAL_RUNNER = ["--runner=FnApiRunner", "--direct_running_mode=multi_threading",
                f"--direct_num_workers={max(1, os.cpu_count() or 1)}"]


def _save_npz(path: str, **arrays) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    fs.write_bytes(path, buffer.getvalue())


def _load_npz(path: str) -> dict:
    with np.load(io.BytesIO(fs.read_bytes(path))) as data:
        return {k: data[k] for k in data.files}


def count_rows(store: Store, column: str) -> list[int]:
    """Each shard's index rows: its items, or (caption index) its captions."""
    if column == "image_embedding":
        return [shard.rows for shard in store.shards]
    return [len(read_shard(shard.path, column, vectors=False)[0]) for shard in store.shards]


def write_rows(store: Store, column: str, path: str, counts: list[int], held_out: np.ndarray) -> None:
    """Stream rows.parquet shard by shard in index order (the held-out query rows last), never
    holding the whole table."""
    queries, start = [], 0
    with fs.open(path, "wb") as f, pq.ParquetWriter(f, ROWS_SCHEMA, compression="zstd") as writer:
        for shard, count in zip(store.shards, counts):
            rows = read_shard(shard.path, column, vectors=False)[0]
            held = np.isin(np.arange(start, start + count), held_out)
            writer.write_table(rows.filter(pa.array(~held)))
            queries.append(rows.filter(pa.array(held)))
            start += count
        writer.write_table(pa.concat_tables(queries))  # shard order = sorted held_out order


class SampleShard(beam.DoFn):
    """(shard_no, path, start, count, index_start) -> saves the shard's picked rows' vectors."""

    def __init__(self, column: str, work: str):
        self.column, self.work = column, work

    def setup(self):
        self.picked = _load_npz(fs.join(self.work, "picked.npz"))["rows"]

    def process(self, element):
        number, path, start, count, _ = element
        rows = self.picked[(self.picked >= start) & (self.picked < start + count)]
        if len(rows):
            vectors = read_shard(path, self.column)[1][rows - start]
            _save_npz(fs.join(self.work, f"sample-{number:05d}.npz"), rows=rows, vectors=vectors)
        yield number


class AddShard(beam.DoFn):
    """(shard_no, path, start, count, index_start) -> part-NNNNN.faiss (the shard's rows, but the
    held-out queries, in the trained index as rows index_start..) and truth-NNNNN.npz (their exact
    nearest rows for the tuning queries)."""

    def __init__(self, column: str, work: str, trained: str):
        self.column, self.work, self.trained = column, work, trained
        self.added = beam.metrics.Metrics.counter("index", "vectors_added")

    def setup(self):
        self.index = read_index_file(self.trained)
        queries = _load_npz(fs.join(self.work, "queries.npz"))
        self.queries, self.held_out = queries["vectors"], queries["rows"]

    def process(self, element):
        number, path, start, count, index_start = element
        vectors = read_shard(path, self.column)[1]
        vectors = np.ascontiguousarray(vectors[~np.isin(np.arange(start, start + count), self.held_out)])
        part = faiss.deserialize_index(faiss.serialize_index(self.index))
        add_vectors(part, vectors, index_start)
        fs.write_bytes(fs.join(self.work, f"part-{number:05d}.faiss"), faiss.serialize_index(part).tobytes())
        heap = faiss.ResultHeap(len(self.queries), RECALL_K, keep_max=True)
        add_truth(heap, self.queries, vectors, index_start)
        heap.finalize()
        _save_npz(fs.join(self.work, f"truth-{number:05d}.npz"), scores=heap.D, rows=heap.I)
        self.added.inc(len(vectors))
        yield number


def run(elements: list, dofn: beam.DoFn, pipeline_args: list[str], label: str) -> None:
    options = PipelineOptions(pipeline_args if any(a.startswith("--runner") for a in pipeline_args)
                              else LOCAL_RUNNER + list(pipeline_args))
    with beam.Pipeline(options=options) as p:
        _ = p | f"{label}Shards" >> beam.Create(elements, reshuffle=False) | label >> beam.ParDo(dofn)


def local_parts(work: str, numbers: list[int], local: str) -> list[str]:
    """The part files as local paths (merge_ondisk memory-maps them): copied when work is remote."""
    parts = [fs.join(work, f"part-{number:05d}.faiss") for number in numbers]
    if "://" in work:
        for i, remote in enumerate(parts):
            parts[i] = os.path.join(local, os.path.basename(remote))
            fs.download(remote, parts[i])
    return parts


def merge(trained: faiss.Index, parts: list[str], ivfdata: str) -> faiss.Index:
    """The trained index holding every part's rows, its inverted lists in the file `ivfdata`."""
    from faiss.contrib.ondisk import merge_ondisk

    index = faiss.deserialize_index(faiss.serialize_index(trained))
    base = ivf_part(index)
    merge_ondisk(base, parts, ivfdata)
    if isinstance(index, faiss.IndexRefine):
        refine = faiss.downcast_index(index.refine_index)
        for path in parts:
            part = faiss.read_index(path, faiss.IO_FLAG_MMAP)  # read_index downcasts; keep the owner alive
            refine.merge_from(faiss.downcast_index(part.refine_index), 0)
        index.ntotal = base.ntotal
    return index


def build_distributed(embeddings: str | Store, out: str, *, column: str = "image_embedding",
                      max_memory: str | int = DEFAULT_MAX_MEMORY, target_recall: float = DEFAULT_TARGET_RECALL,
                      queries: int = DEFAULT_QUERIES, keep: int = 3, seed: int = 0,
                      trained: str | faiss.Index | None = None, allow_below_target: bool = False,
                      pipeline_args: list[str] = (),
                      before_publish: Callable[[str], None] | None = None) -> BuildResult:
    """build_index(kind="ivfpq") with the per-shard work on Beam workers (module docstring)."""
    started, out = time.perf_counter(), os.fspath(out)
    if keep < 1:
        raise IndexBuildError(f"keep must be at least 1, got {keep}")
    store = embeddings if isinstance(embeddings, Store) else open_store(os.fspath(embeddings))
    budget = parse_memory(max_memory)
    remote_out = "://" in out  # then merge in a local temporary folder and upload the result
    with ExitStack() as stack:  # the root's lock first (koclip.lock), released last
        root_lock = stack.enter_context(hold(out, what="pipelines.index_beam"))
        version = new_version(out)
        folder = fs.join(out, "versions", version)
        work = fs.join(folder, "_work")
        stack.enter_context(removed_on_failure(out, version))
        local = stack.enter_context(_merge_folder(folder, remote_out))
        counts = count_rows(store, column)
        n = sum(counts)
        if not n:
            raise IndexBuildError(f"{store.root} holds no {column} vectors to index")
        trained = read_index_file(trained) if trained is not None else None
        plan = plan_of(trained, n, budget) if trained is not None else choose_index(n, store.dim, budget, "ivfpq")
        held_out = query_rows(n, queries, seed)
        write_rows(store, column, fs.join(folder, "rows.parquet"), counts, held_out)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(int)
        kept = [c - int(((held_out >= s) & (held_out < s + c)).sum()) for s, c in zip(starts, counts)]
        index_starts = np.concatenate([[0], np.cumsum(kept)[:-1]]).astype(int)
        elements = [(i, shard.path, int(s), c, int(r))
                    for i, (shard, s, c, r) in enumerate(zip(store.shards, starts, counts, index_starts))]
        sampled = train_rows(plan, seed, held_out) if trained is None else np.empty(0, np.int64)
        picked = np.union1d(held_out, sampled)
        _save_npz(fs.join(work, "picked.npz"), rows=picked)
        run(elements, SampleShard(column, work), list(pipeline_args), "Sample")
        samples = [_load_npz(fs.join(work, f"sample-{i:05d}.npz")) for i, *_ in elements
                   if fs.exists(fs.join(work, f"sample-{i:05d}.npz"))]
        rows = np.concatenate([s["rows"] for s in samples])
        vectors = np.concatenate([s["vectors"] for s in samples])
        lookup = dict(zip(rows.tolist(), range(len(rows))))
        q = np.ascontiguousarray(vectors[[lookup[r] for r in held_out.tolist()]])
        if trained is None:
            trained = train(plan, vectors[[lookup[r] for r in sampled.tolist()]])
        fs.write_bytes(fs.join(folder, "trained.faiss"), faiss.serialize_index(trained).tobytes())
        _save_npz(fs.join(work, "queries.npz"), vectors=q, rows=held_out)
        run(elements, AddShard(column, work, fs.join(folder, "trained.faiss")), list(pipeline_args), "Add")
        scratch = local if remote_out else work  # a local folder for the merges' files
        parts = local_parts(work, [e[0] for e in elements], scratch)
        heap = faiss.ResultHeap(len(q), RECALL_K, keep_max=True)
        for number, *_ in elements:
            truth = _load_npz(fs.join(work, f"truth-{number:05d}.npz"))
            heap.add_result(np.ascontiguousarray(truth["scores"]), np.ascontiguousarray(truth["rows"]))
        heap.finalize()
        tuning = tune(merge(trained, parts, os.path.join(scratch, "tuning.ivfdata")), q, heap.I, target_recall)
        attempt = Attempt(plan, tuning, time.perf_counter() - started)
        if not tuning.reached and not allow_below_target:
            raise IndexBuildError(refusal([attempt], target_recall, budget, forced=True))
        # faiss cannot grow the lists of a merged on-disk index (the ids come out corrupt): merge again,
        # with the held-out rows as one more part, last
        held = faiss.deserialize_index(faiss.serialize_index(trained))
        add_vectors(held, q, n - len(q))
        faiss.write_index(held, os.path.join(scratch, "part-held-out.faiss"))
        index = merge(trained, parts + [os.path.join(scratch, "part-held-out.faiss")],
                      os.path.join(local, "index.ivfdata"))
        faiss.write_index(index, os.path.join(local, "index.faiss"))
        index_bytes = sum(os.path.getsize(os.path.join(local, f)) for f in ("index.faiss", "index.ivfdata"))
        if remote_out:
            for name in ("index.faiss", "index.ivfdata"):
                fs.upload(os.path.join(local, name), fs.join(folder, name))
        fs.remove_tree(work)
        meta = make_meta(version=version, plan=plan, tuning=tuning, store_root=store.root, column=column, count=n,
                         dim=store.dim, fingerprint=store.fingerprint, model_config=store.config,
                         target_recall=target_recall, max_memory=budget, build_seconds=time.perf_counter() - started,
                         index_bytes=index_bytes, layout="ondisk", kind_requested="ivfpq", shards=len(elements),
                         candidates=[attempt.record()], allow_below_target=allow_below_target)
        write_meta(folder, meta)
        deleted = publish_written(out, version, keep, before_publish, root_lock)
    return BuildResult(out, version, meta, True, deleted)


@contextmanager
def _merge_folder(folder: str, remote: bool):
    """Where the inverted lists are merged: the version folder itself, or for a remote output a
    local temporary folder, removed afterwards."""
    if not remote:
        yield folder
        return
    local = tempfile.mkdtemp(prefix="koclip-merge-")
    try:
        yield local
    finally:
        shutil.rmtree(local, ignore_errors=True)
