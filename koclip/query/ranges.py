"""What search(min_score=, dedup=) adds to a k search, on a loaded koclip.index.Index: a range
search (every row scoring >= a threshold) and clip_back's near-duplicate removal."""
from __future__ import annotations

import numpy as np


def range_rows(idx, vectors: np.ndarray, min_score: float, cap: int | None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per query, every row scoring >= min_score (at most `cap`, the best ones), best first."""
    queries = np.ascontiguousarray(vectors, dtype=np.float32)
    # faiss keeps scores strictly above the radius: ask for just below min_score, then keep >=
    radius = float(np.nextafter(np.float32(min_score), np.float32(-np.inf)))
    if not has_range_search(idx.faiss):
        return widening_range_rows(idx, queries, min_score, cap)
    limits, scores, rows = idx.faiss.range_search(queries, radius)
    out = []
    for i in range(len(queries)):
        s, r = scores[limits[i]:limits[i + 1]], rows[limits[i]:limits[i + 1]].astype(np.int64)
        keep = s >= min_score
        s, r = s[keep], r[keep]
        order = np.lexsort((r, -s))[:cap]  # best first; ties by row, as a k search orders them
        out.append((s[order].astype(np.float32), r[order]))
    return out


def has_range_search(index) -> bool:
    """Whether faiss's range_search answers for this index as its k search does: flat, HNSW and
    IVF do (behind an OPQ transform too); IndexRefine (ivfpq re-ranked) returns nothing."""
    import faiss

    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexPreTransform):
        index = faiss.downcast_index(index.index)
    return isinstance(index, (faiss.IndexFlat, faiss.IndexHNSW, faiss.IndexIVF))


def widening_range_rows(idx, queries: np.ndarray, min_score: float,
                        cap: int | None) -> list[tuple[np.ndarray, np.ndarray]]:
    """range_rows by k searches: k grows 4x until the k-th score is below min_score, the index
    is exhausted or `cap` rows are found."""
    total = len(idx)
    out = []
    for query in queries:
        k = min(total, cap or 64, 64) if total else 1
        while True:
            scores, rows = idx.search(query[None], max(1, k))
            s, r = scores[0], rows[0]
            valid = r >= 0
            complete = (not valid.all() or k >= total or (cap is not None and k >= cap)
                        or s[-1] < min_score)
            if complete:
                keep = valid & (s >= min_score)
                out.append((s[keep][:cap], r[keep][:cap]))
                break
            k = min(total, k * 4, cap if cap is not None else total)
    return out


def hit_vectors(idx, rows: np.ndarray) -> np.ndarray:
    """The L2-normalised vectors of `rows`, reconstructed from the faiss index (an IVF index gets
    its direct map made once, on first use)."""
    import faiss

    rows = np.asarray(rows, dtype=np.int64)
    if not len(rows):
        return np.zeros((0, int(idx.dim)), np.float32)
    try:
        vectors = idx.faiss.reconstruct_batch(rows)
    except RuntimeError:
        ivf = faiss.try_extract_index_ivf(idx.faiss)
        if ivf is None:
            raise
        ivf.make_direct_map()
        vectors = idx.faiss.reconstruct_batch(rows)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.where(norms > 0, norms, 1)).astype(np.float32)


def dedup_keep(vectors: np.ndarray, threshold: float) -> np.ndarray:
    """A bool mask over hits in rank order: True for the best-ranked hit of each group of hits
    linked by similarity >= threshold (clip_back's connected components)."""
    n = len(vectors)
    linked = (vectors @ vectors.T) >= threshold
    keep = np.zeros(n, dtype=bool)
    seen = np.zeros(n, dtype=bool)
    for first in range(n):  # each unseen hit starts a group: it is the best-ranked of it
        if seen[first]:
            continue
        keep[first] = True
        stack = [first]
        seen[first] = True
        while stack:
            node = stack.pop()
            fresh = np.flatnonzero(linked[node] & ~seen)
            seen[fresh] = True
            stack.extend(fresh.tolist())
    return keep
