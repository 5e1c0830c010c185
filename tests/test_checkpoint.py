"""Checkpoints: the published FlaxHybridCLIP layout, our own format, fingerprints, HF import."""
from __future__ import annotations

import json
from pathlib import Path

import fsspec
import jax
import numpy as np
import pytest
from flax import serialization
from flax.traverse_util import flatten_dict, unflatten_dict

import hf_models
from koclip import checkpoint
from koclip.checkpoint import CheckpointError
from koclip.config import FINGERPRINT_NEUTRAL, FINGERPRINT_NEUTRAL_TEXT, HybridCLIPConfig, tiny_config
from koclip.errors import ConfigError
from koclip.modeling import KoCLIP

# A copy of shared/fixtures/flax_param_trees.json: names and shapes of transformers 4.x's Flax
# modules for small configs, the layout of the published FlaxHybridCLIP checkpoints.
FIXTURE = Path(__file__).resolve().parent / "fixtures" / "flax_param_trees.json"


def fixture_trees() -> dict:
    return json.loads(FIXTURE.read_text())


def published_checkpoint(path: Path, text: str, vision: str, projection_dim: int = 16,
                         config_spelling: str = "text_config", break_key: str | None = None) -> dict:
    """Write a checkpoint the way FlaxHybridCLIP did: names and shapes from the fixture, random values."""
    trees = fixture_trees()
    rng = np.random.default_rng(0)
    flat = {}
    for tower, arch in (("text_model", text), ("vision_model", vision)):
        for key, shape in trees["models"][arch]["params"].items():
            flat[f"{tower}/{key}"] = rng.normal(0, 0.05, shape).astype(np.float32)
    t_hidden = trees["models"][text]["config"]["hidden_size"]
    v_hidden = trees["models"][vision]["config"]["hidden_size"]
    flat["text_projection/kernel"] = rng.normal(0, 0.05, (t_hidden, projection_dim)).astype(np.float32)
    flat["visual_projection/kernel"] = rng.normal(0, 0.05, (v_hidden, projection_dim)).astype(np.float32)
    flat["logit_scale"] = np.asarray(1.0, np.float32)
    if break_key:
        flat[break_key] = np.zeros(flat[break_key].shape[:-1] + (flat[break_key].shape[-1] + 1,), np.float32)
    params = unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})
    vision_config = {**trees["models"][vision]["config"], "model_type": vision}
    if vision == "clip_vision_model":  # FlaxHybridCLIP stored the whole CLIP config
        vision_config = {"model_type": "clip", "vision_config": vision_config, "projection_dim": projection_dim}
    config = {
        "model_type": "hybrid-clip",
        "projection_dim": projection_dim,
        f"{config_spelling}": {**trees["models"][text]["config"], "model_type": text},
        config_spelling.replace("text", "vision"): vision_config,
    }
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    (path / "flax_model.msgpack").write_bytes(serialization.to_bytes(params))
    return params


@pytest.mark.parametrize("text,vision,spelling", [
    ("roberta", "clip_vision_model", "text_config"),
    ("bert", "vit", "text_config_dict"),
])
def test_published_layout_loads_and_encodes(tmp_path, text, vision, spelling):
    written = published_checkpoint(tmp_path, text, vision, config_spelling=spelling)
    ckpt = checkpoint.load_checkpoint(str(tmp_path))
    assert ckpt.config.text_config.model_type == text
    assert ckpt.config.vision_config.model_type == vision
    for key, value in flatten_dict(written).items():
        assert np.array_equal(flatten_dict(ckpt.params)[key], value), key
    model = KoCLIP(ckpt.config)
    ids = np.array([[0, 5, 9, 2, 1, 1], [0, 7, 2, 1, 1, 1]], np.int32)
    mask = (ids != 1).astype(np.int32)
    text_emb = np.asarray(jax.jit(model.encode_text)(ckpt.params, ids, mask))
    pixels = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
    image_emb = np.asarray(jax.jit(model.encode_image)(ckpt.params, pixels))
    assert text_emb.shape == image_emb.shape == (2, 16)
    np.testing.assert_allclose(np.linalg.norm(text_emb, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(image_emb, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(image_emb[0], image_emb[1])
    logits, logits_t = model.contrastive_logits(ckpt.params, ids, mask, pixels)
    np.testing.assert_allclose(logits, np.e * text_emb @ image_emb.T, atol=1e-5)  # exp(logit_scale=1)
    np.testing.assert_allclose(logits_t, np.asarray(logits).T)


def test_wrong_shape_names_the_key(tmp_path):
    bad = "text_model/encoder/layer/1/intermediate/dense/bias"
    published_checkpoint(tmp_path, "bert", "clip_vision_model", break_key=bad)
    with pytest.raises(CheckpointError) as err:
        checkpoint.load_checkpoint(str(tmp_path))
    message = str(err.value)
    assert bad in message and "[65]" in message and "[64]" in message
    assert "\n" not in message


def test_missing_and_unexpected_keys_are_named():
    config = tiny_config()
    params = flatten_dict(jax.device_get(KoCLIP(config).init(0)), sep="/")
    params.pop("text_model/pooler/dense/bias")
    params["vision_model/extra/kernel"] = np.zeros(3)
    with pytest.raises(CheckpointError, match=r"missing: text_model/pooler/dense/bias.*unexpected: vision_model/extra/kernel"):
        checkpoint.check_params(config, unflatten_dict(params, sep="/"))


def test_missing_directory_is_one_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint directory not found"):
        checkpoint.load_checkpoint(str(tmp_path / "nope"))


def assert_round_trip(path: str):
    config = tiny_config(text="roberta", vision="vit", logit_scale_mode="fixed", fixed_logit_scale=20.0)
    params = jax.device_get(KoCLIP(config).init(3))
    checkpoint.save_checkpoint(path, config, params)
    loaded = checkpoint.load_checkpoint(path)
    assert loaded.config == config
    for key, value in flatten_dict(params).items():
        got = flatten_dict(loaded.params)[key]
        assert got.dtype == value.dtype and np.array_equal(got, value), key
    assert loaded.fingerprint == checkpoint.fingerprint(config, params)


def test_round_trip_local(tmp_path):
    assert_round_trip(str(tmp_path / "ckpt"))
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "flax_model.msgpack"]


def test_round_trip_memory_fs():
    assert_round_trip("memory://koclip/ckpt")


def test_round_trip_gcs_emulator(gcs_bucket):
    path = f"{gcs_bucket}/ckpt"
    assert_round_trip(path)
    fs, _ = fsspec.core.url_to_fs(path)
    assert fs.exists(f"{path}/flax_model.msgpack")


def test_fingerprint_tracks_params_and_config():
    config = tiny_config()
    params = jax.device_get(KoCLIP(config).init(0))
    base = checkpoint.fingerprint(config, params)
    assert base == checkpoint.fingerprint(config, jax.tree_util.tree_map(np.copy, params))
    nudged = jax.tree_util.tree_map(np.copy, params)
    nudged["visual_projection"]["kernel"][0, 0] += 1e-6
    assert checkpoint.fingerprint(config, nudged) != base
    other = tiny_config(logit_scale_mode="fixed")
    assert checkpoint.fingerprint(other, params) != base


def test_build_hybrid_reuses_clip_projection(tmp_path):
    _, text_dir = hf_models.bert(tmp_path / "bert")
    clip_model, vision_dir = hf_models.clip(tmp_path / "clip", projection_dim=24)
    built = checkpoint.build_hybrid(text_dir, vision_dir)
    assert built.config.projection_dim == 24
    expected = clip_model.visual_projection.weight.detach().numpy().T
    assert np.array_equal(built.params["visual_projection"]["kernel"], expected)
    with pytest.raises(CheckpointError, match="projection"):
        checkpoint.build_hybrid(text_dir, vision_dir, projection_dim=16)
    fresh = checkpoint.build_hybrid(text_dir, vision_dir, projection_dim=16, reuse_clip_projection=False)
    assert fresh.params["visual_projection"]["kernel"].shape == (32, 16)


def test_build_hybrid_with_vit_saves_and_loads(tmp_path):
    _, text_dir = hf_models.roberta(tmp_path / "roberta")
    _, vision_dir = hf_models.vit(tmp_path / "vit")
    built = checkpoint.build_hybrid(text_dir, vision_dir, projection_dim=8)
    out = str(tmp_path / "hybrid")
    checkpoint.save_checkpoint(out, built.config, built.params)
    loaded = checkpoint.load_checkpoint(out)
    assert loaded.fingerprint == built.fingerprint
    assert loaded.config.vision_config.model_type == "vit"


def test_import_rejects_mismatched_weights(tmp_path):
    _, text_dir = hf_models.bert(tmp_path / "bert")
    cfg = json.loads((tmp_path / "bert" / "config.json").read_text())
    cfg["intermediate_size"] = 50
    (tmp_path / "bert" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"encoder/layer/0/intermediate/dense/kernel \(has \[32, 48\], config wants \[32, 50\]\)"):
        checkpoint.import_text_encoder(text_dir)


def test_published_config_reads_both_spellings():
    text = {"model_type": "roberta", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
            "intermediate_size": 64, "vocab_size": 100, "max_position_embeddings": 40}
    vision = {"model_type": "vit", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
              "intermediate_size": 64, "image_size": 32, "patch_size": 16}
    a = HybridCLIPConfig.from_dict({"text_config": text, "vision_config": vision, "projection_dim": 512})
    b = HybridCLIPConfig.from_dict({"text_config_dict": text, "vision_config_dict": vision, "projection_dim": 512})
    assert a == b
    # FlaxHybridCLIP numbered positions 0..L-1, so all 40 position embeddings are usable.
    assert a.text_config.pad_token_id == 1 and a.text_position_ids == "from_zero" and a.max_text_length == 40
    assert HybridCLIPConfig.from_json(a.to_json()) == a


def test_config_without_position_field_keeps_its_origins_convention():
    """A FlaxHybridCLIP config.json means 0..L-1; one koclip wrote before the field existed, the
    model's own (what koclip always did); the field, once written, wins."""
    ours = json.loads(tiny_config(text="roberta").to_json())
    assert ours.pop("text_position_ids") == "model"
    legacy = HybridCLIPConfig.from_dict(ours)
    assert legacy.text_position_ids == "model" and legacy.max_text_length == 32
    published = {k: ours[k] for k in ("model_type", "text_config", "vision_config", "projection_dim")}
    assert HybridCLIPConfig.from_dict(published).text_position_ids == "from_zero"
    assert HybridCLIPConfig.from_dict({**published, "text_position_ids": "model"}).text_position_ids == "model"
    with pytest.raises(ConfigError, match="text_position_ids 'zero' is not one of"):
        HybridCLIPConfig.from_dict({**published, "text_position_ids": "zero"})


def test_fingerprint_changes_with_the_position_convention_only():
    config = tiny_config(text="roberta")
    params = jax.device_get(KoCLIP(config).init(0))
    before = checkpoint.fingerprint(config, params)
    # Fields at their neutral value leave the fingerprint as it was before they existed.
    expected = {k: v for k, v in config.to_dict().items() if k not in FINGERPRINT_NEUTRAL}
    expected["text_config"] = {k: v for k, v in expected["text_config"].items() if k not in FINGERPRINT_NEUTRAL_TEXT}
    assert config.fingerprint_dict() == expected
    config.text_position_ids = "from_zero"
    assert checkpoint.fingerprint(config, params) != before


@pytest.mark.parametrize("name, poison, reason", [
    ("nan kernel", lambda v: np.full_like(v, np.nan), "non-finite"),
    ("inf bias", lambda v: np.where(np.arange(v.size).reshape(v.shape) == 0, np.inf, v), "1 non-finite"),
    ("integer kernel", lambda v: v.astype(np.int32), "dtype int32"),
    ("string logit scale", lambda v: "2.659", "dtype <U5"),
])
def test_bad_weights_are_refused_naming_the_parameter(tmp_path, tiny_ckpt_dir, capsys, name, poison, reason):
    """Weights that would load and give NaN (or meaningless) embeddings are refused in one line."""
    from koclip.cli.main import main

    ckpt = checkpoint.load_checkpoint(tiny_ckpt_dir)
    flat = flatten_dict(ckpt.params, sep="/")
    key = "logit_scale" if "logit" in name else next(k for k in sorted(flat) if k.endswith(
        "kernel" if "kernel" in name else "bias"))
    flat[key] = poison(flat[key])
    out = str(tmp_path / "bad")
    checkpoint.save_checkpoint(out, ckpt.config, unflatten_dict(flat, sep="/"), tokenizer_dir=tiny_ckpt_dir)
    with pytest.raises(CheckpointError, match=f"parameter {key} .*{reason}"):
        checkpoint.load_checkpoint(out)
    assert main(["info", out]) == 2
    err = capsys.readouterr().err
    assert err.startswith("koclip: error: ") and key in err and err.count("\n") == 1
