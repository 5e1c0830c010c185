"""Evaluate a checkpoint on one split of a manifest: text-image retrieval and zero-shot accuracy.

  python -m jobs.evaluate --checkpoint DIR --manifest PATH [--split test] [--out results.json]
  python -m jobs.evaluate --checkpoint DIR --manifest PATH --queries [FILE] --out docs/results/queries.json

Every image of the split and every distinct caption is embedded (images padded to one batch
shape, captions to the config's length buckets). Then, with cosine similarity:
  text -> image   each distinct caption is a query; the images carrying it are relevant.
                  MRR@k and recall@k; `t2i_label_*` the same over the labels only (the
                  distinct first captions: for emoji-ko the emoji's name, not its keywords).
  image -> text   each image is a query; its captions are relevant. Recall@k.
  zero-shot       labels are the distinct first captions of the split's images, prompts
                  template.format(label); an image's correct label is its own first caption
                  (images sharing a first caption share that label). Accuracy@1/5.
Ties count against the model (see koclip.metrics). The random-ranking MRR@10 for the number of
embedded images, and the model's multiple of it, are reported beside.

Images that fail to decode are skipped, counted and listed in the output, never fatal; captions
of skipped images are not queries. Prints a table and writes JSON. `evaluate()` is the same
thing as a function, used by the training job for its per-epoch eval.

The query report (`--queries`, `query_report()`): for a list of everyday queries (default the
committed koclip/data/common_queries_ko.txt), the rank of each query's first correct image over
every image of the split (default all: the whole demo index), top-1/top-5 hit rates and the top
results. An image is correct for a query when the query is one of its captions, so for emoji-ko
the CLDR data decides, not a hand-made answer key.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence

import numpy as np

from jobs.eval_base import EvaluationError, embed_images
from jobs.query_report import (correct_images, default_queries_path, format_query_report,  # noqa: F401 (re-exported)
                               query_report, read_queries)
from koclip import metrics
from koclip.cli import ArgumentParser, run_cli
from koclip.encoders import Encoders, checkpoint_encoders  # noqa: F401  (re-exported)
from koclip.query.prompts import DEFAULT_TEMPLATE, check_template, prompts

log = logging.getLogger("jobs.evaluate")

DEFAULT_KS = (1, 5, 10)
ZERO_SHOT_KS = (1, 5)
RANDOM_BASELINE_K = 10


# ---------------------------------------------------------------- evaluation


def _index(values) -> tuple[list[str], dict[str, int]]:
    """Distinct values in order of first appearance, and value -> position."""
    position: dict[str, int] = {}
    for value in values:
        position.setdefault(value, len(position))
    return list(position), position


def evaluate(checkpoint, records: Sequence, *, batch_size: int = 32, template: str = DEFAULT_TEMPLATE,
             ks: Sequence[int] = DEFAULT_KS, zero_shot_ks: Sequence[int] = ZERO_SHOT_KS,
             dtype: str = "float32", encoders: Encoders | None = None, progress: bool = False) -> dict:
    """Retrieval and zero-shot metrics of a checkpoint on `records`.

    checkpoint: a koclip.checkpoint.Checkpoint or a checkpoint path; its config gives the image
        preprocessing, and unless `encoders` is given, its model embeds images and texts.
    records: objects with .id, .uri (path or URL) and .captions (strings), e.g. from
        koclip.data.manifest.read_manifest(path, split=...).
    encoders: replaces the checkpoint's model (tests, or a caller with its own encode functions).

    Returns {"metrics": {name: float}, "counts": {...}, "skipped": [{id, image, reason, message}],
    "checkpoint", "fingerprint", "template", "ks", "zero_shot_ks", "dtype", "batch_size",
    "compiles", "elapsed_seconds"}. Metric names: t2i_mrr@k, t2i_recall@k, i2t_recall@k,
    t2i_label_mrr@k, t2i_label_recall@k, zeroshot_acc@k, t2i_mrr@10_random, t2i_mrr@10_vs_random.
    """
    from koclip.checkpoint import Checkpoint, load_checkpoint
    from koclip.processing import ImagePreprocessor

    started = time.perf_counter()
    check_template(template)
    ks = sorted({int(k) for k in ks})
    zero_shot_ks = sorted({int(k) for k in zero_shot_ks})
    if batch_size < 1 or not ks or not zero_shot_ks or min(ks + zero_shot_ks) < 1:
        raise EvaluationError("batch_size and every k must be positive integers")
    records = list(records)
    if not records:
        raise EvaluationError("there are no records to evaluate")
    uncaptioned = [record.id for record in records if not record.captions]
    if uncaptioned:
        raise EvaluationError(f"records without captions: {', '.join(map(str, uncaptioned[:5]))}")
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
    if encoders is None:
        encoders = checkpoint_encoders(ckpt, batch_size, dtype)

    # Images first: captions and labels come only from the images that decoded.
    preprocess = ImagePreprocessor.from_config(ckpt.config)
    image_emb, kept, skipped = embed_images(records, preprocess, encoders.images, batch_size, progress)
    if not kept:
        raise EvaluationError(f"none of the {len(records)} images could be decoded "
                              f"(first failure: {skipped[0]['reason']}: {skipped[0]['message']})")
    images = [records[i] for i in kept]

    captions, caption_index = _index(c for record in images for c in record.captions)
    image_captions = [{caption_index[c] for c in record.captions} for record in images]
    caption_images: list[set[int]] = [set() for _ in captions]
    for image, owned in enumerate(image_captions):
        for c in owned:
            caption_images[c].add(image)
    labels, label_index = _index(record.captions[0] for record in images)
    image_labels = np.array([label_index[record.captions[0]] for record in images])

    log.info("embedding %d captions and %d label prompts", len(captions), len(labels))
    text_emb = np.asarray(encoders.texts(captions), dtype=np.float32)
    prompt_emb = np.asarray(encoders.texts(prompts(template, labels)), dtype=np.float32)

    t2i = metrics.first_relevant_ranks(metrics.DotProductSimilarity(text_emb, image_emb), caption_images)
    t2i_label = t2i[[caption_index[label] for label in labels]]  # the labels are captions too
    i2t = metrics.first_relevant_ranks(metrics.DotProductSimilarity(image_emb, text_emb), image_captions)
    zero_shot = metrics.first_relevant_ranks(metrics.DotProductSimilarity(image_emb, prompt_emb), image_labels)

    results: dict[str, float] = {}
    for k in ks:
        results[f"t2i_mrr@{k}"] = metrics.mrr_from_ranks(t2i, k)
    for k in ks:
        results[f"t2i_recall@{k}"] = metrics.recall_from_ranks(t2i, k)
    for k in ks:
        results[f"t2i_label_mrr@{k}"] = metrics.mrr_from_ranks(t2i_label, k)
    for k in ks:
        results[f"t2i_label_recall@{k}"] = metrics.recall_from_ranks(t2i_label, k)
    for k in ks:
        results[f"i2t_recall@{k}"] = metrics.recall_from_ranks(i2t, k)
    for k in zero_shot_ks:
        results[f"zeroshot_acc@{k}"] = metrics.recall_from_ranks(zero_shot, k)
    # The baseline assumes one relevant image per caption (exact when captions are unique).
    random = metrics.random_mrr_at_k(len(images), RANDOM_BASELINE_K)
    results[f"t2i_mrr@{RANDOM_BASELINE_K}_random"] = random
    results[f"t2i_mrr@{RANDOM_BASELINE_K}_vs_random"] = metrics.mrr_from_ranks(t2i, RANDOM_BASELINE_K) / random

    listed_captions = sum(len(record.captions) for record in records)
    kept_captions = sum(len(record.captions) for record in images)
    counts = {
        "images_listed": len(records),
        "images_embedded": len(images),
        "images_skipped": len(skipped),
        "captions_listed": listed_captions,
        "captions_of_skipped_images": listed_captions - kept_captions,
        "caption_queries": len(captions),  # distinct captions of the embedded images
        "labels": len(labels),
    }
    return {
        "metrics": results,
        "counts": counts,
        "skipped": skipped,
        "checkpoint": ckpt.path,
        "fingerprint": ckpt.fingerprint,
        "template": template,
        "ks": ks,
        "zero_shot_ks": zero_shot_ks,
        "dtype": dtype,
        "batch_size": batch_size,
        "compiles": encoders.compiles(),
        "elapsed_seconds": round(time.perf_counter() - started, 3),
    }


# ---------------------------------------------------------------- report


def _metric_label(name: str) -> str:
    kind, _, k = name.partition("@")
    if k.endswith("_vs_random"):
        return f"text→image MRR@{k[:-len('_vs_random')]} / random"
    if k.endswith("_random"):
        return f"random-ranking MRR@{k[:-len('_random')]}"
    return {
        "t2i_mrr": "text→image MRR", "t2i_recall": "text→image recall",
        "t2i_label_mrr": "text→image MRR, label queries", "t2i_label_recall": "text→image recall, label queries",
        "i2t_recall": "image→text recall", "zeroshot_acc": "zero-shot accuracy",
    }.get(kind, kind) + f"@{k}"


def format_table(result: dict) -> str:
    """A two-column table (metric, value), then the counts and any skipped images."""
    rows = [(_metric_label(name), f"{value:.2f}x" if name.endswith("_vs_random") else f"{value:.4f}")
            for name, value in result["metrics"].items()]
    width = max(len(label) for label, _ in rows + [("metric", "")])
    lines = [f"{'metric':<{width}}  {'value':>8}", f"{'-' * width}  {'-' * 8}"]
    lines += [f"{label:<{width}}  {value:>8}" for label, value in rows]
    c = result["counts"]
    lines.append("")
    lines.append(f"images: {c['images_listed']} listed = {c['images_embedded']} embedded + {c['images_skipped']} "
                 f"skipped; {c['caption_queries']} caption queries, {c['labels']} zero-shot labels")
    for s in result["skipped"]:
        lines.append(f"  skipped {s['id']} ({s['reason']}): {s['image']}")
    return "\n".join(lines)


def _write_json(path: str, data: dict) -> None:
    from koclip import fs

    fs.write_bytes(path, (json.dumps(data, ensure_ascii=False, indent=2) + "\n").encode("utf-8"))


def build_parser() -> argparse.ArgumentParser:
    from koclip.data.manifest import SPLITS

    parser = ArgumentParser(prog="python -m jobs.evaluate", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory (local or gs://)")
    parser.add_argument("--manifest", required=True, help="manifest JSONL (local or gs://)")
    parser.add_argument("--split", default=None, choices=[*SPLITS, "all"],
                        help="split to evaluate; 'all' for every record (default: test; with --queries: all)")
    parser.add_argument("--queries", nargs="?", const=default_queries_path(), default=None, metavar="FILE",
                        help="write the query report instead: each query's rank of its first correct image "
                             "over the split's images (default list: koclip/data/common_queries_ko.txt); "
                             "JSON to --out, Markdown beside it (.md)")
    parser.add_argument("--batch-size", type=int, default=32, help="fixed encoder batch size (default: 32)")
    parser.add_argument("--template", default=DEFAULT_TEMPLATE,
                        help=f"zero-shot prompt, '{{}}' is the label (default: {DEFAULT_TEMPLATE!r})")
    parser.add_argument("--k", type=int, nargs="+", default=list(DEFAULT_KS), metavar="K",
                        help="cut-offs for MRR and recall (default: 1 5 10)")
    parser.add_argument("--out", default="results.json", help="JSON output path (default: results.json)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="compute dtype")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    from koclip.checkpoint import load_checkpoint, require_dir
    from koclip.data.manifest import read_manifest

    def run():
        require_dir(args.checkpoint)
        split_name = args.split or ("all" if args.queries else "test")
        queries = read_queries(args.queries) if args.queries else None
        records = read_manifest(args.manifest, split=None if split_name == "all" else split_name)
        if not records:
            raise EvaluationError(f"no records in split {split_name!r} of {args.manifest}")
        ckpt = load_checkpoint(args.checkpoint)
        if queries is not None:
            report = query_report(ckpt, records, queries, batch_size=args.batch_size, dtype=args.dtype,
                                  progress=not args.no_progress and sys.stderr.isatty())
            report = {"manifest": args.manifest, "split": split_name, "query_list": args.queries, **report}
            text = format_query_report(report)
            print(text, end="")
            _write_json(args.out, report)
            markdown = (args.out[:-len(".json")] if args.out.endswith(".json") else args.out) + ".md"
            from koclip import fs

            fs.write_bytes(markdown, text.encode("utf-8"))
            print(f"wrote {args.out} and {markdown}")
            return
        result = evaluate(ckpt, records, batch_size=args.batch_size, template=args.template, ks=args.k,
                          dtype=args.dtype, progress=not args.no_progress and sys.stderr.isatty())
        result = {"manifest": args.manifest, "split": split_name, **result}
        print(format_table(result))
        _write_json(args.out, result)
        print(f"wrote {args.out}")

    return run_cli("jobs.evaluate", run)


if __name__ == "__main__":
    sys.exit(main())
