"""The query API (koclip.query re-exports it): models and indexes cached per process, search,
classify and rank_patches."""
from __future__ import annotations

import os
import pathlib
from collections import Counter
from dataclasses import dataclass

import numpy as np
from PIL import Image

from koclip.errors import FingerprintMismatch, ImageDecodeError, IndexFolderError, QueryError, QueryImageError
from koclip.query.prompts import DEFAULT_TEMPLATE, prompts
from koclip.query.ranges import dedup_keep, hit_vectors, range_rows

DEFAULT_BATCH_SIZE = 8  # the fixed encoder batch: small, since queries come one or a few at a time
IMAGE_TYPES = (pathlib.PurePath, bytes, bytearray, memoryview, Image.Image)


@dataclass(frozen=True)
class Hit:
    rank: int  # 1-based
    score: float  # cosine similarity of the query and the item's embedding
    id: str
    uri: str
    captions: list[str]
    item_id: str  # the item's id; differs from id only in a caption index, whose rows are "item#k"


# ---------------------------------------------------------------- models


class QueryModel:
    """A checkpoint ready to embed queries: encoders jitted once per shape and reused."""

    def __init__(self, ckpt, batch_size: int = DEFAULT_BATCH_SIZE, dtype: str = "float32"):
        from koclip.encoders import checkpoint_encoders
        from koclip.processing import ImagePreprocessor

        self.checkpoint = ckpt
        self.config = ckpt.config
        self.fingerprint = ckpt.fingerprint
        self.batch_size = batch_size
        self.dtype = dtype
        self.encoders = checkpoint_encoders(ckpt, batch_size, dtype)
        self.preprocessor = ImagePreprocessor.from_config(ckpt.config)
        self.logit_scale = float(ckpt.model(dtype).logit_scale(ckpt.params))
        self._patch_encoder = None

    def open(self, source):
        """A query image (Path, bytes or PIL image) as an RGB PIL image; QueryImageError if it
        cannot be decoded."""
        from koclip.processing import open_image

        if not isinstance(source, IMAGE_TYPES):
            raise TypeError(f"an image query is a pathlib.Path, bytes or a PIL image, not {type(source).__name__}")
        what = str(source) if isinstance(source, pathlib.PurePath) else f"({type(source).__name__})"
        try:
            return open_image(source, self.preprocessor.max_pixels)
        except ImageDecodeError as e:
            raise QueryImageError(e.reason, e.message, what) from None

    def embed_images(self, sources) -> np.ndarray:
        """L2-normalised float32 [N, D] for images given as Path, bytes or PIL images."""
        pixels = [self.preprocessor.preprocess(self.open(s)) for s in sources]
        return np.asarray(self.encoders.images(np.stack(pixels)), dtype=np.float32)

    def embed_texts(self, texts) -> np.ndarray:
        """L2-normalised float32 [N, D]."""
        texts = list(texts)
        if any(not isinstance(t, str) or not t.strip() for t in texts):
            raise QueryError("a text query is empty")
        return np.asarray(self.encoders.texts(texts), dtype=np.float32)

    def embed_patches(self, pixels: np.ndarray) -> np.ndarray:
        """Per-patch-token embeddings [B, P, D] of preprocessed pixels (koclip.query.patches, mode tokens)."""
        if self._patch_encoder is None:
            from koclip.modeling.parallel import BatchEncoder

            model = self.checkpoint.model(self.dtype)
            self._patch_encoder = BatchEncoder(model.encode_patches, model.cast_params(self.checkpoint.params), 1)
        return self._patch_encoder(pixels)

    def compiles(self) -> dict:
        """How many times each jitted encoder was traced so far."""
        counts = dict(self.encoders.compiles())
        counts["patches"] = self._patch_encoder.compiles if self._patch_encoder else 0
        return counts


_MODELS: dict[tuple, QueryModel] = {}
_INDEXES: dict[str, tuple[str, object]] = {}  # path -> (version, index)
_LOADS: Counter = Counter()


def load_model(path=None, *, batch_size: int = DEFAULT_BATCH_SIZE, dtype: str = "float32") -> QueryModel:
    """The checkpoint at `path` (default: the demo model) as a QueryModel, cached per process."""
    from koclip import fs
    from koclip.checkpoint import load_checkpoint
    from koclip.data import demo_model_dir

    path = os.fspath(path) if path is not None else demo_model_dir()
    key = (path if "://" in path else os.path.abspath(path), batch_size, dtype)
    if key not in _MODELS:
        if not fs.exists(fs.join(path, "config.json")):
            raise QueryError(f"no model at {path}; train the demo model with `python -m jobs.train` "
                             "or pass a checkpoint directory (--model DIR)")
        _MODELS[key] = QueryModel(load_checkpoint(path), batch_size, dtype)
        _LOADS["model"] += 1
    return _MODELS[key]


def load_index(path=None):
    """The index at `path` (default: the demo index), cached per process. An index root is
    cached by the version its CURRENT pointer names: a newly published version is loaded by the
    next call, and replaces the old one in the cache."""
    from koclip import fs
    from koclip import index as faiss_index
    from koclip.data import demo_index_dir

    path = os.fspath(path) if path is not None else demo_index_dir()
    if not fs.exists(path):
        raise QueryError(f"no index at {path}; build one with `python -m pipelines.index` (or pass --index DIR)")
    key = path if "://" in path else os.path.abspath(path)
    try:
        version = faiss_index.resolve_version(path)
        if key not in _INDEXES or _INDEXES[key][0] != version:
            _INDEXES[key] = (version, faiss_index.load_index(version))
            _LOADS["index"] += 1
    except IndexFolderError as e:  # not an index, or an inconsistent one
        raise QueryError(str(e)) from e
    return _INDEXES[key][1]


def cache_info() -> dict:
    """{"model_loads", "index_loads": loads so far; "models", "indexes": what is cached}."""
    return {"model_loads": _LOADS["model"], "index_loads": _LOADS["index"],
            "models": [key[0] for key in _MODELS], "indexes": [version for version, _ in _INDEXES.values()]}


def clear_cache() -> None:
    """Forget every cached model and index (the load counters keep counting)."""
    _MODELS.clear()
    _INDEXES.clear()


def _model(model) -> QueryModel:
    if isinstance(model, QueryModel):
        return model
    from koclip.checkpoint import Checkpoint

    if isinstance(model, Checkpoint):  # not cached: wrap it once in QueryModel to reuse it
        return QueryModel(model)
    return load_model(model)


def _index(index):
    if index is None or isinstance(index, (str, os.PathLike)):
        return load_index(index)
    return index


def check_compatible(index, model: QueryModel) -> None:
    if index.fingerprint != model.fingerprint:
        where = getattr(index, "path", None) or "the index"
        raise FingerprintMismatch(
            f"{where} holds embeddings of model {index.fingerprint}, but the query model is "
            f"{model.fingerprint}; query with the model that embedded the corpus, or re-embed and rebuild the index")


# ---------------------------------------------------------------- search


def _kind(item) -> str:
    if isinstance(item, str):
        return "text"
    if isinstance(item, IMAGE_TYPES):
        return "image"
    if isinstance(item, np.ndarray) and item.ndim == 1:
        return "vector"
    raise TypeError(f"a query is a str (text), a pathlib.Path, bytes or PIL image (image) or a 1-D numpy "
                    f"vector, not {type(item).__name__}" + (f" of shape {item.shape}" if hasattr(item, "shape") else ""))


def _as_batch(query) -> tuple[list, bool]:
    """(items, whether the query was a single item)."""
    if isinstance(query, (list, tuple)) or (isinstance(query, np.ndarray) and query.ndim == 2):
        return list(query), False
    return [query], True


def embed_queries(items: list, model, dim: int) -> np.ndarray:
    """float32 [N, dim], L2-normalised: texts and images through the model, vectors as given."""
    kinds = [_kind(item) for item in items]
    out = np.zeros((len(items), dim), dtype=np.float32)
    for kind, method in (("text", "embed_texts"), ("image", "embed_images")):
        positions = [i for i, k in enumerate(kinds) if k == kind]
        if positions:  # texts together, images together: one encoder call each
            out[positions] = getattr(model(), method)([items[i] for i in positions])
    for i in (i for i, k in enumerate(kinds) if k == "vector"):
        vector = np.asarray(items[i], dtype=np.float32)
        norm = float(np.linalg.norm(vector))
        if vector.shape != (dim,) or not np.isfinite(norm) or norm == 0:
            raise QueryError(f"a query vector must be a finite, non-zero vector of the index's dimension {dim}, "
                             f"got shape {vector.shape} and norm {norm}")
        out[i] = vector / norm
    return out


def search(query, k: int | None = 10, index=None, model=None, min_score: float | None = None,
           dedup: float | None = None):
    """The k items nearest to `query`, best first, as Hits; a list of hit lists for a batch.

    query: a str (text), a pathlib.Path / bytes / PIL image (image), a numpy vector [D], or a
        list of these / a numpy array [N, D] (a batch).
    index: an index path (default: the demo index) or a loaded index (koclip.index.load_index).
    model: a checkpoint path (default: the demo model), a QueryModel or a Checkpoint. Not
        loaded when every query is a vector. Its fingerprint must be the index's.
    min_score: a range search: every item whose score is >= min_score (k is then a cap, or None
        for all of them), through faiss's range_search where the index has one, else a k search
        widened until its last score falls below min_score.
    dedup: drop near-duplicates as clip-retrieval's clip_back does (it uses 0.94): hits whose
        vectors' cosine similarity is >= dedup are linked, and of each connected group only the
        best-ranked hit is kept. The vectors are reconstructed from the index (approximate for
        quantised kinds). It filters the hits found, so fewer than k may come back.
    Fewer than k hits come back when the index holds fewer than k items.
    """
    if not (k is None and min_score is not None):
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise QueryError(f"k must be a positive integer (or None with min_score), got {k!r}")
    for name, value in (("min_score", min_score), ("dedup", dedup)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float, np.floating))
                                  or not np.isfinite(value)):
            raise QueryError(f"{name} must be a finite number, got {value!r}")
    items, single = _as_batch(query)
    if not items:
        return []
    idx = _index(index)
    loaded = []

    def get_model():
        if not loaded:
            loaded.append(_model(model))
            check_compatible(idx, loaded[0])
        return loaded[0]

    vectors = embed_queries(items, get_model, int(idx.dim))
    results = [_hits(idx, query_scores, query_rows)
               for query_scores, query_rows in search_rows(idx, vectors, k, min_score, dedup)]
    return results[0] if single else results


def _hits(idx, scores: np.ndarray, rows: np.ndarray) -> list[Hit]:
    records = idx.records(rows)
    return [Hit(rank, float(score), str(r["id"]), str(r["uri"]), list(r["captions"] or []),
                str(r.get("item_id") or r["id"]))
            for rank, (score, r) in enumerate(zip(scores, records), start=1)]


def search_rows(idx, vectors: np.ndarray, k: int | None = 10, min_score: float | None = None,
                dedup: float | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """search() on normalised float32 [N, D] vectors, as (scores, row numbers) per query, best
    first, no -1 rows (the service calls this with the vectors it embedded in a batch)."""
    if min_score is None:
        scores, rows = idx.search(vectors, int(k))
        found = [(s[r >= 0], r[r >= 0]) for s, r in zip(np.asarray(scores), np.asarray(rows))]
    else:
        found = range_rows(idx, vectors, float(min_score), k)
    if dedup is not None:
        found = [(s[keep], r[keep]) for s, r in found
                 for keep in [dedup_keep(hit_vectors(idx, r), float(dedup))]]
    return found


# ---------------------------------------------------------------- classify and patches


def classify(image, labels, template: str = DEFAULT_TEMPLATE, model=None):
    """Zero-shot label probabilities of an image: softmax over the labels of
    logit_scale x cosine(image, template.format(label)), as (label, probability) best first.

    A list of images gives one such list per image (the prompts are embedded once).
    """
    labels = [labels] if isinstance(labels, str) else list(labels)
    if not labels:
        raise QueryError("classify needs at least one label")
    if any(not isinstance(label, str) or not label.strip() for label in labels):
        raise QueryError("a label is empty")
    if len(set(labels)) != len(labels):
        raise QueryError("the labels repeat: " + ", ".join(sorted({x for x in labels if labels.count(x) > 1})))
    texts = prompts(template, labels)
    images, single = ([image], True) if not isinstance(image, (list, tuple)) else (list(image), False)
    if not images:
        return []
    m = _model(model)
    prompt_vectors = m.embed_texts(texts).astype(np.float64)
    logits = m.logit_scale * (m.embed_images(images).astype(np.float64) @ prompt_vectors.T)
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    results = [[(labels[j], float(p[j])) for j in np.argsort(-p, kind="stable")] for p in probs]
    return results[0] if single else results


def rank_patches(text: str, image, grid=(3, 3), mode: str = "crops", model=None):
    """Score a rows x cols grid of cells of `image` against `text` (koclip.query.patches explains the
    "crops" and "tokens" modes); returns a koclip.query.patches.PatchRanking with boxes, scores,
    ranks, score_grid, overlay() and save_overlay(path)."""
    from koclip.query.patches import rank_patches_with

    return rank_patches_with(_model(model), text, image, grid, mode)

