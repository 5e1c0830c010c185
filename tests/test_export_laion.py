"""python -m pipelines.export --format laion: img_emb/, text_emb/, metadata/ with rows aligned, read
back with embedding-reader (the reader autofaiss and clip-retrieval use) and autofaiss itself."""
from __future__ import annotations

import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from koclip import fs
from koclip.store import Row, rows_to_table, write_shard
from pipelines.export import export_laion, main

DIM = 8


@pytest.fixture(scope="module")
def embeddings(tmp_path_factory):
    """A store of 11 rows in 3 shards (of 5, 4, 2 rows), with a kept `url` column; one item has no caption."""
    root = str(tmp_path_factory.mktemp("store"))
    rng = np.random.default_rng(0)
    rows = []
    for i in range(11):
        captions = [] if i == 3 else [f"캡션 {i}", f"둘째 {i}"][: 1 + i % 2]
        image = rng.normal(size=DIM).astype(np.float32)
        texts = rng.normal(size=(len(captions), DIM)).astype(np.float32)
        rows.append(Row(f"item-{i:02d}", f"/data/00000.tar#{i:09d}.jpg", f"{i:064x}", 32, 32 + i, captions,
                        image / np.linalg.norm(image), texts, None, {"url": f"http://h/{i}.jpg"}))
    for n, (start, stop) in enumerate([(0, 5), (5, 9), (9, 11)]):
        write_shard(os.path.join(root, f"shard-{n:05d}.parquet"),
                    rows_to_table(rows[start:stop], "model-a", {"projection_dim": DIM}, DIM, extra_columns=("url",)))
    return root, rows


def test_the_layout_holds_aligned_rows_split_across_files(embeddings, tmp_path):
    root, rows = embeddings
    out = str(tmp_path / "laion")
    result = export_laion(root, out, rows_per_file=4)
    assert result == {"rows": 11, "files": 3, "dim": DIM, "fingerprint": "model-a"}
    assert sorted(os.listdir(os.path.join(out, "img_emb"))) == ["img_emb_0.npy", "img_emb_1.npy", "img_emb_2.npy"]
    images = np.concatenate([np.load(os.path.join(out, "img_emb", f"img_emb_{n}.npy")) for n in range(3)])
    texts = np.concatenate([np.load(os.path.join(out, "text_emb", f"text_emb_{n}.npy")) for n in range(3)])
    meta = [r for n in range(3) for r in pq.read_table(os.path.join(out, "metadata", f"metadata_{n}.parquet")).to_pylist()]
    assert [m["id"] for m in meta] == [r.id for r in rows]
    np.testing.assert_array_equal(images, np.stack([r.image_embedding for r in rows]))
    for row, text, m in zip(rows, texts, meta):
        assert m["image_path"] == row.uri and m["url"] == row.extra["url"] and m["height"] == row.height
        if row.captions:
            np.testing.assert_array_equal(text, row.caption_embeddings[0])
            assert m["caption"] == row.captions[0]
        else:
            assert not text.any() and m["caption"] is None


def test_embedding_reader_reads_the_same_vectors_in_metadata_order(embeddings, tmp_path):
    from embedding_reader import EmbeddingReader

    root, rows = embeddings
    out = str(tmp_path / "laion")
    assert main(["--embeddings", root, "--out", out, "--format", "laion", "--rows-per-file", "4"]) == 0
    reader = EmbeddingReader(os.path.join(out, "img_emb"), file_format="parquet_npy",
                             metadata_folder=os.path.join(out, "metadata"), meta_columns=["id", "caption"])
    assert reader.count == 11 and reader.dimension == DIM
    by_id = {}
    for vectors, meta in reader(batch_size=3, start=0, end=reader.count, show_progress=False):
        by_id.update(zip(meta["id"], vectors))
    assert sorted(by_id) == [r.id for r in rows]
    for row in rows:
        np.testing.assert_allclose(by_id[row.id], row.image_embedding, atol=1e-7)


def test_autofaiss_builds_an_index_from_the_export(embeddings, tmp_path):
    autofaiss = pytest.importorskip("autofaiss", reason="autofaiss comes from requirements-nodeps.txt")
    root, rows = embeddings
    out = str(tmp_path / "laion")
    export_laion(root, out, rows_per_file=4)
    # save_on_disk=False: autofaiss 2.18 writes its index_infos.json with json.dump, which fails on the
    # numpy 2 float32 scalars of its own metrics (not on anything of ours); the index is returned.
    index, _ = autofaiss.build_index(embeddings=os.path.join(out, "img_emb"), save_on_disk=False,
                                     max_index_memory_usage="50MB", current_memory_available="500MB",
                                     metric_type="ip", verbose=40)
    assert index.ntotal == 11
    _, found = index.search(np.stack([r.image_embedding for r in rows]), 1)
    assert found[:, 0].tolist() == list(range(11))  # the index's row i is metadata row i


def test_export_to_gcs(embeddings, gcs_bucket):
    root, rows = embeddings
    export_laion(root, f"{gcs_bucket}/laion")
    assert fs.glob(f"{gcs_bucket}/laion/**") == [f"{gcs_bucket}/laion/{p}" for p in
                                                ("img_emb/img_emb_0.npy", "metadata/metadata_0.parquet",
                                                 "text_emb/text_emb_0.npy")]


def test_a_missing_store_is_one_line(tmp_path, capsys):
    assert main(["--embeddings", str(tmp_path / "none"), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.startswith("pipelines.export: error: embedding folder not found")
