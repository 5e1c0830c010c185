"""koclip.query.search's range search (min_score) and near-duplicate removal (dedup), on real
FAISS indexes built by koclip.index from a real Parquet store; vector queries, so no model.

Exactness is checked against numpy's brute force (what a flat index must return exactly); the
approximate kinds must return only true hits and nearly all of them.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

from koclip import query
from koclip.index import build_index, load_index
from koclip.query import ranges
from koclip.store import Row, rows_to_table, write_shard

DIM = 16


def unit_rows(n: int, seed: int) -> np.ndarray:
    """n unit vectors in loose clusters, so a threshold cuts at varied depths."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(12, DIM))
    x = centres[rng.integers(0, 12, n)] + 0.6 * rng.normal(size=(n, DIM))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def write_store(root: str, vectors: np.ndarray) -> str:
    rows = [Row(f"item{i}", f"/images/{i}.png", "0" * 64, 8, 8, [f"그림 {i}"], v, v[None], "train")
            for i, v in enumerate(vectors)]
    for s, part in enumerate(np.array_split(np.arange(len(rows)), 2)):
        write_shard(os.path.join(root, f"shard-{s:05d}.parquet"),
                    rows_to_table([rows[i] for i in part], "model-a", {"projection_dim": DIM}, DIM))
    return root


@pytest.fixture(scope="module")
def corpus():
    return unit_rows(2500, seed=0)


@pytest.fixture(scope="module")
def indexes(tmp_path_factory, corpus):
    store = write_store(str(tmp_path_factory.mktemp("store")), corpus)
    out = {}
    for kind in ("flat", "hnsw", "ivfpq"):
        root = str(tmp_path_factory.mktemp("index") / kind)
        build_index(store, root, kind=kind, queries=200)
        out[kind] = load_index(root)
    return out


def exact_range(index, corpus: np.ndarray, q: np.ndarray, min_score: float) -> tuple[list[str], np.ndarray]:
    """The ids scoring >= min_score, best first (ties by id order of the index), by numpy."""
    by_id = {f"item{i}": v for i, v in enumerate(corpus)}
    vectors = np.stack([by_id[i] for i in index.ids])  # in the index's row order
    scores = vectors @ q
    order = np.lexsort((np.arange(len(scores)), -scores))
    order = order[scores[order] >= min_score]
    return [index.ids[r] for r in order], scores[order]


@pytest.mark.parametrize("min_score", [0.95, 0.8, 0.5])
def test_range_search_on_a_flat_index_is_exact(indexes, corpus, min_score):
    index = indexes["flat"]
    queries = np.concatenate([corpus[:10], unit_rows(10, seed=1)])  # inside the clusters and between them
    results = query.search(queries, k=None, index=index, min_score=min_score)
    for q, hits in zip(queries, results):
        ids, scores = exact_range(index, corpus, q, min_score)
        assert {h.id for h in hits} == set(ids)
        np.testing.assert_allclose(sorted((h.score for h in hits), reverse=True), scores, atol=1e-5)
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
        assert [h.rank for h in hits] == list(range(1, len(hits) + 1))
        assert all(h.score >= min_score for h in hits)


def test_range_search_with_a_cap_gives_the_best_ones(indexes, corpus):
    index = indexes["flat"]
    q = corpus[3]
    everything = query.search(q, k=None, index=index, min_score=0.5)
    assert len(everything) > 30
    capped = query.search(q, k=7, index=index, min_score=0.5)
    assert [h.id for h in capped] == [h.id for h in everything[:7]]
    plain = query.search(q, k=7, index=index)
    assert [h.id for h in capped] == [h.id for h in plain]
    assert query.search(q, k=None, index=index, min_score=1.5) == []


def test_widening_k_equals_faiss_range_search(indexes, corpus):
    index = indexes["flat"]
    queries = unit_rows(10, seed=2)
    for min_score, cap in ((0.9, None), (0.5, None), (0.5, 100), (0.2, None)):
        by_range = ranges.range_rows(index, queries, min_score, cap)
        by_widening = ranges.widening_range_rows(index, queries, min_score, cap)
        for (s1, r1), (s2, r2) in zip(by_range, by_widening):
            assert list(r1) == list(r2)
            np.testing.assert_allclose(s1, s2, atol=1e-6)
    # a threshold every row passes: the widening reaches the whole index
    (scores, rows), = ranges.widening_range_rows(index, queries[:1], -2.0, None)
    assert len(rows) == len(index) and len(set(rows.tolist())) == len(index)


@pytest.mark.parametrize("kind, tolerance", [("hnsw", 1e-5), ("ivfpq", 0.03)])
def test_range_search_on_approximate_kinds_finds_only_true_hits(indexes, corpus, kind, tolerance):
    # hnsw holds the vectors as they are; ivfpq re-ranks with 8-bit copies, so its scores, and
    # what passes the threshold, are approximate by that much
    index = indexes[kind]
    found = wanted = 0
    for q in corpus[100:120]:
        hits = query.search(q, k=None, index=index, min_score=0.8)
        ids, _ = exact_range(index, corpus, q, 0.8)
        near, _ = exact_range(index, corpus, q, 0.8 - tolerance)
        assert {h.id for h in hits} <= set(near) and all(h.score >= 0.8 for h in hits)
        found, wanted = found + len(set(ids) & {h.id for h in hits}), wanted + len(ids)
    assert wanted > 100 and found >= 0.9 * wanted


def test_dedup_links_groups_as_clip_back(tmp_path):
    # a chain a ~ b ~ c (a and c not similar), d apart, e nearly d: clip_back's connected
    # components keep a and d only
    a = np.zeros(DIM, np.float32)
    a[0] = 1
    b = np.zeros(DIM, np.float32)
    b[[0, 1]] = [np.cos(0.3), np.sin(0.3)]
    c = np.zeros(DIM, np.float32)
    c[[0, 1]] = [np.cos(0.6), np.sin(0.6)]
    d = np.zeros(DIM, np.float32)
    d[[0, 2]] = [0.5, np.sqrt(0.75)]
    e = d + 0.05 * np.eye(DIM, dtype=np.float32)[3]  # nearly d, ranked just below it
    vectors = np.stack([a, b, c, d, e / np.linalg.norm(e)])
    assert vectors[0] @ vectors[1] > 0.94 and vectors[1] @ vectors[2] > 0.94 and vectors[0] @ vectors[2] < 0.94
    assert list(ranges.dedup_keep(vectors, 0.94)) == [True, False, False, True, False]

    root = str(tmp_path / "dup")
    build_index(write_store(str(tmp_path / "store"), vectors), root, kind="flat")
    index = load_index(root)
    hits = query.search(a, k=5, index=index, dedup=0.94)
    assert [h.id for h in hits] == ["item0", "item3"] and [h.rank for h in hits] == [1, 2]
    assert len(query.search(a, k=5, index=index)) == 5
    assert [h.id for h in query.search(a, k=5, index=index, dedup=1.01)] == [f"item{i}" for i in (0, 1, 2, 3, 4)]


@pytest.mark.parametrize("kind, tolerance", [("flat", 1e-5), ("hnsw", 1e-5), ("ivfpq", 0.03)])
def test_dedup_keeps_no_two_similar_hits(indexes, corpus, kind, tolerance):
    # the vectors are reconstructed from the index: ivfpq's from its 8-bit copies
    index = indexes[kind]
    by_id = {f"item{i}": v for i, v in enumerate(corpus)}
    for q in unit_rows(5, seed=4):
        plain = query.search(q, k=60, index=index)
        deduped = query.search(q, k=60, index=index, dedup=0.9, min_score=None)
        kept = np.stack([by_id[h.id] for h in deduped])
        similarity = kept @ kept.T
        assert (similarity[~np.eye(len(kept), dtype=bool)] < 0.9 + tolerance).all()
        assert [h.id for h in deduped] == [h.id for h in plain if h.id in {x.id for x in deduped}]
        dropped = [h for h in plain if h.id not in {x.id for x in deduped}]
        assert dropped and all((np.stack([by_id[h.id] for h in plain]) @ by_id[x.id] >= 0.9 - tolerance).sum() >= 2
                               for x in dropped)  # each dropped hit is linked to another hit
        assert deduped[0].id == plain[0].id


def test_min_score_and_dedup_together_and_bad_values(indexes, corpus):
    index = indexes["flat"]
    q = corpus[10]
    both = query.search(q, k=None, index=index, min_score=0.6, dedup=0.9)
    ranged = query.search(q, k=None, index=index, min_score=0.6)
    keep = ranges.dedup_keep(np.stack([corpus[int(h.id[4:])] for h in ranged]), 0.9)
    assert [h.id for h in both] == [h.id for h, k in zip(ranged, keep) if k]
    for bad in ({"k": None}, {"k": 0, "min_score": 0.5}, {"min_score": "0.5"}, {"min_score": float("nan")},
                {"dedup": True}, {"dedup": float("inf")}):
        with pytest.raises(query.QueryError, match="must be"):
            query.search(q, index=index, **{"k": 10, **bad})
