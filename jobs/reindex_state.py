"""What jobs.reindex remembers between runs and how it tells what changed: each item's signature
(uri, size and etag or mtime, the sidecar's too, the captions; or a content hash), the state
file of the last run, the model the live store holds, the diff against the source, and the
journal of a run that has been decided but not yet fully applied (WORK/pending/).

A state row: id, signature, status ("embedded": a row of the live store; "dead": a dead letter),
transient (whether the dead letter's error may not recur), attempts (runs in a row that failed on
this signature)."""
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
PENDING_DIR = "pending"  # the journal: state.parquet and run.json (written last) of a committed run


@dataclass
class Diff:
    new: list[Item] = field(default_factory=list)
    changed: list[Item] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    retry: list[Item] = field(default_factory=list)  # unchanged dead letters tried again
    unchanged: int = 0

    @property
    def empty(self) -> bool:
        return not (self.new or self.changed or self.deleted or self.retry)

    @property
    def to_embed(self) -> list[Item]:
        return self.new + self.changed + self.retry

    def digest(self, signatures: dict[str, str], fingerprint: str = "", attempts: dict[str, int] | None = None) -> str:
        h = hashlib.sha256(fingerprint.encode())
        for item in self.new + self.changed:
            h.update(f"+{item.id}\0{signatures[item.id]}\n".encode())
        for item in self.retry:  # the attempt number keeps each retry a run of its own
            h.update(f"~{item.id}\0{signatures[item.id]}\0{(attempts or {}).get(item.id, 0)}\n".encode())
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


STATE_COLUMNS = {"id": pa.string(), "signature": pa.string(), "status": pa.string(), "transient": pa.bool_(),
                 "attempts": pa.int32()}


def _read_state(path: str) -> dict[str, dict]:
    if not fs.exists(path):
        return {}
    rows = pq.read_table(io.BytesIO(fs.read_bytes(path))).to_pylist()
    # a state written before dead letters were split: its dead letters count as permanent
    return {r["id"]: {"transient": False, "attempts": 1 if r["status"] == "dead" else 0, **r} for r in rows}


def _write_state(path: str, state: dict[str, dict]) -> None:
    rows = sorted(state.values(), key=lambda r: r["id"])
    table = pa.table({name: pa.array([r[name] for r in rows], kind) for name, kind in STATE_COLUMNS.items()})
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    fs.write_bytes(path, buffer.getvalue())


def load_state(work: str) -> dict[str, dict]:
    return _read_state(fs.join(work, STATE_FILE))


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
    _write_state(fs.join(work, STATE_FILE), state)


def state_rows(items: list[Item], sigs: dict[str, str], dead: dict[str, dict],
               previous: dict[str, dict]) -> dict[str, dict]:
    """The state rows of items just embedded; `dead` maps an id to its dead-letter record. A dead
    letter on an unchanged signature counts one more attempt."""
    rows = {}
    for item in items:
        record = dead.get(item.id)
        before = previous.get(item.id)
        attempts = 0
        if record is not None:
            same = before is not None and before["signature"] == sigs[item.id] and before["status"] == "dead"
            attempts = before["attempts"] + 1 if same else 1
        rows[item.id] = {"id": item.id, "signature": sigs[item.id], "status": "dead" if record else "embedded",
                         "transient": bool(record and record.get("transient")), "attempts": attempts}
    return rows


# ---------------------------------------------------------------- the journal of a committed run


@dataclass
class Pending:
    """A run that has been decided: its embeddings are in `run_out` and `state` is the state once it
    is applied. Applying it (jobs.reindex) is redone from the start after a crash, so each step
    must be idempotent: the live store drops `remove` (every id the run touches) before adding
    the run's shards; the index step is skipped once CURRENT names `published`."""

    run: str
    run_out: str | None  # None: the run embedded nothing (only deletions)
    full: bool  # a re-embed of everything: the live store is replaced, the index built afresh
    remove: list[str]
    fingerprint: str
    model: str
    state: dict[str, dict] = field(default_factory=dict, repr=False)
    published: str | None = None  # the index version written for this run, once it has been


def _pending_path(work: str, name: str) -> str:
    return fs.join(work, PENDING_DIR, name)


def save_pending(work: str, pending: Pending) -> None:
    """Commit a run: its new state first, then run.json, whose existence is the commit."""
    _write_state(_pending_path(work, STATE_FILE), pending.state)
    record = {k: getattr(pending, k) for k in ("run", "full", "remove", "fingerprint", "model")}
    # relative to WORK, so that a work dir copied or moved elsewhere applies its own run's shards
    record["run_out"] = _relative(work, pending.run_out)
    fs.write_bytes(_pending_path(work, "run.json"), json.dumps(record, ensure_ascii=False).encode())


def _relative(work: str, path: str | None) -> str | None:
    if path is None:
        return None
    prefix = fs.join(work, "")
    if not path.startswith(prefix):
        raise ValueError(f"the run's output {path} is not under the work dir {work}")
    return path[len(prefix):]


def load_pending(work: str) -> Pending | None:
    path = _pending_path(work, "run.json")
    if not fs.exists(path):
        return None
    record = json.loads(fs.read_bytes(path))
    if record["run_out"] is not None:
        record["run_out"] = fs.join(work, record["run_out"])
    pending = Pending(**record, state=_read_state(_pending_path(work, STATE_FILE)))
    marker = _pending_path(work, "published.json")
    if fs.exists(marker):
        record = json.loads(fs.read_bytes(marker))
        pending.published = record["version"] if record["run"] == pending.run else None
    return pending


def mark_published(work: str, pending: Pending, version: str) -> None:
    """Called when the run's index version is written, before CURRENT names it."""
    fs.write_bytes(_pending_path(work, "published.json"), json.dumps({"run": pending.run, "version": version}).encode())


def clear_pending(work: str) -> None:
    fs.remove(_pending_path(work, "run.json"))  # first: without it the rest is ignored
    fs.remove([_pending_path(work, name) for name in ("published.json", STATE_FILE)])


def diff(items: list[Item], sigs: dict[str, str], previous: dict[str, dict], max_attempts: int = 3,
         retry_all: bool = False) -> Diff:
    """New, changed and deleted items; a dead letter on an unchanged item is tried again when it
    was transient and has had fewer than `max_attempts` attempts, or always with `retry_all`."""
    result = Diff()
    for item in items:
        before = previous.get(item.id)
        if before is None:
            result.new.append(item)
        elif before["signature"] != sigs[item.id]:
            result.changed.append(item)
        elif before["status"] == "dead" and (retry_all or (before["transient"] and before["attempts"] < max_attempts)):
            result.retry.append(item)
        else:
            result.unchanged += 1
    current = {i.id for i in items}
    result.deleted = sorted(i for i in previous if i not in current)
    return result
