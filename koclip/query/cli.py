"""`python -m koclip.query`: search, classify and rank patches from the shell (see koclip.query).

Each mode prints a table, or JSON with --json; a mistake (no index or model, an image that does
not decode, a bad template or grid) prints one line `koclip.query: error: ...` and exits with
status 2.
"""
from __future__ import annotations

import argparse
import json
import unicodedata
from dataclasses import asdict

from koclip.cli import ArgumentParser, run_cli
from koclip.query import (DEFAULT_TEMPLATE, Hit, QueryError, QueryImageError, classify, rank_patches,
                          search)
from koclip.query import __doc__ as QUERY_DOC


def _read_image(path: str) -> bytes:
    """The bytes of a query image named on the command line (local path or any fsspec URL),
    checked to decode, so that a bad one is reported by the name it was given."""
    from koclip import fs
    from koclip.processing import ImageDecodeError, open_image

    try:
        data = fs.read_bytes(path)
        open_image(data)
    except FileNotFoundError:
        raise QueryImageError("not_found", "no such file", path) from None
    except ImageDecodeError as e:
        raise QueryImageError(e.reason, e.message, path) from None
    return data


def _width(text: str) -> int:
    """Terminal columns: East Asian wide and full-width characters (Hangul) take two."""
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def _left(text: str, width: int) -> str:
    return text + " " * max(0, width - _width(text))


def _hits_table(hits: list[Hit]) -> str:
    if not hits:
        return "(no hits: the index is empty)"
    id_width = max(_width("id"), *(_width(h.id) for h in hits))
    uri_width = max(_width("uri"), *(_width(h.uri) for h in hits))
    lines = [f"{'rank':>4}  {'score':>7}  {_left('id', id_width)}  {_left('uri', uri_width)}  captions"]
    lines += [f"{h.rank:>4}  {h.score:7.4f}  {_left(h.id, id_width)}  {_left(h.uri, uri_width)}  {' / '.join(h.captions)}"
              for h in hits]
    return "\n".join(lines)


def _print_json(data) -> None:
    print(json.dumps(data, ensure_ascii=False, indent=2))


def _run_search(args) -> None:
    names = list(args.texts) + list(args.image)
    if not names:
        raise QueryError("nothing to search for: give a text, --image PATH, --classify or --patches")
    items = list(args.texts) + [_read_image(p) for p in args.image]  # images through fsspec: gs:// too
    results = search(items, k=args.k, index=args.index, model=args.model)
    if args.json:
        _print_json([{"query": name, "hits": [asdict(h) for h in hits]} for name, hits in zip(names, results)])
        return
    for i, (name, hits) in enumerate(zip(names, results)):
        print(("\n" if i else "") + f"query: {name}")
        print(_hits_table(hits))


def _run_classify(args) -> None:
    if not args.labels:
        raise QueryError("--classify needs --labels a,b,c")
    labels = [label.strip() for label in args.labels.split(",")]
    ranked = classify(_read_image(args.classify), labels, template=args.template, model=args.model)
    if args.json:
        _print_json({"image": args.classify, "template": args.template, "probabilities": dict(ranked)})
        return
    width = max(_width("label"), *(_width(label) for label, _ in ranked))
    print(f"{_left('label', width)}  probability")
    for label, prob in ranked:
        print(f"{_left(label, width)}  {prob:11.4f}")


def _run_patches(args) -> None:
    if not args.text:
        raise QueryError("--patches needs --text TEXT")
    result = rank_patches(" ".join(args.text), _read_image(args.patches), grid=args.grid, mode=args.mode,
                          model=args.model)
    if args.out:
        result.save_overlay(args.out)
    if args.json:
        _print_json({"image": args.patches, "text": result.text, "mode": result.mode, "grid": list(result.grid),
                     "cells": result.cells(), "overlay": args.out})
        return
    print(f"{'rank':>4}  {'score':>7}  {'row':>3}  {'col':>3}  box (x0, y0, x1, y1)")
    for cell in result.cells():
        print(f"{cell['rank']:>4}  {cell['score']:7.4f}  {cell['row']:>3}  {cell['col']:>3}  {tuple(cell['box'])}")
    if args.out:
        print(f"wrote {args.out}")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m koclip.query", description=QUERY_DOC,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("texts", nargs="*", metavar="TEXT", help="text queries (each one is searched)")
    parser.add_argument("--image", action="append", default=[], metavar="PATH",
                        help="an image query, local or gs:// (repeatable)")
    parser.add_argument("--index", metavar="DIR", help="index directory (default: the demo index in ~/.cache/koclip)")
    parser.add_argument("--model", metavar="DIR", help="checkpoint directory (default: the demo model in ~/.cache/koclip)")
    parser.add_argument("-k", type=int, default=10, metavar="K", help="hits per query (default: 10)")
    parser.add_argument("--classify", metavar="IMAGE", help="zero-shot classify IMAGE over --labels instead")
    parser.add_argument("--labels", metavar="A,B,C", help="comma-separated labels for --classify")
    parser.add_argument("--template", default=DEFAULT_TEMPLATE, metavar="TEXT",
                        help=f"--classify prompt, '{{}}' is the label (default: {DEFAULT_TEMPLATE!r})")
    parser.add_argument("--patches", metavar="IMAGE", help="rank a grid of IMAGE's cells against --text instead")
    parser.add_argument("--text", nargs="+", help="the text for --patches")
    parser.add_argument("--grid", default="3x3", metavar="RxC", help="--patches grid, ROWSxCOLS (default: 3x3)")
    parser.add_argument("--mode", choices=["crops", "tokens"], default="crops",
                        help="--patches scoring: embed each crop, or pool the patch tokens (default: crops)")
    parser.add_argument("--out", metavar="PNG", help="--patches: write the heat-map overlay PNG here")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    def run():
        if args.classify and args.patches:
            raise QueryError("give one of --classify and --patches, not both")
        if (args.classify or args.patches) and (args.texts or args.image):
            raise QueryError("--classify and --patches take no search queries (TEXT or --image)")
        mode = _run_classify if args.classify else _run_patches if args.patches else _run_search
        mode(args)

    return run_cli("koclip.query", run)
