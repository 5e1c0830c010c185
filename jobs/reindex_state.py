"""What jobs.reindex remembers between runs and how it tells what changed: each item's signature
(uri, size and etag or mtime, the sidecar's too, the captions; or a content hash), the state
file of the last run, the model the live store holds, and the diff against the source."""
from __future__ import annotations

import hashlib
import io
import json
import posixpath
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from koclip import fs, store
from koclip.data.manifest import Item

STATE_FILE = "state.parquet"
MODEL_FILE = "model.json"  # the fingerprint of the model the live store and the index were made by
LIVE_DIR = "live"


@dataclass
class Diff:
    new: list[Item] = field(default_factory=list)
    changed: list[Item] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    unchanged: int = 0

    @property
    def empty(self) -> bool:
        return not (self.new or self.changed or self.deleted)

    def digest(self, signatures: dict[str, str], fingerprint: str = "") -> str:
        h = hashlib.sha256(fingerprint.encode())
        for item in self.new + self.changed:
            h.update(f"+{item.id}\0{signatures[item.id]}\n".encode())
        for item_id in self.deleted:
            h.update(f"-{item_id}\n".encode())
        return h.hexdigest()[:16]


# ---------------------------------------------------------------- signatures and state


def _file_infos(paths: list[str]) -> dict[str, dict]:
    """Size/etag/mtime of each path, one directory listing per parent folder (not one call per file)."""
    by_parent: dict[str, list[str]] = {}
    for path in paths:
        by_parent.setdefault(posixpath.dirname(path), []).append(path)
    infos: dict[str, dict] = {}
    for parent, members in by_parent.items():
        named = {e["path"]: e for e in fs.ls(parent)}
        for path in members:
            infos[path] = named.get(path, {})
    return infos


def _stamp(info: dict) -> str:
    if not info:
        return "missing"
    version = info.get("etag") or info.get("generation") or info.get("mtime")
    return f"{info.get('size')}:{version}"


def signatures(items: list[Item], content_hash: bool = False) -> dict[str, str]:
    paths = [i.uri for i in items] + [i.caption_uri for i in items if i.caption_uri]
    if content_hash:
        def stamp(path):
            try:
                return hashlib.sha256(fs.read_bytes(path)).hexdigest()
            except FileNotFoundError:
                return "missing"
        stamps = {p: stamp(p) for p in paths}
    else:
        stamps = {p: _stamp(info) for p, info in _file_infos(paths).items()}
    out = {}
    for item in items:
        parts = [item.uri, stamps[item.uri], json.dumps(list(item.captions), ensure_ascii=False)]
        if item.caption_uri:
            parts.append(stamps[item.caption_uri])
        out[item.id] = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:24]
    return out


def load_state(work: str) -> dict[str, dict]:
    path = fs.join(work, STATE_FILE)
    if not fs.exists(path):
        return {}
    table = pq.read_table(io.BytesIO(fs.read_bytes(path)))
    return {row["id"]: row for row in table.to_pylist()}


def model_of_state(work: str) -> str | None:
    """The fingerprint of the model the work dir's live store holds: MODEL_FILE, or for a work dir
    written before it existed, the live store's own; None before the first run."""
    path = fs.join(work, MODEL_FILE)
    if fs.exists(path):
        return json.loads(fs.read_bytes(path))["fingerprint"]
    live = fs.join(work, LIVE_DIR)
    return store.open_store(live).fingerprint if store.list_shards(live) else None


def save_model(work: str, fingerprint: str, model: str) -> None:
    fs.write_bytes(fs.join(work, MODEL_FILE), json.dumps({"fingerprint": fingerprint, "model": model}).encode())


def save_state(work: str, state: dict[str, dict]) -> None:
    rows = sorted(state.values(), key=lambda r: r["id"])
    table = pa.table({"id": [r["id"] for r in rows], "signature": [r["signature"] for r in rows],
                      "status": [r["status"] for r in rows]})
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    fs.write_bytes(fs.join(work, STATE_FILE), buffer.getvalue())


def diff(items: list[Item], sigs: dict[str, str], previous: dict[str, dict]) -> Diff:
    result = Diff()
    for item in items:
        before = previous.get(item.id)
        if before is None:
            result.new.append(item)
        elif before["signature"] != sigs[item.id]:
            result.changed.append(item)
        else:
            result.unchanged += 1
    current = {i.id for i in items}
    result.deleted = sorted(i for i in previous if i not in current)
    return result
