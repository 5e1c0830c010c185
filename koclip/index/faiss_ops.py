"""Operations on FAISS indexes that faiss does not offer as one call: a new or trained index for a
plan, appending rows under explicit ids, removing rows with renumbering, copying, and moving an
on-disk index into memory. Row numbers are faiss ids: an index holds rows 0..N-1.
"""
from __future__ import annotations

import logging
import time

import faiss
import numpy as np

from koclip.index.plan import HNSW_EF_CONSTRUCTION, HNSW_M, RECALL_K, Plan, kind_of

log = logging.getLogger("koclip.index")


def new_index(plan: Plan) -> faiss.Index:
    """An empty index for the plan (the IVF kinds still untrained)."""
    if plan.kind == "flat":
        return faiss.IndexFlatIP(plan.dim)
    if plan.kind == "hnsw":
        index = faiss.IndexHNSWFlat(plan.dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        return index
    index = faiss.index_factory(plan.dim, plan.factory, faiss.METRIC_INNER_PRODUCT)
    if plan.kind != "ivfpq":  # ivfflat, ivfsq8: nothing more to set
        return index
    base = ivf_part(index)
    opq = faiss.downcast_VectorTransform(base.chain.at(0))
    opq.niter, opq.max_train_points = 25, 32768  # faiss: 50 / 65536
    # index_factory turns on polysemous training (a code reordering for Hamming pre-filtering,
    # which we never search with); it is slower than the PQ training itself
    faiss.downcast_index(base.index).do_polysemous_training = False
    return index


def train(plan: Plan, sample: np.ndarray, centroids: np.ndarray | None = None) -> faiss.Index:
    """A trained, empty IVF index (ivfflat, ivfsq8, ivfpq; flat and hnsw need no training).

    `centroids` (ivfflat, ivfsq8): the coarse quantizer's centroids of an index trained before
    with the same nlist (coarse_centroids), so that k-means runs once for both kinds; faiss skips
    the quantizer's training when it already holds nlist centroids."""
    index = new_index(plan)
    started = time.perf_counter()
    if centroids is not None and plan.kind in ("ivfflat", "ivfsq8"):
        faiss.extract_index_ivf(index).quantizer.add(np.ascontiguousarray(centroids, dtype=np.float32))
    index.train(np.ascontiguousarray(sample, dtype=np.float32))
    log.info("trained %s on %d rows in %.1fs", plan.factory, len(sample), time.perf_counter() - started)
    return index


def coarse_centroids(index: faiss.Index) -> np.ndarray:
    """The centroids of an IVF index's coarse quantizer, float32 [nlist, D] (in OPQ's rotated
    space for ivfpq)."""
    ivf = faiss.extract_index_ivf(index)
    return ivf.quantizer.reconstruct_n(0, ivf.nlist)


def ivf_part(index: faiss.Index) -> faiss.Index:
    """The IVF part of an IVF index: for ivfpq its OPQ+IVF-PQ (the base of its Refine, if any),
    for ivfflat and ivfsq8 the index itself."""
    index = faiss.downcast_index(index)
    return faiss.downcast_index(index.base_index) if isinstance(index, faiss.IndexRefine) else index


def add_vectors(index: faiss.Index, vectors: np.ndarray, start: int) -> None:
    """Append rows start, start+1, ... (IVF kinds: ids given explicitly, so shards can be added apart)."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if not isinstance(faiss.downcast_index(index), (faiss.IndexRefine, faiss.IndexPreTransform, faiss.IndexIVF)):
        index.add(vectors)
        return
    index = faiss.downcast_index(index)
    base = ivf_part(index)
    base.add_with_ids(vectors, np.arange(start, start + len(vectors), dtype=np.int64))
    if isinstance(index, faiss.IndexRefine):
        faiss.downcast_index(index.refine_index).add(vectors)
        index.ntotal = base.ntotal


def copy_index(index: faiss.Index) -> faiss.Index:
    return faiss.deserialize_index(faiss.serialize_index(index))


def exact_neighbours(queries: np.ndarray, vectors: np.ndarray, k: int = RECALL_K) -> np.ndarray:
    """The rows of the k vectors with the largest inner product with each query (-1 past the end)."""
    return faiss.knn(np.ascontiguousarray(queries), np.ascontiguousarray(vectors), k,
                     metric=faiss.METRIC_INNER_PRODUCT)[1]


def add_truth(heap: faiss.ResultHeap, queries: np.ndarray, vectors: np.ndarray, start: int) -> None:
    """Offer rows start.. (`vectors`) to the queries' exact top-k heap (faiss.ResultHeap, max IP)."""
    if len(vectors) and len(queries):
        scores, rows = faiss.knn(queries, vectors, min(len(vectors), RECALL_K), metric=faiss.METRIC_INNER_PRODUCT)
        heap.add_result(scores, np.where(rows >= 0, rows + start, -1))


def remove_rows(index: faiss.Index, removed: np.ndarray) -> None:
    """Drop the rows where `removed` is True and renumber the others 0..n-1, keeping their order
    (flat: faiss compacts itself; the IVF kinds: the inverted lists' ids are rewritten). Not for hnsw."""
    gone = np.flatnonzero(removed).astype(np.int64)
    if not len(gone):
        return
    index = faiss.downcast_index(index)
    if kind_of(index) == "hnsw":
        raise ValueError("HNSW indexes cannot remove vectors; rebuild them")
    selector = faiss.IDSelectorBatch(gone)
    if kind_of(index) == "flat":
        index.remove_ids(selector)
        return
    from faiss.contrib.inspect_tools import get_invlist

    base = ivf_part(index)
    base.remove_ids(selector)
    new_ids = np.cumsum(~np.asarray(removed, bool)) - 1  # old row -> new row, for kept rows
    invlists = faiss.extract_index_ivf(base).invlists
    for list_no in range(invlists.nlist):
        size = invlists.list_size(list_no)
        if size:
            ids, codes = get_invlist(invlists, list_no)
            fresh = np.ascontiguousarray(new_ids[ids], dtype=np.int64)
            invlists.update_entries(list_no, 0, size, faiss.swig_ptr(fresh), faiss.swig_ptr(codes))
    if isinstance(index, faiss.IndexRefine):
        faiss.downcast_index(index.refine_index).remove_ids(selector)
        index.ntotal = base.ntotal


def in_memory(index: faiss.Index) -> faiss.Index:
    """An IVF index whose inverted lists live on disk (the distributed build's layout), with its
    lists copied into memory so it can be changed and serialised as one file."""
    from faiss.contrib.inspect_tools import get_invlist

    ivf = faiss.extract_index_ivf(index)
    if isinstance(faiss.downcast_InvertedLists(ivf.invlists), faiss.ArrayInvertedLists):
        return index
    lists = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
    for list_no in range(ivf.nlist):
        if ivf.invlists.list_size(list_no):
            ids, codes = get_invlist(ivf.invlists, list_no)
            lists.add_entries(list_no, len(ids), faiss.swig_ptr(ids), faiss.swig_ptr(codes))
    ivf.replace_invlists(lists, True)
    lists.this.disown()
    return index
