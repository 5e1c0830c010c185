"""Planning cost of the embedding pipeline's driver: listing an input and cutting it into units.

  python -m bench.listing                  # 100k and 1M items (writes bench/results/listing.json)
  python -m bench.listing --sizes 20000    # any sizes
  python -m bench.listing --case sharded --n 10000000 --shards 1000   # 10M rows in 1,000 manifest shards
  python -m bench.listing --case folder --n 1000000                   # a folder of 1M image files
      (each case writes bench/results/listing-CASE.json; --n smaller for a smoke run)

Cases: `manifest` (one JSONL manifest per size), `sharded` (N rows over S JSONL manifest shards in
one folder: pipelines.inputs.manifests), `folder` (one flat folder of N empty .jpg files, which
planning only lists: pipelines.listing.iter_images).

Each size runs `pipelines.embed.plan` in its own process (so peak RSS is that run's alone) over
a JSONL manifest of N items, with a tiny random model (only its fingerprint is read): list the
manifest, cut units of 1000, write the `_units/` files. "base RSS" is the process after imports
and before planning; the driver streams the listing, so peak minus base should not grow with N
as a held list of items would (about 1 KB per item).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

from bench.common import machine_info, print_table, write_json


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _write_manifest(path: str, size: int) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for i in range(size):
            f.write(json.dumps({"id": f"item-{i:08d}", "image": f"gs://bucket/images/{i % 9973:05d}/{i:08d}.jpg",
                                "captions": [f"{i}번째 사진: 한국어 설명문"]}, ensure_ascii=False) + "\n")


def _write_shards(folder: str, size: int, shards: int) -> None:
    os.makedirs(folder)
    per = -(-size // shards)
    for shard in range(shards):
        rows = range(shard * per, min(size, (shard + 1) * per))
        with open(os.path.join(folder, f"part-{shard:05d}.jsonl"), "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"id": f"item-{i:08d}", "image": f"gs://bucket/images/{i:08d}.jpg",
                                     "captions": [f"{i}번째 사진: 한국어 설명문"]}, ensure_ascii=False) + "\n"
                         for i in rows)


def _write_folder(folder: str, size: int) -> None:
    os.makedirs(folder)
    for i in range(size):
        os.close(os.open(os.path.join(folder, f"{i:08d}.jpg"), os.O_CREAT | os.O_WRONLY, 0o644))


def _tree_mb(path: str) -> float:
    if os.path.isfile(path):
        return os.path.getsize(path) / 2**20
    return sum(e.stat().st_size for e in os.scandir(path)) / 2**20


def _worker(args) -> dict:
    from pipelines import embed

    opts, _ = embed.parse(["--input", args.manifest, "--output", args.output, "--model", args.model,
                           "--unit-size", str(args.unit_size), "--overwrite"])
    embed._load_model_info(args.model, is_default=False)  # imports jax/flax before "base"
    base = _rss_mb()
    started = time.perf_counter()
    plan = embed.plan(opts)
    return {"items": plan.run_info["items"], "units": len(plan.units), "seconds": time.perf_counter() - started,
            "base_rss_mb": base, "peak_rss_mb": _rss_mb()}


def main(argv=None) -> int:
    head, _, rest = __doc__.partition("\n\n")
    p = argparse.ArgumentParser(description=head, epilog=rest, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="100000,1000000", help="comma-separated item counts")
    p.add_argument("--unit-size", type=int, default=1000)
    p.add_argument("--case", choices=("manifest", "sharded", "folder"), default="manifest")
    p.add_argument("--n", type=int, default=None, help="items of the sharded / folder case (default 10M / 1M)")
    p.add_argument("--shards", type=int, default=1000, help="manifest shards of the sharded case")
    p.add_argument("--out", default=None, help="JSON results path (default bench/results/listing[-CASE].json)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--manifest", help=argparse.SUPPRESS)
    p.add_argument("--output", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(args)))
        return 0
    from bench.pipeline import _quick_model

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-listing-") as tmp:
        model = _quick_model(tmp)
        if args.case == "manifest":
            sizes = [int(s) for s in args.sizes.split(",")]
        else:
            sizes = [args.n or (10_000_000 if args.case == "sharded" else 1_000_000)]
        for n in sizes:
            written = time.perf_counter()
            if args.case == "manifest":
                manifest = os.path.join(tmp, f"items-{n}.jsonl")
                _write_manifest(manifest, n)
            elif args.case == "sharded":
                manifest = os.path.join(tmp, f"shards-{n}")
                _write_shards(manifest, n, args.shards)
            else:
                manifest = os.path.join(tmp, f"folder-{n}")
                _write_folder(manifest, n)
            print(f"wrote the {args.case} input of {n} items in {time.perf_counter() - written:.0f} s", file=sys.stderr)
            cmd = [sys.executable, "-m", "bench.listing", "--worker", "--manifest", manifest, "--model", model,
                   "--output", os.path.join(tmp, f"out-{n}"), "--unit-size", str(args.unit_size)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"bench.listing: the {n}-item run failed:\n{done.stderr[-3000:]}")
            row = json.loads(done.stdout.strip().splitlines()[-1])
            row["manifest_mb"] = _tree_mb(manifest)
            row["case"] = args.case
            if args.case == "sharded":
                row["shards"] = args.shards
            row["planning_rss_mb"] = row["peak_rss_mb"] - row["base_rss_mb"]
            rows.append(row)
    print(f"case: {args.case}" + (f" ({args.shards} shards)" if args.case == "sharded" else ""))
    print_table(["items", "units", "input MB", "seconds", "items/s", "base RSS MB", "peak RSS MB", "peak - base MB"],
                [[r["items"], r["units"], f"{r['manifest_mb']:.0f}", f"{r['seconds']:.1f}",
                  f"{r['items'] / r['seconds']:.0f}", f"{r['base_rss_mb']:.0f}", f"{r['peak_rss_mb']:.0f}",
                  f"{r['planning_rss_mb']:.0f}"] for r in rows])
    out = args.out or ("bench/results/listing.json" if args.case == "manifest" else f"bench/results/listing-{args.case}.json")
    path = write_json(out, {"machine": machine_info(), "case": args.case, "unit_size": args.unit_size, "rows": rows})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
