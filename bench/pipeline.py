"""Embedding pipeline throughput and memory: the local Beam runner against the bare encoder.

  python -m bench.pipeline                 # demo model, emoji-ko images cycled to 5k and 20k items
  python -m bench.pipeline --repeat 1      # the largest size once instead of 3 times
  python -m bench.pipeline --quick         # tiny random model, 200 and 400 items: a smoke run
  python -m bench.pipeline --webdataset    # also the largest size as WebDataset tars, beside the manifest

Rows, each measured in its own process (so peak RSS is that run's alone):
  bare encoder   the same model's jitted encoders (checkpoint_encoders, same batch size) on the
                 same items: images already decoded and preprocessed in memory, captions as
                 strings. Pure model time: the ceiling for the pipeline.
  pipeline N     `python -m pipelines.embed` over a manifest of N items (emoji-ko images repeated
                 under new ids), from start to finish: listing, Beam start-up, model load and
                 warm-up (cold: no compilation cache), reading, decoding, inference, Parquet
                 writes. "start-up" is the time to the first model batch (the `koclip.embed`
                 metric batch_start_unix_ms, its minimum); "after start-up" is the rate after it.

  pipeline-wds N  (--webdataset) the same N items written as WebDataset tars of --unit-size samples
                 (key.png + key.txt, the webdataset library's TarWriter), no sidecar: the workers
                 stream the tars. Run right after each manifest run of the largest size; the
                 summary gives the throughput ratio of the two inputs (median over the repeats).

This machine's speed drifts by 10-30% within minutes (a shared VM), so a bare-encoder run comes
before and after every pipeline run, and each pipeline run's "% of bare" divides by the mean of
the two bare runs around it. The largest size runs --repeat times (default 3); the summary is the
median of its runs, with the lowest and highest.

Targets (issue 4): pipeline items/s >= 85% of the bare encoder's; peak RSS of the largest run
<= 1.2x that of the smallest (streaming: nothing held whole). Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

from bench.common import machine_info, print_table, write_json


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _write_manifest(path: str, size: int) -> str:
    from koclip.data.emoji_ko import ensure_emoji_ko
    from koclip.data.manifest import read_manifest

    records = read_manifest(ensure_emoji_ko())
    with open(path, "w", encoding="utf-8") as f:
        for i in range(size):
            r = records[i % len(records)]
            f.write(json.dumps({"id": f"{r.id}~{i // len(records)}", "image": r.uri, "captions": r.captions},
                               ensure_ascii=False) + "\n")
    return path


def _write_tars(folder: str, manifest: str, per_tar: int) -> str:
    """The manifest's items as WebDataset tars of `per_tar` samples (image bytes as read, caption .txt)."""
    import webdataset as wds

    from koclip.data.manifest import read_manifest

    os.makedirs(folder)
    records = read_manifest(manifest)
    cache: dict[str, bytes] = {}
    for start in range(0, len(records), per_tar):
        with open(os.path.join(folder, f"{start // per_tar:05d}.tar"), "wb") as f:
            writer = wds.TarWriter(f)
            for i, r in enumerate(records[start:start + per_tar], start):
                if r.uri not in cache:
                    with open(r.uri, "rb") as image:
                        cache[r.uri] = image.read()
                ext = os.path.splitext(r.uri)[1].lstrip(".").lower()
                writer.write({"__key__": f"{i:09d}", ext: cache[r.uri], "txt": r.captions[0]})
            writer.close()
    return folder


def _worker_pipeline(args) -> dict:
    from pipelines import embed

    started, started_unix = time.perf_counter(), time.time()
    result = embed.run(["--input", args.manifest, "--output", args.output, "--model", args.model,
                        "--batch-size", str(args.batch_size), "--unit-size", str(args.unit_size), "--overwrite",
                        "--compilation-cache", ""])  # cold: every run compiles, as a first run does
    seconds, ended_unix = time.perf_counter() - started, time.time()
    startup = result.this_run["first_batch_unix_ms"] / 1000 - started_unix
    return {"items": result.totals["items"], "embedded": result.totals["embedded"], "seconds": seconds,
            "startup_s": startup, "steady_s": ended_unix - started_unix - startup,
            "recompiles": result.this_run.get("recompiles", 0), "peak_rss_mb": _peak_rss_mb()}


def _worker_bare(args) -> dict:
    import numpy as np

    from koclip.checkpoint import load_checkpoint
    from koclip.data.manifest import read_manifest
    from koclip.encoders import checkpoint_encoders
    from koclip.processing import ImagePreprocessor

    ckpt = load_checkpoint(args.model)
    encoders = checkpoint_encoders(ckpt, batch_size=args.batch_size)
    encoders.warmup()
    records = read_manifest(args.manifest)
    preprocess = ImagePreprocessor.from_config(ckpt.config)
    cache: dict[str, np.ndarray] = {}
    pixels = [cache.setdefault(r.uri, preprocess(r.uri)) if r.uri not in cache else cache[r.uri]
              for r in records]
    started = time.perf_counter()
    for start in range(0, len(records), args.batch_size):
        batch = records[start:start + args.batch_size]
        encoders.images(np.stack(pixels[start:start + args.batch_size]))
        encoders.texts([c for r in batch for c in r.captions])
    seconds = time.perf_counter() - started
    return {"items": len(records), "embedded": len(records), "seconds": seconds, "startup_s": 0.0,
            "steady_s": seconds, "recompiles": 0, "peak_rss_mb": _peak_rss_mb()}


def _measure(kind: str, manifest: str, output: str, args) -> dict:
    cmd = [sys.executable, "-m", "bench.pipeline", "--worker", kind, "--manifest", manifest, "--output", output,
           "--model", args.model, "--batch-size", str(args.batch_size), "--unit-size", str(args.unit_size)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"bench.pipeline: the {kind} run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _quick_model(folder: str) -> str:
    from koclip.cli.main import main as koclip_cli

    path = os.path.join(folder, "tiny-model")
    if koclip_cli(["init", path, "--tiny", "tiny-bert-vit"]) != 0:
        raise SystemExit("could not make the tiny model")
    return path


def parse_args(argv=None) -> argparse.Namespace:
    head, _, rest = __doc__.partition("\n\n")
    p = argparse.ArgumentParser(description=head, epilog=rest, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint folder (default: the demo model)")
    p.add_argument("--sizes", default=None, help="comma-separated item counts (default 5000,20000; --quick 200,400)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--unit-size", type=int, default=1000)
    p.add_argument("--repeat", type=int, default=3, help="runs of the largest size (default 3)")
    p.add_argument("--out", default="bench/results/pipeline.json", help="JSON results path")
    p.add_argument("--quick", action="store_true", help="tiny random model and small sizes: a smoke run")
    p.add_argument("--webdataset", action="store_true",
                   help="also run the largest size from WebDataset tars, after each manifest run of it")
    p.add_argument("--worker", choices=("pipeline", "bare"), help=argparse.SUPPRESS)
    p.add_argument("--manifest", help=argparse.SUPPRESS)
    p.add_argument("--output", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        measure = _worker_pipeline if args.worker == "pipeline" else _worker_bare
        print(json.dumps(measure(args)))
        return 0
    sizes = [int(s) for s in (args.sizes or ("200,400" if args.quick else "5000,20000")).split(",")]
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        if args.model is None:
            from koclip.data import demo_model_dir

            args.model = _quick_model(tmp) if args.quick else demo_model_dir()
        if not os.path.exists(os.path.join(args.model, "config.json")):
            print(f"bench.pipeline: no model at {args.model}: run python -m jobs.train first", file=sys.stderr)
            return 2
        manifests = {n: _write_manifest(os.path.join(tmp, f"items-{n}.jsonl"), n) for n in sizes}

        def bare() -> dict:
            return {"run": "bare encoder", "size": sizes[0],
                    **_measure("bare", manifests[sizes[0]], os.path.join(tmp, "bare"), args)}

        tars = (_write_tars(os.path.join(tmp, "tars"), manifests[sizes[-1]], args.unit_size)
                if args.webdataset else None)
        rows = [bare()]
        for n in sizes[:-1] + [sizes[-1]] * args.repeat:
            rows.append({"run": "pipeline", "size": n,
                         **_measure("pipeline", manifests[n], os.path.join(tmp, f"out-{n}"), args)})
            rows.append(bare())
            if tars is not None and n == sizes[-1]:
                rows.append({"run": "pipeline-wds", "size": n,
                             **_measure("pipeline", tars, os.path.join(tmp, f"out-wds-{n}"), args)})
                rows.append(bare())
    for row in rows:
        row["items_per_s"] = row["items"] / row["seconds"]
        row["steady_items_per_s"] = row["items"] / row["steady_s"]
    for before, row, after in zip(rows[0::2], rows[1::2], rows[2::2]):
        row["bare_items_per_s"] = (before["items_per_s"] + after["items_per_s"]) / 2
        row["pct_of_bare"] = 100 * row["items_per_s"] / row["bare_items_per_s"]
        row["steady_pct_of_bare"] = 100 * row["steady_items_per_s"] / row["bare_items_per_s"]
    pipelines = [r for r in rows if r["run"] == "pipeline"]
    largest = [r for r in pipelines if r["size"] == sizes[-1]]
    from_tars = [r for r in rows if r["run"] == "pipeline-wds"]
    wds_ratio = (statistics.median(w["items_per_s"] / m["items_per_s"] for w, m in zip(from_tars, largest))
                 if from_tars else None)
    pct = sorted(r["pct_of_bare"] for r in largest)
    steady = sorted(r["steady_pct_of_bare"] for r in largest)
    rss_ratio = max(r["peak_rss_mb"] for r in largest) / pipelines[0]["peak_rss_mb"]
    print_table(["run", "items", "seconds", "items/s", "bare items/s around it", "% of bare", "start-up s",
                 "after start-up items/s", "% of bare", "peak RSS MB", "recompiles"],
                [[r["run"], r["size"], f"{r['seconds']:.1f}", f"{r['items_per_s']:.1f}",
                  f"{r['bare_items_per_s']:.1f}" if "bare_items_per_s" in r else "",
                  f"{r['pct_of_bare']:.0f}" if "pct_of_bare" in r else "", f"{r['startup_s']:.1f}",
                  f"{r['steady_items_per_s']:.1f}", f"{r['steady_pct_of_bare']:.0f}" if "pct_of_bare" in r else "",
                  f"{r['peak_rss_mb']:.0f}", r["recompiles"]] for r in rows])
    median = statistics.median(pct)
    print(f"pipeline throughput at {sizes[-1]} items, {len(largest)} runs: median {median:.0f}% of the bare encoder "
          f"end to end (lowest {pct[0]:.0f}%, highest {pct[-1]:.0f}%), median {statistics.median(steady):.0f}% "
          f"after start-up (target >= 85%); peak RSS {sizes[-1]} vs {sizes[0]} items: {rss_ratio:.2f}x "
          "(target <= 1.2x)")
    if wds_ratio is not None:
        print(f"WebDataset input vs manifest input at {sizes[-1]} items: median throughput ratio {wds_ratio:.2f} "
              f"over {len(from_tars)} pairs of runs")
    path = write_json(args.out, {
        "machine": machine_info(), "model": args.model, "batch_size": args.batch_size, "unit_size": args.unit_size,
        "rows": rows, "largest_pct_of_bare": {"median": median, "lowest": pct[0], "highest": pct[-1]},
        "largest_steady_pct_of_bare": {"median": statistics.median(steady), "lowest": steady[0],
                                       "highest": steady[-1]},
        "peak_rss_ratio": rss_ratio, "targets": {"pct_of_bare": 85, "peak_rss_ratio": 1.2},
        "webdataset_vs_manifest_items_per_s": wds_ratio,
    })
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
