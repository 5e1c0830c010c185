"""koclip.fs, the one storage layer, on local disk and on a real GCS API server (the emulator):
the same calls give the same answers, and URLs keep their protocol."""
from __future__ import annotations

import pytest

from koclip import fs
from koclip.errors import NotFoundError, TooLargeError


@pytest.fixture(params=["local", "gcs"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "root")
    return request.getfixturevalue("gcs_bucket")


def test_write_read_and_limit(root):
    path = fs.join(root, "a", "b.bin")
    fs.write_bytes(path, b"x" * 100)
    assert fs.exists(path) and fs.is_dir(fs.join(root, "a")) and not fs.is_dir(path)
    assert fs.read_bytes(path) == b"x" * 100
    assert fs.read_bytes(path, limit=100) == b"x" * 100
    with pytest.raises(TooLargeError, match="larger than the 99-byte limit"):
        fs.read_bytes(path, limit=99)
    with pytest.raises(NotFoundError, match="no such file"):
        fs.read_bytes(fs.join(root, "nope"))
    with pytest.raises(FileNotFoundError):  # callers that catch the builtin still do
        fs.read_bytes(fs.join(root, "nope"))


def test_listing_keeps_the_protocol_and_reports_size_and_version(root):
    fs.write_many({fs.join(root, "d", f"{i}.txt"): b"y" * i for i in range(1, 4)})
    entries = sorted(fs.ls(fs.join(root, "d")), key=lambda e: e["path"])
    assert [e["path"] for e in entries] == [fs.join(root, "d", f"{i}.txt") for i in range(1, 4)]
    assert [e["size"] for e in entries] == [1, 2, 3]
    assert all(e["etag"] or e["mtime"] for e in entries)  # something that changes when the file does
    assert fs.ls(fs.join(root, "missing")) == []
    assert fs.info(fs.join(root, "d", "2.txt"))["size"] == 2 and fs.info(fs.join(root, "none")) is None
    assert fs.glob(fs.join(root, "**", "*.txt")) == [fs.join(root, "d", f"{i}.txt") for i in range(1, 4)]
    assert fs.cat_many(fs.glob(fs.join(root, "d", "*.txt"))) == {fs.join(root, "d", f"{i}.txt"): b"y" * i
                                                                  for i in range(1, 4)}


def test_a_rewrite_changes_the_listed_version(root):
    path = fs.join(root, "v.txt")
    fs.write_bytes(path, b"one")
    before = fs.info(path)
    fs.write_bytes(path, b"two!")
    after = next(e for e in fs.ls(root) if e["path"] == path)  # fresh, not a cached listing
    assert after["size"] == 4 and (after["etag"], after["mtime"], after["size"]) != (
        before["etag"], before["mtime"], before["size"])


def test_remove_download_upload(root, tmp_path):
    fs.write_bytes(fs.join(root, "t", "x", "1"), b"1")
    fs.write_bytes(fs.join(root, "t", "2"), b"2")
    fs.download(fs.join(root, "t", "2"), str(tmp_path / "copy"))
    assert (tmp_path / "copy").read_bytes() == b"2"
    fs.upload(str(tmp_path / "copy"), fs.join(root, "u", "3"))
    assert fs.read_bytes(fs.join(root, "u", "3")) == b"2"
    fs.remove([fs.join(root, "t", "2"), fs.join(root, "t", "never")])
    assert not fs.exists(fs.join(root, "t", "2")) and fs.exists(fs.join(root, "t", "x", "1"))
    fs.remove_tree(fs.join(root, "t"))
    fs.remove_tree(fs.join(root, "t"))  # twice: a missing tree is fine
    assert not fs.exists(fs.join(root, "t", "x", "1"))
    with pytest.raises(NotFoundError):
        fs.download(fs.join(root, "gone"), str(tmp_path / "gone"))
