"""Retrieval and zero-shot metrics over a similarity matrix (numpy only, pure functions).

Every metric here starts from the same quantity: for each query (a row of `sim [Q, N]`), the
1-based rank of its best-ranked relevant target when the N targets are sorted by similarity,
highest first. A query may have several relevant targets (a caption's images, an image's
captions); only the first one in the ranking counts.

Ties are broken deterministically and pessimistically: a relevant target that ties with
irrelevant ones ranks after all of them. So the rank of the first relevant target is

    rank = 1 + #{irrelevant j : sim[q, j] >= max over relevant r of sim[q, r]}

and a model that gives every target the same score (e.g. collapsed embeddings) ranks every
relevant target last, instead of getting credit for a lucky order.

`relevant` is given as one of
- a sequence of Q collections of target indices (several positives per query), or
- an int array [Q] (one positive per query, e.g. a label index), or
- a bool array [Q, N] (True where relevant).
Every query needs at least one relevant target.

`sim` is any [Q, N] array, or an object with `.shape` whose row slices `sim[a:b]` are arrays
(e.g. `DotProductSimilarity`), so large matrices never need to exist whole: queries are processed
in chunks of at most `max_elements` similarity values.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

# Similarity values processed at once (per chunk of queries); ~32 MB of float64 temporaries.
DEFAULT_MAX_ELEMENTS = 1 << 22


class DotProductSimilarity:
    """sim[i, j] = queries[i] . targets[j], computed one block of rows at a time.

    With L2-normalised embeddings this is the cosine similarity. Only row slices are supported.
    """

    def __init__(self, queries: np.ndarray, targets: np.ndarray):
        queries, targets = np.asarray(queries), np.asarray(targets)
        if queries.ndim != 2 or targets.ndim != 2 or queries.shape[1] != targets.shape[1]:
            raise ValueError(f"need [Q, D] and [N, D] embeddings, got {queries.shape} and {targets.shape}")
        self.queries, self.targets = queries, targets
        self.shape = (queries.shape[0], targets.shape[0])

    def __getitem__(self, rows: slice) -> np.ndarray:
        if not isinstance(rows, slice):
            raise TypeError("DotProductSimilarity supports row slices only")
        return self.queries[rows] @ self.targets.T


def _as_csr(relevant, num_queries: int, num_targets: int) -> tuple[np.ndarray, np.ndarray] | np.ndarray:
    """Normalise `relevant` to (indptr [Q+1], indices) or, for a bool matrix, the matrix itself."""
    if isinstance(relevant, np.ndarray) and relevant.dtype == bool:
        if relevant.shape != (num_queries, num_targets):
            raise ValueError(f"relevance mask has shape {relevant.shape}, sim has {(num_queries, num_targets)}")
        empty = np.flatnonzero(~relevant.any(axis=1))
        if empty.size:
            raise ValueError(f"query {int(empty[0])} has no relevant target")
        return relevant
    if isinstance(relevant, np.ndarray) and relevant.ndim == 1 and np.issubdtype(relevant.dtype, np.integer):
        groups: Sequence[Iterable[int]] = [[int(i)] for i in relevant]
    else:
        groups = list(relevant)
    if len(groups) != num_queries:
        raise ValueError(f"{len(groups)} relevance sets for {num_queries} queries")
    counts = np.zeros(num_queries + 1, dtype=np.int64)
    flat: list[int] = []
    for q, group in enumerate(groups):
        members = sorted({int(i) for i in group})
        if not members:
            raise ValueError(f"query {q} has no relevant target")
        if members[0] < 0 or members[-1] >= num_targets:
            raise ValueError(f"query {q} names target {members[0] if members[0] < 0 else members[-1]}, "
                             f"outside 0..{num_targets - 1}")
        counts[q + 1] = len(members)
        flat.extend(members)
    return np.cumsum(counts), np.asarray(flat, dtype=np.int64)


def _mask_rows(relevant, start: int, stop: int, num_targets: int) -> np.ndarray:
    if isinstance(relevant, np.ndarray):
        return relevant[start:stop]
    indptr, indices = relevant
    mask = np.zeros((stop - start, num_targets), dtype=bool)
    lengths = np.diff(indptr[start:stop + 1])
    rows = np.repeat(np.arange(stop - start), lengths)
    mask[rows, indices[indptr[start]:indptr[stop]]] = True
    return mask


def first_relevant_ranks(sim, relevant, max_elements: int = DEFAULT_MAX_ELEMENTS) -> np.ndarray:
    """1-based rank of each query's best-ranked relevant target, ties pessimistic: int64 [Q]."""
    if len(sim.shape) != 2:
        raise ValueError(f"sim must be [Q, N], got shape {tuple(sim.shape)}")
    num_queries, num_targets = sim.shape
    if num_queries == 0 or num_targets == 0:
        raise ValueError(f"sim has shape {tuple(sim.shape)}: no queries or no targets")
    relevant = _as_csr(relevant, num_queries, num_targets)
    chunk = max(1, max_elements // num_targets)
    ranks = np.empty(num_queries, dtype=np.int64)
    for start in range(0, num_queries, chunk):
        stop = min(start + chunk, num_queries)
        scores = np.asarray(sim[start:stop], dtype=np.float64)
        if np.isnan(scores).any():
            raise ValueError("sim contains NaN")
        mask = _mask_rows(relevant, start, stop, num_targets)
        best_relevant = np.where(mask, scores, -np.inf).max(axis=1, keepdims=True)
        ahead = (scores >= best_relevant) & ~mask  # irrelevant targets ranked before it (ties included)
        ranks[start:stop] = 1 + ahead.sum(axis=1)
    return ranks


def _check_k(k: int) -> int:
    if int(k) != k or k < 1:
        raise ValueError(f"k must be a positive integer, got {k}")
    return int(k)


def mrr_from_ranks(ranks: np.ndarray, k: int) -> float:
    """Mean of 1/rank where rank <= k, else 0."""
    k = _check_k(k)
    ranks = np.asarray(ranks)
    return float(np.where(ranks <= k, 1.0 / ranks, 0.0).mean())


def recall_from_ranks(ranks: np.ndarray, k: int) -> float:
    """Fraction of queries whose first relevant target is in the top k."""
    k = _check_k(k)
    return float((np.asarray(ranks) <= k).mean())


def mrr_at_k(sim, relevant, k: int, max_elements: int = DEFAULT_MAX_ELEMENTS) -> float:
    """Mean reciprocal rank of the first relevant target, counted 0 beyond rank k."""
    return mrr_from_ranks(first_relevant_ranks(sim, relevant, max_elements), k)


def recall_at_k(sim, relevant, k: int, max_elements: int = DEFAULT_MAX_ELEMENTS) -> float:
    """Fraction of queries with at least one relevant target in the top k."""
    return recall_from_ranks(first_relevant_ranks(sim, relevant, max_elements), k)


def accuracy_at_k(sim, labels, k: int, max_elements: int = DEFAULT_MAX_ELEMENTS) -> float:
    """Zero-shot top-k accuracy: sim [images, labels] (image vs label-prompt embeddings), `labels`
    the correct label index per image (int array [Q]) or a collection of acceptable ones per image.
    """
    return recall_at_k(sim, labels, k, max_elements)


def random_mrr_at_k(n: int, k: int) -> float:
    """Expected MRR@k of a uniformly random ranking of n targets with one relevant among them.

    The relevant target is at each rank 1..n with probability 1/n, so the expectation is
    (1/n) * sum_{r=1..min(k, n)} 1/r.
    """
    k = _check_k(k)
    if int(n) != n or n < 1:
        raise ValueError(f"n must be a positive integer, got {n}")
    n = int(n)
    return float(np.sum(1.0 / np.arange(1, min(k, n) + 1)) / n)
