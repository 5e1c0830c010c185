"""The koclip CLI, run in-process: init, info, embed-text, embed-image, and its errors."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

import hf_models
from koclip import checkpoint
from koclip.cli.main import main
from koclip.modeling import KoCLIP
from koclip.processing import tokenize
from koclip.vocab import TINY_CORPUS, train_wordpiece


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("img")
    rng = np.random.default_rng(0)
    paths = []
    for i, size in enumerate([(40, 30), (64, 64)]):
        path = root / f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    (root / "notes.jpg").write_text("not an image")
    return paths, str(root / "notes.jpg")


def test_info_reports_the_fingerprint(tiny_ckpt_dir, capsys):
    assert main(["info", tiny_ckpt_dir]) == 0
    out = capsys.readouterr().out
    assert checkpoint.load_checkpoint(tiny_ckpt_dir).fingerprint in out
    assert "bert" in out and "clip_vision_model" in out


def test_embed_text_prints_the_library_embeddings(tiny_ckpt_dir, capsys):
    texts = ["빨간 사과", "소파 위에 고양이"]
    assert main(["embed-text", tiny_ckpt_dir, *texts, "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    ckpt = checkpoint.load_checkpoint(tiny_ckpt_dir)
    ids, mask = tokenize(ckpt.tokenizer(), texts, ckpt.config.text_length_buckets)
    expected = np.asarray(KoCLIP(ckpt.config).encode_text(ckpt.params, ids, mask))
    np.testing.assert_allclose(np.array([printed[t] for t in texts]), expected, atol=1e-5)


def test_embed_image_with_labels_prints_probabilities(tiny_ckpt_dir, images, capsys):
    paths, _ = images
    assert main(["embed-image", tiny_ckpt_dir, *paths, "--text", "고양이", "사과", "--json"]) == 0
    probs = json.loads(capsys.readouterr().out)
    assert set(probs) == set(paths)
    for p in probs.values():
        assert set(p) == {"고양이", "사과"} and abs(sum(p.values()) - 1.0) < 1e-5


@pytest.mark.parametrize("argv_tail,needle", [
    (["info", "{missing}"], "checkpoint directory not found"),
    (["embed-image", "{ckpt}", "{bad}"], "not_an_image"),
    (["embed-image", "{ckpt}", "{missing}.png"], "not_found"),
    (["embed-text", "{ckpt}", " "], "empty"),
    (["init", "{missing}"], "--tiny"),
])
def test_errors_are_one_line(tmp_path, tiny_ckpt_dir, images, capsys, argv_tail, needle):
    argv = [a.format(missing=str(tmp_path / "nope"), ckpt=tiny_ckpt_dir, bad=images[1]) for a in argv_tail]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err and "Traceback" not in err


def test_init_from_transformers_dirs(tmp_path, capsys):
    _, text_dir = hf_models.bert(tmp_path / "bert")
    train_wordpiece(TINY_CORPUS, vocab_size=120).save_pretrained(text_dir)
    _, vision_dir = hf_models.clip(tmp_path / "clip", projection_dim=24)
    out = str(tmp_path / "hybrid")
    assert main(["init", out, "--text", text_dir, "--vision", vision_dir]) == 0
    assert main(["embed-text", out, "빨간 사과", "--json"]) == 0
    vectors = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert len(vectors["빨간 사과"]) == 24
