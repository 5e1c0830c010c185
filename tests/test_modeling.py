"""The hybrid model's functions: dtypes, patches, sharding, fixed shapes."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import hf_models
from koclip import checkpoint
from koclip.config import tiny_config
from koclip.modeling import KoCLIP
from koclip.modeling.parallel import BatchEncoder


@pytest.fixture(scope="module")
def tiny():
    config = tiny_config()
    return config, KoCLIP(config).init(0)


def inputs(config, n=5, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, config.text_config.vocab_size, (n, 16)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[0, 6:] = 0
    pixels = rng.normal(size=(n, config.image_size, config.image_size, 3)).astype(np.float32)
    return ids, mask, pixels


def test_bfloat16_outputs_float32_close_to_float32(tiny):
    config, params = tiny
    ids, mask, pixels = inputs(config)
    f32, bf16 = KoCLIP(config, "float32"), KoCLIP(config, "bfloat16")
    for fn in ("encode_text", "encode_image"):
        args = (ids, mask) if fn == "encode_text" else (pixels,)
        a = np.asarray(getattr(f32, fn)(params, *args))
        b = getattr(bf16, fn)(params, *args)
        assert b.dtype == np.float32
        cos = np.sum(a * np.asarray(b), axis=1)
        assert cos.min() > 0.99, (fn, cos)
        assert not np.array_equal(a, np.asarray(b))  # the compute really ran in bfloat16


def test_unknown_dtype_is_refused():
    with pytest.raises(ValueError, match="float16"):
        KoCLIP(tiny_config(), "float16")


def test_padding_does_not_change_text_embedding(tiny):
    config, params = tiny
    model = KoCLIP(config)
    ids, mask, _ = inputs(config)
    short = model.encode_text(params, ids[:1, :6], mask[:1, :6])
    padded = model.encode_text(params, ids[:1], mask[:1])
    np.testing.assert_allclose(short, padded, atol=1e-5)


def test_patches_match_transformers_clip_head(tmp_path):
    """encode_patches = normalise(visual_projection(post_layernorm(patch tokens)))."""
    _, text_dir = hf_models.bert(tmp_path / "bert")
    clip_model, vision_dir = hf_models.clip(tmp_path / "clip")
    built = checkpoint.build_hybrid(text_dir, vision_dir)
    pixels = np.random.default_rng(2).normal(size=(2, 32, 32, 3)).astype(np.float32)
    with torch.no_grad():
        hidden = clip_model.vision_model(pixel_values=torch.tensor(pixels.transpose(0, 3, 1, 2))).last_hidden_state
        tokens = clip_model.visual_projection(clip_model.vision_model.post_layernorm(hidden[:, 1:])).numpy()
        pooled = clip_model.get_image_features(pixel_values=torch.tensor(pixels.transpose(0, 3, 1, 2)))
        pooled = getattr(pooled, "pooler_output", pooled).numpy()
    expected = tokens / np.linalg.norm(tokens, axis=-1, keepdims=True)
    model = KoCLIP(built.config)
    patches = np.asarray(model.encode_patches(built.params, pixels))
    assert patches.shape == (2, 16, 24)
    np.testing.assert_allclose(patches, expected, atol=1e-4)
    image = np.asarray(model.encode_image(built.params, pixels))
    np.testing.assert_allclose(image, pooled / np.linalg.norm(pooled, axis=-1, keepdims=True), atol=1e-4)


def test_vit_patches_go_through_the_pooler_head(tmp_path):
    """For ViT the class token's head is the pooler (tanh Dense), so patch tokens take it too."""
    _, text_dir = hf_models.bert(tmp_path / "bert")
    vit_model, vision_dir = hf_models.vit(tmp_path / "vit")
    built = checkpoint.build_hybrid(text_dir, vision_dir, projection_dim=12)
    pixels = np.random.default_rng(3).normal(size=(2, 32, 32, 3)).astype(np.float32)
    with torch.no_grad():
        hidden = vit_model(pixel_values=torch.tensor(pixels.transpose(0, 3, 1, 2))).last_hidden_state
        heads = torch.tanh(vit_model.pooler.dense(hidden[:, 1:])).numpy()
    tokens = heads @ built.params["visual_projection"]["kernel"]
    expected = tokens / np.linalg.norm(tokens, axis=-1, keepdims=True)
    patches = np.asarray(KoCLIP(built.config).encode_patches(built.params, pixels))
    assert patches.shape == (2, 16, 12)
    np.testing.assert_allclose(patches, expected, atol=1e-4)


def test_batch_encoder_pads_to_one_shape(tiny):
    config, params = tiny
    model = KoCLIP(config)
    _, _, pixels = inputs(config, n=11)
    enc = BatchEncoder(model.encode_image, params, batch_size=4)
    out = enc(pixels)
    assert out.shape == (11, config.projection_dim)
    enc(pixels[:3])
    assert enc.compiles == 1
    np.testing.assert_allclose(out, np.asarray(model.encode_image(params, pixels)), atol=1e-5)


def test_sharded_encoding_on_four_devices_equals_one_device():
    script = textwrap.dedent("""
        import jax, numpy as np
        from koclip.config import tiny_config
        from koclip.modeling import KoCLIP
        from koclip.modeling.parallel import BatchEncoder
        assert jax.local_device_count() == 4, jax.local_devices()
        config = tiny_config()
        model = KoCLIP(config)
        params = model.init(0)
        rng = np.random.default_rng(0)
        pixels = rng.normal(size=(10, 32, 32, 3)).astype(np.float32)
        ids = rng.integers(5, 900, (10, 16)).astype(np.int32); mask = np.ones_like(ids); mask[:, 9:] = 0
        for fn, args in ((model.encode_image, (pixels,)), (model.encode_text, (ids, mask))):
            four = BatchEncoder(fn, params, batch_size=8)
            one = BatchEncoder(fn, params, batch_size=8, devices=jax.local_devices()[:1])
            assert four.mesh.size == 4 and one.mesh.size == 1
            a, b = four(*args), one(*args)
            assert a.shape == b.shape == (10, config.projection_dim)
            diff = float(np.abs(a - b).max())
            assert diff <= 1e-5, diff
        print("OK")
    """)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("OK"), result.stderr[-3000:]
