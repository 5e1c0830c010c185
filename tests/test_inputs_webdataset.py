"""WebDataset tars as input: written with the webdataset library's own TarWriter, read back by the
pipeline; img2dataset's sidecar accounted for; bad tars become dead letters; gs:// alike."""
from __future__ import annotations

import io
import os
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from koclip import fs, store
from pipelines import embed
from pipelines.inputs import Shard, detect_format, open_input, read_shard_unit
from pipelines.transforms.write import read_dead_letters


def image_bytes(seed: int, fmt: str = "PNG", size: int = 32) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (seed * 37 % 256, seed * 91 % 256, 120)).save(buffer, fmt)
    return buffer.getvalue()


def write_tar(path: str, samples: list[dict]) -> None:
    with open(path, "wb") as f:
        writer = wds.TarWriter(f)
        for sample in samples:
            writer.write(sample)
        writer.close()


def write_sidecar(path: str, rows: list[dict]) -> None:
    pq.write_table(pa.Table.from_pylist(rows), path)


@pytest.fixture(scope="module")
def tars(tmp_path_factory):
    """A folder of four tars and what must become of each of their items."""
    root = tmp_path_factory.mktemp("wds")
    expected: dict[str, str] = {}
    # 00000: img2dataset's webdataset output: the tar holds the successes, the sidecar every URL.
    keys = [f"00000{i:04d}" for i in range(5)]
    write_tar(str(root / "00000.tar"), [{"__key__": k, "jpg": image_bytes(i, "JPEG"), "txt": f"고양이 {i}",
                                         "json": {"key": k, "url": f"http://h/{i}.jpg"}}
                                        for i, k in enumerate(keys[:3])])
    write_sidecar(str(root / "00000.parquet"), [
        {"key": keys[0], "url": "http://h/0.jpg", "caption": "고양이 0", "status": "success", "error_message": None},
        {"key": keys[3], "url": "http://h/3.jpg", "caption": None, "status": "failed_to_download",
         "error_message": "HTTP Error 404: Not Found"},
        {"key": keys[1], "url": "http://h/1.jpg", "caption": "고양이 1", "status": "success", "error_message": None},
        {"key": keys[2], "url": "http://h/2.jpg", "caption": "고양이 2", "status": "success", "error_message": None},
        {"key": keys[4], "url": "http://h/4.jpg", "caption": "x", "status": "success", "error_message": None},
    ])
    expected.update({keys[0]: "embedded", keys[1]: "embedded", keys[2]: "embedded",
                     keys[3]: "failed_to_download", keys[4]: "not_in_tar"})
    # 00001: any tar, no sidecar: png/webp, a missing .txt, a member that is not an image, a sample
    # without an image, a key repeated later in the tar.
    write_tar(str(root / "00001.tar"), [
        {"__key__": "png", "png": image_bytes(10), "txt": "강아지"},
        {"__key__": "webp", "webp": image_bytes(11, "WEBP"), "txt": "새"},
        {"__key__": "notxt", "png": image_bytes(12)},
        {"__key__": "garbage", "jpg": b"this is not a jpeg", "txt": "깨진 그림"},
        {"__key__": "textonly", "txt": "그림 없음"},
        {"__key__": "png", "png": image_bytes(13), "txt": "같은 키"},
    ])
    expected.update({"png": "embedded", "webp": "embedded", "notxt": "embedded", "garbage": "not_an_image",
                     "textonly": "no_image"})
    # 00002: cut short in the middle of its second sample's image
    write_tar(str(root / "whole.tmp"), [{"__key__": f"cut{i}", "png": image_bytes(20 + i, size=48), "txt": "잘림"}
                                        for i in range(3)])
    with tarfile.open(root / "whole.tmp") as t:
        second = [m for m in t.getmembers() if m.name.startswith("cut1")][0]
    data = (root / "whole.tmp").read_bytes()
    (root / "00002.tar").write_bytes(data[:second.offset_data + 100])
    os.remove(root / "whole.tmp")
    expected.update({"cut0": "embedded", "cut1": "truncated"})
    # 00003: not a tar at all
    (root / "00003.tar").write_bytes(b"not a tar file" * 100)
    expected[str(root / "00003.tar")] = "unreadable_tar"
    return str(root), expected


def test_a_folder_of_tars_is_webdataset():
    assert detect_format("gs://b/shards/{00000..00009}.tar") == "webdataset"
    assert detect_format("/data/00000.tar") == "webdataset"


def test_the_driver_lists_tars_and_reads_sidecars_but_never_opens_a_tar(tars, monkeypatch):
    root, _ = tars

    def no_tars(*args, **kwargs):
        raise AssertionError("the driver opened a tar")

    monkeypatch.setattr(tarfile, "open", no_tars)
    source = open_input(root)
    units = list(source.units(2))
    assert [(u.shard.path.rsplit("/", 1)[1], u.shard.start, u.shard.stop, u.shard.listed, u.size) for u in units] == [
        ("00000.tar", 0, 2, True, 2), ("00000.tar", 2, 4, True, 2),  # a member range per unit
        ("00001.tar", 0, None, False, None), ("00002.tar", 0, None, False, None), ("00003.tar", 0, None, False, None)]
    assert [i.id for u in units[:2] for i in u.items] == ["000000000", "000000001", "000000002", "000000004"]
    assert units[0].items[0].extra == {"url": "http://h/0.jpg"} and units[0].items[0].captions == ("고양이 0",)
    assert [(r.reason, r.message, r.row, r.uri) for r in source.rejects] == [
        ("failed_to_download", "HTTP Error 404: Not Found", 2, "http://h/3.jpg")]


def test_workers_read_the_members_of_their_range(tars):
    root, _ = tars
    units = list(open_input(root).units(2))
    read = list(read_shard_unit(units[1], embed.UnitRef(1, units[1].key, 2)))
    assert [(item.id, payload.failure and payload.failure[1]) for _, item, payload in read] == [
        ("000000002", None), ("000000004", "not_in_tar")]
    assert read[0][2].data == image_bytes(2, "JPEG")
    assert read[0][1].uri == os.path.join(root, "00000.tar") + "#000000002.jpg"


def test_every_sample_ends_embedded_or_dead_lettered(tars, tiny_ckpt_dir, tmp_path):
    root, expected = tars
    output = str(tmp_path / "out")
    args = ["--input", root, "--output", output, "--model", tiny_ckpt_dir, "--unit-size", "2", "--batch-size", "4"]
    result = embed.run(args)
    table = store.open_store(output).read_table()
    rows = {r["id"]: r for r in table.to_pylist()}
    dead = read_dead_letters(output)
    outcomes = {**{i: "embedded" for i in rows}, **{d["id"]: d["reason"] for d in dead if d["reason"] != "duplicate_id"}}
    assert outcomes == expected
    duplicates = [d for d in dead if d["reason"] == "duplicate_id"]
    assert [d["id"] for d in duplicates] == ["png"] and "repeats sample 1" in duplicates[0]["message"]
    assert result.totals["rows"] == len(expected) + 1 == result.totals["embedded"] + result.totals["dead_letters"]
    assert rows["000000001"]["url"] == "http://h/1.jpg" and rows["000000001"]["captions"] == ["고양이 1"]
    assert rows["webp"]["uri"] == os.path.join(root, "00001.tar") + "#webp.webp" and rows["webp"]["captions"] == ["새"]
    assert rows["notxt"]["captions"] == []  # no .txt: embedded without a caption, as a manifest row without one
    assert all(d["message"] for d in dead)
    # resumed by unit: a rerun finds every unit done and embeds nothing
    again = embed.run(args)
    assert again.units_embedded == 0 and again.totals == result.totals


def test_tars_on_gcs_are_streamed_through_koclip_fs(gcs_bucket, tars):
    root, _ = tars
    for name in ("00000.tar", "00000.parquet", "00001.tar"):
        with open(os.path.join(root, name), "rb") as f:
            fs.write_bytes(f"{gcs_bucket}/wds/{name}", f.read())
    assert detect_format(f"{gcs_bucket}/wds") == "webdataset"
    units = list(open_input(f"{gcs_bucket}/wds").units(10))
    assert [u.shard for u in units] == [Shard("webdataset", f"{gcs_bucket}/wds/00000.tar", 0, 4),
                                        Shard("webdataset", f"{gcs_bucket}/wds/00001.tar", listed=False)]
    listed = list(read_shard_unit(units[0], embed.UnitRef(0, units[0].key, 4)))
    assert [p.data == image_bytes(i, "JPEG") for i, (_, _, p) in enumerate(listed[:3])] == [True] * 3
    found = list(read_shard_unit(units[1], embed.UnitRef(1, units[1].key, None)))
    assert {ref.size for ref, _, _ in found} == {6}
    assert [i.id for _, i, _ in found] == ["png", "webp", "notxt", "garbage", "textonly", "png"]
    assert found[1][2].data == image_bytes(11, "WEBP") and found[1][1].captions == ("새",)


def test_caption_and_id_from_a_json_field(tmp_path):
    write_tar(str(tmp_path / "a.tar"), [
        {"__key__": "s0", "png": image_bytes(1), "json": {"desc": "바다", "uid": "u-0", "license": "cc0"}},
        {"__key__": "s1", "png": image_bytes(2), "json": b"{not json"},
    ])
    units = list(open_input(str(tmp_path / "a.tar")).units(10))
    read = list(read_shard_unit(units[0], embed.UnitRef(0, units[0].key, None),
                                {"caption_field": "desc", "id_column": "uid", "keep_columns": ("license",)}))
    assert [(i.id, i.captions, i.extra) for _, i, _ in read] == [
        ("u-0", ("바다",), {"license": "cc0"}), ("s1", (), {"license": None})]
