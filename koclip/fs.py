"""The one storage layer: local paths and any fsspec URL (gs://, memory://) behave alike.

Every path in and out of this module is a string as the user wrote it: a URL keeps its protocol
(fsspec itself hands back "bucket/x" for "gs://bucket/x"; we put the "gs://" back). Nothing
outside this module talks to fsspec's filesystems directly.

    join, exists, is_dir              names and tests
    read_bytes(path, limit=None)      whole files, optionally refusing more than `limit` bytes
    open(path)                        a binary file object, for streaming readers (Parquet, tar)
    write_bytes, write_many           atomic writes (one file, or many concurrently)
    ls, glob, info                    listings with size, etag and mtime, protocol kept
    cat_many                          many small files, fetched concurrently
    remove, remove_tree               deletion
    download, upload                  copies between a URL and a local file
    arrow_paths                       a filesystem and bare paths for pyarrow.dataset
    create_new, read_generation,      conditional writes (local and gs:// only), for koclip.lock
    replace_if, delete_if
"""
from __future__ import annotations

import builtins
import fcntl
import hashlib
import os
import posixpath
import uuid
from collections.abc import Iterable
from contextlib import contextmanager

import fsspec
import fsspec.implementations.local

from koclip.errors import NotFoundError, TooLargeError, UsageError


def is_url(path: str) -> bool:
    return "://" in path


def _resolve(path: str):
    """(fsspec filesystem, the path as that filesystem names it)."""
    return fsspec.core.url_to_fs(path)


def _protocol(path: str) -> str:
    return path.split("://", 1)[0] + "://" if is_url(path) else ""


def _with_protocol(name: str, like: str) -> str:
    """`name` as fsspec returned it, with the protocol of `like` put back."""
    protocol = _protocol(like)
    return protocol + name if protocol and not name.startswith(protocol) else name


def _is_local(filesystem) -> bool:
    return isinstance(filesystem, fsspec.implementations.local.LocalFileSystem)


# ---------------------------------------------------------------- names and tests


def join(path: str, *names: str) -> str:
    if is_url(path):
        return posixpath.join(path.rstrip("/"), *names)
    return os.path.join(path, *names)


def exists(path: str) -> bool:
    filesystem, fs_path = _resolve(path)
    return filesystem.exists(fs_path)


def is_dir(path: str) -> bool:
    filesystem, fs_path = _resolve(path)
    return filesystem.isdir(fs_path)


# ---------------------------------------------------------------- reading


def read_bytes(path: str, limit: int | None = None) -> bytes:
    """The file's bytes. With `limit`, at most that many are read: a larger file raises
    TooLargeError without being read whole."""
    try:
        if not is_url(path):  # plain local path: skip fsspec's per-call URL parsing (hot in the pipeline)
            with builtins.open(path, "rb") as f:
                data = f.read() if limit is None else f.read(limit + 1)
        else:
            with fsspec.open(path, "rb") as f:
                data = f.read() if limit is None else f.read(limit + 1)
    except (FileNotFoundError, IsADirectoryError):
        raise NotFoundError(f"no such file: {path}") from None
    if limit is not None and len(data) > limit:
        raise TooLargeError(f"{path} is larger than the {limit}-byte limit")
    return data


@contextmanager
def open(path: str, mode: str = "rb"):  # noqa: A001 (the storage layer's open)
    """A file object for streaming reads (or writes), as a context manager; NotFoundError when it
    does not exist (found by the open itself: no extra request to an object store)."""
    if "w" in mode:
        filesystem, fs_path = _resolve(path)
        filesystem.makedirs(filesystem._parent(fs_path), exist_ok=True)
    try:
        f = fsspec.open(path, mode).open()
    except FileNotFoundError:
        raise NotFoundError(f"no such file: {path}") from None
    try:
        yield f
    finally:
        f.close()


def cat_many(paths: list[str]) -> dict[str, bytes]:
    """{path: bytes} of many files of one filesystem, fetched concurrently where it can (gcsfs)."""
    if not paths:
        return {}
    filesystem, _ = _resolve(paths[0])
    bare = {_resolve(p)[1]: p for p in paths}
    return {bare[name]: data for name, data in filesystem.cat(list(bare)).items()}


# ---------------------------------------------------------------- writing


def write_bytes(path: str, data: bytes) -> None:
    """Write so that a reader never sees a half-written file under its final name.

    Local files go to a temporary name and are renamed; object stores (gs://, memory://)
    already publish an object only when its upload completes, and their "rename" is a copy.
    """
    filesystem, fs_path = _resolve(path)
    filesystem.makedirs(filesystem._parent(fs_path), exist_ok=True)
    if not _is_local(filesystem):
        filesystem.pipe_file(fs_path, data)
        return
    tmp = f"{fs_path}.tmp-{os.getpid()}"
    with builtins.open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())  # the bytes reach the disk before the name does
    os.replace(tmp, fs_path)
    _fsync_dir(os.path.dirname(fs_path))


def _fsync_dir(folder: str) -> None:
    """Make a rename in `folder` durable (a power cut must not undo a publish)."""
    descriptor = os.open(folder or ".", os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_many(files: dict[str, bytes]) -> None:
    """Write many files of one filesystem; an object store uploads them concurrently."""
    if not files:
        return
    filesystem, _ = _resolve(next(iter(files)))
    if _is_local(filesystem):
        for path, data in files.items():
            write_bytes(path, data)
        return
    parents = {filesystem._parent(_resolve(p)[1]) for p in files}
    for parent in parents:
        filesystem.makedirs(parent, exist_ok=True)
    filesystem.pipe({_resolve(p)[1]: data for p, data in files.items()})


# ---------------------------------------------------------------- listing


def _entry(raw: dict, like: str) -> dict:
    """One listing entry: path (protocol kept), type, size, etag, mtime (whichever the store has)."""
    mtime = raw.get("mtime") or raw.get("updated") or raw.get("LastModified")
    return {"path": _with_protocol(raw["name"], like), "type": raw.get("type"), "size": raw.get("size"),
            "etag": raw.get("etag") or raw.get("md5Hash") or raw.get("ETag"),
            "generation": raw.get("generation"), "mtime": str(mtime) if mtime is not None else None}


def ls(folder: str) -> list[dict]:
    """The entries directly under `folder`, fresh (object-store listing caches are bypassed);
    [] when it does not exist."""
    filesystem, fs_path = _resolve(folder)
    try:
        raw = filesystem.ls(fs_path, detail=True, **({} if _is_local(filesystem) else {"refresh": True}))
    except FileNotFoundError:
        return []
    return [_entry(e, folder) for e in raw]


def info(path: str) -> dict | None:
    """The listing entry of one path, or None when it does not exist."""
    filesystem, fs_path = _resolve(path)
    try:
        return _entry(filesystem.info(fs_path), path)
    except FileNotFoundError:
        return None


def glob(pattern: str, files_only: bool = True) -> list[str]:
    """Sorted paths matching `pattern` (`**` recursive), protocol kept."""
    filesystem, fs_path = _resolve(pattern)
    found = filesystem.glob(fs_path, detail=True)
    return sorted(_with_protocol(name, pattern) for name, e in found.items()
                  if not files_only or e.get("type") != "directory")


# ---------------------------------------------------------------- removing and copying


def remove(paths: str | Iterable[str]) -> None:
    """Delete files; missing ones are ignored."""
    for path in [paths] if isinstance(paths, str) else list(paths):
        filesystem, fs_path = _resolve(path)
        if filesystem.exists(fs_path):
            filesystem.rm(fs_path)


def remove_tree(path: str) -> None:
    """Delete a folder and everything under it; a missing one is ignored."""
    filesystem, fs_path = _resolve(path)
    if filesystem.exists(fs_path):
        filesystem.rm(fs_path, recursive=True)


def download(path: str, local_path: str) -> None:
    filesystem, fs_path = _resolve(path)
    try:
        filesystem.get_file(fs_path, local_path)
    except FileNotFoundError:
        raise NotFoundError(f"no such file: {path}") from None


def upload(local_path: str, path: str) -> None:
    filesystem, fs_path = _resolve(path)
    filesystem.makedirs(filesystem._parent(fs_path), exist_ok=True)
    filesystem.put_file(local_path, fs_path)


def arrow_paths(paths: list[str]):
    """(filesystem, bare paths) for pyarrow.dataset.dataset(paths, filesystem=...)."""
    filesystem, _ = _resolve(paths[0])
    return filesystem, [_resolve(p)[1] for p in paths]


# ---------------------------------------------------------------- conditional writes
# A generation is a string naming one version of one file; each call below compares it and acts in
# one step, so two processes racing on a file cannot both win (koclip.lock builds on this).
# gs://: GCS's own object generation, and every change carries GCS's precondition
# (ifGenerationMatch, 0 meaning "no live object"), sent through gcsfs's request machinery; the
# server decides, so this holds across machines. gcsfs retries a request that failed in transit,
# so a change that did happen may be reported as refused (never the reverse): callers must treat
# "refused" as "someone else may have it".
# Local paths: the generation is the inode, the mtime in ns and a hash of the bytes; every change
# runs under an exclusive flock on the file's folder (read_generation needs none: it reads one open
# file), and the bytes always arrive by rename, so readers never see a half-written file. That
# holds between processes of one machine; across machines only as far as the shared filesystem
# honours flock (NFS: its lock manager). For a lock across machines, use gs://.


def _conditional(path: str):
    """(filesystem, bare path, is local); only local paths and gs:// have conditional writes."""
    filesystem, fs_path = _resolve(path)
    if _is_local(filesystem):
        return filesystem, fs_path, True
    if _protocol(path) in ("gs://", "gcs://"):
        return filesystem, fs_path, False
    raise UsageError(f"{path}: conditional writes (locks) need a local path or gs://, not {_protocol(path)}")


def create_new(path: str, data: bytes) -> str | None:
    """Write `data` to `path` only if nothing is there: the new file's generation, or None when a
    file already existed (and was left as it is)."""
    filesystem, fs_path, local = _conditional(path)
    if not local:
        return _gcs_upload(filesystem, fs_path, data, "0")
    os.makedirs(os.path.dirname(fs_path) or ".", exist_ok=True)
    tmp = _local_tmp(fs_path, data)
    with _folder_locked(fs_path):
        if os.path.lexists(fs_path):
            os.remove(tmp)
            return None
        return _local_publish(tmp, fs_path)


def read_generation(path: str) -> tuple[bytes, str] | None:
    """(the file's bytes, their generation), or None when there is no file."""
    filesystem, fs_path, local = _conditional(path)
    if local:
        return _local_read(fs_path)
    bucket, key, _ = filesystem.split_path(fs_path)
    for _ in range(5):
        try:
            generation = str(filesystem.call("GET", "b/{}/o/{}", bucket, key, json_out=True)["generation"])
        except FileNotFoundError:
            return None
        try:  # that very generation's bytes: 404 when it was replaced in between, then read again
            _, data = filesystem.call("GET", "b/{}/o/{}", bucket, key, alt="media", generation=generation)
        except FileNotFoundError:
            continue
        return data, generation
    raise OSError(f"{path} kept changing while it was read")


def replace_if(path: str, data: bytes, generation: str) -> str | None:
    """Replace the file with `data` only if it is still at `generation`: the new generation, or None
    (it changed, or is gone; nothing was written)."""
    filesystem, fs_path, local = _conditional(path)
    if not local:
        return _gcs_upload(filesystem, fs_path, data, generation)
    tmp = _local_tmp(fs_path, data)
    with _folder_locked(fs_path):
        found = _local_read(fs_path)
        if found is None or found[1] != generation:
            os.remove(tmp)
            return None
        return _local_publish(tmp, fs_path)


def delete_if(path: str, generation: str) -> bool:
    """Delete the file only if it is still at `generation`; False when it changed or is gone."""
    filesystem, fs_path, local = _conditional(path)
    if not local:
        bucket, key, _ = filesystem.split_path(fs_path)
        try:
            filesystem.call("DELETE", "b/{}/o/{}", bucket, key, ifGenerationMatch=generation)
        except (FileExistsError, FileNotFoundError):  # gcsfs's names for 412 and 404
            return False
        finally:
            filesystem.invalidate_cache(fs_path)
        return True
    with _folder_locked(fs_path):
        found = _local_read(fs_path)
        if found is None or found[1] != generation:
            return False
        os.remove(fs_path)
        _fsync_dir(os.path.dirname(fs_path))
        return True


def _gcs_upload(filesystem, fs_path: str, data: bytes, if_generation: str) -> str | None:
    """One media upload with the precondition ifGenerationMatch=if_generation; the new generation,
    or None when GCS refused it (412)."""
    from urllib.parse import quote

    bucket, key, _ = filesystem.split_path(fs_path)
    try:
        made = filesystem.call("POST", f"{filesystem._location}/upload/storage/v1/b/{quote(bucket, safe='')}/o",
                               uploadType="media", name=key, ifGenerationMatch=if_generation, data=data,
                               headers={"Content-Type": "application/octet-stream"}, json_out=True)
    except FileExistsError:  # gcsfs's name for 412; a missing bucket (404) is an error
        return None
    finally:
        filesystem.invalidate_cache(fs_path)
    return str(made["generation"])


def _local_read(fs_path: str) -> tuple[bytes, str] | None:
    try:
        with builtins.open(fs_path, "rb") as f:
            stat = os.fstat(f.fileno())
            data = f.read()
    except FileNotFoundError:
        return None
    digest = hashlib.sha256(data).hexdigest()[:16]
    return data, f"{stat.st_ino}-{stat.st_mtime_ns}-{digest}"


def _local_tmp(fs_path: str, data: bytes) -> str:
    tmp = f"{fs_path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    with builtins.open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return tmp


def _local_publish(tmp: str, fs_path: str) -> str:
    """Rename tmp to fs_path (the caller holds the folder's flock); the new generation."""
    os.replace(tmp, fs_path)
    _fsync_dir(os.path.dirname(fs_path))
    return _local_read(fs_path)[1]


@contextmanager
def _folder_locked(fs_path: str):
    """An exclusive flock on the file's folder, for one compare-and-change."""
    descriptor = os.open(os.path.dirname(fs_path) or ".", os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)  # closing releases the flock
