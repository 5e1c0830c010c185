"""The image/caption manifest: JSONL, one record per line.

    {"id": "1f436", "image": "images/1f436.png", "captions": ["강아지 얼굴"], "split": "train", "group": "1f436"}

- `id` (string; an integer is taken as its decimal string): unique within the manifest.
- `image`: a path or URL. A relative one is relative to the manifest's folder and is resolved
  against it with the manifest's own scheme (`images/a.png` in `gs://b/m.jsonl` is
  `gs://b/images/a.png`; in a local manifest it becomes an absolute local path).
- `captions`: a list of strings, or one string. Empty and whitespace-only captions do not count;
  at least one must remain. Surrounding whitespace is stripped.
- `split` (optional): "train", "val" or "test".
- `group` (optional): records of one group belong together (e.g. variants of one emoji) and
  are never split across train/val/test.
Other keys are kept in `Record.extra` and written back unchanged. Blank lines are ignored.

A bad line (not JSON, missing `id` or `image`, no caption, a repeated id, a bad split) is
rejected when the manifest is loaded: `ManifestError` names the file and line, e.g.
`data/manifest.jsonl:17: no caption`; when several lines are bad the message names the first
and counts the rest, and `.errors` lists them all.
"""
from __future__ import annotations

import json
import os
import posixpath
from dataclasses import dataclass, field
from typing import Iterable

from koclip import fs

SPLITS = ("train", "val", "test")
_KNOWN_KEYS = ("id", "image", "captions", "split", "group")


class ManifestError(ValueError):
    """A manifest with bad lines; `errors` holds one "file:line: reason" string per bad line."""

    def __init__(self, errors: list[str]):
        self.errors = list(errors)
        message = self.errors[0]
        if len(self.errors) > 1:
            rest = "; ".join(self.errors[1:4]) + ("; ..." if len(self.errors) > 4 else "")
            message += f" (and {len(self.errors) - 1} more bad line(s): {rest})"
        super().__init__(message)


@dataclass
class Record:
    id: str
    image: str
    captions: list[str]
    split: str | None = None
    group: str | None = None
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        out: dict = {"id": self.id, "image": self.image, "captions": list(self.captions)}
        if self.split is not None:
            out["split"] = self.split
        if self.group is not None:
            out["group"] = self.group
        out.update({k: v for k, v in self.extra.items() if k not in _KNOWN_KEYS})
        return out


def _is_url(path: str) -> bool:
    return "://" in path


def resolve_uri(image: str, manifest_path: str) -> str:
    """`image` as written in the manifest at `manifest_path` -> a path or URL usable on its own."""
    if _is_url(image) or os.path.isabs(image) or image.startswith("/"):
        return image
    if _is_url(manifest_path):
        scheme, rest = manifest_path.split("://", 1)
        joined = posixpath.normpath(posixpath.join(posixpath.dirname(rest), image))
        return f"{scheme}://{joined}"
    return os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(manifest_path)), image))


def _parse_line(obj) -> tuple[Record | None, str | None]:
    """One decoded JSON value -> (record, None) or (None, reason)."""
    if not isinstance(obj, dict):
        return None, f"not a JSON object (got {type(obj).__name__})"
    if "id" not in obj:
        return None, "missing field 'id'"
    rid = obj["id"]
    if isinstance(rid, bool) or not isinstance(rid, (str, int)) or (isinstance(rid, str) and not rid.strip()):
        return None, f"'id' must be a non-empty string, got {rid!r}"
    rid = str(rid)
    if "image" not in obj:
        return None, "missing field 'image'"
    image = obj["image"]
    if not isinstance(image, str) or not image.strip():
        return None, f"'image' must be a non-empty string, got {image!r}"
    captions = obj.get("captions")
    if captions is None:
        return None, "no caption (missing field 'captions')"
    if isinstance(captions, str):
        captions = [captions]
    if not isinstance(captions, list):
        return None, f"'captions' must be a list of strings or a string, got {type(captions).__name__}"
    if not all(isinstance(c, str) for c in captions):
        bad = next(c for c in captions if not isinstance(c, str))
        return None, f"'captions' must hold strings only, got {bad!r}"
    captions = [c.strip() for c in captions if c.strip()]
    if not captions:
        return None, "no caption (every caption is empty or whitespace)"
    split = obj.get("split")
    if split is not None and split not in SPLITS:
        return None, f"'split' must be one of {', '.join(SPLITS)}, got {split!r}"
    group = obj.get("group")
    if group is not None and not isinstance(group, (str, int)):
        return None, f"'group' must be a string, got {group!r}"
    extra = {k: v for k, v in obj.items() if k not in _KNOWN_KEYS}
    return Record(rid, image.strip(), captions, split, None if group is None else str(group), extra), None


def parse_manifest(text: str, path: str = "<manifest>") -> list[Record]:
    """Parse manifest text; image uris are returned as written (not resolved)."""
    records: list[Record] = []
    errors: list[str] = []
    first_line: dict[str, int] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            errors.append(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})")
            continue
        record, reason = _parse_line(obj)
        if reason is not None:
            errors.append(f"{path}:{lineno}: {reason}")
            continue
        if record.id in first_line:
            errors.append(f"{path}:{lineno}: duplicate id {record.id!r} (first on line {first_line[record.id]})")
            continue
        first_line[record.id] = lineno
        records.append(record)
    if errors:
        raise ManifestError(errors)
    return records


def read_manifest(path: str | os.PathLike, split: str | None = None) -> list[Record]:
    """Records of a manifest (local path or fsspec URL), relative image uris resolved.

    With `split`, only the records of that split ("train", "val" or "test").
    Raises FileNotFoundError for a missing file and ManifestError for bad lines.
    """
    path = os.fspath(path)
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    try:
        raw = fs.read_bytes(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"manifest not found: {path}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ManifestError([f"{path}:{line}: not UTF-8 text"]) from None
    records = parse_manifest(text, path)
    for record in records:
        record.image = resolve_uri(record.image, path)
    if split is not None:
        records = [r for r in records if r.split == split]
    return records


def dumps_manifest(records: Iterable[Record]) -> str:
    return "".join(json.dumps(r.to_json(), ensure_ascii=False) + "\n" for r in records)


def write_manifest(path: str | os.PathLike, records: Iterable[Record]) -> str:
    """Write records as JSONL (UTF-8, image uris as given), atomically for local files."""
    path = os.fspath(path)
    records = list(records)
    seen: set[str] = set()
    for r in records:
        if r.id in seen:
            raise ValueError(f"duplicate id {r.id!r}")
        seen.add(r.id)
        if not any(c.strip() for c in r.captions):
            raise ValueError(f"record {r.id!r} has no caption")
    fs.write_bytes(path, dumps_manifest(records).encode("utf-8"))
    return path
