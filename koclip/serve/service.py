"""What the service serves, without HTTP: one model, the named indexes, and the swap to a newly
published version.

An index NAME may be given twice, once with an image index and once with a caption index (its
meta.json `column` says which): clip-retrieval's `modality` picks one of them. Every index must
hold embeddings of the served model (its fingerprint).

Swapping: `reload_changed()` reads each index root's CURRENT; when it names another version, that
version is loaded completely (faiss index and rows) and only then put in place of the old one, with
one assignment. A request holds the `Served` entry it started with, so it finishes on the old
version, and the next one uses the new version: no request fails or sees half an index.
"""
from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field

import numpy as np

from koclip import index as koclip_index
from koclip.errors import IndexFolderError, KoclipError, UsageError
from koclip.query.api import QueryModel, search_rows
from koclip.serve.protocol import RequestError

log = logging.getLogger("koclip.serve")

MODALITY_OF_COLUMN = {"image_embedding": "image", "caption_embeddings": "text"}


@dataclass
class Served:
    """One loaded index version under its name and modality."""

    name: str
    modality: str
    root: str  # what --index named: an index root (follows CURRENT) or one version folder
    index: koclip_index.Index
    _rows_by_id: dict | None = field(default=None, repr=False)

    @property
    def version(self) -> str:
        return self.index.version

    def row_of(self, item) -> int | None:
        """The row of an id (str), or an int taken as a row number; None when there is none."""
        if isinstance(item, int):
            return item if 0 <= item < len(self.index) else None
        if self._rows_by_id is None:
            self._rows_by_id = {value: row for row, value in enumerate(self.index.ids)}
        return self._rows_by_id.get(item)


def parse_index_spec(spec: str) -> tuple[str, str]:
    """"NAME=DIR" -> (NAME, DIR)."""
    name, eq, path = spec.partition("=")
    if not eq or not name.strip() or not path.strip():
        raise UsageError(f"--index takes NAME=DIR (e.g. emoji-ko=~/.cache/koclip/index/emoji-ko), got {spec!r}")
    return name.strip(), os.path.expanduser(path.strip())


class Service:
    """The model and the indexes of one server process."""

    def __init__(self, model: QueryModel, indexes: list[tuple[str, str]]):
        self.model = model
        self.names: list[str] = []
        self._served: dict[tuple[str, str], Served] = {}
        self._failed_versions: set[str] = set()
        self._reload_lock = threading.Lock()
        self.swaps = 0
        self.reload_failures = 0  # new versions refused (unreadable, another model's)
        for name, root in indexes:
            served = self._load(name, root)
            key = (name, served.modality)
            if key in self._served:
                raise UsageError(f"--index {name}= is given twice with {served.modality} embeddings "
                                 f"({self._served[key].root} and {root}); give one image and one caption index per name")
            self._served[key] = served
            if name not in self.names:
                self.names.append(name)
        if not self._served:
            raise UsageError("no index to serve; pass --index NAME=DIR")

    def _load(self, name: str, root: str) -> Served:
        index = koclip_index.load_index(root, expect_fingerprint=self.model.fingerprint)
        modality = MODALITY_OF_COLUMN.get(index.meta.get("column", "image_embedding"))
        if modality is None:
            raise IndexFolderError(f"{root} indexes column {index.meta.get('column')!r}, neither image nor caption embeddings")
        return Served(name, modality, root, index)

    def served(self) -> list[Served]:
        return list(self._served.values())

    def get(self, name: str | None, modality: str) -> Served:
        """The index of that name and modality (name None: the first one, as clip_back does);
        RequestError 404 when there is none."""
        name = self.names[0] if name is None else name
        if name not in self.names:
            raise RequestError(404, "unknown_index", f"no index named {name!r}; this service has "
                                                     f"{', '.join(map(repr, self.names))} (GET /indices-list)")
        served = self._served.get((name, modality))
        if served is None:
            what = "image" if modality == "image" else "caption (text)"
            raise RequestError(404, "unknown_index", f"index {name!r} has no {what} embeddings to search with "
                                                     f"modality {modality!r}")
        return served

    def of_name(self, name: str | None) -> list[Served]:
        """Every index under a name (image first); RequestError 404 for an unknown name."""
        name = self.names[0] if name is None else name
        found = [self._served[(name, m)] for m in ("image", "text") if (name, m) in self._served]
        if not found:
            raise RequestError(404, "unknown_index", f"no index named {name!r}; this service has "
                                                     f"{', '.join(map(repr, self.names))}")
        return found

    # ------------------------------------------------------------ hot swap

    def reload_changed(self) -> list[tuple[Served, Served]]:
        """Load and swap in every index whose CURRENT names a new version; returns (old, new)
        pairs. A version that cannot be loaded is logged, remembered and skipped: the old one
        stays served."""
        swapped = []
        with self._reload_lock:  # one reload at a time, whoever calls it
            for key, old in list(self._served.items()):
                try:
                    folder = koclip_index.resolve_version(old.root)
                except KoclipError as e:
                    log.warning("cannot read %s: %s; still serving %s", old.root, e, old.version)
                    continue
                if folder == old.index.path or folder in self._failed_versions:
                    continue
                try:
                    new = self._load(old.name, old.root)
                except KoclipError as e:
                    self._failed_versions.add(folder)
                    self.reload_failures += 1
                    log.warning("not serving %s: %s; still serving %s", folder, e, old.version)
                    continue
                if new.modality != old.modality:
                    self._failed_versions.add(folder)
                    self.reload_failures += 1
                    log.warning("not serving %s: it holds %s embeddings, %s is served as %s", folder, new.modality,
                                old.root, old.modality)
                    continue
                self._served[key] = new  # the swap: one assignment
                self.swaps += 1
                swapped.append((old, new))
                log.info("index %s (%s): now serving %s (%d rows), was %s", old.name, old.modality, new.version,
                         len(new.index), old.version)
        return swapped

    # ------------------------------------------------------------ answering

    def check_vector(self, vector: list[float]) -> np.ndarray:
        dim = int(self.model.config.projection_dim)
        array = np.asarray(vector, dtype=np.float32)
        norm = float(np.linalg.norm(array))
        if array.shape != (dim,) or not np.isfinite(norm) or norm == 0:
            raise RequestError(400, "bad_embedding", f"embedding_input must be a non-zero vector of {dim} numbers, got "
                                                     f"{array.size} with norm {norm:.3g}")
        return array / norm

    @staticmethod
    def knn(served: Served, vector: np.ndarray, num_images: int, num_result_ids: int, dedup: float | None,
            min_similarity: float | None) -> list[dict]:
        """clip_back's answer: search num_result_ids candidates (with min_similarity: every hit
        above it, at most num_result_ids), deduplicate them, return the first num_images."""
        return Service.knn_batch(served, vector[None], [num_images], num_result_ids, dedup, min_similarity)[0]

    @staticmethod
    def knn_batch(served: Served, vectors: np.ndarray, num_images: list[int], num_result_ids: int,
                  dedup: float | None, min_similarity: float | None) -> list[list[dict]]:
        """knn() of several queries [N, D] that search the same index version with the same
        candidates and filters (num_images may differ): one FAISS search and one metadata
        lookup for all, each answer as knn() gives it alone."""
        found = search_rows(served.index, np.asarray(vectors, dtype=np.float32), num_result_ids, min_similarity, dedup)
        found = [(scores[:n], rows[:n]) for (scores, rows), n in zip(found, num_images)]
        records = iter(served.index.records(np.concatenate([rows for _, rows in found])))
        return [[hit_json(next(records), float(score)) for score in scores] for scores, _ in found]

    @staticmethod
    def metadata(entries: list[Served], ids: list) -> list[dict]:
        """clip_back's /metadata: [{"id", "metadata": {...}}] in the order asked; metadata is
        null for an id no index of the name holds."""
        out = []
        for item in ids:
            record = None
            for served in entries:
                row = served.row_of(item)
                if row is not None:
                    record = served.index.records([row])[0]
                    break
            out.append({"id": item, "metadata": None if record is None else metadata_json(record)})
        return out


def metadata_json(record: dict) -> dict:
    captions = list(record.get("captions") or [])
    return {"url": record["uri"], "caption": captions[0] if captions else "", "captions": captions,
            "item_id": record.get("item_id") or record["id"]}


def hit_json(record: dict, score: float) -> dict:
    """One result as clip_back writes it (id, similarity, and the metadata columns: url, caption),
    with our captions and item_id (the image's id, for a caption index's "item#k" rows)."""
    return {"id": record["id"], "similarity": score, **metadata_json(record)}
