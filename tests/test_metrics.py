"""koclip.metrics on small matrices whose ranks are worked out by hand in each test."""
from __future__ import annotations

import numpy as np
import pytest

from koclip.metrics import (
    DotProductSimilarity,
    accuracy_at_k,
    first_relevant_ranks,
    mrr_at_k,
    random_mrr_at_k,
    recall_at_k,
)

# Three queries over three targets, one relevant target each.
SIM = np.array([
    [0.9, 0.1, 0.5],  # relevant 0: highest -> rank 1
    [0.2, 0.3, 0.8],  # relevant 0: below 0.3 and 0.8 -> rank 3
    [0.1, 0.7, 0.6],  # relevant 2: below 0.7 -> rank 2
])
RELEVANT = [[0], [0], [2]]


def test_ranks_of_single_positives():
    assert first_relevant_ranks(SIM, RELEVANT).tolist() == [1, 3, 2]


@pytest.mark.parametrize("k, mrr, recall", [
    (1, (1 + 0 + 0) / 3, 1 / 3),
    (2, (1 + 0 + 1 / 2) / 3, 2 / 3),
    (3, (1 + 1 / 3 + 1 / 2) / 3, 1.0),
])
def test_mrr_and_recall_single_positives(k, mrr, recall):
    assert mrr_at_k(SIM, RELEVANT, k) == pytest.approx(mrr)
    assert recall_at_k(SIM, RELEVANT, k) == pytest.approx(recall)


def test_k_larger_than_the_number_of_targets():
    assert mrr_at_k(SIM, RELEVANT, 100) == pytest.approx((1 + 1 / 3 + 1 / 2) / 3)
    assert recall_at_k(SIM, RELEVANT, 100) == 1.0


def test_several_positives_count_the_first_one_only():
    sim = np.array([
        [0.9, 0.2, 0.8, 0.7, 0.1],  # relevant {1, 3}: best is 3 (0.7), behind 0.9 and 0.8 -> rank 3
        [0.1, 0.2, 0.3, 0.4, 0.5],  # relevant {0, 4}: 4 is the top -> rank 1
    ])
    relevant = [{1, 3}, [4, 0]]
    assert first_relevant_ranks(sim, relevant).tolist() == [3, 1]
    assert mrr_at_k(sim, relevant, 5) == pytest.approx((1 / 3 + 1) / 2)
    assert mrr_at_k(sim, relevant, 2) == pytest.approx((0 + 1) / 2)
    assert recall_at_k(sim, relevant, 2) == pytest.approx(1 / 2)
    assert recall_at_k(sim, relevant, 3) == 1.0


def test_ties_are_pessimistic_and_deterministic():
    sim = np.array([
        [0.5, 0.5, 0.5, 0.1],  # relevant 1 ties with irrelevant 0 and 2 -> after both: rank 3
        [0.3, 0.3, 0.3, 0.3],  # all equal, relevant 3 -> last: rank 4
        [0.5, 0.5, 0.2, 0.1],  # relevant {0, 1} tie only with each other -> rank 1
        [0.5, 0.5, 0.5, 0.9],  # relevant {0, 1} tie with irrelevant 2, behind 3 -> rank 3
    ])
    relevant = [[1], [3], [0, 1], [0, 1]]
    for _ in range(2):
        assert first_relevant_ranks(sim, relevant).tolist() == [3, 4, 1, 3]
    assert mrr_at_k(sim, relevant, 1) == pytest.approx(1 / 4)
    assert mrr_at_k(sim, relevant, 4) == pytest.approx((1 / 3 + 1 / 4 + 1 + 1 / 3) / 4)


def test_relevance_as_int_array_and_as_mask_agree_with_lists():
    labels = np.array([0, 0, 2])
    mask = np.zeros((3, 3), bool)
    mask[[0, 1, 2], [0, 0, 2]] = True
    for relevant in (labels, mask):
        assert first_relevant_ranks(SIM, relevant).tolist() == [1, 3, 2]


def test_zero_shot_accuracy():
    # 4 images x 3 label prompts.
    sim = np.array([
        [0.9, 0.1, 0.0],  # label 0: top-1
        [0.8, 0.7, 0.1],  # label 1: second
        [0.2, 0.1, 0.3],  # label 1: third
        [0.0, 0.0, 0.0],  # label 2: all tied -> last (third)
    ])
    labels = np.array([0, 1, 1, 2])
    assert accuracy_at_k(sim, labels, 1) == pytest.approx(1 / 4)
    assert accuracy_at_k(sim, labels, 2) == pytest.approx(2 / 4)
    assert accuracy_at_k(sim, labels, 5) == 1.0
    # An image may accept several labels.
    assert accuracy_at_k(sim, [[0], [1, 0], [1], [2]], 1) == pytest.approx(2 / 4)


def test_chunked_and_lazy_similarity_match_the_dense_matrix():
    rng = np.random.default_rng(0)
    queries = rng.normal(size=(37, 8)).astype(np.float32)
    targets = rng.normal(size=(23, 8)).astype(np.float32)
    relevant = [rng.choice(23, size=rng.integers(1, 4), replace=False) for _ in range(37)]
    dense = first_relevant_ranks(queries @ targets.T, relevant)
    chunked = first_relevant_ranks(queries @ targets.T, relevant, max_elements=50)  # 2 rows per chunk
    lazy = first_relevant_ranks(DotProductSimilarity(queries, targets), relevant, max_elements=1)
    assert dense.tolist() == chunked.tolist() == lazy.tolist()
    # Brute force from the definition: 1 + irrelevant targets scoring >= the best relevant one.
    sim = queries @ targets.T
    for q, rel in enumerate(relevant):
        best = sim[q, rel].max()
        others = np.delete(sim[q], rel)
        assert dense[q] == 1 + int((others >= best).sum())


def test_random_mrr_by_hand():
    assert random_mrr_at_k(4, 2) == pytest.approx((1 + 1 / 2) / 4)
    assert random_mrr_at_k(3, 10) == pytest.approx((1 + 1 / 2 + 1 / 3) / 3)
    assert random_mrr_at_k(1, 1) == 1.0


def test_random_mrr_matches_monte_carlo():
    n, k, trials = 50, 10, 20000
    rng = np.random.default_rng(1234)
    expected = random_mrr_at_k(n, k)
    # Random permutations: the relevant item (0) lands at a uniform rank.
    ranks = np.argsort(rng.random((trials, n)), axis=1).argmin(axis=1) + 1
    simulated = np.where(ranks <= k, 1.0 / ranks, 0.0).mean()
    # Standard error is about 0.0012 here; 0.005 is ~4 of them.
    assert simulated == pytest.approx(expected, abs=0.005)
    # And the metric itself on random scores (ties have probability 0).
    assert mrr_at_k(rng.random((trials, n)), np.zeros(trials, int), k) == pytest.approx(expected, abs=0.005)


@pytest.mark.parametrize("relevant, match", [
    ([[0], [], [1]], "no relevant"),
    ([[0], [3], [1]], "outside"),
    ([[0], [1]], "relevance sets"),
])
def test_bad_relevance_is_rejected(relevant, match):
    with pytest.raises(ValueError, match=match):
        first_relevant_ranks(SIM, relevant)


def test_bad_k_and_nan_are_rejected():
    with pytest.raises(ValueError, match="k must be"):
        mrr_at_k(SIM, RELEVANT, 0)
    with pytest.raises(ValueError, match="n must be"):
        random_mrr_at_k(0, 10)
    with pytest.raises(ValueError, match="NaN"):
        recall_at_k(np.array([[np.nan, 0.0]]), [[0]], 1)
