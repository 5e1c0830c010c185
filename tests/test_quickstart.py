"""KoCLIP's quickstart (`from koclip import load_koclip`): it embeds as koclip.encoders and
koclip.query do, takes NCHW pixel values, and the README's snippet runs as written."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from koclip import load_koclip
from koclip.errors import KoclipError
from koclip.query import load_model

README = Path(__file__).resolve().parent.parent / "README.md"
TEXTS = ["강아지", "고양이"]


def photo() -> Image.Image:
    image = Image.new("RGB", (70, 45), (40, 120, 200))
    ImageDraw.Draw(image).ellipse((5, 5, 40, 40), fill=(250, 200, 30))
    return image


@pytest.fixture(scope="module")
def quickstart(tiny_ckpt_dir):
    return load_koclip(tiny_ckpt_dir)


def test_quickstart_embeds_as_the_encoders_and_the_query_library(quickstart, tiny_ckpt_dir):
    model, processor = quickstart
    images = [photo(), photo().rotate(90, expand=True)]
    inputs = processor(text=TEXTS, images=images, return_tensors="np", padding=True)
    size = model.config.image_size
    assert inputs["pixel_values"].shape == (2, 3, size, size)  # NCHW
    outputs = model(**inputs)
    assert outputs.logits_per_image.shape == (2, 2) and outputs.logits_per_text.shape == (2, 2)
    names = outputs.keys()
    assert names == ["logits_per_image", "logits_per_text", "text_embeds", "image_embeds"]
    assert all(isinstance(outputs[name], np.ndarray) and outputs[name].dtype == np.float32 for name in names)

    query_model = load_model(tiny_ckpt_dir)  # koclip.query, embedding through koclip.encoders
    np.testing.assert_allclose(outputs.text_embeds, query_model.embed_texts(TEXTS), atol=1e-6)
    np.testing.assert_allclose(outputs.image_embeds, query_model.embed_images(images), atol=1e-6)
    nhwc = inputs["pixel_values"].transpose(0, 2, 3, 1)
    np.testing.assert_allclose(outputs.image_embeds, query_model.encoders.images(nhwc), atol=1e-6)
    expected_logits = query_model.logit_scale * outputs.image_embeds @ outputs.text_embeds.T
    np.testing.assert_allclose(outputs.logits_per_image, expected_logits, atol=1e-5)
    np.testing.assert_array_equal(outputs.logits_per_text, outputs.logits_per_image.T)

    text_features = model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    image_features = model.get_image_features(pixel_values=inputs["pixel_values"])
    assert np.linalg.norm(text_features, axis=1).min() > 0
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
    np.testing.assert_allclose(unit(text_features), outputs.text_embeds, atol=1e-6)
    np.testing.assert_allclose(unit(image_features), outputs.image_embeds, atol=1e-6)


def test_a_text_embeds_the_same_whatever_its_batch_and_padding(quickstart):
    model, processor = quickstart
    alone = processor(text=["강아지"], return_tensors="np")
    batch = processor(text=["강아지", "소파 위에 고양이 한 마리와 강아지 두 마리"], return_tensors="np", padding="max_length")
    assert batch["input_ids"].shape[1] > alone["input_ids"].shape[1]
    np.testing.assert_allclose(model.get_text_features(alone["input_ids"], alone["attention_mask"])[0],
                               model.get_text_features(batch["input_ids"], batch["attention_mask"])[0], atol=1e-6)
    jax_inputs = processor(text=["강아지"], return_tensors="jax")
    np.testing.assert_array_equal(np.asarray(jax_inputs["input_ids"]), alone["input_ids"])


def test_wrong_inputs_are_one_line_errors(quickstart):
    model, processor = quickstart
    pixels = processor(images=photo(), return_tensors="np")["pixel_values"]
    with pytest.raises(KoclipError, match=r"NCHW"):
        model.get_image_features(pixels.transpose(0, 2, 3, 1))  # NHWC
    with pytest.raises(KoclipError, match="at most"):
        model.get_text_features(np.ones((1, 500), np.int32))
    with pytest.raises(KoclipError, match="return_tensors"):
        processor(text=TEXTS, return_tensors="pt")
    with pytest.raises(KoclipError, match="input_ids and pixel_values"):
        model(pixel_values=pixels)


def readme_snippet() -> str:
    section = README.read_text(encoding="utf-8").split("### KoCLIP quickstart", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


def test_the_readme_snippet_runs(tiny_ckpt_dir, tmp_path):
    code = readme_snippet()
    assert 'load_koclip("path/to/checkpoint")' in code and '"cat.jpg"' in code
    image_path = tmp_path / "cat.jpg"
    photo().save(image_path)
    code = code.replace('"path/to/checkpoint"', repr(tiny_ckpt_dir)).replace('"cat.jpg"', repr(str(image_path)))
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)  # noqa: S102 (running the README's own snippet)
    probs = namespace["probs"]
    assert probs.shape == (1, 2) and np.allclose(probs.sum(axis=1), 1.0)
    assert namespace["text_features"].shape == (2, namespace["model"].config.projection_dim)
    assert namespace["image_features"].shape == (1, namespace["model"].config.projection_dim)
