"""Export an embedding store in the layout the field's tools read.

  python -m pipelines.export --embeddings E --out O --format laion [--rows-per-file N]

`laion` is clip-retrieval's inference output (LAION-5B's release layout), which autofaiss's
`build_index` and embedding-reader read:

  O/img_emb/img_emb_0.npy         float32 [n, D], the image embeddings
  O/text_emb/text_emb_0.npy       float32 [n, D], each row's first caption embedding (zeros when the
                                  item has no caption; metadata `caption` is then null)
  O/metadata/metadata_0.parquet   one row per embedding row, in the same order: image_path (our uri),
                                  caption, id, sha256, width, height, split, and the store's kept
                                  columns (url, ...)

Row i of img_emb_N, text_emb_N and metadata_N is one item. The files are numbered from 0 with the
same width, so that the three folders sort alike. The store is read shard by shard (the embedding
columns as numpy) and each part is written whole through koclip.fs, local or gs://.
"""
from __future__ import annotations

import io
import json
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from koclip import fs, store
from koclip.cli import ArgumentParser, run_cli
from koclip.errors import UsageError

FORMATS = ("laion",)
_BASE_COLUMNS = ("id", "uri", "sha256", "width", "height", "captions", "split", "image_embedding",
                 "caption_embeddings", "fingerprint")


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array, dtype=np.float32))
    return buffer.getvalue()


def _first_caption_embeddings(table: pa.Table, dim: int) -> np.ndarray:
    column = table.column("caption_embeddings").combine_chunks()
    counts = column.value_lengths().fill_null(0).to_numpy(zero_copy_only=False)
    flat = store.vectors_to_numpy(column.flatten(), dim) if counts.sum() else np.zeros((0, dim), np.float32)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    out = np.zeros((len(counts), dim), np.float32)
    has = counts > 0
    out[has] = flat[starts[has]]
    return out


def _metadata(table: pa.Table, extra: list[str]) -> pa.Table:
    captions = table.column("captions").to_pylist()
    columns = {
        "image_path": table.column("uri"),
        "caption": pa.array([c[0] if c else None for c in captions], pa.string()),
        "id": table.column("id"),
        "sha256": table.column("sha256"),
        "width": table.column("width"),
        "height": table.column("height"),
        "split": table.column("split"),
        **{name: table.column(name) for name in extra},
    }
    return pa.table(columns)


def export_laion(embeddings: str, out: str, rows_per_file: int = 1_000_000) -> dict:
    """Write `out` in the laion layout (module docstring); {"rows", "files", "dim"}."""
    if rows_per_file < 1:
        raise UsageError(f"--rows-per-file must be at least 1, got {rows_per_file}")
    source = store.open_store(embeddings)
    dim = source.dim
    names = source.dataset().schema.names
    extra = [n for n in names if n not in _BASE_COLUMNS]
    parts: list[pa.Table] = []
    buffered, written, rows = 0, 0, 0
    total = source.rows
    width = len(str(max(0, (total - 1) // rows_per_file)))

    def flush(tables: list[pa.Table]) -> None:
        nonlocal written
        part = pa.concat_tables(tables)
        name = f"{written:0{width}d}"
        fs.write_many({
            fs.join(out, "img_emb", f"img_emb_{name}.npy"): _npy(store.vectors_to_numpy(part.column("image_embedding"), dim)),
            fs.join(out, "text_emb", f"text_emb_{name}.npy"): _npy(_first_caption_embeddings(part, dim)),
            fs.join(out, "metadata", f"metadata_{name}.parquet"): _parquet(_metadata(part, extra)),
        })
        written += 1

    for table in source.iter_tables(batch_rows=65536):
        while table.num_rows:
            take = min(table.num_rows, rows_per_file - buffered)
            parts.append(table.slice(0, take))
            table = table.slice(take)
            buffered += take
            rows += take
            if buffered == rows_per_file:
                flush(parts)
                parts, buffered = [], 0
    if parts:
        flush(parts)
    return {"rows": rows, "files": written, "dim": dim, "fingerprint": source.fingerprint}


def _parquet(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m pipelines.export",
                            description="Export an embedding store (pipelines.embed's shards) as the layout "
                                        "clip-retrieval and autofaiss read.")
    parser.add_argument("--embeddings", required=True, help="the store folder (shard-*.parquet), local or gs://")
    parser.add_argument("--out", required=True, help="the folder to write, local or gs://")
    parser.add_argument("--format", choices=FORMATS, default="laion",
                        help="laion: img_emb/, text_emb/, metadata/ with rows aligned")
    parser.add_argument("--rows-per-file", type=int, default=1_000_000, metavar="N",
                        help="rows per img_emb_N.npy / metadata_N.parquet file")
    return parser


def main(argv: list[str] | None = None) -> int:
    def report():
        args = build_parser().parse_args(argv)
        result = export_laion(args.embeddings, args.out, args.rows_per_file)
        print(json.dumps({"out": args.out, **result}))

    return run_cli("pipelines.export", report)


if __name__ == "__main__":
    sys.exit(main())
