"""A key repeated across WebDataset tars that have no sidecar (the driver never opens them, so
only the written units know their ids): every later occurrence is a `duplicate_id` dead letter
naming the first, the store holds one row per id, the counts add up, and a rerun after a crash
keeps it so. Tars written by the webdataset library's TarWriter, embedded by pipelines.embed on
the real Beam runner."""
from __future__ import annotations

import io
import json
import os

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from koclip import fs, store
from pipelines import embed
from pipelines.inputs import open_input, read_shard_unit
from pipelines.transforms.write import read_dead_letters


def image_bytes(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (seed * 37 % 256, seed * 91 % 256, 120)).save(buffer, "PNG")
    return buffer.getvalue()


def write_tar(path: str, samples: list[tuple[str, int]]) -> None:
    with open(path, "wb") as f:
        writer = wds.TarWriter(f)
        for key, seed in samples:
            writer.write({"__key__": key, "png": image_bytes(seed), "txt": f"{key} {seed}"})
        writer.close()


# (tar, samples): "dup" is in all three tars (first in a.tar), "twice" twice in a row inside c.tar,
# "b1" twice apart inside b.tar, "cx" in c.tar and again in a.tar's neighbour d.tar.
TARS = {
    "a.tar": [("a0", 0), ("dup", 1), ("a1", 2)],
    "b.tar": [("dup", 3), ("b1", 4), ("b2", 5), ("b1", 6)],
    "c.tar": [("cx", 7), ("twice", 8), ("twice", 9), ("dup", 10)],
    "d.tar": [("cx", 11), ("d0", 12)],
}
SAMPLES = sum(len(s) for s in TARS.values())  # 13 samples written: what the counts must add up to


@pytest.fixture()
def tars(tmp_path):
    root = tmp_path / "tars"
    root.mkdir()
    for name, samples in TARS.items():
        write_tar(str(root / name), samples)
    return str(root)


def _outcome(output: str):
    rows = store.open_store(output).read_table().to_pylist()
    dead = sorted((d["id"], d["reason"], d["uri"], d["message"]) for d in read_dead_letters(output))
    return sorted((r["id"], r["uri"]) for r in rows), dead


def _check(root: str, output: str, result) -> None:
    rows, dead = _outcome(output)
    ids = [i for i, _ in rows]
    assert len(ids) == len(set(ids))  # one row per id
    assert ids == ["a0", "a1", "b1", "b2", "cx", "d0", "dup", "twice"]
    uris = dict(rows)
    assert uris["dup"] == os.path.join(root, "a.tar") + "#dup.png"  # the first: tar order, then member order
    assert uris["cx"] == os.path.join(root, "c.tar") + "#cx.png"
    assert uris["twice"] == os.path.join(root, "c.tar") + "#twice.png"
    assert [(i, r, u) for i, r, u, _ in dead] == [
        ("b1", "duplicate_id", os.path.join(root, "b.tar") + "#b1.png"),
        ("cx", "duplicate_id", os.path.join(root, "d.tar") + "#cx.png"),
        ("dup", "duplicate_id", os.path.join(root, "b.tar") + "#dup.png"),
        ("dup", "duplicate_id", os.path.join(root, "c.tar") + "#dup.png"),
        ("twice", "duplicate_id", os.path.join(root, "c.tar") + "#twice.png"),
    ]
    across = {(i, u.rsplit("/", 1)[1]): m for i, _, u, m in dead}
    # the message names where the first one is
    assert os.path.join(root, "a.tar") + "#dup.png" in across[("dup", "b.tar#dup.png")]
    assert os.path.join(root, "a.tar") + "#dup.png" in across[("dup", "c.tar#dup.png")]
    assert os.path.join(root, "c.tar") + "#cx.png" in across[("cx", "d.tar#cx.png")]
    t = result.totals
    assert t["rows"] == t["items"] == SAMPLES == t["embedded"] + t["dead_letters"]
    assert t["embedded"] == 8 and t["dead_letters"] == 5 and t["dead_letter_reasons"] == {"duplicate_id": 5}


def _args(root: str, output: str, tiny_ckpt_dir: str) -> list[str]:
    return ["--input", root, "--output", output, "--model", tiny_ckpt_dir, "--batch-size", "4"]


def test_a_key_in_several_tars_without_sidecars_is_embedded_once(tars, tiny_ckpt_dir, tmp_path):
    output = str(tmp_path / "out")
    result = embed.run(_args(tars, output, tiny_ckpt_dir))
    assert result.units == 4
    _check(tars, output, result)
    before = _outcome(output)
    again = embed.run(_args(tars, output, tiny_ckpt_dir))  # every unit done: nothing embedded, nothing changes
    assert again.units_embedded == 0 and again.totals == result.totals and _outcome(output) == before


@pytest.mark.parametrize("lost", [pytest.param(0, marks=pytest.mark.slow), 1])  # 0: slow, to keep the default run short
def test_a_rerun_after_a_crash_keeps_the_first_and_drops_the_later(tars, tiny_ckpt_dir, tmp_path, lost):
    """A crash left unit `lost` unwritten (no done marker, shard or dead letters): unit 0 holds the
    first "dup", unit 1 a later one. The rerun redoes that unit; the first stays the first and the
    later one is a dead letter once, not a second row and not two dead letters."""
    output = str(tmp_path / "out")
    embed.run(_args(tars, output, tiny_ckpt_dir))
    fs.remove([fs.join(output, "_done", f"unit-{lost:05d}.json"), fs.join(output, f"shard-{lost:05d}.parquet"),
               fs.join(output, "_dead_letters", f"unit-{lost:05d}.jsonl")])
    result = embed.run(_args(tars, output, tiny_ckpt_dir))
    assert result.units_embedded == 1
    _check(tars, output, result)


def test_the_same_key_twice_in_a_row_inside_one_tar_is_two_samples(tmp_path):
    """TarWriter writes twice.png, twice.txt, twice.png, twice.txt: webdataset itself refuses such a
    tar (a repeated member name in one sample); here the second is a sample of its own, a duplicate."""
    write_tar(str(tmp_path / "c.tar"), TARS["c.tar"])
    unit = next(open_input(str(tmp_path / "c.tar")).units(10))
    read = list(read_shard_unit(unit, embed.UnitRef(0, unit.key, None)))
    assert {ref.size for ref, _, _ in read} == {4}
    assert [(i.id, p.failure and p.failure[1]) for _, i, p in read] == [
        ("cx", None), ("twice", None), ("twice", "duplicate_id"), ("dup", None)]
    assert read[1][2].data == image_bytes(8) and read[1][1].captions == ("twice 8",)
    assert read[2][1].captions == ("twice 9",)


def test_a_crash_inside_the_check_is_finished_by_the_rerun(tars, tiny_ckpt_dir, tmp_path):
    """The state a crash leaves between a unit's two rewrites: its dead letters already name the
    later "dup", its shard still holds it and its done marker has the old counts. The rerun embeds
    nothing and finishes the rewrite: one row, one dead letter."""
    output = str(tmp_path / "out")
    result = embed.run(_args(tars, output, tiny_ckpt_dir))
    every = store.open_store(output).read_table()
    first = every.filter(pc.equal(every.column("uri"), os.path.join(tars, "a.tar") + "#dup.png"))
    unit1 = fs.join(output, "shard-00001.parquet")
    with fs.open(unit1) as f:
        table = pq.read_table(f)
    row = first.select(table.column_names).set_column(
        table.column_names.index("uri"), "uri", pa.array([os.path.join(tars, "b.tar") + "#dup.png"]))
    store.write_shard(unit1, pa.concat_tables([table, row.cast(table.schema)]))
    marker_path = fs.join(output, "_done", "unit-00001.json")
    marker = json.loads(fs.read_bytes(marker_path))
    marker.update(embedded=marker["embedded"] + 1, dead_letters=marker["dead_letters"] - 1,
                  dead_letter_reasons={"duplicate_id": marker["dead_letters"] - 1})
    fs.write_bytes(marker_path, json.dumps(marker).encode())
    assert [r["id"] for r in store.open_store(output).read_table().to_pylist()].count("dup") == 2
    again = embed.run(_args(tars, output, tiny_ckpt_dir))
    assert again.units_embedded == 0 and again.totals == result.totals
    _check(tars, output, again)


def test_a_key_in_a_sidecar_tar_and_in_a_tar_without_one(tmp_path, tiny_ckpt_dir):
    """img2dataset's 00000.tar (its sidecar lists "dup") and a plain 00001.tar holding "dup" too."""
    root = tmp_path / "mixed"
    root.mkdir()
    write_tar(str(root / "00000.tar"), [("k0", 0), ("dup", 1)])
    pq.write_table(pa.Table.from_pylist([{"key": k, "url": f"http://h/{k}.png", "caption": k, "status": "success",
                                          "error_message": None} for k in ("k0", "dup")]), str(root / "00000.parquet"))
    write_tar(str(root / "00001.tar"), [("dup", 2), ("z", 3)])
    output = str(tmp_path / "out")
    result = embed.run(_args(str(root), output, tiny_ckpt_dir))
    rows, dead = _outcome(output)
    assert rows == [("dup", str(root / "00000.tar") + "#dup.png"), ("k0", str(root / "00000.tar") + "#k0.png"),
                    ("z", str(root / "00001.tar") + "#z.png")]
    assert [(i, r, u) for i, r, u, _ in dead] == [("dup", "duplicate_id", str(root / "00001.tar") + "#dup.png")]
    assert str(root / "00000.tar") + "#dup.png" in dead[0][3]
    assert result.totals["rows"] == 4 == result.totals["embedded"] + result.totals["dead_letters"]
