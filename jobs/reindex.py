"""Scheduled incremental reindexing: embed only what changed, publish a new index version.

  python -m jobs.reindex --source gs://b/photos/ --work gs://b/koclip-work --index gs://b/index \\
      --model gs://b/ckpt

A run holds two locks (koclip.lock: WORK/LOCK and INDEX/LOCK, lease objects that hold across
machines); a second run started meanwhile exits with one line naming the holder. Then:
 1. it lists the source (a folder/glob of images with sidecar captions, or a manifest) and takes
    a signature per item: its uri, size and etag (object stores) or mtime (local files), the
    sidecar's too, and the captions; `--content-hash` uses the sha256 of the bytes instead;
 2. diffs it against the state of the last run (`WORK/state.parquet`): new, changed, deleted,
    unchanged, and dead letters to retry. With no difference it stops there;
 3. embeds the new, changed and retried items with the embedding pipeline into
    `WORK/runs/<run>/` (the run name is a digest of the diff, so a rerun after a crash resumes
    that embedding);
 4. commits the run: the state it leads to and what it changes go to the journal
    `WORK/pending/` (run.json written last). From here the run is applied, and a run that finds
    a journal left by a crash applies it again before anything else, each step being idempotent:
 5. the live embedding store `WORK/live/` drops every id the run touches and takes its shards;
 6. the published index is extended (or rebuilt, when koclip.index says its type should change)
    and a new version published atomically (CURRENT written last), keeping `--keep` versions;
    the journal records the version before CURRENT names it, so it is never published twice;
 7. the new state is saved and the journal removed.
So from a crash at any point, whether or not the source changed before the rerun, the live
store, the index and the state come back to the current source, each id exactly once; until the
publish the previous version is served.

Dead letters are remembered with their signature. A transient one (a read timeout, a 5xx, an
inference failure) is tried again on later runs, up to `--max-attempts` runs in a row; a permanent
one (it does not decode, is too large) only when the item changes, or with `--retry-dead-letters`.
The model's fingerprint is part of the state (WORK/model.json): a run with another model (or
with --reembed) embeds every item again, replaces the live store and builds a fresh index (the
old index is served until it is published).
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

from jobs.reindex_state import (LIVE_DIR, Diff, Pending, clear_pending, diff, load_pending, load_state,
                                 mark_published, model_of_state, save_model, save_pending, save_state, signatures,
                                 state_rows)
from koclip import fs, store
from koclip.cli import ArgumentParser, run_cli
from koclip.data.manifest import Item
from koclip.errors import KoclipError, UsageError
from koclip.index import KINDS
from pipelines.listing import input_root, list_items
from pipelines.transforms.write import DEAD_LETTER_DIR, read_dead_letters

log = logging.getLogger("jobs.reindex")

RUNS_DIR = "runs"
LISTING_DEAD_LETTERS = "listing_dead_letters.jsonl"


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
    retried: int = 0  # dead letters tried again (transient, or --retry-dead-letters)
    rejected_rows: int = 0  # manifest rows that are no item (WORK/listing_dead_letters.jsonl)
    embedded: int = 0
    dead_letters: int = 0
    published: str | None = None  # the index version published by this run, if any
    live_rows: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        head = f"{self.new} new, {self.changed} changed, {self.deleted} deleted, {self.unchanged} unchanged"
        if self.retried:
            head += f", {self.retried} dead letters retried"
        if self.rejected_rows:
            head += f", {self.rejected_rows} manifest rows rejected (see {LISTING_DEAD_LETTERS})"
        if self.published is None:
            return f"{head}: no change, nothing embedded, nothing published ({self.seconds:.1f} s)"
        return (f"{head}: embedded {self.embedded} ({self.dead_letters} dead-lettered), index version "
                f"{self.published} published with {self.live_rows} rows ({self.seconds:.1f} s)")


def _embed_changes(args, work: str, run_id: str, items: list[Item]) -> tuple[str, dict[str, dict]]:
    from pipelines import embed

    run_dir = fs.join(work, RUNS_DIR, run_id)
    manifest = fs.join(run_dir, "input.jsonl")
    _write_run_manifest(manifest, items)
    output = fs.join(run_dir, "embeddings")
    embed.run(["--input", manifest, "--output", output, "--model", args.model, "--batch-size", str(args.batch_size),
               "--unit-size", str(args.unit_size), "--caption-root", input_root(args.source), *args.beam_args])
    wanted = {i.id for i in items}
    return output, {d["id"]: d for d in read_dead_letters(output) if d.get("id") in wanted}


def index_is_published(root: str) -> bool:
    from koclip.index import current_version

    return current_version(root) is not None


def _build_settings(args, meta: dict) -> dict:
    """kind, max_memory and target_recall for a build from scratch: the flags, else the published
    index's (`meta`), else auto, 4GB and 0.95."""
    from koclip import index as kindex

    return {"kind": args.kind or meta.get("kind_requested", "auto"),
            "max_memory": args.max_memory or meta.get("max_memory", kindex.DEFAULT_MAX_MEMORY),
            "target_recall": args.target_recall or meta.get("target_recall", kindex.DEFAULT_TARGET_RECALL),
            "allow_below_target": bool(args.allow_below_target if args.allow_below_target is not None
                                       else meta.get("allow_below_target", False))}


def _published_meta(root: str) -> dict:
    """The published version's meta.json (without loading the index), or {} before the first publish."""
    from koclip import index as kindex

    if not index_is_published(root):
        return {}
    return json.loads(fs.read_bytes(fs.join(kindex.resolve(root), "meta.json")))


def publish_index(args, live: str, pending: Pending, before_publish) -> tuple[str | None, int]:
    """A new index version over the live store: built from scratch the first time and after a
    re-embed, otherwise extended from the current one (koclip.index decides when it must be
    rebuilt instead)."""
    from koclip import index as kindex

    options = dict(kind=args.kind, max_memory=args.max_memory, target_recall=args.target_recall, keep=args.keep,
                   allow_below_target=args.allow_below_target, before_publish=before_publish)
    if pending.full or not index_is_published(args.index):
        settings = _build_settings(args, _published_meta(args.index))
        built = kindex.build_index(live, args.index, column=args.column, **{**options, **settings})
    else:
        add = pending.run_out if pending.run_out is not None and store.list_shards(pending.run_out) else None
        built = kindex.extend_index(args.index, add=add, remove=pending.remove, full_store=live, **options)
    return (built.version if built.published else None), built.meta["count"]


STEPS = ("embedded", "committed", "live_updated", "index_written", "published", "state_saved")


def reindex(args, on_step=None) -> ReindexResult:
    """One scheduled run (module docstring), holding the work dir's and the index root's locks.
    `on_step(name)` is called after each step of STEPS (the fault-injection tests kill the process
    there); an exception from it at "index_written" (the new version written, CURRENT not yet
    moved) leaves the old version served."""
    from koclip import lock

    with lock.hold(args.work, what="jobs.reindex") as work_lock, lock.hold(args.index, what="jobs.reindex"):
        def step(name: str) -> None:
            work_lock.check()  # each step is followed by a write to WORK: stop if the lease was lost
            if on_step is not None:
                on_step(name)

        return _reindex(args, step)


def _reindex(args, step) -> ReindexResult:
    started = time.perf_counter()
    work = args.work
    from koclip.checkpoint import load_checkpoint

    interrupted = load_pending(work)
    finished = None
    if interrupted is not None:
        log.warning("finishing run %s, which was interrupted after it was committed", interrupted.run)
        finished = _apply(args, interrupted, step)
    rejects: list = []
    items = list_items(args.source, rejects=rejects)
    _write_rejects(work, rejects)
    sigs = signatures(items, content_hash=args.content_hash)
    fingerprint = load_checkpoint(args.model).fingerprint
    recorded = model_of_state(work)
    full = args.reembed or (recorded is not None and recorded != fingerprint)
    if full:
        log.info("re-embedding all %d items with model %s (%s)", len(items), fingerprint,
                 "--reembed" if args.reembed else f"the live store holds model {recorded}")
    previous = {} if full else load_state(work)
    changes = Diff(new=list(items)) if full else diff(items, sigs, previous, args.max_attempts,
                                                      args.retry_dead_letters)
    result = ReindexResult(len(changes.new), len(changes.changed), len(changes.deleted), changes.unchanged,
                           retried=len(changes.retry), rejected_rows=len(rejects))
    if changes.empty and index_is_published(args.index):
        if finished is not None:
            result.published, result.live_rows = finished
        result.seconds = time.perf_counter() - started
        return result

    attempts = {i.id: previous[i.id]["attempts"] for i in changes.retry}
    run_id = ("full-" if full else "") + changes.digest(sigs, fingerprint, attempts)
    to_embed = changes.to_embed
    run_out, dead = _embed_changes(args, work, run_id, to_embed) if to_embed else (None, {})
    step("embedded")
    deleted = set(changes.deleted)
    state = {k: v for k, v in previous.items() if k not in deleted}
    state.update(state_rows(to_embed, sigs, dead, previous))
    if not any(row["status"] == "embedded" for row in state.values()):
        raise ReindexError(f"nothing to index: none of the {len(items)} items of {args.source} could be embedded "
                           f"(see {fs.join(work, RUNS_DIR, run_id, 'embeddings', DEAD_LETTER_DIR)})")
    touched = [] if full else sorted(deleted | {i.id for i in to_embed})  # a full run replaces the live store
    pending = Pending(run_id, run_out, full, touched, fingerprint, args.model, state)
    save_pending(work, pending)
    step("committed")
    result.published, result.live_rows = _apply(args, pending, step)
    result.embedded = len(to_embed) - len(dead)
    result.dead_letters = len(dead)
    result.seconds = time.perf_counter() - started
    return result


def _apply(args, pending: Pending, step) -> tuple[str | None, int]:
    """Apply a committed run: live store, index, state, in that order; each step is idempotent, so a
    run interrupted anywhere is finished by the next one. Returns the version published and its rows."""
    from koclip import index as kindex

    work = args.work
    live = fs.join(work, LIVE_DIR)
    if pending.full:
        fs.remove([p for p in store.list_shards(live) if not posixpath.basename(p).startswith(f"shard-{pending.run}-")])
    else:
        _remove_from_live(live, set(pending.remove))
    if pending.run_out is not None:
        _add_to_live(pending.run_out, live, pending.run)
    step("live_updated")

    if pending.published is not None and kindex.current_version(args.index) == pending.published:
        published, rows = pending.published, _published_meta(args.index)["count"]
    else:
        def before_publish(folder: str) -> None:
            mark_published(work, pending, posixpath.basename(folder.rstrip("/")))
            step("index_written")

        published, rows = publish_index(args, live, pending, before_publish)
    step("published")
    save_state(work, pending.state)
    save_model(work, pending.fingerprint, pending.model)
    step("state_saved")
    clear_pending(work)
    _drop_run_shards(work, pending.run_out)
    return published, rows


def _write_rejects(work: str, rejects: list) -> None:
    """The source manifest's rows that are no item (koclip.data.manifest), as dead letters of this
    run's listing: WORK/listing_dead_letters.jsonl, rewritten every run."""
    path = fs.join(work, LISTING_DEAD_LETTERS)
    if rejects:
        fs.write_bytes(path, "".join(json.dumps(r.to_json(), ensure_ascii=False) + "\n" for r in rejects).encode())
    else:
        fs.remove(path)


def _drop_run_shards(work: str, run_out: str | None) -> None:
    """The run's shards are in the live store now; so are those of any earlier run left uncleaned by
    a crash, or they belonged to a run abandoned when the source changed during it. A run's
    _run.json goes last: one listing finds every run still to clean. Done markers go first, so that
    a run never looks finished without its shards. Dead letters and input lists stay."""
    outs = {p.rsplit("/", 1)[0] for p in fs.glob(fs.join(work, RUNS_DIR, "*", "embeddings", "_run.json"))}
    for out in sorted(outs | ({run_out} if run_out else set())):
        fs.remove_tree(fs.join(out, "_done"))
        fs.remove(store.list_shards(out))
        fs.remove_tree(fs.join(out, "_units"))
        fs.remove(fs.join(out, "_run.json"))


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
    p.add_argument("--kind", default=None, choices=["auto", *KINDS],
                   help="index type (default: the published index's; auto for the first build)")
    p.add_argument("--max-memory", default=None,
                   help="memory budget of the index (default: the published index's; 4GB for the first build)")
    p.add_argument("--target-recall", type=float, default=None,
                   help="recall@10 to tune for (default: the published index's; 0.95 for the first build)")
    p.add_argument("--allow-below-target", action="store_const", const=True, default=None,
                   help="publish the best index found when none within the budget reaches the target "
                        "(default: the published index's setting; else refuse)")
    p.add_argument("--content-hash", action="store_true",
                   help="compare files by the sha256 of their bytes instead of size + etag/mtime")
    p.add_argument("--reembed", action="store_true",
                   help="embed every item again and rebuild the index (a model change does this by itself)")
    p.add_argument("--max-attempts", type=int, default=3,
                   help="runs in a row a transient dead letter (a timeout, an inference failure) is tried "
                        "on an unchanged item (default 3)")
    p.add_argument("--retry-dead-letters", action="store_true",
                   help="try every dead letter again this run, permanent ones too")
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
