"""Tuning an index's search parameter to a recall target on held-out corpus rows.

The tuning queries are `queries` seeded-random corpus rows, held out: the index is built from the
other rows, tuned, and only then are the query rows added, as the last rows (holdout_order).
Their ground truth is exact inner-product search over the indexed rows; recall@10 is the share of
those 10 true neighbours the index returns among its 10. So the queries are vectors the index
does not hold, like new items (a query that is itself in an HNSW graph leads the search straight
to its neighbours, which overstates recall; bench/index.py measured both). A setting reaches the
target when the one-sided 95% lower prediction bound of the mean recall of another set of as many
new queries does (mean - 1.645 x sqrt(2) standard errors of the queries' recalls: both sets' means
are estimates), so that a fresh batch of queries, not only these, sees the target. The smallest efSearch
(hnsw) or nprobe (the IVF kinds; for ivfpq with re-ranking, then the smallest k_factor at that
nprobe, then nprobe again) reaching the target is kept, found by doubling then bisection (recall
is assumed to grow with the parameter). If the target is not reached, the largest setting tried
is kept and Tuning.reached is False. At the setting kept, Tuning.latency_ms is the median time of
one query searched alone on one FAISS thread (latencies_ms): what a server answering one query per
core sees, and what koclip.index.build compares candidates by.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import faiss
import numpy as np

from koclip.index.faiss_ops import add_truth, add_vectors, copy_index, new_index, train
from koclip.index.plan import DEFAULT_TARGET_RECALL, IVF_KINDS, KF_MAX, RECALL_K, Plan, kind_of

log = logging.getLogger("koclip.index")
CONFIDENCE_Z = 1.645  # one-sided 95%
LATENCY_QUERIES = 100


def recall_per_query(found: np.ndarray, truth: np.ndarray, k: int = RECALL_K) -> np.ndarray:
    """Each query's share of its true k nearest rows found among the index's first k."""
    out = np.ones(len(truth))
    for i, (got, want) in enumerate(zip(found, truth)):
        want = set(want[:k][want[:k] >= 0].tolist())
        if want:
            out[i] = len(set(got[:k].tolist()) & want) / len(want)
    return out


def recall_at_k(found: np.ndarray, truth: np.ndarray, k: int = RECALL_K) -> float:
    """Mean share of each query's true k nearest rows found among the index's first k."""
    return float(recall_per_query(found, truth, k).mean()) if len(truth) else 1.0


def lower_bound(per_query: np.ndarray) -> float:
    """The one-sided 95% lower prediction bound of the mean recall of as many new queries, from the
    tuning queries' spread: mean - 1.645 x sqrt(1/n + 1/n) standard deviations. The confidence bound
    of the true mean alone (1/n) let the 1M-row bench publish IVF-PQ at 0.9487 on 1000 fresh queries."""
    n = len(per_query)
    if n < 2:
        return float(per_query.mean()) if n else 1.0
    return float(per_query.mean() - CONFIDENCE_Z * per_query.std(ddof=1) * np.sqrt(2 / n))


def set_search_params(index: faiss.Index, params: dict) -> None:
    index = faiss.downcast_index(index)
    if "efSearch" in params:
        index.hnsw.efSearch = int(params["efSearch"])
    if "nprobe" in params:
        faiss.extract_index_ivf(index).nprobe = int(params["nprobe"])
    if "k_factor" in params:
        index.k_factor = float(params["k_factor"])


@dataclass
class Tuning:
    params: dict
    recall: float
    reached: bool
    queries: int
    latency_ms: float = 0.0  # median single-query search time, one thread (latencies_ms)
    recall_lower_bound: float | None = None  # what `reached` compares with the target


def latencies_ms(index: faiss.Index, queries: np.ndarray, threads: int = 1, k: int = RECALL_K) -> np.ndarray:
    """Each query's search time alone (a batch of one, k results) on `threads` FAISS threads."""
    threads_before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(threads)
    try:
        times = []
        for q in np.ascontiguousarray(queries, dtype=np.float32):
            started = time.perf_counter()
            index.search(q[None], k)
            times.append((time.perf_counter() - started) * 1000)
    finally:
        faiss.omp_set_num_threads(threads_before)
    return np.array(times)


def tune(index: faiss.Index, queries: np.ndarray, truth: np.ndarray,
         target_recall: float = DEFAULT_TARGET_RECALL) -> Tuning:
    """The cheapest search parameters reaching target_recall (module docstring) for queries whose
    exact top RECALL_K rows are `truth`; sets them on the index."""
    kind = kind_of(index)
    queries = np.ascontiguousarray(queries, dtype=np.float32)

    def measure(params: dict) -> float:  # the lower bound: a setting reaches the target when it does
        set_search_params(index, params)
        return lower_bound(recall_per_query(index.search(queries, RECALL_K)[1], truth))

    def smallest(name: str, lo: int, hi: int, fixed: dict) -> tuple[int, bool]:
        value = lo
        while measure({**fixed, name: value}) < target_recall:  # doubling, then bisection
            if value >= hi:
                return hi, False
            lo, value = value, min(2 * value, hi)
        while value - lo > 1:
            mid = (lo + value) // 2
            lo, value = (lo, mid) if measure({**fixed, name: mid}) >= target_recall else (mid, value)
        return value, True

    if kind == "flat":
        params, reached = {}, True
    elif kind == "hnsw":
        ef, reached = smallest("efSearch", 16, 4096, {})
        params = {"efSearch": ef}
    else:
        nlist = faiss.extract_index_ivf(index).nlist
        refine = isinstance(faiss.downcast_index(index), faiss.IndexRefine)
        fixed = {"k_factor": KF_MAX} if refine else {}
        nprobe, reached = smallest("nprobe", 1, nlist, fixed)
        if refine and reached:
            kf, _ = smallest("k_factor", 1, KF_MAX, {"nprobe": nprobe})
            nprobe, _ = smallest("nprobe", 1, nprobe, {"k_factor": kf})
            fixed = {"k_factor": kf}
        params = {"nprobe": nprobe, **fixed}
    set_search_params(index, params)
    found = index.search(queries, RECALL_K)[1]
    latency = float(np.median(latencies_ms(index, queries[:LATENCY_QUERIES]))) if len(queries) else 0.0
    per_query = recall_per_query(found, truth)
    recall, bound = (float(per_query.mean()) if len(per_query) else 1.0), lower_bound(per_query)
    reached = reached and bound >= target_recall
    if not reached:
        log.info("%s index reaches recall@%d %.3f (lower bound %.3f) < target %.3f even at %s", kind, RECALL_K,
                 recall, bound, target_recall, params)
    return Tuning(params, recall, reached, len(queries), latency, bound)


def query_rows(n: int, queries: int, seed: int) -> np.ndarray:
    """The seeded sample of rows held out as tuning queries (the same for every build of N rows);
    at most half the rows, so that a small index is mostly built before it is tuned."""
    return np.sort(np.random.default_rng(seed).choice(n, min(n // 2, queries), replace=False))


def train_rows(plan: Plan, seed: int, held_out: np.ndarray) -> np.ndarray:
    """The seeded sample of rows an IVF index (and its OPQ rotation) is trained on, none of them a
    held-out query row: centroids fitted to the tuning queries make recall look higher on them than
    new queries see (one query in six fell in the 156,000-row sample of a 1M-row IVF4000 build before)."""
    rest = rows_not_held_out(plan.n, held_out)
    count = min(plan.train_rows, len(rest))
    return np.sort(np.random.default_rng(seed + 1).choice(rest, count, replace=False))


def rows_not_held_out(n: int, held_out: np.ndarray) -> np.ndarray:
    rest = np.ones(n, bool)
    rest[held_out] = False
    return np.flatnonzero(rest)


def holdout_order(n: int, held_out: np.ndarray) -> np.ndarray:
    """Store rows in index order: every row but the held-out query rows, then those."""
    return np.concatenate([rows_not_held_out(n, held_out), np.asarray(held_out, dtype=np.int64)])


def holdout_truth(vectors: np.ndarray, held_out: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """The held-out query rows' exact top RECALL_K among the other rows, as index rows (the
    holdout_order numbering): the ground truth build_and_tune computes, for reuse across builds."""
    order = holdout_order(len(vectors), held_out)
    rest = len(vectors) - len(held_out)
    queries = np.ascontiguousarray(vectors[held_out], dtype=np.float32)
    heap = faiss.ResultHeap(len(queries), RECALL_K, keep_max=True)
    for start in range(0, rest, chunk):
        add_truth(heap, queries, np.ascontiguousarray(vectors[order[start:min(start + chunk, rest)]]), start)
    heap.finalize()
    return heap.I


def build_and_tune(plan: Plan, vectors: np.ndarray, held_out: np.ndarray,
                   target_recall: float = DEFAULT_TARGET_RECALL, seed: int = 0, trained: faiss.Index | None = None,
                   chunk: int = 65536, truth: np.ndarray | None = None
                   ) -> tuple[faiss.Index, faiss.Index | None, Tuning, np.ndarray]:
    """(index, trained or None, tuning, order): `vectors` indexed in holdout_order (order[r] is the
    input row of index row r), tuned on the held-out query rows before they were added. `truth`:
    holdout_truth(vectors, held_out), when already known (else found while adding)."""
    order = holdout_order(len(vectors), held_out)
    rest = len(vectors) - len(held_out)
    queries = np.ascontiguousarray(vectors[held_out], dtype=np.float32)
    if plan.kind in IVF_KINDS:
        trained = trained if trained is not None else train(plan, vectors[train_rows(plan, seed, held_out)])
        index = copy_index(trained)
    else:
        index = new_index(plan)
    heap = faiss.ResultHeap(len(queries), RECALL_K, keep_max=True) if truth is None else None
    for start in range(0, rest, chunk):  # in chunks: no second copy of the corpus
        part = vectors[order[start:min(start + chunk, rest)]]
        add_vectors(index, part, start)
        if heap is not None:
            add_truth(heap, queries, np.ascontiguousarray(part), start)
        log.info("%s: added %d/%d rows", plan.kind, start + len(part), len(vectors))
    if heap is not None:
        heap.finalize()
        truth = heap.I
    tuning = tune(index, queries, truth, target_recall)
    add_vectors(index, queries, rest)
    return index, trained, tuning, order
