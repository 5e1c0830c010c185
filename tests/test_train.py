"""The training job on a tiny model: learning, phases, exact resume, bad images, devices."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from flax.traverse_util import flatten_dict
from PIL import Image

from jobs.presets import EVERYTHING, PROJECTIONS, Phase, TrainConfig, tiny_model
from jobs.train import main, train
from koclip import checkpoint
from koclip.data.manifest import Item, write_manifest
from koclip.errors import UsageError

CAPTIONS = ["빨간 사과", "강아지 얼굴", "소파 위에 고양이", "벚꽃이 핀 나무", "하늘을 나는 비행기",
            "바다 위의 배", "웃는 얼굴", "a red apple", "a cat on the sofa", "cherry blossom"]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """Ten distinct images (solid colours with a stripe), one caption each; one corrupt file."""
    root = tmp_path_factory.mktemp("pairs")
    rng = np.random.default_rng(0)
    records = []
    for i, caption in enumerate(CAPTIONS):
        array = np.zeros((40, 40, 3), np.uint8) + rng.integers(0, 255, 3, dtype=np.uint8)
        array[i * 4:(i + 1) * 4] = 255 - array[0, 0]
        Image.fromarray(array).save(root / f"{i}.png")
        records.append(Item(id=str(i), uri=str(root / f"{i}.png"), captions=(caption,), split="train", group=str(i)))
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    records.append(Item(id="broken", uri=str(root / "broken.png"), captions=("망가진 그림",), split="train", group="b"))
    manifest = str(root / "manifest.jsonl")
    write_manifest(manifest, records)
    return manifest


def config(manifest, out, **changes) -> TrainConfig:
    base = TrainConfig(
        manifest=manifest, out=str(out), batch_size=8, augment=False, eval_split="", log_every=1,
        checkpoint_every=100, phases=(Phase(2, PROJECTIONS, 1e-2), Phase(4, EVERYTHING, 3e-3, warmup_steps=1)),
    )
    return dataclasses.replace(base, **changes)


def flat_params(out) -> dict:
    return flatten_dict(checkpoint.load_checkpoint(str(out)).params, sep="/")


def losses(out) -> list[float]:
    import json
    lines = open(os.path.join(out, "metrics.jsonl")).read().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if "loss" in r]


def test_loss_decreases_on_a_few_pairs(pairs, tmp_path):
    cfg = config(pairs, tmp_path / "run", phases=(Phase(30, EVERYTHING, 3e-3, warmup_steps=2),))
    result = train(cfg, tiny_model(cfg), progress=False)
    seen = losses(cfg.out)
    assert result["step"] == 30 and len(seen) == 30
    assert np.mean(seen[-5:]) < 0.5 * np.mean(seen[:3]), seen
    assert os.path.exists(os.path.join(cfg.out, "curves.png"))


def test_first_phase_trains_only_its_regex(pairs, tmp_path):
    cfg = config(pairs, tmp_path / "run")
    start = flatten_dict(tiny_model(cfg).params, sep="/")
    train(cfg, tiny_model(cfg), stop_at=2, progress=False)
    after = flat_params(cfg.out)
    changed = {k for k in start if not np.array_equal(np.asarray(start[k]), after[k])}
    assert changed == {"text_projection/kernel", "visual_projection/kernel"}  # fixed scale: logit_scale stays


def test_resume_is_bit_exact(pairs, tmp_path):
    whole = config(pairs, tmp_path / "whole")
    train(whole, tiny_model(whole), progress=False)
    parts = config(pairs, tmp_path / "parts")
    train(parts, tiny_model(parts), stop_at=4, progress=False)  # stopped inside the second phase
    train(parts, None, resume=True, progress=False)
    a, b = flat_params(whole.out), flat_params(parts.out)
    assert a.keys() == b.keys()
    for key in a:
        assert np.array_equal(a[key], b[key]), key
    assert losses(whole.out) == losses(parts.out)
    with pytest.raises(UsageError, match="batch_size"):
        train(dataclasses.replace(parts, batch_size=4), None, resume=True, progress=False)


def test_corrupt_image_is_skipped_and_counted(pairs, tmp_path):
    cfg = config(pairs, tmp_path / "run", phases=(Phase(3, EVERYTHING, 1e-3),))
    result = train(cfg, tiny_model(cfg), progress=False)
    assert result["step"] == 3 and result["skipped_images"] == 1


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["--preset", "tiny", "--manifest", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "o"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "none.jsonl" in err and "\n" not in err
    assert main(["--preset", "tiny", "--set", "nonsense=1", "--manifest", "x", "--no-progress"]) == 2
    assert "nonsense" in capsys.readouterr().err


@pytest.mark.slow  # about 75 s on 2 cores; test_modeling covers sharded encoding
def test_two_devices_train_like_one(pairs, tmp_path):
    script = textwrap.dedent(f"""
        import dataclasses, sys, jax, numpy as np
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_train import config, flat_params
        from jobs.presets import tiny_model
        from jobs.train import train
        assert jax.local_device_count() == 2
        cfg = config({pairs!r}, {str(tmp_path / 'two')!r})
        train(cfg, tiny_model(cfg), progress=False)
        print("OK")
    """)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]
    one = config(pairs, tmp_path / "one")
    train(one, tiny_model(one), progress=False)
    # Same batches and dropout masks on both; only the order of float reductions differs.
    np.testing.assert_allclose(losses(one.out), losses(tmp_path / "two"), rtol=1e-4)
    # Adaptive optimizers turn gradients that are zero in theory (e.g. attention key biases)
    # but differ in rounding into lr-sized steps, so params agree only to about the lr.
    a, b = flat_params(one.out), flat_params(tmp_path / "two")
    for key in a:
        np.testing.assert_allclose(a[key], b[key], atol=2e-3, err_msg=key)


def test_demo_model_keeps_minilm_layers_and_uses_the_korean_vocab():
    from jobs.presets import demo_model, minilm_dir

    built = demo_model()
    checkpoint.check_params(built.config, built.params)
    tokenizer = built.tokenizer()
    assert built.params["text_model"]["embeddings"]["word_embeddings"]["embedding"].shape[0] == len(tokenizer)
    assert "[UNK]" not in tokenizer.tokenize("빨간 사과 강아지 얼굴")
    _, minilm = checkpoint.import_text_encoder(minilm_dir())
    ours = flatten_dict(built.params["text_model"], sep="/")
    for key, value in flatten_dict(minilm, sep="/").items():
        if key != "embeddings/word_embeddings/embedding":
            assert np.array_equal(ours[key], value), key
