"""The embedding pipeline: images and captions in, Parquet embedding shards out.

  python -m pipelines.embed                       # emoji-ko sample + demo model, locally
  python -m pipelines.embed --input gs://b/manifest.jsonl --output gs://b/emb --model gs://b/ckpt \\
      --runner=DataflowRunner ...                 # see the README for Dataflow

The driver lists the input and cuts it into work units (pipelines.listing), skips the units a
previous run finished, writes each remaining unit's items to `_units/unit-N.jsonl` in the output
folder, and runs one Beam pipeline over the rest. Manifest rows that are not items (not JSON, no
id, a repeated id, ...) are written by the driver to `_dead_letters/listing.jsonl` (rewritten by
every run) and the run goes on; `--strict` refuses the run at the first such row instead. The
pipeline itself carries only unit references, so the job graph stays the same size for ten items
or ten million (Dataflow refuses job graphs over 10 MB):

  unit refs (reshuffled) -> items (read from _units/) -> DecodeItem -> RunInference(KoclipModelHandler) -> WriteUnits
                                  (decoded items or dead letters, which the model passes through)

Decoding, inference and writing are one chain of ParDos, fused by every runner (no shuffle or
flatten after the units are spread), so each
unit is written as soon as its last item is embedded, and a killed job loses at most the
units in flight. Every listed row ends as a row of a shard or a dead letter; the summary counts
both (rows = items + listing dead letters = embedded + dead letters). When some units are tars
without a sidecar, whose ids only their workers saw, the driver checks the written units for an id
repeated across them once all are done (pipelines.repeats).
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

import apache_beam as beam
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.ml.inference.base import RunInference
from apache_beam.options.pipeline_options import DirectOptions, StandardOptions, TestOptions

from koclip import fs
from koclip.cli import run_cli
from koclip.errors import KoclipError
from pipelines.inputs import InputOptions, open_input, read_shard_unit
from pipelines.listing import ListingDigest, Unit, input_root, read_unit_file, unit_file_bytes
from pipelines.options import EmbedOptions, parse
from pipelines.repeats import check_repeated_ids
from pipelines.transforms.decode import NAMESPACE, DecodeItem, UnitRef
from pipelines.transforms.model_handler import KoclipModelHandler
from pipelines.transforms.write import DEAD_LETTER_DIR, DONE_DIR, RUN_FILE, WriteUnits, write_listing_dead_letters

log = logging.getLogger("pipelines.embed")
UNITS_DIR = "_units"
_UNIT_FILE_BATCH_ITEMS = 20_000  # unit files are uploaded in batches of about this many items


class PlanError(KoclipError):
    """The run cannot start (missing model, an output folder holding another run): one line."""


@dataclass
class Plan:
    source: str
    output: str
    model: str
    fingerprint: str
    config: dict
    dim: int
    units: list[UnitRef]  # every unit of the listing
    pending: list[UnitRef]  # the units this run embeds
    run_info: dict = field(default_factory=dict)


@dataclass
class EmbedResult:
    """What a run did (`this_run`) and what the output folder now holds (`totals`)."""

    output: str
    units: int
    units_skipped: int
    units_embedded: int
    totals: dict
    this_run: dict
    seconds: float
    job: object = None  # the Dataflow job a --dry_run built (not submitted)

    def summary(self) -> str:
        t, r = self.totals, self.this_run
        if self.job is not None:
            return f"dry run: the job for {len(self.job.proto_pipeline.components.transforms)} transforms was built, not submitted."
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(t["dead_letter_reasons"].items())) or "none"
        listed = (f"{t['rows']} rows" if t["listing_dead_letters"] else f"{t['items']} items")
        rejected = (f", {t['listing_dead_letters']} of them rows the listing rejected" if t["listing_dead_letters"]
                    else "")
        latency = (f", batch latency mean {r['batch_latency_ms_mean']:.0f} ms / max {r['batch_latency_ms_max']} ms"
                   if r.get("batches") else "")
        return (f"{t['embedded']} of {listed} embedded, {t['dead_letters']} dead-lettered ({reasons}){rejected}, "
                f"{t['captions']} captions embedded ({t['blank_captions']} blank ones dropped), in {self.units} units. "
                f"This run: {self.units_embedded} units embedded, {self.units_skipped} skipped as already done, "
                f"{r.get('items_read', 0)} items read, {r.get('batches', 0)} batches, "
                f"{r.get('recompiles', 0)} recompiles after warm-up{latency}, {self.seconds:.1f} s.")


def _defaults(opts: EmbedOptions) -> tuple[str, str, str]:
    from koclip.data import demo_embeddings_dir, demo_model_dir

    source = opts.input
    if source is None:
        from koclip.data.emoji_ko import ensure_emoji_ko

        source = ensure_emoji_ko()
    return source, opts.output or demo_embeddings_dir(), opts.model or demo_model_dir()


def _load_model_info(model: str, is_default: bool) -> tuple[str, dict, int]:
    from koclip.checkpoint import load_checkpoint

    if not fs.exists(fs.join(model, "config.json")):
        hint = ("train the demo model first: python -m jobs.train" if is_default
                else "give a checkpoint folder (config.json + flax_model.msgpack)")
        raise PlanError(f"no model at {model}: {hint}")
    ckpt = load_checkpoint(model)
    return ckpt.fingerprint, ckpt.config.to_dict(), ckpt.config.projection_dim


def _clear(output: str) -> None:
    fs.remove(fs.glob(fs.join(output, "shard-*.parquet")) + [fs.join(output, RUN_FILE)])
    _remove_folders(output, DONE_DIR, DEAD_LETTER_DIR)  # not _units/: this run has just written its unit files


def _remove_folders(output: str, *names: str) -> None:
    for name in names:
        fs.remove_tree(fs.join(output, name))


def _remove_partial_files(output: str) -> None:
    """Temporary files of a killed run (koclip.fs writes locally to NAME.tmp-PID, then renames)."""
    for pattern in ("*.tmp-*", f"{DONE_DIR}/*.tmp-*", f"{DEAD_LETTER_DIR}/*.tmp-*"):
        fs.remove(fs.glob(fs.join(output, pattern)))


def _done_markers(output: str) -> dict[int, dict]:
    paths = fs.glob(fs.join(output, DONE_DIR, "unit-*.json"))
    markers = [json.loads(data) for data in fs.cat_many(paths).values()]
    return {m["unit"]: m for m in markers}


def _previous_run(output: str) -> dict | None:
    path = fs.join(output, RUN_FILE)
    return json.loads(fs.read_bytes(path)) if fs.exists(path) else None


def _refuse_if_changed(output: str, previous: dict | None, run_info: dict, keys: tuple[str, ...]) -> None:
    changed = [k for k in keys if previous is not None and previous.get(k) != run_info[k]]
    if changed:
        raise PlanError(f"{output} holds a run with a different {', '.join(changed)} "
                        f"({', '.join(f'{k}: {previous.get(k)} -> {run_info[k]}' for k in changed)}); "
                        "pass --overwrite to replace it, or choose another --output")


def plan(opts: EmbedOptions) -> Plan:
    """List the input into units, streaming: the driver holds unit references, never all items.
    Each unit still to embed is written to _units/ as it is cut; the rows the listing rejected go
    to _dead_letters/listing.jsonl once it has been read whole (and the run is not refused)."""
    source, output, model = _defaults(opts)
    fingerprint, config, dim = _load_model_info(model, is_default=opts.model is None)
    run_info = {"input": source, "unit_size": opts.unit_size, "fingerprint": fingerprint,
                "embedding_dtype": opts.embedding_dtype, "model": model}
    if opts.input_format or opts.keep_columns:
        run_info.update(input_format=opts.input_format, keep_columns=opts.keep_columns)
    _remove_partial_files(output)
    previous = None if opts.overwrite else _previous_run(output)
    _refuse_if_changed(output, previous, run_info, ("unit_size", "fingerprint", "embedding_dtype"))
    done = {} if opts.overwrite else _done_markers(output)
    listing = open_input(source, opts.input_format, input_options(opts), refuse_bad_rows=opts.strict)
    digest, units, pending = _cut_units(listing, output, opts.unit_size, done)
    if not listing.complete:
        log.warning("%s repeats ids: listing it again, each later row of an id a dead letter", source)
        digest, units, pending = _cut_units(listing, output, opts.unit_size, done)
    items = sum(u.size or 0 for u in units)  # a tar without a sidecar is counted by its worker
    rejects = listing.rejects
    run_info.update(listing=digest.hexdigest(), items=items, units=len(units), rows=items + len(rejects),
                    kept_columns=list(listing.kept_columns),
                    listing_dead_letters=len(rejects),
                    listing_dead_letter_reasons=dict(Counter(r.reason for r in rejects)))
    # A different listing is only known once it is read: the unit files just written then hold
    # the new listing's units, which is harmless (the previous run's rerun rewrites its own).
    _refuse_if_changed(output, previous, run_info, ("listing",))
    if opts.overwrite:
        _clear(output)  # only once the listing has been read whole: a bad listing keeps the old results
    write_listing_dead_letters(output, rejects)
    fs.write_bytes(fs.join(output, RUN_FILE), json.dumps(run_info, ensure_ascii=False, indent=1).encode())
    return Plan(source, output, model, fingerprint, config, dim, units, pending, run_info)


def input_options(opts: EmbedOptions) -> InputOptions:
    from pipelines.inputs import parse_keep_columns

    return InputOptions(opts.id_column, opts.caption_field, opts.image_column, parse_keep_columns(opts.keep_columns))


def _cut_units(listing, output: str, unit_size: int, done: dict[int, dict]):
    """One pass over the listing (a pipelines.inputs `Input`): (its digest, every unit's ref, the
    refs still to embed); the pending units' files are written as they are cut, in batches."""
    digest, units, pending, to_write, buffered = ListingDigest(), [], [], [], 0
    for unit in listing.units(unit_size):
        if unit.shard is not None:
            digest.update_key(unit.key)
        else:
            digest.update(unit.items)
        ref = UnitRef(unit.index, unit.key, unit.size)
        units.append(ref)
        if done.get(unit.index, {}).get("key") != unit.key:
            pending.append(ref)
            to_write.append(unit)
            buffered += max(len(unit.items), 1)
            if buffered >= _UNIT_FILE_BATCH_ITEMS:
                _write_unit_files(output, to_write)
                to_write, buffered = [], 0
    _write_unit_files(output, to_write)
    return digest, units, pending


def _unit_file(output: str, index: int) -> str:
    return fs.join(output, UNITS_DIR, f"unit-{index:05d}.jsonl")


def _write_unit_files(output: str, units: list[Unit]) -> None:
    fs.write_many({_unit_file(output, u.index): unit_file_bytes(u) for u in units})


def _unit_items(element: tuple[UnitRef, str], read_options: dict):
    """A unit's elements: (ref, item) for items read whole from their uri, (ref, item, Payload) for
    a unit of a shard format (its tar or Parquet rows streamed here, pipelines.inputs)."""
    ref, path = element
    unit = read_unit_file(path, ref.index, ref.key)
    if unit.shard is not None:
        return read_shard_unit(unit, ref, read_options)
    return ((ref, item) for item in unit.items)


def build(pipeline: beam.Pipeline, p: Plan, opts: EmbedOptions):
    from koclip.config import HybridCLIPConfig
    from koclip.processing import ImagePreprocessor

    config = HybridCLIPConfig.from_dict(p.config)
    handler = KoclipModelHandler(p.model, batch_size=opts.batch_size, dtype=opts.dtype,
                                 compilation_cache=opts.compilation_cache or None)
    return (
        pipeline
        # Create reshuffles its elements: the units spread over the workers.
        | "Units" >> beam.Create([(ref, _unit_file(p.output, ref.index)) for ref in p.pending])
        | "Items" >> beam.FlatMap(_unit_items, {"max_bytes": opts.max_bytes, "caption_field": opts.caption_field,
                                                "id_column": opts.id_column,
                                                "keep_columns": input_options(opts).keep_columns})
        | "Decode" >> beam.ParDo(DecodeItem(ImagePreprocessor.from_config(config, opts.max_pixels),
                                            caption_root=opts.caption_root or input_root(p.source),
                                            max_bytes=opts.max_bytes))
        | "Embed" >> RunInference(handler)
        | "Write" >> beam.ParDo(WriteUnits(p.output, p.fingerprint, p.config, p.dim, opts.embedding_dtype,
                                           tuple(p.run_info["kept_columns"]))))


def _local_runner(options):
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner

    direct = options.view_as(DirectOptions)
    if direct.direct_running_mode == "in_memory":
        direct.direct_running_mode = "multi_threading"
    return FnApiRunner()


def _metrics(result) -> dict:
    found = {}
    metrics = result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))
    for counter in metrics["counters"]:
        found[counter.key.metric.name] = found.get(counter.key.metric.name, 0) + counter.committed
    for dist in metrics["distributions"]:
        if not (dist.committed and dist.committed.count):
            continue
        if dist.key.metric.name == "batch_latency_ms":
            found["batch_latency_ms_mean"] = dist.committed.mean
            found["batch_latency_ms_max"] = dist.committed.max
        elif dist.key.metric.name == "batch_start_unix_ms":
            found["first_batch_unix_ms"] = dist.committed.min
    return found


def _totals(markers: list[dict], listing_reasons: dict[str, int]) -> dict:
    """What the output holds: `rows` listed = `items` + `listing_dead_letters` = `embedded` +
    `dead_letters` (which count the listing's)."""
    reasons = Counter(listing_reasons)
    for m in markers:
        reasons.update(m["dead_letter_reasons"])
    items, rejected = sum(m["items"] for m in markers), sum(listing_reasons.values())
    return {"rows": items + rejected, "items": items, "embedded": sum(m["embedded"] for m in markers),
            "dead_letters": sum(m["dead_letters"] for m in markers) + rejected, "listing_dead_letters": rejected,
            "captions": sum(m["captions"] for m in markers),
            "blank_captions": sum(m.get("blank_captions", 0) for m in markers), "dead_letter_reasons": dict(reasons)}


def run(argv: list[str] | None = None) -> EmbedResult:
    """Run the pipeline to the end; a KoclipError (UsageError, ListingError, PlanError, ...) for bad input."""
    started = time.perf_counter()
    opts, options = parse(list(sys.argv[1:] if argv is None else argv))
    p = plan(opts)
    log.info("%d units of up to %d items; %d already done, %d to embed", len(p.units), opts.unit_size,
             len(p.units) - len(p.pending), len(p.pending))
    this_run: dict = {}
    if p.pending:
        runner = None if options.view_as(StandardOptions).runner else _local_runner(options)
        if runner is not None and opts.compilation_cache is None:
            from koclip.data import cache_dir

            opts.compilation_cache = os.path.join(cache_dir(), "xla")
        pipeline = beam.Pipeline(runner=runner, options=options)
        build(pipeline, p, opts)
        result = pipeline.run()
        if options.view_as(TestOptions).dry_run:
            return EmbedResult(p.output, len(p.units), len(p.units) - len(p.pending), 0, _totals([], {}), {},
                               time.perf_counter() - started, job=getattr(result, "job", None))
        result.wait_until_finish()
        this_run = _metrics(result)
    markers = _done_markers(p.output)
    finished = [markers[u.index] for u in p.units if markers.get(u.index, {}).get("key") == u.key]
    if len(finished) != len(p.units):
        raise RuntimeError(f"{len(p.units) - len(finished)} units were not written; rerun to finish them")
    if any(u.size is None for u in p.units):  # tars without a sidecar: their ids are known only now
        check_repeated_ids(p.output, [u.index for u in p.units])
        markers = _done_markers(p.output)
        finished = [markers[u.index] for u in p.units]
    _remove_folders(p.output, UNITS_DIR)
    return EmbedResult(p.output, len(p.units), len(p.units) - len(p.pending), len(p.pending),
                       _totals(finished, p.run_info["listing_dead_letter_reasons"]), this_run,
                       time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("apache_beam", "absl", "jax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    def report():
        result = run(argv)
        print(result.summary())
        print(f"shards: {fs.join(result.output, 'shard-*.parquet')}")
        if result.totals["dead_letters"]:
            print(f"dead letters: {fs.join(result.output, DEAD_LETTER_DIR)}/ (listing.jsonl: manifest rows that "
                  "are not items; unit-*.jsonl: items that failed)")

    return run_cli("pipelines.embed", report)


if __name__ == "__main__":
    sys.exit(main())
