"""Loading a published index: `load_index(path)` takes an index root (follows CURRENT) or one
version folder and gives an `Index` to search, with its rows' metadata.
"""
from __future__ import annotations

import json
import os
import tempfile

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from koclip import fs
from koclip.errors import IndexFolderError
from koclip.index.tuning import set_search_params
from koclip.index.versions import FORMAT, current_version


def read_index_file(path: str | faiss.Index) -> faiss.Index:
    """A faiss index from serialize_index bytes at `path` (local or gs://), or `path` itself."""
    if isinstance(path, faiss.Index):
        return path
    data = fs.read_bytes(os.fspath(path))
    try:
        return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
    except RuntimeError as e:  # faiss's only error type: a truncated or foreign file
        raise IndexFolderError(f"{path} is not a readable faiss index ({_first_line(e)})") from None


def _first_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1][:200] if lines else type(error).__name__


def resolve(path: str | os.PathLike) -> str:
    """The version folder `path` means: itself if it holds meta.json, else the one ROOT/CURRENT names."""
    path = os.fspath(path)
    if fs.exists(fs.join(path, "CURRENT")):
        version = current_version(path)
        if version is None:
            raise IndexFolderError(f"{path}/CURRENT names no complete version, and there is none to serve")
        return fs.join(path, "versions", version)
    if fs.exists(fs.join(path, "meta.json")):
        return path
    if not fs.exists(path):
        raise IndexFolderError(f"index folder not found: {path}; build one with `python -m pipelines.index`")
    raise IndexFolderError(f"{path} is not an index: no CURRENT (an index root) and no meta.json (a version "
                           "folder); build one with `python -m pipelines.index`")


def _read_faiss(folder: str, meta: dict) -> faiss.Index:
    if meta.get("layout", "single") == "single":
        return read_index_file(fs.join(folder, "index.faiss"))
    local = folder
    if "://" in folder:  # faiss memory-maps the inverted lists from a local file
        local = tempfile.mkdtemp(prefix="koclip-index-")
        for name in ("index.faiss", "index.ivfdata"):
            fs.download(fs.join(folder, name), os.path.join(local, name))
    try:
        return faiss.read_index(os.path.join(local, "index.faiss"), faiss.IO_FLAG_ONDISK_SAME_DIR)
    except RuntimeError as e:
        raise IndexFolderError(f"{folder}/index.faiss is not a readable faiss index ({_first_line(e)})") from None


class Index:
    """A loaded index version: search vectors, get rows' metadata."""

    def __init__(self, path: str, meta: dict, index: faiss.Index, rows: pa.Table):
        self.path, self.meta, self.faiss, self.rows = path, meta, index, rows
        self._ids: list[str] | None = None

    fingerprint = property(lambda self: self.meta["fingerprint"])
    dim = property(lambda self: int(self.meta["dim"]))
    count = property(lambda self: int(self.meta["count"]))
    kind = property(lambda self: self.meta["kind"])
    version = property(lambda self: self.meta["version"])

    @property
    def ids(self) -> list[str]:
        """The id of every row, in row order."""
        if self._ids is None:
            self._ids = self.rows.column("id").to_pylist()
        return self._ids

    def search(self, vectors: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """(scores float32 [N, k], rows int64 [N, k]) for float32 [N, D] (or [D]) queries, best first;
        rows are -1 (and scores -3.4e38) past the last hit when fewer than k are found."""
        queries = np.asarray(vectors, dtype=np.float32)
        queries = queries[None] if queries.ndim == 1 else queries
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"query vectors have shape {queries.shape}; this index needs [N, {self.dim}]")
        if int(k) < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        scores, rows = self.faiss.search(np.ascontiguousarray(queries), int(k))
        return scores.astype(np.float32, copy=False), rows.astype(np.int64, copy=False)

    def records(self, rows) -> list[dict | None]:
        """Metadata of each row number ({"row", "id", "item_id", "uri", "captions"}), None for -1."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        valid = rows[rows >= 0]
        if len(valid) and valid.max() >= len(self.rows):
            raise ValueError(f"row {int(valid.max())} is past the index's {len(self.rows)} rows")
        found = iter(self.rows.take(pa.array(valid)).to_pylist())
        return [{"row": int(r), **next(found)} if r >= 0 else None for r in rows]

    def __len__(self) -> int:
        return self.count

    def __repr__(self) -> str:
        return f"Index({self.kind}, {self.count} rows, dim {self.dim}, version {self.version}, {self.path})"


def load_index(path: str | os.PathLike, expect_fingerprint: str | None = None) -> Index:
    """The index at `path` (a root: its CURRENT version; or a version folder), search parameters set.

    With expect_fingerprint, refuses an index built by another model than the query model.
    """
    folder = resolve(path)
    try:
        meta = json.loads(fs.read_bytes(fs.join(folder, "meta.json")))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise IndexFolderError(f"{folder}/meta.json is not JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise IndexFolderError(f"{folder}/meta.json is not a koclip index's")
    if expect_fingerprint is not None and meta["fingerprint"] != expect_fingerprint:
        raise IndexFolderError(f"index built by model {meta['fingerprint']}, the query model is {expect_fingerprint}; "
                               "rebuild the index with this model's embeddings")
    index = _read_faiss(folder, meta)
    set_search_params(index, meta["search_params"])
    try:
        with fs.open(fs.join(folder, "rows.parquet")) as f:
            rows = pq.read_table(f)
    except pa.ArrowInvalid as e:
        raise IndexFolderError(f"{folder}/rows.parquet is not a readable Parquet file ({e})") from None
    if index.ntotal != meta["count"] or len(rows) != meta["count"]:
        raise IndexFolderError(f"{folder} is inconsistent: meta.json says {meta['count']} rows, index.faiss holds "
                               f"{index.ntotal}, rows.parquet {len(rows)}")
    return Index(folder, meta, index, rows)
