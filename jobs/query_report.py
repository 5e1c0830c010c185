"""The query report of jobs.evaluate (`--queries`): for a list of everyday queries (default the
committed koclip/data/common_queries_ko.txt), the rank of each query's first correct image over
every image of the split, top-1/top-5 hit rates and the top results. An image is correct for a
query when the query is one of its captions, so for emoji-ko the CLDR data decides, not a
hand-made answer key.
"""
from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence

import numpy as np

from jobs.eval_base import EvaluationError, embed_images
from koclip import metrics
from koclip.encoders import Encoders, checkpoint_encoders


def default_queries_path() -> str:
    """The committed list of common Korean queries (koclip/data/common_queries_ko.txt)."""
    import os

    import koclip.data

    return os.path.join(os.path.dirname(koclip.data.__file__), "common_queries_ko.txt")


def read_queries(path: str) -> list[tuple[str, str]]:
    """(category, query) per line of a query list: `# category: NAME` starts a category, other
    `#` lines are comments, blank lines are skipped; a repeated query is an error."""
    from koclip import fs

    text = fs.read_bytes(path).decode("utf-8")  # a missing file: NotFoundError, one line
    category, out, seen = "", [], set()
    for line in text.splitlines():
        line = " ".join(line.split())
        if line.startswith("# category:"):
            category = line.partition(":")[2].strip()
        elif line and not line.startswith("#"):
            if line in seen:
                raise EvaluationError(f"query {line!r} is listed twice in {path}")
            seen.add(line)
            out.append((category, line))
    if not out:
        raise EvaluationError(f"query list {path} has no queries")
    return out


def correct_images(query: str, records: Sequence) -> list[int]:
    """Positions of the records for which `query` is correct: it is one of their captions.

    For emoji-ko a record's captions are its Korean name, CLDR label and CLDR keywords
    (koclip.data.emoji_cldr), so what counts as correct comes from the CLDR data alone.
    """
    query = " ".join(query.split())
    return [i for i, record in enumerate(records) if query in record.captions]


def _check_answerable(queries, records) -> list[list[int]]:
    correct = [correct_images(query, records) for _, query in queries]
    unanswerable = [query for (_, query), found in zip(queries, correct) if not found]
    if unanswerable:
        raise EvaluationError(f"{len(unanswerable)} queries have no correct image among the {len(records)} "
                              f"images: {', '.join(unanswerable[:5])}")
    return correct


def query_report(checkpoint, records: Sequence, queries: Sequence[tuple[str, str]], *, batch_size: int = 32,
                 top: int = 5, dtype: str = "float32", encoders: Encoders | None = None,
                 progress: bool = False) -> dict:
    """For each (category, query): the rank of its first correct image among all `records`, and
    the top results; top-1/top-5 hit rates and MRR@10 over the queries.

    Ranks are over every decodable image with exact cosine similarity (what a flat index
    answers), ties pessimistic as in koclip.metrics. A query with no correct image among the
    records is an EvaluationError: the list must be answerable from the data.
    """
    from koclip.checkpoint import Checkpoint, load_checkpoint
    from koclip.processing import ImagePreprocessor

    started = time.perf_counter()
    records = list(records)
    if not records:
        raise EvaluationError("there are no records to rank")
    _check_answerable(queries, records)  # before the images are embedded; again after, over the decoded ones
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
    if encoders is None:
        encoders = checkpoint_encoders(ckpt, batch_size, dtype)
    image_emb, kept, skipped = embed_images(records, ImagePreprocessor.from_config(ckpt.config), encoders.images,
                                             batch_size, progress)
    if not kept:
        raise EvaluationError(f"none of the {len(records)} images could be decoded")
    images = [records[i] for i in kept]
    correct = _check_answerable(queries, images)
    query_emb = np.asarray(encoders.texts([query for _, query in queries]), dtype=np.float32)
    sim = metrics.DotProductSimilarity(query_emb, image_emb)
    ranks = metrics.first_relevant_ranks(sim, correct)
    top = min(top, len(images))
    rows = []
    for q, ((category, query), found) in enumerate(zip(queries, correct)):
        scores = sim[q:q + 1][0]
        best = np.argsort(-scores, kind="stable")[:top]
        found_set = set(found)
        rows.append({
            "query": query, "category": category, "rank": int(ranks[q]), "correct_images": len(found),
            "correct_by_split": dict(sorted(Counter(str(images[i].split) for i in found).items())),
            "top": [{"id": images[i].id, "label": images[i].captions[0], "emoji": images[i].extra.get("emoji"),
                     "score": round(float(scores[i]), 4), "correct": int(i) in found_set} for i in best],
        })
    summary = {
        "queries": len(queries),
        "images": len(images),
        "top1_hit_rate": metrics.recall_from_ranks(ranks, 1),
        "top5_hit_rate": metrics.recall_from_ranks(ranks, 5),
        "mrr@10": metrics.mrr_from_ranks(ranks, 10),
        "median_rank": float(np.median(ranks)),
    }
    categories = {}
    for category in dict.fromkeys(c for c, _ in queries):
        mine = np.array([rank for (c, _), rank in zip(queries, ranks) if c == category])
        categories[category] = {"queries": len(mine), "top1_hit_rate": metrics.recall_from_ranks(mine, 1),
                                "top5_hit_rate": metrics.recall_from_ranks(mine, 5)}
    return {
        "summary": summary, "categories": categories, "queries": rows, "skipped": skipped,
        "rule": "an image is correct for a query when the query is one of its captions "
                "(emoji-ko: Korean name, CLDR label, CLDR keywords)",
        "checkpoint": ckpt.path, "fingerprint": ckpt.fingerprint, "dtype": dtype,
        "elapsed_seconds": round(time.perf_counter() - started, 3),
    }


def format_query_report(report: dict) -> str:
    """Markdown: the summary, per category, then one row per query with its top results."""
    s = report["summary"]
    lines = [f"{s['queries']} queries over {s['images']} images: top-1 hit rate **{s['top1_hit_rate']:.1%}**, "
             f"top-5 hit rate **{s['top5_hit_rate']:.1%}**, MRR@10 {s['mrr@10']:.3f}, median rank "
             f"{s['median_rank']:g}.", "",
             "| category | queries | top-1 | top-5 |", "|---|---|---|---|"]
    for name, c in report["categories"].items():
        lines.append(f"| {name or '-'} | {c['queries']} | {c['top1_hit_rate']:.0%} | {c['top5_hit_rate']:.0%} |")
    lines += ["", "Correct: " + report["rule"] + ". ✓ marks a correct result.", "",
              "| query | rank of first correct | correct images | top results |", "|---|---|---|---|"]
    for row in report["queries"]:
        shown = ", ".join(f"{t['emoji'] or ''} {t['label']}{' ✓' if t['correct'] else ''}".strip() for t in row["top"])
        lines.append(f"| {row['query']} | {row['rank']} | {row['correct_images']} | {shown} |")
    return "\n".join(lines) + "\n"
