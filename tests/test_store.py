"""koclip.store: the Parquet schema, round trips, and the one-model rule."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from koclip import store


def _rows(n: int, dim: int, seed: int = 0, captions_per_row=(0, 1, 2)):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        k = captions_per_row[i % len(captions_per_row)]
        rows.append(store.Row(f"id{seed}-{i}", f"/data/{i}.png", f"{i:064x}", 10 + i, 20 + i,
                              [f"캡션 {i}-{c}" for c in range(k)], rng.standard_normal(dim).astype(np.float32),
                              rng.standard_normal((k, dim)).astype(np.float32), "test" if i % 2 else None))
    return rows


def _write(folder, name, rows, fingerprint="f" * 16, dim=8, dtype="float32"):
    path = f"{folder}/{name}"
    store.write_shard(path, store.rows_to_table(rows, fingerprint, {"projection_dim": dim}, dim, dtype))
    return path


def test_round_trip_keeps_every_field(tmp_path):
    rows = _rows(7, 8)
    _write(tmp_path, "shard-00000.parquet", rows[:4])
    _write(tmp_path, "shard-00001.parquet", rows[4:])
    opened = store.open_store(str(tmp_path))
    assert (opened.rows, opened.dim, opened.fingerprint) == (7, 8, "f" * 16)
    table = opened.read_table().to_pylist()
    for row, got in zip(rows, table):
        assert (got["id"], got["uri"], got["sha256"], got["width"], got["height"], got["captions"], got["split"]) == (
            row.id, row.uri, row.sha256, row.width, row.height, row.captions, row.split)
        np.testing.assert_array_equal(np.asarray(got["image_embedding"], np.float32), row.image_embedding)
        np.testing.assert_array_equal(np.asarray(got["caption_embeddings"], np.float32).reshape(-1, 8),
                                      row.caption_embeddings.reshape(-1, 8))
    ids, vectors = zip(*store.open_store(str(tmp_path)).iter_embeddings("caption_embeddings", batch_rows=3))
    flat_ids = [i for chunk in ids for i in chunk]
    assert flat_ids == [f"{r.id}#{c}" for r in rows for c in range(len(r.captions))]
    assert np.concatenate(vectors).shape == (len(flat_ids), 8)


def test_schema_is_fixed_size_lists_and_metadata(tmp_path):
    path = _write(tmp_path, "shard-00000.parquet", _rows(3, 8), dtype="float16")
    schema = pq.read_schema(path)
    vector = schema.field("image_embedding").type
    assert isinstance(vector, pa.FixedSizeListType) and vector.list_size == 8
    assert vector.value_type == pa.float16()
    assert schema.metadata[b"koclip.embedding_dtype"] == b"float16"
    assert schema.metadata[b"koclip.schema_version"] == store.SCHEMA_VERSION.encode()


def test_mixed_fingerprints_are_refused_by_name(tmp_path):
    _write(tmp_path, "shard-00000.parquet", _rows(2, 8, seed=0), fingerprint="a" * 16)
    _write(tmp_path, "shard-00001.parquet", _rows(2, 8, seed=1), fingerprint="b" * 16)
    with pytest.raises(store.StoreError, match=r"mixes embeddings of 2 models: a{16} .*b{16}"):
        store.open_store(str(tmp_path))


def test_errors_for_empty_folder_wrong_model_and_bad_column(tmp_path):
    with pytest.raises(store.StoreError, match="not found"):
        store.open_store(str(tmp_path / "nope"))
    with pytest.raises(store.StoreError, match="no embedding shards"):
        store.open_store(str(tmp_path))
    _write(tmp_path, "shard-00000.parquet", _rows(2, 8))
    with pytest.raises(store.StoreError, match="was embedded by model"):
        store.open_store(str(tmp_path), fingerprint="0" * 16)
    with pytest.raises(store.StoreError, match="no embedding column"):
        next(store.open_store(str(tmp_path)).iter_embeddings("pixels"))
    with pytest.raises(store.StoreError, match="2 captions but caption embeddings of shape"):
        bad = _rows(3, 8)[2]
        bad.caption_embeddings = np.zeros((1, 8), np.float32)
        store.rows_to_table([bad], "f" * 16, {}, 8)
