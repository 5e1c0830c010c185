"""koclip.query.classify and rank_patches (koclip.query.patches), on a tiny random checkpoint.

The tiny model's scores mean nothing; what is checked is that classify is the softmax it claims,
the geometry (boxes tile the picture, tokens map to cells), that each rank_patches mode computes
what it claims, and the overlay. Search is tested in test_query.py.
"""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from koclip import query
from koclip.checkpoint import load_checkpoint
from koclip.errors import PatchError
from koclip.query.patches import cell_boxes, overlap_weights, parse_grid, token_embeddings
from koclip.processing import ImagePreprocessor


@pytest.fixture(scope="module")
def model(tiny_ckpt_dir):
    return query.load_model(tiny_ckpt_dir)


def _grey(width=60, height=40):
    return Image.new("RGB", (width, height), (128, 128, 128))


def _noise(width=70, height=50, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


# ---------------------------------------------------------------- classify


def test_classify_is_a_softmax_of_scaled_cosines(model, tiny_ckpt_dir):
    labels = ["사과", "고양이", "강아지", "자동차"]
    ranked = query.classify(_noise(), labels, model=tiny_ckpt_dir)
    assert sorted(label for label, _ in ranked) == sorted(labels)
    probs = dict(ranked)
    assert sum(probs.values()) == pytest.approx(1.0, abs=1e-9)
    assert [p for _, p in ranked] == sorted(probs.values(), reverse=True)

    ckpt = load_checkpoint(tiny_ckpt_dir)
    scale = float(ckpt.model().logit_scale(ckpt.params))
    encoders = model.encoders  # checkpoint_encoders of the same checkpoint
    image = encoders.images(ImagePreprocessor.from_config(ckpt.config)(_noise())[None])[0]
    logits = scale * encoders.texts([f"이것은 {label} 이다." for label in labels]) @ image
    manual = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    np.testing.assert_allclose([probs[label] for label in labels], manual, atol=1e-5)


def test_classify_batch_and_errors(model):
    images = [_noise(seed=1), _grey()]
    batch = query.classify(images, ["빨강", "회색"], template="{} 그림", model=model)
    assert len(batch) == 2
    for image, ranked in zip(images, batch):
        alone = query.classify(image, ["빨강", "회색"], template="{} 그림", model=model)
        assert [label for label, _ in ranked] == [label for label, _ in alone]
        np.testing.assert_allclose([p for _, p in ranked], [p for _, p in alone], atol=1e-5)
    with pytest.raises(query.QueryError, match="at least one label"):
        query.classify(_grey(), [], model=model)
    with pytest.raises(query.QueryError, match="must contain"):
        query.classify(_grey(), ["사과"], template="사과 그림", model=model)
    with pytest.raises(query.QueryImageError, match="not_an_image"):
        query.classify(b"nope", ["사과"], model=model)


# ---------------------------------------------------------------- rank_patches


@pytest.mark.parametrize("size,grid", [((70, 50), (3, 3)), ((31, 64), (2, 5)), ((9, 9), (9, 9))])
def test_boxes_tile_the_image(size, grid):
    width, height = size
    covered = np.zeros((height, width), dtype=int)
    for x0, y0, x1, y1 in cell_boxes(width, height, *grid):
        assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
        covered[y0:y1, x0:x1] += 1
    assert (covered == 1).all()


def test_overlap_weights_assign_tokens_to_cells():
    weights = overlap_weights(cell_boxes(40, 40, 2, 2), 40, 40, 4)
    np.testing.assert_allclose(weights.sum(axis=1), 1.0)
    top_left = np.zeros((4, 4))
    top_left[:2, :2] = 0.25
    np.testing.assert_allclose(weights[0], top_left.reshape(-1))
    # A 3x3 grid over 4x4 tokens: the centre cell straddles the four centre tokens equally.
    centre = overlap_weights(cell_boxes(48, 48, 3, 3), 48, 48, 4)[4].reshape(4, 4)
    np.testing.assert_allclose(centre[1:3, 1:3], 0.25)


def test_crop_scores_equal_embedding_each_crop(model):
    picture = _noise(70, 50)
    result = query.rank_patches("빨간 사과", picture, grid=(3, 3), model=model)
    assert result.mode == "crops" and result.grid == (3, 3) and len(result.boxes) == 9
    text = model.embed_texts(["빨간 사과"])[0]
    for box, score in zip(result.boxes, result.scores):
        crop = model.embed_images([picture.crop(box)])[0]
        assert score == pytest.approx(float(crop @ text), abs=1e-5)
    assert sorted(result.ranks) == list(range(1, 10))
    assert result.scores[result.order[0]] == result.scores.max() and result.ranks[result.order[0]] == 1
    assert result.score_grid.shape == (3, 3) and result.score_grid[1, 2] == result.scores[5]
    cells = result.cells()
    assert [c["rank"] for c in cells] == list(range(1, 10)) and cells[0]["score"] == result.scores.max()


def test_token_scores_shape_and_pooling(model):
    g = model.config.image_size // model.config.vision_config.patch_size  # 4 for the tiny model
    picture = _noise(64, 48)
    fine = query.rank_patches("고양이", picture, grid=(g, g), mode="tokens", model=model)
    assert fine.token_scores.shape == (g, g) and fine.score_grid.shape == (g, g)
    # One token per cell: the cell scores are the token scores.
    np.testing.assert_allclose(fine.score_grid, fine.token_scores, atol=1e-5)
    coarse = query.rank_patches("고양이", picture, grid=(2, 2), mode="tokens", model=model)
    np.testing.assert_allclose(coarse.token_scores, fine.token_scores)
    assert sorted(coarse.ranks) == [1, 2, 3, 4]
    assert list(coarse.order) == list(np.argsort(-coarse.scores, kind="stable"))
    # The top-left cell pools the top-left 2x2 tokens (area-weighted mean, normalised, cosine).
    tokens = token_embeddings(model, picture).reshape(g, g, -1)
    pooled = tokens[: g // 2, : g // 2].reshape(-1, tokens.shape[-1]).mean(axis=0)
    text = model.embed_texts(["고양이"])[0]
    assert coarse.scores[0] == pytest.approx(float(pooled @ text / np.linalg.norm(pooled)), abs=1e-5)


def test_overlay_is_hottest_on_the_best_cell(model, tmp_path):
    result = query.rank_patches("회색", _grey(90, 60), grid=(2, 3), model=model)
    result.scores = np.array([0.1, 0.9, 0.2, 0.3, 0.0, 0.4], np.float32)  # a known ranking
    path = result.save_overlay(str(tmp_path / "heat.png"))
    overlay = Image.open(path)
    assert overlay.format == "PNG" and overlay.size == (90, 60) and overlay.mode == "RGB"
    best, worst = np.asarray(overlay)[15, 45].astype(int), np.asarray(overlay)[45, 45].astype(int)
    assert best[0] > best[2] and worst[2] > worst[0]  # jet: red is hot, blue is cold


def test_rank_patches_errors(model):
    with pytest.raises(query.QueryError, match="mode"):
        query.rank_patches("사과", _grey(), mode="pixels", model=model)
    with pytest.raises(query.QueryError, match="does not fit"):
        query.rank_patches("사과", _grey(10, 10), grid=(20, 2), model=model)
    with pytest.raises(query.QueryError, match="grid"):
        query.rank_patches("사과", _grey(), grid=(0, 3), model=model)
    with pytest.raises(query.QueryError, match="empty"):
        query.rank_patches(" ", _grey(), model=model)




def test_parse_grid():
    assert parse_grid(3) == (3, 3) and parse_grid("2x5") == (2, 5) and parse_grid("4") == (4, 4)
    assert parse_grid((1, 7)) == (1, 7)
    for bad in ("3by3", (3,), (2, 0), (2.5, 2), "x"):
        with pytest.raises(PatchError, match="grid"):
            parse_grid(bad)
