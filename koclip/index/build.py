"""Building an index from an embedding store (build_index) and extending a published one
(extend_index). Row r of an index is row r of its rows.parquet: the store's rows in shard order,
except the tuning query rows, which are held out while tuning and come last
(koclip.index.tuning). A caption index has one row per caption, id "item#k".

Which index (koclip.index.plan.candidates): the kinds that fit the memory budget, in order of
expected search speed, are each built and tuned on the held-out rows, and of those reaching the
target the fastest is published: the smallest median time of one query alone on one thread at
its tuned setting (koclip.index.tuning.latencies_ms); two within 5% of each other are a tie,
which the smaller index wins. The expected order is only a guess: on bench/index.py's 1M
current vectors HNSW reaches the target first in that order and IVF-PQ is 1.5x faster. Exact
search, last whenever it fits, always reaches the target and is built only when no other
candidate does; when none fits or reaches it, the build refuses in one line naming the best
recall, unless allow_below_target publishes that one (meta.json "candidates": what was tried,
each with its recall and latency). A build therefore costs every candidate's build and tuning,
and holds at most two candidates' indexes at once (the fastest so far and the one being tuned).
ivfsq8 and ivfflat with the same nlist share one k-means run. The store's vectors are read once when a flat or hnsw
candidate is tried (they hold every vector anyway) and kept for the next; until then the IVF kinds
stream: one pass for the training sample and the tuning queries, one to add each shard, finding
the queries' exact neighbours on the way (kept for the next candidate).

Extending (extend_index): the CURRENT version plus the rows of `add` (a store of the same model)
minus the items in `remove` (item ids; a caption index drops all of an item's captions). An added
item already in the index replaces its old rows. flat and the IVF kinds are updated in place: an
IVF index keeps its trained quantizer and its search parameters, and meta "recall_version" names
the version whose build measured its recall (an IVF index cannot give its vectors back for a new
measurement); hnsw cannot remove vectors, so it is rebuilt from the vectors it stores. The index
keeps its kind while that kind is still a candidate for the new size and an earlier build tried
every other candidate (exact search aside) and published this kind; otherwise (or when an IVF
nlist would be off by 2x) it is rebuilt through the candidates: from flat or hnsw with their stored vectors, from an
IVF kind only with `full_store=` (a store of every current item; the build then reads it,
ignoring add/remove). A call that changes nothing publishes nothing (BuildResult.published is False).

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

from koclip import fs
from koclip.errors import IndexBuildError, IndexFolderError
from koclip.index.corpus import Corpus, read_rows, read_vectors
from koclip.index.faiss_ops import add_vectors, in_memory, remove_rows
from koclip.index.load import load_index, read_index_file
from koclip.index.plan import (DEFAULT_MAX_MEMORY, DEFAULT_QUERIES, DEFAULT_TARGET_RECALL, IVF_KINDS, RECALL_K, Plan,
                               candidates, estimate_memory, format_bytes, kept_plan, parse_memory, plan_of)
from koclip.index.tuning import Tuning, query_rows
from koclip.index.versions import (ROWS_SCHEMA, current_version, make_meta, new_version, publish_written,
                                   removed_on_failure, write_version)
from koclip.lock import Lock, hold
from koclip.store import Store, open_store

log = logging.getLogger("koclip.index")


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


@dataclass
class Attempt:
    """One candidate built and tuned: what meta.json "candidates" records of it."""
    plan: Plan
    tuning: Tuning
    seconds: float

    def record(self) -> dict:
        return {"kind": self.plan.kind, "factory": self.plan.factory, "estimated_bytes": self.plan.estimated_bytes,
                "search_params": self.tuning.params, "recall_at_10": round(self.tuning.recall, 4),
                "recall_lower_bound": (None if self.tuning.recall_lower_bound is None
                                       else round(self.tuning.recall_lower_bound, 4)),
                "target_reached": self.tuning.reached, "latency_ms": round(self.tuning.latency_ms, 3),
                "build_seconds": round(self.seconds, 2)}


def refusal(attempts: list[Attempt], target_recall: float, budget: int, forced: bool) -> str:
    """The one line a build that kept no promise ends with."""
    best = max(attempts, key=lambda a: a.tuning.recall)
    params = ", ".join(f"{k}={v}" for k, v in best.tuning.params.items())
    tried = "; ".join(f"{a.plan.kind} {a.tuning.recall:.3f}" for a in attempts)
    head = (f"no index reaches recall@{RECALL_K} {target_recall}: tried {tried}; the best was {best.plan.kind} "
            f"({best.plan.factory}) at {best.tuning.recall:.3f} with {params} (95% lower bound over "
            f"{best.tuning.queries} held-out queries: {best.tuning.recall_lower_bound:.3f})")
    if forced:
        return head + "; choose another --kind (auto tries every kind that fits), or pass --allow-below-target"
    flat = estimate_memory("flat", best.plan.n, best.plan.dim)
    return (head + f"; exact search needs ~{format_bytes(flat)} > the budget {format_bytes(budget)}: raise "
            "--max-memory, lower --target-recall, or pass --allow-below-target to publish the best")


LATENCY_TIE = 0.05  # a tie: one index measured twice differs by up to 4% (docs/index.md)


def _better(plan: Plan, tuning: Tuning, than_plan: Plan, than: Tuning) -> bool:
    """Faster by more than LATENCY_TIE, or as fast within it and smaller in memory."""
    if tuning.latency_ms < than.latency_ms * (1 - LATENCY_TIE):
        return True
    return (tuning.latency_ms <= than.latency_ms * (1 + LATENCY_TIE)
            and plan.estimated_bytes < than_plan.estimated_bytes)


def choose_and_build(plans: list[Plan], corpus: Corpus, held_out: np.ndarray, target_recall: float, seed: int,
                     budget: int, *, forced: bool, allow_below_target: bool = False,
                     trained: faiss.Index | None = None, kept_first: bool = False,
                     on_attempt: Callable[[Attempt, faiss.Index], None] | None = None):
    """(plan, index, trained, tuning, order, attempts) of the fastest plan (Tuning.latency_ms; within
    LATENCY_TIE of it, the smallest) whose tuning reaches the target, every plan but exact search
    tried; exact search ("flat", last) only when none does; else (allow_below_target) the best
    recall, else IndexBuildError (module docstring). kept_first: the first plan, the kind an
    extension keeps, wins at once when it reaches the target. `on_attempt(attempt, index)` sees
    every candidate's tuned index (bench/index.py measures them)."""
    attempts: list[Attempt] = []
    fastest = best = None  # (plan, index, trained, tuning, order): the fastest reaching, the best recall
    for plan in plans:
        if plan.kind == "flat" and fastest is not None:
            break  # exact search scans every vector: the fallback, not a rival
        log.info("trying %s (%s) on %d rows", plan.kind, plan.factory, plan.n)
        started = time.perf_counter()
        index, trained_index, tuning, order = corpus.build(plan, held_out, target_recall, seed, trained)
        attempts.append(Attempt(plan, tuning, time.perf_counter() - started))
        if on_attempt is not None:
            on_attempt(attempts[-1], index)
        built = (plan, index, trained_index, tuning, order)
        if tuning.reached:
            log.info("%s reaches recall@%d %.3f at %.3f ms a query", plan.kind, RECALL_K, tuning.recall,
                     tuning.latency_ms)
            if fastest is None or _better(plan, tuning, fastest[0], fastest[3]):
                fastest, best = built, None
            if kept_first and len(attempts) == 1:
                break
        else:
            log.info("%s reaches recall@%d %.3f < %.3f", plan.kind, RECALL_K, tuning.recall, target_recall)
            if fastest is None and (best is None or tuning.recall > best[3].recall):
                best = built
        del index, trained_index, built
    if fastest is not None:
        return (*fastest, attempts)
    if not allow_below_target:
        raise IndexBuildError(refusal(attempts, target_recall, budget, forced))
    log.warning("publishing %s below the target: %s", best[0].kind, refusal(attempts, target_recall, budget, forced))
    return (*best, attempts)


def _open(embeddings: str | os.PathLike | Store) -> Store:
    return embeddings if isinstance(embeddings, Store) else open_store(os.fspath(embeddings))


def build_index(embeddings: str | os.PathLike | Store, out: str | os.PathLike, *, column: str = "image_embedding",
                kind: str = "auto", max_memory: str | int = DEFAULT_MAX_MEMORY,
                target_recall: float = DEFAULT_TARGET_RECALL, queries: int = DEFAULT_QUERIES, keep: int = 3,
                seed: int = 0, trained: str | faiss.Index | None = None, allow_below_target: bool = False,
                before_publish: Callable[[str], None] | None = None) -> BuildResult:
    """Index a store's `column`, write a new version under `out` and publish it (module docstring).

    `trained`: a trained empty IVF index (or a trained.faiss path) to use instead of training
    (its kind is then the only candidate, whatever `kind` says).
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
        plans = [plan_of(trained, len(rows), budget)] if trained is not None else candidates(len(rows), store.dim,
                                                                                             budget, kind)
        log.info("indexing %d rows of %s: candidates %s", len(rows), column, ", ".join(p.factory for p in plans))
        version = new_version(out)
        corpus = Corpus(store, column, counts)
        plan, index, trained, tuning, order, attempts = choose_and_build(
            plans, corpus, query_rows(len(rows), queries, seed), target_recall, seed, budget,
            forced=kind != "auto" or trained_given, allow_below_target=allow_below_target, trained=trained)
        del corpus
        rows = rows.take(pa.array(order))
        meta = make_meta(version=version, plan=plan, tuning=tuning, store_root=store.root, column=column, count=plan.n,
                         dim=store.dim, fingerprint=store.fingerprint, model_config=store.config,
                         target_recall=target_recall, max_memory=budget,
                         kind_requested=plan.kind if trained_given else kind,
                         candidates=[a.record() for a in attempts], allow_below_target=allow_below_target,
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


def extend_index(root: str | os.PathLike, add: str | os.PathLike | Store | None = None, remove: Iterable[str] = (),
                 *, kind: str | None = None, max_memory: str | int | None = None, target_recall: float | None = None,
                 queries: int = DEFAULT_QUERIES, keep: int = 3, seed: int = 0,
                 full_store: str | os.PathLike | Store | None = None, allow_below_target: bool | None = None,
                 before_publish: Callable[[str], None] | None = None) -> BuildResult:
    """The CURRENT version of `root` plus `add`'s rows minus `remove`d items, as a new published
    version (module docstring). kind, max_memory, target_recall and allow_below_target default to
    the previous build's (kind: what it was asked for, "auto" or a forced kind)."""
    started, root = time.perf_counter(), os.fspath(root)
    with hold(root, what="koclip.index.extend_index") as root_lock:
        if current_version(root) is None:
            raise IndexFolderError(f"{root} has no CURRENT version to extend; build one with build_index")
        prev = load_index(root)
        meta, column = prev.meta, prev.meta["column"]
        budget = parse_memory(max_memory if max_memory is not None else meta["max_memory"])
        target = target_recall if target_recall is not None else meta["target_recall"]
        kind = kind if kind is not None else meta.get("kind_requested", "auto")
        below = allow_below_target if allow_below_target is not None else meta.get("allow_below_target", False)
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
        plans = candidates(len(rows), prev.dim, budget, kind)
        old_plan = plan_of(prev.faiss, prev.count, budget)
        plan = kept_plan(old_plan, plans, meta)
        common = dict(column=column, count=len(rows), dim=prev.dim, fingerprint=prev.fingerprint,
                      model_config=meta["model_config"], target_recall=target, max_memory=budget,
                      kind_requested=kind, allow_below_target=below, parent=prev.version)
        version = new_version(root)
        if plan is None and old_plan.kind in IVF_KINDS:
            if full_store is None:
                raise IndexBuildError(f"{root} should be rebuilt for {len(rows)} rows (candidates: "
                                      f"{', '.join(p.factory for p in plans)}), and an {old_plan.kind} index cannot "
                                      "give its vectors back: pass full_store= (every current item)")
            return build_index(full_store, root, column=column, kind=kind, max_memory=budget, target_recall=target,
                               queries=queries, keep=keep, seed=seed, allow_below_target=below,
                               before_publish=before_publish)
        index, trained = prev.faiss, None
        if plan is None or plan.kind == "hnsw":  # from the vectors flat and hnsw keep, queries held out again
            vectors = np.concatenate([index.reconstruct_n(0, prev.count)[~removed], new_vectors])
            tried = plans if plan is None else [plan, *(p for p in plans if p.kind != "hnsw")]
            plan, index, trained, tuning, order, attempts = choose_and_build(
                tried, Corpus(vectors=vectors), query_rows(len(rows), queries, seed), target, seed, budget,
                forced=kind != "auto", allow_below_target=below, kept_first=plan is not None)
            rows = rows.take(pa.array(order))
            common["candidates"] = [a.record() for a in attempts]
        elif plan.kind == "flat":
            remove_rows(index, removed)
            add_vectors(index, new_vectors, kept)
            tuning = Tuning({}, 1.0, True, 0, recall_lower_bound=1.0)  # exact search: nothing to tune or measure
            common["candidates"] = meta.get("candidates", [])
        else:  # an IVF kind in place, with its trained quantizer
            plan = plan_of(index, len(rows), budget)
            index = in_memory(index)
            remove_rows(index, removed)
            add_vectors(index, new_vectors, kept)
            trained = read_index_file(fs.join(prev.path, "trained.faiss"))
            tuning = Tuning(meta["search_params"], meta["recall_at_10"], meta["target_reached"], meta["recall_queries"],
                            recall_lower_bound=meta.get("recall_lower_bound"))
            common["recall_version"] = meta["recall_version"]
            common["candidates"] = meta.get("candidates", [])
        log.info("extend %s: -%d +%d rows -> %d (%s)", prev.version, int(removed.sum()), len(new_rows), len(rows),
                 plan.factory)
        meta = make_meta(version=version, plan=plan, tuning=tuning, store_root=meta["store_root"],
                         build_seconds=time.perf_counter() - started, **common)
        return write_and_publish(root, version, index, rows, meta, trained, keep, before_publish, root_lock)
