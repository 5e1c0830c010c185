"""The pipeline's listing: manifests streamed, their errors named by row, units cut as they come."""
from __future__ import annotations

import json
import os
import tracemalloc

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from koclip import store
from koclip.errors import ManifestError, NotFoundError
from pipelines import embed
from pipelines.listing import Listing, ListingError, iter_units, list_items, listing_digest
from pipelines.transforms.write import read_dead_letters


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


@pytest.mark.slow  # 60-85 s of tracemalloc over a large listing; bench/listing.py measures the same at scale
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


# ---------------------------------------------------------------- rows that are not items

GOOD_ROW = '{{"id": "{0}", "image": "{0}.png", "captions": ["그림 {0}"]}}'
BAD_ROWS = [  # (line, reason): one of each kind the listing must reject and go past
    ('{"id": "broken", "image": "broken.png"', "not_json"),
    ('["a list", "not an object"]', "not_an_object"),
    ('{"image": "no-id.png", "captions": ["x"]}', "no_id"),
    ('{"id": "no-image", "captions": ["x"]}', "no_image"),
    ('{"id": {"nested": 1}, "image": "object-id.png"}', "bad_id"),
]


def _mixed_manifest(path, good=("g0", "g1", "g2", "g3")) -> tuple[str, dict[int, str]]:
    """Good rows with every kind of bad row between them (and a blank line, still counted):
    (path, {line number: reason})."""
    lines, bad = [GOOD_ROW.format(good[0]), ""], {}
    for (text, reason), item_id in zip(BAD_ROWS, [*good[1:], None, None]):
        lines.append(text)
        bad[len(lines)] = reason
        if item_id:
            lines.append(GOOD_ROW.format(item_id))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path), bad


def test_a_bad_row_is_a_reject_with_its_line_and_reason_and_the_listing_goes_on(tmp_path):
    manifest, bad = _mixed_manifest(tmp_path / "m.jsonl")
    rejects = []
    items = list_items(manifest, rejects=rejects)
    assert [i.id for i in items] == ["g0", "g1", "g2", "g3"]
    assert {r.line: r.reason for r in rejects} == bad
    by_reason = {r.reason: r.to_json() for r in rejects}
    for reason, record in by_reason.items():
        assert record["stage"] == "listing" and record["source"] == manifest and record["row"] is None
        assert record["message"].startswith(f"{manifest}:{record['line']}: ")
        assert set(record) >= {"id", "uri", "stage", "reason", "message", "line"}
    assert by_reason["not_json"]["text"] == BAD_ROWS[0][0]
    assert (by_reason["no_id"]["id"], by_reason["no_id"]["uri"]) == (None, str(tmp_path / "no-id.png"))
    assert (by_reason["no_image"]["id"], by_reason["no_image"]["uri"]) == ("no-image", None)
    with pytest.raises(ManifestError, match=f"m.jsonl:{min(bad)}: not valid JSON"):
        list_items(manifest)  # without `rejects`: the first bad row refuses the listing, as before


def test_rejected_text_is_cut_and_bad_bytes_are_one_bad_row(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_bytes(GOOD_ROW.format("a").encode() + b'\n{"id": "\xe9t\xe9", "image": "x.png"}\n'
                     + ("{" + "가" * 500 + "\n").encode() + GOOD_ROW.format("b").encode() + b"\n")
    rejects = []
    assert [i.id for i in list_items(str(path), rejects=rejects)] == ["a", "b"]
    assert [(r.line, r.reason) for r in rejects] == [(2, "not_utf8"), (3, "not_json")]
    assert len(rejects[1].text) == 200 and rejects[1].text == ("{" + "가" * 500)[:200]
    json.dumps([r.to_json() for r in rejects], ensure_ascii=False).encode()  # the bad bytes are not carried over


def test_csv_rejects_name_the_line_the_record_starts_on(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text('id,image,captions\n'
                    'a,a.png,"두 줄의\n캡션"\n'  # lines 2-3: one record
                    '\n'  # line 4: blank
                    ',noid.png,x\n'  # line 5
                    'b,b.png,"고양이, 강아지"\n'
                    'c,c.png,고양이, 강아지\n'  # line 7: an unquoted comma
                    'd,d.png,끝\n', encoding="utf-8")
    rejects = []
    items = list_items(str(path), rejects=rejects)
    assert [(i.id, i.captions) for i in items] == [("a", ("두 줄의\n캡션",)), ("b", ("고양이, 강아지",)),
                                                    ("d", ("끝",))]
    assert [(r.line, r.reason, r.text) for r in rejects] == [(5, "no_id", ",noid.png,x"),
                                                             (7, "too_many_fields", "c,c.png,고양이, 강아지")]
    assert rejects[0].message.startswith(f"{path}:5: ")


def test_parquet_rejects_carry_a_row_number(tmp_path):
    rows = _rows(4)
    rows[1]["id"], rows[3]["image"] = None, None
    path = _write(tmp_path / "m.parquet", rows)
    rejects = []
    assert [i.id for i in list_items(path, rejects=rejects)] == ["item-0", "item-2"]
    assert [(r.row, r.line, r.reason) for r in rejects] == [(2, None, "no_id"), (4, None, "no_image")]
    assert rejects[0].message == f"{path}: row 2: missing field 'id'"
    assert json.loads(rejects[1].text)["id"] == "item-3"


@pytest.mark.parametrize("suffix, first, where", [(".jsonl", ":2", ":4"), (".csv", ":3", ":5"),
                                                   (".parquet", ": row 2", ": row 4")])
def test_a_repeated_id_is_a_reject_naming_the_first_row(tmp_path, suffix, first, where):
    """The first row with an id is the item; a later one is a duplicate_id reject. The repeat is
    known at the end of the first pass, so the listing says it is not complete and is read again."""
    rows = _rows(5)
    rows[3]["id"] = rows[1]["id"]
    path = _write(tmp_path / f"m{suffix}", rows)
    listing = Listing(path)
    assert [i.id for i in listing].count("item-1") == 2 and not listing.complete
    items = list(listing)
    assert listing.complete and [i.id for i in items] == ["item-0", "item-1", "item-2", "item-4"]
    assert [i.uri for i in items][1].endswith("000001.jpg")
    [reject] = listing.rejects
    assert (reject.reason, reject.id) == ("duplicate_id", "item-1")
    assert reject.message == f"{path}{where}: duplicate id 'item-1' (first at {path}{first})"
    assert [i.id for i in list_items(path, rejects=[])] == [i.id for i in items]


def test_the_first_row_that_is_an_item_keeps_the_id(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"id": "a", "captions": ["no image"]}\n' + GOOD_ROW.format("a") + "\n" + GOOD_ROW.format("b")
                    + "\n" + GOOD_ROW.format("a").replace("a.png", "again.png") + "\n", encoding="utf-8")
    rejects = []
    items = list_items(str(path), rejects=rejects)
    assert [(i.id, os.path.basename(i.uri)) for i in items] == [("a", "a.png"), ("b", "b.png")]
    assert [(r.line, r.reason) for r in rejects] == [(1, "no_image"), (4, "duplicate_id")]
    assert "(first at " + f"{path}:2)" in rejects[1].message


def test_a_manifest_in_which_no_row_is_an_item_is_refused_in_one_line(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text("not json\n[1]\n", encoding="utf-8")
    with pytest.raises(ManifestError) as info:
        list_items(str(path), rejects=[])
    assert str(info.value) == (f"no row of {path} is an item (2 rejected; first: {path}:1: not valid JSON "
                               "(Expecting value at column 1))")


# ---------------------------------------------------------------- the pipeline, end to end


def _listing_dead_letters(output) -> list[dict]:
    path = output / "_dead_letters" / "listing.jsonl"
    if not path.exists():
        return None
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line]


def test_bad_rows_are_listing_dead_letters_and_the_run_embeds_the_rest(tmp_path, tiny_ckpt_dir, capsys):
    rng = np.random.default_rng(0)
    for name in ("g0", "g1", "g2"):  # g3's image is missing: a dead letter of its unit, not of the listing
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(tmp_path / f"{name}.png")
    manifest, bad = _mixed_manifest(tmp_path / "m.jsonl")
    output = tmp_path / "out"
    args = ["--input", manifest, "--output", str(output), "--model", tiny_ckpt_dir, "--unit-size", "2",
            "--batch-size", "2"]
    result = embed.run(args)
    assert sorted(store.open_store(str(output)).read_table(["id"]).column("id").to_pylist()) == ["g0", "g1", "g2"]
    listed = _listing_dead_letters(output)
    assert [(d["line"], d["reason"]) for d in listed] == sorted(bad.items())
    assert all(d["stage"] == "listing" and d["source"] == manifest for d in listed)
    dead = read_dead_letters(str(output))
    assert dead[:len(listed)] == listed
    assert [(d["id"], d["reason"]) for d in dead[len(listed):]] == [("g3", "not_found")]
    totals = result.totals
    assert (totals["rows"], totals["items"], totals["listing_dead_letters"]) == (9, 4, 5)
    assert totals["rows"] == totals["embedded"] + totals["dead_letters"] == 3 + len(dead)
    assert totals["dead_letter_reasons"] == {**{reason: 1 for reason in bad.values()}, "not_found": 1}
    assert (result.units, result.this_run["items_read"]) == (2, 4)
    run_info = json.loads((output / "_run.json").read_text())
    assert (run_info["rows"], run_info["listing_dead_letters"]) == (9, 5)
    assert result.summary().startswith("3 of 9 rows embedded, 6 dead-lettered (")
    assert "5 of them rows the listing rejected" in result.summary()

    again = embed.run(args)  # the same manifest: every unit skipped, the listing's file rewritten whole
    assert (again.units_embedded, again.totals) == (0, totals)
    assert _listing_dead_letters(output) == listed

    # The bad rows deleted: the same items, so the same units (still done); no stale listing dead letters.
    good_lines = [line for n, line in enumerate(open(manifest, encoding="utf-8"), start=1) if n not in bad]
    (tmp_path / "m.jsonl").write_text("".join(good_lines), encoding="utf-8")
    fixed = embed.run(args)
    assert (fixed.units_embedded, fixed.units_skipped) == (0, 2)
    assert _listing_dead_letters(output) is None
    assert (fixed.totals["rows"], fixed.totals["listing_dead_letters"], fixed.totals["dead_letters"]) == (4, 0, 1)
    assert [d["id"] for d in read_dead_letters(str(output))] == ["g3"]

    # --strict refuses at the first bad row, in one line, and writes nothing.
    _mixed_manifest(tmp_path / "m.jsonl")
    strict_out = tmp_path / "strict"
    assert embed.main(args[:2] + ["--output", str(strict_out)] + args[4:] + ["--strict"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"pipelines.embed: error: {manifest}:{min(bad)}: not valid JSON (") and err.count("\n") == 1
    assert not (strict_out / "_dead_letters").exists() and not list(strict_out.glob("shard-*"))


def test_overwrite_clears_the_listing_dead_letters_with_the_rest(tmp_path, tiny_ckpt_dir):
    Image.fromarray(np.zeros((24, 24, 3), np.uint8)).save(tmp_path / "a.png")
    manifest = tmp_path / "m.csv"
    manifest.write_text("id,image,captions\na,a.png,검은 사각형\n,b.png,이름\u2028없음\n", encoding="utf-8")
    output = tmp_path / "out"
    args = ["--input", str(manifest), "--output", str(output), "--model", tiny_ckpt_dir]
    first = embed.run(args)
    assert [(d["line"], d["reason"], d["uri"], d["text"]) for d in read_dead_letters(str(output))] == [
        (3, "no_id", str(tmp_path / "b.png"), ",b.png,이름\u2028없음")]  # U+2028 does not split the record
    assert (first.totals["rows"], first.totals["embedded"]) == (2, 1)
    manifest.write_text("id,image,captions\na,a.png,검은 사각형\nb,a.png,이름 있음\n", encoding="utf-8")
    with pytest.raises(embed.PlanError, match="different listing"):
        embed.run(args)
    redone = embed.run(args + ["--overwrite"])
    assert _listing_dead_letters(output) is None
    assert (redone.totals["rows"], redone.totals["embedded"], redone.totals["dead_letters"]) == (2, 2, 0)


def test_a_folder_is_listed_one_subfolder_at_a_time_in_sorted_path_order(tmp_path, monkeypatch):
    from koclip import fs
    from pipelines import listing

    root = tmp_path / "tree"
    for path in ("a.jpg", "a/x.jpg", "a/x.txt", "a-b.jpg", "a-b/y.png", "a/c/z.jpg", "a/b.jpg", "ab.jpg", "a/c.jpg",
                 "a/c0.png", "a/notes.md"):
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(b"x")
    globbed = [p for p in fs.glob(f"{root}/**") if p.endswith((".jpg", ".png"))]
    listed = []
    calls = []
    real = listing._folder_entries
    monkeypatch.setattr(listing, "_folder_entries", lambda folder: calls.append(folder) or real(folder))
    listed = list(listing.iter_images(str(root)))
    assert [i.uri for i in listed] == globbed  # the order a whole sorted listing gives
    assert [i.id for i in listed][:3] == ["a-b.jpg", "a-b/y.png", "a.jpg"]
    assert [i.caption_uri for i in listed if i.caption_uri] == [str(root / "a" / "x.txt")]
    assert sorted(calls) == sorted(str(root / p).rstrip("/") for p in ("", "a", "a/c", "a-b"))


def test_listing_a_folder_holds_one_subfolder_of_names(tmp_path):
    """6k images in 12 subfolders, cut into units and let go: the listing allocates far less than
    the items take (a whole listing of the tree would take more than they do)."""
    from pipelines.inputs import open_input

    root = tmp_path / "photos"
    for sub in range(12):
        (root / f"{sub:03d}").mkdir(parents=True)
        for i in range(500):
            os.close(os.open(root / f"{sub:03d}" / f"{i:05d}.jpg", os.O_CREAT | os.O_WRONLY))
    source = open_input(str(root))
    held, peak, counts = held_and_streamed_peak(source, 500)
    assert counts == [500] * 12
    assert peak < held / 4, (peak, held)


def held_and_streamed_peak(source, unit_size: int) -> tuple[int, int, list[int]]:
    """(bytes the listing's items take when all are kept, peak bytes while the units are only
    counted, items per unit): a streamed listing's peak is a fraction of what its items take."""
    tracemalloc.start()
    items = [i for u in source.units(unit_size) for i in u.items]
    held = tracemalloc.get_traced_memory()[0]
    del items
    tracemalloc.stop()
    tracemalloc.start()
    counts = [len(u.items) for u in source.units(unit_size)]
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return held, peak, counts
