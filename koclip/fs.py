"""Small file helpers over fsspec, so local paths and gs:// (or memory://) behave alike."""
from __future__ import annotations

import os
import posixpath

import fsspec
import fsspec.implementations.local


def join(path: str, *names: str) -> str:
    if "://" in path:
        return posixpath.join(path.rstrip("/"), *names)
    return os.path.join(path, *names)


def read_bytes(path: str) -> bytes:
    try:
        if "://" not in path:  # plain local path: skip fsspec's per-call URL parsing (hot in the pipeline)
            with open(path, "rb") as f:
                return f.read()
        with fsspec.open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"no such file: {path}") from None


def write_bytes(path: str, data: bytes) -> None:
    """Write so that a reader never sees a half-written file under its final name.

    Local files go to a temporary name and are renamed; object stores (gs://, memory://)
    already publish an object only when its upload completes, and their "rename" is a copy.
    """
    fs, fs_path = fsspec.core.url_to_fs(path)
    fs.makedirs(fs._parent(fs_path), exist_ok=True)
    if not isinstance(fs, fsspec.implementations.local.LocalFileSystem):
        fs.pipe_file(fs_path, data)
        return
    tmp = f"{fs_path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, fs_path)


def exists(path: str) -> bool:
    fs, fs_path = fsspec.core.url_to_fs(path)
    return fs.exists(fs_path)


def is_dir(path: str) -> bool:
    fs, fs_path = fsspec.core.url_to_fs(path)
    return fs.isdir(fs_path)
