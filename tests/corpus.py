"""A small corpus of good and bad inputs for the embedding pipeline, written with Pillow.

`write_corpus(folder)` writes the files and returns (manifest records, expected outcome per id):
the outcome is "embedded" or the dead-letter reason the pipeline must give.
"""
from __future__ import annotations

import io
import json
import os

import numpy as np
from PIL import Image


def _photo(seed: int, size=(48, 40)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _save(image: Image.Image, path: str, **kwargs) -> None:
    image.save(path, **kwargs)


def write_corpus(folder: str) -> tuple[list[dict], dict[str, str]]:
    os.makedirs(folder, exist_ok=True)
    p = lambda name: os.path.join(folder, name)  # noqa: E731
    expected: dict[str, str] = {}
    records: list[dict] = []

    def add(item_id: str, filename: str, outcome: str, captions=None):
        records.append({"id": item_id, "image": filename, "captions": captions or [f"그림 {item_id}"]})
        expected[item_id] = outcome

    for i in range(4):
        _save(_photo(i), p(f"good{i}.png"))
        add(f"good{i}", f"good{i}.png", "embedded")

    good_jpeg = io.BytesIO()
    _photo(10, (64, 64)).save(good_jpeg, format="JPEG", quality=90)
    with open(p("truncated.jpg"), "wb") as f:
        f.write(good_jpeg.getvalue()[: len(good_jpeg.getvalue()) // 2])
    add("truncated", "truncated.jpg", "truncated")

    open(p("empty.jpg"), "wb").close()
    add("zero_bytes", "empty.jpg", "empty")

    with open(p("text.jpg"), "w") as f:
        f.write("this is a text file, not a JPEG\n")
    add("text_as_jpg", "text.jpg", "not_an_image")

    # 9000 x 9000 = 81M pixels, over the default 8192^2 limit, in a few hundred KB of PNG.
    Image.new("1", (9000, 9000)).save(p("bomb.png"), optimize=True)
    add("bomb", "bomb.png", "too_many_pixels")

    _photo(11).convert("CMYK").save(p("cmyk.jpg"), format="JPEG")
    add("cmyk", "cmyk.jpg", "embedded")

    wide = (np.arange(40 * 48, dtype=np.uint16).reshape(40, 48) * 30)
    Image.fromarray(wide).save(p("gray16.png"))  # uint16: mode I;16
    add("gray16", "gray16.png", "embedded")

    palette = _photo(12).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.info["transparency"] = 0
    palette.save(p("palette_alpha.png"), transparency=0)
    add("palette_alpha", "palette_alpha.png", "embedded")

    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    _photo(13, (60, 30)).save(p("rotated.jpg"), format="JPEG", exif=exif.tobytes())
    add("exif_rotated", "rotated.jpg", "embedded")

    frames = [_photo(20 + k) for k in range(3)]
    frames[0].save(p("animated.gif"), save_all=True, append_images=frames[1:], duration=100, loop=0)
    add("animated_gif", "animated.gif", "embedded")

    add("missing", "does_not_exist.png", "not_found")

    _save(_photo(30), p("captionless.png"))
    # a blank caption is dropped (and counted); the image and its good caption are embedded
    add("blank_caption", "captionless.png", "embedded", captions=["좋은 캡션", "  "])

    for i in range(4, 6):
        _save(_photo(i), p(f"good{i}.png"))
        add(f"good{i}", f"good{i}.png", "embedded")
    return records, expected


def write_manifest(path: str, records: list[dict]) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path
