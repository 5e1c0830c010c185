"""The files of a koclip index: versions, atomic publishing, meta.json, and loading.

Layout of an index root (local or gs://):
  ROOT/CURRENT                 the published version's name, written last (the atomic publish)
  ROOT/versions/<version>/     index.faiss    faiss.serialize_index bytes
                               index.ivfdata  the inverted lists, when meta "layout" is "ondisk"
                                              (the distributed build; memory-mapped when loaded)
                               trained.faiss  ivfpq only: the trained empty index (OPQ, coarse
                                              quantizer, PQ codebooks), reusable by a rebuild
                               rows.parquet   row number -> id, item_id, uri, captions
                               meta.json      written last in the folder; see make_meta()
Versions are named by UTC build-start time ("20250101-120000-123456"), so names sort in build
order. After a publish the newest `keep` versions up to the published one stay and older ones are
deleted; newer, unpublished ones are left alone (another build may still be writing them).

load_index(path) accepts an index root (follows CURRENT) or one version folder.
"""
from __future__ import annotations

import datetime
import io
import json
import logging
import os
import tempfile

import faiss
import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from koclip import fs
from koclip.index_faiss import (HNSW_EF_CONSTRUCTION, HNSW_M, IndexBuildError, KoclipIndexError, Plan, Tuning,
                                set_search_params)

log = logging.getLogger("koclip.index")

FORMAT = "koclip-index"
FORMAT_VERSION = 1
ROWS_SCHEMA = pa.schema([("id", pa.string()), ("item_id", pa.string()), ("uri", pa.string()),
                         ("captions", pa.list_(pa.string()))])


class IndexFolderError(KoclipIndexError):
    """A path that is not a usable index: no CURRENT or meta.json, or made by another model."""


# ---------------------------------------------------------------- versions and publishing


def new_version(root: str) -> str:
    """A version name from the UTC time (sortable), unique under ROOT/versions."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S-%f")
    name, n = stamp, 1
    while fs.exists(fs.join(root, "versions", name)):
        name, n = f"{stamp}-{n}", n + 1
    return name


def list_versions(root: str) -> list[str]:
    """Version names under ROOT/versions, oldest first (published or not)."""
    filesystem, path = fsspec.core.url_to_fs(fs.join(root, "versions"))
    if not filesystem.exists(path):
        return []
    return sorted(os.path.basename(p.rstrip("/")) for p in filesystem.ls(path, detail=False))


def current_version(root: str) -> str | None:
    """The version CURRENT names, or None before the first publish."""
    path = fs.join(root, "CURRENT")
    return fs.read_bytes(path).decode().strip() if fs.exists(path) else None


def remove_tree(path: str) -> None:
    filesystem, fs_path = fsspec.core.url_to_fs(path)
    if filesystem.exists(fs_path):
        filesystem.rm(fs_path, recursive=True)


def publish(root: str, version: str, keep: int = 3) -> list[str]:
    """Point CURRENT at `version` (the last write), then delete versions older than the newest
    `keep` up to it. Returns the deleted names."""
    if keep < 1:
        raise IndexBuildError(f"keep must be at least 1, got {keep}")
    if not fs.exists(fs.join(root, "versions", version, "meta.json")):
        raise IndexFolderError(f"cannot publish {version}: {root}/versions/{version} has no meta.json")
    fs.write_bytes(fs.join(root, "CURRENT"), f"{version}\n".encode())
    older = [v for v in list_versions(root) if v <= version]
    doomed = [v for v in older[:-keep] if v != version]
    for name in doomed:
        remove_tree(fs.join(root, "versions", name))
    log.info("published %s in %s (deleted %d old versions)", version, root, len(doomed))
    return doomed


def write_version(root: str, version: str, index: faiss.Index, rows: pa.Table, meta: dict,
                  trained: faiss.Index | None = None) -> str:
    """Write index.faiss, trained.faiss, rows.parquet and, last, meta.json; returns the folder."""
    folder = fs.join(root, "versions", version)
    data = faiss.serialize_index(index).tobytes()
    meta["index_bytes"] = len(data)
    fs.write_bytes(fs.join(folder, "index.faiss"), data)
    if trained is not None:
        fs.write_bytes(fs.join(folder, "trained.faiss"), faiss.serialize_index(trained).tobytes())
    write_rows(fs.join(folder, "rows.parquet"), rows)
    write_meta(folder, meta)
    return folder


def write_rows(path: str, rows: pa.Table) -> None:
    buffer = io.BytesIO()
    pq.write_table(rows.cast(ROWS_SCHEMA), buffer, compression="zstd")
    fs.write_bytes(path, buffer.getvalue())


def write_meta(folder: str, meta: dict) -> None:
    fs.write_bytes(fs.join(folder, "meta.json"), json.dumps(meta, indent=2, ensure_ascii=False).encode())


def make_meta(*, version: str, plan: Plan, tuning: Tuning, store_root: str | None, column: str, count: int,
              dim: int, fingerprint: str, model_config: dict, target_recall: float, max_memory: int,
              build_seconds: float, index_bytes: int = 0, layout: str = "single", **extra) -> dict:
    """meta.json: what the index is, how it was tuned and what it was built from (fields: docs/index.md)."""
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "version": version,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "kind": plan.kind, "factory": plan.factory, "metric": "inner_product", "layout": layout,
        "search_params": tuning.params,
        "build_params": {"nlist": plan.nlist, "pq_m": plan.pq_m, "refine": "SQ8" if plan.refine else None,
                         "train_rows": plan.train_rows} if plan.kind == "ivfpq" else
                        ({"M": HNSW_M, "efConstruction": HNSW_EF_CONSTRUCTION} if plan.kind == "hnsw" else {}),
        "count": count, "dim": dim, "column": column, "fingerprint": fingerprint, "model_config": model_config,
        "store_root": store_root,
        "recall_at_10": round(tuning.recall, 4), "recall_queries": tuning.queries,
        "recall_queries_from": "corpus rows held out of the index while tuning", "target_recall": target_recall,
        "target_reached": tuning.reached, "recall_version": version,
        "max_memory": max_memory, "estimated_bytes": plan.estimated_bytes, "index_bytes": index_bytes,
        "choice": plan.reason, "build_seconds": round(build_seconds, 2), **extra,
    }


# ---------------------------------------------------------------- loading


def read_index_file(path: str | faiss.Index) -> faiss.Index:
    """A faiss index from serialize_index bytes at `path` (local or gs://), or `path` itself."""
    if isinstance(path, faiss.Index):
        return path
    return faiss.deserialize_index(np.frombuffer(fs.read_bytes(os.fspath(path)), dtype=np.uint8))


def resolve(path: str | os.PathLike) -> str:
    """The version folder `path` means: itself if it holds meta.json, else the one ROOT/CURRENT names."""
    path = os.fspath(path)
    if fs.exists(fs.join(path, "CURRENT")):
        version = current_version(path)
        folder = fs.join(path, "versions", version)
        if not fs.exists(fs.join(folder, "meta.json")):
            raise IndexFolderError(f"{path}/CURRENT names version {version!r}, which has no meta.json")
        return folder
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
        filesystem, remote = fsspec.core.url_to_fs(folder)
        for name in ("index.faiss", "index.ivfdata"):
            filesystem.get(f"{remote.rstrip('/')}/{name}", os.path.join(local, name))
    return faiss.read_index(os.path.join(local, "index.faiss"), faiss.IO_FLAG_ONDISK_SAME_DIR)


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
    meta = json.loads(fs.read_bytes(fs.join(folder, "meta.json")))
    if meta.get("format") != FORMAT:
        raise IndexFolderError(f"{folder}/meta.json is not a koclip index's (format {meta.get('format')!r})")
    if expect_fingerprint is not None and meta["fingerprint"] != expect_fingerprint:
        raise IndexFolderError(f"index built by model {meta['fingerprint']}, the query model is {expect_fingerprint}; "
                               "rebuild the index with this model's embeddings")
    index = _read_faiss(folder, meta)
    set_search_params(index, meta["search_params"])
    with fsspec.open(fs.join(folder, "rows.parquet"), "rb") as f:
        rows = pq.read_table(f)
    if index.ntotal != meta["count"] or len(rows) != meta["count"]:
        raise IndexFolderError(f"{folder} is inconsistent: meta.json says {meta['count']} rows, index.faiss holds "
                               f"{index.ntotal}, rows.parquet {len(rows)}")
    return Index(folder, meta, index, rows)
