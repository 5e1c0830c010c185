"""`python -m pipelines.index`: build a FAISS index over an embedding store and publish it.

    python -m pipelines.index                                   # the emoji-ko demo embeddings
    python -m pipelines.index --embeddings gs://b/emb --out gs://b/index --max-memory 16GB
    python -m pipelines.index --embeddings E --out I --column caption_embeddings
    python -m pipelines.index --embeddings E --out I --distributed --runner=DataflowRunner ...

The single-process build is koclip.index.build_index; --distributed runs the ivfpq build's
per-shard work as Beam pipelines (pipelines.index_beam), locally on the FnApiRunner unless a
--runner is given. Any argument this parser does not know is a Beam pipeline option, and is only
accepted with --distributed. Prints what was published; --json prints meta.json instead.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

from koclip import fs
from koclip.cli import ArgumentParser, run_cli
from koclip.errors import UsageError

DESCRIPTION = """Index an embedding store (Parquet shards from `python -m pipelines.embed`) with FAISS.

The index keeps --target-recall (recall@10 against exact search, measured on corpus rows held out
of the index while tuning). Exact flat search up to 50k rows; above that every index type that
fits --max-memory is tried in order of expected speed (HNSW, OPQ+IVF-PQ with re-ranking,
IVF-SQ8, IVF-Flat, exact flat), each tuned to the target, and the first that reaches it is
published. When none does (exact search does not fit the budget, or --kind forces one type), the
build stops with the best recall found, unless --allow-below-target publishes that best one.
The result is a new version under --out, published by rewriting OUT/CURRENT last; the last
--keep versions are kept.

With no arguments: the emoji-ko demo embeddings (~/.cache/koclip/embeddings/emoji-ko) into
~/.cache/koclip/index/emoji-ko."""

EPILOG = """With --distributed, other arguments are Beam pipeline options, e.g.
  --runner=DataflowRunner --project=P --region=us-central1 --temp_location=gs://B/tmp
  --setup_file=./setup.py
Without --runner the pipelines run here on Beam's FnApiRunner (multi-threaded)."""


def build_parser() -> argparse.ArgumentParser:
    from koclip.index import DEFAULT_QUERIES, DEFAULT_TARGET_RECALL, KINDS

    parser = ArgumentParser(prog="python -m pipelines.index", description=DESCRIPTION, epilog=EPILOG,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--embeddings", metavar="DIR", help="the store: a folder of shard-*.parquet, local or "
                                                            "gs:// (default: the emoji-ko demo embeddings)")
    parser.add_argument("--out", metavar="ROOT", help="the index root, local or gs:// (default: the demo index)")
    parser.add_argument("--column", choices=["image_embedding", "caption_embeddings"], default="image_embedding",
                        help="which embeddings to index: one row per image, or one per caption")
    parser.add_argument("--kind", choices=["auto", *KINDS], default="auto",
                        help="force an index type (default: chosen by size and --max-memory)")
    parser.add_argument("--max-memory", default="4GB", metavar="SIZE",
                        help="memory budget of the served index, e.g. 512MB, 4GB, 1.5TB (default: 4GB)")
    parser.add_argument("--target-recall", type=float, default=DEFAULT_TARGET_RECALL, metavar="R",
                        help=f"recall@10 the search parameter is tuned to reach (default: {DEFAULT_TARGET_RECALL})")
    parser.add_argument("--allow-below-target", action="store_true",
                        help="when no index within the budget reaches --target-recall, publish the best one "
                             "(default: stop with an error naming the best recall)")
    parser.add_argument("--queries", type=int, default=DEFAULT_QUERIES, metavar="N",
                        help=f"corpus rows used as tuning queries (default: {DEFAULT_QUERIES})")
    parser.add_argument("--keep", type=int, default=3, metavar="K", help="versions to keep (default: 3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the training and query samples")
    parser.add_argument("--trained", metavar="PATH",
                        help="a trained.faiss from an earlier ivfpq version: reuse its quantizer, skip training")
    parser.add_argument("--distributed", action="store_true",
                        help="ivfpq built by Beam pipelines, one element per shard (see the epilog)")
    parser.add_argument("--json", action="store_true", help="print the published meta.json")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    return parser


def _latency(candidate: dict) -> str:
    ms = candidate.get("latency_ms")  # absent from builds before the latency was measured
    return f", {ms:.3f} ms a query" if ms is not None else ""


def summary(result) -> str:
    from koclip.index import format_bytes

    m = result.meta
    params = ", ".join(f"{k}={v}" for k, v in m["search_params"].items()) or "none (exact)"
    reached = "reached" if m["target_reached"] else "NOT reached"
    return "\n".join([
        f"published version {result.version} in {result.root}",
        f"  index      {m['kind']} ({m['factory']}; {m['choice']})",
        f"  rows       {m['count']} of {m['column']}, dim {m['dim']}, model {m['fingerprint']}",
        f"  search     {params}",
        f"  recall@10  {m['recall_at_10']:.4f} on {m['recall_queries']} queries "
        f"(target {m['target_recall']}: {reached})",
        *[f"  {'tried' if i == 0 else '':<10} {c['kind']:<8} {c['factory']:<32} recall@10 {c['recall_at_10']:.4f}"
          f" at {', '.join(f'{k}={v}' for k, v in c['search_params'].items()) or 'exact'}"
          f"{_latency(c)} ({c['build_seconds']:.1f} s{', published' if c['kind'] == m['kind'] else ''})"
          for i, c in enumerate(m.get("candidates", []))],
        f"  memory     {format_bytes(m['index_bytes'])} on disk (estimated {format_bytes(m['estimated_bytes'])}, "
        f"budget {format_bytes(m['max_memory'])})",
        f"  built in   {m['build_seconds']:.1f} s" + (f"; deleted {len(result.deleted)} old versions"
                                                      if result.deleted else ""),
    ])


def run(args, beam_args: list[str]):
    from koclip.data import demo_embeddings_dir, demo_index_dir
    from koclip.index import build_index, parse_memory

    embeddings = args.embeddings or demo_embeddings_dir()
    out = args.out or demo_index_dir()
    if beam_args and not args.distributed:
        raise UsageError(f"unknown option {beam_args[0]!r} (Beam options need --distributed; see --help)")
    if not fs.exists(embeddings):
        raise UsageError(f"embedding folder not found: {embeddings}; make it with `python -m pipelines.embed`")
    if not 0 < args.target_recall <= 1:
        raise UsageError(f"--target-recall must be in (0, 1], got {args.target_recall}")
    if args.queries < 1:
        raise UsageError(f"--queries must be at least 1, got {args.queries}")
    common = dict(column=args.column, max_memory=parse_memory(args.max_memory), target_recall=args.target_recall,
                  queries=args.queries, keep=args.keep, seed=args.seed, trained=args.trained,
                  allow_below_target=args.allow_below_target)
    if not args.distributed:
        return build_index(embeddings, out, kind=args.kind, **common)
    if args.kind not in ("auto", "ivfpq"):
        raise UsageError(f"--distributed builds ivfpq indexes, not {args.kind}")
    from pipelines.index_beam import build_distributed

    return build_distributed(embeddings, out, pipeline_args=beam_args, **common)


def main(argv=None) -> int:
    args, beam_args = build_parser().parse_known_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")

    def report():
        result = run(args, beam_args)
        print(json.dumps(result.meta, indent=2, ensure_ascii=False) if args.json else summary(result))

    return run_cli("pipelines.index", report)


if __name__ == "__main__":
    sys.exit(main())
