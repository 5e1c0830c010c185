"""Sharded manifests: a folder or glob of JSONL / CSV / Parquet manifest files read as one listing,
streamed, with ids unique across shards and --keep-columns carried into the store."""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from koclip import store
from pipelines import embed
from pipelines.inputs import InputOptions, detect_format, open_input
from pipelines.transforms.write import read_dead_letters
from test_listing import held_and_streamed_peak


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")


def test_shards_are_one_listing_with_ids_unique_across_them(tmp_path):
    _jsonl(tmp_path / "part-0.jsonl", [{"id": "a", "image": "img/a.png", "captions": ["가"], "url": "http://a"},
                                       "{not json", {"id": "b", "image": "img/b.png", "url": "http://b"}])
    (tmp_path / "part-1.csv").write_text("id,image,captions,url\nc,img/c.png,다,http://c\na,img/a2.png,again,http://x\n",
                                         encoding="utf-8")
    pq.write_table(pa.Table.from_pylist([{"id": "d", "image": "img/d.png", "captions": ["라"], "url": None}]),
                   tmp_path / "part-2.parquet")
    assert detect_format(str(tmp_path)) == "manifests"
    assert detect_format(str(tmp_path / "part-*.jsonl")) == "manifests"
    source = open_input(str(tmp_path), options=InputOptions(keep_columns=("url",)))
    units = list(source.units(2))
    assert not source.complete  # "a" repeats: known at the end of the first pass
    units = list(source.units(2))
    assert source.complete
    items = [i for u in units for i in u.items]
    assert [i.id for i in items] == ["a", "b", "c", "d"]
    assert items[0].uri == str(tmp_path / "img" / "a.png") and [i.extra for i in items] == [
        {"url": "http://a"}, {"url": "http://b"}, {"url": "http://c"}, {"url": None}]
    assert [(r.source.rsplit("/", 1)[1], r.reason, r.line) for r in source.rejects] == [
        ("part-0.jsonl", "not_json", 2), ("part-1.csv", "duplicate_id", 3)]
    assert "first at" in source.rejects[1].message and "part-0.jsonl:1" in source.rejects[1].message


@pytest.mark.slow  # a pipeline run; the kept columns' path into the store runs by default in test_inputs_parquet
def test_sharded_manifests_embed_and_keep_columns(tmp_path, tiny_ckpt_dir):
    (tmp_path / "img").mkdir()
    for i in range(5):
        Image.new("RGB", (32, 32), (i * 50, 10, 10)).save(tmp_path / "img" / f"{i}.png")
    for shard in range(2):
        _jsonl(tmp_path / f"m-{shard}.jsonl", [{"id": f"i{shard}{k}", "image": f"img/{k + shard}.png",
                                                "captions": [f"그림 {k}"], "license": "cc-by", "n": k}
                                               for k in range(3)])
    output = str(tmp_path / "out")
    result = embed.run(["--input", str(tmp_path / "m-*.jsonl"), "--output", output, "--model", tiny_ckpt_dir,
                        "--unit-size", "4", "--batch-size", "4", "--keep-columns", "license,n"])
    table = store.open_store(output).read_table()
    assert result.totals["embedded"] == 6 == table.num_rows and not read_dead_letters(output)
    assert table.schema.field("license").type == pa.string()
    assert set(table.column("license").to_pylist()) == {"cc-by"}
    assert sorted(table.column("n").to_pylist()) == ["0", "0", "1", "1", "2", "2"]  # kept as strings


def test_listing_sharded_manifests_holds_no_listing(tmp_path):
    """6k rows over 8 shards, cut into units and let go: the listing's allocations stay far below
    what the items take (embed.plan's own batching of unit files: tests/test_listing.py)."""
    for shard in range(8):
        _jsonl(tmp_path / f"s-{shard:03d}.jsonl", [{"id": f"{shard}-{i}", "image": f"gs://b/{shard}/{i}.jpg",
                                                    "captions": [f"사진 {i}"]} for i in range(750)])
    source = open_input(str(tmp_path))
    held, peak, counts = held_and_streamed_peak(source, 500)
    assert counts == [500] * 12 and source.complete and not source.rejects
    assert peak < held / 4, (peak, held)
