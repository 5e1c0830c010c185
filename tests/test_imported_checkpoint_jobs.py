"""The jobs take a transformers folder as they take our checkpoints: a CLIPModel and a
VisionTextDualEncoderModel folder, unconverted, through the embedding pipeline, the index build,
koclip.query, evaluation, and fine-tuning (which writes our format and keeps the folder's
projections and preprocessing)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

import hf_models
from jobs import evaluate
from jobs.presets import PROJECTIONS, Phase, TrainConfig
from jobs.train import train
from koclip import checkpoint, store
from koclip.data.manifest import Item, write_manifest
from pipelines import embed
from pipelines import index as index_cli

CAPTIONS = ["빨간 사과", "강아지 얼굴", "소파 위에 고양이", "파란 하늘", "노란 바나나", "고양이 얼굴"]
# The CLIPModel folder runs by default; the dual encoder's pipeline path is also covered by
# test_dual_encoder.py, so its full runs here are slow ones.
KINDS = ["clip_model", pytest.param("dual_encoder", marks=pytest.mark.slow)]
FOLDERS = {
    "clip_model": lambda path: hf_models.clip_model(path),
    "dual_encoder": lambda path: hf_models.dual_encoder(path, "roberta", "clip"),
}


def _manifest(tmp_path) -> str:
    records = []
    for i, caption in enumerate(CAPTIONS):
        pixels = np.random.default_rng(i).integers(0, 256, (40, 44, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / f"{i}.png")
        records.append(Item(id=f"img{i}", uri=str(tmp_path / f"{i}.png"), captions=(caption,),
                            split="train" if i < 4 else "test", group=str(i)))
    path = str(tmp_path / "manifest.jsonl")
    write_manifest(path, records)
    return path


def _torch_embeddings(torch_model, folder, tmp_path):
    """(text [N, D], image [N, D]) of CAPTIONS and their images by the PyTorch model, on the folder's
    own tokenizer and image processor: the reference the jobs must agree with."""
    import torch
    import transformers

    tokens = transformers.AutoTokenizer.from_pretrained(folder)(CAPTIONS, padding=True, return_tensors="pt")
    images = [Image.open(tmp_path / f"{i}.png").convert("RGB") for i in range(len(CAPTIONS))]
    pixels = transformers.AutoImageProcessor.from_pretrained(folder)(images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        text = torch_model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        image = torch_model.get_image_features(pixel_values=pixels)
    unit = lambda out: torch.nn.functional.normalize(out.pooler_output, dim=-1).numpy()  # noqa: E731
    return unit(text), unit(image)


@pytest.mark.parametrize("kind", KINDS)
def test_a_transformers_folder_embeds_indexes_and_answers_queries(tmp_path, kind):
    from koclip.query import search

    torch_model, folder = FOLDERS[kind](tmp_path / "hf")
    manifest = _manifest(tmp_path)
    result = embed.run(["--input", manifest, "--output", str(tmp_path / "emb"), "--model", folder,
                        "--batch-size", "4"])
    assert result.totals["embedded"] == len(CAPTIONS) and result.totals["dead_letters"] == 0
    assert index_cli.main(["--embeddings", str(tmp_path / "emb"), "--out", str(tmp_path / "idx")]) == 0

    table = store.open_store(str(tmp_path / "emb")).read_table(["id", "image_embedding"])
    rows = dict(zip(table.column("id").to_pylist(), table.column("image_embedding").to_pylist()))
    text, image = _torch_embeddings(torch_model, folder, tmp_path)
    stored = np.asarray([rows[f"img{i}"] for i in range(len(CAPTIONS))], np.float32)
    np.testing.assert_allclose(stored, image, atol=1e-5)
    # A caption's hits over the index rank the images as the PyTorch model's similarities do.
    for i, caption in enumerate(CAPTIONS):
        hits = search(caption, k=len(CAPTIONS), index=str(tmp_path / "idx"), model=folder)
        expected = np.argsort(-(image @ text[i]), kind="stable")
        assert [h.id for h in hits] == [f"img{j}" for j in expected], caption
        np.testing.assert_allclose([h.score for h in hits], np.sort(image @ text[i])[::-1], atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_a_transformers_folder_evaluates_as_the_pytorch_model_ranks(tmp_path, kind):
    torch_model, folder = FOLDERS[kind](tmp_path / "hf")
    manifest = _manifest(tmp_path)
    out = tmp_path / "results.json"
    assert evaluate.main(["--checkpoint", folder, "--manifest", manifest, "--split", "all", "--k", "1", "5",
                          "--out", str(out), "--no-progress"]) == 0
    metrics = json.loads(out.read_text())["metrics"]
    text, image = _torch_embeddings(torch_model, folder, tmp_path)
    scores = text @ image.T  # caption i belongs to image i
    ranks = 1 + (scores > np.diag(scores)[:, None]).sum(axis=1)
    for k in (1, 5):
        assert metrics[f"t2i_mrr@{k}"] == pytest.approx(np.mean(np.where(ranks <= k, 1.0 / ranks, 0.0)), abs=1e-6)


@pytest.mark.slow  # compiles a train step per folder kind
@pytest.mark.parametrize("kind", sorted(FOLDERS))
def test_fine_tuning_a_transformers_folder_keeps_its_heads_and_preprocessing(tmp_path, kind):
    _, folder = FOLDERS[kind](tmp_path / "hf")
    source = checkpoint.load_checkpoint(folder)
    cfg = TrainConfig(manifest=_manifest(tmp_path), out=str(tmp_path / "out"), batch_size=4, augment=False,
                      eval_split="", log_every=1, checkpoint_every=100, phases=(Phase(1, PROJECTIONS, 1e-2),))
    train(cfg, source, progress=False)
    tuned = checkpoint.load_checkpoint(str(tmp_path / "out"))
    assert tuned.config.text_config.model_type == source.config.text_config.model_type
    assert tuned.config.image_resize_mode == source.config.image_resize_mode == "shortest_edge"
    assert tuned.config.image_mean == source.config.image_mean
    before, after = source.params, tuned.params
    moved = [name for name in ("text_projection", "visual_projection")
             if not np.allclose(np.asarray(before[name]["kernel"]), np.asarray(after[name]["kernel"]))]
    assert moved, "one step on the projections changed neither projection"
    np.testing.assert_array_equal(  # a frozen backbone weight is the folder's, bit for bit
        np.asarray(before["vision_model"]["vision_model"]["embeddings"]["patch_embedding"]["kernel"]),
        np.asarray(after["vision_model"]["vision_model"]["embeddings"]["patch_embedding"]["kernel"]))
