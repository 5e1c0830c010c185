"""The pipeline's listing: manifests streamed, their errors named by row, units cut as they come."""
from __future__ import annotations

import json
import tracemalloc

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from koclip.errors import ManifestError, NotFoundError
from pipelines import embed
from pipelines.listing import ListingError, iter_units, list_items, listing_digest


def _rows(n: int) -> list[dict]:
    return [{"id": f"item-{i}", "image": f"images/{i:06d}.jpg", "captions": [f"{i}번째 사진"]} for i in range(n)]


def _write(path, rows: list[dict]) -> str:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    elif path.suffix == ".csv":
        lines = ["id,image,captions"] + [f'{r["id"]},{r["image"]},{r["captions"][0]}' for r in rows]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


@pytest.mark.parametrize("suffix, second", [(".jsonl", ":4"), (".csv", ":5"), (".parquet", ": row 4")])
def test_a_repeated_id_names_both_rows(tmp_path, suffix, second):
    rows = _rows(5)
    rows[3]["id"] = rows[1]["id"]
    path = _write(tmp_path / f"m{suffix}", rows)
    with pytest.raises(ManifestError, match=f"{second}: duplicate id 'item-1' \\(first at .*m{suffix}"):
        list_items(path)


def test_manifest_errors_are_one_line(tmp_path):
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"id": "a", "image": "a.jpg"}\n{"id": "b", \n', encoding="utf-8")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes('{"id": "é", "image": "a.jpg"}\n'.encode("latin-1"))
    no_image = _write(tmp_path / "noimage.jsonl", [{"id": "a", "captions": ["x"]}])
    for path, error, message in [(bad_json, ManifestError, "bad.jsonl:2: not valid JSON"),
                                 (empty, ListingError, "input manifest is empty"),
                                 (latin, ManifestError, "not UTF-8 text"),
                                 (no_image, ManifestError, "noimage.jsonl:1: missing field 'image'"),
                                 (tmp_path / "missing.jsonl", NotFoundError, "manifest not found")]:
        with pytest.raises(error, match=message):
            list_items(str(path))


def test_units_are_cut_from_a_stream_in_order(tmp_path):
    items = list_items(_write(tmp_path / "m.jsonl", _rows(23)))
    streamed = list(iter_units(iter(items), 5))
    assert [u.index for u in streamed] == [0, 1, 2, 3, 4]
    assert [u.items for u in streamed] == [tuple(items[i:i + 5]) for i in range(0, 23, 5)]
    assert [len(u.items) for u in streamed] == [5, 5, 5, 5, 3]
    assert [u.key for u in streamed] == [listing_digest(items[i:i + 5]) for i in range(0, 23, 5)]


def test_planning_holds_unit_references_not_items(tmp_path, tiny_ckpt_dir):
    """The driver streams the listing: planning 100k items allocates far less than the items."""
    manifest = _write(tmp_path / "big.jsonl", _rows(100_000))
    tracemalloc.start()
    items = list_items(manifest)
    held = tracemalloc.get_traced_memory()[0]
    del items
    tracemalloc.reset_peak()
    baseline = tracemalloc.get_traced_memory()[0]
    opts, _ = embed.parse(["--input", manifest, "--output", str(tmp_path / "out"), "--model", tiny_ckpt_dir,
                           "--unit_size", "1000"])
    plan = embed.plan(opts)
    peak = tracemalloc.get_traced_memory()[1] - baseline
    tracemalloc.stop()
    assert (len(plan.units), len(plan.pending), plan.run_info["items"]) == (100, 100, 100_000)
    assert peak < held / 2, (peak, held)  # holding the items would take at least `held`


def _photo_tree(root):
    """photos/a/x.jpg, photos/b/x.jpg, photos/b/c/x.jpg (+ x.txt beside the first): one basename, three items."""
    for sub in ("a", "b", "b/c"):
        (root / "photos" / sub).mkdir(parents=True, exist_ok=True)
        (root / "photos" / sub / "x.jpg").write_bytes(b"jpeg bytes")
    (root / "photos" / "a" / "x.txt").write_text("사과", encoding="utf-8")


def test_folder_ids_are_paths_relative_to_the_root_however_it_is_written(tmp_path, monkeypatch):
    _photo_tree(tmp_path)
    (tmp_path / "link").symlink_to(tmp_path / "photos", target_is_directory=True)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path)
    want = ["a/x.jpg", "b/c/x.jpg", "b/x.jpg"]
    for source in ("photos", "photos/", "./photos", "elsewhere/../photos", str(tmp_path / "photos"), "link"):
        items = list_items(source)
        assert sorted(i.id for i in items) == want, source
    items = {i.id: i for i in list_items("photos")}
    assert items["a/x.jpg"].caption_uri.endswith("photos/a/x.txt") and items["b/x.jpg"].caption_uri is None
    assert sorted(i.id for i in list_items("photos/**/*.jpg")) == want  # a glob: relative to its fixed part
    assert sorted(i.id for i in list_items(str(tmp_path / "photos" / "b" / "*.jpg"))) == ["x.jpg"]


def test_folder_ids_on_gcs_match_local(tmp_path, gcs_bucket):
    from koclip import fs

    _photo_tree(tmp_path)
    for path in sorted((tmp_path / "photos").rglob("*.*")):
        fs.write_bytes(fs.join(gcs_bucket, "photos", str(path.relative_to(tmp_path / "photos"))), path.read_bytes())
    remote = list_items(f"{gcs_bucket}/photos/")
    assert [i.id for i in remote] == [i.id for i in list_items(str(tmp_path / "photos"))]
    assert all(i.uri == f"{gcs_bucket}/photos/{i.id}" for i in remote)
