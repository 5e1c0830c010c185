"""Scheduled incremental reindexing: embed only what changed, publish a new index version.

  python -m jobs.reindex --source gs://b/photos/ --work gs://b/koclip-work --index gs://b/index \\
      --model gs://b/ckpt

Each run:
 1. lists the source (a folder/glob of images with sidecar captions, or a manifest) and takes a
    signature per item: its uri, size and etag (object stores) or mtime (local files), the
    sidecar's too, and the captions; `--content-hash` uses the sha256 of the bytes instead;
 2. diffs it against the previous run's state (`WORK/state.parquet`): new, changed, deleted,
    unchanged. With no difference it stops there: nothing embedded, nothing published;
 3. embeds the new and changed items with the embedding pipeline into `WORK/runs/<run>/`
    (the run name is a digest of the diff, so a rerun after a crash resumes that embedding);
 4. updates the live embedding store `WORK/live/`: rows of deleted and changed items are
    removed, the run's shards are added; the live store always holds exactly the current items;
 5. extends the published index with the new rows and removes the old ones, or rebuilds it when
    the index type should change (koclip.index decides), and publishes a new version
    atomically (the `CURRENT` pointer is written last), keeping the last `--keep` versions;
 6. saves the new state. A crash before this point leaves the previous version served, and the
    next run redoes the remaining steps.
Items that were dead-lettered are remembered with their signature and retried only when they change.
The model's fingerprint is part of the state (WORK/model.json): a run with another model (or
with --reembed) embeds every item again into a run of its own, builds a fresh index from it and
publishes it (the old index is served until then), and only then replaces the live store.
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import posixpath
import sys
import time
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from jobs.reindex_state import (LIVE_DIR, Diff, diff, load_state, model_of_state, save_model, save_state,
                                 signatures)
from koclip import fs, store
from koclip.cli import ArgumentParser, run_cli
from koclip.data.manifest import Item
from koclip.errors import KoclipError, UsageError
from pipelines.listing import input_root, list_items
from pipelines.transforms.write import DEAD_LETTER_DIR, read_dead_letters

log = logging.getLogger("jobs.reindex")

RUNS_DIR = "runs"


class ReindexError(KoclipError):
    """A run that cannot start (bad flags, missing model): reported as one line."""


# ---------------------------------------------------------------- embedding and the live store


def _write_run_manifest(path: str, items: list[Item]) -> None:
    lines = []
    for item in items:
        row = {"id": item.id, "image": item.uri, "captions": list(item.captions)}
        if item.split:
            row["split"] = item.split
        if item.caption_uri:
            row["caption_uri"] = item.caption_uri
        lines.append(json.dumps(row, ensure_ascii=False) + "\n")
    fs.write_bytes(path, "".join(lines).encode())


def _remove_from_live(live: str, ids: set[str]) -> int:
    """Drop the rows of `ids` from the live store, rewriting (or deleting) only the shards that hold them."""
    import pyarrow.compute as pc

    removed = 0
    if not ids or not fs.exists(live):
        return 0
    wanted = pa.array(sorted(ids), pa.string())
    for path in store.list_shards(live):
        with fs.open(path) as f:  # the id column only: most shards hold none of `ids`
            count = pc.sum(pc.is_in(pq.read_table(f, columns=["id"]).column("id"), value_set=wanted)).as_py() or 0
        if not count:
            continue
        removed += count
        table = pq.read_table(io.BytesIO(fs.read_bytes(path)))
        kept = table.filter(pc.invert(pc.is_in(table.column("id"), value_set=wanted)))
        if kept.num_rows:
            store.write_shard(path, kept)
        else:
            fs.remove(path)
    return removed


def _add_to_live(run_out: str, live: str, run_id: str) -> int:
    added = 0
    for path in store.list_shards(run_out):
        name = posixpath.basename(path).replace("shard-", f"shard-{run_id}-", 1)
        data = fs.read_bytes(path)
        fs.write_bytes(fs.join(live, name), data)
        added += pq.read_metadata(io.BytesIO(data)).num_rows
    return added


# ---------------------------------------------------------------- one run


@dataclass
class ReindexResult:
    new: int
    changed: int
    deleted: int
    unchanged: int
    embedded: int = 0
    dead_letters: int = 0
    published: str | None = None  # the index version published by this run, if any
    live_rows: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        head = (f"{self.new} new, {self.changed} changed, {self.deleted} deleted, {self.unchanged} unchanged")
        if self.published is None:
            return f"{head}: no change, nothing embedded, nothing published ({self.seconds:.1f} s)"
        return (f"{head}: embedded {self.embedded} ({self.dead_letters} dead-lettered), index version "
                f"{self.published} published with {self.live_rows} rows ({self.seconds:.1f} s)")


def _embed_changes(args, work: str, run_id: str, items: list[Item]) -> tuple[str, set[str]]:
    from pipelines import embed

    run_dir = fs.join(work, RUNS_DIR, run_id)
    manifest = fs.join(run_dir, "input.jsonl")
    _write_run_manifest(manifest, items)
    output = fs.join(run_dir, "embeddings")
    embed.run(["--input", manifest, "--output", output, "--model", args.model, "--batch-size", str(args.batch_size),
               "--unit-size", str(args.unit_size), "--caption-root", input_root(args.source), *args.beam_args])
    return output, {d["id"] for d in read_dead_letters(output)}


def index_is_published(root: str) -> bool:
    from koclip.index import current_version

    return current_version(root) is not None


def _build_settings(args, meta: dict) -> dict:
    """kind, max_memory and target_recall for a build from scratch: the flags, else the published
    index's (`meta`), else auto, 4GB and 0.95."""
    from koclip import index as kindex

    return {"kind": args.kind or meta.get("kind_requested", "auto"),
            "max_memory": args.max_memory or meta.get("max_memory", kindex.DEFAULT_MAX_MEMORY),
            "target_recall": args.target_recall or meta.get("target_recall", kindex.DEFAULT_TARGET_RECALL)}


def _published_meta(root: str) -> dict:
    """The published version's meta.json (without loading the index), or {} before the first publish."""
    from koclip import index as kindex

    if not index_is_published(root):
        return {}
    return json.loads(fs.read_bytes(fs.join(kindex.resolve(root), "meta.json")))


def _state_rows(items: list[Item], sigs: dict[str, str], dead: set[str]) -> dict[str, dict]:
    return {i.id: {"id": i.id, "signature": sigs[i.id], "status": "dead" if i.id in dead else "embedded"}
            for i in items}


def publish_index(args, live: str, run_out: str | None, removed_ids: set[str], before_publish=None):
    """A new index version over the live store: extended from the current one (koclip.index
    decides when it must be rebuilt instead), or built from scratch the first time."""
    from koclip import index as kindex

    options = dict(kind=args.kind, max_memory=args.max_memory, target_recall=args.target_recall, keep=args.keep,
                   before_publish=before_publish)
    if not index_is_published(args.index):
        built = kindex.build_index(live, args.index, column=args.column, **{**options, **_build_settings(args, {})})
    else:
        add = run_out if run_out is not None and store.list_shards(run_out) else None
        built = kindex.extend_index(args.index, add=add, remove=sorted(removed_ids), full_store=live, **options)
    return (built.version if built.published else None), built.meta["count"]


def reindex(args, before_publish=None) -> ReindexResult:
    """One scheduled run (module docstring). `before_publish(version_folder)` runs after the new index
    version is written and before CURRENT names it (an exception there leaves the old one served)."""
    started = time.perf_counter()
    work = args.work
    from koclip.checkpoint import load_checkpoint

    items = list_items(args.source)
    sigs = signatures(items, content_hash=args.content_hash)
    fingerprint = load_checkpoint(args.model).fingerprint
    recorded = model_of_state(work)
    reembed = args.reembed or (recorded is not None and recorded != fingerprint)
    if reembed:
        log.info("re-embedding all %d items with model %s (%s)", len(items), fingerprint,
                 "--reembed" if args.reembed else f"the live store holds model {recorded}")
        return _reembed_all(args, items, sigs, fingerprint, started)
    previous = load_state(work)
    changes = diff(items, sigs, previous)
    result = ReindexResult(len(changes.new), len(changes.changed), len(changes.deleted), changes.unchanged)
    live = fs.join(work, LIVE_DIR)
    if changes.empty and index_is_published(args.index):
        result.seconds = time.perf_counter() - started
        return result

    run_id = changes.digest(sigs, fingerprint)
    dead: set[str] = set()
    run_out = None
    to_embed = changes.new + changes.changed
    if to_embed:
        run_out, dead = _embed_changes(args, work, run_id, to_embed)
    removed_ids = set(changes.deleted) | {i.id for i in changes.changed}
    _remove_from_live(live, removed_ids)
    if to_embed:
        _add_to_live(run_out, live, run_id)
    result.embedded = len(to_embed) - len(dead)
    result.dead_letters = len(dead)

    if not store.list_shards(live):
        raise ReindexError(f"nothing to index: none of the {len(items)} items of {args.source} could be embedded "
                           f"(see {fs.join(work, RUNS_DIR, run_id, 'embeddings', DEAD_LETTER_DIR)})")
    result.published, result.live_rows = publish_index(args, live, run_out, removed_ids, before_publish)

    state = {k: v for k, v in previous.items() if k not in removed_ids}
    state.update(_state_rows(to_embed, sigs, dead))
    save_state(work, state)
    save_model(work, fingerprint, args.model)
    if run_out is not None:
        _drop_run_shards(run_out)
    result.seconds = time.perf_counter() - started
    return result


def _reembed_all(args, items: list[Item], sigs: dict[str, str], fingerprint: str, started: float) -> ReindexResult:
    """A new model (or --reembed): every item is embedded again into a run of its own, a fresh index
    is built from that run alone and published (the old index is served until then), and only
    then does the live store take the run's shards. Each step is redone by a rerun after a crash:
    the state still names the old model until the very end."""
    from koclip import index as kindex

    work = args.work
    everything = Diff(new=list(items))
    run_id = "full-" + everything.digest(sigs, fingerprint)
    run_out, dead = _embed_changes(args, work, run_id, items)
    if not store.list_shards(run_out):
        raise ReindexError(f"nothing to index: none of the {len(items)} items of {args.source} could be embedded "
                           f"(see {fs.join(run_out, DEAD_LETTER_DIR)})")
    built = kindex.build_index(run_out, args.index, column=args.column, keep=args.keep,
                               **_build_settings(args, _published_meta(args.index)))
    live = fs.join(work, LIVE_DIR)
    fs.remove(store.list_shards(live))
    _add_to_live(run_out, live, run_id)
    save_state(work, _state_rows(items, sigs, dead))
    save_model(work, fingerprint, args.model)
    _drop_run_shards(run_out)
    return ReindexResult(len(items), 0, 0, 0, len(items) - len(dead), len(dead), built.version, built.meta["count"],
                         time.perf_counter() - started)


def _drop_run_shards(run_out: str) -> None:
    """The run's shards now live in the live store. Its dead letters stay for inspection; its done
    markers go too, so that the same diff, should it ever recur, is embedded again."""
    fs.remove(store.list_shards(run_out))
    for name in ("_done", "_run.json"):
        fs.remove_tree(fs.join(run_out, name))


# ---------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    head, _, rest = __doc__.partition("\n\n")
    p = ArgumentParser(prog="python -m jobs.reindex", description=head, epilog=rest,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", required=True, help="folder/glob of images (x.jpg + x.txt) or a manifest; local or gs://")
    p.add_argument("--work", required=True, help="state folder: state.parquet, live/ embeddings, runs/ (local or gs://)")
    p.add_argument("--index", required=True, help="index root to publish versions into (local or gs://)")
    p.add_argument("--model", default=None, help="checkpoint folder (default: the demo model)")
    p.add_argument("--column", default="image_embedding", choices=store.EMBEDDING_COLUMNS)
    p.add_argument("--keep", type=int, default=3, help="index versions to keep (default 3)")
    # None: the published index's own setting (the first build: auto, 4GB, 0.95)
    p.add_argument("--kind", default=None, choices=["auto", "flat", "hnsw", "ivfpq"],
                   help="index type (default: the published index's; auto for the first build)")
    p.add_argument("--max-memory", default=None,
                   help="memory budget of the index (default: the published index's; 4GB for the first build)")
    p.add_argument("--target-recall", type=float, default=None,
                   help="recall@10 to tune for (default: the published index's; 0.95 for the first build)")
    p.add_argument("--content-hash", action="store_true",
                   help="compare files by the sha256 of their bytes instead of size + etag/mtime")
    p.add_argument("--reembed", action="store_true",
                   help="embed every item again and rebuild the index (a model change does this by itself)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--unit-size", type=int, default=1000)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    args, beam_args = build_parser().parse_known_args(argv)
    args.beam_args = beam_args  # passed on to the embedding pipeline (e.g. --runner=DataflowRunner ...)
    if args.model is None:
        from koclip.data import demo_model_dir

        args.model = demo_model_dir()
    if args.keep < 1:
        raise UsageError(f"--keep must be at least 1, got {args.keep}")
    return args


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("apache_beam", "absl", "jax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return run_cli("jobs.reindex", lambda: print(reindex(parse_args(argv)).summary()))


if __name__ == "__main__":
    sys.exit(main())
