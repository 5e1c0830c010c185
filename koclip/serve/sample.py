"""A small random model and its indexes, to try the service (and to test and benchmark it):

    make_sample(folder, items=48) -> Sample(model, image_index, caption_index, store)

writes a random-init checkpoint (`koclip init --tiny`'s, or any config), `items` noise images
with Korean captions, their embeddings as a Parquet store, and flat image and caption indexes
built by koclip.index. The rankings mean nothing; the files are the real formats.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from PIL import Image

COLOURS = ("빨간", "파란", "노란", "초록", "하얀", "검은")
THINGS = ("사과", "고양이", "자동차", "꽃", "강아지", "바다", "하늘", "의자")


@dataclass(frozen=True)
class Sample:
    model: str
    image_index: str
    caption_index: str
    store: str
    images: list[str]
    captions: list[list[str]]


def make_model(out: str, config=None, seed: int = 0) -> str:
    """A random-init checkpoint of `config` (default: tiny-bert-clip) with a tiny WordPiece vocabulary."""
    from koclip import checkpoint
    from koclip.config import NAMED_CONFIGS
    from koclip.modeling import KoCLIP
    from koclip.vocab import TINY_CORPUS, train_wordpiece

    config = config or NAMED_CONFIGS["tiny-bert-clip"]()
    tokenizer = train_wordpiece(TINY_CORPUS, vocab_size=config.text_config.vocab_size)
    checkpoint.save_checkpoint(out, config, KoCLIP(config).init(seed), tokenizer=tokenizer)
    return out


def write_images(folder: str, items: int, seed: int = 0) -> tuple[list[str], list[list[str]]]:
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths, captions = [], []
    for i in range(items):
        colour = rng.integers(0, 256, 3)
        pixels = np.clip(colour + rng.normal(0, 40, (40, 48, 3)), 0, 255).astype(np.uint8)
        path = os.path.join(folder, f"item{i:04d}.png")
        Image.fromarray(pixels).save(path)
        paths.append(path)
        captions.append([f"{COLOURS[i % len(COLOURS)]} {THINGS[(i // len(COLOURS)) % len(THINGS)]} {i}",
                         f"{THINGS[i % len(THINGS)]} 사진"])
    return paths, captions


def write_store(out: str, model, paths: list[str], captions: list[list[str]], first: int = 0) -> str:
    """Embed the images and captions with `model` (a koclip.query.QueryModel) into one shard at `out`."""
    from pathlib import Path

    from koclip.store import Row, rows_to_table, shard_name, write_shard

    images = model.embed_images([Path(p) for p in paths])
    rows = [Row(f"item{first + i:04d}", path, f"{first + i:064x}", 48, 40, list(texts), images[i],
                model.embed_texts(texts), "test") for i, (path, texts) in enumerate(zip(paths, captions))]
    table = rows_to_table(rows, model.fingerprint, model.config.to_dict(), model.config.projection_dim)
    write_shard(os.path.join(out, shard_name(first)), table)
    return out


def make_sample(folder: str, items: int = 48, config=None, seed: int = 0, model_dir: str | None = None,
                query_model=None) -> Sample:
    """The sample under `folder`; with model_dir, that checkpoint instead of a new random one (and
    query_model, a koclip.query.QueryModel of it, to embed with)."""
    from koclip.checkpoint import load_checkpoint
    from koclip.index import build_index
    from koclip.query.api import QueryModel

    model_dir = model_dir or make_model(os.path.join(folder, "model"), config, seed)
    model = query_model or QueryModel(load_checkpoint(model_dir), batch_size=8)
    paths, captions = write_images(os.path.join(folder, "images"), items, seed)
    store = write_store(os.path.join(folder, "store"), model, paths, captions)
    image_index = os.path.join(folder, "index", "images")
    caption_index = os.path.join(folder, "index", "captions")
    build_index(store, image_index, kind="flat", queries=min(100, items // 4))
    build_index(store, caption_index, column="caption_embeddings", kind="flat", queries=min(100, items // 4))
    return Sample(model_dir, image_index, caption_index, store, paths, captions)
