"""`python -m jobs.extract`: the items of an index that match queries, as a manifest or Parquet.

    python -m jobs.extract --index I --query "소파 위에 고양이" --min-similarity 0.3 --out cats.jsonl
    python -m jobs.extract --index I --image cat.jpg --k 500 --out similar.parquet
    python -m jobs.extract --index I --queries queries.txt --min-similarity 0.3 --k 1000 --out O

Every item whose cosine similarity to a query is at least --min-similarity (a range search:
koclip.query.search(min_score=...), exact on a flat index; --k then caps each query's hits), or
the top --k of each query when no --min-similarity is given (default k 10). Queries: --query
TEXT, --image PATH (local or gs://), or --queries FILE, one query a line: a text file (.txt, one
text per line) or JSONL ({"text": ...} or {"image": PATH} per line; a relative image path is
relative to the file). Queries are embedded by --model (default: the demo model), which must be
the index's.

An item matched by several queries is written once, with its best score and the numbers (0, 1,
...) of the queries that matched it; a caption index's rows ("item#k") count for their item.
Rows are in descending score order. --out:
  *.parquet   id, uri, captions, score, queries (list<int32>);
  otherwise   a JSONL manifest (koclip.data.manifest: "id", "image", "captions", plus "score" and
              "queries", which readers keep as extra fields): input for `python -m pipelines.embed
              --input OUT` or jobs.train.
A one-line summary says how many items each query matched.
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import sys
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from koclip import fs
from koclip.cli import ArgumentParser, run_cli
from koclip.errors import UsageError

log = logging.getLogger("jobs.extract")

PARQUET_SCHEMA = pa.schema([("id", pa.string()), ("uri", pa.string()), ("captions", pa.list_(pa.string())),
                            ("score", pa.float32()), ("queries", pa.list_(pa.int32()))])


@dataclass
class Extracted:
    id: str
    uri: str
    captions: list[str]
    score: float
    queries: list[int] = field(default_factory=list)


def read_queries(path: str) -> list:
    """The queries of a --queries file: str for a text, bytes for an image (module docstring)."""
    if not fs.exists(path):
        raise UsageError(f"queries file not found: {path}")
    text = fs.read_bytes(path).decode("utf-8")
    if not path.lower().endswith((".jsonl", ".json")):
        return [line.strip() for line in text.splitlines() if line.strip()]
    from koclip.data.manifest import resolve_uri

    queries = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise UsageError(f"{path}:{number} is not JSON") from None
        if isinstance(row, dict) and isinstance(row.get("text"), str) and row["text"].strip():
            queries.append(row["text"].strip())
        elif isinstance(row, dict) and isinstance(row.get("image"), str):
            queries.append(read_image(resolve_uri(row["image"], path)))
        else:
            raise UsageError(f'{path}:{number}: a query line is {{"text": "..."}} or {{"image": "path"}}')
    return queries


def read_image(path: str) -> bytes:
    if not fs.exists(path):
        raise UsageError(f"image not found: {path}")
    return fs.read_bytes(path)


def extract(queries: list, index, model=None, min_similarity: float | None = None,
            k: int | None = None) -> tuple[list[Extracted], list[int]]:
    """(items, hits per query): every item matching any query (module docstring), best first."""
    from koclip import query as kquery

    if min_similarity is None and k is None:
        k = 10
    results = kquery.search(list(queries), k=k, index=index, model=model, min_score=min_similarity)
    by_item: dict[str, Extracted] = {}
    counts = []
    for number, hits in enumerate(results):
        matched = set()
        for hit in hits:
            item = by_item.get(hit.item_id)
            if item is None:
                item = by_item[hit.item_id] = Extracted(hit.item_id, hit.uri, list(hit.captions), hit.score)
            elif hit.score > item.score:
                item.score = hit.score
            if hit.item_id not in matched:  # a caption index: several captions of one item
                item.queries.append(number)
                matched.add(hit.item_id)
        counts.append(len(matched))
    items = sorted(by_item.values(), key=lambda e: (-e.score, e.id))
    return items, counts


def caption_lists(items: list[Extracted], index) -> None:
    """A caption index's hits carry the one caption they matched; give each item all of its own."""
    rows = index.rows
    captions: dict[str, list[str]] = {}
    for item_id, texts in zip(rows.column("item_id").to_pylist(), rows.column("captions").to_pylist()):
        captions.setdefault(item_id, []).extend(texts or [])
    for item in items:
        item.captions = captions.get(item.id, item.captions)


def write_output(items: list[Extracted], out: str) -> None:
    if out.lower().endswith(".parquet"):
        table = pa.table([[i.id for i in items], [i.uri for i in items], [i.captions for i in items],
                          [i.score for i in items], [i.queries for i in items]], schema=PARQUET_SCHEMA)
        buffer = io.BytesIO()
        pq.write_table(table, buffer, compression="zstd")
        fs.write_bytes(out, buffer.getvalue())
        return
    lines = [json.dumps({"id": i.id, "image": i.uri, "captions": i.captions, "score": round(i.score, 6),
                         "queries": i.queries}, ensure_ascii=False) + "\n" for i in items]
    fs.write_bytes(out, "".join(lines).encode())


def build_parser() -> argparse.ArgumentParser:
    head, _, rest = __doc__.partition("\n\n")
    p = ArgumentParser(prog="python -m jobs.extract", description=head, epilog=rest,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--index", required=True, help="an index root (or version folder), local or gs://")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--query", metavar="TEXT", help="one text query")
    source.add_argument("--image", metavar="PATH", help="one image query (local or gs://)")
    source.add_argument("--queries", metavar="FILE", help="many queries: .txt (a text a line) or .jsonl")
    p.add_argument("--out", required=True, help="the output: *.parquet, else a JSONL manifest")
    p.add_argument("--min-similarity", type=float, metavar="S",
                   help="every item with cosine similarity >= S to a query (a range search)")
    p.add_argument("--k", type=int, metavar="K",
                   help="at most K items per query (the top K when there is no --min-similarity; default 10 then)")
    p.add_argument("--model", help="the checkpoint that embeds the queries (default: the demo model)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")

    def body():
        from koclip.index import load_index

        if args.k is not None and args.k < 1:
            raise UsageError(f"--k must be at least 1, got {args.k}")
        if args.min_similarity is not None and not -1 <= args.min_similarity <= 1:
            raise UsageError(f"--min-similarity is a cosine similarity in [-1, 1], got {args.min_similarity}")
        if args.queries:
            queries = read_queries(args.queries)
            if not queries:
                raise UsageError(f"{args.queries} holds no queries")
        else:
            queries = [args.query] if args.query is not None else [read_image(args.image)]
        index = load_index(args.index)
        items, counts = extract(queries, index, args.model, args.min_similarity, args.k)
        if index.meta["column"] == "caption_embeddings":
            caption_lists(items, index)
        write_output(items, args.out)
        rule = (f"score >= {args.min_similarity}" if args.min_similarity is not None else "top")
        rule += f", at most {args.k} per query" if args.k else (" 10 per query" if args.min_similarity is None else "")
        print(f"{len(queries)} queries matched {len(items)} items ({rule}; per query: "
              f"{', '.join(map(str, counts[:10]))}{', ...' if len(counts) > 10 else ''}) -> {args.out}")

    return run_cli("jobs.extract", body)


if __name__ == "__main__":
    sys.exit(main())
