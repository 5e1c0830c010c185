"""transformers' VisionTextDualEncoderModel folders (koclip/koclip-base-pt's layout) load as
checkpoints with their trained projections and logit scale, and embed as the PyTorch model does."""
from __future__ import annotations

import json
import sys

import jax
import numpy as np
import pytest
import torch
import transformers
from PIL import Image

import hf_models
from hf_models import TOL, assert_matches_torch, inputs, max_diff
from koclip import checkpoint
from koclip.cli.main import main
from koclip.errors import CheckpointError, MissingDependency
from koclip.processing import ImagePreprocessor

@pytest.mark.parametrize("text,vision,weights", [
    ("roberta", "clip", "safetensors"), ("bert", "vit", "safetensors"),
    ("roberta", "clip", "bin"), ("bert", "vit", "bin"), ("bert", "clip", "sharded"),
])
def test_dual_encoder_folder_embeds_as_transformers(tmp_path, text, vision, weights):
    torch_model, path = hf_models.dual_encoder(tmp_path / "hf", text, vision, weights)
    ckpt = checkpoint.load_checkpoint(path)
    assert ckpt.config.text_position_ids == "model"
    assert ckpt.config.projection_dim == 16
    # The trained head, not a new one.
    assert np.array_equal(ckpt.params["text_projection"]["kernel"], torch_model.text_projection.weight.detach().numpy().T)
    trained_scale = torch_model.logit_scale.item()
    assert trained_scale != pytest.approx(2.0) and float(ckpt.params["logit_scale"]) == trained_scale
    assert_matches_torch(ckpt, torch_model)


@pytest.mark.parametrize("vision", ["clip", "vit"])
def test_dual_encoder_preprocessing_follows_its_image_processor(tmp_path, vision):
    _, path = hf_models.dual_encoder(tmp_path / "hf", "bert", vision)
    config = checkpoint.load_config(path)
    if vision == "clip":
        assert (config.image_resize_mode, config.image_resize, config.image_resample) == ("shortest_edge", 36, "bicubic")
    else:
        assert (config.image_resize_mode, config.image_resample, config.image_mean) == ("square", "bilinear", (0.4, 0.5, 0.6))
    image = Image.fromarray(np.random.default_rng(3).integers(0, 256, (40, 70, 3), dtype=np.uint8))
    expected = transformers.AutoImageProcessor.from_pretrained(path)(image, return_tensors="np")["pixel_values"][0]
    ours = ImagePreprocessor.from_config(config).preprocess(image)
    assert np.abs(ours - expected.transpose(1, 2, 0)).max() <= TOL


def test_convert_round_trip_and_info(tmp_path, capsys):
    torch_model, src = hf_models.dual_encoder(tmp_path / "hf", "roberta", "vit", "bin")
    dst = str(tmp_path / "ours")
    assert main(["convert", src, dst]) == 0
    original, converted = checkpoint.load_checkpoint(src), checkpoint.load_checkpoint(dst)
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["text_position_ids"] == "model"
    assert (tmp_path / "ours" / "flax_model.msgpack").exists() and (tmp_path / "ours" / "tokenizer.json").exists()
    assert converted.fingerprint == original.fingerprint and converted.config == original.config
    ids, mask, pixels = inputs(1)
    model = converted.model()
    nhwc = pixels.transpose(0, 2, 3, 1)
    for fn, args in ((model.encode_text, (ids, mask)), (model.encode_image, (nhwc,))):
        assert np.array_equal(np.asarray(jax.jit(fn)(converted.params, *args)), np.asarray(jax.jit(fn)(original.params, *args)))
    assert_matches_torch(converted, torch_model)
    capsys.readouterr()
    assert main(["info", dst]) == 0
    assert "text positions  model (the text model's own" in capsys.readouterr().out


def test_encoders_on_a_converted_dual_encoder_match_transformers(tmp_path):
    """What the pipeline, queries and evaluation embed through: koclip.encoders."""
    torch_model, src = hf_models.dual_encoder(tmp_path / "hf", "bert", "clip")
    dst = str(tmp_path / "ours")
    assert main(["convert", src, dst]) == 0
    hf_models.assert_encoders_match_torch(checkpoint.load_checkpoint(dst), torch_model, src)


def test_bin_without_torch_is_one_line(tmp_path, monkeypatch):
    _, path = hf_models.dual_encoder(tmp_path / "hf", "bert", "vit", "bin")
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    with pytest.raises(MissingDependency, match=r"pytorch_model.bin is a PyTorch pickle.*pip install torch"):
        checkpoint.load_checkpoint(path)


def test_unsupported_folder_is_one_line_naming_what_was_found(tmp_path, capsys):
    _, bert_dir = hf_models.bert(tmp_path / "bert")
    with pytest.raises(CheckpointError, match=r"config.json has model_type 'bert' \(architectures \['BertModel'\]\) "
                       r"and no text_config/vision_config; the folder holds config.json, model.safetensors.*"
                       r"expected a koclip checkpoint, a FlaxHybridCLIP flax_model.msgpack, or a "
                       r"VisionTextDualEncoderModel or CLIPModel folder"):
        checkpoint.load_checkpoint(bert_dir)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "weights.npz").write_bytes(b"")
    capsys.readouterr()
    assert main(["info", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "has no config.json (it holds weights.npz); expected a koclip checkpoint" in err


def test_the_embedding_pipeline_preprocesses_as_the_folders_image_processor(tmp_path):
    """A ViT folder resizes to a square (no crop): a non-square image embedded by the Beam pipeline
    equals transformers' model on its own processor's pixels."""
    from koclip import store
    from pipelines import embed

    torch_model, src = hf_models.dual_encoder(tmp_path / "hf", "bert", "vit")
    image = Image.fromarray(np.random.default_rng(5).integers(0, 256, (40, 90, 3), dtype=np.uint8))
    image.save(tmp_path / "wide.png")
    (tmp_path / "m.jsonl").write_text(json.dumps({"id": "wide", "image": "wide.png", "captions": ["넓은 그림"]}) + "\n")
    embed.run(["--input", str(tmp_path / "m.jsonl"), "--output", str(tmp_path / "out"), "--model", src,
               "--batch-size", "2"])
    row = store.open_store(str(tmp_path / "out")).read_table(["image_embedding"]).column(0).to_pylist()[0]
    pixels = transformers.AutoImageProcessor.from_pretrained(src)(image, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        expected = torch.nn.functional.normalize(torch_model.get_image_features(pixel_values=pixels).pooler_output,
                                                 dim=-1)
    assert max_diff(np.asarray(row)[None], expected) <= TOL
