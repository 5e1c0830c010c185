"""The Parquet embedding store: one schema for every shard the pipeline writes.

A store is a folder (local or gs://) of `shard-*.parquet` files, readable as one dataset by
pyarrow, pandas or duckdb (`SELECT * FROM 'out/shard-*.parquet'`). Columns:

  id                  string      the item's id (unique across the store)
  uri                 string      where the image was read from
  sha256              string      hex digest of the image bytes as read
  width, height       int32       the decoded image's size, after EXIF rotation
  captions            list<str>   the item's captions (may be empty)
  split               string      the manifest's split, or null
  image_embedding     fixed_size_list<float32 | float16, D>   L2-normalised
  caption_embeddings  list<fixed_size_list<float32 | float16, D>>   one per caption, in order
  fingerprint         string      the fingerprint of the model that made the embeddings
  (kept columns)      string      optional, after these: input columns a run kept (pipelines.embed
                                  --keep-columns, img2dataset's `url`), the same in every shard of a run

Each file's metadata also holds `koclip.fingerprint`, `koclip.config` (the model's
config.json), `koclip.dim`, `koclip.embedding_dtype` and `koclip.schema_version`, so a shard
describes itself without the model. Readers get float32, whatever the storage dtype.

A store never mixes models: `open_store` refuses shards of different fingerprints, naming them.
"""
from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from koclip import fs
from koclip.errors import StoreError

SCHEMA_VERSION = "1"
SHARD_GLOB = "shard-*.parquet"
EMBEDDING_DTYPES = {"float32": pa.float32(), "float16": pa.float16()}
_NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16}
EMBEDDING_COLUMNS = ("image_embedding", "caption_embeddings")


def shard_name(index: int) -> str:
    """The file name of shard `index` (SHARD_GLOB matches it)."""
    return f"shard-{index:05d}.parquet"


def check_column(column: str) -> None:
    if column not in EMBEDDING_COLUMNS:
        raise StoreError(f"no embedding column {column!r}; choose one of {', '.join(EMBEDDING_COLUMNS)}")


def schema(dim: int, embedding_dtype: str = "float32", metadata: dict | None = None,
           extra_columns: Sequence[str] = ()) -> pa.Schema:
    if embedding_dtype not in EMBEDDING_DTYPES:
        raise StoreError(f"embedding dtype must be one of {', '.join(EMBEDDING_DTYPES)}, got {embedding_dtype!r}")
    vector = pa.list_(EMBEDDING_DTYPES[embedding_dtype], dim)
    return pa.schema([
        ("id", pa.string()),
        ("uri", pa.string()),
        ("sha256", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("captions", pa.list_(pa.string())),
        ("split", pa.string()),
        ("image_embedding", vector),
        ("caption_embeddings", pa.list_(vector)),
        ("fingerprint", pa.string()),
        *((name, pa.string()) for name in extra_columns),
    ], metadata=metadata)


def file_metadata(fingerprint: str, config: dict, dim: int, embedding_dtype: str) -> dict[str, str]:
    return {
        "koclip.schema_version": SCHEMA_VERSION,
        "koclip.fingerprint": fingerprint,
        "koclip.config": json.dumps(config, ensure_ascii=False, sort_keys=True),
        "koclip.dim": str(dim),
        "koclip.embedding_dtype": embedding_dtype,
    }


@dataclass
class Row:
    """One embedded item, as the pipeline hands it to the writer."""

    id: str
    uri: str
    sha256: str
    width: int
    height: int
    captions: list[str]
    image_embedding: np.ndarray  # [D]
    caption_embeddings: np.ndarray  # [len(captions), D]
    split: str | None = None
    extra: dict | None = None  # kept columns: name -> string or None


def _vectors(rows: np.ndarray, dim: int, embedding_dtype: str) -> pa.FixedSizeListArray:
    flat = np.ascontiguousarray(rows, dtype=_NUMPY_DTYPES[embedding_dtype]).reshape(-1)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat, type=EMBEDDING_DTYPES[embedding_dtype]), dim)


def rows_to_table(rows: Sequence[Row], fingerprint: str, config: dict, dim: int,
                  embedding_dtype: str = "float32", extra_columns: Sequence[str] = ()) -> pa.Table:
    target = schema(dim, embedding_dtype, file_metadata(fingerprint, config, dim, embedding_dtype), extra_columns)
    images = np.stack([r.image_embedding for r in rows]) if rows else np.zeros((0, dim), np.float32)
    if images.shape[1:] != (dim,):
        raise StoreError(f"image embeddings have shape {images.shape[1:]}, the store's dimension is {dim}")
    caption_counts = [len(r.captions) for r in rows]
    for r in rows:
        if np.shape(r.caption_embeddings) != (len(r.captions), dim) and len(r.captions):
            raise StoreError(f"item {r.id!r}: {len(r.captions)} captions but caption embeddings of shape "
                             f"{np.shape(r.caption_embeddings)}")
    flat_captions = (np.concatenate([np.asarray(r.caption_embeddings).reshape(-1, dim) for r in rows])
                     if sum(caption_counts) else np.zeros((0, dim), np.float32))
    offsets = np.concatenate([[0], np.cumsum(caption_counts)]).astype(np.int32)
    columns = {
        "id": pa.array([r.id for r in rows], pa.string()),
        "uri": pa.array([r.uri for r in rows], pa.string()),
        "sha256": pa.array([r.sha256 for r in rows], pa.string()),
        "width": pa.array([r.width for r in rows], pa.int32()),
        "height": pa.array([r.height for r in rows], pa.int32()),
        "captions": pa.array([list(r.captions) for r in rows], pa.list_(pa.string())),
        "split": pa.array([r.split for r in rows], pa.string()),
        "image_embedding": _vectors(images, dim, embedding_dtype),
        "caption_embeddings": pa.ListArray.from_arrays(pa.array(offsets), _vectors(flat_captions, dim, embedding_dtype)),
        "fingerprint": pa.array([fingerprint] * len(rows), pa.string()),
        **{name: pa.array([(r.extra or {}).get(name) for r in rows], pa.string()) for name in extra_columns},
    }
    return pa.Table.from_arrays(list(columns.values()), schema=target)


def write_shard(path: str, table: pa.Table) -> None:
    """Write one shard so that it appears under `path` complete or not at all (koclip.fs.write_bytes)."""
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    fs.write_bytes(path, buffer.getvalue())


# ---------------------------------------------------------------- reading


@dataclass
class ShardInfo:
    path: str
    rows: int
    fingerprint: str
    dim: int
    embedding_dtype: str
    config: dict


@dataclass
class Store:
    """The shards of one store (all of one model) and what their metadata says."""

    root: str
    shards: list[ShardInfo]

    @property
    def fingerprint(self) -> str:
        return self.shards[0].fingerprint

    @property
    def dim(self) -> int:
        return self.shards[0].dim

    @property
    def config(self) -> dict:
        return self.shards[0].config

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.shards)

    @property
    def paths(self) -> list[str]:
        return [s.path for s in self.shards]

    def dataset(self):
        """A pyarrow dataset over every shard (one logical table)."""
        import pyarrow.dataset as ds

        filesystem, paths = fs.arrow_paths(self.paths)
        return ds.dataset(paths, format="parquet", filesystem=filesystem)

    def read_table(self, columns: Sequence[str] | None = None) -> pa.Table:
        return self.dataset().to_table(columns=list(columns) if columns else None)

    def iter_tables(self, columns: Sequence[str] | None = None, batch_rows: int = 65536) -> Iterator[pa.Table]:
        """Record batches of at most batch_rows rows, shard by shard: never the whole store in memory."""
        for shard in self.shards:
            with fs.open(shard.path) as f:
                parquet = pq.ParquetFile(f)
                for batch in parquet.iter_batches(batch_size=batch_rows, columns=list(columns) if columns else None):
                    yield pa.Table.from_batches([batch])

    def iter_embeddings(self, column: str = "image_embedding",
                        batch_rows: int = 65536) -> Iterator[tuple[list[str], np.ndarray]]:
        """(ids, float32 [N, D]) batches, streaming. For caption_embeddings each caption is a row and
        its id is `"{item id}#{caption index}"`."""
        check_column(column)
        for table in self.iter_tables(["id", column], batch_rows):
            ids = table.column("id").to_pylist()
            values = table.column(column).combine_chunks()
            if column == "image_embedding":
                yield ids, vectors_to_numpy(values, self.dim)
                continue
            counts = values.value_lengths().to_numpy(zero_copy_only=False)
            caption_ids = [f"{i}#{c}" for i, n in zip(ids, counts) for c in range(n)]
            yield caption_ids, vectors_to_numpy(values.flatten(), self.dim)


def vectors_to_numpy(values: pa.Array, dim: int) -> np.ndarray:
    """A fixed-size-list column (float16 or float32) -> float32 [N, dim]."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    flat = values.flatten().to_numpy(zero_copy_only=False)
    return np.asarray(flat, dtype=np.float32).reshape(-1, dim)


def list_shards(root: str) -> list[str]:
    return fs.glob(fs.join(root, SHARD_GLOB))


def read_shard_info(path: str) -> ShardInfo:
    with fs.open(path) as f:
        meta = pq.ParquetFile(f).metadata
    raw = {k.decode(): v.decode() for k, v in (meta.metadata or {}).items()}
    if "koclip.fingerprint" not in raw:
        raise StoreError(f"{path} is not a koclip embedding shard (no koclip.fingerprint in its metadata)")
    return ShardInfo(path, meta.num_rows, raw["koclip.fingerprint"], int(raw["koclip.dim"]),
                     raw["koclip.embedding_dtype"], json.loads(raw["koclip.config"]))


def open_store(root: str | os.PathLike, fingerprint: str | None = None) -> Store:
    """The store at `root`, after checking every shard's footer: at least one shard, one model.

    With `fingerprint`, the store must have been made by that model.
    """
    root = os.fspath(root)
    if not fs.exists(root):
        raise StoreError(f"embedding folder not found: {root}")
    paths = list_shards(root)
    if not paths:
        raise StoreError(f"no embedding shards ({SHARD_GLOB}) in {root}; run `python -m pipelines.embed` first")
    shards = [read_shard_info(p) for p in paths]
    by_fingerprint: dict[str, list[str]] = {}
    for shard in shards:
        by_fingerprint.setdefault(shard.fingerprint, []).append(os.path.basename(shard.path))
    if len(by_fingerprint) > 1:
        parts = ", ".join(f"{fp} ({len(names)} shards, e.g. {names[0]})" for fp, names in by_fingerprint.items())
        raise StoreError(f"{root} mixes embeddings of {len(by_fingerprint)} models: {parts}; "
                         "re-embed with one model or point at one model's shards")
    store = Store(root, shards)
    if fingerprint is not None and store.fingerprint != fingerprint:
        raise StoreError(f"{root} was embedded by model {store.fingerprint}, not by {fingerprint}")
    return store
