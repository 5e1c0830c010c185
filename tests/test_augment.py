"""Training augmentation: shape, reproducibility from the seed, and a hue shift kept small."""
from __future__ import annotations

import colorsys

import numpy as np
from PIL import Image

from koclip.augment import AugmentConfig, augment, random_resized_crop


def picture() -> Image.Image:
    array = np.full((90, 120, 3), 255, np.uint8)
    array[20:70, 30:90] = (220, 30, 30)  # a red block on white
    return Image.fromarray(array)


def test_output_size_and_mode():
    out = augment(picture(), 48, np.random.default_rng(0))
    assert out.size == (48, 48) and out.mode == "RGB"


def test_same_seed_same_image_other_seed_other_image():
    a = np.asarray(augment(picture(), 48, np.random.default_rng([3, 7])))
    b = np.asarray(augment(picture(), 48, np.random.default_rng([3, 7])))
    c = np.asarray(augment(picture(), 48, np.random.default_rng([3, 8])))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_red_stays_red():
    config = AugmentConfig(crop_scale=(0.9, 1.0), brightness=0.0, contrast=0.0, saturation=0.0)
    for seed in range(20):
        out = np.asarray(augment(picture(), 64, np.random.default_rng(seed), config), np.float32) / 255
        reddish = out[(out.max(axis=-1) - out.min(axis=-1)) > 0.5]  # saturated pixels
        hues = np.array([colorsys.rgb_to_hsv(*p)[0] for p in reddish])
        distance = np.minimum(hues, 1 - hues)  # around the wheel from pure red
        assert len(hues) > 100 and np.median(distance) < 0.06, seed


def test_crop_keeps_scale_bounds():
    image = Image.fromarray(np.arange(100 * 100 * 3, dtype=np.uint32).reshape(100, 100, 3).astype(np.uint8))
    out = random_resized_crop(image, 100, np.random.default_rng(0), scale=(1.0, 1.0), ratio=(1.0, 1.0))
    assert np.array_equal(np.asarray(out), np.asarray(image))
