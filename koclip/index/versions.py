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
  ROOT/LOCK                    while a build runs: its lock (koclip.lock), held from reading CURRENT
                               or naming the version to publishing
Versions are named by UTC build-start time ("20250101-120000-123456"), so names sort in build
order, and CURRENT never moves to an older name (publish refuses). After a publish the newest `keep`
complete versions up to the published one stay and older ones are deleted; newer ones are left
alone, and so are unfinished folders unless the publisher holds the lock.

Reading a version back: koclip.index.load.
"""
from __future__ import annotations

import datetime
import io
import json
import logging
import posixpath
from collections.abc import Callable
from contextlib import contextmanager

import faiss
import pyarrow as pa
import pyarrow.parquet as pq

from koclip import fs
from koclip.errors import IndexBuildError, IndexFolderError, KoclipError
from koclip.index.plan import HNSW_EF_CONSTRUCTION, HNSW_M, Plan
from koclip.index.tuning import Tuning
from koclip.lock import Lock

log = logging.getLogger("koclip.index")


FORMAT = "koclip-index"
FORMAT_VERSION = 1
ROWS_SCHEMA = pa.schema([("id", pa.string()), ("item_id", pa.string()), ("uri", pa.string()),
                         ("captions", pa.list_(pa.string()))])


def new_version(root: str) -> str:
    """A version name from the UTC time (sortable), unique under ROOT/versions."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S-%f")
    name, n = stamp, 1
    while fs.exists(fs.join(root, "versions", name)):
        name, n = f"{stamp}-{n}", n + 1
    return name


def list_versions(root: str) -> list[str]:
    """Version names under ROOT/versions, oldest first (published or not)."""
    return sorted(posixpath.basename(e["path"].rstrip("/")) for e in fs.ls(fs.join(root, "versions")))


def _complete(root: str, version: str) -> bool:
    return bool(version) and "/" not in version and fs.exists(fs.join(root, "versions", version, "meta.json"))


def current_version(root: str) -> str | None:
    """The version CURRENT names, or None before the first publish. A CURRENT that is empty,
    unreadable or names no complete version (a damaged disk, a hand edit) is not trusted: the
    newest complete version is served instead, with a warning."""
    path = fs.join(root, "CURRENT")
    if not fs.exists(path):
        return None
    try:
        named = fs.read_bytes(path, limit=1024).decode().strip()
    except (UnicodeDecodeError, KoclipError):
        named = ""
    if _complete(root, named):
        return named
    complete = [v for v in list_versions(root) if _complete(root, v)]
    fallback = complete[-1] if complete else None
    log.warning("%s names no complete version (%r); serving the newest complete one, %s", path, named[:80],
                fallback)
    return fallback


def publish(root: str, version: str, keep: int = 3, *, remove_incomplete: bool = False) -> list[str]:
    """Point CURRENT at `version` (the last write), then delete complete versions older than the
    newest `keep` up to it. Returns the deleted names.

    CURRENT never moves backwards: when it names a version that sorts after `version`, nothing is
    changed and IndexBuildError says so. Folders without meta.json (a build still writing, or one
    that was killed) are left alone, unless `remove_incomplete` (for a caller holding the root's
    lock, koclip.lock: then no other build can be writing) removes those older than `version`.
    """
    if keep < 1:
        raise IndexBuildError(f"keep must be at least 1, got {keep}")
    if not fs.exists(fs.join(root, "versions", version, "meta.json")):
        raise IndexFolderError(f"cannot publish {version}: {root}/versions/{version} has no meta.json")
    published = current_version(root)
    if published is not None and published > version:
        raise IndexBuildError(f"a newer version {published} is already published in {root}; {version} is left "
                              "unpublished")
    fs.write_bytes(fs.join(root, "CURRENT"), f"{version}\n".encode())
    older = [v for v in list_versions(root) if v < version]
    complete = [v for v in older if _complete(root, v)]
    doomed = complete[:max(0, len(complete) - (keep - 1))]
    if remove_incomplete:
        doomed = sorted(doomed + [v for v in older if v not in complete])
    for name in doomed:
        fs.remove_tree(fs.join(root, "versions", name))
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
        "build_params": build_params(plan),
        "count": count, "dim": dim, "column": column, "fingerprint": fingerprint, "model_config": model_config,
        "store_root": store_root,
        "recall_at_10": round(tuning.recall, 4), "recall_queries": tuning.queries,
        "recall_lower_bound": None if tuning.recall_lower_bound is None else round(tuning.recall_lower_bound, 4),
        "recall_queries_from": "corpus rows held out of the index while tuning", "target_recall": target_recall,
        "target_reached": tuning.reached, "recall_version": version,
        "max_memory": max_memory, "estimated_bytes": plan.estimated_bytes, "index_bytes": index_bytes,
        "choice": plan.reason, "build_seconds": round(build_seconds, 2), **extra,
    }


def build_params(plan: Plan) -> dict:
    if plan.kind == "ivfpq":
        return {"nlist": plan.nlist, "pq_m": plan.pq_m, "refine": "SQ8" if plan.refine else None,
                "train_rows": plan.train_rows}
    if plan.kind in ("ivfflat", "ivfsq8"):
        return {"nlist": plan.nlist, "train_rows": plan.train_rows}
    return {"M": HNSW_M, "efConstruction": HNSW_EF_CONSTRUCTION} if plan.kind == "hnsw" else {}


@contextmanager
def removed_on_failure(root: str, version: str):
    """Around the building of versions/<version>: any failure inside removes the folder (`discard`)."""
    try:
        yield
    except BaseException:
        discard(root, version)
        raise


def publish_written(root: str, version: str, keep: int, before_publish: Callable[[str], None] | None,
                    lock: Lock | None = None) -> tuple[str, ...]:
    """versions/<version> is complete: run the before_publish hook on it, check that `lock` (the
    root's, koclip.lock) is still held, then flip CURRENT (keeping `keep` versions). Returns the
    versions pruned."""
    if before_publish is not None:
        before_publish(fs.join(root, "versions", version))
    if lock is not None:
        lock.check()
    return tuple(publish(root, version, keep, remove_incomplete=lock is not None))


def discard(root: str, version: str) -> None:
    """Remove a failed build's folder, unless CURRENT already names it (a failure while pruning)."""
    try:
        if current_version(root) != version:
            fs.remove_tree(fs.join(root, "versions", version))
    except Exception as e:  # the original error matters more; the next publish prunes leftovers
        log.warning("could not remove %s/versions/%s: %s", root, version, e)
