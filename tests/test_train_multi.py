"""Several captions per image in one step: the packed text rows, the multi-positive loss, training."""
from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest
from PIL import Image

from jobs.presets import EVERYTHING, PROJECTIONS, Phase, TrainConfig, tiny_model
from jobs.train import train
from jobs.train_steps import contrastive_loss, multi_positive_loss, same_caption
from jobs.train_data import PairBatches
from koclip.config import tiny_config
from koclip.data.manifest import Item, write_manifest
from koclip.errors import UsageError

ITEMS = [
    ("빨간 사과", "과일", "사과", "음식"),
    ("강아지 얼굴", "강아지", "동물"),
    ("고양이 얼굴", "고양이", "동물", "애완동물", "새끼 고양이"),
    ("하늘을 나는 비행기 그림 하나 둘 셋 넷 다섯",),
]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    root = tmp_path_factory.mktemp("multi")
    rng = np.random.default_rng(0)
    records = []
    for i, captions in enumerate(ITEMS * 2):  # 8 images; the second four repeat the captions
        array = np.zeros((40, 40, 3), np.uint8) + rng.integers(0, 255, 3, dtype=np.uint8)
        array[i * 4:(i + 1) * 4] = 255 - array[0, 0]
        Image.fromarray(array).save(root / f"{i}.png")
        records.append(Item(id=str(i), uri=str(root / f"{i}.png"), captions=captions, split="train", group=str(i)))
    path = str(root / "manifest.jsonl")
    write_manifest(path, records)
    return path


@pytest.fixture(scope="module")
def tokenizer():
    from jobs.presets import SHIPPED_KOREAN_VOCAB
    from koclip.processing import load_tokenizer

    return load_tokenizer(SHIPPED_KOREAN_VOCAB)  # the demo's: knows these Korean words


def batches(manifest, tokenizer, **kwargs) -> PairBatches:
    from koclip.data.manifest import read_manifest

    return PairBatches(read_manifest(manifest), tiny_config(), tokenizer, batch_size=4, seed=0,
                       augment_images=False, **kwargs)


def rows_of(b: PairBatches, step: int):
    ids_s, mask_s, ids_l, mask_l, pixels, positives, valid = b.multi_batch(step)
    texts = [b.tokenizer.decode(row[m.astype(bool)], skip_special_tokens=True).replace(" ", "")
             for ids, mask in ((ids_s, mask_s), (ids_l, mask_l)) for row, m in zip(ids, mask)]
    return texts, ids_s, ids_l, pixels, positives, valid


def owners(b: PairBatches, step: int) -> list[tuple[str, ...]]:
    epoch, position = divmod(step, b.steps_per_epoch)
    order = b.order(epoch)[position * b.batch_size:(position + 1) * b.batch_size]
    return [b.records[int(i)].captions for i in order]


def test_every_caption_of_every_image_is_a_row_and_shared_texts_are_positives_of_both(manifest, tokenizer):
    b = batches(manifest, tokenizer, captions_per_image=0, text_rows=32)
    texts, ids_s, ids_l, pixels, positives, valid = rows_of(b, 0)
    images = owners(b, 0)
    assert pixels.shape[0] == 4 and positives.shape == (32, 4) and valid.shape == (32,)
    assert ids_s.shape[0] == 28 and ids_l.shape[0] == 4  # 1/8 of the rows in the long chunk
    assert ids_s.shape[1] == 8  # the short captions fit 8 positions
    wanted = sorted(c.replace(" ", "") for captions in images for c in captions)
    assert sorted(t for t, v in zip(texts, valid) if v) == wanted
    assert not any(t for t, v in zip(texts, valid) if not v)  # padding rows are blank
    for row, text in enumerate(texts):
        if valid[row]:
            expected = [j for j, captions in enumerate(images) if text in {c.replace(" ", "") for c in captions}]
            assert np.flatnonzero(positives[row]).tolist() == expected, text
        else:
            assert not positives[row].any()
    again = rows_of(b, 0)
    assert all(np.array_equal(x, y) for x, y in zip(again[1:], (ids_s, ids_l, pixels, positives, valid)))


def test_an_overfull_batch_drops_keywords_never_labels_and_k_caps_each_image(manifest, tokenizer):
    b = batches(manifest, tokenizer, captions_per_image=0, text_rows=8)
    for step in range(4):
        texts, *_, valid = rows_of(b, step)
        images = owners(b, step)
        assert valid.all()  # 13 or more captions into 8 rows: full
        for captions in images:
            assert captions[0].replace(" ", "") in texts
    capped = batches(manifest, tokenizer, captions_per_image=2, text_rows=16)
    for step in range(4):
        texts, *_, valid = rows_of(capped, step)
        images = owners(capped, step)
        assert int(valid.sum()) == sum(min(2, len(c)) for c in images)
        assert all(c[0].replace(" ", "") in texts for c in images)
    with pytest.raises(UsageError, match="text_rows"):
        batches(manifest, tokenizer, captions_per_image=0, text_rows=12)


def test_one_caption_per_image_packed_draws_as_the_plain_batches_do(manifest, tokenizer):
    packed = batches(manifest, tokenizer, captions_per_image=1, text_rows=8)
    plain = batches(manifest, tokenizer)
    assert packed.multi and not plain.multi
    for step in range(3):
        texts, *_, valid = rows_of(packed, step)
        ids, mask, _ = plain.batch(step)
        drawn = [tokenizer.decode(row[m.astype(bool)], skip_special_tokens=True).replace(" ", "")
                 for row, m in zip(ids, mask)]
        assert int(valid.sum()) == 4 and sorted(t for t, v in zip(texts, valid) if v) == sorted(drawn)


def _log_softmax(x, axis):
    x = x - x.max(axis=axis, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=axis, keepdims=True))


def test_one_caption_per_image_is_the_plain_loss_and_padding_rows_count_for_nothing():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 4)).astype(np.float32) * 3
    ids = np.array([[5, 6], [5, 7], [5, 6], [8, 9]])
    same = np.asarray(same_caption(ids))
    expected = float(contrastive_loss(logits, same))
    assert float(multi_positive_loss(logits, same, np.ones(4, bool))) == pytest.approx(expected, rel=1e-5)
    padded = np.concatenate([logits, rng.normal(size=(3, 4)).astype(np.float32) * 5])
    positives = np.concatenate([same, rng.random((3, 4)) < 0.5])
    valid = np.array([True] * 4 + [False] * 3)
    assert float(multi_positive_loss(padded, positives, valid)) == pytest.approx(expected, rel=1e-5)


def test_an_image_spreads_its_target_over_its_captions():
    # Image 0 has texts 0 and 1, image 1 has text 2: image 0's best is equal logits on its two.
    positives = np.array([[1, 0], [1, 0], [0, 1]], bool)
    valid = np.ones(3, bool)
    even = np.array([[5.0, 0.0], [5.0, 0.0], [0.0, 5.0]], np.float32)
    skewed = np.array([[7.0, 0.0], [3.0, 0.0], [0.0, 5.0]], np.float32)
    assert float(multi_positive_loss(even, positives, valid)) < float(multi_positive_loss(skewed, positives, valid))
    image_part = -(np.array([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]]) * _log_softmax(even.T, 1)).sum(1).mean()
    text_part = -(positives / positives.sum(1, keepdims=True) * _log_softmax(even, 1)).sum(1).mean()
    assert float(multi_positive_loss(even, positives, valid)) == pytest.approx((image_part + text_part) / 2, rel=1e-5)


def _losses(out) -> list[float]:
    lines = open(os.path.join(out, "metrics.jsonl")).read().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if "loss" in r]


def test_multi_caption_training_learns_and_resumes_bit_exact(manifest, tmp_path):
    from flax.traverse_util import flatten_dict

    from koclip import checkpoint

    def config(out, phases) -> TrainConfig:
        return TrainConfig(manifest=manifest, out=str(out), batch_size=4, augment=False, eval_split="", log_every=1,
                           checkpoint_every=100, captions_per_image=0, text_rows=24, phases=phases)

    learn = config(tmp_path / "learn", (Phase(30, EVERYTHING, 3e-3, warmup_steps=2),))
    train(learn, tiny_model(learn), progress=False)
    seen = _losses(learn.out)
    assert np.mean(seen[-5:]) < 0.6 * np.mean(seen[:3]), seen

    phases = (Phase(2, PROJECTIONS, 1e-2), Phase(3, EVERYTHING, 3e-3, warmup_steps=1))
    whole = config(tmp_path / "whole", phases)
    train(whole, tiny_model(whole), progress=False)
    parts = config(tmp_path / "parts", phases)
    train(parts, tiny_model(parts), stop_at=3, progress=False)
    train(parts, None, resume=True, progress=False)
    a = flatten_dict(checkpoint.load_checkpoint(whole.out).params, sep="/")
    b = flatten_dict(checkpoint.load_checkpoint(parts.out).params, sep="/")
    for key in a:
        assert np.array_equal(a[key], b[key]), key
    assert _losses(whole.out) == _losses(parts.out)
    with pytest.raises(UsageError, match="captions_per_image"):
        train(dataclasses.replace(parts, captions_per_image=2), None, resume=True, progress=False)
