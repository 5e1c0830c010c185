"""Training-time image augmentation, as clip-italian did it, in Pillow and numpy.

Random resized crop, then a mild random affine or perspective warp, then colour jitter with a
limited hue shift (a large hue shift would turn a red apple green and break its caption).
Every draw comes from the `numpy.random.Generator` passed in, so a run is reproducible from its
seed and step, which is what exact resume relies on.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageEnhance


@dataclass(frozen=True)
class AugmentConfig:
    crop_scale: tuple[float, float] = (0.6, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    rotate_degrees: float = 10.0
    shear_degrees: float = 8.0
    perspective_prob: float = 0.3
    perspective_distortion: float = 0.15
    brightness: float = 0.3
    contrast: float = 0.3
    saturation: float = 0.3
    hue: float = 0.05  # fraction of the colour wheel


def random_resized_crop(image: Image.Image, out_size: int, rng: np.random.Generator,
                        scale=(0.6, 1.0), ratio=(3 / 4, 4 / 3)) -> Image.Image:
    width, height = image.size
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            left = int(rng.integers(0, width - w + 1))
            top = int(rng.integers(0, height - h + 1))
            return image.resize((out_size, out_size), Image.BICUBIC, box=(left, top, left + w, top + h))
    side = min(width, height)  # fall back to a centre crop
    left, top = (width - side) // 2, (height - side) // 2
    return image.resize((out_size, out_size), Image.BICUBIC, box=(left, top, left + side, top + side))


def random_affine(image: Image.Image, rng: np.random.Generator, degrees: float, shear: float) -> Image.Image:
    w, h = image.size
    angle = math.radians(rng.uniform(-degrees, degrees))
    sx = math.tan(math.radians(rng.uniform(-shear, shear)))
    cos, sin = math.cos(angle), math.sin(angle)
    # Inverse map (output -> input) about the centre: rotation then x-shear.
    a, b = cos, -sin + sx * cos
    d, e = sin, cos + sx * sin
    cx, cy = w / 2, h / 2
    c = cx - a * cx - b * cy
    f = cy - d * cx - e * cy
    return image.transform((w, h), Image.AFFINE, (a, b, c, d, e, f), Image.BILINEAR, fillcolor=(255, 255, 255))


def _perspective_coeffs(src, dst):
    """The 8 coefficients mapping output points `dst` to input points `src` (PIL's convention)."""
    rows, rhs = [], []
    for (x, y), (u, v) in zip(dst, src):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        rhs.extend([u, v])
    return np.linalg.solve(np.asarray(rows, float), np.asarray(rhs, float))


def random_perspective(image: Image.Image, rng: np.random.Generator, distortion: float) -> Image.Image:
    w, h = image.size
    dx, dy = distortion * w / 2, distortion * h / 2
    corners = [(0, 0), (w, 0), (w, h), (0, h)]
    moved = [(x + rng.uniform(-dx, dx), y + rng.uniform(-dy, dy)) for x, y in corners]
    coeffs = _perspective_coeffs(moved, corners)
    return image.transform((w, h), Image.PERSPECTIVE, tuple(coeffs), Image.BILINEAR, fillcolor=(255, 255, 255))


def color_jitter(image: Image.Image, rng: np.random.Generator, brightness: float, contrast: float,
                 saturation: float, hue: float) -> Image.Image:
    for enhancer, amount in ((ImageEnhance.Brightness, brightness), (ImageEnhance.Contrast, contrast),
                             (ImageEnhance.Color, saturation)):
        if amount:
            image = enhancer(image).enhance(rng.uniform(1 - amount, 1 + amount))
    if hue:
        hsv = np.asarray(image.convert("HSV")).copy()
        shift = int(round(rng.uniform(-hue, hue) * 255))
        hsv[..., 0] = (hsv[..., 0].astype(np.int16) + shift) % 256
        image = Image.fromarray(hsv, "HSV").convert("RGB")
    return image


def augment(image: Image.Image, out_size: int, rng: np.random.Generator,
            config: AugmentConfig = AugmentConfig()) -> Image.Image:
    """An RGB image -> an augmented RGB image of out_size x out_size."""
    image = random_resized_crop(image, out_size, rng, config.crop_scale, config.crop_ratio)
    if rng.uniform() < config.perspective_prob:
        image = random_perspective(image, rng, config.perspective_distortion)
    else:
        image = random_affine(image, rng, config.rotate_degrees, config.shear_degrees)
    return color_jitter(image, rng, config.brightness, config.contrast, config.saturation, config.hue)
