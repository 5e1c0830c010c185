"""Parquet with image bytes as input: a Hugging Face `datasets`-style file ({bytes, path} structs,
several row groups) read back by row ranges; img2dataset's `jpg` column; wrong column types refused."""
from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from koclip import fs, store
from pipelines import embed
from pipelines.inputs import InputError, InputOptions, Shard, detect_format, open_input, read_shard_unit
from pipelines.transforms.write import read_dead_letters

IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # datasets.Image's storage type


def image_bytes(seed: int, size: int = 32) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (seed * 53 % 256, 40, seed * 17 % 256)).save(buffer, "PNG")
    return buffer.getvalue()


def hf_table(n: int) -> pa.Table:
    images = [{"bytes": image_bytes(i), "path": f"img{i}.png"} for i in range(n)]
    if n > 6:
        images[4] = None  # a row without an image
        images[6] = {"bytes": b"\x89PNG but not really", "path": "broken.png"}
    return pa.table({"image": pa.array(images, IMAGE), "text": [f"{i}번 그림" for i in range(n)],
                     "source": [f"s{i % 3}" for i in range(n)]})


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    pq.write_table(hf_table(10), root / "train-00000-of-00002.parquet", row_group_size=4)
    pq.write_table(hf_table(3), root / "train-00001-of-00002.parquet")
    return str(root)


def test_hf_parquet_is_detected_and_cut_by_row_ranges(hf_folder):
    assert detect_format(hf_folder) == "parquet"
    units = list(open_input(hf_folder).units(3))
    first = f"{hf_folder}/train-00000-of-00002.parquet"
    assert [u.shard for u in units] == [
        Shard("parquet", first, 0, 3), Shard("parquet", first, 3, 6), Shard("parquet", first, 6, 9),
        Shard("parquet", first, 9, 10), Shard("parquet", f"{hf_folder}/train-00001-of-00002.parquet", 0, 3)]
    assert [i.id for i in units[1].items] == ["train-00000-of-00002/3", "train-00000-of-00002/4",
                                              "train-00000-of-00002/5"]
    assert units[0].items[2].captions == ("2번 그림",)
    # rows 3..5 span the first two row groups (4 rows each): read from both
    read = list(read_shard_unit(units[1], embed.UnitRef(1, units[1].key, 3)))
    assert read[0][2].data == image_bytes(3) and read[2][2].data == image_bytes(5)
    assert read[1][2].failure[1] == "no_image_bytes"


def test_hf_parquet_embeds_with_kept_columns(hf_folder, tiny_ckpt_dir, tmp_path):
    output = str(tmp_path / "out")
    result = embed.run(["--input", hf_folder, "--output", output, "--model", tiny_ckpt_dir, "--unit-size", "4",
                        "--batch-size", "4", "--keep-columns", "source"])
    rows = {r["id"]: r for r in store.open_store(output).read_table().to_pylist()}
    dead = {d["id"]: d["reason"] for d in read_dead_letters(output)}
    assert dead == {"train-00000-of-00002/4": "no_image_bytes", "train-00000-of-00002/6": "not_an_image"}
    assert len(rows) == 13 - 2 == result.totals["embedded"] and result.totals["rows"] == 13
    row = rows["train-00000-of-00002/5"]
    assert row["source"] == "s2" and row["captions"] == ["5번 그림"] and row["url"] is None
    assert row["uri"] == f"{hf_folder}/train-00000-of-00002.parquet#row=5"


def test_img2dataset_parquet_failures_are_dead_letters_of_the_listing(tmp_path):
    pq.write_table(pa.table({
        "key": ["000000000", "000000001", "000000002"], "url": ["http://h/0", "http://h/1", "http://h/2"],
        "txt": ["하나", None, "셋"], "status": ["success", "failed_to_download", "success"],
        "error_message": [None, "HTTP Error 404: Not Found", None],
        "jpg": pa.array([image_bytes(0), None, image_bytes(2)], pa.binary())}), tmp_path / "00000.parquet")
    source = open_input(str(tmp_path))
    units = list(source.units(10))
    assert [i.id for i in units[0].items] == ["000000000", "000000002"]
    assert units[0].items[1].captions == ("셋",) and units[0].items[1].extra == {"url": "http://h/2"}
    assert [(r.id, r.reason, r.message) for r in source.rejects] == [
        ("000000001", "failed_to_download", "HTTP Error 404: Not Found")]


def test_a_wrong_image_column_type_is_one_line(tmp_path, tiny_ckpt_dir, capsys):
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"key": ["a"], "jpg": [12345]}), path)
    with pytest.raises(InputError, match="column 'jpg' is int64, not image bytes"):
        list(open_input(str(path), "parquet").units(10))
    with pytest.raises(InputError, match="no column of image bytes"):
        list(open_input(str(path), "parquet", InputOptions(image_column="pixels")).units(10))
    status = embed.main(["--input", str(path), "--input-format", "parquet", "--output", str(tmp_path / "o"),
                         "--model", tiny_ckpt_dir])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and err[-1].startswith("pipelines.embed: error: ") and "is int64, not image bytes" in err[-1]


def test_parquet_on_gcs_reads_row_ranges(gcs_bucket):
    buffer = io.BytesIO()
    pq.write_table(hf_table(10), buffer, row_group_size=4)
    fs.write_bytes(f"{gcs_bucket}/hf/part-0.parquet", buffer.getvalue())
    assert detect_format(f"{gcs_bucket}/hf") == "parquet"
    units = list(open_input(f"{gcs_bucket}/hf").units(5))
    assert [(u.shard.start, u.shard.stop) for u in units] == [(0, 5), (5, 10)]
    read = list(read_shard_unit(units[1], embed.UnitRef(1, units[1].key, 5)))
    assert [p.data == image_bytes(i) for i, (_, _, p) in zip(range(5, 10), read)] == [True, False, True, True, True]
