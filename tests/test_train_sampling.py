"""Caption sampling of the training batches, and the contrastive loss with repeated captions."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from jobs.train_steps import contrastive_loss, same_caption
from jobs.train_data import PairBatches
from koclip.data.manifest import Item
from koclip.errors import UsageError

CAPTIONS = ("빨간 사과", "과일", "사과", "음식")


def batches(label_probability: float) -> PairBatches:
    records = [Item(id=str(i), uri="unused.png", captions=CAPTIONS) for i in range(4)]
    return PairBatches(records, config=None, tokenizer=None, batch_size=2, seed=0, label_probability=label_probability)


def drawn(label_probability: float, n: int = 4000) -> Counter:
    sampler = batches(label_probability)
    return Counter(sampler.caption(CAPTIONS, np.random.default_rng([0, i])) for i in range(n))


def test_uniform_sampling_draws_every_caption_alike():
    counts = drawn(0.0)
    assert set(counts) == set(CAPTIONS)
    for caption in CAPTIONS:  # 1000 expected each; 5 standard deviations is about 140
        assert abs(counts[caption] - 1000) < 150, counts


def test_label_probability_draws_the_first_caption_that_often_and_the_rest_alike():
    counts = drawn(0.5)
    assert abs(counts["빨간 사과"] - 2000) < 170, counts  # p = 0.5 of 4000
    for caption in CAPTIONS[1:]:  # the other half shared by three: 667 each
        assert abs(counts[caption] - 667) < 130, counts
    assert drawn(1.0, 200) == Counter({"빨간 사과": 200})


def test_one_caption_is_always_given_and_bad_probability_is_refused():
    sampler = batches(0.7)
    assert {sampler.caption(("하나",), np.random.default_rng(i)) for i in range(20)} == {"하나"}
    with pytest.raises(UsageError, match="label_probability"):
        batches(1.5)


def test_same_caption_compares_whole_token_rows():
    ids = np.array([[5, 6, 0], [5, 6, 0], [5, 7, 0], [5, 6, 1]])
    expected = np.array([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], bool)
    assert np.array_equal(np.asarray(same_caption(ids)), expected)


def _log_softmax(x, axis):
    x = x - x.max(axis=axis, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=axis, keepdims=True))


def test_repeated_captions_share_the_positive():
    logits = np.array([[3.0, 1.0, 0.0], [2.0, 2.5, -1.0], [0.5, 0.0, 4.0]], np.float32)
    # Distinct captions: the usual symmetric InfoNCE with the diagonal as the only positives.
    plain = -(np.diag(_log_softmax(logits, 1)).mean() + np.diag(_log_softmax(logits, 0)).mean()) / 2
    assert float(contrastive_loss(logits)) == pytest.approx(plain, rel=1e-5)
    assert float(contrastive_loss(logits, np.eye(3, dtype=bool))) == pytest.approx(plain, rel=1e-5)
    # Texts 0 and 1 are the same caption: each of them has images 0 and 1 as positives, half each.
    same = np.array([[1, 1, 0], [1, 1, 0], [0, 0, 1]], bool)
    targets = same / same.sum(1, keepdims=True)
    rows = -(targets * _log_softmax(logits, 1)).sum(1).mean()
    columns = -(targets * _log_softmax(logits, 0)).sum(0).mean()
    shared = float(contrastive_loss(logits, same))
    assert shared == pytest.approx((rows + columns) / 2, rel=1e-5)
    # Images 0 and 1 are interchangeable answers to that caption: swapping them changes nothing,
    # where the plain loss calls one of them wrong.
    swapped = logits[:, [1, 0, 2]]
    assert float(contrastive_loss(swapped, same)) == pytest.approx(shared, rel=1e-6)
    assert float(contrastive_loss(swapped)) != pytest.approx(plain, rel=1e-3)
